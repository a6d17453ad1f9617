""" MobileOne's training-time branches computed as one conv: the exact merged training form

A train-time MobileOne block sums k conv+BN branches, a 1x1 scale conv+BN branch and a BN skip; every BatchNorm
normalizes its own branch with that branch's batch statistics. Each branch is linear in the block's input before
its BatchNorm, so with `s_i = gamma_i / sqrt(var_i + eps)`:

    sum_i BN_i(conv(x, K_i)) + BN_skip(x) = conv(x, sum_i s_i K_i + s_skip * delta) + sum_i (beta_i - s_i mu_i) + ...

The kernels add up to one kernel once each branch's batch mean `mu_i` and variance `var_i` are known, and those
follow from the input's moments: a branch output at one position is its kernel dotted with the input patch under
it, so `mu_i = K_i . E[patch]` and `var_i = K_i Cov[patch] K_i^T`, for every branch at once. Autograd through
that computation gives exactly the branches' gradients (BatchNorm's backward included). Per block (`plan`):

* **depthwise** 3x3 blocks at stride 1: the 9x9 patch moments per channel. Products of the input with itself at
  the 13 distinct spatial lags, summed over the batch, then rectangle sums of those maps (integral images) give
  all 81 entries; a custom backward turns their gradient into one 5x5 depthwise conv plus exact corrections on the
  border rows and columns. Neither unfolds the patches (9x the input's memory; `unfold` + `einsum` ran at 0.3-0.4x
  the branches' speed on 2 CPU cores).
* **pointwise** 1x1 blocks where it is cheaper: the channel covariance, one (C_in x C_in) GEMM, replaces the k
  branch convs; the variances cost B * C_out * C_in^2 more, so the plan counts multiply-accumulates and keeps the
  branches where they are fewer (one conv branch, S1-S4; very small maps against the channel count).
* everything else (the stem, stride-2 depthwise blocks): timm's branches forward, unchanged.

Measured on 2 CPU cores (batch 32, float32, forward + backward of one block; `benchmarks/train_throughput.py`
for whole models): branch stacking, one grouped conv of all branch kernels with one BatchNorm over it, ran at
0.57-1.05x the branches (the BatchNorm work is the same, only launches are saved), so it is not used.

The BN skip needs only the input's own per-channel mean and variance (it is the identity kernel); it folds into the
merged kernel, or is added after DropPath when stochastic depth is on (DropPath acts on the conv branches only).

Either way the block computes the branches' function with the same parameters, state_dict keys and running
statistics (updated as `nn.BatchNorm2d` does: the unbiased variance, `momentum`, or the cumulative average when
it is None), so checkpoints, `reparameterize()`, resume and exports do not know which form trained a model. In
eval mode a merged block fuses on the fly from the running statistics (what `reparameterize()` computes: one
conv). Moments are accumulated in float32 (float64 stays float64), also under autocast, about each channel's
mean (`depthwise_patch_stats`; the 1x1 covariance from centred inputs). Checked in float64 against the branches in
`tests/test_merged.py`: outputs, loss, every gradient and the running statistics within 1e-9 relative. In
float32 the merged form rounds about twice as much as the branches (fresh-init S0, BN calibrated on random
batches, a random batch of 16, against float64: output 1.7e-4 vs 7.7e-5 relative, running variances 1.5e-5 vs
5.0e-6); on S0's first 56x56 depthwise block (random post-ReLU input) the input gradient is 3e-4 off against
1e-7, from the fused conv's own sums, not from the statistics (those and their gradients are within 2e-7).

Not merged: SyncBatchNorm branches (their statistics span processes) and BatchNorms without running statistics
(refused with a ValueError).
"""
from functools import lru_cache
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['TRAIN_FORMS', 'check_train_form', 'depthwise_patch_stats', 'merged_forward', 'patch_moments', 'plan']

TRAIN_FORMS = ('branches', 'merged')


def check_train_form(train_form: str) -> str:
    if train_form not in TRAIN_FORMS:
        raise ValueError(f'train_form must be one of {TRAIN_FORMS}, got {train_form!r}')
    return train_form


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# -- depthwise 3x3 patch moments


