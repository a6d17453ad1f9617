"""`build_run`: a `train.face` run (`train.run.Run`) built once from its flags: the model (train form, compile), the
dataset, the margin or distillation head, AMP, DistributedDataParallel, EMA, the optimizer and its schedules, the
validation packs. Every refusal of a flag combination or an input happens here, before a step runs and before the
run folder is made (`make_output`, which the Trainer calls once the run is built): a refused run leaves no folder
behind. No flag is rewritten: what the flags leave open (`--head`'s default) is resolved into the built run."""
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

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
from .run import Data, Inputs, Model, Optim, Run
from .step import FaceTrainModel, check_compile, set_train_form

__all__ = ['build_run', 'make_output', 'discard_empty_output']

_logger = logging.getLogger('train')


def build_run(args, world: World) -> Run:
    """Every part of one training process's run, in the order that refuses before it spends (the cheap checks,
    then the data, then the teacher), and that draws the initial weights from the seed in a fixed order."""
    torch.manual_seed(args.seed)  # the same initial weights on every process (DDP broadcasts rank 0's anyway)
    backbone = _backbone(args)
    arch = backbone.pretrained_cfg.get('architecture') or args.model
    set_train_form(backbone, args.model, args.train_form)
    _check_device_flags(args, world)
    out = check_output(args)
    data_cfg = _face_data_cfg(arch, backbone)
    _check_export(args, arch)
    data = _data(args, world, data_cfg)
    aug_cfg = augment.config_from_args(args)
    augmenter = augment.DeviceAugment(aug_cfg, args.seed, world.rank) if aug_cfg.active else None
    if data.num_classes < 2 and args.loss != 'none':
        raise UserError(f'--data {args.data}: {data.num_classes} identity; a margin loss needs at least 2')
    with torch.no_grad():  # in eval mode: the probe must not touch the BN statistics
        embed_dim = backbone.eval()(torch.zeros(1, 3, *data.input_size)).shape[-1]
    backbone.train()
    if args.teacher:  # distillation keeps its margin head (if any) replicated
        head, online_teacher, teacher_info = _distill_head(args, world, backbone, data, embed_dim, out)
        head_kind = 'replicated'
    else:
        head_kind = args.head or ('sharded' if world.world_size > 1 else 'replicated')
        head = _margin_head(args, world, head_kind, embed_dim, data.num_classes)
        online_teacher = teacher_info = None
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    amp, scaler = _amp(args, world.device)
    model = _model(args, world, backbone, head, head_kind, amp, memory_format)
    optim = _optim(args, world, model, scaler, data.steps_per_epoch)
    head_memory = _head_memory(args, world, model, data.num_classes)
    _logger.info(head_memory['line'])
    if args.preload:
        _logger.info(f'--preload: decoding {len(data.dataset)} images onto {world.device}')
        data = replace(data, preloaded=Preloaded(data.dataset, world.device, args.workers))
    mean, std = (torch.tensor(data_cfg[k], device=world.device).view(1, 3, 1, 1) * 255 for k in ('mean', 'std'))
    inputs = Inputs(world.device, augmenter, online_teacher, mean, std, memory_format)
    return Run(args=args, world=world, out=out, arch=arch, data=data, inputs=inputs, model=model,
               optim=optim, teacher_info=teacher_info, head_memory=head_memory)


# ----------------------------------------------------------------------------------------------------------------
# the parts, in build_run's order


def _backbone(args) -> nn.Module:
    try:
        return create_model_checked(args.model, args.pretrained, args.initial_checkpoint, num_classes=0,
                                    drop_path_rate=args.drop_path or None, **args.model_kwargs)
    except TypeError as e:  # an argument the model's constructor does not take
        from timm_mobileone.errors import first_line
        raise UserError(f'--model {args.model}: {first_line(e)} (check --model-kwargs and --drop-path)') from None


