"""Verification pairs: insightface `.bin` packs, aligned image folders with an LFW `pairs.txt`, embedding files.

In the package (not in `eval/`) because the eval CLIs, INT8 calibration (`timm_mobileone.export`) and training
validation all read the same packs.

A `.bin` pack is a pickle of `(bins, issame_list)`: images 2i and 2i+1 form pair i; `bins` holds JPEG bytes (old
packs: Python-2 pickles) or numpy uint8 arrays of the encoded JPEG (newer packs). A pickle can run code when it is
loaded, so packs are read with an unpickler that builds only what packs hold (containers, bytes, bools, numpy
arrays); anything else is refused before it runs.

Images are decoded lazily, one batch at a time in DataLoader workers (`PairImages`), so memory stays flat as packs
grow; they must already be aligned crops of the model's input size (others are refused, not resized: a silent resize
of unaligned faces would report numbers for a different protocol).
"""
import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .errors import UserError, first_line

__all__ = ['PackError', 'ImageError', 'VerificationSet', 'PairsTxt', 'read_pairs_txt', 'load_pack', 'load_pairs_folder',
           'load_verification_set', 'decode_aligned', 'PairImages', 'collate_images', 'read_npy', 'read_embeddings']


class PackError(UserError, ValueError):
    """A verification file that cannot be used: missing, malformed, unsafe or inconsistent (a user error)."""


# What insightface packs contain: containers, bytes, bools, ints, and numpy arrays / bool scalars. numpy's own
# constructors are NOT handed to the unpickler: ndarray.__setstate__ and dtype.__setstate__ are C code that trusts
# their arguments, and a mutated pack crashed the process in them (a segmentation fault found by
# benchmarks/fuzz_soak.py). The numpy names resolve to the stand-ins below, which check every argument and build
# the array with np.frombuffer; `_unstub` swaps them for real arrays after loading.
_SAFE_GLOBALS = {
    ('builtins', 'list'), ('builtins', 'tuple'), ('builtins', 'dict'), ('builtins', 'set'),
    ('builtins', 'frozenset'), ('builtins', 'bytes'), ('builtins', 'bytearray'), ('builtins', 'bool'),
    ('builtins', 'int'), ('builtins', 'float'), ('builtins', 'str'),
    ('__builtin__', 'list'), ('__builtin__', 'tuple'), ('__builtin__', 'set'), ('__builtin__', 'bytearray'),
    ('_codecs', 'encode'),
}
_PACK_DTYPES = {'u1': np.uint8, 'i1': np.int8, 'b1': np.bool_, '?': np.bool_}
_MAX_ELEMENTS = 1 << 34


class _NdarrayClass:
    """Stands for numpy.ndarray in a pack: only `_reconstruct`'s first argument."""


class _Dtype:
    """Stands for numpy.dtype(descr, align, copy) in a pack: one-byte integer and bool dtypes only."""

    def __init__(self, descr=None, align=False, copy=False) -> None:
        if isinstance(descr, bytes):
            descr = descr.decode('latin1')
        if descr not in _PACK_DTYPES:
            raise pickle.UnpicklingError(f'array dtype {str(descr)[:20]!r} is not one a pack holds (uint8, bool)')
        self.dtype = np.dtype(_PACK_DTYPES[descr])

    def __setstate__(self, state) -> None:
        if not isinstance(state, tuple):
            raise pickle.UnpicklingError('malformed dtype state')


