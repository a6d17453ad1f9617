"""The merged training form (train_form='merged') computes exactly what the branches compute: outputs, loss,
gradients, running statistics, a training step and the fused model, in float64 at small shapes."""
import copy
import re

import pytest
import torch
import torch.nn.functional as F

import timm

from benchmarks.merged_models import buffer_gap as _buffer_gap, compare, grad_gap as _grad_gap
from helpers import calibrate_bn, rel_err
from timm_mobileone.models.merged import patch_moments, plan
from timm_mobileone.models.mobileone_112 import MobileOneBlock

SIZE = 32  # 32 -> 16 -> 16 -> 8 -> 4 -> 2: every block kind (stride 1 and 2, depthwise and 1x1, the stem) at 2x2+


def _pair(name, **kwargs):
    """A BN-calibrated float64 model in the branches form and a copy in the merged form."""
    model = timm.create_model(name, img_size=SIZE, **kwargs).double()
    calibrate_bn(model, steps=2, batch_size=6, dtype=torch.float64, size=SIZE).train()
    merged = copy.deepcopy(model)
    merged.set_train_form('merged')
    return model, merged


@pytest.fixture(scope='module')
def s0_pair():
    """One BN-calibrated float64 S0 pair, built once (the calibration is most of `_pair`'s time): tests take
    copies (`_copies`)."""
    return _pair('mobileone_112_s0')


def _copy(model, **kwargs):
    """A float64 S0 (with `kwargs`: e.g. drop_path_rate) holding `model`'s weights and statistics, in its form and
    mode: a fresh build plus load_state_dict (strict) is a third of a deepcopy's time."""
    out = timm.create_model('mobileone_112_s0', img_size=SIZE, train_form=model.train_form, **kwargs).double()
    out.load_state_dict(model.state_dict())
    return out.train(model.training)


def _copies(pair, **kwargs):
    return _copy(pair[0], **kwargs), _copy(pair[1], **kwargs)


def _block_kinds(name):
    """Every distinct MobileOne block of `name` at SIZE x SIZE (batch 5): conv kernel, stride, depthwise, conv
    branches, scale and skip branches, its map size and the merged form's plan for it. The SE module is left out: it
    acts on the block's output, after the branches or the merged conv, the same in either form."""
    model = timm.create_model(name, img_size=SIZE)
    kinds = set()

    def record(block, args):
        conv = block.conv_kxk[0].conv
        kinds.add((conv.kernel_size, conv.stride, conv.groups == conv.in_channels > 1, len(block.conv_kxk),
                   block.conv_scale is not None, block.identity is not None, args[0].shape[-1],
                   plan(block, tuple(args[0].shape))))
    for m in model.modules():
        if isinstance(m, MobileOneBlock):
            m.register_forward_pre_hook(record)
    with torch.no_grad():
        model.eval()(torch.randn(5, 3, SIZE, SIZE))
    return kinds


def test_s1_to_s3_hold_no_block_that_s0_and_s4_lack():
    # the whole-model float64 check below runs S0 (4 conv branches) and S4 (1 branch, SE): S1-S3 differ from S4 in
    # widths alone, which changes no block kind, map size or plan here (the block-level property test covers every
    # state of each kind); `python benchmarks/merged_models.py` runs the whole-model check on all five
    covered = _block_kinds('mobileone_112_s0') | _block_kinds('mobileone_112_s4')
    for name in ('mobileone_112_s1', 'mobileone_112_s2', 'mobileone_112_s3'):
        assert _block_kinds(name) <= covered, (name, _block_kinds(name) - covered)