def _check_device_flags(args, world: World) -> None:
    """The flags the device or the number of processes refuses."""
    device = world.device
    if args.train_form == 'merged' and args.sync_bn and world.world_size > 1:
        raise UserError('--train-form merged with --sync-bn: the merged form computes each process\'s own '
                        'batch statistics; use --train-form branches to synchronize them')
    if args.compile:
        check_compile(device, args.compile_backend)
    if args.channels_last and device.type == 'cpu':
        # measured here: the stem's stride-2 1x1 scale conv (3 input channels) crashes or corrupts memory in
        # backward under channels_last on CPU; oneDNN issue #6035 (nhwc 1x1 backward_weights, IC < ic_block)
        raise UserError('--channels-last is refused on CPU: oneDNN\'s channels_last backward of the stem\'s '
                        'stride-2 1x1 conv crashes or gives wrong gradients (uxlfoundation/oneDNN#6035); '
                        'use it on CUDA')
    if args.sync_bn and world.world_size > 1 and device.type != 'cuda':
        raise UserError('--sync-bn needs CUDA devices (torch\'s SyncBatchNorm runs on GPUs only)')
    if args.loss == 'adaface' and args.batch_size * world.world_size < 2:
        raise UserError('--loss adaface needs a global batch of at least 2 images (its margin scales with the '
                        'batch\'s feature-norm spread); raise --batch-size')


def check_output(args) -> Path:
    """Refuse an --output that cannot take this run (it makes nothing: `make_output` does, last)."""
    out = Path(args.output)
    state = out / STATE_NAME
    if out.exists() and not out.is_dir():
        raise UserError(f'--output {out}: not a folder')
    if state.is_file() and not args.resume:
        raise UserError(f'--output {out} holds a run ({STATE_NAME}); pass --resume to continue it, or choose '
                        f'another --output')
    if args.resume and not state.is_file():
        raise UserError(f'--resume: no {STATE_NAME} in {out} (no checkpoint to continue from)')
    return out


def _face_data_cfg(arch: str, backbone: nn.Module) -> Dict[str, Any]:
    """Input size and normalization of the architecture's face cfg, not of the starting weights' tag.

    `mobileone_112_sN.apple_in1k` weights expect ImageNet mean/std, but what this run produces are face
    weights that export, eval and the Hub load with the architecture's cfg (mean = std = 0.5): the run trains
    with that, and fine-tuning absorbs the shift.
    """
    import timm
    from timm.models import get_pretrained_cfg
    cfg = get_pretrained_cfg(arch) if timm.is_model(arch) else None
    if cfg is None:
        return timm.data.resolve_model_data_config(backbone)
    return timm.data.resolve_data_config(pretrained_cfg=cfg.to_dict())


def _check_export(args, arch: str) -> None:
    import timm
    if args.export and arch not in timm.list_models('mobileone_112_*'):
        raise UserError(f'--model {args.model}: the hub export handles mobileone_112 models only; pass '
                        f'--no-export to train {arch}')
    if args.export and set(args.model_kwargs) - {'embed_dim'}:
        raise UserError('--model-kwargs: the hub export writes the registered architectures with their '
                        'embedding size only (embed_dim; it reads that from the weights); pass --no-export')


def _data(args, world: World, data_cfg: Dict[str, Any]) -> Data:
    """The dataset (its first images decoded: a wrong crop size or format refuses here), this process's sampler,
    the validation packs."""
    input_size = tuple(data_cfg['input_size'][-2:])
    dataset = open_dataset(args.data, input_size, flip=True, seed=args.seed, num_classes=args.num_classes,
                           extra=getattr(args, 'extra_data', ()))
    for index in {0, dataset.extra_start or 0}:  # a wrong crop size or format shows on the first image
        error = dataset.decoded(index, flip=False)[2]
        if error:
            raise UserError(error)
    sampler = ResumableSampler(dataset, num_replicas=world.world_size, rank=world.rank, seed=args.seed)
    steps_per_epoch = sampler.num_samples // args.batch_size
    if steps_per_epoch < 1:
        raise UserError(f'--data {args.data}: {len(dataset)} images make no full batch of '
                        f'{args.batch_size} x {world.world_size} processes (lower --batch-size)')
    val_sets = _load_val_sets(args) if world.main else []
    names = [v.name for v in val_sets]
    if args.best_on and world.main and args.best_on not in names:
        raise UserError(f'--best-on {args.best_on}: not one of the --val sets ({", ".join(names) or "none"})')
    return Data(dataset=dataset, sampler=sampler, steps_per_epoch=steps_per_epoch, val_sets=val_sets,
                data_cfg=data_cfg)


