"""The sharded margin head (Partial FC on torch.distributed) against the replicated one, on gloo with 2 and 3
processes, and AdaFace against a transcription of its authors' head."""
import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from train.step import FaceTrainModel
from train.margin import KINDS, MarginHead
from train.partial_fc import ShardedMarginHead, shard_range
from helpers import forkserver

EMBED, CLASSES, BATCH = 16, 7, 4  # 7 classes: shards of 4+3 (2 processes) and 3+2+2 (3 processes)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def _backbone() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, EMBED))


def _batch(world: int):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(world * BATCH, 3, 8, 8, generator=g)
    labels = torch.randint(0, CLASSES, (world * BATCH,), generator=g)
    labels[:CLASSES] = torch.arange(CLASSES)  # every class a positive somewhere
    return images, labels


def _compare(rank: int, world: int, kind: str) -> dict:
    """One step of each head kind on the same global batch: the sharded loss, backbone gradients and centre
    gradients against the replicated head under DDP (whose loss is the mean of the processes' losses)."""
    DDP = nn.parallel.DistributedDataParallel
    torch.manual_seed(0)
    backbone, full = _backbone(), MarginHead(EMBED, CLASSES, kind=kind)
    images, labels = _batch(world)
    mine = slice(rank * BATCH, (rank + 1) * BATCH)

    replicated = FaceTrainModel(copy.deepcopy(backbone), copy.deepcopy(full))
    ddp_r = DDP(replicated)  # held: DDP's gradient hooks die with the wrapper
    loss_r = ddp_r(images[mine], labels[mine])
    loss_r.backward()
    global_loss = loss_r.detach().clone()
    dist.all_reduce(global_loss)
    global_loss /= world

    head = ShardedMarginHead(EMBED, CLASSES, world, rank, kind=kind)
    own = slice(head.class_start, head.class_start + head.num_local)
    with torch.no_grad():
        head.weight.copy_(full.weight[own])
    sharded_backbone = copy.deepcopy(backbone)
    ddp_s = FaceTrainModel(DDP(sharded_backbone), head)
    loss_s = ddp_s(images[mine], labels[mine])
    loss_s.backward()

    # the logged / clipped gradient norm: the shards' parts summed over processes, as the whole replicated head's
    from train.distributed import clip_grad_norm
    norm_r = nn.utils.clip_grad_norm_(replicated.parameters(), float('inf'))
    cpu_world = SimpleNamespace(world_size=world, device=torch.device('cpu'))
    norm_s = clip_grad_norm(ddp_s, sharded_backbone, head, cpu_world, sharded=True, max_norm=float('inf'))
    err = dict(loss=_rel(loss_s.detach(), global_loss), grad_norm=_rel(norm_s, norm_r),
               backbone=max(_rel(q.grad, p.grad) for p, q in zip(replicated.backbone.parameters(),
                                                                   sharded_backbone.parameters())),
               centres=_rel(head.weight.grad, replicated.head.weight.grad[own]))
    if kind == 'adaface':  # the feature-norm EMA: over the global batch on both kinds
        err['norm_stats'] = max(_rel(head.batch_mean, replicated.head.batch_mean),
                                _rel(head.batch_std, replicated.head.batch_std))
        err['norm_stats_moved'] = abs(head.batch_mean.item() - 20.0)
    return err


def _sampled(rank: int, world: int) -> dict:
    """sample_rate 0.5 with class 0 the only positive: each shard scores ceil(0.5 * its classes) centres, shard 0
    always class 0 among them; the loss is the same on every process; unsampled centres get no gradient."""
    torch.manual_seed(10 + rank)  # the processes draw different samples
    head = ShardedMarginHead(EMBED, CLASSES, world, rank, sample_rate=0.5)
    images, _ = _batch(world)
    emb = nn.Linear(3 * 8 * 8, EMBED)(images.flatten(1))[rank * BATCH:(rank + 1) * BATCH]
    loss = head.loss(emb, torch.zeros(BATCH, dtype=torch.long))
    loss.backward()
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, loss.detach())
    touched = (head.weight.grad.abs().sum(1) > 0).tolist()
    return dict(same_loss=all(x.item() == losses[0].item() for x in losses), finite=math.isfinite(loss.item()),
                touched=touched, num_sample=head.num_sample)


