"""Embedding distillation for `train.face --teacher`: the student learns a trained face model's embedding.

    python -m train.face --model mobileone_112_s0 --model-kwargs embed_dim=128 --data faces/ --loss none \
        --teacher mobilefacenet --teacher-checkpoint model-0000.params --val val/ --output runs/s0-distill

Why inside `train.face` and not a second trainer: a distillation run needs everything a margin run has (exact resume,
safetensors checkpoints, best-on-validation, the hub export, one JSON summary, one-line errors); the loss is the
only difference, so it is one more head (`DistillHead`) in the same Trainer.

Loss: `1 - cos(student, teacher)` per image, the mean over the batch. Verification compares embeddings by cosine, so
the direction is what the student must match; the teacher's norm is a property of its own architecture (and of the
image's quality) that a student with another head need not copy. Embedding sizes: the student's `embed_dim` is set
to the teacher's (`--model-kwargs embed_dim=128` for insightface's MobileFaceNet) rather than learning a projection,
because the embedding that is distilled is then the one deployed (a projection trained with the loss and dropped at
export would leave the exported embedding untrained for the cosine it is scored by; kept, it is a second linear
layer after the head's). `--distill-proj` adds such a learned linear projection for students whose size must differ.
With `--loss arcface|cosface|adaface` and identity labels, the margin loss is added: `loss = margin +
distill_weight * distill`.

Feature hints (`--hint-weight`, FitNets, Romero et al. 2015, https://arxiv.org/abs/1412.6550): the student's last
feature map (7x7 for 112x112 crops), through a learned 1x1 conv to the teacher's channel count, is pulled toward the
teacher's by the same `1 - cosine`, taken over the whole flattened map. A 7x7x512 map is 25k targets per image where
the embedding is 128: far more signal per image when images are few. The maps are not cached (50 KB per image and
orientation: 600 GB at MS1M scale); the teacher runs, without gradients, on every batch, which costs one teacher
forward per step (about a tenth of a MobileOne-S0 training step here). With the teacher online, that same forward
(`forward_features`, then `forward_head`) gives the embedding target too: one forward and one copy of the teacher.

Teacher targets: the teacher (a registry name with `--teacher-checkpoint`, the MXNet `.params` of a ported model,
or an ONNX file with `--teacher-onnx`) embeds every training image and its horizontal flip once; the L2-normalized
embeddings are cached (float16: a cosine changes by < 1e-6) in `--teacher-cache` (default `OUTPUT/teacher.
safetensors`), together with fingerprints of the teacher (model, weight files' sha256, preprocessing) and of the
data (every image's path, label and size; a RecordIO pack's index and size). A cache whose fingerprints differ from
the run's is refused, never reused or overwritten: a stale cache would silently train every step toward the wrong
targets. train.face applies no augmentation beyond flipping, so the cached pair covers every input a step sees.
"""
import argparse
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from timm_mobileone.errors import UserError
from timm_mobileone.files import sha256_file

from .data import Unflipped

_logger = logging.getLogger('train.distill')

CACHE_FORMAT = 'timm_mobileone.teacher_targets.v1'


def add_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('distillation (train/distill.py)')
    g.add_argument('--teacher', default='', metavar='NAME',
                   help='distill from this model (a registry name, e.g. mobilefacenet); its weights from '
                        '--teacher-checkpoint or --teacher-onnx')
    g.add_argument('--teacher-checkpoint', default='', metavar='PATH',
                   help="the teacher's weights (safetensors, torch or insightface MXNet .params)")
    g.add_argument('--teacher-onnx', default='', metavar='MODEL.onnx',
                   help='run the teacher as this ONNX file (--teacher names its preprocessing)')
    g.add_argument('--teacher-raw-pixels', action='store_true',
                   help='the teacher takes 0..255 pixels (its graph normalizes, as insightface exports do)')
    g.add_argument('--teacher-cache', default='', metavar='PATH',
                   help="cache of the teacher's embeddings (default OUTPUT/teacher.safetensors); shared by runs "
                        'on the same data and teacher')
    g.add_argument('--distill-weight', type=float, default=1.0,
                   help='weight of the distillation loss beside a margin loss')
    g.add_argument('--hint-weight', type=float, default=0.0,
                   help="weight of a feature hint: the student's last feature map, through a learned 1x1 conv, "
                        "matches the teacher's (cosine over the whole map); the teacher then runs in every step")
    g.add_argument('--distill-proj', action='store_true',
                   help="learn a linear projection from the student's embedding to the teacher's when their "
                        'sizes differ (default: refuse; set embed_dim to the teacher\'s)')
    g.add_argument('--teacher-mode', default='auto', choices=('auto', 'cached', 'online'),
                   help='cached: the teacher embeds every image and its flip once; online: it embeds each step\'s '
                        'batch as the student sees it (fused, without gradients, bfloat16 under --amp, compiled '
                        'with --compile); auto: online when augmentation beyond the flip is on, else cached')
    g.add_argument('--relational-weight', type=float, default=0.0,
                   help="weight of relational distillation: the batch's pairwise cosine matrix of the student "
                        "matches the teacher's (mean squared difference over the pairs)")
    g.add_argument('--extra-data', nargs='+', default=[], metavar='DIR',
                   help='more aligned crops to distill on, without identities (folders searched recursively, e.g. '
                        'eval.align output); needs --loss none and an image-folder --data')