@lru_cache(maxsize=None)
def _lag_index(k: int) -> Tuple[List[Tuple[int, int]], List[int], List[int], List[int]]:
    """The distinct lags d = b - a between two offsets of a k x k patch (one of each +-d pair), and for every
    (a, b) pair of offsets: the lag's index and the offset where the rectangle of its products starts."""
    r = k - 1
    lags = [(di, dj) for di in range(-r, r + 1) for dj in range(-r, r + 1) if (di, dj) >= (0, 0)]
    index = {d: i for i, d in enumerate(lags)}
    offsets = [(i, j) for i in range(k) for j in range(k)]
    lag, top, left = [], [], []
    for a in offsets:
        for b in offsets:
            d, start = (b[0] - a[0], b[1] - a[1]), a
            if d not in index:  # x[p+a] x[p+b] = x[p+b] x[p+(b-(b-a))]: the opposite lag, from b
                d, start = (-d[0], -d[1]), b
            lag.append(index[d])
            top.append(start[0])
            left.append(start[1])
    return lags, lag, top, left


@lru_cache(maxsize=None)
def _lag_tensors(k: int, device: torch.device) -> Tuple[torch.Tensor, ...]:
    """`_lag_index`'s per-pair lists and the k*k offsets as index tensors on `device`, made once per device
    (not a host-to-device copy per block and step)."""
    _, lag, top, left = _lag_index(k)
    return tuple(torch.tensor(v, device=device) for v in (lag, top, left, list(range(k * k))))


def _rect_sums(integral: torch.Tensor, slab, top, left, h: int, w: int) -> torch.Tensor:
    """Sums of `integral`'s slabs over h x w rectangles at (top, left): (len(top), C)."""
    return (integral[slab, :, top + h, left + w] - integral[slab, :, top, left + w]
            - integral[slab, :, top + h, left] + integral[slab, :, top, left])


