"""The MobileOne paper's latency analysis (arXiv 2206.04040, Section 3, Tables 1-3), redone for 112x112 face
backbones on the runtimes this project exports to, written to docs/latency_analysis.md.

    python benchmarks/latency_analysis.py                 # the whole analysis (2-core CPU: under 15 minutes)
    python benchmarks/latency_analysis.py --quick         # a short version (under 3 minutes)
    python benchmarks/latency_analysis.py --out /tmp/la.md --figures /tmp   # elsewhere (the doc stays as it is)
    python benchmarks/latency_analysis.py --runtimes eager,cuda_b1,cuda_b256 --no-memory \
        --out docs/latency_analysis_gpu.md       # on a GPU machine: no exports, sized for under 5 minutes

1. Correlation. A zoo of mobile backbones at 112x112, random weights with BatchNorm statistics calibrated on random
   inputs, every reparameterizable one fused (MobileOne-112 S0-S4, MobileFaceNet, and timm's MobileNetV2/V3/V4,
   GhostNet, EfficientNet-B0, LCNet, RepVGG-A0, FastViT-T8, EdgeNeXt, MobileViTv2, RegNetX, ResNet-18, RepViT and
   timm's ImageNet MobileOne-S0, each with its own head and no classifier). Parameters and multiply-accumulates
   (torch.utils.flop_counter, convs and matmuls, as the zoo report counts them); batch-1 latency in PyTorch eager
   (channels_last), ONNX Runtime and ExecuTorch XNNPACK, and on CUDA at batch 1 and 256 where a GPU is present;
   the Spearman rank correlation of latency with MACs and with parameters per runtime, a bootstrap interval over
   the models (2,000 resamples) and scipy's p-value; a scatter plot per runtime.
2. Activations. Fused MobileOne-112-S0 with its activation swapped (ReLU, ReLU6, PReLU, GELU, SiLU, Hardswish) and
   ReLU with squeeze-excite in every block.
3. Blocks. S0 fused; with squeeze-excite in every block; fused with an explicit residual add around every block
   whose input and output shapes match (the skip connection the paper times); train-time, branches alive; and
   train-time without its BN skip branch. Latency per runtime and the peak memory of a process that loads the
   model and runs it (VmHWM growth over VmRSS before loading, in a fresh process per cell, batch 1 and 32).

Every latency is a median of round-robin rounds (`timm_mobileone.deploy.profile.time_round_robin`: every cell is
timed once per round, after a pause and 30 ms of warm-up calls, so the shared machine's load drifts alike for all);
each section is one round-robin. Every row carries its ratio to MobileOne-112-S0 (fused, ReLU) in the same runtime
and run, so tables from different machines compare. Progress on stderr; one JSON object on stdout.
"""
import argparse
import copy
import json
import multiprocessing
import platform
import re
import sys
import tempfile
import time
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

INPUT = (3, 112, 112)
BASE = 'mobileone_112_s0'
# (name, family) in table order; the first six are this project's models
ZOO = [('mobileone_112_s0', 'MobileOne-112'), ('mobileone_112_s1', 'MobileOne-112'),
       ('mobileone_112_s2', 'MobileOne-112'), ('mobileone_112_s3', 'MobileOne-112'),
       ('mobileone_112_s4', 'MobileOne-112'), ('mobilefacenet', 'MobileFaceNet'),
       ('mobilenetv2_100', 'MobileNetV2'), ('mobilenetv3_large_100', 'MobileNetV3'),
       ('mobilenetv4_conv_small', 'MobileNetV4'), ('ghostnet_100', 'GhostNet'), ('efficientnet_b0', 'EfficientNet'),
       ('lcnet_100', 'LCNet'), ('repvgg_a0', 'RepVGG'), ('fastvit_t8', 'FastViT'), ('edgenext_xx_small', 'EdgeNeXt'),
       ('mobilevitv2_050', 'MobileViTv2'), ('regnetx_002', 'RegNetX'), ('resnet18', 'ResNet'),
       ('repvit_m0_9', 'RepViT'), ('mobileone_s0', 'MobileOne (timm, ImageNet)')]
QUICK_ZOO = ['mobileone_112_s0', 'mobileone_112_s1', 'mobileone_112_s4', 'mobilefacenet', 'mobilenetv2_100',
             'mobilenetv3_large_100', 'ghostnet_100', 'lcnet_100', 'resnet18', 'regnetx_002']
