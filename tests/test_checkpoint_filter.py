"""Upstream weights: Apple's ml-mobileone checkpoints and timm's `mobileone_s*` (apple_in1k) state dicts."""
import re

import pytest
import torch
from safetensors.torch import save_file

import timm
from timm.utils import reparameterize_model

from helpers import calibrate_bn


def _to_apple_keys(state_dict):
    """timm's MobileOne keys -> apple/ml-mobileone's (the inverse of the documented remap), built independently."""
    out = {}
    for k, v in state_dict.items():
        k = re.sub(r'^stem\.', 'stage0.', k)
        k = re.sub(r'^stages\.(\d+)\.', lambda m: f'stage{int(m.group(1)) + 1}.', k)
        k = k.replace('.conv_kxk.', '.rbr_conv.').replace('.conv_scale.', '.rbr_scale.')
        k = k.replace('.identity.', '.rbr_skip.')
        k = k.replace('.attn.fc1.', '.se.reduce.').replace('.attn.fc2.', '.se.expand.')
        k = re.sub(r'^head\.fc\.', 'linear.', k)
        out[k] = v
    return out


def _timm_mobileone(variant, **kwargs):
    """timm's own ImageNet MobileOne with calibrated (non-default) BN statistics, standing in for Apple's weights."""
    return calibrate_bn(timm.create_model(variant, **kwargs), batch_size=2, size=64)


@pytest.fixture(scope='module')
def sources():
    """`_timm_mobileone(variant)`, built once per variant for the module: the tests read it (state_dict, a forward in
    eval mode) or copy it (`reparameterize_model` returns a fused copy)."""
    built = {}

    def get(variant):
        if variant not in built:
            built[variant] = _timm_mobileone(variant)
        return built[variant]
    return get


def _assert_backbone_loaded(model, source_sd):
    own = model.state_dict()
    stage0_identity = [k for k in own if k.startswith('stages.0.0.identity.')]
    assert stage0_identity, 'stride-1 first block gains a BN skip branch'
    for k, v in source_sd.items():
        if k.startswith('head.'):
            continue
        torch.testing.assert_close(own[k], v, rtol=0, atol=0, msg=k)
    return stage0_identity


@pytest.mark.parametrize('variant', ['mobileone_s0', 'mobileone_s4'])
def test_apple_unfused_checkpoint_via_checkpoint_path(tmp_path, variant, sources):
    source = sources(variant)
    apple_sd = _to_apple_keys(source.state_dict())
    assert any(k.startswith('stage0.rbr_conv.') for k in apple_sd)
    path = tmp_path / f'{variant}_unfused.pth.tar'
    torch.save(apple_sd, path)

    model = timm.create_model(variant.replace('mobileone_', 'mobileone_112_'), checkpoint_path=str(path))
    fresh = _assert_backbone_loaded(model, source.state_dict())
    # the fresh skip branch keeps its initialization (BN weight 1, bias 0, stats 0/1)
    torch.testing.assert_close(model.state_dict()['stages.0.0.identity.weight'],
                               torch.ones_like(model.state_dict()['stages.0.0.identity.weight']))
    assert len(fresh) >= 4
    # the same stem weights give the same stem output as timm's model
    model.eval(), source.eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(model.stem(x), source.stem(x))


def test_apple_checkpoint_via_pretrained_cfg_overlay_keeps_classifier(tmp_path, sources):
    source = sources('mobileone_s1')
    path = tmp_path / 'mobileone_s1_unfused.pth.tar'
    torch.save(_to_apple_keys(source.state_dict()), path)
    model = timm.create_model(
        'mobileone_112_s1.apple_in1k', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
        global_pool='avg', num_classes=1000).eval()
    _assert_backbone_loaded(model, source.state_dict())
    torch.testing.assert_close(model.state_dict()['head.fc.weight'], source.state_dict()['head.fc.weight'])
    assert model(torch.randn(1, 3, 112, 112)).shape == (1, 1000)


def test_apple_fused_checkpoint_into_inference_mode(tmp_path, sources):
    source = reparameterize_model(sources('mobileone_s0'))  # a fused copy
    apple_sd = _to_apple_keys(source.state_dict())
    assert 'stage0.reparam_conv.weight' in apple_sd and 'linear.weight' in apple_sd
    path = tmp_path / 'mobileone_s0.pth.tar'
    torch.save(apple_sd, path)
    model = timm.create_model('mobileone_112_s0', inference_mode=True, checkpoint_path=str(path))
    own = model.state_dict()
    for k, v in source.state_dict().items():
        if not k.startswith('head.'):
            torch.testing.assert_close(own[k], v, rtol=0, atol=0, msg=k)


@pytest.mark.parametrize('variant', ['mobileone_s0', 'mobileone_s2'])
def test_apple_in1k_loader_on_timm_state_dict(tmp_path, variant, sources):
    source = sources(variant)
    path = tmp_path / 'model.safetensors'
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    name = variant.replace('mobileone_', 'mobileone_112_') + '.apple_in1k'

    face = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    _assert_backbone_loaded(face, source.state_dict())
    assert face.global_pool == 'gdc' and face(torch.randn(1, 3, 112, 112)).shape == (1, 512)

    cls = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                            global_pool='avg', num_classes=1000)
    torch.testing.assert_close(cls.state_dict()['head.fc.bias'], source.state_dict()['head.fc.bias'])

    # a different classifier size starts fresh instead of failing
    cls5 = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                             global_pool='avg', num_classes=5)
    assert cls5.head.fc.weight.shape == (5, face.num_features)

    # in_chans adaption of the stem, as timm does for its own weights
    gray = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), in_chans=1).eval()
    assert gray(torch.randn(1, 1, 112, 112)).shape == (1, 512)

    # features_only loads too
    feats = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), features_only=True)
    assert len(feats(torch.randn(1, 3, 112, 112))) == 4


def test_own_checkpoint_round_trip_is_untouched(tmp_path):
    model = calibrate_bn(timm.create_model('mobileone_112_s0', num_classes=3), batch_size=2)  # non-default stats
    path = tmp_path / 'ours.pth'
    torch.save(model.state_dict(), path)
    loaded = timm.create_model('mobileone_112_s0', num_classes=3, checkpoint_path=str(path)).eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_checkpoint_of_another_variant_names_the_mismatch(tmp_path):
    path = tmp_path / 's1.pth'
    torch.save(timm.create_model('mobileone_112_s1').state_dict(), path)
    with pytest.raises(RuntimeError, match=r'size mismatch for stem\.'):
        timm.create_model('mobileone_112_s0', checkpoint_path=str(path))


def test_checkpoint_missing_and_unexpected_keys_are_named(tmp_path):
    sd = timm.create_model('mobileone_112_s0').state_dict()
    del sd['head.proj.weight']
    sd['head.extra.weight'] = torch.zeros(1)
    path = tmp_path / 'broken.pth'
    torch.save(sd, path)
    with pytest.raises(RuntimeError) as e:
        timm.create_model('mobileone_112_s0', checkpoint_path=str(path))
    assert 'head.proj.weight' in str(e.value) and 'head.extra.weight' in str(e.value)


def test_train_time_checkpoint_into_fused_layout_is_refused(tmp_path):
    path = tmp_path / 'train.pth'
    torch.save(timm.create_model('mobileone_112_s0').state_dict(), path)
    with pytest.raises(RuntimeError, match='reparam_conv'):
        timm.create_model('mobileone_112_s0', inference_mode=True, checkpoint_path=str(path))