class _ArrayStub:
    """What numpy's `_reconstruct` returns in a pack; `__setstate__` builds the array from checked arguments."""

    def __init__(self) -> None:
        self.array = None

    def __setstate__(self, state) -> None:
        # ndarray.__reduce__'s state: (version, shape, dtype, is_fortran, raw data)
        if not (isinstance(state, tuple) and len(state) == 5):
            raise pickle.UnpicklingError('malformed array state')
        _, shape, dtype, fortran, data = state
        if isinstance(data, str):
            data = data.encode('latin1')
        if not (isinstance(shape, tuple) and all(type(n) is int and 0 <= n <= _MAX_ELEMENTS for n in shape)
                and isinstance(dtype, _Dtype) and isinstance(fortran, bool) and isinstance(data, (bytes, bytearray))):
            raise pickle.UnpicklingError('malformed array state')
        count = 1
        for n in shape:
            count *= n
        if count * dtype.dtype.itemsize != len(data):
            raise pickle.UnpicklingError(f'array of shape {shape} with {len(data)} bytes of data')
        self.array = np.frombuffer(bytes(data), dtype=dtype.dtype).reshape(shape, order='F' if fortran else 'C').copy()


def _reconstruct(cls, shape, typecode) -> _ArrayStub:
    if cls is not _NdarrayClass:
        raise pickle.UnpicklingError('_reconstruct of something other than an ndarray')
    return _ArrayStub()


def _scalar(dtype, data=None):
    if isinstance(data, str):
        data = data.encode('latin1')
    if not (isinstance(dtype, _Dtype) and isinstance(data, (bytes, bytearray)) and len(data) == dtype.dtype.itemsize):
        raise pickle.UnpicklingError('malformed numpy scalar')
    return np.frombuffer(bytes(data), dtype=dtype.dtype)[0]


_NUMPY_STANDINS = {'ndarray': _NdarrayClass, 'dtype': _Dtype, '_reconstruct': _reconstruct, 'scalar': _scalar}
_NUMPY_MODULES = {('numpy', 'ndarray'), ('numpy', 'dtype'),
                  ('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
                  ('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar')}


class _PackUnpickler(pickle.Unpickler):

    def find_class(self, module: str, name: str):
        if (module, name) in _NUMPY_MODULES:
            return _NUMPY_STANDINS[name]
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f'refusing to load {module}.{name}: verification packs hold only '
                                         f'containers, bytes, bools and numpy arrays')
        if module == '__builtin__':
            module = 'builtins'
        return super().find_class(module, name)


def _unstub(obj, depth: int = 0):
    """The loaded pack with its array stand-ins replaced by the arrays (packs nest two or three levels)."""
    if isinstance(obj, _ArrayStub):
        if obj.array is None:
            raise pickle.UnpicklingError('an array without data')
        return obj.array
    if isinstance(obj, (_Dtype, _NdarrayClass)) or obj is _NdarrayClass:
        raise pickle.UnpicklingError('a bare numpy dtype or class')
    if depth < 3 and isinstance(obj, (list, tuple)):
        items = [_unstub(x, depth + 1) for x in obj]
        return items if isinstance(obj, list) else tuple(items)
    return obj


@dataclass
class VerificationSet:
    """Pairs to verify: `images[2i]`, `images[2i+1]` form pair i, `issame[i]` says whether they match.

    `images` holds encoded images (bytes or uint8 arrays) for packs, file paths for folders, or None when only the
    labels were read (for `--embeddings`).
    """
    name: str
    source: str
    issame: np.ndarray
    images: Optional[Sequence[Union[bytes, np.ndarray, str]]] = None
    folds: Optional[int] = None  # the fold count a pairs.txt header declares (LFW: `10 300`), if any
    folds_from: str = 'pairs.txt header'  # where `folds` comes from (CFP: its own split folders)

    @property
    def num_pairs(self) -> int:
        return len(self.issame)


def _one_line(text: str) -> str:
    """A message on one line: pickle's own messages and the module names a pickle asks for can hold newlines."""
    return text.replace('\r', '\\r').replace('\n', '\\n')


