"""Augmentation on the training device, for consistent distillation (`train.face --teacher` with any of the flags
below): the student and the online teacher see exactly the same augmented batch.

    python -m train.face ... --teacher mobilefacenet --teacher-checkpoint model-0000.params --loss none \
        --crop-scale 0.85 1 --shift 0.04 --rotate 8 --color-jitter 0.3 --grayscale-prob 0.1 --mixup 0.5

What it does, in this order, on a batch of 0..255 float pixels (after the dataset's flip, before normalization):
1. geometry, one affine warp per image (`F.affine_grid` + `grid_sample`, bilinear, zeros outside): a random
   resized crop close to the aligned framing (`--crop-scale LO HI`: the crop's area as a fraction of the image,
   `--crop-ratio LO HI`: its width / height, log-uniform), a shift (`--shift F`: up to F of the side) and a
   rotation (`--rotate D`: up to D degrees about the centre);
2. colour: brightness, contrast and saturation each scaled by a factor in [1 - c, 1 + c] (`--color-jitter c`);
3. Gaussian blur (`--gaussian-blur-prob p`: 5x5, sigma 0.1-1.5) and grayscale (`--grayscale-prob p`), per image;
4. mixing between faces of the batch (`--mixup A`, `--cutmix A`: Beta(A, A); both: one or the other per batch;
   `--mixup-prob p`: how many batches are mixed). The partner of image i is image i - 1 (a roll): with a shuffled
   sampler that is a random face, and no permutation needs drawing.

Why not timm's transforms (`timm.data.create_transform`, `Mixup`): they run per image in DataLoader workers, on PIL
images or on the host, and draw from the worker's global RNG. Here the batch is already on the device (the workers
only decode), the teacher must see the very tensor the student sees, and a resumed run must draw exactly what the
uninterrupted run drew. Every random number of a step comes from one CPU generator seeded by (seed, rank, step), so
augmentation has no state to checkpoint: step k draws the same on any resume, on any device.
"""
import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from timm_mobileone.errors import UserError

__all__ = ['AugmentConfig', 'DeviceAugment', 'add_flags', 'check_flags', 'config_from_args']

AUG_FLAGS = ('crop_scale', 'crop_ratio', 'shift', 'rotate', 'color_jitter', 'gaussian_blur_prob', 'grayscale_prob',
             'mixup', 'cutmix', 'mixup_prob')


