"""Eval pipeline overhead: `python -m eval.lfw` wall time vs the model's forward passes alone, and peak RSS.

Builds an LFW-size insightface pack (6,000 pairs = 12,000 synthetic 112x112 JPEGs, the newer writer) unless --data
is given, then runs, each in its own process so peak RSS is the eval's own:
  1. forward-only: every image decoded up front (untimed), then the same fused model, batches, flip views and
     channels_last as the eval, timing only the forward passes;
  2. the eval: `eval.lfw.main([...])`, decoding JPEGs in DataLoader workers beside the model.
Each is run --repeats times, alternating, and the best kept (shared machines are noisy). The eval's peak RSS is also
measured on a pack 10x smaller: equal figures mean memory does not grow with the pack.
Prints one JSON object: both times, their ratio (target <= 1.15 on a 2-core machine), and peak RSS of each.

    python benchmarks/eval_speed.py [--model mobileone_112_s0] [--num-pairs 6000] [--workers 1] [--batch-size 64]
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_pack(path: Path, num_pairs: int, seed: int = 0) -> None:
    import io
    import pickle
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    bins = []
    for _ in range(2 * num_pairs):
        base = rng.integers(0, 256, size=(15, 15, 3)).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(base).resize((112, 112), Image.BILINEAR).save(buf, format='JPEG', quality=90)
        bins.append(np.frombuffer(buf.getvalue(), dtype=np.uint8).reshape(-1, 1).copy())
    issame = [bool(i % 2) for i in range(num_pairs)]
    with open(path, 'wb') as f:
        pickle.dump((bins, issame), f, protocol=4)


def _calibrated_checkpoint(model_name: str, path: Path) -> None:
    """Random weights with calibrated BN statistics: fresh-init MobileOne activations explode and distort timings."""
    import torch
    import timm
    import timm_mobileone  # noqa: F401
    torch.manual_seed(0)
    model = timm.create_model(model_name).train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(16, 3, 112, 112))
    torch.save(model.state_dict(), path)


def forward_only(args) -> dict:
    """Child process: decode everything first, then time the forward passes the eval would run."""
    import numpy as np
    import torch
    import timm
    import timm_mobileone  # noqa: F401
    from timm_mobileone.verification_data import PairImages, load_verification_set
    from timm_mobileone.cli import keep_freed_memory_for_reuse
    keep_freed_memory_for_reuse()  # as the eval CLI does: both sides run under the same allocator setting
    torch.set_flush_denormal(True)
    ds = load_verification_set(args.data)
    images = PairImages(ds, (112, 112))
    decoded = torch.stack([images[i][1] for i in range(len(images))])
    model = timm.create_model(args.model, checkpoint_path=args.checkpoint).eval()
    model = timm.utils.reparameterize_model(model).to(memory_format=torch.channels_last)
    mean = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)
    seconds = 0.0
    with torch.no_grad():
        for start in range(0, len(decoded), args.batch_size):
            x = (decoded[start:start + args.batch_size].float() / 255 - mean) / mean
            views = torch.cat([x, x.flip(3)]).contiguous(memory_format=torch.channels_last)
            t0 = time.perf_counter()
            out = model(views).numpy()
            seconds += time.perf_counter() - t0
    return dict(seconds=seconds, images=len(decoded), checksum=float(np.abs(out).sum()))


def _child(mode: str, args) -> dict:
    cmd = [sys.executable, __file__, '--child', mode, '--data', str(args.data), '--model', args.model,
           '--checkpoint', str(args.checkpoint), '--batch-size', str(args.batch_size), '--workers', str(args.workers)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f'{mode} run failed:\n{proc.stderr}')
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--model', default='mobileone_112_s0', help='model to evaluate')
    parser.add_argument('--data', default='', help='an existing pack or aligned folder with pairs.txt (real crops: '
                        '../shared/data/lfw_dev; default: build an LFW-size pack of generated crops)')
    parser.add_argument('--num-pairs', type=int, default=6000, help='pairs in the generated pack')
    parser.add_argument('-b', '--batch-size', type=int, default=64, help='images per batch (x2 with flip)')
    parser.add_argument('-j', '--workers', type=int, default=1, help='DataLoader workers of the eval')
    parser.add_argument('--repeats', type=int, default=2, help='alternating runs of each measurement (best kept)')
    parser.add_argument('--small-pairs', type=int, default=600,
                        help='also measure the eval peak RSS on a pack this small (flat memory: about equal); 0: skip')
    parser.add_argument('--checkpoint', default='', help=argparse.SUPPRESS)
    parser.add_argument('--child', default='', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))

    if args.child:
        if args.child == 'forward':
            result = forward_only(args)
        else:
            import torch
            torch.set_flush_denormal(True)
            from eval import lfw
            t0 = time.perf_counter()
            out = lfw.main(['--model', args.model, '--checkpoint', args.checkpoint, '--data', args.data,
                            '--batch-size', str(args.batch_size), '--workers', str(args.workers), '--no-progress',
                            ])
            result = dict(seconds=time.perf_counter() - t0, accuracy=out['accuracy'])
        result['peak_rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return result

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.data:
            t0 = time.perf_counter()
            args.data = tmp / 'lfw_size.bin'
            build_pack(args.data, args.num_pairs)
            print(f'built {args.data} ({args.num_pairs} pairs) in {time.perf_counter() - t0:.1f}s', file=sys.stderr)
        args.checkpoint = tmp / 'model.pth'
        _calibrated_checkpoint(args.model, args.checkpoint)
        # alternate the two measurements and keep each one's best: the machine is shared and noisy
        fwds, evs = [], []
        for _ in range(args.repeats):
            fwds.append(_child('forward', args))
            evs.append(_child('eval', args))
        small = None
        if args.small_pairs:
            full = args.data
            args.data = tmp / 'small.bin'
            build_pack(args.data, args.small_pairs, seed=1)
            small = _child('eval', args)
            args.data = full
    fwd = min(fwds, key=lambda r: r['seconds'])
    ev = min(evs, key=lambda r: r['seconds'])
    result = dict(
        model=args.model, pack=str(args.data), num_images=fwd['images'], batch_size=args.batch_size,
        workers=args.workers, repeats=args.repeats,
        forward_only_s=round(fwd['seconds'], 2), eval_s=round(ev['seconds'], 2),
        ratio=round(ev['seconds'] / fwd['seconds'], 3),
        all_forward_only_s=[round(r['seconds'], 2) for r in fwds], all_eval_s=[round(r['seconds'], 2) for r in evs],
        peak_rss_mb=dict(
            forward_only_predecoded=round(max(r['peak_rss_mb'] for r in fwds), 1),
            eval=round(max(r['peak_rss_mb'] for r in evs), 1),
            eval_small_pack=None if small is None else round(small['peak_rss_mb'], 1)),
        small_pack_pairs=args.small_pairs or None,
        cpu_count=os.cpu_count(),
    )
    print(json.dumps(result))
    return result


if __name__ == '__main__':
    main()
