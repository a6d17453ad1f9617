"""Face-recognition training: from a dataset to a Hub folder, `python -m train.face`.

    python -m train.face --model mobileone_112_s0 --data ms1m-retinaface-t1/ --loss arcface --epochs 20 \
        --batch-size 128 --lr 0.1 --output runs/s0 --val lfw.bin cfp_fp.bin agedb_30.bin
    torchrun --nproc-per-node=8 -m train.face ...                 # DistributedDataParallel, one process per GPU
    python -m train.face ... --output runs/s0 --resume            # continue from runs/s0/last.json

Data: an insightface RecordIO pack (a folder with `train.rec` + `train.idx`, or the `.rec` file) read without mxnet,
or an ImageFolder tree (one folder per identity). Images must be aligned crops of the model's input size.
Recipe: margin head (ArcFace s=64 m=0.5, CosFace s=64 m=0.4 or AdaFace s=64 m=0.4 h=0.333; `--sample-rate` for
partial FC) on the model's embedding, replicated on every process or, by default with several processes, sharded
across them (`--head sharded`: each process holds C/W class centres, train/partial_fc.py); SGD with momentum 0.9 (or
AdamW); linear warmup then cosine or polynomial decay of the learning rate (timm's schedulers, updated every step);
weight decay annealed by cosine from `--weight-decay` to `--weight-decay-end` (the MobileOne paper's schedule), none
on norm and bias parameters; optional EMA of the weights; AMP on GPUs; gradient clipping. `--batch-size` and `--lr`
are per process and global as given: with N processes the global batch is N x batch-size, and the learning rate is
not rescaled.

Validation runs on a reparameterized (fused) copy with eval.verify's protocol and code, every `--val-every` steps
and at the end; the best mean accuracy keeps `best.safetensors` (train-time state dict) and `best.json` (the
eval.verify result, whose `command` reproduces it). At the end the best checkpoint goes through
`timm_mobileone.hub export` into `OUTPUT/hub`, ready for `python -m timm_mobileone.hub push`.

Checkpoints: `checkpoint-<step>.safetensors` (model, margin head, EMA, optimizer buffers, RNG states; with a sharded
head, each process's centres and their optimizer buffers in `checkpoint-<step>.head-<rank>.safetensors`) and
`last.json` (step, schedule, optimizer hyperparameters, scaler, best so far, the run's flags), which names the
weights file and is written last, atomically: a crash at any moment leaves `last.json` pointing at a complete
checkpoint, and loses only the steps since. Logs: one line per `--log-interval` steps on stderr and in
`OUTPUT/log.jsonl`; stdout carries one JSON summary. User mistakes: one `error:` line, exit code 2.
"""
import argparse
import json
import logging
import os
import re
import shlex
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from timm_mobileone._io import create_model_checked
from timm_mobileone.errors import UserError, cli
from timm_mobileone.merged import TRAIN_FORMS

from . import checkpoint as ckpt
from . import distill
from .checkpoint import BEST_RESULT, BEST_WEIGHTS, RUN_DEFINING, STATE_NAME
from .data import ResumableSampler, collate, open_dataset
from .distributed import World, agree_on_overflow, clip_grad_norm
from .margin import MarginHead
from .optim import build_lr_scheduler, build_optimizer, load_optimizer, optimizer_tensors, set_weight_decay, \
    weight_decay_at
from .partial_fc import ShardedMarginHead
from .step import StepStats, check_compile, set_train_form

_logger = logging.getLogger('train')

