"""The distributed parts of train.face: torchrun's process group, and the agreements a sharded head needs (one
gradient norm over every shard, one overflow decision for GradScaler), testable with gloo processes on a CPU."""
import math
import os
from typing import Any, List

import torch
import torch.distributed as dist
import torch.nn as nn

from timm_mobileone.errors import UserError


class World:
    """torchrun's environment: rank, world size, the device of this process."""

    def __init__(self, device: str) -> None:
        self.world_size = int(os.environ.get('WORLD_SIZE', '1'))
        self.rank = int(os.environ.get('RANK', '0'))
        local_rank = int(os.environ.get('LOCAL_RANK', '0'))
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise UserError(f'--device {device}: not a torch device (e.g. cpu, cuda, cuda:1)') from None
        if dev.type == 'cuda':
            if not torch.cuda.is_available():
                raise UserError(f'--device {device}: CUDA is not available on this machine')
            dev = torch.device('cuda', local_rank if self.world_size > 1 else (dev.index or 0))
            torch.cuda.set_device(dev)
        self.device = dev
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group('nccl' if dev.type == 'cuda' else 'gloo')
        self.main = self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def mean(self, value: float) -> float:
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device if self.device.type == 'cuda' else 'cpu')
        dist.all_reduce(t)
        return t.item() / self.world_size

    def gather(self, obj: Any) -> List[Any]:
        if self.world_size == 1:
            return [obj]
        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def clip_grad_norm(net: nn.Module, backbone: nn.Module, head: nn.Module, world: World, sharded: bool,
                   max_norm: float) -> torch.Tensor:
    """The gradient norm of the whole model (clipped to max_norm), as clip_grad_norm_ computes it; with a sharded
    head, the head's part is summed over the processes' shards, so every process clips by the same factor."""
    if not (sharded and world.world_size > 1):
        return nn.utils.clip_grad_norm_(net.parameters(), max_norm)
    grads = lambda module: [p.grad for p in module.parameters() if p.grad is not None]  # noqa: E731
    backbone_norm = nn.utils.get_total_norm(grads(backbone)).to(world.device)
    head_sq = nn.utils.get_total_norm(grads(head)).to(world.device) ** 2
    dist.all_reduce(head_sq)
    total = torch.sqrt(backbone_norm ** 2 + head_sq)
    if math.isfinite(max_norm):
        nn.utils.clip_grads_with_norm_(net.parameters(), max_norm, total)
    return total


def agree_on_overflow(scaler: Any, optimizer: torch.optim.Optimizer, world: World, sharded: bool) -> None:
    """GradScaler skips a step where a gradient overflowed; with a sharded head, an overflow in one process's
    centres must skip the step everywhere, or the backbones would drift apart."""
    if not (sharded and world.world_size > 1):
        return
    state = scaler._per_optimizer_states[id(optimizer)]  # GradScaler keeps no public view of it
    for found in state['found_inf_per_device'].values():
        dist.all_reduce(found, op=dist.ReduceOp.MAX)
