"""The zoo report: `python -m timm_mobileone` prints the mobileone_112 variants' size, fusion error and CPU speed.
For each variant at the pretrained cfg's input size (112x112): params and GMACs of the train-time (multi-branch) and
fused (reparameterized) forms; the max relative error of fused vs train-time in float64 on a batch after calibrating
BN statistics (random-init S4 is chaotic in float32); CPU latency at batch 1 (train-time form in PyTorch eager, fused
form in eager and in ONNX Runtime when installed) and time per image at batch B (fused forms), medians of repeated
runs timed round-robin over every model and form so that load drifts alike. Random weights with calibrated BN
statistics and flush-to-zero denormals: fresh-init MobileOne activations explode, and exploding or denormal values
distort timings. No data, no network.

The default run (the five MobileOne variants, batch B = 16) takes about 100 s and 1.9 GB on a 2-core machine; `--dbb`
adds the DBB family (the train-time forms differ; fused, a DBB model is its MobileOne model), `--peers` the
comparison models, `--train-batch` the train-time form at batch B, and `--full` all three at batch 64 (12.5 minutes
and 7.5 GB peak on the project's 2-core box: the train-time DBB forms at batch 64 dominate). Progress goes to
stderr: a bar on a terminal, a line per step in a log.
`--json` prints one JSON object instead of the table; `--plot` saves latency vs GMACs.

`--runtimes` prints the deploy table instead (deploy/runtimes.py): batch-1 latency of the fused models (default:
the five variants and the reference MobileFaceNet) in PyTorch eager, ONNX Runtime, ExecuTorch XNNPACK FP32 and INT8
and ncnn, timed round-robin over every (model, runtime) pair.
"""
import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import timm
from timm.utils import reparameterize_model