def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(prog='python -m train.face', description=__doc__.splitlines()[0],
                                formatter_class=fmt)
    p.add_argument('-m', '--model', default='mobileone_112_s0', help='mobileone_112_s0 ... s4 (or another timm '
                   'model returning embeddings)')
    p.add_argument('--model-kwargs', nargs='*', default=[], metavar='KEY=VALUE',
                   help='extra timm.create_model arguments, e.g. head_type=conv1x1 head_chs=32 (timm train.py\'s '
                        'flag; values read as Python literals, else strings)')
    p.add_argument('--pretrained', action='store_true', help='start from the pretrained weights of --model')
    p.add_argument('--initial-checkpoint', default='', help='start from this state dict')
    p.add_argument('--data', required=True, help='a folder with train.rec + train.idx (insightface RecordIO), a '
                   '.rec file, or an ImageFolder tree (one folder per identity)')
    p.add_argument('--num-classes', type=int, default=None,
                   help='identities (default: the pack\'s property file or header, or the ImageFolder\'s folders)')
    p.add_argument('--loss', default='arcface', choices=('arcface', 'cosface', 'adaface', 'none'),
                   help='margin loss (none: distillation only, with --teacher)')
    p.add_argument('--margin', type=float, default=None,
                   help='margin m (default: 0.5 arcface, 0.4 cosface, 0.4 adaface)')
    p.add_argument('--scale', type=float, default=64.0, help='logit scale s')
    p.add_argument('--adaface-h', type=float, default=0.333, help='AdaFace: h, the spread of the norm-adaptive margin')
    p.add_argument('--adaface-t-alpha', type=float, default=0.01,
                   help='AdaFace: EMA rate of the feature-norm batch mean and std')
    p.add_argument('--head', default=None, choices=('replicated', 'sharded'),
                   help='margin head: every class centre on every process (replicated), or each process holding '
                        'C/W of them (sharded, Partial FC; the default with more than one process)')
    p.add_argument('--sample-rate', type=float, default=1.0,
                   help='partial FC: fraction of class centres scored per step (batch classes always included; '
                        'with --head sharded, of each process\'s own centres)')
    p.add_argument('--epochs', type=int, default=20, help='epochs')
    p.add_argument('-b', '--batch-size', type=int, default=128, help='images per step and process')
    p.add_argument('--opt', default='sgd', choices=('sgd', 'adamw'), help='optimizer (sgd: momentum, no nesterov)')
    p.add_argument('--momentum', type=float, default=0.9, help='SGD momentum')
    p.add_argument('--lr', type=float, default=0.1, help='peak learning rate')
    p.add_argument('--sched', default='cosine', choices=('cosine', 'poly'), help='learning-rate decay after warmup')
    p.add_argument('--poly-power', type=float, default=2.0, help='power of the poly schedule')
    p.add_argument('--min-lr', type=float, default=0.0, help='learning rate at the end of training')
    p.add_argument('--warmup-epochs', type=float, default=1.0, help='linear warmup length (may be fractional)')
    p.add_argument('--warmup-lr', type=float, default=0.0, help='learning rate at step 0 of the warmup')
    p.add_argument('--weight-decay', type=float, default=1e-4, help='weight decay at step 0 (not on norm/bias)')
    p.add_argument('--weight-decay-end', type=float, default=1e-5, help='weight decay at the end (cosine anneal)')
    p.add_argument('--clip-grad', type=float, default=None, help='clip the gradient norm to this value')
    p.add_argument('--model-ema', action='store_true', help='keep an EMA of the weights (validated and exported)')
    p.add_argument('--model-ema-decay', type=float, default=0.9998, help='EMA decay per step')
    p.add_argument('--drop-path', type=float, default=0.0, help='drop path rate')
    p.add_argument('--amp', action='store_true', help='mixed precision (CUDA: float16 with a grad scaler, or '
                   '--amp-dtype bfloat16; CPU: bfloat16)')
    p.add_argument('--amp-dtype', default='float16', choices=('float16', 'bfloat16'), help='AMP dtype on CUDA')
    p.add_argument('--channels-last', action='store_true',
                   help='channels_last memory format (CUDA only: on CPU, oneDNN#6035 breaks its backward)')
    p.add_argument('--grad-checkpointing', action='store_true', help='recompute activations in backward')
    p.add_argument('--train-form', default='branches', choices=TRAIN_FORMS,
                   help='how MobileOne blocks train: every branch as a module, or the same function as one conv '
                        'per block (timm_mobileone.merged: exact, same weights and checkpoints, faster)')
    p.add_argument('--compile', action='store_true', help='torch.compile the model and loss (checkpoints are '
                   'the uncompiled model\'s)')
    p.add_argument('--compile-backend', default='inductor', help='torch.compile backend (timm train.py\'s '
                   '--torchcompile value; eager: dynamo tracing alone)')
    p.add_argument('--sync-bn', action='store_true', help='synchronize BatchNorm statistics across processes')
    p.add_argument('--val', nargs='+', default=[], metavar='PACK',
                   help='verification packs (.bin) or aligned folders with pairs.txt for validation')
    p.add_argument('--val-every', type=int, default=0, help='validate every N steps (0: at each epoch end)')
    p.add_argument('--val-batch-size', type=int, default=128, help='validation batch size')
    p.add_argument('--checkpoint-every', type=int, default=0, help='checkpoint every N steps (0: each epoch end)')
    p.add_argument('--output', required=True, help='run folder (checkpoints, logs, best weights, hub export)')
    p.add_argument('--resume', action='store_true', help='continue the run in --output from its last checkpoint')
    p.add_argument('--tag', default='', help='pretrained tag of the exported weights (default: <data>_<loss>)')
    p.add_argument('--no-export', dest='export', action='store_false', help='skip the hub export at the end')
    p.add_argument('-j', '--workers', type=int, default=min(8, os.cpu_count() or 1),
                   help='DataLoader processes decoding images per training process')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='torch device')
    p.add_argument('--seed', type=int, default=42, help='random seed')
    p.add_argument('--log-interval', type=int, default=50, help='log every N steps')
    p.add_argument('--license', default='apache-2.0', help='licence of the exported weights (the model card\'s); '
                   'weights distilled from a teacher carry its terms')
    distill.add_flags(p)
    args = p.parse_args(argv)
    try:
        args.model_kwargs = parse_kwargs(args.model_kwargs)
    except ValueError as e:
        p.error(f'--model-kwargs: {e}')
    args.command = f"{p.prog} {shlex.join(sys.argv[1:] if argv is None else argv)}".strip()
    for name in ('epochs', 'batch_size', 'log_interval', 'val_batch_size'):
        if getattr(args, name) < 1:
            p.error(f'--{name.replace("_", "-")} must be >= 1')
    for name in ('workers', 'val_every', 'checkpoint_every'):
        if getattr(args, name) < 0:
            p.error(f'--{name.replace("_", "-")} must be >= 0')
    if not 0.0 < args.sample_rate <= 1.0:
        p.error('--sample-rate must be in (0, 1]')
    if not 0.0 <= args.adaface_t_alpha <= 1.0:
        p.error('--adaface-t-alpha must be in [0, 1]')
    if args.num_classes is not None and args.num_classes < 2:
        p.error('--num-classes must be >= 2')
    distill.check_flags(p, args)
    if args.tag and not re.fullmatch(r'[a-z0-9][a-z0-9_]*', args.tag):
        p.error('--tag: use lowercase letters, digits and _ (e.g. ms1mv3_arcface)')
    return args