def _batch_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_n a[n] * b[n]. On CPU accumulated image by image (measured 1.5x faster than the product and its sum,
    which writes and reads a batch-sized temporary); elsewhere one product and one reduction (two launches)."""
    if a.device.type != 'cpu':
        return (a * b).sum(0)
    acc = a[0] * b[0]
    for i in range(1, a.shape[0]):
        acc.addcmul_(a[i], b[i])
    return acc


def _patch_moments_sums(x: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    n, c, h, w = x.shape
    p = k // 2
    xp = F.pad(x, [p, p, p, p])
    hp, wp = h + 2 * p, w + 2 * p
    lags = _lag_index(k)[0]
    slabs = []
    for di, dj in lags:  # sum over the batch of x[q] x[q + d], placed at q on the padded grid
        a = xp[:, :, :hp - di, max(0, -dj):wp - max(0, dj)]
        b = xp[:, :, di:, max(0, dj):wp + min(0, dj)]
        slabs.append(F.pad(_batch_dot(a, b), [max(0, -dj) + 1, max(0, dj), 1, di]))
    slabs.append(F.pad(xp.sum(0), [1, 0, 1, 0]))
    integral = torch.stack(slabs).cumsum(2).cumsum(3)  # (lags + 1, C, hp + 1, wp + 1), a zero first row / column
    lag, top, left, o = _lag_tensors(k, x.device)
    second = _rect_sums(integral, lag, top, left, h, w)
    first = _rect_sums(integral, len(lags), o // k, o % k, h, w)  # an int slab index: (C, k*k)
    return second.t().reshape(c, k * k, k * k), first


def _shifted(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    return x.to(shift.dtype) - shift.view(1, -1, 1, 1)


class _PatchMoments(torch.autograd.Function):
    """Sums over the batch and the output positions of a stride-1, zero-padded 3x3 depthwise conv of the patch
    products (C, 9, 9) and of the patches (C, 9), with a backward that needs no unfolded patches.

    d second / d x[q] = sum_{u : q - u on the output grid} sum_v G[u, v] x[q - u + v], G the symmetrized incoming
    gradient. Without the grid condition that is one 5x5 depthwise conv of x with G's diagonal sums; the condition
    only bites on the border rows and columns, where the terms of the one excluded offset row (column) reduce to
    a 1-D conv of that border line (inclusion-exclusion, the four corners added back).
    """

    @staticmethod
    def forward(ctx, x_in: torch.Tensor, shift: torch.Tensor):
        ctx.save_for_backward(x_in, shift)  # x as given (bfloat16 under autocast): half a float32 copy's memory
        return _patch_moments_sums(_shifted(x_in, shift), 3)

    @staticmethod
    def backward(ctx, g2: torch.Tensor, g1: torch.Tensor):
        x_in, shift = ctx.saved_tensors
        x = _shifted(x_in, shift)
        n, c, h, w = x.shape
        if g2 is None:
            g2 = x.new_zeros(c, 9, 9)
        if g1 is None:
            g1 = x.new_zeros(c, 9)
        gs = (g2 + g2.transpose(1, 2)).to(x.dtype).reshape(c, 3, 3, 3, 3)  # [c, a_i, a_j, b_i, b_j]
        diag = x.new_zeros(c, 5, 5)  # diag[d + 2] = sum_a gs[a, a + d]
        for ai in range(3):
            for aj in range(3):
                diag[:, 2 - ai:5 - ai, 2 - aj:5 - aj] += gs[:, ai, aj]
        dx = F.conv2d(x, diag.unsqueeze(1), padding=2, groups=c)

        def line(g: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
            """1-D conv along a border line (N, C, L) with kernel[e + 2] = sum_{b - a = e} g[a, b] (g: C x 3 x 3)."""
            kern = values.new_zeros(c, 5)
            for a in range(3):
                kern[:, 2 - a:5 - a] += g[:, a]
            return F.conv1d(values, kern.unsqueeze(1), padding=2, groups=c)

        # offset row a_i = 2 (resp. 0) has no output position for x's top (bottom) row; of its patch rows only
        # b_i = 2 (0) lies on x there
        dx[:, :, 0, :] -= line(gs[:, 2, :, 2, :], x[:, :, 0, :])
        dx[:, :, h - 1, :] -= line(gs[:, 0, :, 0, :], x[:, :, h - 1, :])
        dx[:, :, :, 0] -= line(gs[:, :, 2, :, 2], x[:, :, :, 0])
        dx[:, :, :, w - 1] -= line(gs[:, :, 0, :, 0], x[:, :, :, w - 1])
        for (i, ai), (j, aj) in ((r, cc) for r in ((0, 2), (h - 1, 0)) for cc in ((0, 2), (w - 1, 0))):
            dx[:, :, i, j] += gs[:, ai, aj, ai, aj] * x[:, :, i, j]
        ones = x.new_ones(1, c, h, w)  # the patch sums: every output position's patch, summed over the batch
        dx = dx + F.conv_transpose2d(ones, g1.to(x.dtype).reshape(c, 1, 3, 3), groups=c)[:, :, 1:1 + h, 1:1 + w]
        return dx.to(x_in.dtype), None


def patch_moments(x: torch.Tensor, shift: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Batch sums of the 3x3 patch products (C, 9, 9) and patches (C, 9) that a stride-1 depthwise conv with zero
    padding 1 sees (maps of at least 2x2) on `x - shift` (a per-channel constant, taken as given: no gradient),
    zero-padded; patch entries in row-major kernel order; float32 for a float32 or lower-precision input, float64
    for float64. Differentiable in x."""
    if shift is None:
        shift = torch.zeros(x.shape[1], dtype=_stat_dtype(x), device=x.device)
    return _PatchMoments.apply(x, shift.detach().to(_stat_dtype(x)))


