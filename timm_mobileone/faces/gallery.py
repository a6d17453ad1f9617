"""A gallery of face embeddings on disk, and exact nearest-neighbour search over it without an index.

The file is an uncompressed `.npz` (numpy's own container, readable by `np.load` anywhere) holding:

- `embeddings`: (N, D) float16 or float32, L2-normalised rows;
- `paths`: the N photo paths as one UTF-8 blob with `path_offsets` (N + 1 int64), not a fixed-width string array
  (a million paths of up to 200 characters would take 800 MB as numpy's UTF-32);
- `meta`: a UTF-8 JSON object (the model that made the embeddings, its embedding size, the flip setting, ...).

`open_gallery` memory-maps `embeddings` straight from the file (a stored zip member is the `.npy` bytes at an offset),
so a million 512-d entries are searched chunk by chunk with no more memory than one chunk, and no index to build or keep
in step: `search` is exact, not approximate (chunked matrix products, the running top-k merged per chunk): no entry
scoring above the k-th is missed; scores are float32 products (a BLAS kernel rounds a product of another shape
differently, ~1e-7, so copies of one embedding can swap places). Every field is checked against the file's size and the
others before anything is read, so a truncated or tampered file is one `GalleryError` line, never a traceback or a huge
allocation.
"""
import io
import json
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import UserError
from ..files import atomic_write

__all__ = ['GalleryError', 'Gallery', 'save_gallery', 'open_gallery', 'search', 'GALLERY_VERSION']

GALLERY_VERSION = 1
MAX_DIM = 8192
_MEMBERS = ('embeddings', 'paths', 'path_offsets', 'meta')


class GalleryError(UserError):
    """A gallery file that cannot be used (not a gallery, truncated, tampered, another embedding size)."""


@dataclass
class Gallery:
    """An opened gallery: `embeddings` is a read-only memory map; `paths` are decoded on first use."""
    file: Path
    embeddings: np.ndarray
    meta: Dict[str, Any]
    _blob: np.ndarray
    _offsets: np.ndarray

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def path(self, i: int) -> str:
        start, end = int(self._offsets[i]), int(self._offsets[i + 1])
        return bytes(self._blob[start:end]).decode('utf-8', errors='surrogateescape')

    @property
    def paths(self) -> List[str]:
        blob = bytes(self._blob)
        return [blob[a:b].decode('utf-8', errors='surrogateescape')
                for a, b in zip(self._offsets[:-1], self._offsets[1:])]


