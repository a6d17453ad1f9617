"""The deploy table: batch-1 latency of the fused models in every runtime installed here, side by side.

`python -m timm_mobileone --runtimes [-m NAME ...] [--peer mobilefacenet] [--repeats N] [--plot PNG] [--json]`

For each model (default: the five fused mobileone_112 variants and the reference MobileFaceNet): BN statistics
calibrated on random inputs (as the zoo report), fused, then exported to each column: PyTorch eager (channels_last),
then every precision each entry of `formats.FORMATS` lists in its `timed` (today: ONNX Runtime FP32 and INT8 (static
QDQ), ExecuTorch XNNPACK FP32 and INT8 (PT2E), ncnn FP32 with its fp16 options off; the INT8 models are calibrated on
random inputs: the timing needs no data, and the accuracy of these INT8 models means nothing). Then every (model,
runtime) pair is timed one call at a time, round-robin over all pairs for `--repeats` rounds, each call after a pause
and 30 ms of warm-up calls (`profile.time_round_robin`), and the median is reported: the machine's load drifts
alike for every column. A runtime that is not installed or whose export fails is a blank cell with a warning line.
"""
import copy
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..errors import first_line
from .formats import FORMATS, ExportOptions, quiet
from .profile import count_macs, time_round_robin

# the columns: PyTorch eager, then every (format, precision) that formats.FORMATS says the table times
COLUMNS = {'eager': (None, 'fp32'), **{f.column(p): (f, p) for f in FORMATS.values() for p in f.timed}}
RUNTIMES = tuple(COLUMNS)
LABELS = {c: 'PyTorch eager' if f is None else f.label(p) for c, (f, p) in COLUMNS.items()}


def eager_calls(model: torch.nn.Module, input_size, batch_size: int, batched: bool = True):
    """(batch-1 call, batch-`batch_size` call or None without `batched`) of `model` in eager, channels_last
    (faster on CPU), the batch-1 call warmed up."""
    model = model.eval().to(memory_format=torch.channels_last)
    x1 = torch.randn((1, *input_size)).contiguous(memory_format=torch.channels_last)
    xb = torch.randn((batch_size, *input_size)).contiguous(memory_format=torch.channels_last) if batched else None

    @torch.no_grad()
    def one():
        return model(x1)

    @torch.no_grad()
    def many():
        return model(xb)
    one()  # the batched call is warmed by time_round_robin's first untimed call, when its turn comes
    return one, (many if batched else None)


def onnx_calls(model: torch.nn.Module, input_size, batch_size: int, threads: int = 0, dynamic_batch: bool = True):
    """The same two calls in ONNX Runtime (an export of `model`; a fixed batch-1 graph without `dynamic_batch`,
    whose batch-`batch_size` call is then the batch-1 call), the batch-1 call warmed up."""
    from .formats import export_onnx, ort_run, ort_session
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / 'model.onnx')
        model.pretrained_cfg = dict(getattr(model, 'pretrained_cfg', {}), input_size=tuple(input_size))
        export_onnx(model, path, dynamic_batch=dynamic_batch)
        session = ort_session(path, threads)  # the session holds the model: the file may go
    x1 = np.random.randn(1, *input_size).astype(np.float32)
    xb = np.random.randn(batch_size if dynamic_batch else 1, *input_size).astype(np.float32)
    one, many = (lambda: ort_run(session, x1)), (lambda: ort_run(session, xb))
    one()  # not many(): ORT's arena would grow to batch size now and hold it through every other measurement
    return one, many


def _runner(column: str, fused: torch.nn.Module, x: torch.Tensor, tmp: Path) -> Callable[[], Any]:
    """A zero-argument call that runs `x` (batch 1) through `fused` exported to `column`'s format and precision."""
    fmt, precision = COLUMNS[column]
    if fmt is None:  # a copy: eager_calls converts its model to channels_last in place
        return eager_calls(copy.deepcopy(fused), tuple(x.shape[1:]), 1)[0]
    fmt.require()
    int8 = precision == 'int8'
    calib = torch.randn((16, *x.shape[1:]), generator=torch.Generator().manual_seed(1)).numpy() if int8 else None
    path = tmp / f'model{fmt.suffix}'
    fmt.export(copy.deepcopy(fused), path, x, ExportOptions(int8=int8, calib=calib))
    if int8 and fmt.int8_beside is not None:  # ONNX: the INT8 model is a second file, quantized from the FP32 one
        from .formats import quantize_int8
        quantize_int8(str(path), str(tmp / f'model_int8{fmt.suffix}'), calib)
        path = tmp / f'model_int8{fmt.suffix}'
    run = fmt.runner(str(path))
    xn = x.numpy()
    return lambda: run(xn)