def _load_val_sets(args):
    from timm_mobileone.verification_data import PackError, load_verification_set
    try:
        return [load_verification_set(p) for p in args.val]
    except PackError as e:
        raise UserError(f'--val {e}') from None


def _margin_head(args, world: World, kind: str, embed_dim: int, num_classes: int) -> nn.Module:
    """The margin head `kind` names: replicated (MarginHead) or this process's shard (ShardedMarginHead)."""
    common = dict(kind=args.loss, s=args.scale, m=args.margin, sample_rate=args.sample_rate, h=args.adaface_h,
                  t_alpha=args.adaface_t_alpha)
    if kind == 'replicated':
        return MarginHead(embed_dim, num_classes, **common)
    if num_classes < world.world_size:
        raise UserError(f'--head sharded: {num_classes} identities cannot be split over {world.world_size} '
                        f'processes; use --head replicated')
    if world.world_size == 1:
        _logger.warning('--head sharded with one process: a single shard holding every class (the same loss '
                        'and gradients as --head replicated)')
    # each rank initialises its own slice (seed + rank): no process ever materialises all C centres
    state = torch.get_rng_state()
    torch.manual_seed(args.seed + 1000003 * world.rank)
    head = ShardedMarginHead(embed_dim, num_classes, world.world_size, world.rank, **common)
    torch.set_rng_state(state)
    return head


def _distill_head(args, world: World, backbone: nn.Module, data: Data, embed_dim: int,
                  out: Path) -> Tuple[distill.DistillHead, Optional[distill.OnlineTeacher], Dict[str, Any]]:
    """Distillation toward the teacher's embeddings (train/distill.py), cached or online, plus the margin head
    unless --loss none: (the head, the online teacher or None, the summary's `teacher`)."""
    if args.head == 'sharded':
        raise UserError('--teacher with --head sharded: distillation keeps its margin head (if any) replicated; '
                        'use --head replicated')
    input_size = data.input_size
    teacher = distill.build_teacher(args, input_size)
    teacher_dim = teacher.embed_dim
    if teacher_dim != embed_dim and not args.distill_proj:
        raise UserError(f'--teacher {args.teacher} embeds {teacher_dim}-d, the student {embed_dim}-d: set '
                        f'--model-kwargs embed_dim={teacher_dim} (the distilled embedding is then the one '
                        f'deployed), or add --distill-proj to learn a projection')
    data.dataset.with_index = True
    hint = _hint(args, world, teacher, backbone, data, online=args.teacher_online) if args.hint_weight else None
    online = None
    if args.teacher_online:  # the teacher embeds each step's batch as the student sees it: nothing cached
        targets = flipped = None
        online = distill.OnlineTeacher(teacher.model, teacher.cfg, args, world.device,
                                       features=bool(args.hint_weight))
        info = dict(mode='online', teacher=teacher.fingerprint(), compiled=bool(args.compile), bfloat16=online.amp)
    else:
        cache = Path(args.teacher_cache) if args.teacher_cache else out / 'teacher.safetensors'
        if world.main:  # one process computes the targets; the others read its cache
            targets, flipped, info = distill.teacher_targets(data.dataset, args, cache, input_size, teacher=teacher)
        world.barrier()
        if not world.main:
            targets, flipped, info = distill.teacher_targets(data.dataset, args, cache, input_size, compute=False,
                                                             teacher=teacher)
        info = dict(info, mode='cached')
    del teacher  # without a hint or an online teacher, the targets are all a run needs of it
    margin = _margin_head(args, world, 'replicated', embed_dim, data.num_classes) if args.loss != 'none' else None
    head = distill.DistillHead(embed_dim, targets, flipped, margin, args.distill_weight,
                               proj=teacher_dim != embed_dim, hint=hint, teacher_dim=teacher_dim,
                               relational_weight=args.relational_weight)
    return head, online, info