def check_flags(args) -> None:
    """The distillation flags' impossible values and combinations: UserError (one `error:` line, exit code 2),
    before anything is built. A teacher always comes with its weights: a random teacher is never distilled."""
    from .augment import config_from_args
    if not args.teacher:
        used = [f for f, v in (('--teacher-checkpoint', args.teacher_checkpoint), ('--teacher-onnx', args.teacher_onnx),
                               ('--teacher-cache', args.teacher_cache), ('--distill-proj', args.distill_proj),
                               ('--teacher-raw-pixels', args.teacher_raw_pixels),
                               ('--teacher-mode', args.teacher_mode != 'auto'),
                               ('--relational-weight', args.relational_weight),
                               ('--hint-weight', args.hint_weight),
                               ('--extra-data', args.extra_data)) if v]
        if used:
            raise UserError(f'{used[0]} needs --teacher')
        if args.loss == 'none':
            raise UserError('--loss none trains with no loss at all without --teacher (distillation)')
    if args.teacher:
        if args.teacher.startswith(('hf-hub:', 'local-dir:')):
            raise UserError(f'--teacher {args.teacher}: hub and local-dir teachers are not supported (the target '
                            f'cache fingerprints weight files); give the architecture\'s registry name with '
                            f'--teacher-checkpoint (e.g. the folder\'s model.safetensors)')
        if not (args.teacher_checkpoint or args.teacher_onnx):
            raise UserError(f'--teacher {args.teacher}: no weights given, and a teacher is never random; add '
                            f'--teacher-checkpoint PATH (safetensors, torch or insightface MXNet .params) or '
                            f'--teacher-onnx MODEL.onnx')
        if args.teacher_checkpoint and args.teacher_onnx:
            raise UserError('--teacher-checkpoint and --teacher-onnx: give the teacher\'s weights one way (an ONNX '
                            'file holds its own)')
    if not (math.isfinite(args.distill_weight) and args.distill_weight > 0):
        raise UserError('--distill-weight must be > 0')
    if not (math.isfinite(args.hint_weight) and args.hint_weight >= 0):
        raise UserError('--hint-weight must be >= 0')
    if not (math.isfinite(args.relational_weight) and args.relational_weight >= 0):
        raise UserError('--relational-weight must be >= 0')
    if args.extra_data and args.loss != 'none':
        raise UserError('--extra-data: those faces have no identity labels; they need --loss none (distillation only)')
    missing = [d for d in args.extra_data if not Path(d).is_dir()]
    if missing:
        raise UserError(f'--extra-data {missing[0]}: no such folder')
    augmented = config_from_args(args).active
    if args.teacher and args.teacher_mode == 'cached' and augmented:
        raise UserError('--teacher-mode cached: the cache holds each image and its flip as they are; augmentation '
                        '(crops, colour, mixing) needs --teacher-mode online (or auto)')
    if args.teacher and args.teacher_mode == 'online' and args.teacher_cache:
        raise UserError('--teacher-cache: an online teacher keeps no cache')
    if args.teacher_cache and Path(args.teacher_cache).is_dir():
        raise UserError(f'--teacher-cache {args.teacher_cache}: a folder; give the cache file\'s path (e.g. '
                        f'{Path(args.teacher_cache) / "teacher.safetensors"})')
    args.teacher_online = bool(args.teacher) and (args.teacher_mode == 'online' or
                                                  (args.teacher_mode == 'auto' and augmented))
    if args.hint_weight and args.teacher_onnx:
        raise UserError("--hint-weight needs the teacher's feature maps: give it as a model (--teacher-checkpoint), "
                        "not --teacher-onnx")


