"""Where the time goes, per operator kind: each runtime's own profiler on fused S0 and MobileFaceNet at batch 1.

    python benchmarks/op_profile.py [--runtime onnx|executorch] [--int8] [--models mobileone_112_s0,mobilefacenet]
                                    [--runs 200] [--out docs/op_profile.md]

Each model (BN statistics calibrated on random batches, fused) is exported (fixed batch 1) and run `--runs` times
after 20 warm-up runs, and the profiler's per-operator times (median per operator over the timed runs) are summed by
kind, told from each operator's shapes: full 3x3 conv, depthwise conv, 1x1 (pointwise) conv, the GDC (7x7
depthwise) conv, PReLU, Add, Gemm.

- `--runtime onnx`: ONNX Runtime's profiler (`enable_profiling`); shapes come with each event (ORT renames the
  nodes it fuses: Conv + Relu = FusedConv, `+ act` in the kind).
- `--runtime executorch`: ExecuTorch's ETDump (`enable_etdump`), read with `executorch.devtools.Inspector`: one
  event per XNNPACK operator. XNNPACK names the kernel it ran ("Convolution (NHWC, F32) DWConv", "Fully Connected
  (NC, QS8, QC8W) GEMM": a 1x1 conv runs as a GEMM); the shapes come from the model's own conv and linear layers,
  matched in execution order, and the kernel XNNPACK chose is kept beside the kind.
- `--int8`: the INT8 model (ORT: static QDQ, as `export --int8`; ExecuTorch: PT2E), calibrated on random inputs:
  its timing counts, its accuracy does not.

Each kind gets its share of the time, its MACs and its GMAC/s, so a reader sees which layers cost what and which
kernels run far below the model's average. Prints one JSON object; `--out` also writes the markdown table.
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


def conv_kind(w_shape, in_channels: int) -> str:
    """The kind of a conv from its weight shape (out, in/groups, kh, kw) and its input channels."""
    if w_shape[1] == 1 and in_channels == w_shape[0] > 1:
        return 'conv depthwise 7x7 (GDC)' if w_shape[2] == 7 else f'conv depthwise {w_shape[2]}x{w_shape[3]}'
    if w_shape[2] == w_shape[3] == 1:
        return 'conv 1x1 (pointwise)'
    return f'conv {w_shape[2]}x{w_shape[3]} (full)'


def classify(args) -> tuple:
    """(kind, MACs) of one profiled node from ONNX Runtime's event args (op name, input and output shapes): ORT
    renames the nodes it fuses (Conv + Relu = FusedConv), so shapes, not graph names, say what a node computed."""
    op = args.get('op_name', 'other')
    ins, outs = _shapes(args.get('input_type_shape')), _shapes(args.get('output_type_shape'))
    if op in ('Conv', 'FusedConv') and len(ins) >= 2 and len(ins[0]) == 4 and outs:
        w, out = ins[1], outs[0]
        return conv_kind(w, ins[0][1]) + (' + act' if op == 'FusedConv' else ''), int(np.prod(w)) * out[2] * out[3]
    if op in ('Gemm', 'MatMul') and len(ins) >= 2:
        return 'gemm', int(np.prod(ins[1]))
    if op in ('QLinearConv', 'QGemm'):  # INT8: prepacked weights carry no shape here; matched by order instead
        return None
    return op.lower(), 0


def fused_model(name: str):
    import timm
    import torch
    import timm_mobileone  # noqa: F401
    from timm_mobileone.__main__ import _calibrate
    torch.manual_seed(0)
    return timm.utils.reparameterize_model(_calibrate(timm.create_model(name), (3, 112, 112))).eval()


def summarize(name: str, per_op):
    """per_op: [(kind, microseconds per run, MACs)] -> the model's row of kinds."""
    per_kind, macs_by_kind = defaultdict(float), defaultdict(int)
    for kind, us, macs in per_op:
        per_kind[kind] += us
        macs_by_kind[kind] += macs
    total_us = sum(per_kind.values())
    rows = [dict(kind=k, us=round(us, 1), share=round(us / total_us, 3), gmacs=macs_by_kind[k] / 1e9,
                 gmac_per_s=round(macs_by_kind[k] / 1e9 / (us / 1e6), 1) if macs_by_kind[k] > 1e4 and us else None)
            for k, us in sorted(per_kind.items(), key=lambda kv: -kv[1])]
    total_macs = sum(macs_by_kind.values())
    return dict(model=name, kernel_ms=round(total_us / 1e3, 3), gmacs=round(total_macs / 1e9, 3),
                gmac_per_s=round(total_macs / 1e9 / (total_us / 1e6), 1), kinds=rows)


