"""A training run's folder (resume state, not model loading): train.face's checkpoints, `last.json`, log, run flags.

    OUTPUT/checkpoint-<step>.safetensors         model.*, head.* (replicated), ema.*, optimizer.<i>.<name>, rng.*
    OUTPUT/checkpoint-<step>.head-<rank>.safetensors   a sharded head: each process's centres + their optimizer state
    OUTPUT/last.json                              step, schedule, optimizer hyperparameters, scaler, best, run flags;
                                                  written last, atomically: the commit point of a checkpoint
    OUTPUT/log.jsonl                              one row per logged step, validation, or divergence
    OUTPUT/best.safetensors, best.json            the best validated weights and their eval.verify result
    OUTPUT/final.safetensors                      the weights at the last step (EMA's with --model-ema)

A crash at any moment leaves `last.json` naming a complete checkpoint. Each function here is testable without a run.
"""
import json
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import torch

from timm_mobileone.files import atomic_write, save_safetensors  # noqa: F401  (the run folder's tensor writer)
from timm_mobileone.errors import UserError

STATE_NAME = 'last.json'
BEST_WEIGHTS = 'best.safetensors'
BEST_RESULT = 'best.json'
FINAL_WEIGHTS = 'final.safetensors'
LOG_NAME = 'log.jsonl'
# flags that shape the run: a resumed run must use the values it was started with
RUN_DEFINING = ('model', 'model_kwargs', 'loss', 'margin', 'scale', 'adaface_h', 'adaface_t_alpha', 'head',
                'sample_rate', 'epochs', 'batch_size', 'lr', 'opt', 'sched', 'warmup_epochs', 'warmup_lr', 'min_lr',
                'poly_power', 'weight_decay', 'weight_decay_end', 'model_ema', 'model_ema_decay',
                'model_ema_warmup', 'num_classes', 'seed',
                'world_size', 'drop_path', 'teacher', 'teacher_checkpoint', 'teacher_onnx', 'teacher_raw_pixels',
                'distill_weight', 'distill_proj', 'hint_weight', 'train_form', 'teacher_mode', 'relational_weight',
                'extra_data', 'crop_scale', 'crop_ratio', 'shift', 'rotate', 'color_jitter', 'gaussian_blur_prob',
                'grayscale_prob', 'mixup', 'cutmix', 'mixup_prob', 'best_on')
# what a run folder written before a flag existed was started with
RUN_DEFAULTS = dict(head='replicated', train_form='branches', teacher_mode='auto', relational_weight=0.0,
                    extra_data=[], crop_scale=[1.0, 1.0], crop_ratio=[1.0, 1.0], shift=0.0, rotate=0.0,
                    color_jitter=0.0, gaussian_blur_prob=0.0, grayscale_prob=0.0, mixup=0.0, cutmix=0.0,
                    mixup_prob=1.0, best_on='', model_ema_warmup=False)


def checkpoint_name(step: int) -> str:
    return f'checkpoint-{step:08d}.safetensors'


def shard_name(step: int, rank: int) -> str:
    return f'checkpoint-{step:08d}.head-{rank}.safetensors'


def prefixed(prefix: str, sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {f'{prefix}.{k}': v for k, v in sd.items()}  # save_safetensors moves them to the CPU


def strip(prefix: str, tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + '.')}


def json_write(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=1)
    atomic_write(path, lambda f: f.write((text + '\n').encode()))


def commit(out: Path, state: Dict[str, Any], keep: Sequence[str]) -> None:
    """Write `last.json` (the commit point), then remove every older checkpoint file not in `keep`."""
    json_write(out / STATE_NAME, state)
    for old in out.glob('checkpoint-*.safetensors'):
        if old.name not in keep:
            old.unlink(missing_ok=True)


def read(out: Path) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """(last.json, the checkpoint's tensors) of a run folder; UserError when either cannot be read."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        state = json.loads((out / STATE_NAME).read_text())
        return state, load_file(str(out / state['checkpoint']), device='cpu')
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:  # a truncated file: SafetensorError
        raise UserError(f'--resume: cannot read the checkpoint in {out} ({e})') from None


def read_shard(out: Path, state: Dict[str, Any], rank: int) -> Dict[str, torch.Tensor]:
    """This process's head shard of the checkpoint `state` names."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(out / state['head_shards'][rank]), device='cpu')
    except (OSError, ValueError, KeyError, IndexError, TypeError, SafetensorError) as e:
        raise UserError(f'--resume: cannot read this process\'s head shard in {out} ({e})') from None


def check_run_flags(out: Path, saved: Dict[str, Any], now: Dict[str, Any]) -> None:
    """UserError listing every run-defining flag whose value differs from the one the run was started with."""
    saved = dict(RUN_DEFAULTS, **saved)
    changed = [k for k in RUN_DEFINING if k in saved and k in now and saved[k] != now[k]]
    if changed:
        was = ', '.join(f'{k}={saved[k]!r}' for k in changed)
        is_now = ', '.join(f'{k}={now[k]!r}' for k in changed)
        hint = (' (world_size: the number of processes; a run resumes on as many as it started with)'
                if 'world_size' in changed else '')
        raise UserError(f'--resume: {out} was started with {was}, now {is_now}; a resumed run keeps its '
                        f'flags{hint} (start a new --output to change them)')


def last_step(out: Path) -> int:
    """The step of the last complete checkpoint (0 without one)."""
    path = out / STATE_NAME
    return json.loads(path.read_text())['step'] if path.is_file() else 0


def append_log(out: Path, row: Dict[str, Any]) -> None:
    with open(out / LOG_NAME, 'a') as f:
        f.write(json.dumps(row) + '\n')


def truncate_log(out: Path, step: int) -> None:
    """Drop log rows past the checkpoint (steps a crash lost): the resumed run logs them again."""
    log = out / LOG_NAME
    if log.is_file():
        rows = [line for line in log.read_text().splitlines() if line.strip()]
        keep = [line for line in rows if json.loads(line).get('step', 0) <= step]
        atomic_write(log, lambda f: f.write(''.join(line + '\n' for line in keep).encode()))


def read_log(out: Path) -> List[Dict[str, Any]]:
    log = out / LOG_NAME
    if not log.is_file():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def val_curve(out: Path) -> List[Dict[str, Any]]:
    """The run's validation rows from its log (a resumed run's included): step and accuracy per set."""
    return [dict(step=r['step'], val=r['val'], mean_accuracy=r['mean_accuracy']) for r in read_log(out) if 'val' in r]
