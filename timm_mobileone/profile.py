"""Model measurements: parameters, multiply-accumulates, fusion error and median timings."""
import copy
import time
from typing import Callable, Dict, Tuple

import numpy as np

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from timm.utils import reparameterize_model


def count_params(model: nn.Module) -> int:
    """Number of parameters (BatchNorm running statistics are buffers and not counted)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_size: Tuple[int, int, int] = (3, 112, 112)) -> int:
    """Multiply-accumulates of one forward pass at batch 1 (convs and matmuls; torch.utils.flop_counter / 2)."""
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    x = torch.zeros((1, *input_size), dtype=param.dtype, device=param.device)
    with FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops() // 2


def profile_model(model: nn.Module, input_size: Tuple[int, int, int] = (3, 112, 112)) -> Dict[str, float]:
    """Params (M) and GMACs of `model` (train-time form) and of its reparameterized copy."""
    fused = reparameterize_model(model)
    return dict(
        params_m=count_params(model) / 1e6,
        gmacs=count_macs(model, input_size) / 1e9,
        fused_params_m=count_params(fused) / 1e6,
        fused_gmacs=count_macs(fused, input_size) / 1e9,
    )


@torch.no_grad()
def fusion_error(model: nn.Module, dtype: torch.dtype = torch.float64, batch_size: int = 4, seed: int = 0) -> float:
    """Max relative error of the fused copy vs `model` (eval mode, its own BN statistics) on a random batch.

    Computed on a copy in `dtype`: float64 shows whether a gap is rounding (~1e-15) or a fusion bug (1e-3 or more).
    Non-finite outputs give inf.
    """
    ref = copy.deepcopy(model).to(dtype).eval()
    fused = reparameterize_model(ref)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch_size, *model.pretrained_cfg['input_size']), generator=g, dtype=dtype)
    a, b = ref(x), fused(x)
    if not torch.isfinite(a).all() or not torch.isfinite(b).all():
        return float('inf')
    return ((a - b).abs().max() / a.abs().max().clamp_min(torch.finfo(dtype).tiny)).item()


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `fn()` over `repeats` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))