# ----------------------------------------------------------------------------------------------------------------
# the teacher


def teacher_eval_args(args):
    """The teacher as eval's model spec (`eval.api.ModelSpec`, or `ArtifactSpec` for --teacher-onnx): eval builds
    and runs it (any model or artifact eval can score)."""
    from eval.api import ArtifactSpec, ModelSpec
    if args.teacher_onnx:
        return ArtifactSpec(path=args.teacher_onnx, runtime='onnx', model=args.teacher,
                            raw_pixels=bool(args.teacher_raw_pixels), via_onnx_flag=True)
    return ModelSpec(model=args.teacher, checkpoint=args.teacher_checkpoint or '', device=str(args.device),
                     raw_pixels=bool(args.teacher_raw_pixels))


def teacher_fingerprint(targs, data_cfg: Dict[str, Any]) -> Dict[str, Any]:
    """What makes the teacher's outputs what they are: model, weight files' contents, preprocessing."""
    files = {}
    for flag, path in (('checkpoint', getattr(targs, 'checkpoint', '')), ('onnx', getattr(targs, 'path', ''))):
        if path:
            files[flag] = sha256_file(path)
            if flag == 'checkpoint' and Path(path).suffix == '.params':
                from timm_mobileone.mxnet import symbol_path_for
                symbol = symbol_path_for(path)
                if symbol.is_file():
                    files['symbol'] = sha256_file(str(symbol))
    return dict(model=targs.model, files=files, mean=list(data_cfg['mean']), std=list(data_cfg['std']),
                raw_pixels=bool(data_cfg.get('raw_pixels')), input_size=list(data_cfg['input_size']))


def data_fingerprint(dataset) -> str:
    """sha256 over the training images' identity: path, label and size of each (ImageFolder), or the pack's
    index file and record file size (RecordIO). Cheap on MS1M-size data; changes when any image is added, removed,
    relabelled or replaced by one of another size."""
    h = hashlib.sha256()
    if hasattr(dataset, 'samples'):
        root = Path(dataset.samples[0][0]).parents[1] if dataset.samples else Path('.')
        for path, label in dataset.samples:
            p = Path(path)
            h.update(f'{p.relative_to(root) if p.is_relative_to(root) else p}\t{label}\t{p.stat().st_size}\n'.encode())
    else:
        h.update(sha256_file(str(dataset.reader.idx_path)).encode())
        h.update(str(Path(dataset.reader.rec_path).stat().st_size).encode())
        h.update(np.asarray(dataset.keys).tobytes())
    h.update(f'n={len(dataset)} size={dataset.input_size}'.encode())
    return h.hexdigest()


@dataclass(frozen=True, eq=False)
class Teacher:
    """A built teacher (`build_teacher`): what it is, how it is fed, and what it gives."""
    model: Any  # the teacher module (eval mode, on --device) or eval's ArtifactModel (an ONNX file)
    cfg: Dict[str, Any]  # its input cfg (eval's input_cfg): input_size, mean, std, raw_pixels
    eval_args: Any  # eval's model spec naming it and its weights (`teacher_eval_args`: eval.api.ModelSpec/ArtifactSpec)
    embed_dim: int  # the size of its embedding

    def fingerprint(self) -> Dict[str, Any]:
        """What makes its outputs what they are (`teacher_fingerprint`): model, weight files, preprocessing."""
        return teacher_fingerprint(self.eval_args, self.cfg)