@pytest.mark.parametrize('name', ['mobileone_112_s0', 'mobileone_112_s4'])
def test_merged_equals_branches_in_float64(name, request):
    # bounded by the branches form's own rounding on this machine (the same batch in another order: 3e-12 on the
    # output, 1e-9 on the head's running statistics), not by a fixed number: that gap depends on the CPU's kernels
    model, merged = _copies(request.getfixturevalue('s0_pair')) if name == 'mobileone_112_s0' else _pair(name)
    torch.manual_seed(1)  # the batch below, whichever test built the shared pair
    assert list(model.state_dict()) == list(merged.state_dict())
    x = torch.randn(5, 3, SIZE, SIZE, dtype=torch.float64)
    target = torch.randn(5, 512, dtype=torch.float64)
    result = compare(model, merged, x, target, perm=torch.tensor([3, 0, 4, 1, 2]))
    for key, gap in result['gaps'].items():
        assert gap <= 8 * max(result['floor'][key], 1e-13), (key, gap, result['floor'][key])
    assert result['counters_equal']
    # eval mode and reparameterize(), on the step's reference weights
    assert result['eval_gap'] <= result['eval_tol'] and result['fused_gap'] <= result['eval_tol'], result


def _seeded_outputs(models, x, seed):
    """Each model's output on x after the same seed (DropPath's draws), its gradients left by one backward."""
    outs = []
    for m in models:
        torch.manual_seed(seed)
        y = m(x)
        y.square().sum().backward()
        outs.append(y)
    return outs


def test_merged_with_drop_path_and_other_heads():
    # stochastic depth acts on the conv branches only (the BN skip is added after it); same RNG, same masks
    model, merged = _pair('mobileone_112_s0', drop_path_rate=0.3, head_type='conv1x1', num_classes=7)
    outs = _seeded_outputs((model, merged), torch.randn(4, 3, SIZE, SIZE, dtype=torch.float64), seed=3)
    assert rel_err(outs[1], outs[0]) <= 1e-9
    assert _grad_gap(model, merged) <= 1e-9


def test_merged_checkpoint_loads_into_branches_and_fuses():
    _, merged = _pair('mobileone_112_s1')
    assert merged.training
    merged(torch.randn(4, 3, SIZE, SIZE, dtype=torch.float64))  # a training forward updates the statistics
    plain = timm.create_model('mobileone_112_s1', img_size=SIZE).double()
    plain.load_state_dict(merged.state_dict())  # strict: same keys and shapes
    assert plain.train_form == 'branches' and merged.train_form == 'merged'
    x = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(plain.eval()(x), merged.eval()(x)) <= 1e-9


def test_patch_moments_match_unfolded_patches_and_their_gradient():
    for shape in [(3, 4, 7, 6), (2, 3, 2, 2), (1, 2, 5, 2)]:
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        g2 = torch.randn(shape[1], 9, 9, dtype=torch.float64)
        g1 = torch.randn(shape[1], 9, dtype=torch.float64)
        patches = F.unfold(x, 3, padding=1).view(shape[0], shape[1], 9, -1)
        second = torch.einsum('ncal,ncbl->cab', patches, patches)
        first = patches.sum((0, 3))
        ((second * g2).sum() + (first * g1).sum()).backward()
        expected_grad, x.grad = x.grad.clone(), None
        s, f = patch_moments(x)
        ((s * g2).sum() + (f * g1).sum()).backward()
        assert rel_err(s, second) <= 1e-12 and rel_err(f, first) <= 1e-12
        assert rel_err(x.grad, expected_grad) <= 1e-12


def test_plan_merges_where_it_pays_and_keeps_the_branches_elsewhere():
    s0 = timm.create_model('mobileone_112_s0')
    s1 = timm.create_model('mobileone_112_s1')
    dw, pw = s0.stages[0][0], s0.stages[0][1]  # stage 1: depthwise 3x3 stride 1, 1x1 with 4 branches
    assert plan(dw, (32, 48, 56, 56)) == 'depthwise'
    assert plan(pw, (32, 48, 56, 56)) == 'pointwise'
    assert plan(s0.stages[1][0], (32, 48, 56, 56)) == 'branches'  # stride-2 depthwise
    assert plan(s0.stem, (32, 3, 112, 112)) == 'branches'
    assert plan(s1.stages[0][1], (32, 96, 56, 56)) == 'branches'  # one conv branch: the covariance costs more
    assert plan(s0.stages[3][1], (2, 1024, 7, 7)) == 'branches'  # tiny batch: 4 C^3 dominates