def parse_kwargs(items: Sequence[str]) -> Dict[str, Any]:
    """['head_type=conv1x1', 'head_chs=32'] -> {'head_type': 'conv1x1', 'head_chs': 32}, as timm's ParseKwargs
    reads them (Python literals, else strings), but a malformed item raises ValueError instead of a traceback."""
    import ast
    out: Dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition('=')
        if not sep or not key.isidentifier():
            raise ValueError(f'{item!r} is not KEY=VALUE')
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


# ----------------------------------------------------------------------------------------------------------------
# model, optimizer, schedules


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

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hint = None
        with self.amp if self.amp is not None else nullcontext():
            if getattr(self.head, 'hint_weight', 0):  # distillation with a feature hint (one process only)
                features = self.backbone.forward_features(images)
                embeddings = self.backbone.forward_head(features)
                hint = self.head.hint_loss(features, images)
            else:
                embeddings = self.backbone(images)
        loss = self.head.loss(embeddings.float(), labels)
        return loss if hint is None else loss + hint


def _default_tag(data: str, loss: str) -> str:
    p = Path(data)
    name = p.parent.name if p.suffix == '.rec' else p.name
    slug = re.sub(r'[^a-z0-9]+', '_', name.lower()).strip('_') or 'custom'
    return f'{slug}_{loss}' if slug[0].isalnum() else f'custom_{loss}'


