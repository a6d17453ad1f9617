"""Model measurements: parameters, multiply-accumulates, fusion error and median timings."""
import copy
import time
from typing import Callable, Dict, Hashable, List, Optional, Tuple

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


def time_round_robin(calls: Dict[Hashable, Callable[[], object]], repeats: int, pause: float = 0.05,
                     on_round: Optional[Callable[[int, int], object]] = None,
                     long_call: float = 0.25, warm: float = 0.03) -> Dict[Hashable, float]:
    """Median seconds per call of each entry, timed round-robin: every round times each call once, in the same
    order, so that the machine's load drifts alike for every entry (comparisons within one run stay fair).

    Before each timed call: a `pause` (s), then untimed calls of the same entry for at least `warm` seconds (at
    least one). The pause: runtimes' thread pools spin after a call (ONNX Runtime's intra-op pool, torch's OpenMP
    threads) and steal the cores from whatever runs next (measured on a 2-core box: MobileFaceNet in eager took
    9.6 ms right after ONNX Runtime calls, 5.2 ms alone). The warm-up: a core that has idled through the pause runs
    slowly for its first 10-20 ms of work (clock ramp, or the hypervisor waking the vCPU):
    `benchmarks/timer_warmup.py` on a 2-core VM timed ExecuTorch XNNPACK batch 1 of fused S0 at 6.09 ms with one
    warm-up call after the pause, 6.48 ms after 10 ms of warm-up calls, 3.11 ms after 20 ms and 3.37 ms back to
    back (docs/speed.md). An entry whose last timed call took longer than `long_call` (s) gets a `warm`-second busy
    wait instead of a call, which would double the time of the slowest, batched, measurements. The busy wait alone
    did not warm a short call up (6.66 ms): a long call pays the ramp itself, a few percent over 0.25 s.
    `on_round(k, repeats)` is called before round k (progress).
    """
    times: Dict[Hashable, List[float]] = {k: [] for k in calls}
    for k in range(repeats):
        if on_round is not None:
            on_round(k, repeats)
        for key, call in calls.items():
            time.sleep(pause)
            until = time.perf_counter() + warm
            if not times[key] or times[key][-1] < long_call:
                call()
                while time.perf_counter() < until:
                    call()
            while time.perf_counter() < until:
                pass
            t0 = time.perf_counter()
            call()
            times[key].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}