def save_gallery(file: Union[str, Path], embeddings: np.ndarray, paths: Sequence[str],
                 meta: Optional[Dict[str, Any]] = None, dtype: str = 'float32') -> Path:
    """Write a gallery atomically (a crash leaves the earlier file or none). `embeddings` (N, D) are L2-normalised
    here; `dtype`: 'float32' or 'float16' (half the memory and disk, cosines within ~1e-3)."""
    if dtype not in ('float32', 'float16'):
        raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
    e = np.asarray(embeddings, dtype=np.float64)
    if e.ndim != 2 or e.shape[0] != len(paths) or not 0 < e.shape[1] <= MAX_DIM:
        raise ValueError(f'embeddings {e.shape} do not match {len(paths)} paths (or D is 0 or above {MAX_DIM})')
    if not np.isfinite(e).all():
        raise ValueError('embeddings hold NaN or infinite values')
    norms = np.linalg.norm(e, axis=1, keepdims=True)
    e = (e / np.where(norms > 0, norms, 1)).astype(dtype)
    encoded = [p.encode('utf-8', 'surrogateescape') for p in paths]  # a file name's undecodable bytes, as they were
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    meta = dict(meta or {}, version=GALLERY_VERSION, count=int(e.shape[0]), dim=int(e.shape[1]), dtype=dtype)
    arrays = dict(embeddings=e, paths=np.frombuffer(b''.join(encoded), dtype=np.uint8), path_offsets=offsets,
                  meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    file = Path(file)
    atomic_write(file, lambda f: np.savez(f, **arrays))  # np.savez stores members uncompressed: mappable
    return file


def _member(path: Path, zf: zipfile.ZipFile, name: str, size: int) -> Tuple[np.dtype, Tuple[int, ...], int]:
    """(dtype, shape, byte offset of the data) of one stored `.npy` member, every number checked."""
    try:
        info = zf.getinfo(f'{name}.npy')
    except KeyError:
        raise GalleryError(f'{path}: not a gallery (no {name} in it; make one with `embed`)') from None
    if info.compress_type != zipfile.ZIP_STORED:
        raise GalleryError(f'{path}: {name} is compressed; a gallery stores its arrays uncompressed (np.savez)')
    with open(path, 'rb') as f:
        f.seek(info.header_offset)
        header = f.read(30)
        if len(header) != 30 or header[:4] != b'PK\x03\x04':
            raise GalleryError(f'{path}: {name}: broken zip entry')
        name_len, extra_len = struct.unpack('<HH', header[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        if start + info.file_size > size:
            raise GalleryError(f'{path}: {name} runs past the end of the file (truncated?)')
        f.seek(start)
        npy = f.read(min(info.file_size, 65536))
    buf = io.BytesIO(npy)
    try:
        version = np.lib.format.read_magic(buf)
        shape, fortran, dtype = (np.lib.format.read_array_header_1_0(buf) if version == (1, 0)
                                 else np.lib.format.read_array_header_2_0(buf))
    except Exception as e:  # numpy's header parser raises ValueError, SyntaxError, tokenize.TokenError, ...
        raise GalleryError(f'{path}: {name}: not an array header ({str(e).splitlines()[0][:80]})') from None
    if fortran or dtype.hasobject or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise GalleryError(f'{path}: {name}: an array layout a gallery never holds')
    count = int(np.prod(shape, dtype=object))
    if buf.tell() + count * dtype.itemsize != info.file_size:
        raise GalleryError(f'{path}: {name}: its header declares {shape} of {dtype}, not what the entry holds')
    return dtype, tuple(shape), start + buf.tell()


def open_gallery(file: Union[str, Path], dim: Optional[int] = None) -> Gallery:
    """Open a gallery written by `save_gallery`, its embeddings memory-mapped. `dim`: the embedding size the queries
    have; another is a GalleryError naming both."""
    path = Path(file)
    if not path.is_file():
        raise GalleryError(f'{path}: no such file')
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as zf:
            layout = {name: _member(path, zf, name, size) for name in _MEMBERS}
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, NotImplementedError, ValueError) as e:
        # NotImplementedError: a zip header naming a version or method zipfile does not read
        raise GalleryError(f'{path}: not a gallery file ({str(e).splitlines()[0][:80] if str(e) else "unreadable"})'
                           ) from None
    e_dtype, e_shape, e_at = layout['embeddings']
    if e_dtype not in (np.dtype('<f4'), np.dtype('<f2')) or len(e_shape) != 2 or not 0 < e_shape[1] <= MAX_DIM:
        raise GalleryError(f'{path}: embeddings of {e_dtype} {e_shape}: a gallery holds (N, D) float16 or float32')
    for name, kind in (('paths', np.dtype('u1')), ('path_offsets', np.dtype('<i8')), ('meta', np.dtype('u1'))):
        dtype, shape, _ = layout[name]
        if dtype != kind or len(shape) != 1:
            raise GalleryError(f'{path}: {name} of {dtype} {shape}: not a gallery field')
    n = e_shape[0]
    if layout['path_offsets'][1] != (n + 1,):
        raise GalleryError(f'{path}: {layout["path_offsets"][1][0] - 1} paths for {n} embeddings')
    mm = lambda name: np.memmap(path, dtype=layout[name][0], mode='r', offset=layout[name][2],  # noqa: E731
                                shape=layout[name][1]) if np.prod(layout[name][1]) else np.zeros(layout[name][1],
                                                                                                   layout[name][0])
    offsets = np.array(mm('path_offsets'))
    blob = mm('paths')
    if n + 1 and (offsets[0] != 0 or offsets[-1] != len(blob) or (np.diff(offsets) < 0).any()):
        raise GalleryError(f'{path}: path offsets do not fit the paths (tampered?)')
    try:
        meta = json.loads(bytes(mm('meta')).decode('utf-8'))
    except (UnicodeDecodeError, ValueError):
        raise GalleryError(f'{path}: meta is not a JSON object (tampered?)') from None
    if not isinstance(meta, dict) or meta.get('count') != n or meta.get('dim') != e_shape[1]:
        raise GalleryError(f'{path}: meta says {meta.get("count") if isinstance(meta, dict) else "?"} x '
                           f'{meta.get("dim") if isinstance(meta, dict) else "?"}, the embeddings are {n} x '
                           f'{e_shape[1]} (tampered?)')
    if dim is not None and dim != e_shape[1]:
        raise GalleryError(f'{path}: holds {e_shape[1]}-d embeddings{_made_by(meta)}; the queries are {dim}-d '
                           f'(another model: embed the gallery with the same one)')
    return Gallery(file=path, embeddings=mm('embeddings'), meta=meta, _blob=blob, _offsets=offsets)


def _made_by(meta: Dict[str, Any]) -> str:
    model = meta.get('model')
    return f' made by {model}' if isinstance(model, str) and model else ''


def search(gallery: Union[Gallery, np.ndarray], queries: np.ndarray, k: int = 5,
           chunk: int = 32768) -> Tuple[np.ndarray, np.ndarray]:
    """Exact top-k by cosine: (Q, k') float32 scores, best first, and (Q, k') int64 gallery rows, k' = min(k, N).

    The gallery is read `chunk` rows at a time (a memory map pages them in and out), each chunk's scores a float32
    matrix product, the running top-k merged with the chunk's; equal scores are ordered by row (the k-th score's
    ties keep their lowest rows). Queries are L2-normalised here.
    """
    g = gallery.embeddings if isinstance(gallery, Gallery) else np.asarray(gallery)
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim == 1:
        q = q[None]
    if q.ndim != 2 or q.shape[1] != g.shape[1]:
        raise GalleryError(f'queries of shape {q.shape} for a gallery of {g.shape[1]}-d embeddings')
    if k < 1 or chunk < 1:
        raise ValueError('k and chunk must be >= 1')
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), np.float32(1e-12))
    n, nq = g.shape[0], q.shape[0]
    k = min(k, n)
    best_s = np.full((nq, 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((nq, 0), dtype=np.int64)
    for start in range(0, n, chunk):
        block = np.asarray(g[start:start + chunk], dtype=np.float32)
        scores = q @ block.T  # (Q, C)
        kk = min(k, scores.shape[1])
        if kk < scores.shape[1]:
            part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
            # a tie at the k-th score: argpartition keeps any of the tied rows; the lowest ones are wanted
            kth = np.take_along_axis(scores, part, axis=1).min(axis=1)
            for r in np.flatnonzero((scores >= kth[:, None]).sum(axis=1) > kk):
                rows = np.flatnonzero(scores[r] >= kth[r])
                part[r] = rows[np.lexsort((rows, -scores[r, rows]))[:kk]]
        else:
            part = np.broadcast_to(np.arange(scores.shape[1]), (nq, scores.shape[1]))
        s = np.concatenate([best_s, np.take_along_axis(scores, part, axis=1)], axis=1)
        i = np.concatenate([best_i, part + start], axis=1)
        order = np.lexsort((i, -s), axis=1)[:, :k]  # the k best by (-score, row)
        best_s, best_i = np.take_along_axis(s, order, axis=1), np.take_along_axis(i, order, axis=1)
    return best_s, best_i
