"""Which block (or head) is better: train two or more architectures alike and compare them, `python -m
train.compare_blocks`.

    python -m train.compare_blocks --models mobileone_112_s0 mobileone_112_dbb_s0 --data DATA --val lfw.bin \
        --output OUT [--seeds 1 2 3] [--lr 0.1 0.05] [train.face flags: --epochs --batch-size --loss ...]
    python -m train.compare_blocks --models mobileone_112_s0 mobileone_112_s0:head_type=conv1x1 ...   # heads
    python -m train.compare_blocks --runs OUT/mobileone_112_s0-seed1 OUT/mobileone_112_dbb_s0-seed1 --output OUT
    python -m train.compare_blocks --models mobileone_112_s0:embed_dim=128 mobileone_112_dbb_s0:embed_dim=128 \
        --data SPLIT/train --val SPLIT/val --output OUT --loss none --teacher mobilefacenet \
        --teacher-checkpoint model-0000.params --amp                   # students of one teacher, on real faces

Each model is trained by `train.face` once per seed and learning rate, with the same data, data order (the seed
fixes the sampler and flips), recipe, teacher (with `--teacher`: train/distill.py; the runs share one cache of its
targets, `OUT/teacher.safetensors`, unless `--teacher-cache` says otherwise) and validation packs
(`OUT/<model>-seed<S>[-lr<LR>]`; a finished run folder is reused, an interrupted one resumed), or finished run
folders are read (`--runs`). A model is a registered name,
optionally with `create_model` arguments: `NAME:key=value,key=value`. The report compares, side by side:

* cost of training: train-time params and MACs, step time (forward + backward + SGD step of backbone and margin
  head, the same batch, median, timed round-robin over the models by `profile.time_round_robin`) and peak memory
  of a step (CUDA: peak allocated; CPU: growth of the peak RSS over the steps, in a fresh process per model);
* trainability: loss curves, gradient-norm statistics, runs that diverged (non-finite loss) or blew up (a logged loss
  above 3x the first) per seed and learning rate;
* accuracy: each validation pack, best and final, mean and spread (std, ddof=0) over seeds;
* quantization friendliness: the project's INT8 post-training quantization (ONNX QDQ, `timm_mobileone.export`) of
  each run's best weights, calibrated on the same images; verification accuracy of the FP32 and INT8 ONNX models
  and their embedding cosine on held-out crops; the fused weights' per-output-channel range spread (largest channel
  range / median channel range: what a per-tensor scale loses) and excess kurtosis, layer by layer;
* deploy cost: fused params, MACs and batch-1 latency (equal by construction for MobileOne vs DBB; measured).

Writes `OUT/compare.json` (the stdout object), `OUT/compare.md` (the tables) and `OUT/compare.png` (loss and
validation accuracy curves). User mistakes: one `error:` line, exit code 2, nothing written.
"""
import argparse
import json
import logging
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from timm_mobileone._io import atomic_write
from timm_mobileone.errors import UserError, cli

from .checkpoint import BEST_RESULT, BEST_WEIGHTS, STATE_NAME, read_log
from .face import parse_kwargs

_logger = logging.getLogger('train.compare_blocks')

# run-config keys that may differ between compared runs; every other one (data and recipe) must be equal
VARIED = ('model', 'model_kwargs', 'seed', 'lr')
BLOW_UP = 3.0  # a logged loss above this multiple of the first one counts as a blow-up


# ----------------------------------------------------------------------------------------------------------------
# arguments