def build_teacher(args, input_size: Tuple[int, int]) -> Teacher:
    """The teacher the flags name, run once on the student's input size, or UserError (it must run on that size
    and return (B, D) embeddings)."""
    import timm
    from eval.api import load_model
    targs = teacher_eval_args(args)
    if not timm.is_model(targs.model):
        raise UserError(f'--teacher {targs.model}: not a registered model (e.g. mobilefacenet with '
                        f'--teacher-checkpoint, or a mobileone_112 model)')
    try:
        embedder = load_model(targs)
    except UserError as e:  # eval's message names its own flags (--checkpoint, --onnx): say whose they are
        raise UserError(f'--teacher {targs.model}: {e}') from None
    teacher, cfg = embedder.model, embedder.data_cfg
    if tuple(cfg['input_size'][-2:]) != tuple(input_size):
        raise UserError(f'--teacher {targs.model} takes {cfg["input_size"][-2]}x{cfg["input_size"][-1]} images, the '
                        f'student {input_size[0]}x{input_size[1]}: distillation feeds both the same crops')
    try:
        with torch.no_grad():
            out = teacher(torch.zeros(2, 3, *input_size, device=embedder.device))
    except UserError:
        raise
    except Exception as e:  # the runtime's own complaint (an artifact exported for another shape, ...)
        from timm_mobileone.errors import first_line
        raise UserError(f'--teacher {targs.model}: cannot run on {input_size[0]}x{input_size[1]} crops '
                        f'({first_line(e)})') from None
    if out.ndim != 2:
        raise UserError(f'--teacher {targs.model} returns a {out.ndim}-D output; distillation needs (B, D) '
                        f'embeddings')
    return Teacher(model=teacher, cfg=cfg, eval_args=targs, embed_dim=out.shape[1])


