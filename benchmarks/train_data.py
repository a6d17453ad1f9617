"""Training-data throughput: images/s of train.face's RecordIO decode + flip pipeline per DataLoader worker, and
how many workers a GPU step needs.

    python benchmarks/train_data.py [--images 4096] [--batch-size 512] [--workers 0 1 2] [--rounds 3]
        [--step-ms MS] [--model mobileone_112_s0]

Writes a generated RecordIO pack (identities as smooth patterns plus noise, 112x112 JPEGs at quality 95, the
size class of MS1MV3's), then reads it through train.face's own dataset and loader (`train.data.open_dataset`,
`collate`, the DataLoader settings of `train.face`) for each worker count, round-robin over the counts for
--rounds rounds (medians). The per-worker rate is the rate with 1 worker (decoding out of the main process,
as training does).

The step time of S0 at --batch-size on a GPU: measured here when CUDA is available (forward + backward + SGD of
backbone and ArcFace head, bfloat16 autocast, channels_last, the median of 20 steps), else taken from --step-ms;
without either, the table is given for a range of step times. Workers needed = batch / (step time x per-worker
rate), rounded up: a loader slower than that leaves the GPU waiting.

Prints one JSON object.
"""
import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def write_pack(folder: Path, images: int, identities: int = 64) -> Path:
    import io

    import numpy as np
    from PIL import Image

    from train.synthetic import write_rec_pack
    rng = np.random.default_rng(0)
    samples = []
    per = math.ceil(images / identities)
    for label in range(identities):
        base = rng.integers(0, 256, size=(8, 8, 3)).astype(np.uint8)
        pattern = np.asarray(Image.fromarray(base).resize((112, 112), Image.BICUBIC), dtype=np.float32)
        for _ in range(per):
            img = np.clip(pattern + rng.normal(0, 6, size=pattern.shape), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format='JPEG', quality=95)
            samples.append((label, buf.getvalue()))
    return write_rec_pack(folder, samples[:images])


def loader_rate(pack: Path, workers: int, batch_size: int) -> float:
    """Images per second through train.face's loader, over one pass of the pack (worker start-up included)."""
    from train.data import ResumableSampler, collate, open_dataset
    data = open_dataset(pack, (112, 112), flip=True, seed=0)
    sampler = ResumableSampler(data, num_replicas=1, rank=0, seed=0)
    sampler.set_epoch(0, 0)
    data.set_epoch(0)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                         collate_fn=collate, drop_last=True,
                                         generator=torch.Generator().manual_seed(0))
    t0, n = time.perf_counter(), 0
    for images, _, errors in loader:
        assert not errors, errors[0]
        n += len(images)
    return n / (time.perf_counter() - t0)


def gpu_step_ms(model_name: str, batch_size: int, classes: int = 93431) -> float:
    import timm

    import timm_mobileone  # noqa: F401
    from train.margin import MarginHead
    dev = torch.device('cuda')
    model = timm.create_model(model_name, num_classes=0).to(dev, memory_format=torch.channels_last).train()
    head = MarginHead(512, classes).to(dev)
    opt = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=0.01, momentum=0.9)
    x = torch.randn(batch_size, 3, 112, 112, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch_size,), device=dev)
    times = []
    for i in range(30):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast('cuda', dtype=torch.bfloat16):
            emb = model(x)
        loss = head.loss(emb.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        torch.cuda.synchronize()
        if i >= 10:
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--images', type=int, default=16384)
    p.add_argument('-b', '--batch-size', type=int, default=512, help='images per GPU step')
    p.add_argument('--loader-batch', type=int, default=64, help='batch size of the measured loader')
    p.add_argument('--workers', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--step-ms', type=float, default=None, help='GPU step time (default: measured if CUDA is here)')
    p.add_argument('--model', default='mobileone_112_s0')
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        pack = write_pack(Path(tmp) / 'pack', args.images)
        rec_bytes = (pack / 'train.rec').stat().st_size
        rates = {w: [] for w in args.workers}
        for r in range(args.rounds):
            for w in args.workers:  # round-robin: the machine's load drifts alike for every count
                rates[w].append(loader_rate(pack, w, args.loader_batch))
                print(f'round {r + 1}: {w} workers {rates[w][-1]:.0f} images/s', file=sys.stderr)
    median = {w: statistics.median(v) for w, v in rates.items()}
    per_worker = median.get(1) or max(median.values())
    step_source = 'given (--step-ms)'
    step_ms = args.step_ms
    if step_ms is None and torch.cuda.is_available():
        step_ms, step_source = gpu_step_ms(args.model, args.batch_size), f'measured on {torch.cuda.get_device_name()}'
    steps = [step_ms] if step_ms is not None else [25.0, 50.0, 100.0, 200.0]
    need = [dict(step_ms=s, images_per_second=args.batch_size / (s / 1000),
                 workers=math.ceil(args.batch_size / (s / 1000) / per_worker)) for s in steps]
    result = dict(
        images=args.images, mean_jpeg_bytes=round(rec_bytes / args.images), loader_batch=args.loader_batch,
        images_per_second={str(w): round(v, 1) for w, v in median.items()},
        per_worker_images_per_second=round(per_worker, 1), batch_size=args.batch_size,
        step_time=step_source if step_ms is not None else 'not measured (no CUDA here, no --step-ms): a range',
        workers_needed=need, cpu_count=os.cpu_count(), torch=torch.__version__,
        command='python ' + ' '.join(['benchmarks/train_data.py', *(argv if argv is not None else sys.argv[1:])]))
    print(json.dumps(result))
    return result


if __name__ == '__main__':
    main()
