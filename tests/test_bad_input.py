"""Bad arguments and inputs give clear errors."""
import pytest
import torch

import timm
import timm_mobileone  # noqa: F401  (registers the models)


def test_wrong_input_size_names_the_expected_size():
    model = timm.create_model('mobileone_112_s0').eval()
    with pytest.raises(ValueError, match=r'built for 112x112 input'):
        model(torch.randn(1, 3, 128, 128))
    with pytest.raises(ValueError, match=r'112x112'):
        model(torch.randn(1, 3, 96, 96))


def test_img_size_sets_the_gdc_kernel():
    model = timm.create_model('mobileone_112_s0', img_size=128).eval()
    assert model.head.conv_dw.conv.kernel_size == (8, 8)
    assert model(torch.randn(1, 3, 128, 128)).shape == (1, 512)
    with pytest.raises(ValueError, match=r'built for 128x128 input'):
        model(torch.randn(1, 3, 112, 112))
    rect = timm.create_model('mobileone_112_s0', img_size=(112, 96)).eval()
    assert rect(torch.randn(1, 3, 112, 96)).shape == (1, 512)


def test_avg_pool_head_takes_any_size():
    model = timm.create_model('mobileone_112_s0', global_pool='avg', num_classes=10).eval()
    for size in (96, 112, 160):
        assert model(torch.randn(1, 3, size, size)).shape == (1, 10)


@pytest.mark.parametrize('kwargs, match', [
    (dict(embed_dim=0), 'embed_dim must be a positive int'),
    (dict(embed_dim=12.5), 'embed_dim must be a positive int'),
    (dict(num_classes=-1), 'num_classes must be an int >= 0'),
    (dict(num_classes='10'), 'num_classes must be an int >= 0'),
    (dict(global_pool='mean'), 'global_pool must be one of'),
    (dict(img_size=8), 'img_size must be'),
    (dict(in_chans=0), 'in_chans must be a positive int'),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model('mobileone_112_s0', **kwargs)


def test_bad_reset_classifier():
    model = timm.create_model('mobileone_112_s0')
    with pytest.raises(ValueError, match='num_classes'):
        model.reset_classifier(-3)
    with pytest.raises(ValueError, match='global_pool'):
        model.reset_classifier(0, 'nope')


def test_reset_classifier_switches_heads():
    model = timm.create_model('mobileone_112_s0').eval()
    x = torch.randn(1, 3, 112, 112)
    model.reset_classifier(10, 'avg')
    assert model(x).shape == (1, 10) and model.head_hidden_size == model.num_features
    model.reset_classifier(0, 'gdc')
    assert model(x).shape == (1, 512) and model.head_hidden_size == 512
    model.reset_classifier(7)
    assert model(x).shape == (1, 7)