class OnlineTeacher:
    """The teacher run on each step's batch (`--teacher-mode online`): `teacher(pixels)` takes the batch the
    student sees, as 0..255 float pixels after augmentation, and returns its L2-normalized float32 embeddings and,
    built with `features` (a feature hint), the last feature map of the same forward (else None).

    A PyTorch teacher runs reparameterized (timm's `reparameterize_model`: MobileOne or FastViT teachers in their
    fused form), in eval mode, without gradients, under bfloat16 autocast when the run uses `--amp` (no grad scaler
    is needed: nothing flows back) and compiled when it uses `--compile`. An ONNX teacher runs on ONNX Runtime's
    CPU provider: on a CPU run that is its normal place; a CUDA run refuses it: each step would copy the batch to
    the host and wait for a CPU forward (docs/zoo.md: MobileFaceNet in ONNX Runtime takes 5.4 ms per image at batch
    64 on the project's 2-core box, 1.4 s for a 256-image batch, where a GPU step of S0 is milliseconds).
    """

    def __init__(self, teacher, cfg: Dict[str, Any], args, device: torch.device, features: bool = False) -> None:
        from timm.utils import reparameterize_model
        from eval.api import ArtifactModel
        self.artifact = isinstance(teacher, ArtifactModel)
        if self.artifact and device.type != 'cpu':
            raise UserError(f'--teacher-onnx {args.teacher_onnx}: an online teacher must run each step on the '
                            f'training device ({device.type}), and ONNX teachers run on ONNX Runtime\'s CPU provider '
                            f'here; give the teacher as a model (--teacher-checkpoint), or train without '
                            f'augmentation (cached targets)')
        self.features = features
        if not self.artifact:
            teacher = reparameterize_model(teacher.eval()).requires_grad_(False).to(device)
            if features:  # the feature hint's target comes from the same forward as the embedding
                teacher = _FeaturesAndEmbedding(teacher)
            if args.compile:
                teacher = torch.compile(teacher, backend=args.compile_backend)
        self.model = teacher
        self.device = device
        self.amp = bool(args.amp) and not self.artifact
        self.raw = bool(cfg.get('raw_pixels'))
        self.mean = torch.tensor(cfg['mean'], device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(cfg['std'], device=device).view(1, 3, 1, 1) * 255

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(L2-normalized embeddings, the last feature map when built with `features`, else None)."""
        x = pixels if self.raw else (pixels - self.mean) / self.std
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            out = self.model(x)
        features = None
        if self.features:
            features, out = out
        return F.normalize(out.to(self.device).float(), dim=1), features


class _FeaturesAndEmbedding(nn.Module):
    """`forward(x)` -> (forward_features(x), the embedding from them): one teacher forward serves both the
    embedding target and the feature hint (a module so that torch.compile takes the pair as one graph)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        features = self.model.forward_features(x)
        return features, self.model.forward_head(features)


def _read_cache(path: Path, expected: Dict[str, str]) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    from safetensors import safe_open
    try:
        with safe_open(str(path), 'pt') as f:
            meta = f.metadata() or {}
            if meta.get('format') != CACHE_FORMAT:
                raise UserError(f'--teacher-cache {path}: not a teacher-target cache (format '
                                f'{meta.get("format")!r}); give another path')
            for key in ('teacher', 'data'):
                if meta.get(key) != expected[key]:
                    what = ('another teacher (model, weights or preprocessing)' if key == 'teacher' else
                            'other training data (images added, removed, relabelled or changed)')
                    raise UserError(f'--teacher-cache {path} was computed for {what}; delete it or give another '
                                    f'--teacher-cache (a stale cache would train toward wrong targets)')
            return f.get_tensor('targets'), f.get_tensor('targets_flip')
    except UserError:
        raise
    except Exception as e:  # truncated or foreign file
        from timm_mobileone.errors import first_line
        raise UserError(f'--teacher-cache {path}: unreadable ({first_line(e)}); delete it or give another path') \
            from None


def teacher_targets(dataset, args, cache: Path, input_size: Tuple[int, int], compute: bool = True,
                    teacher: Optional[Teacher] = None) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, Any]]:
    """L2-normalized teacher embeddings (float16) of every training image and of its flip, from the cache or
    computed once and cached. Returns (targets, targets_flip, info). `compute=False` (non-main processes) only
    reads a cache the main process wrote; `teacher` is build_teacher's result when the caller has it."""
    import time
    from safetensors.torch import save_file
    from eval.api import EmbedOptions, Embedder, embed_batches
    teacher = teacher if teacher is not None else build_teacher(args, input_size)
    cfg, targs = teacher.cfg, teacher.eval_args
    fingerprint = dict(teacher=json.dumps(teacher.fingerprint(), sort_keys=True),
                       data=data_fingerprint(dataset))
    info = dict(cache=str(cache), teacher=json.loads(fingerprint['teacher']))
    if cache.is_file():
        targets, flipped = _read_cache(cache, fingerprint)
        if len(targets) != len(dataset):
            raise UserError(f'--teacher-cache {cache}: {len(targets)} targets for {len(dataset)} images; delete it')
        _logger.info(f'teacher targets: {cache} (cached)')
        return targets, flipped, dict(info, computed=False, seconds=0.0)
    if not compute:
        raise UserError(f'--teacher-cache {cache}: missing (the main process writes it)')
    t0 = time.perf_counter()
    targets = flipped = None
    images = Unflipped(dataset, labels=False)
    _logger.info(f'teacher targets: embedding {len(images)} images and their flips with {targs.model}')
    from timm_mobileone.verification_data import PackError
    try:
        for start, out, out_flip, _ in embed_batches(  # image and flip, as the validation batches
                Embedder(targs, teacher.model, cfg), images,
                EmbedOptions(batch_size=args.val_batch_size, workers=args.workers, flip=True), 'teacher'):
            if targets is None:
                targets = torch.empty(len(images), out.shape[1], dtype=torch.float16)
                flipped = torch.empty_like(targets)
            n = len(out)
            targets[start:start + n] = F.normalize(torch.from_numpy(out).float(), dim=1).half()
            flipped[start:start + n] = F.normalize(torch.from_numpy(out_flip).float(), dim=1).half()
    except PackError as e:  # the item's line names its flag (--data or --extra-data)
        raise UserError(str(e)) from None
    if not (torch.isfinite(targets).all() and torch.isfinite(flipped).all()):
        raise UserError(f'--teacher {targs.model}: non-finite embeddings (are its weights right?)')
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f'.{cache.name}.tmp')
    save_file(dict(targets=targets, targets_flip=flipped), str(tmp), metadata=dict(format=CACHE_FORMAT,
                                                                                    **fingerprint))
    tmp.replace(cache)
    seconds = time.perf_counter() - t0
    _logger.info(f'teacher targets: {len(images)} x 2 in {seconds:.1f} s -> {cache}')
    return targets, flipped, dict(info, computed=True, seconds=round(seconds, 2))


# ----------------------------------------------------------------------------------------------------------------
# the loss