def _hint(args, world: World, teacher: distill.Teacher, backbone: nn.Module, data: Data,
          online: bool) -> Dict[str, Any]:
    """The feature hint's pieces: the teacher module (None when the online teacher's forward serves the hint
    too), both feature maps' channels, the input conversion."""
    model, cfg, input_size = teacher.model, teacher.cfg, data.input_size
    if world.world_size > 1:
        raise UserError('--hint-weight runs with one process (the student\'s feature map is taken outside '
                        'DistributedDataParallel\'s forward)')
    if not all(hasattr(m, f) for m in (model, backbone) for f in ('forward_features', 'forward_head')):
        raise UserError(f'--hint-weight: {args.teacher} or {args.model} has no forward_features and '
                        f'forward_head')
    with torch.no_grad():
        t = model.forward_features(torch.zeros(1, 3, *input_size, device=args.device))
        s = backbone.eval().forward_features(torch.zeros(1, 3, *input_size))
    backbone.train()
    if t.shape[-2:] != s.shape[-2:]:
        raise UserError(f'--hint-weight: the teacher\'s last feature map is {t.shape[-2]}x{t.shape[-1]}, the '
                        f'student\'s {s.shape[-2]}x{s.shape[-1]}')
    if cfg.get('raw_pixels'):
        raise UserError('--hint-weight: the teacher takes raw pixels; give it as a model that normalizes as '
                        'its cfg says')
    smean, sstd = (torch.tensor(data.data_cfg[k], dtype=torch.float32).view(1, 3, 1, 1) for k in ('mean', 'std'))
    tmean, tstd = (torch.tensor(cfg[k], dtype=torch.float32).view(1, 3, 1, 1) for k in ('mean', 'std'))
    # x_s = (p - m_s) / s_s and x_t = (p - m_t) / s_t  =>  x_t = x_s * s_s / s_t + (m_s - m_t) / s_t
    return dict(weight=args.hint_weight, teacher=None if online else model, student_chs=s.shape[1],
                teacher_chs=t.shape[1], scale=sstd / tstd, shift=(smean - tmean) / tstd)


def _amp(args, device: torch.device):
    """(the autocast context or None, the GradScaler or None): float16 with a scaler or bfloat16 on CUDA,
    bfloat16 on CPU."""
    if not args.amp:
        return None, None
    if device.type == 'cuda':
        dtype = torch.float16 if args.amp_dtype == 'float16' else torch.bfloat16
        scaler = torch.amp.GradScaler('cuda') if dtype == torch.float16 else None
        return torch.autocast('cuda', dtype=dtype), scaler
    return torch.autocast(device.type, dtype=torch.bfloat16), None


