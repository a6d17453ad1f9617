"""insightface's MXNet checkpoints without MXNet: a bounded reader of `PREFIX-NNNN.params`, the graph check of
`PREFIX-symbol.json`, and a converter to safetensors.

    python -m timm_mobileone.mxnet --model mobilefacenet --params model-0000.params --out mobilefacenet.safetensors

MXNet no longer installs on current Python, but insightface's legacy model zoo (and many checkpoints people still
hold) is MXNet. The `.params` file is MXNet's NDArray-list format (`NDArray::Save` in mxnet's
src/ndarray/ndarray.cc), read here with numpy alone:

    uint64 0x112 (list magic), uint64 reserved,
    uint64 count, count x NDArray, uint64 count, count x (uint64 length, UTF-8 name: 'arg:NAME' / 'aux:NAME')
    NDArray (V2): uint32 0xF993FAC9, int32 storage type (0 = dense), uint32 ndim, int64 dims[ndim],
                  int32 device type, int32 device id, int32 dtype flag, the data (little-endian, C order)
    NDArray (V1: magic 0xF993FAC8, no storage type; legacy: no magic, uint32 ndim then uint32 dims)

Every count, shape and length is checked against the bytes that remain before anything is allocated, so a
truncated, oversized or malformed file raises MXNetError (one line) and never allocates beyond the file's size.

Why a reader plus a converter, and not `timm.create_model(..., checkpoint_path='model-0000.params')`: timm's
`load_checkpoint` reads every non-safetensors file with `torch.load`, which an MXNet file is not, and patching timm
from a plugin would change it for every other model. So the project's CLIs (`eval.*`, `timm_mobileone.export`,
`hub export`, the zoo report) accept the `.params` file as `--checkpoint` directly (`checkpoints.create_model_checked`
converts it in memory), and this package's CLI (`__main__.py`) writes a safetensors file that plain timm loads with
`checkpoint_path=` anywhere.
"""
import json
import re
import struct
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np

from ..errors import UserError

__all__ = ['MXNetError', 'parse_tuple', 'read_params', 'read_symbol', 'symbol_path_for']

LIST_MAGIC = 0x112
V1_MAGIC = 0xF993FAC8
V2_MAGIC = 0xF993FAC9
V3_MAGIC = 0xF993FACA  # numpy-shape semantics (MXNet 1.6+): int32 ndim, may be -1 for unknown
# mshadow type flags (mshadow/base.h)
DTYPES = {0: np.float32, 1: np.float64, 2: np.float16, 3: np.uint8, 4: np.int32, 5: np.int8, 6: np.int64}
MAX_NDIM = 32  # MXNet's own limit (MXNET_SPECIAL_MAX_NDIM)
MAX_NAME = 4096
MAX_ELEMENTS = 1 << 40


class MXNetError(UserError, ValueError):
    """An MXNet file that cannot be used: missing, truncated, malformed, or not the graph expected (one line)."""


class _Reader:
    """Little-endian fields from a bytes buffer; every read checks the bytes that remain."""

    def __init__(self, data: bytes, label: str) -> None:
        self.data = memoryview(data)
        self.pos = 0
        self.label = label

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > self.remaining():
            raise MXNetError(f'{self.label}: truncated or corrupt: {what} needs {n} bytes at offset {self.pos}, '
                             f'{self.remaining()} remain')
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str) -> Tuple:
        return struct.unpack('<' + fmt, self.take(struct.calcsize('<' + fmt), what))


def _read_shape(r: _Reader, ndim_fmt: str, dim_fmt: str, what: str, ndim: Optional[int] = None) -> Tuple[int, ...]:
    if ndim is None:
        (ndim,) = r.unpack(ndim_fmt, f'{what} ndim')
    if ndim == -1:
        raise MXNetError(f'{r.label}: {what} has an unknown shape (ndim -1)')
    if not 0 <= ndim <= MAX_NDIM:
        raise MXNetError(f'{r.label}: {what} declares {ndim} dimensions (at most {MAX_NDIM})')
    dims = r.unpack(dim_fmt * ndim, f'{what} shape') if ndim else ()
    if any(d < 0 for d in dims):
        raise MXNetError(f'{r.label}: {what} declares a negative dimension {tuple(dims)}')
    nonzero = 1
    for d in dims:
        nonzero *= max(d, 1)
    if nonzero > MAX_ELEMENTS:  # even an empty array (a 0 among the dims) cannot be shaped beyond this
        raise MXNetError(f'{r.label}: {what} declares shape {tuple(dims)}: beyond any real checkpoint')
    return tuple(int(d) for d in dims)