@dataclass(frozen=True)
class AugmentConfig:
    crop_scale: Tuple[float, float] = (1.0, 1.0)
    crop_ratio: Tuple[float, float] = (1.0, 1.0)
    shift: float = 0.0
    rotate: float = 0.0
    color_jitter: float = 0.0
    gaussian_blur_prob: float = 0.0
    grayscale_prob: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0

    @property
    def geometric(self) -> bool:
        return (tuple(self.crop_scale) != (1.0, 1.0) or tuple(self.crop_ratio) != (1.0, 1.0) or self.shift > 0
                or self.rotate > 0)

    @property
    def mixing(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.mixup_prob > 0

    @property
    def active(self) -> bool:
        """Anything beyond the dataset's flip: the teacher's cached targets no longer cover what a step sees."""
        return (self.geometric or self.color_jitter > 0 or self.gaussian_blur_prob > 0 or self.grayscale_prob > 0
                or self.mixing)

    def to_dict(self) -> Dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def add_flags(p) -> None:
    g = p.add_argument_group('augmentation on the device (train/augment.py; the online teacher sees the same batch)')
    g.add_argument('--crop-scale', type=float, nargs=2, default=[1.0, 1.0], metavar=('LO', 'HI'),
                   help='random resized crop: area fraction of the crop, in (0, 1] (1 1: off)')
    g.add_argument('--crop-ratio', type=float, nargs=2, default=[1.0, 1.0], metavar=('LO', 'HI'),
                   help='random resized crop: width / height of the crop, log-uniform (1 1: square)')
    g.add_argument('--shift', type=float, default=0.0, help='random shift, up to this fraction of the side')
    g.add_argument('--rotate', type=float, default=0.0, help='random rotation, up to this many degrees')
    g.add_argument('--color-jitter', type=float, default=0.0,
                   help='brightness, contrast and saturation factors in [1 - c, 1 + c]')
    g.add_argument('--gaussian-blur-prob', type=float, default=0.0, help='probability of a Gaussian blur per image')
    g.add_argument('--grayscale-prob', type=float, default=0.0, help='probability of grayscale per image')
    g.add_argument('--mixup', type=float, default=0.0, help='mixup alpha (0: off); needs --teacher and --loss none')
    g.add_argument('--cutmix', type=float, default=0.0, help='cutmix alpha (0: off); needs --teacher and --loss none')
    g.add_argument('--mixup-prob', type=float, default=1.0, help='probability that a batch is mixed')


def check_flags(args) -> None:
    """Impossible values and combinations: UserError (one `error:` line, exit 2), before anything is built."""
    lo, hi = args.crop_scale
    if not (0 < lo <= hi <= 1):
        raise UserError(f'--crop-scale {lo:g} {hi:g}: need 0 < LO <= HI <= 1 (area fractions of the image)')
    lo, hi = args.crop_ratio
    if not (0 < lo <= hi) or not all(map(math.isfinite, (lo, hi))):
        raise UserError(f'--crop-ratio {lo:g} {hi:g}: need 0 < LO <= HI (width / height of the crop)')
    if not 0 <= args.shift <= 0.5:
        raise UserError('--shift must be in [0, 0.5] (a fraction of the side)')
    if not 0 <= args.rotate <= 180:
        raise UserError('--rotate must be in [0, 180] degrees')
    if not 0 <= args.color_jitter < 1:
        raise UserError('--color-jitter must be in [0, 1)')
    for name in ('gaussian_blur_prob', 'grayscale_prob', 'mixup_prob'):
        if not 0 <= getattr(args, name) <= 1:
            raise UserError(f'--{name.replace("_", "-")} must be in [0, 1]')
    for name in ('mixup', 'cutmix'):
        if not getattr(args, name) >= 0 or not math.isfinite(getattr(args, name)):
            raise UserError(f'--{name} must be >= 0 (the alpha of its Beta distribution; 0: off)')
    cfg = config_from_args(args)
    if cfg.mixing and not (args.teacher and args.loss == 'none'):
        raise UserError('--mixup/--cutmix need --teacher and --loss none: a mixed face has no identity label, its '
                        "target is the teacher's embedding of the mixed image")


def config_from_args(args) -> AugmentConfig:
    return AugmentConfig(**{k: tuple(getattr(args, k)) if k.startswith('crop_') else getattr(args, k)
                            for k in AUG_FLAGS})


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of one step's draws: a function of (seed, rank, step) only (63 bits of their sha256)."""
    digest = hashlib.sha256(f'train.augment {seed} {rank} {step}'.encode()).digest()
    return int.from_bytes(digest[:8], 'little') >> 1


class DeviceAugment:
    """`aug(pixels, step)`: the batch (B, 3, H, W) of float 0..255 pixels, augmented; a new tensor."""

    def __init__(self, cfg: AugmentConfig, seed: int = 0, rank: int = 0) -> None:
        self.cfg, self.seed, self.rank = cfg, seed, rank

    def __call__(self, x: torch.Tensor, step: int) -> torch.Tensor:
        cfg = self.cfg
        if not cfg.active:
            return x
        seed = step_seed(self.seed, self.rank, step)
        g = torch.Generator().manual_seed(seed)
        b = x.shape[0]

        def uniform(lo: float, hi: float, n: int = b) -> torch.Tensor:
            return torch.rand(n, generator=g, dtype=torch.float64) * (hi - lo) + lo

        # every draw happens, in a fixed order, whatever is switched off: the stream of one flag never depends on
        # another, and a batch's draws do not depend on the device
        area, log_ratio = uniform(*cfg.crop_scale), uniform(*map(math.log, cfg.crop_ratio))
        pos, shift, angle = uniform(-1, 1, 2 * b).view(b, 2), uniform(-1, 1, 2 * b).view(b, 2), uniform(-1, 1)
        jitter = uniform(1 - cfg.color_jitter, 1 + cfg.color_jitter, 3 * b).view(b, 3)
        blur_on, sigma = torch.rand(b, generator=g) < cfg.gaussian_blur_prob, uniform(0.1, 1.5)
        gray_on = torch.rand(b, generator=g) < cfg.grayscale_prob
        mix_on, use_cutmix = torch.rand(2, generator=g, dtype=torch.float64).tolist()
        box = uniform(0, 1, 2)

        if cfg.geometric:
            x = self._warp(x, area, log_ratio, pos, shift, angle)
        if cfg.color_jitter > 0:
            x = self._color(x, jitter)
        if cfg.gaussian_blur_prob > 0 and blur_on.any():
            x = torch.where(blur_on.to(x.device).view(b, 1, 1, 1), self._blur(x, sigma), x)
        if cfg.grayscale_prob > 0 and gray_on.any():
            x = torch.where(gray_on.to(x.device).view(b, 1, 1, 1), _gray(x).expand_as(x), x)
        if cfg.mixing and mix_on < cfg.mixup_prob and b > 1:
            cut = cfg.cutmix > 0 and (cfg.mixup == 0 or use_cutmix < 0.5)
            alpha = cfg.cutmix if cut else cfg.mixup
            # torch's Beta sampler takes no generator: numpy's, seeded by the same (seed, rank, step)
            lam = float(np.random.default_rng(seed).beta(alpha, alpha))
            x = self._cutmix(x, lam, box) if cut else x * lam + x.roll(1, 0) * (1 - lam)
        return x

    def _warp(self, x, area, log_ratio, pos, shift, angle) -> torch.Tensor:
        """One affine per image. In affine_grid's normalized coordinates ([-1, 1] over the image), an output point
        p maps to the input point R(angle) diag(w, h) p + centre, with w, h the crop's half-extents (fractions of
        the image's side) and the centre placed where the crop fits inside the image, then shifted."""
        ratio = torch.exp(log_ratio)
        w, h = torch.sqrt(area * ratio).clamp(max=1.0), torch.sqrt(area / ratio).clamp(max=1.0)
        centre = pos * torch.stack([1 - w, 1 - h], 1) + shift * 2 * self.cfg.shift
        a = angle * math.radians(self.cfg.rotate)
        cos, sin = torch.cos(a), torch.sin(a)
        theta = torch.stack([torch.stack([cos * w, -sin * h, centre[:, 0]], 1),
                             torch.stack([sin * w, cos * h, centre[:, 1]], 1)], 1)
        grid = F.affine_grid(theta.to(x.device, torch.float32), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid.to(x.dtype), mode='bilinear', padding_mode='zeros', align_corners=False)

    @staticmethod
    def _color(x, jitter) -> torch.Tensor:
        f = jitter.to(x.device, x.dtype)
        x = x * f[:, 0].view(-1, 1, 1, 1)  # brightness
        mean = _gray(x).mean(dim=(2, 3), keepdim=True)
        x = (x - mean) * f[:, 1].view(-1, 1, 1, 1) + mean  # contrast
        gray = _gray(x)
        x = (x - gray) * f[:, 2].view(-1, 1, 1, 1) + gray  # saturation
        return x.clamp(0, 255)

    @staticmethod
    def _blur(x, sigma) -> torch.Tensor:
        """A separable 5x5 Gaussian per image (its own sigma), reflect-padded, as one grouped conv per axis."""
        b, c, hgt, wid = x.shape
        t = torch.arange(-2, 3, dtype=torch.float64)
        k = torch.exp(-t[None] ** 2 / (2 * sigma[:, None] ** 2))
        k = (k / k.sum(1, keepdim=True)).to(x.device, x.dtype).repeat_interleave(c, 0)  # (b*c, 5)
        y = F.pad(x.reshape(1, b * c, hgt, wid), (2, 2, 2, 2), mode='reflect')
        y = F.conv2d(y, k.view(b * c, 1, 5, 1), groups=b * c)
        y = F.conv2d(y, k.view(b * c, 1, 1, 5), groups=b * c)
        return y.view(b, c, hgt, wid)

    @staticmethod
    def _cutmix(x, lam: float, box) -> torch.Tensor:
        """The partner's rectangle of area (1 - lam), centred at a random point and clipped to the image."""
        _, _, hgt, wid = x.shape
        cut = math.sqrt(1 - lam)
        ch, cw = int(hgt * cut), int(wid * cut)
        cy, cx = int(box[0] * hgt), int(box[1] * wid)
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, hgt)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, wid)
        out = x.clone()
        out[:, :, y0:y1, x0:x1] = x.roll(1, 0)[:, :, y0:y1, x0:x1]
        return out


def _gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, (B, 1, H, W)."""
    return (x[:, 0:1] * 0.299 + x[:, 1:2] * 0.587 + x[:, 2:3] * 0.114)