def parse_args(argv: Optional[List[str]] = None) -> Tuple[argparse.Namespace, List[str]]:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(prog='python -m train.compare_blocks', description=__doc__.splitlines()[0],
                                formatter_class=fmt, epilog='Other flags are passed to train.face unchanged.')
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument('--models', nargs='+', metavar='NAME[:K=V,...]',
                     help='architectures to train and compare (at least 2)')
    src.add_argument('--runs', nargs='+', metavar='DIR', help='finished train.face run folders to compare')
    p.add_argument('--data', default='', help='training data (train.face --data); with --models')
    p.add_argument('--val', nargs='+', default=[], metavar='PACK',
                   help='validation packs (train.face --val; with --runs: default the packs the runs validated on)')
    p.add_argument('--output', required=True, help='folder of the runs and the report')
    p.add_argument('--seeds', nargs='+', type=int, default=[1], help='seeds; every model trains once per seed')
    p.add_argument('--lr', nargs='+', type=float, default=[0.1], help='learning rates; every model, every seed')
    p.add_argument('-b', '--batch-size', type=int, default=128, help='train.face --batch-size; also the batch of '
                   'the step time / memory measurement')
    p.add_argument('--calib', default='', help='INT8 calibration crops (folder or pack; default: the first --val)')
    p.add_argument('--calib-images', type=int, default=64, help='INT8 calibration images')
    p.add_argument('--heldout-images', type=int, default=32, help='held-out images for the INT8 vs FP32 cosine')
    p.add_argument('--no-int8', dest='int8', action='store_false', help='skip the INT8 comparison')
    p.add_argument('--no-cost', dest='cost', action='store_false',
                   help='skip the training / deployment cost tables (e.g. for runs trained on another machine)')
    p.add_argument('--cost-steps', type=int, default=5, help='timed training steps per model for the cost table')
    p.add_argument('--cost-batch-size', type=int, default=None,
                   help='batch of the step time / memory measurement (default: --batch-size)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='torch device')
    p.add_argument('--no-plot', dest='plot', action='store_false', help='skip compare.png')
    args, extra = p.parse_known_args(argv)
    args.command = f"{p.prog} {shlex.join(sys.argv[1:] if argv is None else argv)}".strip()
    reserved = {'--model', '-m', '--output', '--seed', '--resume', '--data', '--val', '--model-kwargs'}
    clash = [a for a in extra if a.split('=')[0] in reserved]
    if clash:
        p.error(f'{clash[0]} is set by compare_blocks for each run')
    if args.models is not None:
        if len(args.models) < 2:
            p.error('--models: give at least 2 models to compare')
        if not args.data:
            p.error('--models needs --data')
        if not args.val:
            p.error('--models needs --val (accuracy is part of the comparison)')
    elif extra or args.data:
        p.error(f'--runs reads finished runs; training flags ({(extra or ["--data"])[0]}) are not used')
    for name in ('batch_size', 'calib_images', 'heldout_images', 'cost_steps', 'cost_batch_size'):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f'--{name.replace("_", "-")} must be >= 1')
    return args, extra


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


# ----------------------------------------------------------------------------------------------------------------
# training


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


# ----------------------------------------------------------------------------------------------------------------
# reading runs


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
    """Every run must share the data and recipe; only model, model kwargs, seed and lr may vary."""
    ref = runs[0]
    for run in runs[1:]:
        if run['data'] != ref['data']:
            raise UserError(f'{run["folder"]} was trained on {run["data"]}, {ref["folder"]} on {ref["data"]}')
        keys = (set(ref['config']) | set(run['config'])) - set(VARIED)
        diff = sorted(k for k in keys if run['config'].get(k) != ref['config'].get(k))
        if diff:
            detail = ', '.join(f'{k}={run["config"].get(k)!r} vs {ref["config"].get(k)!r}' for k in diff)
            raise UserError(f'{run["folder"]} and {ref["folder"]} differ in recipe: {detail}')


# ----------------------------------------------------------------------------------------------------------------
# measurements


def _mean_std(values: Sequence[float]) -> Dict[str, Optional[float]]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return dict(mean=None, std=None, n=0)
    return dict(mean=round(float(np.mean(vals)), 5), std=round(float(np.std(vals)), 5), n=len(vals))


