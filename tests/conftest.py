"""Fixtures only; the helpers tests import by name are in helpers.py, the synthetic data in train/synthetic.py."""
import os

import pytest
import torch

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
