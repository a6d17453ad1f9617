"""`train.compare_blocks`' runs: the model specs (`NAME:key=value`), training each model x seed x lr with
`train.face` (a finished folder reused, an interrupted one resumed), and reading run folders back."""
import json
import logging
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from timm_mobileone.errors import UserError

from .checkpoint import BEST_RESULT, BEST_WEIGHTS, STATE_NAME, read_log
from .face import parse_kwargs

_logger = logging.getLogger('train.compare_blocks')

# run-config keys that may differ between compared runs; every other one (data and recipe) must be equal
VARIED = ('model', 'model_kwargs', 'seed', 'lr', 'train_form')  # train_form: the same function (exact)


def parse_spec(spec: str) -> Tuple[str, Dict[str, Any]]:
    """'mobileone_112_s0:head_type=conv1x1,head_chs=32' -> ('mobileone_112_s0', {...}); checks it builds."""
    import timm
    import timm_mobileone  # noqa: F401  (registers the models)
    name, _, rest = spec.partition(':')
    if not timm.is_model(name):
        raise UserError(f'--models {spec}: unknown model {name!r}')
    try:
        kwargs = parse_kwargs([item for item in rest.split(',') if item]) if rest else {}
        timm.create_model(name, **kwargs)
    except (ValueError, TypeError) as e:
        raise UserError(f'--models {spec}: {e}') from None
    return name, kwargs


def spec_label(name: str, kwargs: Dict[str, Any]) -> str:
    return name + (':' + ','.join(f'{k}={v}' for k, v in kwargs.items()) if kwargs else '')


def _slug(text: str) -> str:
    return re.sub(r'[^A-Za-z0-9_.=-]+', '-', text).strip('-')


def _finished(folder: Path) -> Optional[Dict[str, Any]]:
    try:
        state = json.loads((folder / STATE_NAME).read_text())
    except (OSError, ValueError):
        return None
    return state if state.get('step') == state.get('total_steps') else None


def diverged_at(folder: Path) -> Optional[str]:
    """train.face's record of a non-finite loss in the run's log (a result, not a failure), or None."""
    try:
        rows = read_log(folder)
    except (OSError, ValueError):
        return None
    hit = next((r for r in rows if r.get('diverged')), None)
    return None if hit is None else f'loss is {hit["loss"]} at step {hit["step"] - 1}'


def train_runs(args, extra: Sequence[str], specs: List[Tuple[str, Dict[str, Any]]]) -> List[Dict[str, Any]]:
    """Train (or reuse) every model x seed x lr run; returns one entry per run: folder, diverged, error line."""
    out = Path(args.output)
    runs = []
    several_lr = len(args.lr) > 1
    if '--teacher' in extra and '--teacher-cache' not in extra:  # the teacher runs once for all the runs
        extra = [*extra, '--teacher-cache', str(out / 'teacher.safetensors')]
    for lr in args.lr:
        for seed in args.seeds:
            for name, kwargs in specs:
                folder = out / _slug(f'{spec_label(name, kwargs).replace(":", "-")}-seed{seed}'
                                     + (f'-lr{lr:g}' if several_lr else ''))
                argv = ['--model', name, '--data', args.data, '--val', *args.val, '--output', str(folder),
                        '--seed', str(seed), '--lr', repr(lr), '-b', str(args.batch_size), '--no-export',
                        '--device', args.device, *extra]
                if kwargs:
                    argv += ['--model-kwargs', *[f'{k}={v!r}' for k, v in kwargs.items()]]
                entry = dict(folder=str(folder), model=spec_label(name, kwargs), seed=seed, lr=lr, diverged=False,
                             error=None)
                diverged = diverged_at(folder)
                if diverged:  # an earlier invocation's run diverged: the result stands, nothing to resume
                    entry.update(diverged=True, error=diverged)
                elif _finished(folder) is None:
                    if (folder / STATE_NAME).is_file():
                        argv.append('--resume')
                    _logger.info(f'training {entry["model"]} seed {seed} lr {lr:g} -> {folder}')
                    out.mkdir(parents=True, exist_ok=True)
                    log = out / f'{folder.name}.stderr.log'
                    with open(log, 'w') as err:
                        proc = subprocess.run([sys.executable, '-m', 'train.face', *argv], stdout=subprocess.PIPE,
                                              stderr=err, text=True)
                    if proc.returncode != 0:
                        diverged = diverged_at(folder)
                        if diverged:
                            entry.update(diverged=True, error=diverged)
                        else:
                            last = [line for line in log.read_text().splitlines() if line.startswith('error:')]
                            line = last[-1] if last else f'train.face exited with {proc.returncode} (see {log})'
                            raise UserError(f'{entry["model"]} seed {seed}: {line.removeprefix("error: ")}')
                runs.append(entry)
    return runs


def read_run(folder: Path, require_finished: bool = True) -> Dict[str, Any]:
    """A train.face run folder: its config, log rows, best validation result and final weights file."""
    state_path = folder / STATE_NAME
    if not state_path.is_file():
        raise UserError(f'--runs {folder}: not a train.face run (no {STATE_NAME})')
    try:
        state = json.loads(state_path.read_text())
        rows = read_log(folder)
        config = state['run']
        best = json.loads((folder / BEST_RESULT).read_text()) if (folder / BEST_RESULT).is_file() else None
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f'--runs {folder}: unreadable run ({e})') from None
    if require_finished and state.get('step') != state.get('total_steps'):
        raise UserError(f'--runs {folder}: unfinished (step {state.get("step")} of {state.get("total_steps")}); '
                        f'finish it with train.face --resume')
    return dict(folder=str(folder), config=config, data=state.get('data'), rows=rows, best=best,
                weights=str(folder / BEST_WEIGHTS) if (folder / BEST_WEIGHTS).is_file() else None,
                model=spec_label(config['model'], config.get('model_kwargs') or {}))


def check_same_recipe(runs: List[Dict[str, Any]]) -> None:
    """Every run must share the data and recipe; only model, model kwargs, seed, lr and train form may vary."""
    ref = runs[0]
    for run in runs[1:]:
        if run['data'] != ref['data']:
            raise UserError(f'{run["folder"]} was trained on {run["data"]}, {ref["folder"]} on {ref["data"]}')
        keys = (set(ref['config']) | set(run['config'])) - set(VARIED)
        diff = sorted(k for k in keys if run['config'].get(k) != ref['config'].get(k))
        if diff:
            detail = ', '.join(f'{k}={run["config"].get(k)!r} vs {ref["config"].get(k)!r}' for k in diff)
            raise UserError(f'{run["folder"]} and {ref["folder"]} differ in recipe: {detail}')
