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


# Seconds per test file (its tests, setup and teardown included), one `python -m pytest -q` with a per-test timeline
# on the 2-core AMD EPYC box (2026-12-07, the 352.7 s run in docs/install.md). pytest-xdist (`--dist loadfile`) hands
# the files out in collection order, so they are collected longest first: the last file a worker starts is then a
# short one, and both workers end about together (it sorts by test count otherwise, and a 35 s file started last
# left the other worker idle). A file not listed goes first. Only the order depends on these figures; update them
# when a file's time changes by much.
FILE_SECONDS = {
    'test_deploy.py': 80, 'test_train_face.py': 79, 'test_merged.py': 48, 'test_reparam.py': 38, 'test_export.py': 37,
    'test_distill.py': 36, 'test_timm_conformance.py': 33, 'test_demo.py': 33, 'test_wheel.py': 33, 'test_fuzz.py': 29,
    'test_hub.py': 28, 'test_compare_blocks.py': 27, 'test_mobilefacenet.py': 21, 'test_report.py': 19,
    'test_dbb.py': 16, 'test_eval_cli.py': 14, 'test_align.py': 13, 'test_checkpoint_filter.py': 13,
    'test_faces.py': 13, 'test_eval_imagenet.py': 12, 'test_layout.py': 9, 'test_ijb.py': 8, 'test_partial_fc.py': 7,
    'test_models.py': 7, 'test_timm_conventions.py': 6, 'test_bad_input.py': 3, 'test_train_face_errors.py': 3,
    'test_train_data.py': 1, 'test_registry.py': 1, 'test_eval_metrics.py': 1, 'test_margin.py': 0,
    'test_gallery.py': 0, 'test_eval_data.py': 0, 'test_augment.py': 0, 'test_train_optim.py': 0,
    'test_recordio.py': 0, 'test_train_checkpoint.py': 0,
}


def pytest_configure(config):
    if hasattr(config.option, 'loadscopereorder'):  # pytest-xdist >= 3.6: keep the collection order below
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    """The files longest first (FILE_SECONDS), each file's tests in their own order (a stable sort)."""
    items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, float('inf')))


@pytest.fixture(autouse=True)
def _seed():
    import torch
    torch.manual_seed(0)


@pytest.fixture(scope='session')
def face_pack(tmp_path_factory):
    """20 pairs of generated face-like crops in an insightface pack (the export and deploy tests' data)."""
    from train.synthetic import make_pack
    return make_pack(tmp_path_factory.mktemp('packs') / 'faces.bin', num_pairs=20, seed=5)