def _unpickle(path: Path):
    data = path.read_bytes()
    if not data:
        raise PackError(f'{path}: empty file, not an insightface .bin pack')
    try:
        try:
            return _unstub(_PackUnpickler(io.BytesIO(data)).load())
        except UnicodeDecodeError:
            # Python-2 packs store JPEGs as str: read them as bytes, as insightface does
            return _unstub(_PackUnpickler(io.BytesIO(data), encoding='bytes').load())
    except pickle.UnpicklingError as e:
        if 'refusing to load' in str(e):
            raise PackError(_one_line(f'{path}: {e}')) from None
        raise PackError(_one_line(f'{path}: not an insightface .bin pack, or truncated ({e})')) from None
    except Exception as e:
        # Only the allowed constructors run (see _PackUnpickler), so whatever they or the unpickler raise comes from
        # the bytes: EOFError, ValueError, MemoryError for a declared terabyte, LookupError for an unknown codec
        # name given to _codecs.encode, ... (benchmarks/fuzz_soak.py found the last one)
        raise PackError(_one_line(f'{path}: not an insightface .bin pack, or truncated ({type(e).__name__}: {e})')) \
            from None


def load_pack(path: Union[str, Path], name: Optional[str] = None) -> VerificationSet:
    """Read an insightface verification pack (`lfw.bin`, `cfp_fp.bin`, ...) without decoding its images."""
    path = Path(path)
    if not path.is_file():
        raise PackError(f'{path}: no such file')
    obj = _unpickle(path)
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise PackError(f'{path}: expected a pickle of (bins, issame_list), got {type(obj).__name__}')
    bins, issame = obj
    if not isinstance(bins, (list, tuple)) or not isinstance(issame, (list, tuple, np.ndarray)):
        raise PackError(f'{path}: expected (bins, issame_list) as sequences')
    if len(issame) == 0:
        raise PackError(f'{path}: the pack holds no pairs')
    if len(bins) % 2:
        raise PackError(f'{path}: odd number of images ({len(bins)}); pairs need 2 images each')
    if len(bins) != 2 * len(issame):
        raise PackError(f'{path}: {len(bins)} images but {len(issame)} labels (need 2 images per label)')
    for i, b in enumerate(bins):
        if not (isinstance(b, (bytes, bytearray)) or (isinstance(b, np.ndarray) and b.dtype == np.uint8)):
            raise PackError(f'{path}: image {i} is a {type(b).__name__}, not encoded image bytes')
    try:
        labels = np.array([bool(x) for x in issame], dtype=bool)
    except (TypeError, ValueError):
        raise PackError(f'{path}: issame_list must hold booleans') from None
    return VerificationSet(name=name or path.stem, source=str(path), issame=labels, images=bins)


IMAGE_EXTS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')


def list_images(src: Path, skip: Optional[Path] = None) -> List[str]:
    """Image files under `src`, recursively (hidden files left out), as POSIX paths relative to it, folders and
    files in sorted order; `skip`: a resolved folder left out."""
    import os
    names = []
    for dirpath, dirnames, filenames in os.walk(src):
        here = Path(dirpath)
        if skip is not None:
            dirnames[:] = [d for d in dirnames if (here / d).resolve() != skip]
        dirnames.sort()
        names += [(here / f).relative_to(src).as_posix() for f in sorted(filenames)
                  if Path(f).suffix.lower() in IMAGE_EXTS and not f.startswith('.')]
    return names


def _find_image(root: Path, person: str, number: str, pairs_file: Path, line_no: int) -> str:
    try:
        n = int(number)
    except ValueError:
        raise PackError(f'{pairs_file}:{line_no}: image number {number!r} is not an integer') from None
    stem = root / person / f'{person}_{n:04d}'
    for ext in IMAGE_EXTS:
        candidate = stem.with_name(stem.name + ext)
        try:
            if candidate.is_file():
                return str(candidate)
        except (OSError, ValueError):  # a name too long for the file system (ENAMETOOLONG), a NUL byte
            break
    raise PackError(f'{pairs_file}:{line_no}: no image {stem}.jpg (or .png, ...)')


