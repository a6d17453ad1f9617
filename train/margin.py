"""Margin heads on normalized embeddings and class centres: ArcFace, CosFace and AdaFace.

ArcFace: `s * cos(theta_y + m)` for the target class, `s * cos(theta_j)` for the others (Deng et al. 2019,
https://arxiv.org/abs/1801.07698). Where `theta_y + m` passes pi the target logit would grow again; as in the
paper's code it falls back to `cos(theta_y) - m * sin(m)` there, which keeps it decreasing in theta.
CosFace: `s * (cos(theta_y) - m)` (Wang et al. 2018, https://arxiv.org/abs/1801.09414).
AdaFace (Kim et al. 2022, https://arxiv.org/abs/2204.00964): the margin adapts to image quality, read off the
feature norm `||z||` of the raw (unnormalized) embedding. With the norm's batch mean and std kept as an EMA
(`t_alpha`), `g = clip(h * (||z|| - mean) / (std + eps), -1, 1)` and the target logit is
`s * (cos(clip(theta_y - m * g, eps, pi - eps)) - (m + m * g))`: an angular margin for high-norm (good) images,
an additive one for low-norm ones. Defaults are the paper's: m=0.4, h=0.333, s=64, t_alpha=0.01; cosines are
clamped to 1e-3 from +-1 and norms to [0.001, 100], as in the authors' code.

Partial FC (An et al. 2022, https://arxiv.org/abs/2203.15565): with `sample_rate` < 1, each training step scores
the embeddings against the batch's own identities plus random others, `ceil(sample_rate * num_classes)` centres in
all, so the softmax and its gradient cost a fraction of the full head when identities run into the hundreds of
thousands. Unsampled centres get no gradient that step. Evaluation mode always scores every centre.
`MarginHead` holds every centre on every process; `train.partial_fc.ShardedMarginHead` splits them across
processes.
"""
import math
from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

KINDS = ('arcface', 'cosface', 'adaface')  # the registry: train.face's --loss choices come from here
DEFAULT_MARGIN = dict(arcface=0.5, cosface=0.4, adaface=0.4)


def sample_classes(num_classes: int, num_sample: int, positive: torch.Tensor) -> torch.Tensor:
    """Partial FC's sample: the sorted class indices scored this step, every positive plus random others."""
    if num_sample <= len(positive):
        return positive
    score = torch.rand(num_classes, device=positive.device)
    score[positive] = 2.0  # positives first, then random negatives
    return torch.topk(score, num_sample).indices.sort().values