def _model(args, world: World, backbone: nn.Module, head: nn.Module, head_kind: str, amp,
           memory_format: torch.memory_format) -> Model:
    """Backbone + head on the device as a step runs them: grad checkpointing, SyncBatchNorm, DDP, EMA, compile."""
    from timm.utils import ModelEmaV3
    device = world.device
    if args.grad_checkpointing:
        backbone.set_grad_checkpointing(True)
    net = FaceTrainModel(backbone, head, amp).to(device, memory_format=memory_format)
    if isinstance(head, distill.DistillHead):
        head.targets_to(device)
    if args.sync_bn and world.world_size > 1:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        backbone, head = net.backbone, net.head
    ddp = net
    if world.world_size > 1:
        ids = [device.index] if device.type == 'cuda' else None
        if head_kind == 'sharded':  # DDP averages the backbone only: each process's centres are its own
            ddp = FaceTrainModel(nn.parallel.DistributedDataParallel(backbone, device_ids=ids), head, amp)
        else:
            ddp = nn.parallel.DistributedDataParallel(net, device_ids=ids)
    ema = ModelEmaV3(backbone, decay=args.model_ema_decay,
                     use_warmup=args.model_ema_warmup) if args.model_ema else None
    if args.compile:  # in place: the modules, their state_dict keys and the checkpoints stay the uncompiled ones
        ddp.compile(backend=args.compile_backend)
    return Model(backbone=backbone, head=head, head_kind=head_kind, net=net, ddp=ddp, ema=ema)


def _optim(args, world: World, model: Model, scaler, steps_per_epoch: int) -> Optim:
    """The optimizer over net's parameters, the lr schedule (warmup, then cosine or poly) and the weight decay's."""
    optimizer = build_optimizer(model.net, args, fused=world.device.type == 'cuda')
    head_ids = {id(p) for p in model.head.parameters()}
    order = [p for g in optimizer.param_groups for p in g['params']]
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = max(0, min(total_steps - 1, round(args.warmup_epochs * steps_per_epoch)))
    return Optim(optimizer=optimizer, lr_scheduler=build_lr_scheduler(optimizer, args, total_steps, warmup_steps),
                 scaler=scaler, total_steps=total_steps, warmup_steps=warmup_steps,
                 weight_decay=(args.weight_decay, args.weight_decay_end), max_norm=args.clip_grad or float('inf'),
                 head_indices=frozenset(i for i, p in enumerate(order) if id(p) in head_ids))


def _head_memory(args, world: World, model: Model, num_classes: int) -> Dict[str, Any]:
    """Bytes of the head's centres, their gradients and their optimizer state on this process."""
    head = model.head
    weights = sum(p.numel() * p.element_size() for p in head.parameters())
    per_weight = 2 if args.opt == 'adamw' else (1 if args.momentum else 0)  # Adam: m and v
    mb = 1 / 2 ** 20
    centres = head.margin if isinstance(head, distill.DistillHead) else head
    local = centres.weight.shape[0] if centres is not None else 0
    where = (f'{world.world_size} shard{"s" if world.world_size > 1 else ""}, {local} on this process'
             if model.sharded else f'replicated on {world.world_size} process'
             f'{"es" if world.world_size > 1 else ""}')
    total = weights * (1 + per_weight)
    line = (f'head: {num_classes if centres is not None else "no"} classes'
            f'{" (distillation only)" if centres is None else ""}, {where}, {total * mb:.3g} MB per process '
            f'(centres '
            f'{weights * mb:.3g} MB + optimizer state {weights * per_weight * mb:.3g} MB; gradients add '
            f'{weights * mb:.3g} MB)')
    return dict(kind=model.head_kind, classes_per_process=local, weights_mb=weights * mb,
                optimizer_state_mb=weights * per_weight * mb, gradients_mb=weights * mb, per_process_mb=total * mb,
                line=line)


# ----------------------------------------------------------------------------------------------------------------
# the run folder


def make_output(out: Path, world: World) -> bool:
    """The run folder, once every part of the run is built and every refusal has had its chance; returns whether
    this process made it (`discard_empty_output` removes only such a folder)."""
    created = world.main and not out.exists()
    if world.main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f'--output {out}: cannot be created ({e.strerror or e})') from None
    world.barrier()
    return created


def discard_empty_output(out: Path, created: bool) -> bool:
    """Remove the run folder if this run made it and a failure left nothing in it (e.g. a bad image in the first
    batches, before any log row or checkpoint); returns whether it did."""
    if not created:
        return False
    try:
        out.rmdir()  # only an empty folder
    except OSError:
        return False
    return True
