"""What a `train.face` run is made of, built from its flags: the model (train form, compile), the dataset, the
margin or distillation head, AMP, DistributedDataParallel, EMA, the optimizer and its schedules, the validation
packs. Every refusal of a flag combination or an input happens here, before a step runs and before the run folder
is made (`TrainSetup._make_output`, last): a refused run leaves no folder behind."""
import logging
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from timm_mobileone.checkpoints import create_model_checked
from timm_mobileone.errors import UserError

from . import augment, distill
from .checkpoint import STATE_NAME
from .data import Preloaded, ResumableSampler, open_dataset
from .distributed import World
from .margin import MarginHead
from .optim import build_lr_scheduler, build_optimizer
from .partial_fc import ShardedMarginHead
from .step import FaceTrainModel, StepStats, check_compile, set_train_form

__all__ = ['TrainSetup']

_logger = logging.getLogger('train')


class TrainSetup:
    """One training process's parts, built from the flags (`train.loop.Trainer` runs them)."""

    def __init__(self, args, world: World) -> None:
        import timm
        from timm.utils import ModelEmaV3
        self.args = args
        self.world = world
        self.device = world.device
        self.out = Path(args.output)
        torch.manual_seed(args.seed)  # the same initial weights on every process (DDP broadcasts rank 0's anyway)
        try:
            self.backbone = create_model_checked(args.model, args.pretrained, args.initial_checkpoint,
                                                 num_classes=0, drop_path_rate=args.drop_path or None,
                                                 **args.model_kwargs)
        except TypeError as e:  # an argument the model's constructor does not take
            from timm_mobileone.errors import first_line
            raise UserError(f'--model {args.model}: {first_line(e)} (check --model-kwargs and --drop-path)') from None
        self.arch = self.backbone.pretrained_cfg.get('architecture') or args.model
        set_train_form(self.backbone, args.model, args.train_form)
        if args.train_form == 'merged' and args.sync_bn and world.world_size > 1:
            raise UserError('--train-form merged with --sync-bn: the merged form computes each process\'s own '
                            'batch statistics; use --train-form branches to synchronize them')
        if args.compile:
            check_compile(self.device, args.compile_backend)
        if args.channels_last and self.device.type == 'cpu':
            # measured here: the stem's stride-2 1x1 scale conv (3 input channels) crashes or corrupts memory in
            # backward under channels_last on CPU; oneDNN issue #6035 (nhwc 1x1 backward_weights, IC < ic_block)
            raise UserError('--channels-last is refused on CPU: oneDNN\'s channels_last backward of the stem\'s '
                            'stride-2 1x1 conv crashes or gives wrong gradients (uxlfoundation/oneDNN#6035); '
                            'use it on CUDA')
        if args.sync_bn and world.world_size > 1 and self.device.type != 'cuda':
            raise UserError('--sync-bn needs CUDA devices (torch\'s SyncBatchNorm runs on GPUs only)')
        if args.loss == 'adaface' and args.batch_size * world.world_size < 2:
            raise UserError('--loss adaface needs a global batch of at least 2 images (its margin scales with the '
                            'batch\'s feature-norm spread); raise --batch-size')
        # every refusal below happens before the run folder exists (`_make_output`, at the end): a refused run
        # leaves nothing behind
        self._check_output()
        self.data_cfg = self._face_data_cfg()
        if args.export and self.arch not in timm.list_models('mobileone_112_*'):
            raise UserError(f'--model {args.model}: the hub export handles mobileone_112 models only; pass '
                            f'--no-export to train {self.arch}')
        if args.export and set(args.model_kwargs) - {'embed_dim'}:
            raise UserError('--model-kwargs: the hub export writes the registered architectures with their '
                            'embedding size only (embed_dim; it reads that from the weights); pass --no-export')
        input_size = tuple(self.data_cfg['input_size'][-2:])
        self.dataset = open_dataset(args.data, input_size, flip=True, seed=args.seed, num_classes=args.num_classes,
                                    extra=getattr(args, 'extra_data', ()))
        for index in {0, self.dataset.extra_start or 0}:  # a wrong crop size or format shows on the first image
            error = self.dataset.decoded(index, flip=False)[2]
            if error:
                raise UserError(error)
        self.sampler = ResumableSampler(self.dataset, num_replicas=world.world_size, rank=world.rank, seed=args.seed)
        self.steps_per_epoch = self.sampler.num_samples // args.batch_size
        if self.steps_per_epoch < 1:
            raise UserError(f'--data {args.data}: {len(self.dataset)} images make no full batch of '
                            f'{args.batch_size} x {world.world_size} processes (lower --batch-size)')
        self.val_sets = self._load_val_sets() if world.main else []
        names = [v.name for v in self.val_sets]
        if args.best_on and world.main and args.best_on not in names:
            raise UserError(f'--best-on {args.best_on}: not one of the --val sets ({", ".join(names) or "none"})')
        cfg = augment.config_from_args(args)
        self.augment = augment.DeviceAugment(cfg, args.seed, world.rank) if cfg.active else None
        self.teacher: Optional[distill.OnlineTeacher] = None
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
        memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        self.memory_format = memory_format
        self.amp, self.scaler = self._amp()
        self.net = FaceTrainModel(self.backbone, self.head, self.amp).to(self.device, memory_format=memory_format)
        if isinstance(self.head, distill.DistillHead):
            self.head.targets_to(self.device)
        if args.sync_bn and world.world_size > 1:
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
        self.ema = ModelEmaV3(self.backbone, decay=args.model_ema_decay,
                              use_warmup=args.model_ema_warmup) if args.model_ema else None
        if args.compile:  # in place: the modules, their state_dict keys and the checkpoints stay the uncompiled ones
            self.ddp.compile(backend=args.compile_backend)
        self.optimizer = build_optimizer(self.net, args, fused=self.device.type == 'cuda')
        head_ids = {id(p) for p in self.head.parameters()}
        order = [p for g in self.optimizer.param_groups for p in g['params']]
        self.head_indices = {i for i, p in enumerate(order) if id(p) in head_ids}  # in the optimizer state dict
        self.head_memory = self._head_memory()
        _logger.info(self.head_memory['line'])
        self.preloaded = None
        if args.preload:
            _logger.info(f'--preload: decoding {len(self.dataset)} images onto {self.device}')
            self.preloaded = Preloaded(self.dataset, self.device, args.workers)
        self.total_steps = args.epochs * self.steps_per_epoch
        self.warmup_steps = max(0, min(self.total_steps - 1, round(args.warmup_epochs * self.steps_per_epoch)))
        self.lr_scheduler = build_lr_scheduler(self.optimizer, args, self.total_steps, self.warmup_steps)
        self.step = 0
        self._data_loader = None
        self.stats = StepStats(self.device)
        self.best: Optional[Dict[str, Any]] = None
        self.mean = torch.tensor(self.data_cfg['mean'], device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(self.data_cfg['std'], device=self.device).view(1, 3, 1, 1) * 255
        self._make_output()
        if args.resume:
            self._resume()

    def _build_head(self, embed_dim: int):
        """The margin head the flags ask for: replicated (MarginHead) or this process's shard (ShardedMarginHead)."""
        args, world = self.args, self.world
        if args.head is None:
            args.head = 'sharded' if world.world_size > 1 else 'replicated'
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
        hint = self._hint(teacher, input_size, online=args.teacher_online) if args.hint_weight else None
        if args.teacher_online:  # the teacher embeds each step's batch as the student sees it: nothing cached
            targets = flipped = None
            self.teacher = distill.OnlineTeacher(teacher[0], teacher[1], args, self.device,
                                                 features=bool(args.hint_weight))
            self.teacher_info = dict(mode='online', teacher=distill.teacher_fingerprint(teacher[2], teacher[1]),
                                     compiled=bool(args.compile), bfloat16=self.teacher.amp)
        else:
            cache = Path(args.teacher_cache) if args.teacher_cache else self.out / 'teacher.safetensors'
            if world.main:  # one process computes the targets; the others read its cache
                targets, flipped, self.teacher_info = distill.teacher_targets(self.dataset, args, cache, input_size,
                                                                              teacher=teacher)
            world.barrier()
            if not world.main:
                targets, flipped, self.teacher_info = distill.teacher_targets(self.dataset, args, cache, input_size,
                                                                              compute=False, teacher=teacher)
            self.teacher_info = dict(self.teacher_info, mode='cached')
        del teacher  # without a hint or an online teacher, the targets are all a run needs of it
        margin = self._build_head(embed_dim) if args.loss != 'none' else None
        return distill.DistillHead(embed_dim, targets, flipped, margin, args.distill_weight,
                                   proj=teacher_dim != embed_dim, hint=hint, teacher_dim=teacher_dim,
                                   relational_weight=args.relational_weight)

    def _hint(self, teacher, input_size, online: bool) -> Dict[str, Any]:
        """The feature hint's pieces: the teacher module (None when the online teacher's forward serves the hint
        too), both feature maps' channels, the input conversion."""
        model, cfg = teacher[0], teacher[1]
        if self.world.world_size > 1:
            raise UserError('--hint-weight runs with one process (the student\'s feature map is taken outside '
                            'DistributedDataParallel\'s forward)')
        if not all(hasattr(m, f) for m in (model, self.backbone) for f in ('forward_features', 'forward_head')):
            raise UserError(f'--hint-weight: {self.args.teacher} or {self.args.model} has no forward_features and '
                            f'forward_head')
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
        return dict(weight=self.args.hint_weight, teacher=None if online else model, student_chs=s.shape[1],
                    teacher_chs=t.shape[1], scale=sstd / tstd, shift=(smean - tmean) / tstd)

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
        """Refuse an --output that cannot take this run (it makes nothing: `_make_output` does, last)."""
        state = self.out / STATE_NAME
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f'--output {self.out}: not a folder')
        if state.is_file() and not self.args.resume:
            raise UserError(f'--output {self.out} holds a run ({STATE_NAME}); pass --resume to continue it, or choose '
                            f'another --output')
        if self.args.resume and not state.is_file():
            raise UserError(f'--resume: no {STATE_NAME} in {self.out} (no checkpoint to continue from)')

    def _make_output(self) -> None:
        """The run folder, once every part of the run is built and every refusal has had its chance."""
        self.created_output = self.world.main and not self.out.exists()
        if self.world.main:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(f'--output {self.out}: cannot be created ({e.strerror or e})') from None
        self.world.barrier()

    def discard_empty_output(self) -> bool:
        """Remove the run folder if this run made it and a failure left nothing in it (e.g. a bad image in the first
        batches, before any log row or checkpoint); returns whether it did."""
        if not getattr(self, 'created_output', False):
            return False
        try:
            self.out.rmdir()  # only an empty folder
        except OSError:
            return False
        return True

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
        from timm_mobileone.verification_data import PackError, load_verification_set
        try:
            return [load_verification_set(p) for p in self.args.val]
        except PackError as e:
            raise UserError(f'--val {e}') from None