@dataclass
class PairsTxt:
    """An LFW-style `pairs.txt`: an optional header `folds pairs_per_fold` (`10 300`), then one pair per line,
    `name n1 n2` (the same person) or `name1 n1 name2 n2` (different people)."""
    path: Path
    pairs: List[List[str]]  # each pair line's fields
    line_numbers: List[int]  # each pair's line in the file (1-based), for messages
    folds: Optional[int] = None  # the header's, where there is one
    per_fold: Optional[int] = None

    @property
    def issame(self) -> List[bool]:
        return [len(p) == 3 for p in self.pairs]

    def images(self, i: int) -> Tuple[Tuple[str, str], Tuple[str, str]]:
        """Pair i's two images as (person, number) each."""
        p = self.pairs[i]
        return ((p[0], p[1]), (p[0], p[2])) if len(p) == 3 else ((p[0], p[1]), (p[2], p[3]))

    def people(self) -> set:
        return {name for i in range(len(self.pairs)) for name, _ in self.images(i)}


def read_pairs_txt(path: Union[str, Path]) -> PairsTxt:
    """The one reader of `pairs.txt` (eval's aligned folders, `train.split`, the INT8 benchmark); whatever is wrong
    with the file (missing, not UTF-8 text, a line that is not a pair, no pairs) raises PackError naming the line."""
    path = Path(path)
    if not path.is_file():
        raise PackError(f'{path}: no such file (an aligned folder needs a pairs.txt)')
    try:
        lines = path.read_text(encoding='utf-8').splitlines()
    except UnicodeDecodeError as e:
        raise PackError(f'{path}: not UTF-8 text ({e.reason} at byte {e.start})') from None
    except OSError as e:
        raise PackError(f'{path}: cannot be read ({e.strerror or e})') from None
    out = PairsTxt(path=path, pairs=[], line_numbers=[])
    for line_no, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        if line_no == 1 and len(fields) == 2 and all(f.isdigit() for f in fields):
            # header: folds, pairs per fold (absurd lengths are no header to use, not an int to build)
            out.folds, out.per_fold = (int(f) if len(f) <= 9 else None for f in fields)
            continue
        if len(fields) not in (3, 4):
            raise PackError(f'{path}:{line_no}: expected "name n1 n2" or "name1 n1 name2 n2", got {line!r}')
        out.pairs.append(fields)
        out.line_numbers.append(line_no)
    if not out.pairs:
        raise PackError(f'{path}: no pairs')
    return out


def load_pairs_folder(path: Union[str, Path], name: Optional[str] = None) -> VerificationSet:
    """Aligned images in `<root>/<name>/<name>_<nnnn>.jpg` with an LFW-style `pairs.txt` (`read_pairs_txt`).

    `path` is the folder (holding `pairs.txt`) or the pairs file itself; the header's folds are the protocol's
    where they can split these pairs (else eval's `--num-folds` decides).
    """
    path = Path(path)
    pairs_file = path / 'pairs.txt' if path.is_dir() else path
    root = pairs_file.parent
    parsed = read_pairs_txt(pairs_file)
    images: List[str] = []
    for i, line_no in enumerate(parsed.line_numbers):
        images += [_find_image(root, person, number, pairs_file, line_no) for person, number in parsed.images(i)]
    folds = parsed.folds
    if folds is not None and not 2 <= folds <= len(parsed.pairs):
        folds = None  # a header that cannot define folds over these pairs is ignored (eval uses --num-folds)
    return VerificationSet(name=name or root.name, source=str(pairs_file), issame=np.array(parsed.issame),
                           images=images, folds=folds)


def load_verification_set(path: Union[str, Path]) -> VerificationSet:
    """A `.bin` pack, or a folder / `pairs.txt` of aligned images."""
    path = Path(path)
    if path.is_dir() or path.name == 'pairs.txt' or path.suffix == '.txt':
        return load_pairs_folder(path)
    if not path.exists():
        raise PackError(f'{path}: no such file')
    return load_pack(path)