@lru_cache(maxsize=None)
def _border_geometry(h: int, w: int, device: torch.device, dtype: torch.dtype
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the zero padding does to 3x3 patches on an h x w map, per image: for each offset a, the output
    positions whose patch entry a lies inside the map (9,), the same for each pair (a, b) (9, 9), and for each
    pair the rectangle [top, bottom, left, right) of padded-map positions q = p + a over the output positions p
    whose entry b lies inside (the sums of the map over it pair the map with the inside indicator). On `device`,
    made once per map size (every step's blocks reuse them)."""
    def span(n: int, a: int, b: int) -> Tuple[int, int]:  # p in [0, n) with p + a and p + b in [1, n + 1)
        return max(0, 1 - a, 1 - b), min(n, n + 1 - a, n + 1 - b)
    offs = [(i, j) for i in range(3) for j in range(3)]
    inside = torch.zeros(9, dtype=torch.float64)
    both = torch.zeros(9, 9, dtype=torch.float64)
    rects = []
    for u, a in enumerate(offs):
        ri, rj = span(h, a[0], a[0]), span(w, a[1], a[1])
        inside[u] = max(0, ri[1] - ri[0]) * max(0, rj[1] - rj[0])
        for v, b in enumerate(offs):
            ri, rj = span(h, a[0], b[0]), span(w, a[1], b[1])
            both[u, v] = max(0, ri[1] - ri[0]) * max(0, rj[1] - rj[0])
            pi, pj = (max(0, 1 - b[0]), min(h, h + 1 - b[0])), (max(0, 1 - b[1]), min(w, w + 1 - b[1]))
            rects.append([pi[0] + a[0], pi[1] + a[0], pj[0] + a[1], pj[1] + a[1]])
    return inside.to(device, dtype), both.to(device, dtype), torch.tensor(rects, device=device)


def depthwise_patch_stats(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean (C, 9) and covariance (C, 9, 9) over the batch and the output positions of the zero-padded 3x3 patches
    of a stride-1 depthwise conv, in float32 (float64 for float64 input), differentiable in x.

    Computed about each channel's mean mu rather than from raw sums: with z = x - mu and I the inside-the-map
    indicator of each patch entry, patch = patch(z) + mu I, so Cov = Cov(z) + mu (Cov(z, I) + Cov(I, z)) + mu^2
    Cov(I). Cov(z) has no E[x^2] - E[x]^2 cancellation (z is centred), Cov(I) is geometry and Cov(z, I) a set of
    rectangle sums of z; mu carries no gradient, since the covariance does not depend on it.
    """
    dt = _stat_dtype(x)
    n, c, h, w = x.shape
    count = n * h * w
    plane = x.to(dt).sum(0)  # (C, H, W), differentiable
    mu = (plane.sum((1, 2)) / count).detach()
    second, first = patch_moments(x, mu)
    mean_z = first / count
    cov = second / count - mean_z[:, :, None] * mean_z[:, None, :]
    inside, both, r = _border_geometry(h, w, x.device, dt)
    mean_i = inside * n / count
    cov_i = both * n / count - mean_i[:, None] * mean_i[None, :]
    z_plane = F.pad(plane - n * mu.view(-1, 1, 1), [2, 1, 2, 1])  # the padded map after a zero row / column
    integral = z_plane.cumsum(1).cumsum(2)
    z_in = (integral[:, r[:, 1], r[:, 3]] - integral[:, r[:, 0], r[:, 3]] - integral[:, r[:, 1], r[:, 2]]
            + integral[:, r[:, 0], r[:, 2]]).view(c, 9, 9) / count
    cross = z_in - mean_z[:, :, None] * mean_i[None, None, :]
    cov = cov + mu.view(-1, 1, 1) * (cross + cross.transpose(1, 2)) + (mu * mu).view(-1, 1, 1) * cov_i
    return mean_z + mu.view(-1, 1) * mean_i, cov


# -- the merged block


def _branch_kernels(block: nn.Module) -> Tuple[torch.Tensor, List[nn.BatchNorm2d]]:
    """(C_out, B, C_in/g, k, k) kernels of the conv branches (the 1x1 scale branch padded to k x k at its centre,
    which with the branch convs' padding samples the same input positions) and their BatchNorms."""
    convs = list(block.conv_kxk)
    kernels = [cv.conv.weight for cv in convs]
    bns = [cv.bn for cv in convs]
    if block.conv_scale is not None:
        w = block.conv_scale.conv.weight
        kh, kw = kernels[0].shape[-2:]
        ph, pw = (kh - w.shape[-2]) // 2, (kw - w.shape[-1]) // 2
        kernels.append(F.pad(w, [pw, kw - w.shape[-1] - pw, ph, kh - w.shape[-2] - ph]))
        bns.append(block.conv_scale.bn)
    return torch.stack(kernels, 1), bns


def _check_bns(bns: List[nn.Module]) -> None:
    for bn in bns:
        if not isinstance(bn, nn.BatchNorm2d):  # SyncBatchNorm(Act) is not a BatchNorm2d
            raise ValueError(f"train_form='merged' needs nn.BatchNorm2d branches, got {type(bn).__name__} (its "
                             f"statistics are not this process's batch alone); use train_form='branches'")
        if bn.running_mean is None or not bn.affine:
            raise ValueError("train_form='merged' needs affine BatchNorms with running statistics; use "
                             "train_form='branches'")


def plan(block: nn.Module, x_shape: Tuple[int, ...]) -> str:
    """How a merged block computes its batch statistics at this input shape: 'depthwise', 'pointwise' or
    'branches' (timm's forward). Depthwise: 3x3, stride 1, padding 1, no dilation, one channel per group, maps of
    at least 2x2. Pointwise: 1x1 where the covariance costs fewer multiply-accumulates than the branch convs,
    C_in^2 L + B C_out C_in^2 + C_out C_in L < B C_out C_in L (L output positions in the batch, B branches)."""
    conv = block.conv_kxk[0].conv
    n, c_in, h, w = x_shape
    n_branches = len(block.conv_kxk) + (block.conv_scale is not None)
    if conv.kernel_size == (3, 3):
        depthwise = conv.groups == c_in == conv.out_channels
        if (depthwise and conv.stride == (1, 1) and conv.padding == (1, 1) and conv.dilation == (1, 1)
                and h >= 2 and w >= 2):
            return 'depthwise'
        return 'branches'
    if conv.kernel_size != (1, 1) or conv.groups != 1 or conv.padding != (0, 0):
        return 'branches'
    c_out = conv.out_channels
    length = n * ((h - 1) // conv.stride[0] + 1) * ((w - 1) // conv.stride[1] + 1)
    moments = c_in * c_in * length + n_branches * c_out * c_in * c_in + c_out * c_in * length
    return 'pointwise' if moments < n_branches * c_out * c_in * length else 'branches'


@torch.no_grad()
def _update_running(bns: List[nn.BatchNorm2d], mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
    """Each branch's running statistics as nn.BatchNorm2d updates them in training; mean, var: (C, B) biased."""
    var = var * (count / max(count - 1, 1))
    for i, bn in enumerate(bns):
        bn.num_batches_tracked.add_(1)
        m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        bn.running_mean.mul_(1 - m).add_(mean[:, i].to(bn.running_mean.dtype), alpha=m)
        bn.running_var.mul_(1 - m).add_(var[:, i].to(bn.running_var.dtype), alpha=m)


def _branch_stats(block: nn.Module, x: torch.Tensor, kernels: torch.Tensor, how: str, dt: torch.dtype,
                  ) -> Tuple[torch.Tensor, torch.Tensor, int, torch.Tensor, torch.Tensor]:
    """Batch mean and biased variance (C_out, B) of every branch's conv output, from the input's moments; the
    output positions counted; the input's own per-channel mean and variance (for the BN skip, stride 1)."""
    c_out, n_branches = kernels.shape[:2]
    k = kernels.to(dt)
    if how == 'depthwise':
        count = x.shape[0] * x.shape[2] * x.shape[3]
        mean_patch, cov = depthwise_patch_stats(x)
        k = k.reshape(c_out, n_branches, 9)
        mean = torch.einsum('cbu,cu->cb', k, mean_patch)
        var = torch.einsum('cbu,cuv,cbv->cb', k, cov, k)
        return mean, var, count, mean_patch[:, 4], cov[:, 4, 4]  # the centre tap visits every position once
    stride = block.conv_kxk[0].conv.stride
    xs = x.to(dt)
    if stride != (1, 1):
        xs = xs[:, :, ::stride[0], ::stride[1]]
    count = xs.numel() // xs.shape[1]
    mean_in = xs.mean(dim=(0, 2, 3))
    # centred before the product: the covariance without E[x^2] - E[x]^2 cancellation
    xc = (xs - mean_in.view(1, -1, 1, 1)).transpose(0, 1).reshape(xs.shape[1], -1)
    cov = xc @ xc.t() / count
    k = k.reshape(c_out, n_branches, -1)
    mean = torch.einsum('obp,p->ob', k, mean_in)
    var = ((k @ cov) * k).sum(-1)
    return mean, var, count, mean_in, torch.diagonal(cov)


def _merged_kernel(kernels: torch.Tensor, scale: torch.Tensor, skip: Optional[torch.Tensor]) -> torch.Tensor:
    """sum_i scale_i K_i, plus the skip's scale on the identity tap (centre of the kernel, own channel)."""
    weight = torch.einsum('ob,obikl->oikl', scale, kernels.to(scale.dtype))
    if skip is not None:
        c_out, c_in_g, kh, kw = weight.shape
        idx = torch.arange(c_out, device=weight.device)
        delta = torch.zeros_like(weight)
        delta[idx, idx % c_in_g, kh // 2, kw // 2] = 1.0
        weight = weight + delta * skip.view(-1, 1, 1, 1)
    return weight


def merged_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A train-time MobileOneBlock's output before its attention and activation, as one conv (module doc)."""
    training = block.conv_kxk[0].bn.training
    how = plan(block, tuple(x.shape)) if training else 'fused'
    if how == 'branches':  # decided before any kernel is stacked: this is every step's path for such blocks
        return block.branch_sum(x)
    kernels, bns = _branch_kernels(block)
    _check_bns(bns)
    conv = block.conv_kxk[0].conv
    dt = _stat_dtype(x)
    gamma = torch.stack([bn.weight for bn in bns], 1).to(dt)
    beta = torch.stack([bn.bias for bn in bns], 1).to(dt)
    eps = torch.tensor([bn.eps for bn in bns], dtype=dt, device=gamma.device)
    drop_path = block.drop_path if training and not isinstance(block.drop_path, nn.Identity) else None
    bn_skip = block.identity
    if bn_skip is not None:
        _check_bns([bn_skip])
    if training:
        with torch.autocast(x.device.type, enabled=False):  # statistics in float32 or wider, also under autocast
            mean, var, count, skip_mean, skip_var = _branch_stats(block, x, kernels, how, dt)
        _update_running(bns, mean, var, count)
        if bn_skip is not None:
            _update_running([bn_skip], skip_mean[:, None], skip_var[:, None], count)
    else:  # on-the-fly fusion from the running statistics
        mean = torch.stack([bn.running_mean for bn in bns], 1).to(dt)
        var = torch.stack([bn.running_var for bn in bns], 1).to(dt)
        if bn_skip is not None:
            skip_mean, skip_var = bn_skip.running_mean.to(dt), bn_skip.running_var.to(dt)
    skip = None
    if bn_skip is not None:  # its output is x * scale + shift
        skip_scale = bn_skip.weight.to(dt) / torch.sqrt(skip_var + bn_skip.eps)
        skip = skip_scale, bn_skip.bias.to(dt) - skip_mean * skip_scale
    scale = gamma / torch.sqrt(var + eps)
    bias = (beta - scale * mean).sum(1)
    fold_skip = skip is not None and drop_path is None
    weight = _merged_kernel(kernels, scale, skip[0] if fold_skip else None)
    if fold_skip:
        bias = bias + skip[1]
    out = F.conv2d(x, weight.to(x.dtype), bias.to(x.dtype), conv.stride, conv.padding, conv.dilation, conv.groups)
    if drop_path is not None:
        out = drop_path(out)
        if skip is not None:
            out = out + torch.addcmul(skip[1].view(1, -1, 1, 1), x, skip[0].view(1, -1, 1, 1)).to(out.dtype)
    return out