def test_merged_statistics_stay_float32_under_autocast():
    # a bfloat16 block input: the merged block's batch statistics (its running-statistics update) are computed in
    # float32, as a BatchNorm's are; bfloat16 products would be off by ~1e-2
    s0 = timm.create_model('mobileone_112_s0', train_form='merged')
    for block in (s0.stages[0][0], s0.stages[0][1]):  # depthwise and pointwise moments
        x = torch.relu(torch.randn(8, 48, 14, 14)).bfloat16().float()
        a, b = copy.deepcopy(block), copy.deepcopy(block)
        with torch.no_grad():
            expected = a(x)
            with torch.autocast('cpu', dtype=torch.bfloat16):
                actual = b(x).float()
        for (name, p), (_, q) in zip(a.named_buffers(), b.named_buffers()):
            if 'running' in name:
                assert rel_err(q, p) <= 1e-5, name
        assert F.cosine_similarity(actual.flatten(1), expected.flatten(1)).min() > 0.999


def test_train_form_refusals():
    with pytest.raises(ValueError, match="train_form must be one of"):
        timm.create_model('mobileone_112_s0', train_form='fused')
    with pytest.raises(ValueError, match="not exact for DBB blocks"):
        timm.create_model('mobileone_112_dbb_s0', train_form='merged')
    dbb = timm.create_model('mobileone_112_dbb_s0')
    with pytest.raises(ValueError, match="not exact for DBB blocks"):
        dbb.set_train_form('merged')
    assert all(getattr(m, 'train_form', 'branches') == 'branches' for m in dbb.modules())
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(timm.create_model('mobileone_112_s0', train_form='merged'))
    with pytest.raises(ValueError, match=r"stem: conv_kxk.0.bn is a SyncBatchNorm, not nn.BatchNorm2d; use train_form"):
        model(torch.randn(2, 3, 112, 112))


# -- every BatchNorm state, any input offset: a property test on single blocks

# in, out, kernel, stride, group size (1: depthwise, None: full), conv branches: the merged form's three paths
# (depthwise and pointwise statistics, timm's branches for the rest) and its fused conv in every case
BLOCKS = {'depthwise': (4, 4, 3, 1, 1, 2), 'depthwise_s2': (4, 4, 3, 2, 1, 2), 'pointwise': (5, 5, 1, 1, None, 3),
          'pointwise_wide': (3, 6, 1, 1, None, 2), 'full_s2': (3, 4, 3, 2, None, 1)}


