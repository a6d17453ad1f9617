"""The DBB family's block, the conv1x1 embedding head, and classifier loading through every documented route."""
import logging

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import timm
from timm.utils import reparameterize_model

from timm_mobileone.models.dbb import DBBBlock
from timm_mobileone.models.heads import default_head_chs

from helpers import calibrate_bn, rel_err


def _randomize_bn(module):
    """Non-trivial BN statistics and affine parameters everywhere (eval-mode fusion must use all four)."""
    g = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g, dtype=m.running_mean.dtype))
            m.running_var.copy_(torch.rand(n, generator=g, dtype=m.running_var.dtype) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=g, dtype=m.weight.dtype))
            m.bias.data.copy_(torch.randn(n, generator=g, dtype=m.bias.dtype))
    return module.eval()


@pytest.mark.parametrize('in_chs, out_chs, k, stride, group_size, branches', [
    (3, 16, 3, 2, None, {'dbb_origin', 'dbb_1x1', 'dbb_avg', 'dbb_1x1_kxk'}),  # dense kxk (the stem)
    (8, 8, 3, 1, 1, {'dbb_origin', 'dbb_avg', 'dbb_1x1_kxk'}),  # depthwise: no 1x1 branch, pooled input
    (8, 8, 3, 2, 1, {'dbb_origin', 'dbb_avg', 'dbb_1x1_kxk'}),
    (8, 12, 3, 2, 4, {'dbb_origin', 'dbb_1x1', 'dbb_avg', 'dbb_1x1_kxk'}),  # grouped, not depthwise
    (8, 12, 1, 1, None, {'dbb_origin', 'dbb_1x1_kxk'}),  # 1x1: the kxk-only partners drop out
])
def test_block_branches_and_exact_fusion(in_chs, out_chs, k, stride, group_size, branches):
    block = DBBBlock(in_chs, out_chs, k, stride, group_size=group_size).double()
    present = {n for n in ('dbb_origin', 'dbb_1x1', 'dbb_avg', 'dbb_1x1_kxk') if getattr(block, n) is not None}
    assert present == branches
    depthwise = group_size == 1 and in_chs == out_chs
    # the reference's implicit choices: an identity-based 1x1 where the branch keeps the input's width, twice the
    # width (plain 1x1) for depthwise convs, and no 1x1 conv before the pooling of a depthwise conv
    first = block.dbb_1x1_kxk[0]
    assert first.weight.shape[0] == (2 * in_chs if depthwise else in_chs)
    assert hasattr(block.dbb_1x1_kxk, 'conv1' if depthwise else 'idconv1')
    if block.dbb_avg is not None:
        assert hasattr(block.dbb_avg, 'conv') != depthwise
    _randomize_bn(block)
    x = torch.randn(2, in_chs, 15, 15, dtype=torch.float64)
    with torch.no_grad():
        expected = block(x)
        block.reparameterize()
        actual = block(x)
    assert actual.shape == expected.shape
    assert rel_err(actual, expected) <= 1e-12
    assert [n for n, _ in block.named_children()] == ['attn', 'act', 'reparam_conv']


def test_identity_based_1x1_starts_as_identity():
    block = DBBBlock(6, 6, 1).eval()
    x = torch.randn(1, 6, 5, 5)
    torch.testing.assert_close(block.dbb_1x1_kxk.idconv1(x), x)
    assert 'dbb_1x1_kxk.idconv1.id_tensor' not in block.state_dict()  # a buffer, not a weight