def layers_in_order(model, x):
    """[(kind, MACs)] of every Conv2d and Linear, in the order the forward pass calls them."""
    import torch
    out, hooks = [], []

    def hook(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d):
            w = list(module.weight.shape)
            out.append((conv_kind(w, inputs[0].shape[1]), int(np.prod(w)) * output.shape[2] * output.shape[3]))
        else:
            out.append(('gemm', module.in_features * module.out_features))
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return out


def profile_executorch(name: str, runs: int, tmp: Path, int8: bool = False):
    import re
    import torch
    from executorch.devtools import Inspector
    from executorch.runtime import Runtime
    from timm_mobileone.deploy.formats import export_executorch, quiet
    model = fused_model(name)
    x = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    calib = torch.randn(16, 3, 112, 112, generator=torch.Generator().manual_seed(1)).numpy() if int8 else None
    path = tmp / f'{name}.pte'
    with quiet():
        export_executorch(model, path, x, calib)
    program = Runtime.get().load_program(str(path), enable_etdump=True)
    method = program.load_method('forward')
    warmup = 20
    for _ in range(warmup + runs):
        method.execute([x])
    program.write_etdump_result_to_file(str(tmp / f'{name}.etdp'), str(tmp / f'{name}.debug'))
    with quiet():
        frame = Inspector(etdump_path=str(tmp / f'{name}.etdp')).to_dataframe()
    events = [(row.event_name, float(np.median(row.raw[warmup:])) * 1e3) for row in frame.itertuples()
              if row.event_block_name == 'Execute' and row.event_name not in ('DELEGATE_CALL', 'Method::execute')]
    is_compute = [ev.startswith(('Convolution', 'Fully Connected')) for ev, _ in events]
    layers = layers_in_order(model, x)
    matched = iter(layers) if sum(is_compute) == len(layers) else None  # the model's layers, in execution order
    per_op = []
    for (ev, us), compute in zip(events, is_compute):
        kernel = re.sub(r' #\d+$', '', ev)
        if compute and matched is not None:
            kind, macs = next(matched)
            per_op.append((f'{kind} [{kernel.split(") ")[-1]}]', us, macs))
        else:
            per_op.append((kernel, us, 0))
    return summarize(name, per_op)


def profile(name: str, runs: int, tmp: Path, int8: bool = False):
    import onnxruntime as ort
    import torch
    from timm_mobileone.deploy.formats import export_onnx, quantize_int8
    model = fused_model(name)
    path = str(tmp / f'{name}.onnx')
    export_onnx(model, path)
    if int8:
        calib = np.random.default_rng(1).standard_normal((16, 3, 112, 112)).astype(np.float32)
        quantize_int8(path, path.replace('.onnx', '_int8.onnx'), calib)
        path = path.replace('.onnx', '_int8.onnx')
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
    int8_nodes = [n for n, k in node_kind.items() if k is None]  # in execution order (the trace's first run)
    if int8_nodes:
        layers = layers_in_order(model, torch.from_numpy(x))
        if len(layers) != len(int8_nodes):
            layers = [('int8 compute', 0)] * len(int8_nodes)
        for n, (kind, macs) in zip(int8_nodes, layers):
            node_kind[n] = (f'{kind} int8', macs)
    # (kind, microseconds per run: the median over the timed runs, MACs) per node
    return summarize(name, [(node_kind[n][0], float(np.median(d[warmup:])), node_kind[n][1])
                            for n, d in per_node.items()])


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
    p.add_argument('--runtime', choices=('onnx', 'executorch'), default='onnx')
    p.add_argument('--int8', action='store_true', help='profile the INT8 model (ORT: static QDQ; ExecuTorch: PT2E)')
    p.add_argument('--models', default='mobileone_112_s0,mobilefacenet')
    p.add_argument('--runs', type=int, default=200)
    p.add_argument('--out', default='')
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.runtime == 'executorch':
            results = [profile_executorch(m, args.runs, Path(tmp), args.int8) for m in args.models.split(',')]
        else:
            results = [profile(m, args.runs, Path(tmp), args.int8) for m in args.models.split(',')]
    md = table(results)
    if args.out:
        Path(args.out).write_text(md + '\n')
    command = 'python benchmarks/op_profile.py ' + ' '.join(sys.argv[1:] if argv is None else argv)
    print(json.dumps(dict(results=results, runs=args.runs, runtime=args.runtime, int8=args.int8, command=command)))
    print(md, file=sys.stderr)


if __name__ == '__main__':
    main()
