"""Margin heads on normalized embeddings and class centres: ArcFace (additive angular) and CosFace (additive cosine).

ArcFace: `s * cos(theta_y + m)` for the target class, `s * cos(theta_j)` for the others (Deng et al. 2019,
https://arxiv.org/abs/1801.07698). Where `theta_y + m` passes pi the target logit would grow again; as in the
paper's code it falls back to `cos(theta_y) - m * sin(m)` there, which keeps it decreasing in theta.
CosFace: `s * (cos(theta_y) - m)` (Wang et al. 2018, https://arxiv.org/abs/1801.09414).

Partial FC (An et al. 2022, https://arxiv.org/abs/2203.15565): with `sample_rate` < 1, each training step scores
the embeddings against the batch's own identities plus random others, `ceil(sample_rate * num_classes)` centres in
all, so the softmax and its gradient cost a fraction of the full head when identities run into the hundreds of
thousands. Unsampled centres get no gradient that step. Evaluation mode always scores every centre.
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class MarginHead(nn.Module):
    """Class centres + margin; `forward(embeddings, labels)` returns (scaled logits, labels) for cross-entropy."""

    def __init__(self, embed_dim: int, num_classes: int, kind: str = 'arcface', s: float = 64.0,
                 m: Optional[float] = None, sample_rate: float = 1.0) -> None:
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f'sample_rate must be in (0, 1], got {sample_rate}')
        if kind not in ('arcface', 'cosface'):
            raise ValueError(f"kind must be 'arcface' or 'cosface', got {kind!r}")
        if num_classes < 2:
            raise ValueError(f'a margin head needs >= 2 classes, got {num_classes}')
        self.kind = kind
        self.s = s
        self.m = m if m is not None else (0.5 if kind == 'arcface' else 0.4)
        self.sample_rate = sample_rate
        self.num_sample = max(2, math.ceil(sample_rate * num_classes))
        self.weight = nn.Parameter(torch.empty(num_classes, embed_dim))
        nn.init.normal_(self.weight, std=0.01)

    def cosine(self, embeddings: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        weight = self.weight if weight is None else weight
        return F.linear(F.normalize(embeddings, dim=1), F.normalize(weight, dim=1))

    def sample(self, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Partial FC: (sampled class indices, labels remapped into them). The batch's classes are always in."""
        num_classes = self.weight.shape[0]
        positive = torch.unique(labels)
        if self.num_sample <= len(positive):
            index = positive
        else:
            score = torch.rand(num_classes, device=labels.device)
            score[positive] = 2.0  # positives first, then random negatives
            index = torch.topk(score, self.num_sample).indices.sort().values
        return index, torch.searchsorted(index, labels)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Scaled logits with the margin on each target, and the labels they go with (remapped when sampling)."""
        weight = self.weight
        if self.training and self.sample_rate < 1.0:
            index, labels = self.sample(labels)
            weight = weight[index]
        cos = self.cosine(embeddings, weight).clamp(-1 + 1e-7, 1 - 1e-7)
        target = cos.gather(1, labels.view(-1, 1))
        if self.kind == 'arcface':
            sin = torch.sqrt(1.0 - target * target)
            with_margin = target * math.cos(self.m) - sin * math.sin(self.m)  # cos(theta + m)
            threshold = math.cos(math.pi - self.m)
            with_margin = torch.where(target > threshold, with_margin, target - self.m * math.sin(self.m))
        else:
            with_margin = target - self.m
        logits = cos.scatter(1, labels.view(-1, 1), with_margin)
        return logits * self.s, labels