def _overflow(rank: int, world: int) -> bool:
    """GradScaler: an overflow in the last process's centres skips the step on every process."""
    from train.distributed import agree_on_overflow
    head = ShardedMarginHead(EMBED, CLASSES, world, rank)
    optimizer = torch.optim.SGD(head.parameters(), lr=1.0)
    scaler = torch.amp.GradScaler('cpu')
    scaler.scale(head.loss(torch.randn(BATCH, EMBED), torch.zeros(BATCH, dtype=torch.long))).backward()
    if rank == world - 1:
        head.weight.grad[0, 0] = float('inf')
    scaler.unscale_(optimizer)
    agree_on_overflow(scaler, optimizer, SimpleNamespace(world_size=world), sharded=True)
    before = head.weight.detach().clone()
    scaler.step(optimizer)
    return torch.equal(before, head.weight.detach())


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # as torchrun's workers (OMP_NUM_THREADS=1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    try:
        result = {kind: _compare(rank, world, kind) for kind in KINDS}
        result['sampled'] = _sampled(rank, world)
        result['overflow_skipped'] = _overflow(rank, world)
        with open(f'{out_dir}/{rank}.json', 'w') as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize('world', [2, 3])
def test_sharded_head_equals_the_replicated_head(world, tmp_path):
    # from a forkserver, not spawned: the processes under test are gloo ranks, not Python starts (a spawned rank
    # re-imports torch)
    forkserver('torch', 'train.partial_fc', 'train.step')
    mp.start_processes(_worker, args=(world, str(tmp_path / 'init'), str(tmp_path)), nprocs=world,
                       start_method='forkserver')
    for rank in range(world):
        result = json.loads((tmp_path / f'{rank}.json').read_text())
        for kind in KINDS:
            err = result[kind]
            assert max(err['loss'], err['backbone'], err['centres'], err['grad_norm']) <= 1e-5, (rank, kind, err)
        assert result['adaface']['norm_stats'] <= 1e-6 and result['adaface']['norm_stats_moved'] > 0
        assert result['overflow_skipped']
        sampled = result['sampled']
        assert sampled['same_loss'] and sampled['finite']
        assert sum(sampled['touched']) == sampled['num_sample'] == math.ceil(0.5 * len(sampled['touched']))
        assert rank != 0 or sampled['touched'][0]  # the positive is always scored


def test_shards_cover_every_class_once():
    for classes, world in [(7, 2), (7, 3), (10, 4), (93_431, 8), (5, 5)]:
        ranges = [shard_range(classes, world, r) for r in range(world)]
        assert [s for s, _ in ranges] == [sum(n for _, n in ranges[:r]) for r in range(world)]
        assert sum(n for _, n in ranges) == classes and max(n for _, n in ranges) - min(n for _, n in ranges) <= 1
    with pytest.raises(ValueError, match='cannot be sharded'):
        ShardedMarginHead(EMBED, 3, world_size=4, rank=0)