from . import __version__
from .cli import cli, keep_freed_memory_for_reuse, release_freed_memory
from .deploy.formats import FORMATS
from .deploy.profile import count_macs, count_params, fusion_error, time_round_robin
from .deploy.runtimes import eager_calls, onnx_calls
from .errors import UserError, first_line


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    from .deploy.peers import PEERS
    parser = argparse.ArgumentParser(
        prog='python -m timm_mobileone', description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('-m', '--model', action='append', default=None, metavar='NAME',
                        help='variant to report (repeatable); default: the five MobileOne variants')
    parser.add_argument('--dbb', action='store_true', help='add the DBB family mobileone_112_dbb_s0..s4')
    parser.add_argument('--train-batch', action='store_true',
                        help='also time the train-time form at batch --batch-size (the slowest, largest part)')
    parser.add_argument('--full', action='store_true',
                        help='the full sweep: --dbb --peers --train-batch at batch 64 (12.5 minutes and 7.5 GB peak '
                             'on 2 cores)')
    parser.add_argument('--peers', action='store_true', help=f'add the peers: {", ".join(PEERS)}')
    parser.add_argument('--peer', action='append', default=[], choices=sorted(PEERS), help='add one peer (repeatable)')
    parser.add_argument('--sizes-only', action='store_true', help='params and GMACs only: no timing, no fusion check')
    parser.add_argument('--repeats', type=int, default=15, help='timed runs per measurement (median reported)')
    parser.add_argument('-b', '--batch-size', type=int, default=None,
                        help='batch for the per-image throughput time (default 16, 64 with --full: per-image times '
                             'barely change past 16 on CPU, memory grows with the batch)')
    parser.add_argument('--threads', type=int, default=0, help='torch / ORT intra-op threads (0: library default)')
    parser.add_argument('--no-onnx', dest='onnx', action='store_false', help='skip the ONNX Runtime column')
    parser.add_argument('--no-progress', dest='progress', action='store_false', help='no progress bar')
    parser.add_argument('--plot', default='', metavar='PNG', help='save a latency (batch 1) vs GMACs plot')
    parser.add_argument('--json', action='store_true', help='print one JSON object instead of a markdown table')
    parser.add_argument('--runtimes', action='store_true',
                        help='the deploy table: batch-1 latency per runtime (eager, ONNX Runtime, ExecuTorch FP32 '
                             'and INT8, ncnn) of the fused models, interleaved; needs pip install ".[deploy]"')
    args = parser.parse_args(argv)
    if args.full:
        args.dbb = args.peers = args.train_batch = True
    if args.batch_size is None:
        args.batch_size = 64 if args.full else 16
    if args.repeats < 1 or args.batch_size < 1:
        parser.error('--repeats and --batch-size must be >= 1')
    return args


class Progress:
    """Where the run is, on stderr: a tqdm bar on a terminal, one line per step otherwise (a log shows it too)."""

    def __init__(self, total: int, enabled: bool, desc: str = 'zoo') -> None:
        from tqdm import tqdm
        self.total, self.done, self.desc, self.start = total, 0, desc, time.perf_counter()
        self.lines = enabled and total > 0 and not sys.stderr.isatty()
        self.bar = tqdm(total=total, desc=desc, unit='step', file=sys.stderr,
                        disable=not (enabled and total and sys.stderr.isatty()))

    def step(self, what: str) -> None:
        """Say what starts now; counts the previous step as done."""
        if self.lines:
            print(f'{self.desc}: [{self.done + 1}/{self.total}] {time.perf_counter() - self.start:5.0f} s  {what}',
                  file=sys.stderr, flush=True)
        self.bar.set_postfix_str(what)

    def update(self, n: int = 1) -> None:
        self.done += n
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


@torch.no_grad()
def _calibrate(model: torch.nn.Module, input_size, dtype=torch.float32, steps: int = 3, batch: int = 8):
    model.train()
    for _ in range(steps):
        model(torch.randn((batch, *input_size), dtype=dtype))
    return model.eval()


def _onnx_available() -> bool:
    try:
        FORMATS['onnx'].require()
        return True
    except UserError:
        return False


def report_row(name: str, model: torch.nn.Module, args, kind: str, bar: Optional[Progress] = None) -> Dict[str, Any]:
    input_size = tuple(model.pretrained_cfg['input_size'])
    if args.sizes_only:  # BN statistics change no parameter or MAC count: no calibration passes
        model.eval()
    else:
        torch.manual_seed(0)
        _calibrate(model, input_size)
    fused = reparameterize_model(model)
    row: Dict[str, Any] = dict(
        model=name, kind=kind, input_size=input_size,
        params_m=count_params(model) / 1e6, gmacs=count_macs(model, input_size) / 1e9,
        fused_params_m=count_params(fused) / 1e6, fused_gmacs=count_macs(fused, input_size) / 1e9,
    )
    if args.sizes_only:
        return row
    try:
        row['fusion_rel_err_f64'] = fusion_error(model, torch.float64)
    except RuntimeError as e:  # some peers' reparameterization builds float32 tensors whatever the model's dtype
        print(f'warning: {name}: no float64 fusion check ({first_line(e)[:200]})', file=sys.stderr)
        row['fusion_rel_err_f64'] = None
    calls = {}  # timed later, round-robin over every model and form (time_all)
    row['fused_ort_latency_ms'] = row['fused_ort_per_image_ms'] = None
    if args.onnx:  # first: the eager calls below convert their models to channels_last in place (no copies kept)
        if bar is not None:
            bar.step(f'{name}: fused ONNX export')
        try:
            calls['fused_ort'] = onnx_calls(fused, input_size, args.batch_size, args.threads)
        except Exception as e:  # an exporter gap in a peer must not end the report
            print(f'warning: {name}: ONNX export failed ({first_line(e)[:200]})', file=sys.stderr)
        if bar is not None:
            bar.update(1)
    for form, m in (('train_eager', model), ('fused_eager', fused)):
        if bar is not None:
            bar.step(f'{name}: {form.replace("_", " ")}')
        calls[form] = eager_calls(m, input_size, args.batch_size, batched=form != 'train_eager' or args.train_batch)
        if bar is not None:
            bar.update(1)
    row['_calls'] = calls
    return row


def time_all(rows: List[Dict[str, Any]], args, bar: Optional[Progress] = None) -> None:
    """Fill every row's latency (batch 1) and per-image time (batch B) columns, medians: `args.repeats` rounds at
    batch 1, round-robin over every (model, form); a fifth as many (at least 3) at batch B, round-robin over each
    model's forms, one model at a time."""
    ones = {(i, form): c[0] for i, r in enumerate(rows) for form, c in r['_calls'].items()}
    rounds_b = max(3, args.repeats // 5)

    def progress(label: str):
        if bar is None:
            return None
        return lambda k, n: bar.step(f'timing {label}, round {k + 1}/{n}') if k == 0 or (k + 1) % 5 == 0 else None
    t1 = time_round_robin(ones, args.repeats, on_round=progress('batch 1'))
    del ones  # the batch-1 calls hold every model and session: release them before the batched ones grow
    release_freed_memory()
    if bar is not None:
        bar.update(1)
    # Batch B: round-robin over each model's forms, one model at a time, whose calls (models, ONNX Runtime sessions
    # and the arenas they grew) are released before the next: peak memory is one model's, not all of them (about
    # 1 GB per model at batch 64); the forms of a row are compared under the same load, as at batch 1.
    tb: Dict = {}
    for i, r in enumerate(rows):
        batched = {(i, form): c[1] for form, c in r.pop('_calls').items() if c[1] is not None}
        if batched:
            tb.update(time_round_robin(batched, rounds_b, on_round=progress(f'batch {args.batch_size}, {r["model"]}')))
        del batched
        release_freed_memory()  # this model's batched activations and arenas, kept in the heap for reuse until now
    if bar is not None:
        bar.update(1)
    for (i, form), seconds in t1.items():
        rows[i][f'{form}_latency_ms'] = seconds * 1e3
        rows[i][f'{form}_per_image_ms'] = tb[(i, form)] * 1e3 / args.batch_size if (i, form) in tb else None


def _fmt(v, spec):
    return '' if v is None else format(v, spec)


def table(rows: List[Dict[str, Any]]) -> str:
    timed = 'train_eager_latency_ms' in rows[0]
    head = '| model | params (M) train / fused | GMACs train / fused |'
    sep = '|---|---:|---:|'
    if timed:
        head += (' fused vs train rel. err (f64) | batch 1 latency (ms): train eager / fused eager / fused ORT |'
                 ' per image at batch B (ms): train eager / fused eager / fused ORT |')
        sep += '---:|---:|---:|'
    lines = [head, sep]
    for r in rows:
        line = (f"| {r['model']} | {r['params_m']:.2f} / {r['fused_params_m']:.2f} "
                f"| {r['gmacs']:.3f} / {r['fused_gmacs']:.3f} |")
        if timed:
            line += (f" {_fmt(r['fusion_rel_err_f64'], '.1e')} | {r['train_eager_latency_ms']:.2f} / "
                     f"{r['fused_eager_latency_ms']:.2f} / {_fmt(r.get('fused_ort_latency_ms'), '.2f')} | "
                     f"{_fmt(r['train_eager_per_image_ms'], '.2f') or '-'} / {r['fused_eager_per_image_ms']:.2f} / "
                     f"{_fmt(r.get('fused_ort_per_image_ms'), '.2f')} |")
        lines.append(line)
    return '\n'.join(lines)


def plot(rows: List[Dict[str, Any]], path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label, marker in (('train_eager_latency_ms', 'train-time, eager', 'o'),
                               ('fused_eager_latency_ms', 'fused, eager', 's'),
                               ('fused_ort_latency_ms', 'fused, ONNX Runtime', '^')):
        pts = [(r['fused_gmacs'] if 'fused' in key else r['gmacs'], r.get(key), r['model']) for r in rows
               if r.get(key) is not None]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=label)
        if key == 'fused_ort_latency_ms':
            for x, y, name in pts:
                ax.annotate(name.replace('mobileone_112_', ''), (x, y), textcoords='offset points', xytext=(4, 3),
                            fontsize=7)
    ax.set_xlabel('GMACs at 112x112')
    ax.set_ylabel('CPU latency, batch 1 (ms)')
    ax.set_yscale('log')
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title('mobileone_112 and peers: latency vs compute')
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


@cli
def main(argv: Optional[List[str]] = None) -> Dict:
    args = parse_args(argv)
    from .deploy.peers import PEERS, create_peer
    available = timm.list_models('mobileone_112_*')
    # the default rows: S0-S4 (the tiny `_test` members, for tests and smoke runs, only by name)
    names = args.model or [n for n in available if (args.dbb or args.runtimes or '_dbb_' not in n)
                           and not n.endswith('_test')]
    unknown = [n for n in names if n not in available]
    if unknown:
        raise UserError(f'unknown model(s) {", ".join(unknown)}; choose from {", ".join(available)}')
    peers = list(PEERS) if args.peers else list(dict.fromkeys(args.peer))
    if args.runtimes:  # a fused DBB model is the fused MobileOne model of its size: one row each
        names = args.model or [n for n in names if '_dbb_' not in n]
        return _runtimes(args, names, peers or (['mobilefacenet'] if not args.model else []))
    if args.onnx and not args.sizes_only and not _onnx_available():
        print('warning: onnx/onnxruntime/onnxscript not installed: no ONNX Runtime column', file=sys.stderr)
        args.onnx = False
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    steps = 0 if args.sizes_only else (len(names) + len(peers)) * (3 if args.onnx else 2) + 2
    bar = Progress(steps, args.progress)
    rows = []
    try:
        # largest first (timm lists s0..s4): an export's transient peak (about 0.2 GB for S4's ONNX export and
        # session) then comes while little else is held, not on top of every smaller model's calls
        for name in reversed(names):
            rows.insert(0, report_row(name, timm.create_model(name), args, 'mobileone_112', bar))
            release_freed_memory()
        for name in peers:
            model = create_peer(name)
            # peers run at the face crop size, whatever their own cfg says
            model.pretrained_cfg = dict(getattr(model, 'pretrained_cfg', {}), input_size=(3, 112, 112))
            rows.append(report_row(name, model, args, 'peer', bar))
            release_freed_memory()
        if not args.sizes_only:
            # from here on, large freed blocks stay in the heap for the next call (no page faults per batched call;
            # eval's measurements); not before, or every build step's freed peak would stay resident too
            keep_freed_memory_for_reuse()
            time_all(rows, args, bar)
    finally:
        bar.close()
    result = dict(
        models=rows, batch_size=args.batch_size, repeats=args.repeats,
        threads=torch.get_num_threads(),
        versions=dict(timm_mobileone=__version__, timm=timm.__version__, torch=torch.__version__),
    )
    if args.plot and not args.sizes_only:
        plot(rows, args.plot)
    print(json.dumps(result) if args.json else table(rows))
    return result


def _runtimes(args, names: List[str], peers: List[str]) -> Dict:
    """The deploy table (deploy/runtimes.py): every fused model in every runtime installed here, interleaved."""
    from .deploy import runtimes
    from .deploy.peers import create_peer
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    models = []
    for name in names + peers:
        model = timm.create_model(name) if name in names else create_peer(name)
        model.pretrained_cfg = dict(getattr(model, 'pretrained_cfg', {}), input_size=(3, 112, 112))
        torch.manual_seed(0)
        _calibrate(model, (3, 112, 112))
        models.append((name, reparameterize_model(model.eval())))
    out = runtimes.run(models, max(args.repeats, 20))
    table_md = runtimes.table(out['names'], out['medians'], gmacs=out['gmacs'])
    if args.plot:
        runtimes.plot(out['names'], out['medians'], args.plot)
    result = dict(runtimes=out['rows'], repeats=max(args.repeats, 20), threads=torch.get_num_threads(),
                  versions=dict(timm_mobileone=__version__, timm=timm.__version__, torch=torch.__version__,
                                **_runtime_versions()))
    print(json.dumps(result) if args.json else table_md)
    return result


def _runtime_versions(packages: Sequence[str] = ('onnxruntime', 'executorch', 'ncnn', 'pnnx')) -> Dict[str, str]:
    """{package: installed version} of those of `packages` that are installed."""
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for pkg in packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


if __name__ == '__main__':
    main()
