"""Registration with timm: names, pretrained cfgs, no clash with timm's own MobileOne."""
import pytest

import timm
from timm.models import model_entrypoint, get_pretrained_cfg

from helpers import MODEL_NAMES


def test_mobileone_and_dbb_variants_registered():
    # S0-S4 of each family, and the tiny `_test` member of each (timm's test_* convention) for the loop's tests
    assert timm.list_models('mobileone_112_*') == sorted(
        [f'mobileone_112_s{i}' for i in range(5)] + [f'mobileone_112_dbb_s{i}' for i in range(5)]
        + ['mobileone_112_test', 'mobileone_112_dbb_test'])
    assert MODEL_NAMES == timm.list_models('mobileone_112_*')
    # each family registered by its own file: MobileOne-112 by the model file, the DBB family with its block
    for name in MODEL_NAMES:
        family = 'dbb' if '_dbb_' in name else 'mobileone_112'
        assert model_entrypoint(name).__module__ == f'timm_mobileone.models.{family}'


def test_conformance_run_covers_every_registered_model():
    # CI's timm conformance step (tests/timm_conformance.py) picks models by timm's registry module, the file that
    # registers them: a family registered from another file must be named there, or it drops out of the run unseen
    from tests import timm_conformance
    ours = {n for n in timm.list_models() if model_entrypoint(n).__module__.startswith('timm_mobileone.')}
    assert set(timm.list_models(module=list(timm_conformance.MODULES))) == ours


def test_no_clash_with_timm_mobileone():
    for i in range(5):
        assert model_entrypoint(f'mobileone_s{i}').__module__ == 'timm.models.byobnet'
    assert set(timm.list_models(module=['mobileone_112', 'dbb'])) == set(MODEL_NAMES)


@pytest.mark.parametrize('name', timm.list_models('mobileone_112_*', include_tags=True))
def test_pretrained_cfg(name):
    cfg = get_pretrained_cfg(name)
    assert cfg.input_size == (3, 112, 112)
    assert cfg.pool_size == (7, 7)
    assert cfg.crop_pct == 1.0 and cfg.interpolation == 'bilinear'
    assert cfg.num_classes == 0
    assert cfg.license and cfg.paper_ids.startswith('arXiv:2206.04040') and cfg.origin_url
    if '_dbb_' in name:
        assert 'arXiv:2103.13425' in cfg.paper_ids
    if cfg.hf_hub_id:
        org, repo = cfg.hf_hub_id.split('/')
        assert org and repo, 'hf_hub_id must be the full <org>/<repo>'


def test_tags_and_defaults():
    tags = timm.list_models('mobileone_112_*', include_tags=True)
    # only weights that exist: Apple's ImageNet weights as timm hosts them; no invented face-weight ids
    assert {t.split('.')[1] for t in tags} == {'apple_in1k', 'untrained'}
    assert {t for t in tags if '_dbb_' in t} == {f'mobileone_112_dbb_s{i}.untrained' for i in range(5)} | {
        'mobileone_112_dbb_test.untrained'}
    for i in range(5):
        apple = get_pretrained_cfg(f'mobileone_112_s{i}.apple_in1k')
        assert apple.hf_hub_id == f'timm/mobileone_s{i}.apple_in1k'
        assert apple.license == 'other'
        assert apple.mean == timm.data.IMAGENET_DEFAULT_MEAN  # what those weights were trained with
        model = timm.create_model(f'mobileone_112_s{i}')
        assert model.pretrained_cfg['tag'] == 'untrained'
    assert set(timm.list_pretrained('mobileone_112_*')) == {f'mobileone_112_s{i}.apple_in1k' for i in range(5)}


def test_face_preprocessing_from_cfg():
    model = timm.create_model('mobileone_112_s1')
    cfg = timm.data.resolve_model_data_config(model)
    assert cfg['input_size'] == (3, 112, 112)
    assert cfg['mean'] == (0.5, 0.5, 0.5) and cfg['std'] == (0.5, 0.5, 0.5)
    assert cfg['crop_pct'] == 1.0 and cfg['interpolation'] == 'bilinear'


def test_pretrained_without_weights_names_what_exists():
    # the headline call: one error naming the ImageNet tag, the Hub / local-dir forms and the trainer
    with pytest.raises(RuntimeError, match='No pretrained weights exist for mobileone_112_s1') as e:
        timm.create_model('mobileone_112_s1', pretrained=True)
    for hint in ("'mobileone_112_s1.apple_in1k'", "'hf-hub:", "'local-dir:", 'python -m train.face'):
        assert hint in str(e.value)
    # a source given at the call passes the check (here: a file that is not there, so timm's loader fails)
    with pytest.raises((FileNotFoundError, RuntimeError, OSError)) as e:
        timm.create_model('mobileone_112_s1', pretrained=True, pretrained_cfg_overlay=dict(file='/nonexistent.pth'))
    assert 'No pretrained weights exist' not in str(e.value)