class _AuthorsAdaFace(nn.Module):
    """The AdaFace head of the authors' code (mk-minchul/AdaFace, head.py), transcribed: kernel (D, C), the
    embeddings already normalized and their norms passed in, cosines clamped to 1e-3, EMA of the norm statistics."""

    def __init__(self, kernel, m=0.4, h=0.333, s=64., t_alpha=0.01):
        super().__init__()
        self.kernel = kernel
        self.m, self.eps, self.h, self.s, self.t_alpha = m, 1e-3, h, s, t_alpha
        self.register_buffer('batch_mean', torch.ones(1) * 20)
        self.register_buffer('batch_std', torch.ones(1) * 100)

    def forward(self, embeddings, norms, label):
        kernel_norm = self.kernel / torch.norm(self.kernel, 2, 0, True)
        cosine = torch.mm(embeddings, kernel_norm).clamp(-1 + self.eps, 1 - self.eps)
        safe_norms = torch.clip(norms, min=0.001, max=100).clone().detach()
        with torch.no_grad():
            mean, std = safe_norms.mean().detach(), safe_norms.std().detach()
            self.batch_mean = mean * self.t_alpha + (1 - self.t_alpha) * self.batch_mean
            self.batch_std = std * self.t_alpha + (1 - self.t_alpha) * self.batch_std
        margin_scaler = torch.clip((safe_norms - self.batch_mean) / (self.batch_std + self.eps) * self.h, -1, 1)
        m_arc = torch.zeros(label.size()[0], cosine.size()[1])
        m_arc.scatter_(1, label.reshape(-1, 1), 1.0)
        m_arc = m_arc * (self.m * margin_scaler * -1)
        theta_m = torch.clip(cosine.acos() + m_arc, min=self.eps, max=math.pi - self.eps)
        cosine = theta_m.cos()
        m_cos = torch.zeros(label.size()[0], cosine.size()[1])
        m_cos.scatter_(1, label.reshape(-1, 1), 1.0)
        cosine = cosine - m_cos * (self.m + (self.m * margin_scaler))
        return cosine * self.s


@pytest.mark.parametrize('head_cls', [MarginHead, ShardedMarginHead])
def test_adaface_margin_is_the_papers(head_cls):
    """Logits equal to the authors' head over several steps (the EMA moving), with norms spread wide enough that
    the margin scaler is clipped at both ends."""
    torch.manual_seed(0)
    default = head_cls(EMBED, CLASSES, kind='adaface')
    assert (default.m, default.h, default.s, default.t_alpha) == (0.4, 0.333, 64.0, 0.01)
    ours = head_cls(EMBED, CLASSES, kind='adaface', h=1.0, t_alpha=0.9)
    ref = _AuthorsAdaFace(ours.weight.detach().t().clone(), h=1.0, t_alpha=0.9)
    for step in range(4):
        raw = torch.randn(12, EMBED) * torch.logspace(-1.5, 2.5, 12).view(-1, 1)  # norms ~0.1 .. 1,300
        labels = torch.randint(0, CLASSES, (12,))
        norms = torch.norm(raw, 2, 1, True)
        expected = ref(raw / norms, norms, labels)
        logits, _ = ours(raw, labels)  # one process: the sharded head's one shard holds every class
        target = torch.zeros_like(expected, dtype=torch.bool).scatter(1, labels.view(-1, 1), True)
        torch.testing.assert_close(logits[target], expected[target], rtol=1e-5, atol=1e-4)
        # the others: cos(acos(c)) in the authors' code, c here (equal up to rounding)
        torch.testing.assert_close(logits[~target], expected[~target], rtol=0, atol=1e-3)
        torch.testing.assert_close(ours.batch_mean, ref.batch_mean)
        torch.testing.assert_close(ours.batch_std, ref.batch_std)
    scaler = (norms.clamp(0.001, 100) - ref.batch_mean) / (ref.batch_std + 1e-3)
    assert scaler.max() > 1  # the clip of the margin scaler is exercised


def test_partial_fc_samples_the_batch_classes_plus_random_others():
    torch.manual_seed(0)
    head = MarginHead(16, 100, sample_rate=0.1)
    labels = torch.tensor([3, 97, 3, 50])
    emb = torch.randn(4, 16)
    logits, targets = head(emb, labels)
    assert logits.shape == (4, 10)
    index, remapped = head.sample(labels)
    assert {3, 50, 97} <= set(index.tolist()) and len(index) == 10
    torch.manual_seed(1)
    logits, targets = head(emb, labels)
    torch.manual_seed(1)
    index, _ = head.sample(labels)
    assert torch.equal(index[targets], labels)  # the remapped labels point at the true classes
    full = MarginHead(16, 100, sample_rate=0.1).eval()
    assert full(emb, labels)[0].shape == (4, 100)  # eval mode scores every centre
    logits.sum().backward()
    untouched = torch.ones(100, dtype=torch.bool)
    untouched[index] = False
    assert head.weight.grad[untouched].abs().sum() == 0 and head.weight.grad[index].abs().sum() > 0
