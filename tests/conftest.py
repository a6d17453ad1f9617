import pytest
import torch

import timm
import timm_mobileone  # noqa: F401  (registers the models)

MODEL_NAMES = timm.list_models(module='mobileone_112')


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


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _shared_data():
    """The project's shared test data: $TIMM_MOBILEONE_SHARED_DATA, or shared/data beside (or in) the checkout."""
    import os
    from pathlib import Path
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


def jpeg_bytes(rng, size=(112, 112), quality=90) -> bytes:
    """A smooth random RGB image, JPEG-encoded (smooth so that JPEG keeps it recognisable)."""
    import io
    import numpy as np
    from PIL import Image
    h, w = size
    base = rng.integers(0, 256, size=(h // 8 + 1, w // 8 + 1, 3)).astype(np.uint8)
    img = Image.fromarray(base).resize((w, h), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format='JPEG', quality=quality)
    return buf.getvalue()


def make_pack(path, num_pairs=20, style='array', size=(112, 112), seed=0, issame=None, protocol=4):
    """Write an insightface-style .bin pack: `array` (newer: numpy uint8 arrays) or `bytes` (older) images."""
    import pickle
    import numpy as np
    rng = np.random.default_rng(seed)
    bins = []
    for _ in range(2 * num_pairs):
        data = jpeg_bytes(rng, size)
        bins.append(np.frombuffer(data, dtype=np.uint8).reshape(-1, 1).copy() if style == 'array' else data)
    if issame is None:
        issame = [bool(i % 2 == 0) for i in range(num_pairs)]
    with open(path, 'wb') as f:
        pickle.dump((bins, list(issame)), f, protocol=protocol)
    return path


def identity_images(identities=8, per_identity=8, seed=0, size=(112, 112)):
    """Synthetic 'faces': each identity a smooth random pattern, each image of it that pattern plus noise and a
    brightness shift, JPEG-encoded. Returns [(label, jpeg bytes)], identity-major."""
    import io
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    h, w = size
    out = []
    for label in range(identities):
        base = rng.integers(0, 256, size=(h // 16 + 1, w // 16 + 1, 3)).astype(np.uint8)
        pattern = np.asarray(Image.fromarray(base).resize((w, h), Image.BILINEAR), dtype=np.float32)
        for _ in range(per_identity):
            img = pattern + rng.normal(0, 12, size=pattern.shape) + rng.uniform(-20, 20)
            buf = io.BytesIO()
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format='JPEG', quality=90)
            out.append((label, buf.getvalue()))
    return out


def write_rec_pack(folder, samples, property_file=True, header=True):
    """An insightface RecordIO pack (train.rec, train.idx, property) of [(label, jpeg)] via train.recordio."""
    from pathlib import Path
    from train import recordio
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = len(samples)
    identities = max(label for label, _ in samples) + 1
    payloads = [recordio.pack(2, [n + 1, n + 1 + identities], 0, 0, b'')] if header else []
    payloads += [recordio.pack(0, float(label), i + 1, 0, jpg) for i, (label, jpg) in enumerate(samples)]
    if header:  # identity records: label = (first image key, end key), as insightface writes them
        starts = {}
        for i, (label, _) in enumerate(samples):
            starts.setdefault(label, [i + 1, i + 2])[1] = i + 2
        payloads += [recordio.pack(2, starts[c], n + 1 + c, 0, b'') for c in range(identities)]
    recordio.write_records(folder / 'train.rec', payloads)
    if property_file:
        (folder / 'property').write_text(f'{identities},112,112')
    return folder


def write_image_folder(folder, samples):
    """An ImageFolder tree (one folder per identity) of [(label, jpeg)]."""
    from pathlib import Path
    folder = Path(folder)
    for i, (label, jpg) in enumerate(samples):
        d = folder / f'id_{label:03d}'
        d.mkdir(parents=True, exist_ok=True)
        (d / f'{i:05d}.jpg').write_bytes(jpg)
    return folder
