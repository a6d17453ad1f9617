"""A class-sharded margin head on torch.distributed: Partial FC (An et al. 2022, https://arxiv.org/abs/2203.15565).

With W processes, process r holds the class centres `[start_r, start_r + n_r)` (`shard_range`: C // W each, the
remainder spread over the first ranks), and only their gradients and optimizer state. Each step:

1. the embeddings and labels of every process are all-gathered (the embeddings with a gradient path back to every
   process's backbone: the backward is a reduce-scatter);
2. each process scores the global batch against its own centres (optionally a `sample_rate` sample of them, the
   global batch's positives always kept) and applies the margin to the targets it owns;
3. the softmax cross-entropy spans all shards: each row's max and sum of exponentials are all-reduced, so the loss
   is the global batch's mean, identical on every process, and each shard's logit gradient is
   `(softmax - onehot) / N` without any process materialising all C logits.

With `sample_rate` 1 this is the same loss and the same gradients as the replicated head (`margin.MarginHead`
under DistributedDataParallel), up to float32 rounding (tests/test_partial_fc.py checks 2 and 3 processes on gloo).
The head's parameters, gradients and optimizer state per process are 1/W of the replicated head's; the logits
are N x C/W instead of B x C (N = W x B the global batch).

insightface's `recognition/arcface_torch/partial_fc_v2.py` is the reference implementation; this one reuses the
project's margins (`MarginLoss`, so ArcFace, CosFace and AdaFace work on both head kinds) and torch.distributed's
collectives. The two autograd functions are written here because torch's autograd-aware all_gather
(`torch.distributed.nn.functional`) is deprecated and its replacement lives in a private module, and because
the distributed cross-entropy needs the max/sum reductions in its forward and none in its backward.
"""
import math
from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from .margin import MarginLoss, all_gather_single as _all_gather_single, all_rows, sample_classes


def shard_range(num_classes: int, world_size: int, rank: int) -> Tuple[int, int]:
    """(first class, number of classes) of process `rank`'s shard; remainders go to the first ranks."""
    base, extra = divmod(num_classes, world_size)
    return rank * base + min(rank, extra), base + (1 if rank < extra else 0)


# torch 2.14 renamed the tensor collectives (the old names warn); older releases have only the old ones
_reduce_scatter_single = getattr(dist, 'reduce_scatter_single', None) or dist.reduce_scatter_tensor


def _distributed(world_size: int) -> bool:
    return world_size > 1 and dist.is_available() and dist.is_initialized()


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0; the backward reduce-scatters (sums every process's gradient for these rows) and
    scales by `grad_scale`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, world_size: int, grad_scale: float) -> torch.Tensor:
        ctx.world_size, ctx.grad_scale = world_size, grad_scale
        out = x.new_empty((world_size * x.shape[0], *x.shape[1:]))
        _all_gather_single(out, x.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = grad.new_empty((grad.shape[0] // ctx.world_size, *grad.shape[1:]))
        _reduce_scatter_single(out, grad.contiguous(), op=dist.ReduceOp.SUM)
        return out * ctx.grad_scale, None, None


class _ShardedCrossEntropy(torch.autograd.Function):
    """Mean softmax cross-entropy over logits split by columns across processes.

    `target` holds each row's target column in this shard, or -1 where another process owns it. Forward: the
    row max and sum of exponentials are all-reduced (MAX, SUM), as is the target logit (zero elsewhere).
    Backward: `(softmax - onehot) / N` for this shard's columns, no communication.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, world_size: int) -> torch.Tensor:
        distributed = _distributed(world_size)
        row_max = logits.max(dim=1, keepdim=True).values
        if distributed:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX)
        prob = (logits - row_max).exp_()
        row_sum = prob.sum(dim=1, keepdim=True)
        owned = torch.nonzero(target >= 0).squeeze(1)
        target_logit = torch.zeros_like(row_max)
        target_logit[owned] = logits[owned, target[owned]].unsqueeze(1)
        if distributed:
            dist.all_reduce(row_sum, op=dist.ReduceOp.SUM)
            dist.all_reduce(target_logit, op=dist.ReduceOp.SUM)
        prob.div_(row_sum)
        ctx.save_for_backward(prob, owned, target)
        return (row_sum.log() + row_max - target_logit).mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        prob, owned, target = ctx.saved_tensors
        out = prob.clone()
        out[owned, target[owned]] -= 1.0
        return out.mul_(grad / prob.shape[0]), None, None


class ShardedMarginHead(MarginLoss):
    """This process's slice of the class centres; `loss(embeddings, labels)` is the global batch's mean margin
    cross-entropy, the same on every process.

    `embeddings` and `labels` are this process's batch (the same size on every process). The gradient reaching
    the local embeddings is multiplied by the world size, because DistributedDataParallel then averages the
    backbone gradients over processes while this loss is already the global mean (as insightface does).
    With one process (or no process group) it is a single shard holding every class.
    """

    def __init__(self, embed_dim: int, num_classes: int, world_size: int = 1, rank: int = 0, kind: str = 'arcface',
                 s: float = 64.0, m: Optional[float] = None, sample_rate: float = 1.0, h: float = 0.333,
                 t_alpha: float = 0.01) -> None:
        super().__init__(kind, s, m, sample_rate, h, t_alpha)
        if num_classes < max(2, world_size):
            raise ValueError(f'{num_classes} classes cannot be sharded over {world_size} processes (each shard '
                             f'needs a class, and a margin head 2 in all)')
        self.num_classes, self.world_size, self.rank = num_classes, world_size, rank
        self.class_start, self.num_local = shard_range(num_classes, world_size, rank)
        self.num_sample = max(1, math.ceil(sample_rate * self.num_local))
        self.weight = nn.Parameter(torch.empty(self.num_local, embed_dim))
        nn.init.normal_(self.weight, std=0.01)

    def extra_repr(self) -> str:
        return (f'kind={self.kind}, classes [{self.class_start}, {self.class_start + self.num_local}) of '
                f'{self.num_classes}, shard {self.rank} of {self.world_size}, sample_rate={self.sample_rate}')

    def local_targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Global labels -> columns of this shard, -1 where another shard owns the class."""
        local = labels - self.class_start
        return torch.where((local >= 0) & (local < self.num_local), local, torch.full_like(local, -1))

    def sample(self, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Partial FC within the shard: (sampled columns, targets remapped into them, -1 kept)."""
        owned = target >= 0
        index = sample_classes(self.num_local, self.num_sample, torch.unique(target[owned]))
        return index, torch.where(owned, torch.searchsorted(index, target.clamp(min=0)), target)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(scaled logits of the global batch against this shard's centres, each row's target column or -1)."""
        if _distributed(self.world_size):
            embeddings = _GatherRows.apply(embeddings, self.world_size, float(self.world_size))
            labels = all_rows(labels)
        target = self.local_targets(labels)
        weight = self.weight
        if self.training and self.sample_rate < 1.0:
            index, target = self.sample(target)
            weight = weight[index]
        cos = self.cosine(embeddings, weight)
        norms = self.feature_norms(embeddings)  # of the global batch
        if norms is not None and self.training:
            self.update_norm_stats(norms)
        rows = torch.nonzero(target >= 0).squeeze(1)
        cols = target[rows]
        with_margin = self.target_logit(cos[rows, cols], None if norms is None else norms[rows])
        return cos.index_put((rows, cols), with_margin) * self.s, target

    def loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return _ShardedCrossEntropy.apply(*self(embeddings, labels), self.world_size)