class ImageError(UserError, ValueError):
    """An encoded image that cannot be used; the message says why, to follow "image N"."""


def sample_bits(img) -> Optional[int]:
    """Bits per sample the file states (TIFF's BitsPerSample; 16 for a PNG Pillow opens as 'I'), else None."""
    tags = getattr(img, 'tag_v2', None)
    if tags is not None and 258 in tags:
        stated = tags[258]
        return int(stated[0] if isinstance(stated, tuple) else stated)
    return 16 if img.format == 'PNG' else None


def to_rgb8(img, bits: Optional[int] = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a decoded Pillow image of any mode, by the mode's range.

    Pillow's own `convert('RGB')` clips integer and float pixels to 0..255, so a 16-bit photo becomes a white or
    saturated image; here 16-bit samples keep their top 8 bits (what `cv2.imread` and so insightface's loader do),
    32-bit integers their top bits by the file's stated sample size, and float pixels in [0, 1] are scaled. A photo
    whose range is unknown (32-bit integers or floats with nothing saying their range) raises ValueError, so it is
    refused per photo rather than aligned from a wrong image. `bits`: the sample size the file states
    (`sample_bits` of the image as opened: a transposed copy has lost the file's tags).
    """
    mode = img.mode
    if mode.startswith('I;16'):  # 16-bit grayscale, either byte order (Pillow gives native-order values)
        gray = (np.asarray(img).astype(np.uint32) >> 8).astype(np.uint8)
    elif mode in ('I', 'F'):
        values = np.asarray(img)
        finite = np.isfinite(values).all()
        low, high = (float(values.min()), float(values.max())) if values.size and finite else (0.0, 0.0)
        if not finite:
            raise ValueError(f'is a {mode} image with NaN or infinite pixels')
        if mode == 'F':
            if low < 0 or high > 1:
                raise ValueError(f'is a 32-bit float image with pixels in [{low:g}, {high:g}]: only [0, 1] has a '
                                 f'known range')
            gray = np.rint(values.astype(np.float64) * 255).astype(np.uint8)
        else:
            if bits is None or not 8 <= bits <= 32 or low < 0 or high >= 2 ** bits:
                raise ValueError(f'is a 32-bit integer image ({bits or "unstated"} bits, pixels {low:g}..{high:g}): '
                                 f'no known range')
            gray = (values.astype(np.int64) >> (bits - 8)).astype(np.uint8)
    else:
        return np.asarray(img.convert('RGB'))
    return np.repeat(gray[:, :, None], 3, axis=2)


def decode_aligned(data: bytes, size: Tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 RGB (writable) of an encoded image that must already be an aligned crop of `size` (h, w).

    Shared by verification (PairImages) and training (train.data). Other sizes raise ImageError, not a resize.
    Pillow, not torchvision.io: torchvision 0.29 deprecates its image decoders.
    """
    from PIL import Image
    h, w = size
    try:
        with Image.open(io.BytesIO(data)) as img:
            # the header's size is checked before any pixel is decoded: a few hundred bytes can declare a
            # 100,000 x 100,000 image (Pillow only warns below 2x its MAX_IMAGE_PIXELS, and would decode 500 MB)
            if img.size != (w, h):
                raise ImageError(f'is {img.size[0]}x{img.size[1]}, expected aligned {w}x{h} crops (images are not '
                                 f'resized; photos: align them first, python -m eval.align, or eval\'s --align)')
            img.load()
            rgb = np.array(to_rgb8(img, sample_bits(img)))
    except ImageError:
        raise
    except Image.UnidentifiedImageError:  # its message names the BytesIO object, an address
        raise ImageError('cannot be decoded (not an image format Pillow reads)') from None
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        # PIL: truncated files are OSErrors; some broken headers raise the others; to_rgb8: no known range
        raise ImageError(f'cannot be decoded ({first_line(e)})') from None
    if rgb.shape[:2] != (h, w):
        raise ImageError(f'is {rgb.shape[1]}x{rgb.shape[0]}, expected aligned {w}x{h} crops (images are not resized)')
    return rgb


class PairImages(torch.utils.data.Dataset):
    """Decodes the images of a VerificationSet, one per item, to uint8 CHW RGB tensors (in DataLoader workers).

    A decoding failure or a wrong size does not raise in the worker: the item carries the message, and
    `collate_images` hands it to the main process, which raises a clean PackError naming the image.
    """

    def __init__(self, dataset: VerificationSet, input_size: Tuple[int, int]) -> None:
        self.images = dataset.images
        self.source = dataset.source
        self.input_size = tuple(input_size)

    def __len__(self) -> int:
        return len(self.images)

    def _encoded(self, index: int) -> bytes:
        item = self.images[index]
        if isinstance(item, str):
            try:
                return Path(item).read_bytes()
            except OSError as e:
                raise ImageError(f'cannot be decoded ({first_line(e)})') from None
        return item.tobytes() if isinstance(item, np.ndarray) else bytes(item)

    def __getitem__(self, index: int) -> Tuple[int, torch.Tensor, str]:
        try:
            rgb = decode_aligned(self._encoded(index), self.input_size)
        except ImageError as e:
            return index, torch.zeros(3, *self.input_size, dtype=torch.uint8), f'{self.source}: image {index} {e}'
        return index, torch.from_numpy(rgb).permute(2, 0, 1), ''


def collate_images(items):
    indices = [i for i, _, _ in items]
    errors = [e for _, _, e in items if e]
    return indices, torch.stack([img for _, img, _ in items]), errors


def read_npy(path: Union[str, Path], what: str = '', mmap: bool = False) -> np.ndarray:
    """A numeric array from a `.npy` file, refused with PackError before any allocation when its header declares
    more data than the file holds (a 100-byte file can declare 10^12 elements), or when it holds pickles.

    `mmap=True` maps the file read-only (features of IJB-C's 469k images need not fit in memory).
    """
    path = Path(path)
    label = f'{what} {path}'.strip()
    if not path.is_file():
        raise PackError(f'{label}: no such file')
    try:
        with open(path, 'rb') as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            offset = f.tell()
    except Exception as e:  # numpy parses the header with Python's tokenizer and literal_eval: many error types
        raise PackError(f'{label}: not a .npy array ({first_line(e)})') from None
    if dtype.hasobject:
        raise PackError(f'{label}: holds Python objects (pickles), not numbers')
    declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
    available = path.stat().st_size - offset
    if declared > available:
        raise PackError(f'{label}: its header declares shape {shape} of {dtype} ({declared} bytes) but the file '
                        f'holds {available}: truncated or corrupt')
    try:
        return np.load(path, allow_pickle=False, mmap_mode='r' if mmap else None)
    except (ValueError, OSError, EOFError, TypeError, OverflowError, MemoryError) as e:
        raise PackError(f'{label}: not a .npy array ({first_line(e)})') from None


def read_embeddings(path: Union[str, Path], num_pairs: int) -> np.ndarray:
    """A (2N, D) float array of interleaved pair embeddings from a `.npy` file (no pickles)."""
    path = Path(path)
    emb = read_npy(path)
    if emb.ndim != 2 or not np.issubdtype(emb.dtype, np.number):
        raise PackError(f'{path}: expected a 2-D numeric array (2N x D), got shape {emb.shape} of {emb.dtype}')
    if emb.shape[0] != 2 * num_pairs:
        raise PackError(f'{path}: {emb.shape[0]} embeddings for {num_pairs} pairs (need {2 * num_pairs})')
    if not np.isfinite(emb).all():
        raise PackError(f'{path}: embeddings hold NaN or inf')
    return emb
