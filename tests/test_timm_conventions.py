"""The calls timm's own models accept, with timm's meaning, on every family this project registers: classifier and
pool removal at creation and after it, `forward_intermediates` at `feature_info`'s levels, and a cfg that says
when the head needs 112x112. (timm's own test file runs on them too: `python -m tests.timm_conformance`.)"""
import pytest
import torch

import timm

FAMILIES = ['mobileone_112_test', 'mobileone_112_dbb_test', 'mobilefacenet']


@pytest.mark.parametrize('name', FAMILIES)
def test_no_classifier_no_pool_then_a_classifier(name):
    # timm's test_model_default_cfgs: num_classes=0, global_pool='' at creation, then reset_classifier(0) and (2)
    model = timm.create_model(name, num_classes=0, global_pool='').eval()
    x = torch.randn(1, 3, 112, 112)
    assert model(x).shape[-2:] == (7, 7) and model(x).ndim == 4
    model.reset_classifier(0)
    model.reset_classifier(2)
    assert list(model.get_classifier().parameters())  # a classifier, as timm's ClassifierHead builds one
    assert model.num_classes == 2
    model.reset_classifier(0, '')  # and back to the unpooled map
    assert model(x).ndim == 4
    # timm's ClassifierHead accepts a classifier without pooling at creation too
    assert list(timm.create_model(name, num_classes=3, global_pool='').get_classifier().parameters())


@pytest.mark.parametrize('name', FAMILIES)
def test_reset_classifier_keeps_the_embedding(name):
    # the default GDC head: removing (or re-adding) the classifier leaves the embedding exactly as it was
    model = timm.create_model(name).eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        before = model(x)
        model.reset_classifier(0)
        assert torch.equal(model(x), before)
        model.reset_classifier(5)
        assert torch.equal(model.forward_head(model.forward_features(x), pre_logits=True), before)
        model.reset_classifier(0, 'gdc')  # the current pool: the same head, not a fresh one
        assert torch.equal(model(x), before)
    assert model.head_hidden_size == before.shape[1]


@pytest.mark.parametrize('name', FAMILIES)
def test_avg_pool_and_back(name):
    model = timm.create_model(name, global_pool='avg', num_classes=4).eval()
    assert model(torch.randn(1, 3, 112, 112)).shape == (1, 4)
    assert model.head_hidden_size == model.num_features
    model.reset_classifier(0, 'gdc')  # a fresh GDC head: the embedding
    assert model(torch.randn(1, 3, 112, 112)).shape == (1, model.embed_dim)


@pytest.mark.parametrize('name', FAMILIES)
def test_forward_intermediates_at_feature_info_levels(name):
    model = timm.create_model(name).eval()
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        assert [t.shape[1] for t in intermediates] == [f['num_chs'] for f in model.feature_info]
        assert [112 // t.shape[-1] for t in intermediates] == [f['reduction'] for f in model.feature_info]
        torch.testing.assert_close(final, model.forward_features(x))
        last = model.forward_intermediates(x, indices=1, intermediates_only=True)
    assert len(last) == 1 and last[0].shape == intermediates[-1].shape


def test_every_head_that_needs_112_says_so():
    import timm_mobileone  # noqa: F401
    names = timm.list_models(module=['mobileone_112', 'dbb', 'mobilefacenet'])
    for name in names:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.fixed_input_size, name
        with pytest.raises(ValueError, match='112'):  # the GDC kernel is the 7x7 map of a 112x112 input
            timm.create_model(name).eval()(torch.randn(1, 3, 64, 64))
