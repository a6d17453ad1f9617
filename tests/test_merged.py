"""The merged training form (train_form='merged') computes exactly what the branches compute: outputs, loss,
gradients, running statistics, a training step and the fused model, in float64 at small shapes."""
import copy

import pytest
import torch
import torch.nn.functional as F

import timm

from helpers import calibrate_bn, rel_err
from timm_mobileone.models.merged import patch_moments, plan

SIZE = 32  # 32 -> 16 -> 16 -> 8 -> 4 -> 2: every block kind (stride 1 and 2, depthwise and 1x1, the stem) at 2x2+


def _pair(name, **kwargs):
    """A BN-calibrated float64 model in the branches form and a copy in the merged form."""
    model = timm.create_model(name, img_size=SIZE, **kwargs).double()
    calibrate_bn(model, steps=2, batch_size=6, dtype=torch.float64, size=SIZE).train()
    merged = copy.deepcopy(model)
    merged.set_train_form('merged')
    return model, merged


def _grad_gap(a, b) -> float:
    """Worst per-tensor gradient gap, relative to the tensor's gradient (floored at 1e-6 of the whole gradient:
    the head's BN-followed biases have a true gradient of 0 and carry only rounding)."""
    total = torch.cat([p.grad.flatten() for p in a.parameters()]).norm()
    return max(((p.grad - q.grad).norm() / (p.grad.norm() + 1e-6 * total)).item()
               for p, q in zip(a.parameters(), b.parameters()))


def _buffer_gap(a, b) -> float:
    gaps = []
    for (name, x), (name_b, y) in zip(a.named_buffers(), b.named_buffers()):
        assert name == name_b
        # floored at 1e-6: the head's BatchNorm1d sees a zero-mean input (no bias before it), its running mean is
        # rounding alone (1e-16); calibrated statistics elsewhere are O(1)
        gaps.append(((x.double() - y.double()).norm() / (x.double().norm() + 1e-6)).item())
    return max(gaps)


@pytest.mark.parametrize('name', [f'mobileone_112_s{i}' for i in range(5)])
def test_merged_equals_branches_in_float64(name):
    model, merged = _pair(name)
    assert list(model.state_dict()) == list(merged.state_dict())
    x = torch.randn(5, 3, SIZE, SIZE, dtype=torch.float64)
    target = torch.randn(5, 512, dtype=torch.float64)
    losses = []
    for m in (model, merged):
        opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
        loss = F.mse_loss(m(x), target)
        loss.backward()
        losses.append(loss.item())
        opt.step()
    assert abs(losses[0] - losses[1]) <= 1e-9 * abs(losses[0])
    assert _grad_gap(model, merged) <= 1e-9
    assert _buffer_gap(model, merged) <= 1e-9  # running means / variances / batch counts after the step
    # the updated weights (norm-relative, floored: the head's BN biases start at 0 and get rounding-only gradients)
    assert max(((p - q).norm() / (p.norm() + 1e-6)).item()
               for p, q in zip(model.parameters(), merged.parameters())) <= 1e-9
    # eval mode (fused on the fly from the running statistics) and reparameterize(), on the same weights (the
    # network amplifies the steps' 1e-12 rounding gap by 10-1000x: compare functions, not rounding histories)
    merged.load_state_dict(model.state_dict())
    model.eval()
    merged.eval()
    with torch.no_grad():
        expected = model(x)
        assert rel_err(merged(x), expected) <= 1e-9
        merged.reparameterize()
        assert rel_err(merged(x), expected) <= 1e-9


def test_merged_with_drop_path_and_other_heads():
    # stochastic depth acts on the conv branches only (the BN skip is added after it); same RNG, same masks
    model, merged = _pair('mobileone_112_s0', drop_path_rate=0.3, head_type='conv1x1', num_classes=7)
    x = torch.randn(4, 3, SIZE, SIZE, dtype=torch.float64)
    outs = []
    for m in (model, merged):
        torch.manual_seed(3)
        y = m(x)
        y.square().sum().backward()
        outs.append(y)
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
    with pytest.raises(ValueError, match='needs nn.BatchNorm2d'):
        model(torch.randn(2, 3, 112, 112))
