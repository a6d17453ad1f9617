"""Reparameterization: the fused model computes the train-time model's function, in the fused layout."""
import pytest
import torch
import torch.nn as nn

import timm
from timm.utils import reparameterize_model

from helpers import MODEL_NAMES, calibrate_bn, rel_err

BRANCH_PARTS = ('conv_kxk', 'conv_scale', 'identity', '.bn.', 'norm.', 'dbb_')


def _fused_pair(model_name, dtype, **kwargs):
    model = timm.create_model(model_name, **kwargs).to(dtype)
    calibrate_bn(model, steps=2, batch_size=4, dtype=dtype)
    inputs = torch.randn(2, 3, 112, 112, dtype=dtype)
    with torch.no_grad():
        expected = model(inputs)
        fused = reparameterize_model(model)
        actual = fused(inputs)
    return model, fused, inputs, expected, actual


# float64 over every kind of block: k = 4 / 2 / 1 conv branches (S0, the test model, S4), SE (S4, both test
# models), DBB (its S0 and test model). The other sizes repeat these blocks at other widths; the zoo report
# (`python -m timm_mobileone --json`, `fusion_rel_err_f64`) checks every registered model the same way
F64_MODELS = ['mobileone_112_s0', 'mobileone_112_s4', 'mobileone_112_test', 'mobileone_112_dbb_s0',
              'mobileone_112_dbb_test']


@pytest.mark.parametrize('model_name', F64_MODELS)
def test_fused_equals_train_time_in_float64(model_name):
    _, fused, _, expected, actual = _fused_pair(model_name, torch.float64)
    assert rel_err(actual, expected) <= 1e-8  # rounding is ~1e-15; a fusion bug shows as 1e-3 or more
    assert not [k for k in fused.state_dict() if any(p in k for p in BRANCH_PARTS)]


@pytest.mark.parametrize('model_name', MODEL_NAMES)
def test_fused_layout_is_the_inference_mode_layout(model_name):
    # inference_mode=True builds exactly the fused layout; a DBB model's is the MobileOne model's of its size
    fused = reparameterize_model(timm.create_model(model_name).eval())
    fused_sd = fused.state_dict()
    assert not [k for k in fused_sd if any(p in k for p in BRANCH_PARTS)]
    inputs = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        actual = fused(inputs)
    for name in {model_name, model_name.replace('_dbb_', '_')}:
        built = timm.create_model(name, inference_mode=True).eval()
        built_sd = built.state_dict()
        assert list(built_sd) == list(fused_sd)
        for k in fused_sd:
            assert built_sd[k].shape == fused_sd[k].shape, k
        leaves = [type(m) for m in built.modules() if not list(m.children())]
        assert leaves == [type(m) for m in fused.modules() if not list(m.children())]
        built.load_state_dict(fused_sd)  # strict
        with torch.no_grad():
            torch.testing.assert_close(built(inputs), actual, rtol=0, atol=0)


@pytest.mark.parametrize('kwargs', [dict(num_classes=7), dict(global_pool='avg', num_classes=10),
                                    dict(global_pool='avg', num_classes=0), dict(embed_dim=128),
                                    dict(head_type='conv1x1'), dict(head_type='conv1x1', head_chs=16, num_classes=3)])
def test_fused_equals_train_time_other_heads(kwargs):
    # one head code for every size: the test model's trunk keeps the float64 run short
    _, fused, _, expected, actual = _fused_pair('mobileone_112_test', torch.float64, **kwargs)
    assert actual.shape == expected.shape
    assert rel_err(actual, expected) <= 1e-8


@pytest.mark.parametrize('model_name', ['mobileone_112_s0', 'mobileone_112_s4', 'mobileone_112_dbb_s0'])
def test_fused_equals_train_time_in_float32_with_no_branches_or_batchnorm(model_name):
    model, fused, inputs, expected, actual = _fused_pair(model_name, torch.float32)
    # S4 included: with calibrated BN statistics its SE stages are well conditioned here (seeded)
    assert rel_err(actual, expected) <= 1e-4
    keys = list(fused.state_dict())
    assert not [k for k in keys if any(p in k for p in BRANCH_PARTS)]
    assert not [m for m in fused.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    convs = [m for m in fused.modules() if isinstance(m, nn.Conv2d) and m.bias is not None]
    assert len(convs) >= 2 * 21  # one conv per block (stem + 2 per MobileOne unit) plus the GDC conv
    # the original is untouched (reparameterize_model copies)
    assert any(p in k for k in model.state_dict() for p in ('conv_kxk', 'dbb_'))
    assert fused.head.norm.__class__ is nn.Identity and fused.head.proj.bias is not None
    # fusion keeps the parameter count honest: S0 loses its 4 conv branches and the scale / skip branches
    assert sum(p.numel() for p in fused.parameters()) < sum(p.numel() for p in model.parameters())


def test_reparameterize_in_place_and_idempotent():
    model = calibrate_bn(timm.create_model('mobileone_112_s0'), steps=2, batch_size=4)
    inputs = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        expected = model(inputs)
        model.reparameterize()
        once = {k: v.clone() for k, v in model.state_dict().items()}
        model.reparameterize()  # a second call is a no-op
        twice = model.state_dict()
        actual = model(inputs)
    assert model.inference_mode
    assert once.keys() == twice.keys()
    for k in once:
        torch.testing.assert_close(twice[k], once[k], rtol=0, atol=0)
    assert rel_err(actual, expected) <= 1e-4
    # and reparameterize_model on an already fused model changes nothing either
    again = reparameterize_model(model)
    for k, v in again.state_dict().items():
        torch.testing.assert_close(v, once[k], rtol=0, atol=0)


def test_inference_mode_conv_geometry_matches_branches():
    # timm's own MobileOneBlock(inference_mode=True) builds its conv without padding; ours must not
    built = timm.create_model('mobileone_112_s1', inference_mode=True)
    fused = reparameterize_model(timm.create_model('mobileone_112_s1'))
    for (name, a), (_, b) in zip(built.named_modules(), fused.named_modules()):
        if isinstance(a, nn.Conv2d):
            assert (a.kernel_size, a.stride, a.padding, a.dilation, a.groups) == \
                   (b.kernel_size, b.stride, b.padding, b.dilation, b.groups), name


def test_inference_mode_heads_and_reset():
    built = timm.create_model('mobileone_112_s0', inference_mode=True, num_classes=5).eval()
    assert built(torch.randn(1, 3, 112, 112)).shape == (1, 5)
    built.reset_classifier(0)
    assert built(torch.randn(1, 3, 112, 112)).shape == (1, 512)
