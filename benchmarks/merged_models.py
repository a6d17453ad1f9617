"""The merged training form against the branches form on whole models in float64: every MobileOne-112 variant.

    python benchmarks/merged_models.py [--models mobileone_112_s0 ... mobileone_112_s4] [--size 32] [--batch 5]

tests/test_merged.py's `test_merged_equals_branches_in_float64`, run on every variant (the suite runs S0 and S4;
`test_s1_to_s3_hold_no_block_that_s0_and_s4_lack` checks that S1-S3 hold no block kind, map size or plan that those
two lack; this script is the whole-model check of S1-S3 themselves, about 20 s each on a 2-core box). Per model: a
BN-calibrated float64 model in the branches form and a copy in the merged form take one SGD step on the same batch;
the gaps (loss, output, worst per-tensor gradient, worst buffer, weights after the step) must stay within 8x of the
branches form's own rounding (the same batch in another order), and the eval-mode and reparameterized merged model
must compute the branches' eval output within 8x of its own rounding. Prints one line per model on stderr and one
JSON object; exits 1 if any model fails.
"""
import argparse
import copy
import json
import sys

import torch
import torch.nn.functional as F

import timm
import timm_mobileone  # noqa: F401  (registers the models)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _pair(name: str, size: int):
    model = timm.create_model(name, img_size=size).double().train()
    with torch.no_grad():  # BN statistics that match the activations (fresh ones blow the outputs up)
        for _ in range(2):
            model(torch.randn(6, 3, size, size, dtype=torch.float64))
    merged = copy.deepcopy(model)
    merged.set_train_form('merged')
    return model, merged


def grad_gap(a, b) -> float:
    """Worst per-tensor gradient gap, relative to the tensor's gradient (floored at 1e-6 of the whole gradient:
    the head's BN-followed biases have a true gradient of 0 and carry only rounding)."""
    total = torch.cat([p.grad.flatten() for p in a.parameters()]).norm()
    return max(((p.grad - q.grad).norm() / (p.grad.norm() + 1e-6 * total)).item()
               for p, q in zip(a.parameters(), b.parameters()))


def buffer_gap(a, b) -> float:
    gaps = []
    for (name, x), (name_b, y) in zip(a.named_buffers(), b.named_buffers()):
        if name != name_b:
            raise ValueError(f'buffers differ: {name} vs {name_b}')
        # floored at 1e-6: the head's BatchNorm1d sees a zero-mean input (no bias before it), its running mean is
        # rounding alone (1e-16); calibrated statistics elsewhere are O(1)
        gaps.append(((x.double() - y.double()).norm() / (x.double().norm() + 1e-6)).item())
    return max(gaps)


def _step(model, x, target, perm=None):
    """One SGD step on (x, target), the batch fed in the order `perm` (outputs put back in order): the loss and
    the output (the gradients and buffers stay in the model)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    out = model(x if perm is None else x[perm])
    if perm is not None:
        out = out[torch.argsort(perm)]
    loss = F.mse_loss(out, target)
    loss.backward()
    opt.step()
    return loss.item(), out.detach()


def _gaps(a, b, model_a, model_b) -> dict:
    return dict(loss=abs(a[0] - b[0]) / abs(b[0]), output=rel_err(a[1], b[1]),
                grad=grad_gap(model_a, model_b), buffers=buffer_gap(model_a, model_b),
                weights=max(((p - q).norm() / (q.norm() + 1e-6)).item()
                            for p, q in zip(model_a.parameters(), model_b.parameters())))


def compare(model, merged, x, target, perm) -> dict:
    """`model` (branches form, train mode) and `merged` (its copy in the merged form) after one SGD step on
    (x, target): their gaps, the branches form's own rounding on the batch in the order `perm` (`floor`), whether
    the BN step counters agree; then, on `model`'s weights in eval mode, the merged model's gap before and after
    reparameterize() and the branches form's own rounding on the flipped batch (`eval_tol`, 8x of it). Changes
    both models."""
    permuted = copy.deepcopy(model)
    ref = _step(model, x, target)
    floor = _gaps(_step(permuted, x, target, perm), ref, permuted, model)
    gaps = _gaps(_step(merged, x, target), ref, merged, model)
    counters = all(bool((p == q).all()) for (n, p), (_, q) in zip(model.named_buffers(), merged.named_buffers())
                   if n.endswith('num_batches_tracked'))
    # eval mode (fused on the fly from the running statistics) and reparameterize(), on the same weights (the
    # network amplifies the steps' 1e-12 rounding gap by 10-1000x: compare functions, not rounding histories)
    merged.load_state_dict(model.state_dict())
    model.eval()
    merged.eval()
    with torch.no_grad():
        expected = model(x)
        tol = 8 * max(rel_err(model(x.flip(0)).flip(0), expected), 1e-13)
        eval_gap = rel_err(merged(x), expected)
        merged.reparameterize()
        fused_gap = rel_err(merged(x), expected)
    return dict(gaps=gaps, floor=floor, counters_equal=counters, eval_gap=eval_gap, fused_gap=fused_gap,
                eval_tol=tol)


def check(name: str, size: int, batch: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model, merged = _pair(name, size)
    x = torch.randn(batch, 3, size, size, dtype=torch.float64)
    target = torch.randn(batch, 512, dtype=torch.float64)  # the 512-d embedding (num_classes=0, the default)
    perm = torch.randperm(batch)
    if batch > 1 and bool((perm == torch.arange(batch)).all()):
        perm = perm.flip(0)
    row = compare(model, merged, x, target, perm)
    ok = all(row['gaps'][k] <= 8 * max(row['floor'][k], 1e-13) for k in row['gaps']) and row['counters_equal']
    ok &= row['eval_gap'] <= row['eval_tol'] and row['fused_gap'] <= row['eval_tol']
    return dict(model=name, ok=bool(ok), **row)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--models', nargs='+', default=[f'mobileone_112_s{i}' for i in range(5)])
    p.add_argument('--size', type=int, default=32, help='input size (32: every block kind at 2x2 or more)')
    p.add_argument('--batch', type=int, default=5)
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args(argv)
    rows = []
    for name in args.models:
        row = check(name, args.size, args.batch, args.seed)
        rows.append(row)
        worst = max(row['gaps'][k] / (8 * max(row['floor'][k], 1e-13)) for k in row['gaps'])
        print(f"{name}: {'ok' if row['ok'] else 'FAILED'} (worst step gap {worst:.2f} of its bound; eval "
              f"{row['eval_gap']:.1e}, fused {row['fused_gap']:.1e}, bound {row['eval_tol']:.1e})", file=sys.stderr)
    result = dict(torch=torch.__version__, threads=torch.get_num_threads(), size=args.size, batch=args.batch,
                  rows=rows)
    print(json.dumps(result))
    if not all(r['ok'] for r in rows):
        raise SystemExit(1)
    return result


if __name__ == '__main__':
    main()
