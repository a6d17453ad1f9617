"""Fixtures only; the helpers tests import by name are in helpers.py, the synthetic data in train/synthetic.py.

Nothing heavy is imported at this file's top: under `pytest -n N` the controlling process loads it too, and runs no
test (torch and the models cost it 7 s before any worker starts). Test modules import what they use, models included
(`import timm_mobileone` registers them)."""
import os

import pytest

if os.environ.get('PYTEST_XDIST_WORKER'):
    # pytest -n N: N processes share the cores; one thread each for torch, numpy's OpenBLAS (it read 2 here) and the
    # CLIs the tests start: N x 2 OpenMP threads spinning on 2 cores made single steps up to 100x slower
    # (tests/timm_conformance.py). Set before torch and numpy load: the libraries read these once, at their start.
    for var in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS'):
        os.environ.setdefault(var, '1')
    import torch
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    import torch
    torch.manual_seed(0)


@pytest.fixture(scope='session')
def face_pack(tmp_path_factory):
    """20 pairs of generated face-like crops in an insightface pack (the export and deploy tests' data)."""
    from train.synthetic import make_pack
    return make_pack(tmp_path_factory.mktemp('packs') / 'faces.bin', num_pairs=20, seed=5)
