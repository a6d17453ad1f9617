"""Model size and compute: parameters and multiply-accumulates of the train-time and fused forms."""
from typing import Dict, Tuple

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
