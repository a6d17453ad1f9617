"""What a `train.face` run is made of, as values: `Run` and its parts, built once from the flags by
`train.build.build_run` and never rebound after (the modules, optimizer and schedules in them change as they train;
which objects make the run does not). `train.loop.Trainer` holds a `Run` beside its own moving state (the step, the
best validation, the step statistics); `train.step.train_step` takes the parts it uses (`Inputs`, `Model`, `Optim`).
"""
import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, FrozenSet, List, Optional, Tuple

import torch
import torch.nn as nn

if TYPE_CHECKING:  # annotations only: this module imports nothing of the run's machinery
    from .augment import DeviceAugment
    from .data import Preloaded, ResumableSampler
    from .distill import OnlineTeacher
    from .distributed import World
    from .step import FaceTrainModel

__all__ = ['Data', 'Inputs', 'Model', 'Optim', 'Run']


@dataclass(frozen=True, eq=False)
class Data:
    """The training images, the order a process reads them in, and the validation packs."""
    dataset: Any  # train.data's RecordIODataset or ImageFolderDataset (`with_index` set for distillation)
    sampler: 'ResumableSampler'
    steps_per_epoch: int  # full batches of this process per epoch
    val_sets: List[Any]  # the --val packs, loaded on the main process only ([] on the others)
    data_cfg: Dict[str, Any]  # the architecture's face cfg: input_size, mean, std (`build._face_data_cfg`)
    preloaded: Optional['Preloaded'] = None  # --preload: every image decoded once, on the device

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    @property
    def input_size(self) -> Tuple[int, int]:
        return tuple(self.data_cfg['input_size'][-2:])


@dataclass(frozen=True, eq=False)
class Inputs:
    """What turns a loader's batch (0..255 pixels) into the step's inputs on the device (`step.prepare`)."""
    device: torch.device
    augment: Optional['DeviceAugment']  # augmentation on the device, None without augmentation flags
    teacher: Optional['OnlineTeacher']  # --teacher-mode online: embeds each batch as the student sees it
    mean: torch.Tensor  # (1, 3, 1, 1), in 0..255 pixel units
    std: torch.Tensor
    memory_format: torch.memory_format  # channels_last with --channels-last


@dataclass(frozen=True, eq=False)
class Model:
    """The trained modules. `net` is backbone + head as one module (SyncBatchNorm-converted with --sync-bn);
    `ddp` is what a step calls: `net`, or its DistributedDataParallel wrapper with several processes (with a
    sharded head, a FaceTrainModel of the DDP-wrapped backbone and the head), compiled in place with --compile."""
    backbone: nn.Module
    head: nn.Module  # MarginHead, ShardedMarginHead (this process's centres) or distill.DistillHead
    head_kind: str  # --head resolved: 'replicated' or 'sharded' (the summary's head.kind, last.json's run.head)
    net: 'FaceTrainModel'
    ddp: nn.Module
    ema: Optional[Any]  # timm's ModelEmaV3 of the backbone (--model-ema)

    @property
    def sharded(self) -> bool:
        return self.head_kind == 'sharded'

    def eval_model(self) -> nn.Module:
        """The weights validated, exported and saved as final: the EMA's with --model-ema."""
        return self.ema.module if self.ema is not None else self.backbone


@dataclass(frozen=True, eq=False)
class Optim:
    """The optimizer, its schedules and the update's settings."""
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any  # timm's step-based CosineLRScheduler or PolyLRScheduler (`step_update(step)`)
    scaler: Optional[torch.amp.GradScaler]  # float16 AMP on CUDA only
    total_steps: int
    warmup_steps: int
    weight_decay: Tuple[float, float]  # cosine-annealed from the first to the second over total_steps
    max_norm: float  # --clip-grad, or inf: the gradient norm is measured every step and nothing clipped
    head_indices: FrozenSet[int]  # the head's parameters' indices in the optimizer state (a sharded head's file)


@dataclass(frozen=True, eq=False)
class Run:
    """One training process's run: every part built from the flags, before the run folder is made."""
    args: argparse.Namespace  # the flags as parsed; building reads them and rewrites none
    world: 'World'
    out: Path  # --output
    arch: str  # the backbone's architecture name (the fused copy's, the export's)
    data: Data
    inputs: Inputs
    model: Model
    optim: Optim
    teacher_info: Optional[Dict[str, Any]]  # the summary's `teacher`: mode, fingerprint, cache (None: no teacher)
    head_memory: Dict[str, Any]  # the summary's `head` (and its log `line`)

    @property
    def device(self) -> torch.device:
        return self.world.device
