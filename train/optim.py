"""Optimizer, learning-rate schedule and weight-decay schedule of train.face, and the optimizer's state in checkpoint
form (tensors for safetensors, the rest JSON): each testable without a run."""
import math
from typing import Any, Dict, Tuple

import torch
import torch.nn as nn


def build_optimizer(model: nn.Module, args, fused: bool = False) -> torch.optim.Optimizer:
    """timm's decay / no-decay parameter groups (norm and bias parameters get none) under SGD or AdamW.

    Built directly rather than with timm's create_optimizer_v2, whose 'sgd' is Nesterov SGD; the recipe (and
    insightface) uses plain momentum SGD.
    """
    from timm.optim import param_groups_weight_decay
    groups = param_groups_weight_decay(model, weight_decay=args.weight_decay)
    for g in groups:
        g['anneal_weight_decay'] = g['weight_decay'] > 0
    # fused=True (CUDA): one kernel for the whole update instead of foreach's several per parameter group
    extra = dict(fused=True) if fused else {}
    if args.opt == 'sgd':
        return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, **extra)
    return torch.optim.AdamW(groups, lr=args.lr, **extra)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, args, total_steps: int, warmup_steps: int):
    """timm's step-based warmup + cosine / poly scheduler; `step_update(step)` sets the lr of every group."""
    from timm.scheduler import CosineLRScheduler, PolyLRScheduler
    common = dict(t_initial=max(1, total_steps - warmup_steps), lr_min=args.min_lr, warmup_t=warmup_steps,
                  warmup_lr_init=args.warmup_lr, warmup_prefix=True, t_in_epochs=False)
    if args.sched == 'poly':
        return PolyLRScheduler(optimizer, power=args.poly_power, **common)
    return CosineLRScheduler(optimizer, **common)


def weight_decay_at(step: int, total_steps: int, start: float, end: float) -> float:
    """Cosine anneal from `start` at step 0 to `end` at `total_steps`.

    Written here because timm's schedulers apply one floor to every param group, which would give the no-decay
    groups a weight decay of `end`.
    """
    t = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * t))


def set_weight_decay(optimizer: torch.optim.Optimizer, value: float) -> None:
    for g in optimizer.param_groups:
        if g.get('anneal_weight_decay'):
            g['weight_decay'] = value


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Split an optimizer state dict into tensors (for safetensors) and the JSON-able rest."""
    sd = optimizer.state_dict()
    tensors, other = {}, {}
    for idx, state in sd['state'].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f'optimizer.{idx}.{name}'] = value
            else:
                other.setdefault(str(idx), {})[name] = value
    return tensors, dict(param_groups=sd['param_groups'], state=other)


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: Dict[str, torch.Tensor], saved: Dict) -> None:
    state: Dict[int, Dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith('optimizer.'):
            _, idx, name = key.split('.', 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, values in saved['state'].items():
        state.setdefault(int(idx), {}).update(values)
    optimizer.load_state_dict(dict(state=state, param_groups=saved['param_groups']))
