"""eval.ijb at scale on this machine: images/s and peak memory on a generated IJB-C-style set.

    python benchmarks/eval_ijb.py --images 20000 [--model mobileone_112_s0] [--pairs 15658489] [--root DIR]

1. writes a synthetic IJB-C folder of about --images loose crops (eval.ijb_synthetic; reused if --root has one),
2. runs `python -m eval.ijb` on it in a subprocess (fused model, flip test, --save-features): images/s, the eval
   process's peak RSS and the largest peak RSS of any process of the run (the eval or a decoding worker),
3. with --pairs N, scores the saved features against N random template pairs (IJB-C has 15,658,489), to show that
   reading and scoring a full-size pair list keeps memory flat.

Prints one JSON object. Figures depend on the machine; compare runs made on one machine.
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _run_eval(argv):
    """Run eval.ijb in a fresh process; (its JSON, wall seconds, largest peak RSS in MB of it and its workers)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, '-m', 'eval.ijb', *argv], cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f'eval.ijb failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}')
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return json.loads(proc.stdout), wall, (peak if peak > before else None)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--images', type=int, default=20000)
    parser.add_argument('--model', default='mobileone_112_s0')
    parser.add_argument('-b', '--batch-size', type=int, default=64)
    parser.add_argument('-j', '--workers', type=int, default=None, help='eval.ijb --workers (default: its own)')
    parser.add_argument('--pairs', type=int, default=0, help='also score this many random template pairs')
    parser.add_argument('--root', default='', help='keep the generated folder here (reused when present)')
    args = parser.parse_args(argv)
    from eval import ijb_synthetic

    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix='ijb-bench-'))
    meta = root / 'IJBC' / 'meta' / 'ijbc_face_tid_mid.txt'
    t0 = time.perf_counter()
    if not meta.is_file():
        print(f'writing about {args.images} images under {root} ...', file=sys.stderr)
        ijb_synthetic.write_synthetic_ijb(root, 'IJBC', identities=max(2, round(args.images / 16)),
                                          templates_per_identity=4, impostor_ratio=20.0)
    gen_s = time.perf_counter() - t0
    feats = root / 'features.npy'
    flags = ['--data-dir', str(root), '--model', args.model, '-b', str(args.batch_size), '--no-progress',
             '--save-features', str(feats)]
    if args.workers is not None:
        flags += ['--workers', str(args.workers)]
    print('embedding ...', file=sys.stderr)
    res, wall, peak = _run_eval(flags)
    out = dict(
        machine=dict(cpu=platform.processor() or platform.machine(), cores=os.cpu_count()),
        command='python benchmarks/eval_ijb.py ' + ' '.join(sys.argv[1:] if argv is None else argv),
        generate_seconds=round(gen_s, 1),
        model=args.model, num_images=res['num_images'], num_templates=res['num_templates'],
        num_media=res['num_media'], num_pairs=res['num_pairs'], batch_size=args.batch_size,
        images_per_second=res['images_per_second'], forward_seconds=res['forward_seconds'],
        eval_seconds=round(wall, 1), eval_peak_rss_mb=res['peak_rss_mb'],
        largest_process_peak_rss_mb=None if peak is None else round(peak / 1024, 1),
        tar_at_far_1e_4=res['tar_at_far']['1e-4'],
    )
    if args.pairs:
        # a full-size pair list over the same templates: only the pair file changes, the features are reused
        templates = np.unique(np.loadtxt(meta, dtype=str, usecols=1).astype(np.int64))
        rng = np.random.default_rng(0)
        big = root / 'big' / 'IJBC'
        (big / 'meta').mkdir(parents=True, exist_ok=True)
        for name in ('ijbc_face_tid_mid.txt', 'ijbc_name_5pts_score.txt'):
            target = big / 'meta' / name
            if not target.exists():
                os.symlink(root / 'IJBC' / 'meta' / name, target)
        pairs_file = big / 'meta' / 'ijbc_template_pair_label.txt'
        print(f'writing {args.pairs} pairs ...', file=sys.stderr)
        with open(pairs_file, 'w') as f:
            for s in range(0, args.pairs, 1_000_000):
                n = min(1_000_000, args.pairs - s)
                block = np.stack([rng.choice(templates, n), rng.choice(templates, n), rng.random(n) < 0.012], 1)
                np.savetxt(f, block.astype(np.int64), fmt='%d')
        print('scoring ...', file=sys.stderr)
        res2, wall2, _ = _run_eval(['--data-dir', str(big.parent), '--features', str(feats)])
        out.update(big_pairs=res2['num_pairs'], big_eval_seconds=round(wall2, 1),
                   big_scoring_seconds=res2['scoring_seconds'], big_eval_peak_rss_mb=res2['peak_rss_mb'])
    print(json.dumps(out))
    return out


if __name__ == '__main__':
    main()
