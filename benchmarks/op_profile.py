"""Where the time goes, per operator kind: ONNX Runtime's own profiler on fused S0 and MobileFaceNet at batch 1.

    python benchmarks/op_profile.py [--models mobileone_112_s0,mobilefacenet] [--runs 200] [--out docs/op_profile.md]

Each model (BN statistics calibrated on random batches, fused) is exported to ONNX (fixed batch 1), run `--runs`
times in ONNX Runtime with `enable_profiling`, and the profiler's per-node kernel times (median per node) are summed
by kind, told from each node's shapes: full 3x3 conv, depthwise conv, 1x1 (pointwise) conv, the GDC (7x7
depthwise) conv (each with `+ act` where ORT fused the activation in), PReLU, Add, Gemm. Each kind
gets its share of the kernel time, its MACs (from the graph's shapes) and its GMAC/s, so a reader sees which layers
cost what and which kernels run far below the model's average. Prints one JSON object; `--out` also writes the
markdown table.
"""
import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _shapes(field):
    return [list(d.values())[0] for d in field or []]


def classify(args) -> tuple:
    """(kind, MACs) of one profiled node from ONNX Runtime's event args (op name, input and output shapes): ORT
    renames the nodes it fuses (Conv + Relu = FusedConv), so shapes, not graph names, say what a node computed."""
    op = args.get('op_name', 'other')
    ins, outs = _shapes(args.get('input_type_shape')), _shapes(args.get('output_type_shape'))
    if op in ('Conv', 'FusedConv') and len(ins) >= 2 and len(ins[0]) == 4 and outs:
        w, out = ins[1], outs[0]
        macs = int(np.prod(w)) * out[2] * out[3]
        fused = ' + act' if op == 'FusedConv' else ''
        if w[1] == 1 and ins[0][1] == w[0] > 1:
            kind = 'conv depthwise 7x7 (GDC)' if w[2] == 7 else f'conv depthwise {w[2]}x{w[3]}'
        elif w[2] == w[3] == 1:
            kind = 'conv 1x1 (pointwise)'
        else:
            kind = f'conv {w[2]}x{w[3]} (full)'
        return kind + fused, macs
    if op in ('Gemm', 'MatMul') and len(ins) >= 2:
        return 'gemm', int(np.prod(ins[1]))
    return op.lower(), 0


def profile(name: str, runs: int, tmp: Path):
    import onnxruntime as ort
    import timm
    import torch
    import timm_mobileone  # noqa: F401
    from timm_mobileone.__main__ import _calibrate
    from timm_mobileone.formats import export_onnx
    torch.manual_seed(0)
    model = timm.utils.reparameterize_model(_calibrate(timm.create_model(name), (3, 112, 112)))
    path = str(tmp / f'{name}.onnx')
    export_onnx(model, path)
    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(tmp / name)
    session = ort.InferenceSession(path, opts, providers=['CPUExecutionProvider'])
    x = np.random.default_rng(0).standard_normal((1, 3, 112, 112)).astype(np.float32)
    warmup = 20
    for _ in range(warmup + runs):
        session.run(None, {'input': x})
    trace = json.loads(Path(session.end_profiling()).read_text())
    per_node, node_kind = defaultdict(list), {}
    for ev in trace:
        if ev.get('cat') == 'Node' and ev.get('name', '').endswith('_kernel_time'):
            per_node[ev['name']].append(ev['dur'])
            node_kind[ev['name']] = classify(ev.get('args', {}))
    per_kind = defaultdict(float)  # microseconds per run
    macs_by_kind = defaultdict(int)
    for node, durations in per_node.items():
        kind, macs = node_kind[node]
        per_kind[kind] += float(np.median(durations[warmup:]))  # warm-up runs dropped
        macs_by_kind[kind] += macs
    total_us = sum(per_kind.values())
    rows = [dict(kind=k, us=round(us, 1), share=round(us / total_us, 3), gmacs=macs_by_kind[k] / 1e9,
                 gmac_per_s=round(macs_by_kind[k] / 1e9 / (us / 1e6), 1) if macs_by_kind[k] > 1e4 and us else None)
            for k, us in sorted(per_kind.items(), key=lambda kv: -kv[1])]
    total_macs = sum(macs_by_kind.values())
    return dict(model=name, kernel_ms=round(total_us / 1e3, 3), gmacs=round(total_macs / 1e9, 3),
                gmac_per_s=round(total_macs / 1e9 / (total_us / 1e6), 1), kinds=rows)


def table(results) -> str:
    lines = ['| model | operator kind | ms per run | share | GMACs | GMAC/s |', '|---|---|---:|---:|---:|---:|']
    for r in results:
        for k in r['kinds']:
            lines.append(f"| {r['model']} | {k['kind']} | {k['us'] / 1e3:.3f} | {100 * k['share']:.0f}% | "
                         f"{k['gmacs']:.3f} | {'' if k['gmac_per_s'] is None else k['gmac_per_s']} |")
        lines.append(f"| {r['model']} | **all kernels** | {r['kernel_ms']:.3f} | 100% | {r['gmacs']:.3f} | "
                     f"{r['gmac_per_s']} |")
    return '\n'.join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--models', default='mobileone_112_s0,mobilefacenet')
    p.add_argument('--runs', type=int, default=200)
    p.add_argument('--out', default='')
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        results = [profile(m, args.runs, Path(tmp)) for m in args.models.split(',')]
    md = table(results)
    if args.out:
        Path(args.out).write_text(md + '\n')
    print(json.dumps(dict(results=results, runs=args.runs, command='python benchmarks/op_profile.py ' +
                          ' '.join(sys.argv[1:] if argv is None else argv))))
    print(md, file=sys.stderr)


if __name__ == '__main__':
    main()
