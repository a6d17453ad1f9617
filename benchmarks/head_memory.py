"""Margin-head memory per process: replicated vs sharded (Partial FC), measured on CPU, computed for large C.

    python benchmarks/head_memory.py [--classes 93431 360232] [--worlds 2 4] [--batch 64] [--opt sgd]
        [--compute 93431 360232 2059906 --gpus 8 --gpu-batch 128] [--out DIR]

Measured: for each class count C and world size W, W processes on gloo (CPU) each build their head (W=1: the
replicated `MarginHead`; W>1: `ShardedMarginHead`), take one SGD (momentum) or AdamW step on a random global batch
of W x --batch embeddings, and report the bytes of the head's centres, gradients and optimizer state (tensor sizes,
exact) and the growth of the process's peak RSS over the step (which adds the logits and softmax buffers).

Computed: the same arithmetic for the --compute class counts on --gpus GPUs at --gpu-batch images per GPU: the
replicated head holds C x 512 float32 centres, as many gradients and 1 (SGD momentum) or 2 (AdamW) optimizer
buffers on every GPU, and all-reduces the C x 512 gradient each step; the sharded head holds C/W of each and
all-gathers the N x 512 embeddings instead. Logits are B x C (replicated) or N x C/W (sharded) floats, the same
size, kept about three times (cosines, logits with the margin, softmax for the backward).

Prints one JSON object; writes DIR/head_memory.md (the tables of docs/training.md) when --out is given.
"""
import argparse
import json
import math
import os
import resource
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

EMBED = 512
MB = 1 / 2 ** 20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _worker(rank: int, world: int, classes: int, batch: int, opt: str, init_file: str, out: str) -> None:
    from train.margin import MarginHead
    from train.partial_fc import ShardedMarginHead
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)
        embeddings = torch.randn(batch, EMBED, requires_grad=True)
        labels = torch.randint(0, classes, (batch,))
        before = _peak_mb()
        head = (MarginHead(EMBED, classes) if world == 1 else
                ShardedMarginHead(EMBED, classes, world, rank))
        optimizer = (torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9) if opt == 'sgd' else
                     torch.optim.AdamW(head.parameters(), lr=1e-3))
        loss = head.loss(embeddings, labels)
        loss.backward()
        optimizer.step()
        state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                    if isinstance(t, torch.Tensor) and t.dim() > 0)
        row = dict(classes=classes, world_size=world, rank=rank, kind='replicated' if world == 1 else 'sharded',
                   classes_per_process=head.weight.shape[0],
                   centres_mb=head.weight.numel() * 4 * MB, gradients_mb=head.weight.grad.numel() * 4 * MB,
                   optimizer_state_mb=state * MB, peak_rss_growth_mb=_peak_mb() - before, loss=loss.item())
        Path(out, f'{rank}.json').write_text(json.dumps(row))
    finally:
        if world > 1:
            dist.destroy_process_group()


def measure(classes: int, world: int, batch: int, opt: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, classes, batch, opt, f'{tmp}/init', tmp), nprocs=world)
        rows = [json.loads(Path(tmp, f'{r}.json').read_text()) for r in range(world)]
    worst = max(rows, key=lambda r: r['centres_mb'])  # the largest shard (remainders go to the first ranks)
    worst['peak_rss_growth_mb'] = max(r['peak_rss_growth_mb'] for r in rows)
    worst['held_mb'] = worst['centres_mb'] + worst['gradients_mb'] + worst['optimizer_state_mb']
    return worst


def compute(classes: int, gpus: int, gpu_batch: int, opt: str) -> dict:
    per_state = 2 if opt == 'adamw' else 1
    out = dict(classes=classes, gpus=gpus, batch_per_gpu=gpu_batch)
    for kind, c in (('replicated', classes), ('sharded', math.ceil(classes / gpus))):
        centres = c * EMBED * 4 * MB
        rows = gpu_batch if kind == 'replicated' else gpu_batch * gpus
        out[kind] = dict(classes_per_gpu=c, centres_mb=centres, held_mb=centres * (2 + per_state),
                         logits_mb=rows * c * 4 * MB,
                         communication_mb_per_step=(centres if kind == 'replicated' else
                                                    gpu_batch * gpus * EMBED * 4 * MB))
    return out


def _md(measured, computed, args) -> str:
    lines = [f'Measured ({args.opt}, one step, {args.batch} embeddings per process, CPU / gloo):', '',
             '| classes | processes | head | classes per process | centres MB | + gradients MB | + optimizer MB '
             '| held MB per process | peak RSS growth MB |', '|---|---|---|---|---|---|---|---|---|']
    for r in measured:
        lines.append(f"| {r['classes']:,} | {r['world_size']} | {r['kind']} | {r['classes_per_process']:,} | "
                     f"{r['centres_mb']:.0f} | {r['gradients_mb']:.0f} | {r['optimizer_state_mb']:.0f} | "
                     f"{r['held_mb']:.0f} | {r['peak_rss_growth_mb']:.0f} |")
    lines += ['', f'Computed for {args.gpus} GPUs at {args.gpu_batch} images per GPU ({args.opt}; held = centres + '
              'gradients + optimizer state):', '',
              '| classes | head | classes per GPU | held MB per GPU | logits MB per GPU | sent per step MB |',
              '|---|---|---|---|---|---|']
    for c in computed:
        for kind in ('replicated', 'sharded'):
            k = c[kind]
            lines.append(f"| {c['classes']:,} | {kind} | {k['classes_per_gpu']:,} | {k['held_mb']:,.0f} | "
                         f"{k['logits_mb']:,.0f} | {k['communication_mb_per_step']:,.1f} |")
    return '\n'.join(lines) + '\n'


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--classes', type=int, nargs='+', default=[93431, 360232])
    p.add_argument('--worlds', type=int, nargs='+', default=[1, 2, 4], help='process counts (1: replicated)')
    p.add_argument('--batch', type=int, default=64, help='embeddings per process')
    p.add_argument('--opt', choices=('sgd', 'adamw'), default='sgd')
    p.add_argument('--compute', type=int, nargs='+', default=[93431, 360232, 2059906],
                   help='class counts for the computed table (MS1MV3, Glint360K, WebFace42M)')
    p.add_argument('--gpus', type=int, default=8)
    p.add_argument('--gpu-batch', type=int, default=128)
    p.add_argument('--out', default='', help='write head_memory.md here')
    args = p.parse_args(argv)
    os.environ.setdefault('OMP_NUM_THREADS', '1')
    measured = []
    for classes in args.classes:
        for world in args.worlds:
            row = measure(classes, world, args.batch, args.opt)
            measured.append(row)
            print(f"{classes} classes, {world} process(es): {row['held_mb']:.0f} MB held per process", file=sys.stderr)
    computed = [compute(c, args.gpus, args.gpu_batch, args.opt) for c in args.compute]
    result = dict(measured=measured, computed=computed, torch=torch.__version__, command='python ' + ' '.join(
        ['benchmarks/head_memory.py', *(argv if argv is not None else sys.argv[1:])]))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, 'head_memory.md').write_text(_md(measured, computed, args))
    print(json.dumps(result))
    return result


if __name__ == '__main__':
    main()
