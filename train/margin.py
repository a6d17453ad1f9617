"""Margin heads on normalized embeddings and class centres: ArcFace (additive angular) and CosFace (additive cosine).

ArcFace: `s * cos(theta_y + m)` for the target class, `s * cos(theta_j)` for the others (Deng et al. 2019,
https://arxiv.org/abs/1801.07698). Where `theta_y + m` passes pi the target logit would grow again; as in the
paper's code it falls back to `cos(theta_y) - m * sin(m)` there, which keeps it decreasing in theta.
CosFace: `s * (cos(theta_y) - m)` (Wang et al. 2018, https://arxiv.org/abs/1801.09414).
"""
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class MarginHead(nn.Module):
    """Class centres + margin; `forward(embeddings, labels)` returns the scaled logits for cross-entropy."""

    def __init__(self, embed_dim: int, num_classes: int, kind: str = 'arcface', s: float = 64.0,
                 m: Optional[float] = None) -> None:
        super().__init__()
        if kind not in ('arcface', 'cosface'):
            raise ValueError(f"kind must be 'arcface' or 'cosface', got {kind!r}")
        if num_classes < 2:
            raise ValueError(f'a margin head needs >= 2 classes, got {num_classes}')
        self.kind = kind
        self.s = s
        self.m = m if m is not None else (0.5 if kind == 'arcface' else 0.4)
        self.weight = nn.Parameter(torch.empty(num_classes, embed_dim))
        nn.init.normal_(self.weight, std=0.01)

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(embeddings, dim=1), F.normalize(self.weight, dim=1))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = self.cosine(embeddings).clamp(-1 + 1e-7, 1 - 1e-7)
        target = cos.gather(1, labels.view(-1, 1))
        if self.kind == 'arcface':
            sin = torch.sqrt(1.0 - target * target)
            with_margin = target * math.cos(self.m) - sin * math.sin(self.m)  # cos(theta + m)
            threshold = math.cos(math.pi - self.m)
            with_margin = torch.where(target > threshold, with_margin, target - self.m * math.sin(self.m))
        else:
            with_margin = target - self.m
        logits = cos.scatter(1, labels.view(-1, 1), with_margin)
        return logits * self.s
