"""Rounding of the merged training form against the branches form, as a channel's mean/std ratio r grows.

    python benchmarks/merged_precision.py [--ratios 1 100 1000 10000] [--cases 14x2 56x16] [--block dw pw]

One train-mode forward + backward of one of S0's stage-1 blocks ('dw': the first depthwise 3x3 block, 'pw': the
1x1 block after it) without its ReLU (an output at the kink flips its gradient on any rounding), BatchNorm
parameters and running statistics randomised, on an input x = s_c (r + noise) (per
channel scale s_c, standard normal noise, rounded to float32 for every form): every channel's mean is r times its
standard deviation. Errors are
against the float64 branches form, max |a - b| / max |b| (the tests' `rel_err`), per quantity: the block's output,
the input gradient, the worst parameter gradient, the worst running variance after the step. Columns: float32
branches (the floor the merged form is held to), float32 merged, and in float64 the branches form's own rounding
(the larger gap of the same batch permuted and in channels_last) and the merged form. Prints a markdown table on stderr and one JSON object.
"""
import argparse
import copy
import json
import math
import sys

import torch

QUANTITIES = ('output', 'input_grad', 'param_grad', 'running_var')


def _block(kind: str, seed: int) -> torch.nn.Module:
    import timm
    import timm_mobileone  # noqa: F401
    torch.manual_seed(seed)
    s0 = timm.create_model('mobileone_112_s0')
    block = s0.stages[0][0 if kind == 'dw' else 1]
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.5)
                m.running_mean.normal_(0, 1)
                m.running_var.uniform_(0.5, 2.0)
    block.act = torch.nn.Identity()  # the branch sum itself: a ReLU kink turns rounding into a full gradient step
    return block.double().train()


def _run(block, form, x, g, perm=None, channels_last=False):
    """Output, input gradient, parameter gradients and running variances of one train-mode step of `form`."""
    b = copy.deepcopy(block)
    b.train_form = form
    if channels_last:
        b = b.to(memory_format=torch.channels_last)
    x = x.clone().requires_grad_(True)
    xin = x if perm is None else x[perm]
    if channels_last:
        xin = xin.contiguous(memory_format=torch.channels_last)
    out = b(xin)
    if perm is not None:
        out = out[torch.argsort(perm)]
    (out * g.to(out.dtype)).sum().backward()
    grads = [p.grad for p in b.parameters()]
    run_vars = [m.running_var for m in b.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    return out.detach(), x.grad, grads, run_vars


def _err(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _errs(got, ref):
    out = dict(output=_err(got[0], ref[0]), input_grad=_err(got[1], ref[1]),
               param_grad=max(_err(p, q) for p, q in zip(got[2], ref[2])),
               running_var=max(_err(p, q) for p, q in zip(got[3], ref[3])))
    return {k: (v if math.isfinite(v) else float('nan')) for k, v in out.items()}


def measure(kind: str, size: int, batch: int, ratio: float, seed: int = 0):
    block = _block(kind, seed)
    c = block.conv_kxk[0].conv.in_channels
    gen = torch.Generator().manual_seed(seed + 1)
    scale = torch.exp(torch.randn(1, c, 1, 1, generator=gen, dtype=torch.float64) * 0.5)
    x = scale * (ratio + torch.randn(batch, c, size, size, generator=gen, dtype=torch.float64))
    x = x.float().double()  # every form sees the same input: float32 rounding of x is not the method's error
    g = torch.randn(batch, block.conv_kxk[0].conv.out_channels, size, size, generator=gen, dtype=torch.float64)
    ref = _run(block, 'branches', x, g)
    perm = torch.randperm(batch, generator=gen)
    if batch > 1 and bool((perm == torch.arange(batch)).all()):
        perm = perm.flip(0)
    f32 = block.float()
    cols = {
        'float32 branches': _errs(_run(f32, 'branches', x.float(), g), ref),
        'float32 merged': _errs(_run(f32, 'merged', x.float(), g), ref),
        # the branches' own float64 rounding: the same batch in another order and in another memory layout
        'float64 branches (own rounding)': {k: max(a[k], b[k]) for a, b in [(
            _errs(_run(block.double(), 'branches', x, g, perm), ref),
            _errs(_run(block.double(), 'branches', x, g, channels_last=True), ref))] for k in QUANTITIES},
        'float64 merged': _errs(_run(block.double(), 'merged', x, g), ref),
    }
    return cols


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--ratios', type=float, nargs='+', default=[1, 100, 1000, 10000], help='mean/std ratios r')
    p.add_argument('--cases', nargs='+', default=['14x2', '56x16'], help='SIZExBATCH')
    p.add_argument('--block', nargs='+', default=['dw', 'pw'], choices=['dw', 'pw'], help='which stage-1 block')
    p.add_argument('--seed', type=int, default=0, help='seed of the block and the input')
    args = p.parse_args(argv)
    rows = []
    for kind in args.block:
        for case in args.cases:
            size, batch = (int(v) for v in case.split('x'))
            for r in args.ratios:
                rows.append(dict(block=kind, size=size, batch=batch, r=r, errors=measure(kind, size, batch, r,
                                                                                          args.seed)))
                print(f'{kind} {case} r={r:g} done', file=sys.stderr)
    cols = list(rows[0]['errors'])
    print('| block | map x batch | r | ' + ' | '.join(f'{c}: out / dx / dparam / run var' for c in cols) + ' |',
          file=sys.stderr)
    print('|---|---|---:|' + '---|' * len(cols), file=sys.stderr)
    for r in rows:
        cells = [' / '.join(f"{r['errors'][c][q]:.1e}" for q in QUANTITIES) for c in cols]
        print(f"| {r['block']} | {r['size']}x{r['size']} x {r['batch']} | {r['r']:g} | " + ' | '.join(cells) + ' |',
              file=sys.stderr)
    result = dict(torch=torch.__version__, threads=torch.get_num_threads(), rows=rows)
    print(json.dumps(result))
    return result


if __name__ == '__main__':
    main()