def _block_pair(kind, seed, bn_train, untracked, momentum, eps, drop_path, block_train, dtype):
    c_in, c_out, k, stride, group, branches = BLOCKS[kind]
    torch.manual_seed(seed)
    block = MobileOneBlock(c_in, c_out, kernel_size=k, stride=stride, group_size=group,
                           num_conv_branches=branches, drop_path_rate=drop_path)
    bns = [m for m in block.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for i, bn in enumerate(bns):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
            bn.running_mean.normal_(0, 3)
            bn.running_var.uniform_(0.5, 2)
            bn.num_batches_tracked.fill_(i)
            bn.momentum, bn.eps = momentum, eps[i % len(eps)]
            bn.train(bn_train[i % len(bn_train)])
            bn.track_running_stats = not untracked[i % len(untracked)]
    block.drop_path.train(block_train)
    block = block.to(dtype)
    merged = copy.deepcopy(block)
    merged.train_form = 'merged'
    return block, merged


def _block_run(block, x, g, seed, perm=None, channels_last=False):
    """Output, input gradient, parameter gradients and buffers of one forward + backward."""
    block = copy.deepcopy(block)
    x = x.clone().requires_grad_(True)
    xin = x if perm is None else x[perm]
    if channels_last:
        block, xin = block.to(memory_format=torch.channels_last), xin.contiguous(memory_format=torch.channels_last)
    torch.manual_seed(seed)  # DropPath's draws
    out = block(xin)
    if perm is not None:
        out = out[torch.argsort(perm)]
    (out * g.to(out.dtype)).sum().backward()
    return [out.detach(), x.grad] + [p.grad for p in block.parameters()] + list(block.buffers())


def _errors(got, ref):
    """Per tensor: max |a - b| over the reference's max |b| (floored at 1e-6 of the largest in its group)."""
    scale = max(float(r.double().abs().max()) for r in ref if r.is_floating_point())
    return [float((a.double() - b.double()).abs().max()) / max(float(b.double().abs().max()), 1e-6 * scale)
            if b.is_floating_point() else (float('inf') if bool((a != b).any()) else 0.0) for a, b in zip(got, ref)]


def _check_block(kind, seed, bn_train, untracked, momentum, eps, drop_path, block_train, batch, size, offset, scale,
                 dtype):
    # training / eval BatchNorms in any mix (frozen BN fine-tuning among them), track_running_stats switched off
    # after construction, momentum None (cumulative), per-BN eps, stochastic depth on or off by its own mode, an
    # input whose mean is up to 3e4 times its spread, batch 1: merged computes what the branches compute, to a
    # small multiple of the branches' own rounding in that dtype
    block, merged = _block_pair(kind, seed, bn_train, untracked, momentum, eps, drop_path, block_train, dtype)
    gen = torch.Generator().manual_seed(seed)
    c_in = BLOCKS[kind][0]
    x = (offset + scale * torch.randn(batch, c_in, size, size, generator=gen, dtype=torch.float64)).to(dtype)
    out_size = (size - 1) // BLOCKS[kind][3] + 1
    g = torch.randn(batch, BLOCKS[kind][1], out_size, out_size, generator=gen, dtype=torch.float64)
    try:
        ref = _block_run(block, x, g, seed)
    except ValueError as e:  # one value per channel for a BatchNorm that normalizes with the batch
        with pytest.raises(ValueError, match=re.escape(str(e))):
            _block_run(merged, x, g, seed)
        return
    got = _block_run(merged, x, g, seed)
    # the branches' own rounding in this dtype: float32's against the float64 branches; float64's from the same
    # batch reordered or in channels_last, and from float32's scaled by the unit roundoffs' ratio (2^-29: the
    # same sums round in proportion), which reordering misses where the branches' sums are not reordered
    truth = _block_run(copy.deepcopy(block).double(), x.double(), g, seed)
    floor32 = _errors(_block_run(copy.deepcopy(block).float(), x.float(), g, seed), truth)
    if dtype == torch.float64:
        floor = [max(a, b * 2.0 ** -29) for a, b in zip(_errors(_block_run(block, x, g, seed, channels_last=True),
                                                                 ref), floor32)]
        if batch > 1:
            reordered = _block_run(block, x, g, seed, torch.arange(batch).flip(0))
            floor = [max(a, b) for a, b in zip(floor, _errors(reordered, ref))]
        bound = [8 * max(f, 1e-13) for f in floor]
    else:
        ref = truth
        bound = [8 * max(f, 1e-6) for f in floor32]
    errors = _errors(got, ref)
    names = ['output', 'input grad'] + [f'{n} grad' for n, _ in block.named_parameters()] + [
        n for n, _ in block.named_buffers()]
    assert all(e <= b for e, b in zip(errors, bound)), [(n, e, b) for n, e, b in zip(names, errors, bound) if e > b]


def test_merged_block_equals_branches_in_every_state():
    # Hypothesis imported here, not at the top: every pytest-xdist worker collects this file, and the import costs
    # each 2-3 s (benchmarks/fuzz_targets.py, _Strategies)
    from hypothesis import given, settings, strategies as st
    settings(max_examples=30, deadline=None, derandomize=True, database=None)(given(
        kind=st.sampled_from(sorted(BLOCKS)), seed=st.integers(0, 2 ** 16),
        bn_train=st.lists(st.booleans(), min_size=1, max_size=4),
        untracked=st.lists(st.booleans(), min_size=1, max_size=3),
        momentum=st.sampled_from([None, 0.1, 0.7]), eps=st.lists(st.sampled_from([1e-5, 1e-3, 0.1]), min_size=1,
                                                                 max_size=3),
        drop_path=st.sampled_from([0.0, 0.5]), block_train=st.booleans(), batch=st.integers(1, 3),
        size=st.sampled_from([1, 2, 3, 6]), offset=st.sampled_from([0.0, 3.0, 300.0]),
        scale=st.sampled_from([0.01, 1.0, 10.0]), dtype=st.sampled_from([torch.float32, torch.float64]))(
        _check_block))()


def test_frozen_batchnorm_fine_tuning_with_drop_path_equals_branches(s0_pair):
    # every BatchNorm in eval while the model trains (DropPath on by its own mode): the fused conv from the running
    # statistics, stochastic depth on the conv branches with its 1/keep scaling, the skip added after it
    model, merged = _copies(s0_pair, drop_path_rate=0.3)
    for m in (model, merged):
        m.train()
        for bn in m.modules():
            if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
                bn.eval()
    outs = _seeded_outputs((model, merged), torch.randn(3, 3, SIZE, SIZE, dtype=torch.float64), seed=5)
    assert rel_err(outs[1], outs[0]) <= 1e-10
    assert _grad_gap(model, merged) <= 1e-9
    assert _buffer_gap(model, merged) == 0  # nothing updated


@pytest.mark.parametrize('change, message', [
    (lambda b: setattr(b.conv_kxk[1].conv, 'padding_mode', 'reflect'),
     "conv_kxk.1.conv has padding_mode='reflect'"),
    (lambda b: setattr(b.conv_kxk[0].conv, 'bias', torch.nn.Parameter(torch.ones(48, dtype=torch.float64))),
     'conv_kxk.0.conv has a bias'),
    (lambda b: setattr(b.conv_kxk[0].conv, 'dilation', (2, 2)), r'conv_kxk.0.conv has dilation=\(2, 2\)'),
    (lambda b: setattr(b.conv_scale.conv, 'groups', 1), 'conv_scale.conv has groups=1, the block has 48'),
    (lambda b: setattr(b.conv_kxk[2], 'bn', torch.nn.SyncBatchNorm(48).double()),
     'conv_kxk.2.bn is a SyncBatchNorm, not nn.BatchNorm2d'),
    (lambda b: setattr(b.identity, 'act', torch.nn.ReLU()), 'identity.act is ReLU, not nn.Identity'),
])
@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_merged_refuses_what_it_does_not_compute_before_changing_anything(change, message, mode, s0_pair):
    merged = _copy(s0_pair[1])
    getattr(merged, mode)()
    change(merged.stages[0][0])
    before = copy.deepcopy(merged.state_dict())
    with pytest.raises(ValueError, match=f"^train_form='merged' cannot compute stages.0.0: {message}.*; use train_form='branches'$"):
        merged(torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64))
    after = merged.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith('stages.0.0'))


def test_untracked_statistics_set_after_construction_are_not_updated(s0_pair):
    model, merged = _copies(s0_pair)
    for m in (model, merged):
        for bn in m.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.track_running_stats = False
    before = copy.deepcopy(merged.state_dict())
    x = torch.randn(3, 3, SIZE, SIZE, dtype=torch.float64)
    expected = model(x)
    floor = rel_err(model(x.flip(0)).flip(0), expected)  # the branches' own rounding, batch reordered
    assert rel_err(merged(x), expected) <= 8 * max(floor, 1e-13)
    assert all(torch.equal(before[k], v) for k, v in merged.state_dict().items() if 'head' not in k)
