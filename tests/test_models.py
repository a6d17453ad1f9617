"""timm's generic model contract (pytorch-image-models tests/test_models.py), for the mobileone_112 models."""
import pytest
import torch

import timm
from timm.layers import get_channel_dim, get_spatial_dim
from timm.models import get_notrace_functions, get_notrace_modules

from helpers import MODEL_NAMES

try:
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
    has_fx = True
except ImportError:  # pragma: no cover
    has_fx = False


def _input(model, batch_size=1):
    return torch.randn((batch_size, *model.pretrained_cfg['input_size']))


@pytest.mark.base
@pytest.mark.parametrize('model_name', MODEL_NAMES)
def test_model_forward(model_name):
    model = timm.create_model(model_name).eval()
    inputs = _input(model)
    outputs = model(inputs)
    assert outputs.shape == (1, 512)
    assert not torch.isnan(outputs).any(), 'Output included NaNs'

    model.set_grad_checkpointing()
    outputs2 = model(inputs)
    torch.testing.assert_close(outputs2, outputs, rtol=1e-4, atol=1e-5)


@pytest.mark.base
@pytest.mark.parametrize('model_name', MODEL_NAMES)
def test_model_backward(model_name):
    model = timm.create_model(model_name, num_classes=42).train()
    num_params = sum(p.numel() for p in model.parameters())
    outputs = model(_input(model, batch_size=2))
    outputs.mean().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, f'No gradient for {n}'
    num_grad = sum(p.grad.numel() for p in model.parameters() if p.grad is not None)
    assert outputs.shape[-1] == 42
    assert num_params == num_grad, 'Some parameters are missing gradients'
    assert not torch.isnan(outputs).any(), 'Output included NaNs'


@pytest.mark.cfg
@pytest.mark.parametrize('model_name', timm.list_models('mobileone_112_*', include_tags=True))
def test_model_default_cfgs(model_name):
    model = timm.create_model(model_name).eval()
    assert model.num_classes >= 0
    assert model.num_features > 0
    assert model.head_hidden_size > 0
    state_dict = model.state_dict()
    cfg = model.pretrained_cfg
    pool_size = cfg['pool_size']
    spatial_axis = get_spatial_dim('NCHW')
    feat_axis = get_channel_dim('NCHW')
    input_tensor = _input(model)

    outputs = model.forward_features(input_tensor)
    outputs_pre = model.forward_head(outputs, pre_logits=True)
    assert outputs.shape[spatial_axis[0]] == pool_size[0] and outputs.shape[spatial_axis[1]] == pool_size[1]
    assert outputs.shape[feat_axis] == model.num_features
    assert outputs_pre.shape[1] == model.head_hidden_size
    assert model(input_tensor).shape[-1] == (cfg['num_classes'] or model.head_hidden_size)

    model.reset_classifier(0)
    assert model.num_classes == 0
    outputs = model.forward(input_tensor)
    assert outputs.ndim == 2
    assert outputs.shape[1] == model.head_hidden_size
    assert outputs.shape == outputs_pre.shape

    model.reset_classifier(0, '')
    outputs = model.forward(input_tensor)
    assert outputs.ndim == 4
    assert outputs.shape[spatial_axis[0]] == pool_size[0] and outputs.shape[spatial_axis[1]] == pool_size[1]

    model = timm.create_model(model_name, num_classes=0, global_pool='').eval()
    outputs = model.forward(input_tensor)
    assert outputs.ndim == 4
    assert outputs.shape[spatial_axis[0]] == pool_size[0] and outputs.shape[spatial_axis[1]] == pool_size[1]

    # the cfg's classifier names the fc that exists once there are classes
    classifier_state = timm.create_model(model_name, num_classes=10).state_dict()
    assert 'head.fc.weight' in classifier_state
    if cfg.get('classifier'):
        assert cfg['classifier'] + '.weight' in classifier_state
    first_conv = cfg['first_conv']
    first_conv = (first_conv,) if isinstance(first_conv, str) else first_conv
    for fc in first_conv:
        assert fc + '.weight' in state_dict, f'{fc} not in model params'


@pytest.mark.torchscript
@pytest.mark.parametrize('model_name', MODEL_NAMES)
def test_model_forward_torchscript(model_name):
    with timm.set_scriptable(True):
        model = timm.create_model(model_name).eval()
    scripted = torch.jit.script(model)
    inputs = _input(model)
    outputs = scripted(inputs)
    assert outputs.shape == (1, 512)
    assert not torch.isnan(outputs).any()
    torch.testing.assert_close(outputs, model(inputs))


@pytest.mark.features
@pytest.mark.parametrize('model_name', MODEL_NAMES)
def test_model_forward_features(model_name):
    model = timm.create_model(model_name, features_only=True).eval()
    expected_channels = model.feature_info.channels()
    expected_reduction = model.feature_info.reduction()
    assert len(expected_channels) >= 3
    assert expected_reduction == [2, 4, 8, 16]
    inputs = torch.randn(1, 3, 112, 112)
    outputs = model(inputs)
    assert len(outputs) == len(expected_channels)
    for e, r, o in zip(expected_channels, expected_reduction, outputs):
        assert o.shape[1] == e
        assert o.shape[-2:] == (112 // r, 112 // r)
        assert not torch.isnan(o).any()


@pytest.mark.features
@pytest.mark.parametrize('model_name', MODEL_NAMES)
def test_model_forward_intermediates(model_name):
    model = timm.create_model(model_name).eval()
    feature_info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    expected_channels = feature_info.channels()
    expected_reduction = feature_info.reduction()
    assert len(expected_channels) >= 3
    inputs = _input(model)
    output, intermediates = model.forward_intermediates(inputs)
    assert len(intermediates) == len(expected_channels)
    for e, r, o in zip(expected_channels, expected_reduction, intermediates):
        assert o.shape[1] == e
        assert o.shape[-2:] == (112 // r, 112 // r)
    torch.testing.assert_close(output, model.forward_features(inputs))
    assert len(model.forward_intermediates(inputs, indices=2, intermediates_only=True)) == 2

    kept = model.prune_intermediate_layers(indices=[1])
    assert kept == [1]
    assert model(inputs).shape == (1, expected_channels[1], 28, 28)


def _fx(model):
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(
        model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer_kwargs)


@pytest.mark.fxforward
@pytest.mark.skipif(not has_fx, reason='fx needs torchvision feature_extraction')
@pytest.mark.parametrize('model_name', MODEL_NAMES)
def test_model_forward_fx(model_name):
    model = timm.create_model(model_name).eval()
    inputs = _input(model)
    outputs = tuple(_fx(model)(inputs).values())[0]
    assert outputs.shape == (1, 512)
    torch.testing.assert_close(outputs, model(inputs))


@pytest.mark.fxbackward
@pytest.mark.skipif(not has_fx, reason='fx needs torchvision feature_extraction')
@pytest.mark.parametrize('model_name', MODEL_NAMES[:2])
def test_model_backward_fx(model_name):
    model = timm.create_model(model_name, num_classes=42).train()
    num_params = sum(p.numel() for p in model.parameters())
    outputs = tuple(_fx(model)(_input(model, batch_size=2)).values())[0]
    outputs.mean().backward()
    num_grad = sum(p.grad.numel() for p in model.parameters() if p.grad is not None)
    assert outputs.shape[-1] == 42
    assert num_params == num_grad
