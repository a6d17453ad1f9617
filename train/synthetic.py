"""Synthetic face-like data: JPEG crops, insightface verification packs, RecordIO training packs, image folders.

For the tests, the benchmarks and smoke runs of the training and export pipelines on machines without real faces:
each identity is a smooth random pattern, each of its images that pattern plus noise and a brightness shift, so
that a model can learn to tell identities apart in a few steps. Never a stand-in for quality figures (those come
from real faces: docs/eval.md).
"""
import io
import pickle
from pathlib import Path

import numpy as np

__all__ = ['jpeg_bytes', 'make_pack', 'identity_images', 'write_rec_pack', 'write_image_folder']


def jpeg_bytes(rng, size=(112, 112), quality=90) -> bytes:
    """A smooth random RGB image, JPEG-encoded (smooth so that JPEG keeps it recognisable)."""
    from PIL import Image
    h, w = size
    base = rng.integers(0, 256, size=(h // 8 + 1, w // 8 + 1, 3)).astype(np.uint8)
    img = Image.fromarray(base).resize((w, h), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format='JPEG', quality=quality)
    return buf.getvalue()


def make_pack(path, num_pairs=20, style='array', size=(112, 112), seed=0, issame=None, protocol=4):
    """Write an insightface-style .bin pack: `array` (newer: numpy uint8 arrays) or `bytes` (older) images."""
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
    folder = Path(folder)
    for i, (label, jpg) in enumerate(samples):
        d = folder / f'id_{label:03d}'
        d.mkdir(parents=True, exist_ok=True)
        (d / f'{i:05d}.jpg').write_bytes(jpg)
    return folder