class DistillHead(nn.Module):
    """Distillation (and optionally a margin loss) on the student's embedding.

    `loss(embeddings, labels)` takes the `(B, 3)` labels train.face's datasets give with `with_index`: identity,
    image index, whether the image was flipped; the target is the teacher's cached embedding of that image in that
    orientation. The targets are plain tensors, not buffers: they are not weights (checkpoints stay model-sized)
    and DistributedDataParallel must not broadcast them.
    """

    def __init__(self, embed_dim: int, targets: Optional[torch.Tensor], targets_flip: Optional[torch.Tensor],
                 margin: Optional[nn.Module] = None, weight: float = 1.0, proj: bool = False,
                 hint: Optional[Dict[str, Any]] = None, teacher_dim: Optional[int] = None,
                 relational_weight: float = 0.0) -> None:
        super().__init__()
        teacher_dim = targets.shape[1] if targets is not None else teacher_dim
        self.proj = nn.Linear(embed_dim, teacher_dim, bias=False) if proj else None
        self.margin = margin
        self.weight = weight
        self.relational_weight = relational_weight
        self.targets, self.targets_flip = targets, targets_flip  # None: the teacher runs online
        self.hint_weight = hint['weight'] if hint else 0.0
        self._teacher = None
        if hint:
            self.hint = nn.Conv2d(hint['student_chs'], hint['teacher_chs'], 1, bias=False)
            if hint['teacher'] is not None:  # cached targets: the hint runs the teacher (the online one serves it)
                # the teacher is not a submodule: its weights are neither trained nor checkpointed with the run
                self._teacher = [hint['teacher'].eval().requires_grad_(False)]
                # student-normalized pixels -> the teacher's normalization: x_t = x_s * scale + shift
                self.teacher_scale, self.teacher_shift = hint['scale'], hint['shift']

    def hint_loss(self, features: torch.Tensor, images: torch.Tensor,
                  target: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The hint on the student's last feature map; `target`: the online teacher's map of this batch, else the
        hint's own teacher runs on `images` (student-normalized)."""
        if target is None:
            with torch.no_grad():
                x = images * self.teacher_scale.to(images) + self.teacher_shift.to(images)
                target = self._teacher[0].forward_features(x)
        student = self.hint(features).float().flatten(1)
        target = target.float().flatten(1)
        return self.hint_weight * (1 - F.cosine_similarity(student, target, dim=1, eps=1e-12)).mean()

    def targets_to(self, device: torch.device) -> None:
        if self.targets is not None:
            self.targets, self.targets_flip = self.targets.to(device), self.targets_flip.to(device)
        if self._teacher is not None:
            self._teacher[0].to(device)

    def distill_loss(self, embeddings: torch.Tensor, labels: torch.Tensor,
                     targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`1 - cos` to the teacher's embedding (the online teacher's `targets`, else the cache's entry for the
        image and orientation), plus the relational term when weighted."""
        student = embeddings if self.proj is None else self.proj(embeddings)
        if targets is None:
            index, flipped = labels[:, 1], labels[:, 2].bool().unsqueeze(1)
            targets = torch.where(flipped, self.targets_flip[index], self.targets[index])
        targets = targets.float()
        loss = (1 - F.cosine_similarity(student, targets, dim=1, eps=1e-12)).mean()
        if self.relational_weight:
            loss = loss + self.relational_weight * relational_loss(student, targets)
        return loss

    def loss(self, embeddings: torch.Tensor, labels: torch.Tensor,
             targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        loss = self.weight * self.distill_loss(embeddings, labels, targets)
        if self.margin is not None:
            loss = loss + self.margin.loss(embeddings, labels[:, 0])
        return loss


def relational_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Relational distillation on cosines (the similarity-preserving idea of Tung & Mori, ICCV 2019, and RKD's
    distance term, Park et al., CVPR 2019, on the quantity verification scores): the mean squared difference of
    the batch's pairwise cosine matrices, over the off-diagonal pairs. Verification thresholds a cosine between two
    faces, so the pairs' cosines are what a student must reproduce; the per-image term only pulls each embedding
    toward its own target."""
    s = F.normalize(student, dim=1, eps=1e-12)
    t = F.normalize(teacher, dim=1, eps=1e-12)
    b = s.shape[0]
    if b < 2:
        return s.sum() * 0
    off = ~torch.eye(b, dtype=torch.bool, device=s.device)
    return ((s @ s.T - t @ t.T)[off] ** 2).mean()
