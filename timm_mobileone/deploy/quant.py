"""Quantization-friendly rewrites of a fused model that keep its FP32 function: cross-layer equalization.

Nagel et al., `Data-Free Quantization Through Weight Equalization and Bias Correction` (ICCV 2019,
https://arxiv.org/abs/1906.04721), section 4.1: for two layers with a positive-homogeneous activation between them
(ReLU, PReLU: f(x / s) = f(x) / s for s > 0, per channel), dividing output channel i of the first by s_i and
multiplying input channel i of the second by s_i computes the same function. With s_i = sqrt(r1_i / r2_i) (r: the
channel's largest absolute weight) both layers' per-channel ranges meet, and the activation between them loses the
channels whose range dwarfs the rest: exactly what per-tensor activation quantization (ONNX Runtime's and XNNPACK's
uint8/int8 activations) cannot represent. Depthwise-separable nets (MobileNet, MobileFaceNet) need it most: folding
BatchNorm into a depthwise conv gives channels whose ranges differ by orders of magnitude.

`equalize(model)` applies it to every (conv, positive-homogeneous act, conv-or-linear) pair that a family lists
(`model.equalization_pairs()`); layers whose output feeds a residual add are not listed (their scale would have to
change the whole residual stream).
"""
from typing import List, Tuple

import torch
import torch.nn as nn

__all__ = ['equalize', 'channel_ranges']


def _is_depthwise(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Conv2d) and layer.groups == layer.in_channels and layer.groups > 1


def _out_ranges(layer: nn.Module) -> torch.Tensor:
    w = layer.weight.detach()
    return w.abs().reshape(w.shape[0], -1).amax(1)


def _in_ranges(layer: nn.Module) -> torch.Tensor:
    w = layer.weight.detach()
    if _is_depthwise(layer):
        return _out_ranges(layer)  # input channel i is output channel i
    if isinstance(layer, nn.Conv2d) and layer.groups != 1:
        raise ValueError('grouped (non-depthwise) convs are not equalized')
    return w.abs().transpose(0, 1).reshape(w.shape[1], -1).amax(1)


@torch.no_grad()
def _equalize_pair(first: nn.Module, second: nn.Module) -> float:
    """Rescale one pair in place; returns how far the scales were from 1 (max |log s|)."""
    r1, r2 = _out_ranges(first), _in_ranges(second)
    ok = (r1 > 0) & (r2 > 0)
    s = torch.where(ok, torch.sqrt(r1 / torch.where(ok, r2, torch.ones_like(r2))), torch.ones_like(r1))
    shape1 = (-1,) + (1,) * (first.weight.dim() - 1)
    first.weight.div_(s.view(shape1))
    if first.bias is not None:
        first.bias.div_(s)
    if _is_depthwise(second):  # input channel i is output channel i
        second.weight.mul_(s.view((-1,) + (1,) * (second.weight.dim() - 1)))
    else:
        second.weight.mul_(s.view((1, -1) + (1,) * (second.weight.dim() - 2)))
    return float(s.log().abs().max())


def channel_ranges(layer: nn.Module) -> Tuple[float, float]:
    """(smallest, largest) per-output-channel weight range of a layer: their ratio is what equalization shrinks."""
    r = _out_ranges(layer)
    return float(r.min()), float(r.max())


def equalize(model: nn.Module, iterations: int = 20, tol: float = 1e-3) -> nn.Module:
    """Cross-layer equalization, in place, of a fused model that lists `equalization_pairs()`; returns it.

    Iterates over all pairs until no scale moves by more than `tol` (in log), as the paper does for chains.
    """
    pairs_fn = getattr(model, 'equalization_pairs', None)
    if pairs_fn is None:
        raise ValueError(f'{type(model).__name__} lists no equalization pairs')
    try:
        pairs: List[Tuple[nn.Module, nn.Module]] = pairs_fn()
    except ValueError:
        raise ValueError('equalize a fused model (reparameterize first): BatchNorm sits between the pairs') from None
    for first, second in pairs:
        if isinstance(first, nn.Conv2d) and first.bias is None:
            raise ValueError('equalize a fused model (reparameterize first): BatchNorm sits between the pairs')
    for _ in range(iterations):
        if max(_equalize_pair(a, b) for a, b in pairs) < tol:
            break
    return model
