"""The face layout every registered model keeps: a 512-d embedding from a 112x112 crop, stage 1 without downsampling
(112 -> 56 stem -> 56 -> 28 -> 14 -> 7), features at those levels.

timm's generic model contract (forward, backward, default cfgs, TorchScript, FX, features, intermediates, pretrained
loading) is timm's own tests/test_models.py, run unchanged on every registered model by
`python -m tests.timm_conformance` (CI runs it after this suite); a copy of it here ran the same checks twice.
"""
import pytest
import torch

import timm

from helpers import MODEL_NAMES

# the DBB family's strides and widths are the MobileOne model's of its size (test_reparam compares their fused
# layouts, every size): one DBB member stands for the family here
LAYOUT_MODELS = [n for n in MODEL_NAMES if '_dbb_' not in n] + ['mobileone_112_dbb_s0']
LEVELS = [56, 28, 14, 7]  # stage 1 keeps the stem's 56x56 (the paper's stage 1 halves it)


@pytest.mark.parametrize('model_name', LAYOUT_MODELS)
def test_face_layout(model_name):
    model = timm.create_model(model_name).eval()
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        embedding = model(x)
        final, intermediates = model.forward_intermediates(x)
        model.set_grad_checkpointing()
        checkpointed = model(x)
    assert embedding.shape == (1, 512) and torch.isfinite(embedding).all()
    torch.testing.assert_close(checkpointed, embedding, rtol=1e-4, atol=1e-5)
    assert model.feature_info[-1]['reduction'] == 16 and model.pretrained_cfg['pool_size'] == (7, 7)
    assert [t.shape[-1] for t in intermediates] == [t.shape[-2] for t in intermediates] == LEVELS
    assert [t.shape[1] for t in intermediates] == [f['num_chs'] for f in model.feature_info]
    assert final.shape[-2:] == (7, 7)

    features = timm.create_model(model_name, features_only=True).eval()
    assert features.feature_info.reduction() == [2, 4, 8, 16]
    with torch.no_grad():
        assert [t.shape[-1] for t in features(x)] == LEVELS


def test_pruned_to_stage_2_ends_at_28x28():
    model = timm.create_model('mobileone_112_s0').eval()
    assert model.prune_intermediate_layers(indices=[1]) == [1]
    with torch.no_grad():
        assert model(torch.randn(1, 3, 112, 112)).shape == (1, model.feature_info[1]['num_chs'], 28, 28)