def build(models: List[Tuple[str, torch.nn.Module]], runtimes=RUNTIMES, tmp: Path = None) -> Dict[Tuple[str, str],
                                                                                                   Callable]:
    """{(model, runtime): call} for every pair that exports and runs here; failures warn and are left out."""
    calls = {}
    for name, fused in models:
        x = torch.randn((1, *fused.pretrained_cfg['input_size']), generator=torch.Generator().manual_seed(0))
        for runtime in runtimes:
            where = Path(tmp) / f'{name}_{runtime}'
            where.mkdir(parents=True)
            try:
                with quiet():
                    call = _runner(runtime, fused, x, where)
                    call()  # warm-up (and the first call's one-time setup)
                calls[(name, runtime)] = call
            except Exception as e:  # an optional runtime missing, or an exporter gap in a peer
                print(f'warning: {name} / {LABELS[runtime]}: {first_line(e)[:200]}', file=sys.stderr)
    return calls


def table(models: List[str], medians: Dict[Tuple[str, str], float], runtimes=RUNTIMES,
          gmacs: Optional[Dict[str, float]] = None) -> str:
    """Markdown: batch-1 ms per runtime (with the model's GMACs per second of it, when `gmacs` is given)."""
    unit = 'ms (GMAC/s)' if gmacs else 'ms'
    lines = ['| model | ' + ('GMACs | ' if gmacs else '') + ' | '.join(f'{LABELS[r]} {unit}' for r in runtimes) +
             ' | fastest | fastest vs eager |', '|---|' + '---:|' * (len(runtimes) + 2 + bool(gmacs))]
    for name in models:
        cells = {r: medians.get((name, r)) for r in runtimes}
        timed = {r: v for r, v in cells.items() if v is not None}
        best = min(timed, key=timed.get) if timed else None
        ratio = (timed[best] / timed['eager']) if best and 'eager' in timed else None

        def cell(v):
            if v is None:
                return ''
            return f'{v * 1e3:.2f}' + (f' ({gmacs[name] / v:.0f})' if gmacs else '')
        lines.append(f'| {name} | ' + (f'{gmacs[name]:.3f} | ' if gmacs else '') +
                     ' | '.join(cell(v) for v in cells.values()) +
                     f' | {LABELS[best] if best else ""} | {"" if ratio is None else f"{ratio:.2f}x"} |')
    return '\n'.join(lines)


def plot(models: List[str], medians: Dict[Tuple[str, str], float], path: str, runtimes=RUNTIMES) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(runtimes)
    for i, r in enumerate(runtimes):
        ys = [medians.get((m, r), np.nan) * 1e3 for m in models]
        ax.bar(np.arange(len(models)) + i * width, ys, width, label=LABELS[r])
    ax.set_xticks(np.arange(len(models)) + 0.4 - width / 2, models, rotation=20, ha='right')
    ax.set_ylabel('batch-1 latency, median (ms)')
    ax.set_yscale('log')
    ax.legend(fontsize=8)
    ax.set_title('Fused models per runtime (CPU, interleaved)')
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(models: List[Tuple[str, torch.nn.Module]], repeats: int) -> Dict[str, Any]:
    """Build every (model, runtime) call, time them round-robin; rows carry ms and GMAC/s (the fused model's
    multiply-accumulates per second of median latency: efficiency, comparable across models of other sizes)."""
    gmacs = {n: count_macs(m, tuple(m.pretrained_cfg['input_size'])) / 1e9 for n, m in models}
    with tempfile.TemporaryDirectory() as tmp:
        calls = build(models, tmp=Path(tmp))
        medians = time_round_robin(calls, repeats)
    names = [n for n, _ in models]
    rows = [dict(model=n, gmacs=gmacs[n],
                 **{f'{r}_ms': (medians[(n, r)] * 1e3 if (n, r) in medians else None) for r in RUNTIMES},
                 **{f'{r}_gmac_per_s': (gmacs[n] / medians[(n, r)] if (n, r) in medians else None) for r in RUNTIMES})
            for n in names]
    return dict(rows=rows, names=names, medians=medians, gmacs=gmacs)