def _read_ndarray(r: _Reader, index: int) -> Optional[np.ndarray]:
    what = f'array {index}'
    (magic,) = r.unpack('I', f'{what} header')
    if magic in (V2_MAGIC, V3_MAGIC):
        (stype,) = r.unpack('i', f'{what} storage type')
        if stype != 0:
            raise MXNetError(f'{r.label}: {what} has storage type {stype}; only dense arrays are read '
                             f'(sparse checkpoints are not insightface models)')
        shape = _read_shape(r, 'i' if magic == V3_MAGIC else 'I', 'q', what)
    elif magic == V1_MAGIC:
        shape = _read_shape(r, 'I', 'q', what)
    elif magic <= MAX_NDIM:  # legacy: the word just read is ndim, dims are uint32
        shape = _read_shape(r, 'I', 'I', what, ndim=magic)
    else:
        raise MXNetError(f'{r.label}: {what} starts with {magic:#x}, not an MXNet NDArray header')
    if not shape and magic != V3_MAGIC:
        return None  # MXNet's "none" array
    r.unpack('ii', f'{what} context')
    (flag,) = r.unpack('i', f'{what} dtype')
    if flag not in DTYPES:
        raise MXNetError(f'{r.label}: {what} has unknown dtype flag {flag} (known: float32, float64, float16, '
                         f'uint8, int32, int8, int64)')
    dtype = np.dtype(DTYPES[flag]).newbyteorder('<')
    count = 1
    for d in shape:
        count *= d
    nbytes = count * dtype.itemsize  # Python ints: no overflow however large the declared shape
    raw = r.take(nbytes, f'{what} data of shape {shape} ({dtype.name})')
    return np.frombuffer(raw, dtype=dtype).reshape(shape).astype(dtype.newbyteorder('='), copy=True)


def read_params(path: Union[str, Path]) -> Dict[str, np.ndarray]:
    """The arrays of an MXNet `.params` file by name ('arg:' / 'aux:' prefixes removed), as numpy arrays.

    Raises:
        MXNetError: the file is missing, truncated, declares more than it holds, has an unknown dtype, duplicate or
            missing names, or trailing bytes.
    """
    path = Path(path)
    label = str(path)
    if not path.is_file():
        raise MXNetError(f'{label}: no such file')
    try:
        data = path.read_bytes()
    except OSError as e:
        raise MXNetError(f'{label}: cannot be read ({e.strerror or e})') from None
    r = _Reader(data, label)
    if r.remaining() < 16:
        raise MXNetError(f'{label}: {len(data)} bytes, not an MXNet .params file')
    magic, _ = r.unpack('QQ', 'file header')
    if magic != LIST_MAGIC:
        raise MXNetError(f'{label}: not an MXNet .params file (header {magic:#x}, expected {LIST_MAGIC:#x})')
    (count,) = r.unpack('Q', 'array count')
    if count > r.remaining() // 4:  # each array takes at least one word: a huge count cannot be real
        raise MXNetError(f'{label}: declares {count} arrays in {r.remaining()} bytes: truncated or corrupt')
    arrays = [_read_ndarray(r, i) for i in range(count)]
    (num_names,) = r.unpack('Q', 'name count')
    if num_names != count:
        raise MXNetError(f'{label}: {count} arrays but {num_names} names (an MXNet checkpoint names each array)')
    out: Dict[str, np.ndarray] = {}
    for i in range(num_names):
        (n,) = r.unpack('Q', f'name {i} length')
        if n > MAX_NAME:
            raise MXNetError(f'{label}: name {i} declares {n} bytes (at most {MAX_NAME}): truncated or corrupt')
        try:
            name = bytes(r.take(n, f'name {i}')).decode('utf-8')
        except UnicodeDecodeError:
            raise MXNetError(f'{label}: name {i} is not UTF-8 text') from None
        key = name.split(':', 1)[1] if name[:4] in ('arg:', 'aux:') else name
        if not key or not key.isprintable():
            raise MXNetError(f'{label}: name {i} {name[:60]!r} is not a layer name')
        if key in out:
            raise MXNetError(f'{label}: the name {key!r} appears twice')
        if arrays[i] is None:
            raise MXNetError(f'{label}: {key} holds no data')
        out[key] = arrays[i]
    if r.remaining():
        raise MXNetError(f'{label}: {r.remaining()} bytes after the last name: corrupt, or not one .params file')
    return out


def symbol_path_for(params: Union[str, Path]) -> Path:
    """`PREFIX-symbol.json` beside `PREFIX-NNNN.params` (MXNet's checkpoint naming)."""
    params = Path(params)
    m = re.match(r'^(.*)-\d{4}\.params$', params.name)
    prefix = m.group(1) if m else params.stem
    return params.with_name(f'{prefix}-symbol.json')


def read_symbol(path: Union[str, Path]) -> Dict[str, Dict[str, Any]]:
    """The operator nodes of an MXNet `-symbol.json` graph: {name: {'op', 'attrs', 'inputs' (node names)}}."""
    path = Path(path)
    try:
        graph = json.loads(path.read_text(encoding='utf-8'))
        nodes = graph['nodes']
        out = {}
        for node in nodes:
            attrs = node.get('attrs', node.get('attr', node.get('param', {}))) or {}
            out[str(node['name'])] = dict(op=str(node['op']), attrs={str(k): str(v) for k, v in attrs.items()},
                                          inputs=[str(nodes[i[0]]['name']) for i in node.get('inputs', [])])
        return out
    except OSError as e:
        raise MXNetError(f'{path}: cannot be read ({e.strerror or e})') from None
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise MXNetError(f'{path}: not an MXNet symbol graph ({type(e).__name__}: {str(e)[:100]})') from None


def parse_tuple(text: str) -> Tuple[int, ...]:
    """MXNet's attribute tuples, '(3, 3)' -> (3, 3)."""
    return tuple(int(v) for v in re.findall(r'-?\d+', text))