def trainability(run: Dict[str, Any]) -> Dict[str, Any]:
    losses = [r['loss'] for r in run['rows'] if 'loss' in r and not r.get('diverged')]
    norms = [r['grad_norm'] for r in run['rows'] if r.get('grad_norm') is not None]
    finite = [x for x in losses if math.isfinite(x)]
    tail = finite[-max(1, len(finite) // 10):] if finite else []
    return dict(
        first_loss=finite[0] if finite else None, final_loss=float(np.mean(tail)) if tail else None,
        blew_up=bool(finite) and max(finite) > BLOW_UP * finite[0],
        grad_norm_median=float(np.median(norms)) if norms else None,
        grad_norm_max=float(np.max(norms)) if norms else None,
        grad_norm_cv=float(np.std(norms) / np.mean(norms)) if norms and np.mean(norms) > 0 else None,
    )


def accuracies(run: Dict[str, Any]) -> Dict[str, Dict[str, float]]:
    """Per validation pack: the best and the final accuracy over the run's validations."""
    vals = [r['val'] for r in run['rows'] if 'val' in r]
    packs = sorted({k for v in vals for k in v})
    return {p: dict(best=max(v[p] for v in vals if p in v), final=[v[p] for v in vals if p in v][-1])
            for p in packs}


def _build(spec: Tuple[str, Dict[str, Any]], weights: Optional[str] = None) -> torch.nn.Module:
    import timm
    name, kwargs = spec
    model = timm.create_model(name, num_classes=0, **kwargs)
    if weights:
        from safetensors.torch import load_file
        model.load_state_dict(load_file(weights))
    return model


def _step_fn(spec, batch_size: int, num_classes: int, device: torch.device):
    """One SGD step of backbone + ArcFace head on a fixed random batch, as train.face steps (float32)."""
    from .margin import MarginHead
    import torch.nn.functional as F
    model = _build(spec).to(device)
    with torch.no_grad():
        embed_dim = model.eval()(torch.zeros(2, 3, 112, 112, device=device)).shape[-1]
    model.train()
    head = MarginHead(embed_dim, num_classes).to(device)
    opt = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=1e-3, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, 112, 112, generator=g).to(device)
    y = torch.randint(0, num_classes, (batch_size,), generator=g).to(device)

    def step():
        logits, targets = head(model(x), y)
        loss = F.cross_entropy(logits, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == 'cuda':
            torch.cuda.synchronize()
    return step


def _rss_mb(field: str) -> Optional[float]:
    try:
        for line in Path('/proc/self/status').read_text().splitlines():
            if line.startswith(field + ':'):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def _memory_worker(spec, batch_size: int, num_classes: int, steps: int, queue) -> None:
    step = _step_fn(spec, batch_size, num_classes, torch.device('cpu'))
    step()  # the first step allocates gradients and optimizer buffers: part of what training holds
    try:  # reset the peak RSS (VmHWM) to the current RSS (Linux >= 4.0), so the peak below is the steps' own
        Path('/proc/self/clear_refs').write_text('5')
    except OSError:
        queue.put(None)
        return
    before = _rss_mb('VmRSS')
    for _ in range(steps):
        step()
    peak = _rss_mb('VmHWM')
    queue.put(None if before is None or peak is None else peak - before)


def step_memory_mb(spec, batch_size: int, num_classes: int, device: torch.device, steps: int = 2) -> Optional[float]:
    """Peak memory of a training step above the steady state (weights, gradients, optimizer buffers): CUDA peak
    allocated, or on CPU the peak RSS above the RSS between steps, in a fresh process (None where Linux's
    /proc/self/clear_refs is not available)."""
    if device.type == 'cuda':
        step = _step_fn(spec, batch_size, num_classes, device)
        step()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            step()
        return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    import multiprocessing as mp
    ctx = mp.get_context('spawn')
    queue = ctx.Queue()
    proc = ctx.Process(target=_memory_worker, args=(spec, batch_size, num_classes, steps, queue))
    proc.start()
    value = queue.get(timeout=1800)
    proc.join()
    return None if value is None else round(float(value), 1)


def training_cost(specs, batch_size: int, num_classes: int, device: torch.device, steps: int) -> List[Dict]:
    """Params, MACs, step time (the project's round-robin timer over the models, median) and step memory of each
    train-time model."""
    from timm_mobileone.profile import count_macs, count_params, time_round_robin
    fns = {i: _step_fn(s, batch_size, num_classes, device) for i, s in enumerate(specs)}
    for fn in fns.values():
        fn()  # warm-up (the first step allocates the optimizer state)
    medians = time_round_robin(fns, steps)
    out = []
    for i, spec in enumerate(specs):
        model = _build(spec)
        out.append(dict(params_m=round(count_params(model) / 1e6, 3), gmacs=round(count_macs(model) / 1e9, 3),
                        step_s=round(medians[i], 4), batch_size=batch_size,
                        step_memory_mb=step_memory_mb(spec, batch_size, num_classes, device)))
    return out


def deploy_cost(specs, repeats: int = 20) -> List[Dict]:
    """Fused params, MACs and eager batch-1 latency (the project's round-robin timer over the models, median)."""
    from timm.utils import reparameterize_model
    from timm_mobileone.profile import count_macs, count_params, time_round_robin
    fused = [reparameterize_model(_build(s).eval()) for s in specs]
    x = torch.randn(1, 3, 112, 112)

    def call(m):
        @torch.no_grad()
        def run():
            return m(x)
        return run
    medians = time_round_robin({i: call(m) for i, m in enumerate(fused)}, repeats)
    return [dict(params_m=round(count_params(m) / 1e6, 3), gmacs=round(count_macs(m) / 1e9, 3),
                 latency_ms=round(medians[i] * 1e3, 3)) for i, m in enumerate(fused)]


def _kurtosis(w: np.ndarray) -> float:
    w = w.astype(np.float64).ravel()
    var = w.var()
    return float(((w - w.mean()) ** 4).mean() / var ** 2 - 3.0) if var > 0 else 0.0


def weight_stats(fused: torch.nn.Module) -> Dict[str, Any]:
    """Per fused conv / linear layer: per-output-channel range spread (max / median channel range) and excess
    kurtosis of the weights; with the median and maximum over layers."""
    layers = []
    for name, m in fused.named_modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m.weight.dim() >= 2:
            w = m.weight.detach().cpu().numpy().reshape(m.weight.shape[0], -1)
            ranges = w.max(axis=1) - w.min(axis=1)
            med = float(np.median(ranges))
            layers.append(dict(layer=name, channels=int(w.shape[0]),
                               range_spread=round(float(ranges.max() / med), 3) if med > 0 else None,
                               kurtosis=round(_kurtosis(w), 3)))
    spreads = [x['range_spread'] for x in layers if x['range_spread'] is not None]
    kurt = [x['kurtosis'] for x in layers]
    return dict(range_spread_median=round(float(np.median(spreads)), 3), range_spread_max=round(max(spreads), 3),
                kurtosis_median=round(float(np.median(kurt)), 3), kurtosis_max=round(max(kurt), 3), layers=layers)


def teacher_agreement(runs: List[Dict[str, Any]], specs, labels: List[str], val: Sequence[str],
                      device: str) -> None:
    """Students of one teacher (train.face --teacher): how closely each run's best weights reproduce the teacher's
    embedding on the validation crops (people the runs never trained on). Per image, the cosine between the
    student's and the teacher's flip-summed embeddings; `run['teacher_agreement']` gets its mean and 5th
    percentile. A finer measure of what distillation learned than pair accuracy on a few hundred pairs."""
    import timm
    from eval._common import add_model_flags, create_model, embed, input_cfg
    from eval._verification import combine_views
    from timm_mobileone.data import load_verification_set
    from .distill import build_teacher
    cfg = runs[0]['config']
    targs = argparse.Namespace(teacher=cfg['teacher'], teacher_checkpoint=cfg.get('teacher_checkpoint', ''),
                               teacher_onnx=cfg.get('teacher_onnx', ''),
                               teacher_raw_pixels=cfg.get('teacher_raw_pixels', False), val_batch_size=64,
                               workers=0, device=device)
    teacher, tcfg, teval, _ = build_teacher(targs, (112, 112))
    teval.flip = True

    def unit(model, data_cfg, eval_args, dataset):  # eval's flip rule: image + flip summed, then normalized
        raw, flip, _ = embed(model, dataset, data_cfg, eval_args)
        return combine_views(raw, flip)

    sets = [load_verification_set(p) for p in val]
    reference = [unit(teacher, tcfg, teval, d) for d in sets]
    for run in runs:
        if run['diverged'] or not run['weights']:
            continue
        name = specs[labels.index(run['model'])][0]
        sargs = add_model_flags(argparse.ArgumentParser(add_help=False)).parse_args(
            ['--model', name, '--checkpoint', run['weights'], '-j', '0', '--device', device, '--no-progress'])
        student = create_model(sargs)
        scfg = input_cfg(timm.data.resolve_data_config(pretrained_cfg=dict(student.pretrained_cfg)), sargs)
        cos = np.concatenate([np.sum(unit(student, scfg, sargs, d) * t, axis=1) for d, t in zip(sets, reference)])
        run['teacher_agreement'] = dict(cosine_mean=round(float(cos.mean()), 4),
                                        cosine_p05=round(float(np.percentile(cos, 5)), 4), images=len(cos))


def int8_check(run: Dict[str, Any], spec, val: Sequence[str], calib: np.ndarray, heldout: np.ndarray,
               folder: Path) -> Dict[str, Any]:
    """FP32 and INT8 ONNX of the run's best weights: verification accuracy of each, embedding cosine, weights."""
    from timm.utils import reparameterize_model
    from eval._common import ArtifactModel
    from eval.verify import verify
    from timm_mobileone import formats
    from timm_mobileone.data import load_verification_set
    fused = reparameterize_model(_build(spec, run['weights']).eval())
    folder.mkdir(parents=True, exist_ok=True)
    fp32_path, int8_path = folder / 'fp32.onnx', folder / 'int8.onnx'
    formats.export_onnx(fused, str(fp32_path))
    q = formats.onnx_int8_beside(fp32_path, int8_path, calib, heldout)
    sets = [load_verification_set(p) for p in val]
    acc = {}
    for label, path in (('fp32', fp32_path), ('int8', int8_path)):
        res = verify(ArtifactModel('onnx', str(path), dict(fused.pretrained_cfg)), sets)
        acc[label] = {r['dataset']: r['accuracy'] for r in res['results']}
    return dict(accuracy_fp32=acc['fp32'], accuracy_int8=acc['int8'], reduce_range=q['reduce_range'],
                cosine_mean=round(q['cosine_mean'], 5), cosine_min=round(q['cosine_min'], 5),
                weights=weight_stats(fused))


# ----------------------------------------------------------------------------------------------------------------
# the report


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return ''
    if isinstance(x, dict):
        if x.get('mean') is None:
            return ''
        return f"{x['mean']:.{digits}f} ± {x['std']:.{digits}f}" if x['n'] > 1 else f"{x['mean']:.{digits}f}"
    return f'{x:.{digits}g}' if isinstance(x, float) else str(x)


def summarize_models(models: List[str], runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per model and learning rate: accuracy, trainability and INT8 figures over seeds (mean, std)."""
    out = []
    for model in models:
        for lr in sorted({r['config']['lr'] for r in runs if r['model'] == model}):
            mine = [r for r in runs if r['model'] == model and r['config']['lr'] == lr]
            packs = sorted({p for r in mine for p in r['accuracy']})
            acc = {p: dict(best=_mean_std([r['accuracy'].get(p, {}).get('best') for r in mine]),
                           final=_mean_std([r['accuracy'].get(p, {}).get('final') for r in mine])) for p in packs}
            tr = [r['trainability'] for r in mine]
            entry = dict(
                model=model, lr=lr, seeds=[r['config']['seed'] for r in mine], accuracy=acc,
                diverged=sum(r['diverged'] for r in mine), blew_up=sum(t['blew_up'] for t in tr),
                final_loss=_mean_std([t['final_loss'] for t in tr]),
                grad_norm_median=_mean_std([t['grad_norm_median'] for t in tr]),
                grad_norm_max=_mean_std([t['grad_norm_max'] for t in tr]),
                grad_norm_cv=_mean_std([t['grad_norm_cv'] for t in tr]))
            agree = [r['teacher_agreement'] for r in mine if r.get('teacher_agreement')]
            if agree:
                entry['teacher_agreement'] = dict(cosine_mean=_mean_std([a['cosine_mean'] for a in agree]),
                                                  cosine_p05=_mean_std([a['cosine_p05'] for a in agree]))
            auc = [x.get('auc') for r in mine if r.get('best') for x in r['best']['results']]
            entry['best_auc'] = _mean_std([a for a in auc if a is not None])
            q = [r['int8'] for r in mine if r.get('int8')]
            if q:
                entry['int8'] = dict(
                    cosine_mean=_mean_std([x['cosine_mean'] for x in q]),
                    cosine_min=_mean_std([x['cosine_min'] for x in q]),
                    accuracy_fp32={p: _mean_std([x['accuracy_fp32'].get(p) for x in q]) for p in packs},
                    accuracy_int8={p: _mean_std([x['accuracy_int8'].get(p) for x in q]) for p in packs},
                    range_spread_median=_mean_std([x['weights']['range_spread_median'] for x in q]),
                    range_spread_max=_mean_std([x['weights']['range_spread_max'] for x in q]),
                    kurtosis_median=_mean_std([x['weights']['kurtosis_median'] for x in q]),
                    kurtosis_max=_mean_std([x['weights']['kurtosis_max'] for x in q]))
            out.append(entry)
    return out


def markdown(report: Dict[str, Any]) -> str:
    models, rows = report['models'], report['summary']
    lines = [f"Compared with `{report['command']}`", '']
    if report.get('training_cost'):
        lines += ['**Cost of training and deployment**', '',
                  '| model | train params (M) | train GMACs | step (s) at batch '
                  f"{report['training_cost'][0]['batch_size']} | step memory (MB) | fused params (M) | fused GMACs "
                  '| fused batch-1 latency (ms) |', '|---|---:|---:|---:|---:|---:|---:|---:|']
        for m, t, d in zip(models, report['training_cost'], report['deploy_cost']):
            lines.append(f"| {m} | {t['params_m']} | {t['gmacs']} | {t['step_s']} | {t['step_memory_mb']} | "
                         f"{d['params_m']} | {d['gmacs']} | {d['latency_ms']} |")
        lines.append('')
    packs = sorted({p for r in rows for p in r['accuracy']})
    lines += ['**Accuracy and trainability** (mean ± std over seeds)', '',
              '| model | lr | seeds | ' + ' | '.join(f'{p} best | {p} final' for p in packs)
              + ' | final loss | grad norm median / max | diverged | blew up |',
              '|---|---:|---|' + '---:|' * (2 * len(packs) + 4)]
    for r in rows:
        acc = ' | '.join(f"{_fmt(r['accuracy'][p]['best'])} | {_fmt(r['accuracy'][p]['final'])}" for p in packs)
        lines.append(f"| {r['model']} | {r['lr']:g} | {','.join(map(str, r['seeds']))} | {acc} | "
                     f"{_fmt(r['final_loss'])} | {_fmt(r['grad_norm_median'], 3)} / {_fmt(r['grad_norm_max'], 3)} | "
                     f"{r['diverged']} | {r['blew_up']} |")
    if any(r.get('teacher_agreement') for r in rows):
        lines += ['', '**Agreement with the teacher** on the validation crops (cosine of student and teacher '
                  'embeddings per image; best weights) and the best checkpoint\'s ROC AUC', '',
                  '| model | lr | cosine mean | cosine 5th percentile | best AUC |', '|---|---:|---:|---:|---:|']
        for r in rows:
            a = r.get('teacher_agreement')
            if a:
                lines.append(f"| {r['model']} | {r['lr']:g} | {_fmt(a['cosine_mean'])} | {_fmt(a['cosine_p05'])} | "
                             f"{_fmt(r['best_auc'])} |")
    if any(r.get('int8') for r in rows):
        lines += ['', '**INT8 post-training quantization** (ONNX QDQ, the same calibration images)', '',
                  '| model | lr | ' + ' | '.join(f'{p} FP32 / INT8' for p in packs)
                  + ' | INT8 vs FP32 cosine mean / min | channel range spread median / max | kurtosis median / max |',
                  '|---|---:|' + '---:|' * (len(packs) + 3)]
        for r in rows:
            q = r.get('int8')
            if not q:
                continue
            acc = ' | '.join(f"{_fmt(q['accuracy_fp32'][p])} / {_fmt(q['accuracy_int8'][p])}" for p in packs)
            lines.append(f"| {r['model']} | {r['lr']:g} | {acc} | {_fmt(q['cosine_mean'])} / {_fmt(q['cosine_min'])}"
                         f" | {_fmt(q['range_spread_median'], 3)} / {_fmt(q['range_spread_max'], 3)} | "
                         f"{_fmt(q['kurtosis_median'], 3)} / {_fmt(q['kurtosis_max'], 3)} |")
    return '\n'.join(lines) + '\n'


def plot(path: Path, runs: List[Dict[str, Any]], models: List[str]) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {m: f'C{i}' for i, m in enumerate(models)}
    for r in runs:
        label = f"{r['model']} seed {r['config']['seed']} lr {r['config']['lr']:g}"
        loss = [(x['step'], x['loss']) for x in r['rows'] if 'loss' in x and not x.get('diverged')]
        val = [(x['step'], x['mean_accuracy']) for x in r['rows'] if 'mean_accuracy' in x]
        if loss:
            ax_loss.plot(*zip(*loss), color=colors[r['model']], alpha=0.8, label=label)
        if val:
            ax_acc.plot(*zip(*val), color=colors[r['model']], marker='o', alpha=0.8, label=label)
    ax_loss.set(xlabel='step', ylabel='training loss', title='loss')
    ax_acc.set(xlabel='step', ylabel='mean validation accuracy', title='validation')
    ax_loss.legend(fontsize=7)
    fig.tight_layout()
    buf = __import__('io').BytesIO()
    fig.savefig(buf, format='png', dpi=110)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def compare(args, extra: Sequence[str]) -> Dict[str, Any]:
    out = Path(args.output)
    if args.models is not None:
        specs = [parse_spec(m) for m in args.models]
        labels = [spec_label(*s) for s in specs]
        if len(set(labels)) != len(labels):
            raise UserError('--models: the same model is named twice')
        for p in args.val:
            if not Path(p).exists():
                raise UserError(f'--val {p}: no such file or folder')
        from .face import parse_args as face_args
        face_args(['--model', specs[0][0], '--data', args.data, '--output', str(out / '_check'),
                   '-b', str(args.batch_size), *extra])  # train.face's own checks of the passed flags
        entries = train_runs(args, extra, specs)
        runs = []
        for e in entries:
            run = read_run(Path(e['folder']), require_finished=not e['diverged'])
            run.update(diverged=e['diverged'], error=e['error'])
            runs.append(run)
    else:
        runs = [read_run(Path(f)) for f in args.runs]
        for run in runs:
            run.update(diverged=False, error=None)
        labels = list(dict.fromkeys(r['model'] for r in runs))
        specs = [parse_spec(m) for m in labels]
        if len(labels) < 2:
            raise UserError('--runs: all runs are of one model; give runs of at least 2 models')
        if not args.val:  # the packs the runs validated on
            args.val = list(dict.fromkeys(x['data'] for r in runs if r['best'] for x in r['best']['results']))
    check_same_recipe(runs)
    for run in runs:
        run['trainability'] = trainability(run)
        run['accuracy'] = accuracies(run)
    num_classes = runs[0]['config'].get('num_classes') or 1000
    device = torch.device(args.device)
    train_cost = dep_cost = None
    if args.cost:
        _logger.info('measuring training and deployment cost')
        batch = args.cost_batch_size or (args.batch_size if args.models else runs[0]['config']['batch_size'])
        train_cost = training_cost(specs, batch, num_classes, device, args.cost_steps)
        dep_cost = deploy_cost(specs)
    if args.int8:
        import timm
        from timm_mobileone.export import calib_and_heldout
        cfg = timm.data.resolve_model_data_config(_build(specs[0]))
        calib_src = args.calib or (args.val[0] if args.val else '')
        if not calib_src:
            raise UserError('INT8: give --calib (no validation pack to calibrate on), or --no-int8')
        calib, heldout = calib_and_heldout(calib_src, cfg, args.calib_images, args.heldout_images)
        for run in runs:
            if run['diverged'] or not run['weights']:
                continue
            spec = specs[labels.index(run['model'])]
            _logger.info(f'INT8: {run["folder"]}')
            run['int8'] = int8_check(run, spec, args.val, calib, heldout, out / 'int8' / Path(run['folder']).name)
    if runs[0]['config'].get('teacher') and args.val:
        _logger.info('agreement of each student with the teacher')
        teacher_agreement(runs, specs, labels, args.val, args.device)
    summary = summarize_models(labels, runs)
    report = dict(
        command=args.command, output=str(out), models=labels, data=runs[0]['data'], val=list(args.val),
        recipe={k: v for k, v in runs[0]['config'].items() if k not in VARIED}, device=str(device),
        training_cost=train_cost, deploy_cost=dep_cost, summary=summary,
        runs=[dict(folder=r['folder'], model=r['model'], seed=r['config']['seed'], lr=r['config']['lr'],
                   diverged=r['diverged'], error=r['error'], accuracy=r['accuracy'],
                   trainability=r['trainability'], int8=r.get('int8'),
                   teacher_agreement=r.get('teacher_agreement')) for r in runs])
    text = json.dumps(report)
    atomic_write(out / 'compare.json', lambda f: f.write((text + '\n').encode()))
    atomic_write(out / 'compare.md', lambda f: f.write(markdown(report).encode()))
    if args.plot:
        plot(out / 'compare.png', runs, labels)
    print(text)
    return report


@cli(log_level=logging.INFO, log_format='%(asctime)s %(name)s: %(message)s')
def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run the comparison; returns (and prints) the JSON report."""
    args, extra = parse_args(argv)
    return compare(args, extra)


if __name__ == '__main__':
    main()
