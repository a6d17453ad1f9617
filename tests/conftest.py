"""Fixtures only; the helpers tests import by name are in helpers.py, the synthetic data in train/synthetic.py."""
import os

import pytest
import torch

import timm
import timm_mobileone  # noqa: F401  (registers the models)

from train.synthetic import make_pack

if os.environ.get('PYTEST_XDIST_WORKER'):  # pytest -n N: N processes share the cores; one intra-op thread each,
    torch.set_num_threads(1)                 # and in the CLIs they start: N x 2 OpenMP threads spinning on 2 cores
    os.environ.setdefault('OMP_NUM_THREADS', '1')  # made single steps up to 100x slower (tests/timm_conformance.py)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope='session')
def face_pack(tmp_path_factory):
    """20 pairs of generated face-like crops in an insightface pack (the export and deploy tests' data)."""
    return make_pack(tmp_path_factory.mktemp('packs') / 'faces.bin', num_pairs=20, seed=5)


@pytest.fixture(scope='session')
def calibrated_s0(tmp_path_factory):
    """An S0 state dict with BN statistics calibrated on images like `face_pack`'s (as training would leave them):
    no trained face weights exist, and fresh-init statistics make the outputs meaningless."""
    from timm_mobileone import export
    torch.manual_seed(0)
    images = export.load_face_images(str(make_pack(tmp_path_factory.mktemp('calib') / 'bn.bin', num_pairs=16,
                                                   seed=9)), (3, 112, 112), (0.5,) * 3, (0.5,) * 3, 32)
    model = timm.create_model('mobileone_112_s0').train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.from_numpy(images))
    path = tmp_path_factory.mktemp('ckpt') / 's0.pth'
    torch.save(model.state_dict(), path)
    return path
