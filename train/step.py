"""What a training step leaves on the device until a log interval reads it, and the step's speed switches.

A training step that reads a value on the host (`loss.item()`, `float(grad_norm)`, `if not torch.isfinite(loss)`)
waits for the GPU to finish that step before the next can be queued; `StepStats` keeps the sums and the non-finite
flag as device tensors and reads them once per `--log-interval` (and before any checkpoint or validation, so a
diverged step never reaches a checkpoint).
"""
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from timm_mobileone._io import first_line
from timm_mobileone.errors import UserError

__all__ = ['StepStats', 'set_train_form', 'check_compile']


class StepStats:
    """Device-side sums of the loss and the gradient norm since the last read, and whether any loss was not
    finite (the first step that was, by its number)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._reset()

    def _reset(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.grad_norm_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.bad_step = torch.zeros((), dtype=torch.int64, device=self.device)  # 0: none; else the first step
        self.bad_loss = torch.zeros((), dtype=torch.float64, device=self.device)  # that step's loss
        self.last_loss = self.loss_sum
        self.steps = 0

    def add(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        loss = loss.detach().double()
        self.loss_sum += loss
        self.grad_norm_sum += grad_norm.detach().double()
        bad = (~torch.isfinite(loss)) & (self.bad_step == 0)
        self.bad_step = torch.where(bad, torch.full_like(self.bad_step, step), self.bad_step)
        self.bad_loss = torch.where(bad, loss, self.bad_loss)
        self.last_loss = loss
        self.steps += 1

    def read(self) -> Dict[str, Any]:
        """The means since the last read (one host synchronisation), then start again."""
        n = max(self.steps, 1)
        out = dict(loss=self.loss_sum.item() / n, grad_norm=self.grad_norm_sum.item() / n,
                   last_loss=self.last_loss.item(), steps=self.steps)
        self._reset()
        return out

    def first_bad(self) -> Optional[Tuple[int, float]]:
        """(step, loss) of the first step whose loss was not finite since the last read, or None (one host
        synchronisation)."""
        if self.steps == 0:
            return None
        bad = int(self.bad_step.item())
        return (bad, self.bad_loss.item()) if bad else None


def set_train_form(model: nn.Module, model_name: str, train_form: str) -> None:
    """--train-form on a built model, or one UserError line (a model without the form, DBB's refusal)."""
    if train_form == 'branches':
        if hasattr(model, 'set_train_form'):
            model.set_train_form('branches')
        return
    if not hasattr(model, 'set_train_form'):
        raise UserError(f'--train-form {train_form}: {model_name} has no merged training form (the '
                        f'mobileone_112_s0 ... s4 models have)')
    try:
        model.set_train_form(train_form)
    except ValueError as e:
        raise UserError(f'--train-form {train_form}: {first_line(e)}') from None


def check_compile(device: torch.device, backend: str = 'inductor') -> None:
    """--compile: compile and run a two-op function on the device first, so that a platform that cannot compile
    (no C++ compiler for the CPU backend, an unsupported GPU, no Triton) says so in one line before training."""
    try:
        fn = torch.compile(lambda t: torch.relu(t) * 2 + 1, backend=backend)
        fn(torch.ones(8, device=device))
    except Exception as e:  # torch._dynamo / inductor raise many types; all mean "cannot compile here"
        raise UserError(f'--compile: torch.compile (backend {backend}) does not work on this platform ({device.type}): '
                        f'{first_line(e)}; run without --compile') from None
