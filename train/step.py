"""The training step: the model's forward and loss (`FaceTrainModel`), the batch's way onto the device (`prepare`),
backward, the optimizer and EMA updates (`train_step`, on the parts of a built `train.run.Run` it uses), what a step
leaves on the device until a log interval reads it, and the step's speed switches.

A training step that reads a value on the host (`loss.item()`, `float(grad_norm)`, `if not torch.isfinite(loss)`)
waits for the GPU to finish that step before the next can be queued; `StepStats` keeps the sums and the non-finite
flag as device tensors and reads them once per `--log-interval` (and before any checkpoint or validation, so a
diverged step never reaches a checkpoint).
"""
from contextlib import nullcontext
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from timm_mobileone.errors import UserError, first_line

from .distributed import World, agree_on_overflow, clip_grad_norm
from .optim import set_weight_decay, weight_decay_at
from .run import Inputs, Model, Optim

__all__ = ['FaceTrainModel', 'StepStats', 'prepare', 'train_step', 'set_train_form', 'check_compile']


class FaceTrainModel(nn.Module):
    """Backbone + margin head; `forward(images, labels)` returns the mean cross-entropy of the margin logits.

    Replicated head: one module so that DistributedDataParallel wraps both. Sharded head: the backbone passed in
    is the DDP-wrapped one and the head stays outside DDP (each process holds other centres).
    The head runs in float32 outside autocast: normalized cosines times s=64 need the precision.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, amp: Any = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.amp = amp

    def forward(self, images: torch.Tensor, labels: torch.Tensor, targets: Optional[torch.Tensor] = None,
                teacher_features: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`targets`, `teacher_features`: the online teacher's embeddings of this batch and, with a feature hint,
        its last feature map (distillation with --teacher-mode online)."""
        hint = None
        with self.amp if self.amp is not None else nullcontext():
            if getattr(self.head, 'hint_weight', 0):  # distillation with a feature hint (one process only)
                features = self.backbone.forward_features(images)
                embeddings = self.backbone.forward_head(features)
                hint = self.head.hint_loss(features, images, teacher_features)
            else:
                embeddings = self.backbone(images)
        if targets is None:
            loss = self.head.loss(embeddings.float(), labels)
        else:
            loss = self.head.loss(embeddings.float(), labels, targets)
        return loss if hint is None else loss + hint


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


def prepare(inputs: Inputs, step: int, images: torch.Tensor,
            labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """A loader's batch as the model takes it: (images augmented, normalized and on the device in its memory
    format, labels on the device, the online teacher's targets and feature maps or None, None)."""
    images = images.to(inputs.device, non_blocking=True).float()
    if inputs.augment is not None:  # 0..255 pixels in, 0..255 pixels out: the teacher normalizes its own way
        images = inputs.augment(images, step)
    targets, teacher_features = inputs.teacher(images) if inputs.teacher is not None else (None, None)
    images = images.sub_(inputs.mean).div_(inputs.std).contiguous(memory_format=inputs.memory_format)
    labels = labels.to(inputs.device, non_blocking=True)
    return images, labels, targets, teacher_features


def train_step(step: int, images: torch.Tensor, labels: torch.Tensor, inputs: Inputs, model: Model, optim: Optim,
               world: World, stats: StepStats) -> Dict[str, Any]:
    """Optimizer step `step` (0-based) of a built run, with no host synchronisation (bar GradScaler's own, float16
    only): the loss, its finiteness and the gradient norm accumulate on the device (`stats`), read at the log
    interval. Returns the loss (a device tensor), the learning rate and the weight decay it used."""
    optim.lr_scheduler.step_update(step)
    wd = weight_decay_at(step, optim.total_steps, *optim.weight_decay)
    set_weight_decay(optim.optimizer, wd)
    images, labels, targets, teacher_features = prepare(inputs, step, images, labels)
    loss = model.ddp(images, labels, targets, teacher_features)  # None, None: no online teacher
    optim.optimizer.zero_grad(set_to_none=True)
    # the total gradient norm is logged every step (a trainability signal); max_norm=inf measures, clips nothing
    scaler = optim.scaler
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optim.optimizer)
        agree_on_overflow(scaler, optim.optimizer, world, model.sharded)
        grad_norm = clip_grad_norm(model.net, model.backbone, model.head, world, model.sharded, optim.max_norm)
        scaler.step(optim.optimizer)
        scaler.update()
    else:
        loss.backward()
        grad_norm = clip_grad_norm(model.net, model.backbone, model.head, world, model.sharded, optim.max_norm)
        optim.optimizer.step()
    if model.ema is not None:
        model.ema.update(model.backbone, step=step)
    stats.add(step + 1, loss, torch.as_tensor(grad_norm, device=loss.device))
    return dict(loss=loss, lr=optim.optimizer.param_groups[0]['lr'], weight_decay=wd)