class MarginLoss(nn.Module):
    """The margin itself (kind, s, m, AdaFace's feature-norm statistics); the heads below hold the class centres."""

    def __init__(self, kind: str = 'arcface', s: float = 64.0, m: Optional[float] = None, sample_rate: float = 1.0,
                 h: float = 0.333, t_alpha: float = 0.01) -> None:
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f'sample_rate must be in (0, 1], got {sample_rate}')
        if kind not in KINDS:
            raise ValueError(f'kind must be one of {", ".join(map(repr, KINDS))}, got {kind!r}')
        self.kind = kind
        self.s = s
        self.m = m if m is not None else DEFAULT_MARGIN[kind]
        self.sample_rate = sample_rate
        # cosines are kept this far from +-1 (acos and the ArcFace sine are not differentiable at the ends)
        self.eps = 1e-3 if kind == 'adaface' else 1e-7
        if kind == 'adaface':
            if not 0.0 <= t_alpha <= 1.0:
                raise ValueError(f't_alpha must be in [0, 1], got {t_alpha}')
            self.h = h
            self.t_alpha = t_alpha
            # the authors' initial values; saved with the head so that a resumed run continues the EMA
            self.register_buffer('batch_mean', torch.full((1,), 20.0))
            self.register_buffer('batch_std', torch.full((1,), 100.0))

    def feature_norms(self, embeddings: torch.Tensor) -> Optional[torch.Tensor]:
        """AdaFace's ||z|| per row (detached, clipped to [0.001, 100]); None for the other kinds."""
        if self.kind != 'adaface':
            return None
        return torch.linalg.vector_norm(embeddings.detach(), dim=1).clamp(0.001, 100)

    @torch.no_grad()
    def update_norm_stats(self, norms: torch.Tensor) -> None:
        """AdaFace's EMA of the batch's feature-norm mean and (unbiased) std; `norms` of the whole global batch."""
        mean, std = norms.mean(), norms.std()
        self.batch_mean.copy_(mean * self.t_alpha + (1 - self.t_alpha) * self.batch_mean)
        self.batch_std.copy_(std * self.t_alpha + (1 - self.t_alpha) * self.batch_std)

    def target_logit(self, target: torch.Tensor, norms: Optional[torch.Tensor] = None) -> torch.Tensor:
        """cos(theta_y) of each target -> its logit with the margin, before the scale s."""
        if self.kind == 'arcface':
            sin = torch.sqrt(1.0 - target * target)
            with_margin = target * math.cos(self.m) - sin * math.sin(self.m)  # cos(theta + m)
            threshold = math.cos(math.pi - self.m)
            return torch.where(target > threshold, with_margin, target - self.m * math.sin(self.m))
        if self.kind == 'cosface':
            return target - self.m
        scaler = ((norms.view_as(target) - self.batch_mean) / (self.batch_std + self.eps) * self.h).clamp(-1, 1)
        theta = torch.acos(target).sub(self.m * scaler).clamp(self.eps, math.pi - self.eps)
        return torch.cos(theta) - (self.m + self.m * scaler)

    def cosine(self, embeddings: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Cosines of the embeddings to the centres (this head's own by default), clamped eps from +-1."""
        weight = self.weight if weight is None else weight
        cos = F.linear(F.normalize(embeddings, dim=1), F.normalize(weight, dim=1))
        return cos.clamp(-1 + self.eps, 1 - self.eps)


# torch 2.14 renamed all_gather_into_tensor (the old name warns); older releases have only the old one
all_gather_single = getattr(dist, 'all_gather_single', None) or dist.all_gather_into_tensor


def all_rows(x: torch.Tensor) -> torch.Tensor:
    """x from every process of the default group, concatenated in rank order (no gradient)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    out = x.new_empty((dist.get_world_size() * x.shape[0], *x.shape[1:]))
    all_gather_single(out, x.contiguous())
    return out


class MarginHead(MarginLoss):
    """Every class centre on this process; `forward(embeddings, labels)` returns (scaled logits, labels) for
    cross-entropy, `loss(embeddings, labels)` the mean cross-entropy.

    Under DistributedDataParallel each process scores its own batch against all centres and DDP averages the
    gradients (the replicated head). AdaFace's norm statistics are taken over the global batch (gathered), so
    that every process holds the same EMA and the sharded head computes the same margins.
    """

    def __init__(self, embed_dim: int, num_classes: int, kind: str = 'arcface', s: float = 64.0,
                 m: Optional[float] = None, sample_rate: float = 1.0, h: float = 0.333, t_alpha: float = 0.01) -> None:
        super().__init__(kind, s, m, sample_rate, h, t_alpha)
        if num_classes < 2:
            raise ValueError(f'a margin head needs >= 2 classes, got {num_classes}')
        self.num_sample = max(2, math.ceil(sample_rate * num_classes))
        self.weight = nn.Parameter(torch.empty(num_classes, embed_dim))
        nn.init.normal_(self.weight, std=0.01)

    def sample(self, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Partial FC: (sampled class indices, labels remapped into them). The batch's classes are always in."""
        index = sample_classes(self.weight.shape[0], self.num_sample, torch.unique(labels))
        return index, torch.searchsorted(index, labels)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Scaled logits with the margin on each target, and the labels they go with (remapped when sampling)."""
        weight = self.weight
        if self.training and self.sample_rate < 1.0:
            index, labels = self.sample(labels)
            weight = weight[index]
        cos = self.cosine(embeddings, weight)
        norms = self.feature_norms(embeddings)
        if norms is not None and self.training:
            self.update_norm_stats(all_rows(norms))
        target = cos.gather(1, labels.view(-1, 1))
        logits = cos.scatter(1, labels.view(-1, 1), self.target_logit(target, norms))
        return logits * self.s, labels

    def loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(*self(embeddings, labels))
