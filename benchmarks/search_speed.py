"""Exact gallery search (`timm_mobileone.faces.gallery`): queries/s and memory at 10k, 100k and 1M entries.

    python benchmarks/search_speed.py [--sizes 10000,100000,1000000] [--dtypes float16,float32] [--dim 512]

Each gallery is written once (random unit vectors, a planted near-duplicate of each query) under --work, then each
size is searched in a fresh process: the memory figures are that process's own. Printed: one JSON object with per
(size, dtype) rows: seconds to open, queries/s for one query at a time and for a batch of 64, whether the planted
entry came first for every query, peak RSS (VmHWM: file pages of the memory map included, which the kernel drops
under pressure) and the anonymous memory the search added (RssAnon sampled after each search, less its value after
the imports: what the search itself holds).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _status_kb(field: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    return 0


def _make(path: Path, n: int, dim: int, dtype: str, queries: np.ndarray, rows: np.ndarray) -> None:
    from timm_mobileone.faces.gallery import save_gallery
    rng = np.random.default_rng(n)
    e = rng.standard_normal((n, dim), dtype=np.float32)
    e[rows] = queries + 0.05 * rng.standard_normal(queries.shape, dtype=np.float32)  # each query's own match
    save_gallery(path, e, [f'person_{i // 10:06d}/{i:07d}.jpg' for i in range(n)], dict(model='random'), dtype)


def _measure(path: Path, queries: np.ndarray, rows: np.ndarray, k: int, chunk: int) -> dict:
    from timm_mobileone.faces.gallery import open_gallery, search
    base = _status_kb('RssAnon')  # after the imports (torch comes with the package)
    t0 = time.perf_counter()
    g = open_gallery(path, queries.shape[1])
    opened = time.perf_counter() - t0
    anon = [_status_kb('RssAnon')]
    search(g, queries[:1], k, chunk)  # first touch of the pages: its own figure
    t0 = time.perf_counter()
    for q in queries[:16]:
        _, found = search(g, q, k, chunk)
        anon.append(_status_kb('RssAnon'))
    single = 16 / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    _, found = search(g, queries, k, chunk)
    batch = len(queries) / (time.perf_counter() - t0)
    anon.append(_status_kb('RssAnon'))
    return dict(entries=len(g), open_s=round(opened, 4), queries_per_s_single=round(single, 2),
                queries_per_s_batch64=round(batch, 2), planted_first=bool((found[:, 0] == rows).all()),
                peak_rss_mb=round(_status_kb('VmHWM') / 1024, 1), search_anon_mb=round((max(anon) - base) / 1024, 1),
                file_mb=round(path.stat().st_size / 2 ** 20, 1))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--sizes', default='10000,100000,1000000')
    parser.add_argument('--dtypes', default='float16,float32')
    parser.add_argument('--dim', type=int, default=512)
    parser.add_argument('-k', type=int, default=5)
    parser.add_argument('--chunk', type=int, default=32768)
    parser.add_argument('--work', default='', help='folder for the gallery files (default: a temp folder)')
    parser.add_argument('--measure', nargs=2, metavar=('FILE', 'QUERIES'), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        data = np.load(args.measure[1])
        print(json.dumps(_measure(Path(args.measure[0]), data['queries'], data['rows'], args.k, args.chunk)))
        return None
    work = Path(args.work or tempfile.mkdtemp(prefix='search-speed-'))
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((64, args.dim), dtype=np.float32)
    rows_out = []
    for n in (int(s) for s in args.sizes.split(',')):
        rows = np.sort(rng.choice(n, size=len(queries), replace=False))
        np.savez(work / 'queries.npz', queries=queries, rows=rows)
        for dtype in args.dtypes.split(','):
            path = work / f'gallery_{n}_{dtype}.npz'
            t0 = time.perf_counter()
            _make(path, n, args.dim, dtype, queries, rows)
            written = time.perf_counter() - t0
            proc = subprocess.run([sys.executable, __file__, '--measure', str(path), str(work / 'queries.npz'),
                                   '-k', str(args.k), '--chunk', str(args.chunk)], capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(proc.stderr)
            row = dict(json.loads(proc.stdout), dtype=dtype, write_s=round(written, 1))
            rows_out.append(row)
            print(json.dumps(row), file=sys.stderr)
            path.unlink()
    result = dict(rows=rows_out, dim=args.dim, k=args.k, chunk=args.chunk, cpu_count=os.cpu_count(),
                  command='python benchmarks/search_speed.py ' + ' '.join(sys.argv[1:] if argv is None else argv))
    print(json.dumps(result))
    return result


if __name__ == '__main__':
    main()