def test_fused_dbb_checkpoint_loads_into_mobileone(tmp_path):
    dbb = calibrate_bn(timm.create_model('mobileone_112_dbb_s0'), steps=2, batch_size=4)
    fused = reparameterize_model(dbb)
    path = tmp_path / 'model_fused.safetensors'
    save_file({k: v.contiguous() for k, v in fused.state_dict().items()}, str(path))
    deploy = timm.create_model('mobileone_112_s0', inference_mode=True, pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(deploy(x), fused(x), rtol=0, atol=0)
        assert rel_err(deploy(x), dbb(x)) <= 1e-4


def test_dbb_has_no_mobileone_branches_and_more_train_params():
    dbb = timm.create_model('mobileone_112_dbb_s1')
    keys = list(dbb.state_dict())
    assert not [k for k in keys if '.conv_scale.' in k or '.identity.' in k or '.conv_kxk.' in k]
    mo = timm.create_model('mobileone_112_s1')
    assert sum(p.numel() for p in dbb.parameters()) > sum(p.numel() for p in mo.parameters())
    assert dbb.pretrained_cfg['tag'] == 'untrained'
    with pytest.raises(RuntimeError, match='No pretrained weights exist') as e:
        timm.create_model('mobileone_112_dbb_s1', pretrained=True)
    assert "'hf-hub:" in str(e.value) and 'apple_in1k' not in str(e.value)  # no ImageNet DBB weights to name


# ---------------------------------------------------------------------------------------------------------------
# the conv1x1 head


def test_conv1x1_head_default_width_keeps_the_gdc_budget():
    for name, chs in (('mobileone_112_s0', 24), ('mobileone_112_s1', 24), ('mobileone_112_dbb_s4', 40)):
        gdc = timm.create_model(name)
        c1 = timm.create_model(name, head_type='conv1x1')
        assert c1.head.head_chs == chs == default_head_chs(gdc.num_features)
        n_gdc = sum(p.numel() for p in gdc.head.parameters())
        n_c1 = sum(p.numel() for p in c1.head.parameters())
        assert 0.7 < n_c1 / n_gdc < 1.3, (name, n_c1, n_gdc)
        assert c1.eval()(torch.randn(1, 3, 112, 112)).shape == (1, 512)


def test_conv1x1_head_fuses_and_refuses_gdc_weights(tmp_path):
    model = timm.create_model('mobileone_112_s0', head_type='conv1x1', head_chs=16)
    assert 'head.conv_pw.conv.weight' in model.state_dict() and 'head.conv_dw.conv.weight' not in model.state_dict()
    fused = reparameterize_model(calibrate_bn(model, steps=2, batch_size=4))
    built = timm.create_model('mobileone_112_s0', head_type='conv1x1', head_chs=16, inference_mode=True)
    built.load_state_dict(fused.state_dict())
    path = tmp_path / 'gdc.pth'
    torch.save(timm.create_model('mobileone_112_s0').state_dict(), path)
    with pytest.raises(RuntimeError, match='conv_pw'):
        timm.create_model('mobileone_112_s0', head_type='conv1x1', checkpoint_path=str(path))


@pytest.mark.parametrize('kwargs, match', [
    (dict(head_type='gap'), 'head_type must be one of'),
    (dict(head_chs=16), "head_chs sets the width of head_type='conv1x1'"),
    (dict(head_type='conv1x1', head_chs=0), 'head_chs must be a positive int'),
])
def test_bad_head_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model('mobileone_112_s0', **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# classifiers: every documented route loads a matching one, and a fresh one is announced


@pytest.fixture(scope='module')
def imagenet_file(tmp_path_factory):
    """timm's mobileone_s1 layout (as Apple's weights are hosted), BN statistics calibrated."""
    source = calibrate_bn(timm.create_model('mobileone_s1'), steps=1, size=64)
    path = tmp_path_factory.mktemp('in1k') / 'model.safetensors'
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    return path, source.state_dict()


@pytest.mark.parametrize('name', ['mobileone_112_s1', 'mobileone_112_s1.apple_in1k'])
def test_bare_and_tagged_names_load_the_imagenet_classifier(imagenet_file, name):
    path, sd = imagenet_file
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              global_pool='avg', num_classes=1000)
    torch.testing.assert_close(model.state_dict()['head.fc.weight'], sd['head.fc.weight'], rtol=0, atol=0)


def test_classifier_of_another_size_is_fresh_with_a_warning(imagenet_file, caplog):
    path, _ = imagenet_file
    with caplog.at_level(logging.WARNING, logger='timm_mobileone.models.mobileone_112'):
        timm.create_model('mobileone_112_s1', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                          global_pool='avg', num_classes=10)
    text = ' '.join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert 'head.fc starts from random initialization' in text and 'head.fc.weight' in text


def test_face_checkpoint_into_a_classifier_model_warns_and_loads(tmp_path, caplog):
    face = timm.create_model('mobileone_112_s0')
    path = tmp_path / 'model.safetensors'
    save_file({k: v.contiguous() for k, v in face.state_dict().items()}, str(path))
    with caplog.at_level(logging.WARNING, logger='timm_mobileone.models.mobileone_112'):
        model = timm.create_model('mobileone_112_s0', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                                  num_classes=7)
    torch.testing.assert_close(model.state_dict()['head.proj.weight'], face.state_dict()['head.proj.weight'])
    assert any('head.fc.weight' in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def test_hub_export_of_a_dbb_checkpoint_deploys_as_mobileone(tmp_path):
    from timm_mobileone import hub
    model = calibrate_bn(timm.create_model('mobileone_112_dbb_s0'), steps=2, batch_size=4)
    ckpt = tmp_path / 'dbb.safetensors'
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    hub.export('mobileone_112_dbb_s0', str(ckpt), 'gen_arcface', str(tmp_path / 'hub'))
    card = (tmp_path / 'hub' / 'README.md').read_text()
    assert 'Diverse Branch Blocks' in card and '`mobileone_112_s0`' in card
    fused = timm.create_model(f'local-dir:{tmp_path / "hub"}', pretrained=True, inference_mode=True).eval()
    deploy = timm.create_model('mobileone_112_s0', inference_mode=True, pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(tmp_path / 'hub' / 'model_fused.safetensors')))
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(deploy.eval()(x), fused(x), rtol=0, atol=0)
        assert rel_err(fused(x), model(x)) <= 1e-4
