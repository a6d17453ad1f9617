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
statistics, so checkpoints, `reparameterize()`, resume and exports do not know which form trained a model. Every
BatchNorm does what `nn.BatchNorm2d.forward` would with its current settings, read at every call: training or
eval (branches in eval use their running statistics, so frozen-BN fine-tuning and mixed modes are exact; all in
eval fuses on the fly, DropPath still applied by its own mode), `track_running_stats`, `momentum` (None: the
cumulative average), per-BN `eps`, `affine`. A module the algebra does not compute (SyncBatchNorm, a conv with a
bias, dilation, padding other than zeros and k // 2, other groups, an activation inside a branch's BatchNorm) is
refused with one `ValueError` line naming the block and the setting, before anything changes.

Rounding. The reductions over the batch and the map run in float32 under autocast too (float64 for float64
input), each on centred values only: the depthwise patch moments about each channel's mean, the border classes'
sums directly (not from integral images), the 1x1 covariance of centred inputs, and the merged conv itself as
conv(x - mu, W) plus conv(mu, W) (`_conv`, whose weight gradient is summed over x - mu). The per-channel algebra
after them (kernels, branch means and variances, scales) runs in float64 (float32 on MPS; the 1x1 blocks'
quadratic forms of centred moments stay float32). Measured against
float64 branches as a channel's mean/std ratio r grows (`benchmarks/merged_precision.py`, docs/training.md): on
S0's first depthwise block float32 merged is within 1.7x of float32 branches at r = 1 and more accurate above it
(r = 1e4, 56x56 batch 16: output 6.8e-8 vs 8.6e-5, input gradient 1.6e-7 vs 3.2e-6); float64 merged within 3.5x
of the branches' own float64 rounding. Before, the depthwise moments rounded as eps * r^2 (NaN at r = 1e4).

Not merged: SyncBatchNorm branches (their statistics span processes).
"""
from functools import lru_cache
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, DropPath

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


def _patch_moments_sums(x: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
    plane = xp.sum(0)  # the padded map summed over the batch
    slabs.append(F.pad(plane, [1, 0, 1, 0]))
    integral = torch.stack(slabs).cumsum(2).cumsum(3)  # (lags + 1, C, hp + 1, wp + 1), a zero first row / column
    lag, top, left, o = _lag_tensors(k, x.device)
    second = _rect_sums(integral, lag, top, left, h, w)
    first = _rect_sums(integral, len(lags), o // k, o % k, h, w)  # an int slab index: (C, k*k)
    return second.t().reshape(c, k * k, k * k), first, plane


def _shifted(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    return x.to(shift.dtype) - shift.view(1, -1, 1, 1)


class _PatchMoments(torch.autograd.Function):
    """Sums over the batch and the output positions of a stride-1, zero-padded 3x3 depthwise conv of the patch
    products (C, 9, 9) and of the patches (C, 9), and the padded map summed over the batch (C, H + 2, W + 2),
    with a backward that needs no unfolded patches.

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
    def backward(ctx, g2: torch.Tensor, g1: torch.Tensor, g_plane: torch.Tensor):
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
        if g_plane is not None:
            dx = dx + g_plane[:, 1:1 + h, 1:1 + w].to(x.dtype)
        return dx.to(x_in.dtype), None


def patch_moments(x: torch.Tensor, shift: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Batch sums of the 3x3 patch products (C, 9, 9) and patches (C, 9) that a stride-1 depthwise conv with zero
    padding 1 sees (maps of at least 2x2) on `x - shift` (a per-channel constant, taken as given: no gradient),
    zero-padded; patch entries in row-major kernel order; float32 for a float32 or lower-precision input, float64
    for float64. Differentiable in x."""
    if shift is None:
        shift = torch.zeros(x.shape[1], dtype=_stat_dtype(x), device=x.device)
    return _PatchMoments.apply(x, shift.detach().to(_stat_dtype(x)))[:2]


@lru_cache(maxsize=None)
def _border_classes(h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """The output positions of a zero-padded 3x3 conv on an h x w map (h, w >= 2) in 9 classes, top / middle /
    bottom row x left / middle / right column: which patch entries each class reads from the padding (9, 9) and
    the fraction of an image's positions in each (9,). On `device`, made once per map size."""
    rows = [(1, {0}), (h - 2, set()), (1, {2})]  # positions, kernel rows in the padding
    cols = [(1, {0}), (w - 2, set()), (1, {2})]
    outside = torch.zeros(9, 9, dtype=torch.float64)
    weight = torch.zeros(9, dtype=torch.float64)
    for ci, ((nr, out_r), (nc, out_c)) in enumerate((r, c) for r in rows for c in cols):
        weight[ci] = nr * nc / (h * w)
        for u in range(9):
            outside[ci, u] = float(u // 3 in out_r or u % 3 in out_c)
    return outside.to(device, dtype), weight.to(device, dtype)


def _window_sums(lines: torch.Tensor, length: int) -> torch.Tensor:
    """Sums of `length` consecutive values starting at 1, 2 and 3 along the last dim: (..., 3)."""
    if length == 0:
        return lines.new_zeros(lines.shape[:-1] + (3,))
    return lines.unfold(-1, length, 1)[..., 1:4, :].sum(-1)


def _border_class_sums(padded: torch.Tensor) -> torch.Tensor:
    """For the map padded by 1 (C, h + 2, w + 2): each patch entry's sum over the positions of each border class
    (C, 9 classes, 9 entries), the middle class left 0. Direct sums over the border strips (no integral image:
    its backward would spread the strips' gradients over the whole map, to cancel there only up to rounding)."""
    c, hp, wp = padded.shape
    h, w = hp - 2, wp - 2
    top, bottom = padded[:, 0:3], padded[:, h - 1:h + 2]  # (C, 3 kernel rows, w + 2)
    left, right = padded[:, :, 0:3].transpose(1, 2), padded[:, :, w - 1:w + 2].transpose(1, 2)  # (C, 3 cols, h+2)
    zero = padded.new_zeros(c, 9)
    classes = [
        top[:, :, 0:3], _window_sums(top, w - 2), top[:, :, w - 1:w + 2],  # [c, kernel row, kernel col]
        _window_sums(left, h - 2).transpose(1, 2), None, _window_sums(right, h - 2).transpose(1, 2),
        bottom[:, :, 0:3], _window_sums(bottom, w - 2), bottom[:, :, w - 1:w + 2],
    ]
    return torch.stack([zero if v is None else v.reshape(c, 9) for v in classes], 1)


class PatchStats(NamedTuple):
    """Moments of the zero-padded 3x3 patches of a stride-1 depthwise conv over the batch and the output
    positions, kept apart so that the branch variances add exact terms (`depthwise_mean_var`). With the shift
    mu (each channel's mean of the map), z = x - mu and z's patches `patch(z)` (zero-padded):
    patch(x) = patch(z) + mu * inside, inside the indicator of the entries that lie on the map."""
    shift: torch.Tensor  # (C,) mu
    mean_z: torch.Tensor  # (C, 9) E[patch(z)]
    cov_z: torch.Tensor  # (C, 9, 9) Cov[patch(z)]
    class_z: torch.Tensor  # (C, 9, 9) [c, class, entry]: E[patch(z)_entry 1{position in class}], 0 in the middle
    outside: torch.Tensor  # (9, 9) [class, entry]: the entry is in the padding at the class's positions
    weight: torch.Tensor  # (9,) fraction of the positions in each class


def _small_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for the (C, 9, 9)-sized algebra after the reductions (negligible work; MPS has no float64)."""
    return torch.float32 if x.device.type == 'mps' else torch.float64


def depthwise_patch_stats(x: torch.Tensor) -> PatchStats:
    """`PatchStats` of x for a stride-1 depthwise 3x3 conv with zero padding 1 (maps of at least 2x2),
    differentiable in x. The reductions over the batch and the map run in float32 (float64 for float64 input) on
    centred values z = x - mu only: their rounding scales with z, not with the mean. The small results are
    returned in float64 (float32 on MPS). mu carries no gradient: the moments are exact for any shift.

    Precision as the mean/std ratio r of a channel grows (`benchmarks/merged_precision.py`, docs/training.md):
    every term is accurate relative to its own size, so the branch variances are off by about eps * r, as the
    branches' BatchNorms are (their convs round x's mean); before this split they were off by eps * r^2.
    """
    dt = _stat_dtype(x)
    n, c, h, w = x.shape
    count = n * h * w
    mu = x.detach().to(dt).mean((0, 2, 3))
    second, first, plane = _PatchMoments.apply(x, mu)
    outside, weight = _border_classes(h, w, x.device, dt)
    class_z = _border_class_sums(plane)
    sd = _small_dtype(x)
    mean_z = first.to(sd) / count
    cov_z = second.to(sd) / count - mean_z[:, :, None] * mean_z[:, None, :]
    return PatchStats(mu.to(sd), mean_z, cov_z, class_z.to(sd) / count, outside.to(sd), weight.to(sd))


def depthwise_mean_var(stats: PatchStats, kernels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Batch mean and biased variance (C, B) of B depthwise 3x3 branches' outputs (kernels (C, B, 9)).

    A branch output is y = y_z + mu S, y_z = K . patch(z) and S = K . inside = sum(K) - O, O the sum of K over the
    entries in the padding (a function of the position's class). So Var(y) = Var(y_z) - 2 mu Cov(y_z, O) + mu^2
    Var(O): the first from z's covariance, the second from sums of z over the border classes (O is 0 inside),
    the third from K's own border sums, none of them a difference of large numbers."""
    k = kernels.to(stats.cov_z.dtype)
    k_out = torch.einsum('cbu,ku->cbk', k, stats.outside)  # O per class: sums of K's entries in the padding
    mean_out = k_out @ stats.weight
    var_out = (k_out - mean_out[..., None]).square() @ stats.weight
    # Cov(y_z, O) = sum_class O_class (E[y_z 1{class}] - weight_class E[y_z])
    cls = stats.class_z - stats.weight[None, :, None] * stats.mean_z[:, None, :]
    cov_out = torch.einsum('cbk,cku,cbu->cb', k_out, cls, k)
    var_z = torch.einsum('cbu,cuv,cbv->cb', k, stats.cov_z, k)
    mu = stats.shift[:, None]
    mean = torch.einsum('cbu,cu->cb', k, stats.mean_z) + mu * (k.sum(-1) - mean_out)
    return mean, var_z - 2 * mu * cov_out + mu * mu * var_out


# -- the merged block


def _refuse(block: nn.Module, what: str) -> ValueError:
    name = getattr(block, 'merged_name', '') or type(block).__name__
    return ValueError(f"train_form='merged' cannot compute {name}: {what}; use train_form='branches'")


_CONV_FORWARDS = (nn.Conv2d.forward, nn.Conv2d._conv_forward)
_BN_FORWARDS = (nn.BatchNorm2d.forward, BatchNormAct2d.forward)


def _check_block(block: nn.Module) -> None:
    """Raise `_refuse` where the block's modules are not what the merged algebra computes: every conv a plain
    zero-padded nn.Conv2d without bias or dilation, the block's groups, the k x k branches alike with padding k // 2
    (so the 1x1 scale branch and the skip sample their centre taps), BatchNorm2d(Act) without activation or drop.
    Read from the modules at every forward (a user may change any of them after construction)."""
    convs = [('conv_kxk.%d.conv' % i, cv.conv) for i, cv in enumerate(block.conv_kxk)]
    if block.conv_scale is not None:
        convs.append(('conv_scale.conv', block.conv_scale.conv))
    first = convs[0][1]
    for name, conv in convs:
        if (type(conv).forward, type(conv)._conv_forward) != _CONV_FORWARDS:
            raise _refuse(block, f'{name} is a {type(conv).__name__}, not a plain nn.Conv2d')
        if conv.padding_mode != 'zeros':
            raise _refuse(block, f'{name} has padding_mode={conv.padding_mode!r} (the merged form pads with zeros)')
        if conv.bias is not None:
            raise _refuse(block, f'{name} has a bias (the BatchNorm after it would remove it)')
        if conv.dilation != (1, 1):
            raise _refuse(block, f'{name} has dilation={conv.dilation}')
        if conv.groups != block.groups:
            raise _refuse(block, f'{name} has groups={conv.groups}, the block has {block.groups}')
        kernel = first.kernel_size if name != 'conv_scale.conv' else (1, 1)
        padding = (kernel[0] // 2, kernel[1] // 2)
        if (conv.kernel_size, conv.padding, conv.stride) != (kernel, padding, first.stride):
            raise _refuse(block, f'{name} has kernel_size={conv.kernel_size}, padding={conv.padding}, '
                                 f'stride={conv.stride} (expected {kernel}, {padding}, {first.stride})')
        if (conv.in_channels, conv.out_channels) != (first.in_channels, first.out_channels):
            raise _refuse(block, f'{name} has {conv.in_channels} -> {conv.out_channels} channels, '
                                 f'conv_kxk.0.conv {first.in_channels} -> {first.out_channels}')
    if first.kernel_size[0] % 2 == 0 or first.kernel_size[1] % 2 == 0:
        raise _refuse(block, f'conv_kxk.0.conv has an even kernel_size={first.kernel_size}')


class _BNMode(NamedTuple):
    batch: bool  # normalizes with the batch's statistics (else with its running statistics)
    update: bool  # updates its running statistics


def _bn_mode(block: nn.Module, name: str, bn: nn.Module) -> _BNMode:
    """What `nn.BatchNorm2d.forward` does with this module's current settings, or `_refuse`."""
    if not isinstance(bn, nn.BatchNorm2d) or type(bn).forward not in _BN_FORWARDS:
        # SyncBatchNorm(Act) is not a BatchNorm2d: its statistics are not this process's batch alone
        raise _refuse(block, f'{name} is a {type(bn).__name__}, not nn.BatchNorm2d')
    for sub in ('act', 'drop'):  # BatchNormAct2d's: identities in a MobileOne branch
        if not isinstance(getattr(bn, sub, nn.Identity()), nn.Identity):
            raise _refuse(block, f'{name}.{sub} is {type(getattr(bn, sub)).__name__}, not nn.Identity')
    has_mean, has_var = bn.running_mean is not None, bn.running_var is not None
    if has_mean != has_var:
        raise _refuse(block, f'{name} has running_mean but no running_var, or the reverse')
    batch = bn.training or not has_mean
    return _BNMode(batch, bn.training and bn.track_running_stats and has_mean)


def _branch_kernels(block: nn.Module) -> Tuple[torch.Tensor, List[Tuple[str, nn.BatchNorm2d]]]:
    """(C_out, B, C_in/g, k, k) kernels of the conv branches (the 1x1 scale branch padded to k x k at its centre,
    which with the branch convs' padding samples the same input positions) and their BatchNorms, named."""
    convs = list(block.conv_kxk)
    kernels = [cv.conv.weight for cv in convs]
    bns = [(f'conv_kxk.{i}.bn', cv.bn) for i, cv in enumerate(convs)]
    if block.conv_scale is not None:
        w = block.conv_scale.conv.weight
        kh, kw = kernels[0].shape[-2:]
        ph, pw = (kh - w.shape[-2]) // 2, (kw - w.shape[-1]) // 2
        kernels.append(F.pad(w, [pw, kw - w.shape[-1] - pw, ph, kh - w.shape[-2] - ph]))
        bns.append(('conv_scale.bn', block.conv_scale.bn))
    return torch.stack(kernels, 1), bns


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
def _update_running(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
    """One BatchNorm's running statistics as nn.BatchNorm2d updates them in training; var biased."""
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    if bn.momentum is not None:
        m = bn.momentum
    else:  # cumulative average (BatchNorm2d's factor is 0 without a batch count)
        m = 1.0 / float(bn.num_batches_tracked) if bn.num_batches_tracked is not None else 0.0
    bn.running_mean.mul_(1 - m).add_(mean.to(bn.running_mean.dtype), alpha=m)
    bn.running_var.mul_(1 - m).add_((var * (count / max(count - 1, 1))).to(bn.running_var.dtype), alpha=m)


class _BatchStats(NamedTuple):
    mean: torch.Tensor  # (C_out, B) every branch's conv output's batch mean
    var: torch.Tensor  # (C_out, B) and biased variance
    count: int  # output positions in the batch
    skip_mean: torch.Tensor  # (C,) the input's own mean and biased variance (the BN skip's, stride 1)
    skip_var: torch.Tensor
    shift: torch.Tensor  # (C_in,) the float32 (float64) channel mean the reductions were centred on


def _branch_stats(block: nn.Module, x: torch.Tensor, kernels: torch.Tensor, how: str, dt: torch.dtype
                  ) -> _BatchStats:
    """Batch statistics of every branch's conv output, from the input's moments (`_BatchStats`)."""
    c_out, n_branches = kernels.shape[:2]
    if how == 'depthwise':
        count = x.shape[0] * x.shape[2] * x.shape[3]
        stats = depthwise_patch_stats(x)
        mean, var = depthwise_mean_var(stats, kernels.reshape(c_out, n_branches, 9))
        # the centre entry visits every position once and is never in the padding
        return _BatchStats(mean, var, count, stats.shift + stats.mean_z[:, 4], stats.cov_z[:, 4, 4],
                           stats.shift.to(dt))
    stride = block.conv_kxk[0].conv.stride
    xs = x.to(dt)
    if stride != (1, 1):
        xs = xs[:, :, ::stride[0], ::stride[1]]
    count = xs.numel() // xs.shape[1]
    shift = xs.mean(dim=(0, 2, 3))
    # centred before the product: the covariance without E[x^2] - E[x]^2 cancellation (the one GEMM over the
    # positions, in float32); the branch means and variances from it in the small dtype
    xc = (xs - shift.view(1, -1, 1, 1)).transpose(0, 1).reshape(xs.shape[1], -1)
    sd = _small_dtype(x)
    residual = xc.mean(1)  # the float32 mean's own rounding (about eps * mean), from centred values
    cov = xc @ xc.t() / count - residual[:, None] * residual[None, :]
    mean_in = shift.to(sd) + residual.to(sd)
    mean = torch.einsum('obp,p->ob', kernels.to(sd).reshape(c_out, n_branches, -1), mean_in)
    # the quadratic forms of centred moments in float32 (B C_out C_in^2 multiply-adds: float64 cost 0.15 s of a
    # 4 s S0 step on 2 CPU cores, for no measured gain)
    k = kernels.to(dt).reshape(c_out, n_branches, -1)
    var = ((k @ cov) * k).sum(-1).to(sd)
    return _BatchStats(mean, var, count, mean_in, torch.diagonal(cov).to(sd), shift)


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


def _affine(bn: nn.BatchNorm2d, dt: torch.dtype, like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    if bn.weight is None:  # affine=False
        return like.new_ones(bn.num_features, dtype=dt), like.new_zeros(bn.num_features, dtype=dt)
    return bn.weight.to(dt), bn.bias.to(dt)


def _drop_path_active(drop_path: nn.Module) -> bool:
    """Whether the block's drop path changes its input now (timm's DropPath: training with a drop probability;
    any other module is called as it is)."""
    if isinstance(drop_path, nn.Identity):
        return False
    if isinstance(drop_path, DropPath):
        return drop_path.training and drop_path.drop_prob > 0
    return True


class _ShiftedConv(torch.autograd.Function):
    """F.conv2d(x - shift, weight) (zero padding, no dilation, no bias; shift a per-channel constant without
    gradient) that keeps x, not x - shift, for its backward: no second activation-sized tensor lives between the
    forward and the backward. Differentiable twice."""

    @staticmethod
    def forward(ctx, x, weight, shift, stride, padding, groups):
        ctx.save_for_backward(x, weight, shift)
        ctx.conf = stride, padding, groups
        return F.conv2d(_shifted(x, shift).to(x.dtype), weight, None, stride, padding, 1, groups)

    @staticmethod
    def backward(ctx, g):
        x, weight, shift = ctx.saved_tensors
        stride, padding, groups = ctx.conf
        need_x, need_w = ctx.needs_input_grad[:2]
        z = _shifted(x, shift).to(x.dtype) if need_w else x  # the input gradient does not read x's values
        dx, dw, _ = torch.ops.aten.convolution_backward(g, z, weight, None, list(stride), list(padding), [1, 1],
                                                        False, [0, 0], groups, (need_x, need_w, False))
        return dx, dw, None, None, None, None


@lru_cache(maxsize=None)
def _inside(size: Tuple[int, int], kernel: Tuple[int, int], stride: Tuple[int, int], padding: Tuple[int, int],
            device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(k*k, output positions): whether each kernel tap lies on the map (1) or in the zero padding (0)."""
    ones = torch.ones(1, 1, *size, device=device, dtype=dtype)
    return F.unfold(ones, kernel, padding=padding, stride=stride)[0]


def _constant_conv(value: torch.Tensor, size: torch.Size, weight: torch.Tensor, bias: torch.Tensor,
                   conv: nn.Conv2d) -> torch.Tensor:
    """F.conv2d of a map holding `value` (C_in,) everywhere (zero padding), plus `bias`: (1, C_out, H', W'), as
    the weights summed against `value` per tap times the taps' inside-the-map pattern (one small matmul; a float64
    grouped conv would take CPU's per-group slow path)."""
    c_out, c_in_g = weight.shape[:2]
    groups = value.shape[0] // c_in_g
    per_out = value.view(groups, 1, c_in_g).expand(groups, c_out // groups, c_in_g).reshape(c_out, c_in_g)
    taps = torch.einsum('oiu,oi->ou', weight.flatten(2), per_out)  # (C_out, k*k)
    inside = _inside(tuple(size), conv.kernel_size, conv.stride, conv.padding, weight.device, weight.dtype)
    ho = (size[0] + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
    return (taps @ inside + bias[:, None]).view(1, c_out, ho, -1)


def _conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, conv: nn.Conv2d, centred: bool,
          shift: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The merged conv. `centred`: as conv(x - mu, W) + (bias + conv(mu, W)), mu each input channel's batch mean
    (`shift`, the statistics' own where they were computed; exact for any constant) (zero in the padding, so the
    second term is a map, computed in the weight's dtype at batch 1). Summed raw,
    the conv's outputs and its weight gradient round in proportion to x's mean (the weight gradient to sqrt(L)
    times the branches' error over L positions, the branches' BatchNorms seeing centred values); centred, they
    round as the branches do. Under autocast the conv runs in autocast's dtype, as F.conv2d would."""
    if not centred:  # the reparameterized conv, as `reparameterize()` builds it
        return F.conv2d(x, weight.to(x.dtype), bias.to(x.dtype), conv.stride, conv.padding, 1, conv.groups)
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    if shift is None:
        shift = x.detach().to(_stat_dtype(x)).mean((0, 2, 3))
    with torch.autocast(x.device.type, enabled=False):
        offset = _constant_conv(shift.to(weight.dtype), x.shape[2:], weight, bias, conv)
        out = _ShiftedConv.apply(x.to(dtype), weight.to(dtype), shift, conv.stride, conv.padding, conv.groups)
        return out + offset.to(dtype)


def merged_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A train-time MobileOneBlock's output before its attention and activation, as one conv (module doc).

    Each BatchNorm does what it would do in the branches form, read from its current settings at every call:
    training mode or eval, `track_running_stats`, `momentum` (None: the cumulative average), `eps`, `affine`.
    Branches that normalize with batch statistics get them from the input's moments (`plan`), the others use
    their running statistics, so frozen or partly frozen BatchNorms train as they would with the branches. Any
    module the merged algebra does not compute is refused (`ValueError`) before anything changes.
    """
    _check_block(block)
    kernels, bns = _branch_kernels(block)
    modes = [_bn_mode(block, name, bn) for name, bn in bns]
    bn_skip = block.identity
    skip_mode = _bn_mode(block, 'identity', bn_skip) if bn_skip is not None else None
    batch = any(m.batch for m in modes) or (skip_mode is not None and skip_mode.batch)
    how = plan(block, tuple(x.shape)) if batch else 'fused'
    if how == 'branches':  # this input needs batch statistics the merged algebra does not compute cheaper
        return block.branch_sum(x)
    if batch and x.shape[0] * x.shape[2] * x.shape[3] == 1:  # as F.batch_norm refuses it (the 1x1 plans do not)
        raise ValueError(f'Expected more than 1 value per channel when training, got input size {x.size()}')
    conv = block.conv_kxk[0].conv
    dt = _small_dtype(x)  # the per-channel algebra (kernels, scales, shifts): negligible work
    if batch:
        with torch.autocast(x.device.type, enabled=False):  # statistics in float32 or wider, also under autocast
            stats = _branch_stats(block, x, kernels, how, _stat_dtype(x))
    means, variances = [], []
    for i, ((_, bn), mode) in enumerate(zip(bns, modes)):
        if mode.batch:
            means.append(stats.mean[:, i])
            variances.append(stats.var[:, i])
            if mode.update:
                _update_running(bn, stats.mean[:, i].detach(), stats.var[:, i].detach(), stats.count)
        else:
            means.append(bn.running_mean.to(dt))
            variances.append(bn.running_var.to(dt))
    mean, var = torch.stack(means, 1), torch.stack(variances, 1)
    affine = [_affine(bn, dt, x) for _, bn in bns]
    gamma = torch.stack([a[0] for a in affine], 1)
    beta = torch.stack([a[1] for a in affine], 1)
    eps = torch.tensor([bn.eps for _, bn in bns], dtype=dt, device=gamma.device)
    skip = None
    if bn_skip is not None:  # its output is x * scale + shift
        if skip_mode.batch:
            skip_mean, skip_var = stats.skip_mean, stats.skip_var
            if skip_mode.update:
                _update_running(bn_skip, skip_mean.detach(), skip_var.detach(), stats.count)
        else:
            skip_mean, skip_var = bn_skip.running_mean.to(dt), bn_skip.running_var.to(dt)
        skip_gamma, skip_beta = _affine(bn_skip, dt, x)
        skip_scale = skip_gamma / torch.sqrt(skip_var + bn_skip.eps)
        skip = skip_scale, skip_beta - skip_mean * skip_scale
    scale = gamma / torch.sqrt(var + eps)
    bias = (beta - scale * mean).sum(1)
    drop = _drop_path_active(block.drop_path)
    fold_skip = skip is not None and not drop
    weight = _merged_kernel(kernels, scale, skip[0] if fold_skip else None)
    if fold_skip:
        bias = bias + skip[1]
    out = _conv(x, weight, bias, conv, centred=batch or (torch.is_grad_enabled() and weight.requires_grad),
                shift=stats.shift.detach() if batch else None)
    if drop:
        out = block.drop_path(out)
        if skip is not None:
            st = _stat_dtype(x)  # elementwise on the whole map: float32 (the float64 small algebra is for C-sized)
            out = out + torch.addcmul(skip[1].to(st).view(1, -1, 1, 1), x.to(st),
                                      skip[0].to(st).view(1, -1, 1, 1)).to(out.dtype)
    return out
