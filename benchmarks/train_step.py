"""Training cost of DBB vs MobileOne blocks: step time and step memory at one batch size, side by side.

    python benchmarks/train_step.py [--models mobileone_112_s0 mobileone_112_dbb_s0 ...] [-b 32] [--steps 5]

A step is forward + backward + SGD step of the backbone and an ArcFace head (train.compare_blocks' measurement:
the same fixed batch for every model, timed round-robin over the models, median). Memory is the peak a step adds
above the steady state (weights, gradients, optimizer buffers), in a fresh process per model (CPU: peak RSS above
the RSS between steps; CUDA: peak allocated). Prints one JSON object and a markdown table with ratios to the first
model of each pair.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.compare_measure import training_cost  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--models', nargs='+', default=['mobileone_112_s0', 'mobileone_112_dbb_s0',
                                                   'mobileone_112_s1', 'mobileone_112_dbb_s1'],
                   help='models, in (MobileOne, DBB) pairs')
    p.add_argument('-b', '--batch-size', type=int, default=32, help='batch size')
    p.add_argument('--steps', type=int, default=5, help='timed steps per model (after one warm-up step)')
    p.add_argument('--num-classes', type=int, default=1000, help='identities of the margin head')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='torch device')
    args = p.parse_args(argv)
    import timm_mobileone  # noqa: F401
    specs = [(m, {}) for m in args.models]
    cost = training_cost(specs, args.batch_size, args.num_classes, torch.device(args.device), args.steps)
    rows = [dict(model=m, **c) for m, c in zip(args.models, cost)]
    print('| model | train params (M) | train GMACs | step (s) | step vs pair | step memory (MB) | memory vs pair |',
          file=sys.stderr)
    print('|---|---:|---:|---:|---:|---:|---:|', file=sys.stderr)
    for i, r in enumerate(rows):
        ref = rows[i - i % 2]
        mem = r['step_memory_mb'] / ref['step_memory_mb'] if r['step_memory_mb'] and ref['step_memory_mb'] else None
        print(f"| {r['model']} | {r['params_m']} | {r['gmacs']} | {r['step_s']} | {r['step_s'] / ref['step_s']:.2f} | "
              f"{r['step_memory_mb']} | {'' if mem is None else f'{mem:.2f}'} |", file=sys.stderr)
    result = dict(batch_size=args.batch_size, steps=args.steps, device=args.device, torch=torch.__version__,
                  threads=torch.get_num_threads(), rows=rows)
    print(json.dumps(result))
    return result


if __name__ == '__main__':
    main()