class Trainer:
    """One training process: builds everything from the flags, runs the steps, validates, checkpoints."""

    def __init__(self, args, world: World) -> None:
        import timm
        from timm.utils import ModelEmaV3
        self.args = args
        self.world = world
        self.device = world.device
        self.out = Path(args.output)
        torch.manual_seed(args.seed)  # the same initial weights on every process (DDP broadcasts rank 0's anyway)
        self.backbone = create_model_checked(args.model, args.pretrained, args.initial_checkpoint,
                                             num_classes=0, drop_path_rate=args.drop_path or None,
                                             **args.model_kwargs)
        self.arch = self.backbone.pretrained_cfg.get('architecture') or args.model
        set_train_form(self.backbone, args.model, args.train_form)
        if args.train_form == 'merged' and args.sync_bn and world.world_size > 1:
            raise UserError('--train-form merged with --sync-bn: the merged form computes each process\'s own '
                            'batch statistics; use --train-form branches to synchronize them')
        if args.compile:
            check_compile(self.device, args.compile_backend)
        self._check_output()  # after the model's refusals: a refused run leaves no folder behind
        self.data_cfg = self._face_data_cfg()
        if args.export and self.arch not in timm.list_models('mobileone_112_*'):
            raise UserError(f'--model {args.model}: the hub export handles mobileone_112 models only; pass '
                            f'--no-export to train {self.arch}')
        if args.export and set(args.model_kwargs) - {'embed_dim'}:
            raise UserError('--model-kwargs: the hub export writes the registered architectures with their '
                            'embedding size only (embed_dim; it reads that from the weights); pass --no-export')
        input_size = tuple(self.data_cfg['input_size'][-2:])
        self.dataset = open_dataset(args.data, input_size, flip=True, seed=args.seed, num_classes=args.num_classes)
        self.num_classes = self.dataset.num_classes
        if self.num_classes < 2 and args.loss != 'none':
            raise UserError(f'--data {args.data}: {self.num_classes} identity; a margin loss needs at least 2')
        with torch.no_grad():  # in eval mode: the probe must not touch the BN statistics
            embed_dim = self.backbone.eval()(torch.zeros(1, 3, *input_size)).shape[-1]
        self.backbone.train()
        self.teacher_info: Optional[Dict[str, Any]] = None
        self.head = self._build_distill_head(embed_dim, input_size) if args.teacher else self._build_head(embed_dim)
        if args.grad_checkpointing:
            self.backbone.set_grad_checkpointing(True)
        if args.channels_last and self.device.type == 'cpu':
            # measured here: the stem's stride-2 1x1 scale conv (3 input channels) crashes or corrupts memory in
            # backward under channels_last on CPU; oneDNN issue #6035 (nhwc 1x1 backward_weights, IC < ic_block)
            raise UserError('--channels-last is refused on CPU: oneDNN\'s channels_last backward of the stem\'s '
                            'stride-2 1x1 conv crashes or gives wrong gradients (uxlfoundation/oneDNN#6035); '
                            'use it on CUDA')
        memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        self.memory_format = memory_format
        self.amp, self.scaler = self._amp()
        self.net = FaceTrainModel(self.backbone, self.head, self.amp).to(self.device, memory_format=memory_format)
        if isinstance(self.head, distill.DistillHead):
            self.head.targets_to(self.device)
        if args.sync_bn and world.world_size > 1:
            if self.device.type != 'cuda':
                raise UserError('--sync-bn needs CUDA devices (torch\'s SyncBatchNorm runs on GPUs only)')
            self.net = nn.SyncBatchNorm.convert_sync_batchnorm(self.net)
            self.backbone, self.head = self.net.backbone, self.net.head
        self.ddp = self.net
        if world.world_size > 1:
            ids = [self.device.index] if self.device.type == 'cuda' else None
            if self.sharded:  # DDP averages the backbone only: each process's centres are its own
                self.ddp = FaceTrainModel(nn.parallel.DistributedDataParallel(self.backbone, device_ids=ids),
                                          self.head, self.amp)
            else:
                self.ddp = nn.parallel.DistributedDataParallel(self.net, device_ids=ids)
        self.ema = ModelEmaV3(self.backbone, decay=args.model_ema_decay) if args.model_ema else None
        if args.compile:  # in place: the modules, their state_dict keys and the checkpoints stay the uncompiled ones
            self.ddp.compile(backend=args.compile_backend)
        self.optimizer = build_optimizer(self.net, args, fused=self.device.type == 'cuda')
        head_ids = {id(p) for p in self.head.parameters()}
        order = [p for g in self.optimizer.param_groups for p in g['params']]
        self.head_indices = {i for i, p in enumerate(order) if id(p) in head_ids}  # in the optimizer state dict
        self.head_memory = self._head_memory()
        _logger.info(self.head_memory['line'])
        self.sampler = ResumableSampler(self.dataset, num_replicas=world.world_size, rank=world.rank, seed=args.seed)
        self.steps_per_epoch = self.sampler.num_samples // args.batch_size
        if self.steps_per_epoch < 1:
            raise UserError(f'--data {args.data}: {len(self.dataset)} images make no full batch of '
                            f'{args.batch_size} x {world.world_size} processes (lower --batch-size)')
        self.total_steps = args.epochs * self.steps_per_epoch
        self.warmup_steps = max(0, min(self.total_steps - 1, round(args.warmup_epochs * self.steps_per_epoch)))
        self.lr_scheduler = build_lr_scheduler(self.optimizer, args, self.total_steps, self.warmup_steps)
        self.step = 0
        self._data_loader = None
        self.stats = StepStats(self.device)
        self.best: Optional[Dict[str, Any]] = None
        self.val_sets = self._load_val_sets() if world.main else []
        self.mean = torch.tensor(self.data_cfg['mean'], device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(self.data_cfg['std'], device=self.device).view(1, 3, 1, 1) * 255
        if args.resume:
            self._resume()

    # -- setup helpers

    def _build_head(self, embed_dim: int):
        """The margin head the flags ask for: replicated (MarginHead) or this process's shard (ShardedMarginHead)."""
        args, world = self.args, self.world
        if args.head is None:
            args.head = 'sharded' if world.world_size > 1 else 'replicated'
        if args.loss == 'adaface' and args.batch_size * world.world_size < 2:
            raise UserError('--loss adaface needs a global batch of at least 2 images (its margin scales with the '
                            'batch\'s feature-norm spread); raise --batch-size')
        common = dict(kind=args.loss, s=args.scale, m=args.margin, sample_rate=args.sample_rate, h=args.adaface_h,
                      t_alpha=args.adaface_t_alpha)
        if args.head == 'replicated':
            return MarginHead(embed_dim, self.num_classes, **common)
        if self.num_classes < world.world_size:
            raise UserError(f'--head sharded: {self.num_classes} identities cannot be split over {world.world_size} '
                            f'processes; use --head replicated')
        if world.world_size == 1:
            _logger.warning('--head sharded with one process: a single shard holding every class (the same loss '
                            'and gradients as --head replicated)')
        # each rank initialises its own slice (seed + rank): no process ever materialises all C centres
        state = torch.get_rng_state()
        torch.manual_seed(args.seed + 1000003 * world.rank)
        head = ShardedMarginHead(embed_dim, self.num_classes, world.world_size, world.rank, **common)
        torch.set_rng_state(state)
        return head

    def _build_distill_head(self, embed_dim: int, input_size) -> distill.DistillHead:
        """Distillation toward the teacher's cached embeddings (train/distill.py), plus the margin head unless
        --loss none."""
        args, world = self.args, self.world
        if args.head == 'sharded':
            raise UserError('--teacher with --head sharded: distillation keeps its margin head (if any) replicated; '
                            'use --head replicated')
        args.head = 'replicated'
        teacher = distill.build_teacher(args, input_size)
        teacher_dim = teacher[3]
        if teacher_dim != embed_dim and not args.distill_proj:
            raise UserError(f'--teacher {args.teacher} embeds {teacher_dim}-d, the student {embed_dim}-d: set '
                            f'--model-kwargs embed_dim={teacher_dim} (the distilled embedding is then the one '
                            f'deployed), or add --distill-proj to learn a projection')
        self.dataset.with_index = True
        cache = Path(args.teacher_cache) if args.teacher_cache else self.out / 'teacher.safetensors'
        if world.main:  # one process computes the targets; the others read its cache
            targets, flipped, self.teacher_info = distill.teacher_targets(self.dataset, args, cache, input_size,
                                                                          teacher=teacher)
        world.barrier()
        if not world.main:
            targets, flipped, self.teacher_info = distill.teacher_targets(self.dataset, args, cache, input_size,
                                                                          compute=False, teacher=teacher)
        hint = self._hint(teacher, input_size) if args.hint_weight else None
        del teacher  # without a hint, the targets are all a run needs of it
        margin = self._build_head(embed_dim) if args.loss != 'none' else None
        return distill.DistillHead(embed_dim, targets, flipped, margin, args.distill_weight,
                                   proj=targets.shape[1] != embed_dim, hint=hint)

    def _hint(self, teacher, input_size) -> Dict[str, Any]:
        """The feature hint's pieces: the teacher module, both feature maps' channels, the input conversion."""
        model, cfg = teacher[0], teacher[1]
        if self.world.world_size > 1:
            raise UserError('--hint-weight runs with one process (the student\'s feature map is taken outside '
                            'DistributedDataParallel\'s forward)')
        if not all(hasattr(m, 'forward_features') for m in (model, self.backbone)):
            raise UserError(f'--hint-weight: {self.args.teacher} or {self.args.model} has no forward_features')
        with torch.no_grad():
            t = model.forward_features(torch.zeros(1, 3, *input_size, device=self.args.device))
            s = self.backbone.eval().forward_features(torch.zeros(1, 3, *input_size))
        self.backbone.train()
        if t.shape[-2:] != s.shape[-2:]:
            raise UserError(f'--hint-weight: the teacher\'s last feature map is {t.shape[-2]}x{t.shape[-1]}, the '
                            f'student\'s {s.shape[-2]}x{s.shape[-1]}')
        if cfg.get('raw_pixels'):
            raise UserError('--hint-weight: the teacher takes raw pixels; give it as a model that normalizes as '
                            'its cfg says')
        smean, sstd = (torch.tensor(self.data_cfg[k], dtype=torch.float32).view(1, 3, 1, 1) for k in ('mean', 'std'))
        tmean, tstd = (torch.tensor(cfg[k], dtype=torch.float32).view(1, 3, 1, 1) for k in ('mean', 'std'))
        # x_s = (p - m_s) / s_s and x_t = (p - m_t) / s_t  =>  x_t = x_s * s_s / s_t + (m_s - m_t) / s_t
        return dict(weight=self.args.hint_weight, teacher=model, student_chs=s.shape[1], teacher_chs=t.shape[1],
                    scale=sstd / tstd, shift=(smean - tmean) / tstd)

    @property
    def sharded(self) -> bool:
        return isinstance(self.head, ShardedMarginHead)

    def _head_memory(self) -> Dict[str, Any]:
        """Bytes of the head's centres, their gradients and their optimizer state on this process."""
        weights = sum(p.numel() * p.element_size() for p in self.head.parameters())
        per_weight = 2 if self.args.opt == 'adamw' else (1 if self.args.momentum else 0)  # Adam: m and v
        mb = 1 / 2 ** 20
        centres = self.head.margin if isinstance(self.head, distill.DistillHead) else self.head
        local = centres.weight.shape[0] if centres is not None else 0
        where = (f'{self.world.world_size} shard{"s" if self.world.world_size > 1 else ""}, {local} on this process'
                 if self.sharded else f'replicated on {self.world.world_size} process'
                 f'{"es" if self.world.world_size > 1 else ""}')
        total = weights * (1 + per_weight)
        line = (f'head: {self.num_classes if centres is not None else "no"} classes'
                f'{" (distillation only)" if centres is None else ""}, {where}, {total * mb:.3g} MB per process '
                f'(centres '
                f'{weights * mb:.3g} MB + optimizer state {weights * per_weight * mb:.3g} MB; gradients add '
                f'{weights * mb:.3g} MB)')
        return dict(kind=self.args.head, classes_per_process=local, weights_mb=weights * mb,
                    optimizer_state_mb=weights * per_weight * mb, gradients_mb=weights * mb, per_process_mb=total * mb,
                    line=line)

    def _check_output(self) -> None:
        state = self.out / STATE_NAME
        if state.is_file() and not self.args.resume:
            raise UserError(f'--output {self.out} holds a run ({STATE_NAME}); pass --resume to continue it, or choose '
                            f'another --output')
        if self.args.resume and not state.is_file():
            raise UserError(f'--resume: no {STATE_NAME} in {self.out} (no checkpoint to continue from)')
        if self.world.main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.world.barrier()

    def _face_data_cfg(self) -> Dict[str, Any]:
        """Input size and normalization of the architecture's face cfg, not of the starting weights' tag.

        `mobileone_112_sN.apple_in1k` weights expect ImageNet mean/std, but what this run produces are face
        weights that export, eval and the Hub load with the architecture's cfg (mean = std = 0.5): the run trains
        with that, and fine-tuning absorbs the shift.
        """
        import timm
        from timm.models import get_pretrained_cfg
        cfg = get_pretrained_cfg(self.arch) if timm.is_model(self.arch) else None
        if cfg is None:
            return timm.data.resolve_model_data_config(self.backbone)
        return timm.data.resolve_data_config(pretrained_cfg=cfg.to_dict())

    def _amp(self):
        if not self.args.amp:
            return None, None
        if self.device.type == 'cuda':
            dtype = torch.float16 if self.args.amp_dtype == 'float16' else torch.bfloat16
            scaler = torch.amp.GradScaler('cuda') if dtype == torch.float16 else None
            return torch.autocast('cuda', dtype=dtype), scaler
        return torch.autocast(self.device.type, dtype=torch.bfloat16), None

    def _load_val_sets(self):
        from timm_mobileone.data import PackError, load_verification_set
        try:
            return [load_verification_set(p) for p in self.args.val]
        except PackError as e:
            raise UserError(f'--val {e}') from None

    # -- checkpoints

    def _run_config(self) -> Dict[str, Any]:
        cfg = {k: getattr(self.args, k) for k in RUN_DEFINING if k not in ('world_size', 'num_classes')}
        return dict(cfg, world_size=self.world.world_size, num_classes=self.num_classes)

    def save_checkpoint(self) -> None:
        rng = self.world.gather(dict(cpu=torch.get_rng_state(),
                                     cuda=torch.cuda.get_rng_state() if self.device.type == 'cuda' else None))
        opt_tensors, opt_rest = optimizer_tensors(self.optimizer)
        name = ckpt.checkpoint_name(self.step)
        shards: List[str] = []
        if self.sharded:  # every process writes its centres and their optimizer state
            head_keys = {k for k in opt_tensors if int(k.split('.')[1]) in self.head_indices}
            shards = [ckpt.shard_name(self.step, r) for r in range(self.world.world_size)]
            shard = dict(ckpt.prefixed('head', self.head.state_dict()), **{k: opt_tensors.pop(k) for k in head_keys})
            ckpt.save_safetensors(self.out / shards[self.world.rank], shard, metadata=dict(
                step=str(self.step), rank=str(self.world.rank), world_size=str(self.world.world_size),
                class_start=str(self.head.class_start), num_classes=str(self.head.num_local)))
            self.world.barrier()  # every shard is on disk before last.json names them
        if not self.world.main:
            return
        tensors = ckpt.prefixed('model', self.backbone.state_dict())
        if not self.sharded:
            tensors.update(ckpt.prefixed('head', self.head.state_dict()))
        if self.ema is not None:
            tensors.update(ckpt.prefixed('ema', self.ema.module.state_dict()))
        tensors.update(opt_tensors)
        for r, state in enumerate(rng):
            tensors[f'rng.cpu.{r}'] = state['cpu']
            if state['cuda'] is not None:
                tensors[f'rng.cuda.{r}'] = state['cuda']
        ckpt.save_safetensors(self.out / name, tensors, metadata=dict(step=str(self.step)))
        state = dict(
            step=self.step, epoch=self.step // self.steps_per_epoch, total_steps=self.total_steps,
            steps_per_epoch=self.steps_per_epoch, checkpoint=name, head_shards=shards, run=self._run_config(),
            lr_scheduler=self.lr_scheduler.state_dict(), optimizer=opt_rest,
            scaler=self.scaler.state_dict() if self.scaler is not None else None,
            best=self.best, command=self.args.command, data=self.args.data, time=time.time())
        ckpt.commit(self.out, state, keep=[name, *shards])  # last.json names a complete checkpoint
        _logger.info(f'step {self.step}: checkpoint {self.out / name}')

    def _resume(self) -> None:
        state, tensors = ckpt.read(self.out)
        ckpt.check_run_flags(self.out, state['run'], self._run_config())
        if self.sharded:
            tensors.update(ckpt.read_shard(self.out, state, self.world.rank))
        self.backbone.load_state_dict(ckpt.strip('model', tensors))
        self.head.load_state_dict(ckpt.strip('head', tensors))
        if self.ema is not None:
            self.ema.module.load_state_dict(ckpt.strip('ema', tensors))
        load_optimizer(self.optimizer, tensors, state['optimizer'])
        self.lr_scheduler.load_state_dict(state['lr_scheduler'])
        if self.scaler is not None and state.get('scaler'):
            self.scaler.load_state_dict(state['scaler'])
        torch.set_rng_state(tensors[f'rng.cpu.{self.world.rank}'])
        if self.device.type == 'cuda' and f'rng.cuda.{self.world.rank}' in tensors:
            torch.cuda.set_rng_state(tensors[f'rng.cuda.{self.world.rank}'])
        self.step = state['step']
        self.best = state.get('best')
        if self.world.main:
            ckpt.truncate_log(self.out, self.step)
        _logger.info(f'resumed {self.out} at step {self.step}/{self.total_steps}')

    def _log(self, row: Dict[str, Any]) -> None:
        if self.world.main:
            ckpt.append_log(self.out, row)

    # -- validation

    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.backbone

    def fused_copy(self) -> nn.Module:
        """The validated weights in a fresh model of the architecture, reparameterized, on the device.

        A fresh model rather than a deep copy: the copy must be exactly what `best.safetensors` loads into (the
        eval command in best.json), and SyncBatchNorm modules are not the BatchNorm2d timm's fusion expects.
        """
        import timm
        from timm.utils import reparameterize_model
        model = timm.create_model(self.arch, num_classes=0, **self.args.model_kwargs)
        model.load_state_dict(self.eval_model().state_dict())
        model = reparameterize_model(model.eval(), inplace=True)
        return model.to(self.device, memory_format=torch.channels_last)

    def validate(self) -> Optional[Dict[str, Any]]:
        """eval.verify's protocol (a library call) on a fused copy of the (EMA) weights; keeps the best. Main
        process only. best.json's `command` reproduces the figure from best.safetensors."""
        from eval.verify import verify, verify_command
        if not self.val_sets:
            return None
        model = self.eval_model()
        result = verify(self.fused_copy(), self.val_sets, batch_size=self.args.val_batch_size, device=self.device)
        result.update(verify_command(self.arch, str(self.out / BEST_WEIGHTS), self.args.val,
                                     self.args.val_batch_size), model=self.arch,
                      checkpoint=str(self.out / BEST_WEIGHTS))
        accs = {r['dataset']: r['accuracy'] for r in result['results']}
        is_best = self.best is None or result['mean_accuracy'] > self.best['mean_accuracy']
        self._log(dict(step=self.step, val=accs, mean_accuracy=result['mean_accuracy'], best=is_best))
        _logger.info(f'step {self.step}: validation {json.dumps(accs)} mean {result["mean_accuracy"]:.5f}'
                     f'{" (best)" if is_best else ""}')
        if is_best:
            ckpt.save_safetensors(self.out / BEST_WEIGHTS, model.state_dict(), metadata=dict(step=str(self.step)))
            ckpt.json_write(self.out / BEST_RESULT, dict(result, step=self.step))
            self.best = dict(step=self.step, mean_accuracy=result['mean_accuracy'])
        return result

    # -- training

    def _loader(self, epoch: int, start: int):
        """The run's one DataLoader, at this epoch's batches. Its workers persist across epochs: the sampler
        hands them (epoch, index) keys, so no epoch state lives in a worker's copy of the dataset."""
        self.sampler.set_epoch(epoch, start * self.args.batch_size)
        self.dataset.set_epoch(epoch)
        if self._data_loader is None:
            gen = torch.Generator().manual_seed(self.args.seed)  # worker seeds: not from the global RNG
            self._data_loader = torch.utils.data.DataLoader(
                self.dataset, batch_size=self.args.batch_size, sampler=self.sampler, num_workers=self.args.workers,
                collate_fn=collate, pin_memory=self.device.type == 'cuda', drop_last=True, generator=gen,
                persistent_workers=self.args.workers > 0, prefetch_factor=4 if self.args.workers > 0 else None)
        return self._data_loader

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> Dict[str, Any]:
        """One optimizer step with no host synchronisation (bar GradScaler's own, float16 only): the loss, its
        finiteness and the gradient norm accumulate on the device (`self.stats`), read at the log interval."""
        self.lr_scheduler.step_update(self.step)
        wd = weight_decay_at(self.step, self.total_steps, self.args.weight_decay, self.args.weight_decay_end)
        set_weight_decay(self.optimizer, wd)
        images = images.to(self.device, non_blocking=True).float()
        images = images.sub_(self.mean).div_(self.std).contiguous(memory_format=self.memory_format)
        labels = labels.to(self.device, non_blocking=True)
        loss = self.ddp(images, labels)
        self.optimizer.zero_grad(set_to_none=True)
        # the total gradient norm is logged every step (a trainability signal); max_norm=inf measures, clips nothing
        max_norm = self.args.clip_grad or float('inf')
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            agree_on_overflow(self.scaler, self.optimizer, self.world, self.sharded)
            grad_norm = clip_grad_norm(self.net, self.backbone, self.head, self.world, self.sharded, max_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            grad_norm = clip_grad_norm(self.net, self.backbone, self.head, self.world, self.sharded, max_norm)
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.backbone, step=self.step)
        self.stats.add(self.step + 1, loss, torch.as_tensor(grad_norm, device=loss.device))
        return dict(loss=loss, lr=self.optimizer.param_groups[0]['lr'], weight_decay=wd)

    def check_finite(self) -> None:
        """Raise (and record in the run's log) if a loss since the last read was not finite: at every log
        interval, and before a checkpoint or a validation could keep the diverged weights."""
        bad = self.stats.first_bad()
        if bad is None:
            return
        step, loss = bad  # step: 1-based, as log rows count
        # recorded in the run's log (train.compare_blocks counts diverged runs from it), then reported
        self._log(dict(step=step, diverged=True, loss=str(loss)))
        raise UserError(f'loss is {loss} at step {step - 1} (seen at step {self.step}); lower --lr or add '
                        f'--clip-grad (the last checkpoint, step {ckpt.last_step(self.out)}, is kept for --resume)')

    def fit(self) -> Dict[str, Any]:
        args, t_start = self.args, time.perf_counter()
        val_every = args.val_every or self.steps_per_epoch
        ckpt_every = args.checkpoint_every or self.steps_per_epoch
        first_loss = last_loss = None
        t_log, seen = time.perf_counter(), 0
        self.net.train()
        while self.step < self.total_steps:
            epoch, start = divmod(self.step, self.steps_per_epoch)
            for images, labels, errors in self._loader(epoch, start):
                if errors:
                    raise UserError(errors[0])
                stats = self.train_step(images, labels)
                self.step += 1
                seen += len(images) * self.world.world_size
                if first_loss is None:
                    first_loss = stats['loss'].item()
                if self.step % args.log_interval == 0 or self.step == self.total_steps:
                    self.check_finite()
                    read = self.stats.read()
                    loss = self.world.mean(read['last_loss'])
                    last_loss = loss
                    elapsed = time.perf_counter() - t_log
                    row = dict(step=self.step, epoch=self.step / self.steps_per_epoch, loss=loss, lr=stats['lr'],
                               weight_decay=stats['weight_decay'], grad_norm=read['grad_norm'],
                               mean_loss=self.world.mean(read['loss']), images_per_second=seen / max(elapsed, 1e-9))
                    self._log(row)
                    _logger.info(f"step {self.step}/{self.total_steps} epoch {row['epoch']:.2f} loss {loss:.4f} "
                                 f"lr {stats['lr']:.3g} wd {stats['weight_decay']:.3g} "
                                 f"{row['images_per_second']:.1f} img/s")
                    t_log, seen = time.perf_counter(), 0
                if self.step % val_every == 0 or self.step == self.total_steps:
                    self.check_finite()
                    if self.world.main:
                        self.validate()
                    self.world.barrier()
                    t_log = time.perf_counter()
                if self.step % ckpt_every == 0 or self.step == self.total_steps:
                    self.check_finite()
                    self.save_checkpoint()
                    self.world.barrier()
                if self.step >= self.total_steps:
                    break
        summary = dict(
            model=args.model, data=args.data, num_images=len(self.dataset), num_classes=self.num_classes,
            world_size=self.world.world_size, head={k: v for k, v in self.head_memory.items() if k != 'line'},
            steps=self.step, total_steps=self.total_steps, epochs=args.epochs,
            first_loss=first_loss, last_loss=last_loss, best=self.best, output=str(self.out),
            peak_memory_mb=self._peak_memory_mb(), teacher=self.teacher_info, train_form=args.train_form,
            compile=args.compile,
            seconds=round(time.perf_counter() - t_start, 3), command=args.command)
        if self.world.main:
            summary['export'] = self.export() if args.export else None
        return summary

    def _peak_memory_mb(self) -> float:
        """Peak memory of this process: allocated on the GPU (torch's allocator), or the peak RSS on CPU."""
        if self.device.type == 'cuda':
            return round(torch.cuda.max_memory_allocated(self.device) / 2 ** 20, 1)
        import resource
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)

    def export(self) -> Dict[str, Any]:
        """The best weights (or the final ones without --val) through timm_mobileone.hub export into OUTPUT/hub."""
        from timm_mobileone.hub import export
        best = self.out / BEST_WEIGHTS
        results: Sequence[str] = [str(self.out / BEST_RESULT)] if (self.out / BEST_RESULT).is_file() else []
        if not results:
            ckpt.save_safetensors(best, self.eval_model().state_dict(), metadata=dict(step=str(self.step)))
        args = self.args
        loss = 'distill' if args.teacher and args.loss == 'none' else args.loss
        tag = args.tag or _default_tag(args.data, loss)
        how = (f'{args.loss} + ' if args.teacher and args.loss != 'none' else '') + (
            f'embedding distillation from the teacher `{args.teacher}` (weights: '
            f'`{args.teacher_checkpoint or args.teacher_onnx or "pretrained"}`; the teacher\'s licence terms carry '
            f'over to these weights)' if args.teacher else args.loss)
        train_data = (f'`{args.data}`: {len(self.dataset)} images of {self.num_classes} identities; {how}, '
                      f'{args.epochs} epoch{"s" if args.epochs != 1 else ""}, trained with `{args.command}`')
        try:
            return export(self.arch, str(best), tag, str(self.out / 'hub'), results=results,
                          train_data=train_data, license=args.license)
        except UserError as e:
            raise UserError(f'export: {e}') from None


@cli(log_level=logging.INFO, log_format='%(asctime)s %(name)s: %(message)s')
def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run a training job; returns (and prints) the JSON summary."""
    args = parse_args(argv)
    world = None
    try:
        world = World(args.device)
        if not world.main:
            logging.getLogger().setLevel(logging.WARNING)
        summary = Trainer(args, world).fit()
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f'interrupted; resume with --resume (the last checkpoint in {args.output})') from None
    finally:
        if world is not None:
            world.close()
    if world.main:
        print(json.dumps(summary))
    return summary


if __name__ == '__main__':
    main()