ACTS = [('ReLU', 'relu'), ('ReLU6', 'relu6'), ('PReLU', 'prelu'), ('GELU', 'gelu'), ('SiLU', 'silu'),
        ('Hardswish', 'hard_swish')]
# the paper's figures (arXiv 2206.04040, Table 1): Spearman rho of latency with FLOPs / parameters
PAPER_RHO = {'iPhone 12 (Core ML)': (0.47, 0.30), 'desktop CPU': (0.06, 0.07)}
RUNTIME_LABELS = {'eager': 'PyTorch eager', 'onnx_fp32': 'ONNX Runtime', 'executorch_fp32': 'ExecuTorch XNNPACK',
                  'cuda_b1': 'CUDA eager, batch 1', 'cuda_b256': 'CUDA eager, batch 256 (per image)'}


def log(msg: str) -> None:
    print(f'[{time.strftime("%H:%M:%S")}] {msg}', file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------------------
# models


def calibrate(model: nn.Module) -> nn.Module:
    """BatchNorm statistics from random inputs (fresh-init statistics make outputs explode and denormals slow), as
    the zoo report and the deploy table calibrate theirs (3 batches of 8)."""
    from timm_mobileone.__main__ import _calibrate
    return _calibrate(model, INPUT)


def fused(model: nn.Module) -> nn.Module:
    from timm.utils import reparameterize_model
    return reparameterize_model(calibrate(model))


def zoo_model(name: str) -> nn.Module:
    import timm
    import timm_mobileone  # noqa: F401
    from timm_mobileone.deploy.peers import create_peer
    model = create_peer('mobilefacenet') if name == 'mobilefacenet' else timm.create_model(name, num_classes=0)
    model.pretrained_cfg = dict(getattr(model, 'pretrained_cfg', {}), input_size=INPUT)
    return model


def accept_any_ops(models: Sequence[Tuple[str, nn.Module]]) -> None:
    for _, model in models:
        model.deploy_onnx_ops = AnyOps()


def s0(act: str = 'relu', se: bool = False, inference: bool = False) -> nn.Module:
    """MobileOne-112-S0 (train-time unless `inference`) with another activation and/or SE in every block."""
    from timm_mobileone.models.mobileone_112 import MobileOne112, model_cfgs
    cfg = model_cfgs[BASE]
    if se:
        cfg = replace(cfg, blocks=tuple(tuple(replace(b, attn_layer='se') for b in stage) for stage in cfg.blocks))
    model = MobileOne112(replace(cfg, act_layer=act), inference_mode=inference)
    model.pretrained_cfg = dict(input_size=INPUT)
    return model


class Residual(nn.Module):
    """`block(x) + x`: an explicit skip connection around a block (the paper's Table 3 cost)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x) + x


def with_skips(model: nn.Module) -> nn.Module:
    """Every block of `model.stages` whose output shape is its input's, wrapped in `Residual`."""
    x = torch.randn((1, *INPUT))
    with torch.no_grad():
        x = model.stem(x)
        for stage in model.stages:
            for i, block in enumerate(list(stage)):
                y = block(x)
                if y.shape == x.shape:
                    stage[i] = Residual(block)
                x = y
    return model


def without_bn_skip(model: nn.Module) -> nn.Module:
    """Train-time S0 with every block's BN skip (identity) branch removed."""
    for m in model.modules():
        if getattr(m, 'identity', None) is not None and hasattr(m, 'conv_kxk'):
            m.identity = None
    return model


BLOCKS: Dict[str, Callable[[], nn.Module]] = {
    'S0 fused': lambda: fused(s0()),
    'S0 fused + SE': lambda: fused(s0(se=True)),
    'S0 fused + skip adds': lambda: with_skips(fused(s0())),
    'S0 train-time (branches)': lambda: calibrate(s0()),
    'S0 train-time, no BN skip': lambda: calibrate(without_bn_skip(s0())),
}


def block_variant(name: str) -> nn.Module:
    torch.manual_seed(0)  # the same weights in the timing process and in each memory process
    return BLOCKS[name]()


class AnyOps:
    """`model.deploy_onnx_ops` accepting every ONNX op. The project's ONNX export checks that a fused MobileOne graph
    holds nothing but fused ops; this analysis times other graphs on purpose (peers' residual adds and activations,
    train-time branches, explicit skips), so the check does not apply here."""

    def __rsub__(self, ops):
        return set()


# ------------------------------------------------------------------------------------------------------------------
# timing


BLANKS: List[str] = []  # 'model / runtime: why' of every cell that could not be built


class Tee:
    """stderr, also kept line by line."""

    def __enter__(self):
        self.stream, self.lines, self.buf = sys.stderr, [], ''
        sys.stderr = self
        return self

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.buf += text
        *done, self.buf = self.buf.split('\n')
        self.lines.extend(done)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def __exit__(self, *exc) -> None:
        sys.stderr = self.stream


def cuda_calls(models: Sequence[Tuple[str, nn.Module]], batch: int, key: str) -> Dict[Tuple[str, str], Callable]:
    """Eager CUDA calls (float32, channels_last, synchronized) at `batch`; {(name, key): call}."""
    calls = {}
    for name, model in models:
        m = copy.deepcopy(model).cuda().eval().to(memory_format=torch.channels_last)
        x = torch.randn((batch, *INPUT), device='cuda').contiguous(memory_format=torch.channels_last)

        @torch.no_grad()
        def call(m=m, x=x):
            m(x)
            torch.cuda.synchronize()
        for _ in range(3):
            call()
        calls[(name, key)] = call
    return calls


def time_cells(models: Sequence[Tuple[str, nn.Module]], runtimes: Sequence[str], repeats: int, tmp: Path,
               what: str) -> Tuple[Dict[Tuple[str, str], float], Dict[Tuple[str, str], Path]]:
    """Median seconds of every (model, runtime) cell, one round-robin; and the exported files (for memory)."""
    from timm_mobileone.deploy import runtimes as rt
    from timm_mobileone.deploy.profile import time_round_robin
    cpu = [r for r in runtimes if r in rt.COLUMNS]
    t0 = time.perf_counter()
    accept_any_ops(models)
    log(f'{what}: exporting {len(models)} models to {", ".join(cpu)}')
    with Tee() as tee:  # runtimes.build warns of each cell it cannot build: the doc lists them
        calls = rt.build(list(models), runtimes=cpu, tmp=tmp)
    BLANKS.extend(line[len('warning: '):] for line in tee.lines if line.startswith('warning: '))
    if 'cuda_b1' in runtimes:
        calls.update(cuda_calls(models, 1, 'cuda_b1'))
    if 'cuda_b256' in runtimes:
        calls.update(cuda_calls(models, 256, 'cuda_b256'))
    log(f'{what}: {len(calls)} cells built in {time.perf_counter() - t0:.0f} s; timing {repeats} rounds')
    medians = time_round_robin(calls, repeats, on_round=lambda k, n: log(f'{what}: round {k + 1}/{n}')
                               if k % max(1, n // 4) == 0 else None)
    for (name, key), v in list(medians.items()):
        if key == 'cuda_b256':
            medians[(name, key)] = v / 256  # per image
    files = {}
    for name, _ in models:
        for r in cpu:
            fmt = rt.COLUMNS[r][0]
            if fmt is not None:
                path = tmp / f'{name}_{r}' / f'model{fmt.suffix}'
                if path.is_file():
                    files[(name, r)] = path
    return medians, files


# ------------------------------------------------------------------------------------------------------------------
# memory: a fresh process per cell


def _status() -> Dict[str, int]:
    text = Path('/proc/self/status').read_text()
    return {k: int(re.search(rf'{k}:\s+(\d+)', text).group(1)) for k in ('VmRSS', 'VmHWM')}


def _memory_child(runtime: str, path: str, batch: int, threads: int, queue) -> None:
    try:
        torch.set_num_threads(threads)
        torch.set_flush_denormal(True)
        from timm_mobileone.deploy import formats
        if runtime == 'onnx_fp32':
            import onnxruntime  # noqa: F401  (imported before the baseline: its import is not the model's cost)
        if runtime == 'executorch_fp32':
            from executorch.runtime import Runtime  # noqa: F401
        x = torch.randn((batch, *INPUT))
        Path('/proc/self/clear_refs').write_text('5')  # VmHWM := VmRSS
        before = _status()['VmRSS']
        if runtime == 'onnx_fp32':
            run, xn = formats.onnx_runner(path, threads), x.numpy()

            def call():
                return run(xn)
        elif runtime == 'executorch_fp32':
            run, xn = formats.executorch_runner(path), x.numpy()

            def call():
                return run(xn)
        for _ in range(5):
            call()
        queue.put(dict(peak_mb=(_status()['VmHWM'] - before) / 1024))
    except Exception as e:  # reported as a blank cell
        queue.put(dict(error=f'{type(e).__name__}: {str(e)[:200]}'))


@torch.no_grad()
def eager_memory(model: nn.Module, batch: int) -> float:
    """MB of weights plus the peak of live tensor bytes during one eager forward (channels_last), from the torch
    profiler's allocation records in time order: the allocator's caching and the heap's layout do not enter. (A
    process's peak RSS, tried first, put S0 above S0 with squeeze-excite at batch 32, 124 vs 101 MB: the heap's
    doing, not the model's.)"""
    from torch.profiler import ProfilerActivity, profile
    model = model.eval().to(memory_format=torch.channels_last)
    x = torch.randn((batch, *INPUT)).contiguous(memory_format=torch.channels_last)
    model(x)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(x)
    live = peak = 0
    for _, size in sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()
                          if e.self_cpu_memory_usage):
        live += size
        peak = max(peak, live)
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return (weights + peak) / 2 ** 20


def peak_memory(cells: Dict[Tuple[str, str], Any], batches: Sequence[int], threads: int,
                what: str) -> Dict[Tuple[str, str, int], float]:
    ctx = multiprocessing.get_context('spawn')
    out = {}
    for i, ((name, runtime), path) in enumerate(cells.items()):
        for b in batches:
            queue = ctx.Queue()
            p = ctx.Process(target=_memory_child, args=(runtime, str(path), b, threads, queue))
            p.start()
            result = queue.get(timeout=300)
            p.join()
            if 'error' in result:
                log(f'{what}: memory of {name} / {runtime} at batch {b}: {result["error"]}')
                continue
            out[(name, runtime, b)] = result['peak_mb']
        log(f'{what}: memory {i + 1}/{len(cells)}')
    return out


# ------------------------------------------------------------------------------------------------------------------
# statistics


def spearman(x: Sequence[float], y: Sequence[float], boots: int = 2000, seed: int = 0) -> Dict[str, float]:
    """Spearman rho, scipy's p-value, and a 95 % percentile bootstrap interval over resampled models."""
    from scipy.stats import spearmanr
    x, y = np.asarray(x, float), np.asarray(y, float)
    rho, p = spearmanr(x, y)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(boots):
        i = rng.integers(0, len(x), len(x))
        if len(set(x[i])) > 1 and len(set(y[i])) > 1:
            samples.append(spearmanr(x[i], y[i])[0])
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return dict(rho=float(rho), p=float(p), lo=float(lo), hi=float(hi), n=len(x))


# ------------------------------------------------------------------------------------------------------------------
# the doc


def to_ms(med: Dict, name: str, runtimes: Sequence[str]) -> Dict[str, Optional[float]]:
    """{runtime: milliseconds or None} of one model from the seconds of its cells."""
    return {r: med[(name, r)] * 1e3 if (name, r) in med else None for r in runtimes}


def ms(v: Optional[float]) -> str:
    return '' if v is None else f'{v * 1e3:.2f}'


def ratio(v: Optional[float], base: Optional[float]) -> str:
    return '' if v is None or not base else f'{v / base:.2f}x'


def latency_table(labels: Sequence[str], runtimes: Sequence[str], med: Dict, base: str,
                  lead: Dict[str, Sequence[str]], lead_head: Sequence[str]) -> str:
    """Markdown rows of `labels`: each runtime's ms and its ratio to the row `base` (S0 in its section's form)."""
    head = ['model', *lead_head] + [f'{RUNTIME_LABELS[r]} ms (vs S0)' for r in runtimes]
    lines = ['| ' + ' | '.join(head) + ' |', '|---|' + '---:|' * (len(head) - 1)]
    for name in labels:
        cells = [f'{ms(med.get((name, r)))} ({ratio(med.get((name, r)), med.get((base, r)))})'
                 if med.get((name, r)) is not None else '' for r in runtimes]
        lines.append('| ' + ' | '.join([name, *lead[name], *cells]) + ' |')
    return '\n'.join(lines)


def scatter(rows: List[Dict[str, Any]], runtimes: Sequence[str], stats: Dict, path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(runtimes), 2, figsize=(11, 3.6 * len(runtimes)), squeeze=False)
    for i, r in enumerate(runtimes):
        for j, (key, label) in enumerate((('gmacs', 'GMACs'), ('params_m', 'parameters (M)'))):
            ax = axes[i][j]
            pts = [(row[key], row['ms'][r], row['model']) for row in rows if row['ms'].get(r) is not None]
            for x, y, name in pts:
                ours = name.startswith('mobileone_112') or name == 'mobilefacenet'
                ax.scatter(x, y, c='tab:red' if ours else 'tab:blue', s=22)
                ax.annotate(name.replace('mobileone_112_', 'mo112_'), (x, y), fontsize=6, alpha=0.8)
            ax.set_xscale('log')
            ax.set_yscale('log')
            s = stats[r]['gmacs' if key == 'gmacs' else 'params']
            ax.set_title(f'{RUNTIME_LABELS[r]}: rho {s["rho"]:.2f} [{s["lo"]:.2f}, {s["hi"]:.2f}]', fontsize=9)
            ax.set_xlabel(label)
            ax.set_ylabel('batch-1 latency (ms)' if r != 'cuda_b256' else 'ms per image')
            ax.grid(alpha=0.3, which='both')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def machine() -> str:
    cpu = platform.processor() or ''
    try:
        cpu = re.search(r'model name\s*:\s*(.*)', Path('/proc/cpuinfo').read_text()).group(1)
    except (OSError, AttributeError):
        pass
    gpu = f', {torch.cuda.get_device_name(0)}' if torch.cuda.is_available() else ''
    return f'{cpu} ({multiprocessing.cpu_count()} cores), {torch.get_num_threads()} torch threads{gpu}'


# ------------------------------------------------------------------------------------------------------------------


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--quick', action='store_true', help='10 models, eager and ONNX Runtime, fewer rounds')
    p.add_argument('--repeats', type=int, default=None, help='round-robin rounds (default 15, --quick 5)')
    p.add_argument('--threads', type=int, default=0, help='torch and ONNX Runtime threads (0: torch\'s default)')
    p.add_argument('--out', type=Path, default=REPO / 'docs' / 'latency_analysis.md', help='the doc to write')
    p.add_argument('--figures', type=Path, default=None, help='folder of the figures (default: the doc\'s)')
    p.add_argument('--no-memory', dest='memory', action='store_false', help='skip the peak-memory cells')
    p.add_argument('--runtimes', default='', help='comma-separated subset of ' + ','.join(RUNTIME_LABELS) +
                   ' (default: eager, ONNX Runtime, ExecuTorch, and both CUDA columns where a GPU is present)')
    args = p.parse_args(argv)
    if args.runtimes:
        args.runtimes = args.runtimes.split(',')
        bad = [r for r in args.runtimes if r not in RUNTIME_LABELS]
        if bad:
            p.error(f'--runtimes: unknown {bad[0]!r} (choose from {", ".join(RUNTIME_LABELS)})')
        if any(r.startswith('cuda') for r in args.runtimes) and not torch.cuda.is_available():
            p.error('--runtimes: the CUDA columns need a GPU')

    if args.repeats is not None and args.repeats < 3:
        p.error('--repeats must be >= 3')
    return args


def write_doc(result, rows, stats, med, act_med, block_med, memory, runtimes, size, bsize, figures, args,
              argv_text) -> str:
    cmd = f'python benchmarks/latency_analysis.py {argv_text}'.strip()
    vers = ', '.join(f'{k} {v}' for k, v in result['versions'].items())
    fig = Path(figures / f'{args.out.stem}_zoo.png')
    try:
        fig_ref = fig.relative_to(args.out.parent)
    except ValueError:
        fig_ref = fig
    cpu_rt = [r for r in runtimes if not r.startswith('cuda')]
    out = [
        '# Latency analysis: 112x112 face backbones on the runtimes this project ships to', '',
        'Part of the [timm-mobileone](../README.md) documentation. Written by `benchmarks/latency_analysis.py`: every',
        'figure on this page comes from one run of it.', '',
        f'- **Command**: `{cmd}` ({result["seconds"] / 60:.1f} minutes, {result["date"]}).',
        f'- **Machine**: {result["machine"]}; {vers}. ONNX Runtime and ExecuTorch run at their default thread '
        f'counts; PyTorch eager with {result["threads"]} threads, channels_last.',
        '- **Weights**: random initialization, BatchNorm statistics calibrated on random inputs (3 batches of 8), '
        'then every reparameterizable model fused (timm\'s `reparameterize_model`); denormals flushed. Latency '
        'does not depend on trained values.',
        f'- **Timing**: batch 1 (CUDA: also batch 256, per image), median of {result["repeats"]} round-robin rounds '
        '(`profile.time_round_robin`: each cell once per round, after a 50 ms pause and 30 ms of warm-up calls); '
        'one round-robin per section. Each cell shows its ratio to MobileOne-112-S0 (fused, ReLU) in the same '
        'runtime and run: compare ratios across machines, not milliseconds.',
        '- **MACs and parameters**: of the fused model, convs and matmuls counted by `torch.utils.flop_counter`.',
        '']
    if not any(r.startswith('cuda') for r in runtimes):
        out += ['No GPU here. The CUDA columns (batch 1, and batch 256 per image) come from the same script on a '
                'CUDA machine, `python benchmarks/latency_analysis.py --runtimes eager,cuda_b1,cuda_b256 --no-memory '
                '--out docs/latency_analysis_gpu.md`, written to its own page; it has not run yet.', '']
    if result['quick']:
        out += ['**This is the `--quick` version** (10 models, eager and ONNX Runtime, fewer rounds, batch-1 memory '
                'only): a check that the analysis runs, not the analysis.', '']

    out += ['## 1. Does latency follow MACs or parameters?', '']
    lead = {r['model']: [r['family'], f'{r["params_m"]:.2f}', f'{r["gmacs"]:.3f}'] for r in rows}
    out += [latency_table([r['model'] for r in rows], runtimes, med, BASE, lead, ['family', 'params (M)', 'GMACs']),
            '']
    out += ['Spearman rank correlation over the zoo (95 % bootstrap interval over resampled models; p: scipy\'s '
            'two-sided test of rho = 0), beside the paper\'s Table 1:', '',
            '| latency measured on | models | rho with MACs [95 % CI] (p) | rho with parameters [95 % CI] (p) |',
            '|---|---:|---|---|']
    for r in runtimes:
        g, pr = stats[r]['gmacs'], stats[r]['params']
        out.append(f'| {RUNTIME_LABELS[r]} (this run) | {g["n"]} | {g["rho"]:.2f} [{g["lo"]:.2f}, {g["hi"]:.2f}] '
                   f'({g["p"]:.2g}) | {pr["rho"]:.2f} [{pr["lo"]:.2f}, {pr["hi"]:.2f}] ({pr["p"]:.2g}) |')
    for where, (a, b) in PAPER_RHO.items():
        out.append(f'| {where}, the paper (ImageNet models at 224) | | {a:.2f} | {b:.2f} |')
    out += ['', f'![latency against MACs and parameters, per runtime]({fig_ref})', '']
    base = {r: med.get((BASE, r)) for r in runtimes}
    findings = []
    for r in runtimes:
        timed = sorted((v, n) for (n, rr), v in med.items() if rr == r)
        if not timed:
            continue
        rank = [n for _, n in timed].index(BASE) + 1 if base[r] else None
        fewer = [n for n in size if size[n]['gmacs'] < size[BASE]['gmacs'] and med.get((n, r)) and base[r]
                 and med[(n, r)] > base[r]]
        g, pr = stats[r]['gmacs'], stats[r]['params']
        phone, desktop = PAPER_RHO['iPhone 12 (Core ML)'], PAPER_RHO['desktop CPU']

        def cmp(a, b):
            return 'above' if a > b else 'below'
        findings.append(f'- {RUNTIME_LABELS[r]}: rank correlation with MACs {g["rho"]:.2f} [{g["lo"]:.2f}, '
                        f'{g["hi"]:.2f}] on {g["n"]} models, {cmp(g["rho"], phone[0])} the paper\'s iPhone 12 '
                        f'({phone[0]:.2f}) and {cmp(g["rho"], desktop[0])} its desktop CPU ({desktop[0]:.2f}); with '
                        f'parameters {pr["rho"]:.2f} [{pr["lo"]:.2f}, {pr["hi"]:.2f}], {cmp(pr["rho"], phone[1])} '
                        f'the phone\'s {phone[1]:.2f}.')
        findings.append(f'- {RUNTIME_LABELS[r]}: S0 is number {rank} of {len(timed)} by latency '
                        f'({ms(base[r])} ms); {len(fewer)} model(s) with fewer MACs than S0 are slower '
                        f'({", ".join(fewer) or "none"}); the fastest is {timed[0][1]} ({ms(timed[0][0])} ms).')
    mfn = [f'{RUNTIME_LABELS[r]} {ratio(med.get(("mobilefacenet", r)), base[r])}' for r in runtimes
           if med.get(('mobilefacenet', r)) and base[r]]
    if mfn:
        macs = size['mobilefacenet']['gmacs'] / size[BASE]['gmacs']
        findings.append(f'- MobileFaceNet ({macs:.2f}x S0\'s MACs, PReLU activations) against S0, per runtime: '
                        f'{"; ".join(mfn)}.')
    out += ['What the run shows (computed from the tables above):', ''] + findings + ['']

    out += ['## 2. Activation functions', '',
            'Fused MobileOne-112-S0 with its activation swapped in every block (the paper\'s Table 2 times the same '
            'swap in a 30-layer network on an iPhone 12); "vs S0" is the ratio to the ReLU network.', '']
    labels = [a['activation'] for a in result['activations']]
    out += [latency_table(labels, runtimes, act_med, 'ReLU', {n: [] for n in labels}, []), '']
    for r in runtimes:
        timed = {n: act_med.get((n, r)) for n in labels if act_med.get((n, r))}
        if 'ReLU' in timed:
            worst = max(timed, key=timed.get)
            out.append(f'- {RUNTIME_LABELS[r]}: the slowest is {worst}, {timed[worst] / timed["ReLU"]:.2f}x ReLU.')
    out += ['']

    out += ['## 3. Blocks: squeeze-excite, skip connections, branches alive', '',
            'S0 fused; with squeeze-excite in every block; fused with an explicit residual add around every block '
            'whose output shape is its input\'s (the skip connection of the paper\'s Table 3); train-time with '
            'its branches alive (k = 4 conv branches, the 1x1 scale branch and the BN skip per block, as exported: '
            'eval-mode BatchNorms, which ONNX Runtime folds into its convs at load time); train-time without the BN '
            'skip branch.', '']
    blabels = [b['variant'] for b in result['blocks']]
    lead = {n: [f'{bsize[n]["params_m"]:.2f}', f'{bsize[n]["gmacs"]:.3f}'] for n in blabels}
    out += [latency_table(blabels, runtimes, block_med, 'S0 fused', lead, ['params (M)', 'GMACs']), '']
    if memory:
        batches = sorted({b for (_, _, b) in memory})
        cols = [(r, b) for r in cpu_rt for b in batches if any(k[1:] == (r, b) for k in memory)]
        out += ['Peak memory, MB. PyTorch eager: the weights plus the peak of live tensor bytes during one forward '
                '(the torch profiler\'s allocation records in time order; batch 1 and 32). ONNX Runtime and '
                'ExecuTorch: the peak resident memory a fresh process gains by loading the model file and running 5 '
                'forwards (VmHWM over VmRSS before loading: weights, the runtime\'s buffers and activations; the files '
                'are exported for batch 1).', '',
                '| variant | ' + ' | '.join(f'{RUNTIME_LABELS[r]} b{b} MB (vs S0)' for r, b in cols) + ' |',
                '|---|' + '---:|' * len(cols)]
        for n in blabels:
            cells = []
            for r, b in cols:
                v, ref = memory.get((n, r, b)), memory.get(('S0 fused', r, b))
                cells.append('' if v is None else f'{v:.1f} ({v / ref:.2f}x)' if ref else f'{v:.1f}')
            out.append(f'| {n} | ' + ' | '.join(cells) + ' |')
        out += ['']
    for r in runtimes:
        f, t = block_med.get(('S0 fused', r)), block_med.get(('S0 train-time (branches)', r))
        se, sk = block_med.get(('S0 fused + SE', r)), block_med.get(('S0 fused + skip adds', r))
        if f:
            out.append(f'- {RUNTIME_LABELS[r]}: branches alive {ratio(t, f) or "-"} of fused; squeeze-excite '
                       f'{ratio(se, f) or "-"}; skip adds {ratio(sk, f) or "-"}.')
    out += ['']
    if BLANKS:
        out += ['**Blank cells**: the export or the runtime refused the model (the project\'s ExecuTorch export '
                'requires every op lowered to XNNPACK, so a partly delegated program is refused rather than timed):',
                ''] + [f'- {blank_reason(line)}' for line in BLANKS] + ['']
    return '\n'.join(_wrap(line) for line in out)


def blank_reason(line: str) -> str:
    """'model / runtime: why', up to the first op the runtime refused (its schema dropped)."""
    return line.split(': schema')[0][:200]


def _wrap(line: str, width: int = 118) -> str:
    """Prose and bullets wrapped as the other docs are; tables, headings and images left whole."""
    import textwrap
    if len(line) <= width or line.startswith(('|', '#', '!')):
        return line
    indent = '  ' if line.startswith('- ') else ''
    return textwrap.fill(line, width, subsequent_indent=indent, break_on_hyphens=False, break_long_words=False)


def versions() -> Dict[str, str]:
    from timm_mobileone.__main__ import _runtime_versions
    return _runtime_versions(('torch', 'timm', 'onnxruntime', 'executorch'))


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    torch.set_flush_denormal(True)
    repeats = args.repeats or (5 if args.quick else 15)
    runtimes = ['eager', 'onnx_fp32'] + ([] if args.quick else ['executorch_fp32'])
    if torch.cuda.is_available():
        runtimes += ['cuda_b1', 'cuda_b256']
    runtimes = args.runtimes or runtimes
    figures = args.figures or args.out.parent
    figures.mkdir(parents=True, exist_ok=True)
    names = QUICK_ZOO if args.quick else [n for n, _ in ZOO]
    family = dict(ZOO)
    result: Dict[str, Any] = dict(quick=args.quick, repeats=repeats, threads=threads, runtimes=runtimes,
                                  machine=machine(), versions=versions(), date=str(date.today()))

    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        # 1. the zoo
        torch.manual_seed(0)
        zoo = []
        for name in names:
            zoo.append((name, fused(zoo_model(name))))
        from timm_mobileone.deploy.profile import count_macs, count_params
        size = {n: dict(params_m=count_params(m) / 1e6, gmacs=count_macs(m, INPUT) / 1e9) for n, m in zoo}
        med, _ = time_cells(zoo, runtimes, repeats, tmp / 'zoo', '1/3 zoo')
        rows = [dict(model=n, family=family[n], **size[n], ms=to_ms(med, n, runtimes)) for n in names]
        stats = {}
        for r in runtimes:
            timed = [row for row in rows if row['ms'][r] is not None]
            lat = [row['ms'][r] for row in timed]
            stats[r] = dict(gmacs=spearman([row['gmacs'] for row in timed], lat),
                            params=spearman([row['params_m'] for row in timed], lat))
        scatter(rows, runtimes, stats, figures / f'{args.out.stem}_zoo.png')  # docs/latency_analysis_zoo.png
        result.update(zoo=rows, spearman=stats)
        del zoo

        # 2. activations
        torch.manual_seed(0)
        acts = [(label, fused(s0(act))) for label, act in (ACTS if not args.quick else ACTS[:1] + ACTS[3:5])]
        acts.append(('ReLU + SE', fused(s0(se=True))))
        act_med, _ = time_cells(acts, runtimes, repeats, tmp / 'acts', '2/3 activations')
        result['activations'] = [dict(activation=label, ms=to_ms(act_med, label, runtimes))
                                 for label, _ in acts]
        del acts

        # 3. blocks
        blocks = [(name, block_variant(name)) for name in BLOCKS]
        bsize = {n: dict(params_m=count_params(m) / 1e6, gmacs=count_macs(m, INPUT) / 1e9) for n, m in blocks}
        block_med, files = time_cells(blocks, runtimes, repeats, tmp / 'blocks', '3/3 blocks')
        memory: Dict = {}
        if args.memory:
            cpu_cells = {k: v for k, v in sorted(files.items(), key=lambda kv: (kv[0][1], kv[0][0]))}
            memory = peak_memory(cpu_cells, (1,), threads, '3/3 blocks')
            if 'eager' in runtimes:
                for name, model in blocks:
                    for b in (1, 32):
                        memory[(name, 'eager', b)] = eager_memory(copy.deepcopy(model), b)
        result['blocks'] = [dict(variant=n, **bsize[n], ms=to_ms(block_med, n, runtimes),
                                 peak_mb={f'{r}_b{b}': memory.get((n, r, b)) for r in runtimes for b in (1, 32)
                                          if (n, r, b) in memory}) for n, _ in blocks]
    result['seconds'] = round(time.perf_counter() - t_start, 1)
    argv_text = ' '.join(argv if argv is not None else sys.argv[1:])
    doc = write_doc(result, rows, stats, med, act_med, block_med, memory, runtimes, size, bsize, figures, args,
                    argv_text)
    args.out.write_text(doc)
    log(f'wrote {args.out} in {result["seconds"]:.0f} s')
    print(json.dumps(result))
    return result


if __name__ == '__main__':
    main()
