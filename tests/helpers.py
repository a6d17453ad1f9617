"""Helpers the tests import by name (fixtures stay in conftest.py): model names, BatchNorm calibration, the shared
real-face data, and the training CLI's resume / error drivers."""
import importlib.util
import os
from pathlib import Path

import pytest
import torch

import timm
import timm_mobileone  # noqa: F401  (registers the models)

MODEL_NAMES = timm.list_models(module=['mobileone_112', 'dbb'])  # MobileOne-112 and its DBB family


def needs_modules(*names: str, hint: str = '') -> pytest.MarkDecorator:
    """Skip where one of the modules `names` is not installed, found without importing it: every pytest-xdist worker
    collects every test file, and importing onnx, scikit-learn, Hypothesis or coremltools there costs each worker
    1-5 s for tests it may never run (the tests import them where they use them)."""
    missing = [name for name in names if importlib.util.find_spec(name) is None]
    return pytest.mark.skipif(bool(missing), reason=f'not installed: {", ".join(missing)}{hint}')


def calibrate_bn(model: torch.nn.Module, steps: int = 3, batch_size: int = 8, dtype=torch.float32, size: int = 112):
    """A few train-mode passes so BatchNorm running statistics match the activations (then eval mode).

    With fresh-init statistics (mean 0, var 1) MobileOne activations grow by orders of magnitude per block, so
    comparisons of raw outputs mean nothing until the statistics are calibrated.
    """
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(batch_size, 3, size, size, dtype=dtype))
    return model.eval()


def calibrated_checkpoint(folder: Path, model_name: str, images: int = 32) -> Path:
    """`folder/<model_name>.pth`: a state dict of `model_name` with BN statistics calibrated (3 train-mode passes) on
    `images` generated face-like crops, as training would leave them: no trained face weights exist, and fresh-init
    statistics make the outputs meaningless."""
    from timm_mobileone import export
    from train.synthetic import make_pack
    torch.manual_seed(0)
    pack = make_pack(folder / 'bn.bin', num_pairs=images // 2, seed=9)
    crops = torch.from_numpy(export.load_face_images(str(pack), (3, 112, 112), (0.5,) * 3, (0.5,) * 3, images))
    model = timm.create_model(model_name).train()
    with torch.no_grad():
        for _ in range(3):
            model(crops)
    path = folder / f'{model_name}.pth'
    torch.save(model.state_dict(), path)
    return path


def forkserver(*preload: str):
    """multiprocessing's forkserver context with `preload` imported once in the server: each process is then forked
    from a server that has imported torch but never computed, at a fork's cost instead of a Python + torch start
    (6 s here). Not a plain fork of the pytest worker: a child forked after the worker ran a backward pass cannot run
    autograd ('Unable to handle autograd's threading in combination with fork-based multiprocessing'), and OpenMP's
    thread pool does not survive a fork. The server is started once per worker; a later call's `preload` applies
    only if none was started yet (the modules are then imported by each child). A child takes 'forkserver' as its
    own default start method: one that starts processes of its own (DataLoader workers) and stands in for a command
    should set the platform's default back (test_train_face's `_one_thread`)."""
    import multiprocessing
    ctx = multiprocessing.get_context('forkserver')
    ctx.set_forkserver_preload(list(preload))
    return ctx


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _shared_data():
    """The project's shared test data: $TIMM_MOBILEONE_SHARED_DATA, or shared/data beside (or in) the checkout."""
    repo = Path(__file__).resolve().parents[1]
    candidates = [os.environ.get('TIMM_MOBILEONE_SHARED_DATA'), repo.parent / 'shared' / 'data',
                  repo / 'shared' / 'data']
    for c in candidates:
        if c and (Path(c) / 'small_lfw.bin').is_file():
            return Path(c)
    return repo.parent / 'shared' / 'data'


SHARED_DATA = _shared_data()
SMALL_LFW = SHARED_DATA / 'small_lfw.bin'
needs_small_lfw = pytest.mark.skipif(not SMALL_LFW.is_file(), reason=f'{SMALL_LFW} not found (shared test data)')


def interrupt_then_resume(monkeypatch, argv, at_step: int = 3):
    """Run `train.face` with Ctrl-C raised before step `at_step + 1` (exit 130, the last checkpoint kept), then
    `--resume` it uninterrupted; returns the resumed run's summary."""
    from train import face, loop
    step = loop.Trainer.train_step

    def interrupted(self, images, labels):
        if self.step == at_step:
            raise KeyboardInterrupt
        return step(self, images, labels)

    monkeypatch.setattr(loop.Trainer, 'train_step', interrupted)
    with pytest.raises(SystemExit) as e:
        face.main(argv)
    assert e.value.code == 130
    monkeypatch.setattr(loop.Trainer, 'train_step', step)
    return face.main(argv + ['--resume'])


def face_error(capsys, argv) -> str:
    """`train.face` refusing `argv`: exit code 2 and one `error:` line, no traceback; returns the line."""
    from train import face
    with pytest.raises(SystemExit) as e:
        face.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith('error: ') and 'Traceback' not in '\n'.join(err)
    return err[-1]


def run_main(module: str, *argv, cwd=None):
    """`python -m module argv...` in this process: (returncode, stdout, stderr) like `subprocess.run`'s result.

    For tests of what a command prints and returns, where the process itself is not the point: a subprocess pays a
    Python + torch start (7-15 s each on a 2-core box). `main(argv)` (the `cli.cli` wrapper) turns user errors into
    SystemExit(2), as the process would exit; any other exception propagates, so a traceback fails the test.
    """
    import contextlib
    import importlib
    import io
    from types import SimpleNamespace
    main = importlib.import_module(module).main
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), contextlib.chdir(cwd or os.getcwd()):
        try:
            main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


LFW_DEV = SHARED_DATA / 'lfw_dev'
needs_lfw_dev = pytest.mark.skipif(not (LFW_DEV / 'pairs.txt').is_file(), reason=f'{LFW_DEV} not found')
FACE_PEOPLE = ['Aaron_Sorkin', 'Abdoulaye_Wade', 'Abdullah_Gul', 'Abel_Pacheco', 'Adam_Sandler']  # 2+ photos each


def lfw_crop(person: str, n: int = 1):
    """An aligned 112x112 lfw_dev crop, BGR (OpenCV's order)."""
    import cv2
    return cv2.imread(str(LFW_DEV / person / f'{person}_{n:04d}.jpg'))


def face_photo(crop, seed: int, size=(300, 260)):
    """An aligned crop put into a larger BGR frame by a random similarity transform (1.6-2.2x, +-12 degrees) on a
    textured background: a photo whose right crop is known."""
    import cv2
    import numpy as np
    rng = np.random.default_rng(seed)
    h, w = size
    scale, angle = rng.uniform(1.6, 2.2), rng.uniform(-12, 12)
    matrix = cv2.getRotationMatrix2D((56, 56), angle, scale)
    matrix[:, 2] += np.array([w / 2, h / 2]) - 56 + rng.uniform(-15, 15, 2)
    background = cv2.resize(rng.integers(0, 256, (h // 20, w // 20, 3), dtype=np.uint8), (w, h))
    face = cv2.warpAffine(crop, matrix, (w, h), flags=cv2.INTER_CUBIC)
    mask = cv2.warpAffine(np.full((112, 112), 255, np.uint8), matrix, (w, h)) > 0
    return np.where(mask[..., None], face, background)
