"""Hostile input, as properties: every reader of a file a stranger hands us, fed broken versions of real files.

Shared by `tests/test_fuzz.py` (CI: a few hundred Hypothesis examples in all) and `benchmarks/fuzz_soak.py` (the same
properties for many minutes, plus the CLIs end to end). Each target is (a Hypothesis strategy of file contents, a
function that writes them under a folder and calls the project's reader, the project's error types for that
reader). The property: the reader accepts the input or raises one of its own error types with a message; nothing
else (no other exception, no hang, no large allocation).

Inputs start from valid files of each format and are broken the ways files break: truncated at any offset, bytes
overwritten or inserted, header fields set to huge or negative values, text lines with wrong fields, numbers that are
NaN or out of range, invalid UTF-8, NUL bytes.
"""
import io
import json
import pickle
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Tuple

import numpy as np
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


# ----------------------------------------------------------------------------------------------------------------
# byte-level mutations of a valid file


HUGE = [2 ** 31 - 1, 2 ** 32 - 1, 2 ** 40, 10 ** 12, 2 ** 63 - 1, 2 ** 64 - 1, 500 << 20]


def _apply(data: bytes, ops) -> bytes:
    out = bytearray(data)
    for kind, pos, payload in ops:
        if not out:
            out = bytearray(payload)
            continue
        pos %= len(out) + 1
        if kind == 'truncate':
            del out[pos:]
        elif kind == 'overwrite':
            out[pos:pos + len(payload)] = payload
        elif kind == 'insert':
            out[pos:pos] = payload
        elif kind == 'delete':
            del out[pos:pos + max(1, len(payload))]
    return bytes(out)


def _payloads():
    return st.one_of(
        st.binary(min_size=1, max_size=16),
        st.sampled_from(HUGE).flatmap(lambda n: st.sampled_from([
            struct.pack('<Q', n % 2 ** 64), struct.pack('<I', n % 2 ** 32), struct.pack('<i', -(n % 2 ** 31)),
            str(n).encode()])),
        st.sampled_from([b'\x00', b'\xff' * 4, b'nan', b'-1', b'inf', b'\xc3\x28', b'\n', b' ']),
    )


def mutated(valid: bytes, max_ops: int = 4):
    """Strategy: `valid` broken by 0..max_ops truncations, overwrites, inserts and deletions (or random bytes)."""
    ops = st.lists(st.tuples(st.sampled_from(['truncate', 'overwrite', 'overwrite', 'insert', 'delete']),
                             st.integers(0, max(1, len(valid))), _payloads()), min_size=1, max_size=max_ops)
    return st.one_of(ops.map(lambda o: _apply(valid, o)), st.binary(max_size=256))


# ----------------------------------------------------------------------------------------------------------------
# valid seeds


def tiny_jpeg(seed: int = 0, size=(112, 112)) -> bytes:
    from PIL import Image
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, size=(size[0] // 8, size[1] // 8, 3), dtype=np.uint8)).resize(
        (size[1], size[0]))
    buf = io.BytesIO()
    img.save(buf, format='JPEG', quality=60)
    return buf.getvalue()


def pack_bytes(num_pairs: int = 3, style: str = 'array', protocol: int = 4, image: bytes = b'\xff\xd8jpeg') -> bytes:
    """An insightface .bin pack: `array` (numpy uint8 arrays, newer packs) or `bytes` images (older packs)."""
    bins = [np.frombuffer(image, dtype=np.uint8).reshape(-1, 1).copy() if style == 'array' else image
            for _ in range(2 * num_pairs)]
    return pickle.dumps((bins, [i % 2 == 0 for i in range(num_pairs)]), protocol=protocol)


# pickle opcode snippets that declare much more than they hold, nest deeply, or call what a pack never holds
PICKLE_SNIPPETS = [
    b'\x80\x04\x8e' + struct.pack('<Q', 10 ** 12) + b'ab.',  # BINBYTES8, 1 TB declared
    b'\x80\x04\x95' + struct.pack('<Q', 2 ** 62) + b'.',  # FRAME
    b'\x80\x04B' + struct.pack('<I', 2 ** 32 - 1) + b'.',  # BINBYTES
    b'\x80\x04\x8b' + struct.pack('<i', 2 ** 31 - 1) + b'.',  # LONG4
    b'\x80\x04' + b']' * 20000 + b'a' * 19999 + b'.',  # 20,000-deep nested list
    b'\x80\x04' + b'(' * 5000 + b'.',  # unbalanced MARKs
    b'cos\nsystem\n(S"true"\ntR.',  # code execution
    b'cbuiltins\neval\n(S"1"\ntR.',
    b'\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85C\x01b\x87R(K\x01J\x00\x10\xa5\xd4'
    b'\x85cnumpy\ndtype\nX\x02\x00\x00\x00u1\x89\x88\x87R(K\x03X\x01\x00\x00\x00|NNNJ\xff\xff\xff\xffJ\xff\xff\xff'
    b'\xffK\x00tb\x89C\x00tb.',  # an ndarray declaring 10^12 elements with no data
]


def npy_bytes(shape=(6, 8), dtype='<f4') -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.random.default_rng(0).standard_normal(shape).astype(dtype))
    return buf.getvalue()


def npy_with_header(header: dict, data: bytes) -> bytes:
    text = repr(header).encode('latin1')
    pad = 64 - (10 + len(text) + 1) % 64
    text += b' ' * pad + b'\n'
    return b'\x93NUMPY\x01\x00' + struct.pack('<H', len(text)) + text + data


def safetensors_bytes() -> bytes:
    import torch
    from safetensors.torch import save
    return save({'a.weight': torch.randn(4, 3), 'a.bias': torch.zeros(4), 'b.running_var': torch.ones(2)})


def safetensors_with_header(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack('<Q', len(text)) + text + data


def torch_checkpoint_bytes() -> bytes:
    import torch
    buf = io.BytesIO()
    torch.save({'state_dict': {'a.weight': torch.randn(4, 3), 'a.bias': torch.zeros(4)}}, buf)
    return buf.getvalue()


def recordio_files(num_images: int = 3) -> Dict[str, bytes]:
    """{'train.rec', 'train.idx', 'property'} of a valid insightface pack (header record, images, identities)."""
    import tempfile
    from train import recordio
    samples = [(i % 2, tiny_jpeg(i)) for i in range(num_images)]
    n, identities = len(samples), 2
    payloads = [recordio.pack(2, [n + 1, n + 1 + identities], 0, 0, b'')]
    payloads += [recordio.pack(0, float(label), i + 1, 0, jpg) for i, (label, jpg) in enumerate(samples)]
    payloads += [recordio.pack(2, [1 + c, 2 + c], n + 1 + c, 0, b'') for c in range(identities)]
    with tempfile.TemporaryDirectory() as d:
        recordio.write_records(Path(d) / 'train.rec', payloads)
        files = {name: (Path(d) / name).read_bytes() for name in ('train.rec', 'train.idx')}
    files['property'] = f'{identities},112,112'.encode()
    return files


# ----------------------------------------------------------------------------------------------------------------
# text strategies


def _token():
    return st.one_of(
        st.integers(-3, 40).map(str), st.sampled_from(['nan', 'inf', '-inf', '1e400', '0x10', '1_0', '', '\x00',
                                                       '../x', 'a' * 300, '1.5', '-0']),
        st.sampled_from(HUGE).map(str), st.text(max_size=8),
        st.floats(allow_nan=True, allow_infinity=True).map(repr))


def text_lines(valid_lines, max_lines: int = 12):
    """Strategy: lines of a text file, mixing valid lines with broken ones, sometimes as raw bytes."""
    valid = st.sampled_from(valid_lines)
    broken = st.one_of(
        valid.flatmap(lambda line: st.integers(0, len(line.split())).flatmap(
            lambda k: st.lists(_token(), max_size=3).map(lambda extra: ' '.join(line.split()[:k] + extra)))),
        st.lists(_token(), max_size=14).map(' '.join))
    lines = st.lists(st.one_of(valid, valid, broken), min_size=0, max_size=max_lines)
    text = lines.map(lambda ls: ('\n'.join(ls) + '\n').encode('utf-8', 'surrogatepass'))
    return st.one_of(text, text.flatmap(lambda t: mutated(t, 2)))


# ----------------------------------------------------------------------------------------------------------------
# targets: (strategy, reader, error types)


@dataclass
class Target:
    name: str
    strategy: Callable[[], st.SearchStrategy]
    read: Callable[[Path, object], object]  # (folder, example) -> whatever the reader returns
    errors: Callable[[], Tuple[type, ...]]


def _read_pack(folder: Path, data: bytes):
    from timm_mobileone.verification_data import PairImages, load_pack
    path = folder / 'lfw.bin'
    path.write_bytes(data)
    ds = load_pack(path)
    images = PairImages(ds, (112, 112))
    for i in range(min(len(images), 8)):  # a decoding failure travels as the item's message, never raises
        index, _, error = images[i]
        assert index == i and isinstance(error, str)
    return ds


def _pack_strategy():
    seeds = [pack_bytes(3, 'array', 4), pack_bytes(3, 'bytes', 2), pack_bytes(2, 'array', 2, tiny_jpeg())]
    return st.one_of(st.sampled_from(seeds).flatmap(mutated), st.sampled_from(PICKLE_SNIPPETS),
                     st.sampled_from(seeds).flatmap(lambda s: st.sampled_from(PICKLE_SNIPPETS).map(
                         lambda snip: s[:len(s) // 2] + snip[2:])))


def _read_image(folder: Path, data: bytes):
    from timm_mobileone.verification_data import decode_aligned
    return decode_aligned(data, (112, 112))


def png_declaring(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header (with a valid CRC) declares width x height: a decompression bomb's header."""
    import zlib
    from PIL import Image
    buf = io.BytesIO()
    Image.new('L', (1, 1)).save(buf, format='PNG')
    png = bytearray(buf.getvalue())
    png[16:24] = struct.pack('>II', width, height)
    png[29:33] = struct.pack('>I', zlib.crc32(bytes(png[12:29])))
    return bytes(png)


def _image_strategy():
    seeds = [tiny_jpeg(), tiny_jpeg(1, (96, 112)), png_declaring(100000, 100000), png_declaring(112, 112)]
    return st.sampled_from(seeds).flatmap(mutated)


def _read_pairs(folder: Path, data: bytes):
    from timm_mobileone.verification_data import load_pairs_folder
    for person in ('Alice', 'Bob'):
        (folder / person).mkdir(exist_ok=True)
        for n in (1, 2):
            (folder / person / f'{person}_{n:04d}.jpg').write_bytes(b'x')
    (folder / 'pairs.txt').write_bytes(data)
    return load_pairs_folder(folder)


def _pairs_strategy():
    return text_lines(['10 300', 'Alice 1 2', 'Bob 1 2', 'Alice 1 Bob 2', 'Bob 2 Alice 1'])


def _read_recordio(folder: Path, files: Dict[str, bytes]):
    from train.data import open_dataset
    for name, data in files.items():
        if data is not None:
            (folder / name).write_bytes(data)
    ds = open_dataset(folder, (112, 112))
    n = len(ds)
    for i in list(range(min(n, 6))) + ([n - 1] if n > 6 else []):
        _, label, error = ds[i]
        assert isinstance(error, str) and isinstance(label, int)
    return ds


def _recordio_strategy():
    valid = recordio_files()

    def broken(which):
        base = st.just(valid[which])
        if which == 'train.idx':
            lines = valid[which].decode().splitlines()
            data = st.one_of(base.flatmap(mutated), text_lines(lines + ['0\t999999999', '1\t-8', '2\t3']))
        elif which == 'property':
            data = st.one_of(base.flatmap(mutated), text_lines(['2,112,112', '0,112,112', '-1,1,1', 'nan,112,112']))
        else:
            data = base.flatmap(mutated)
        return st.one_of(data, st.just(None)).map(lambda d: dict(valid, **{which: d}))

    return st.sampled_from(['train.rec', 'train.rec', 'train.idx', 'property']).flatmap(broken)


def _read_checkpoint(folder: Path, example):
    from timm_mobileone.checkpoints import read_state_dict
    name, data = example
    path = folder / name
    path.write_bytes(data)
    return read_state_dict(path)


def _checkpoint_strategy():
    st_valid = safetensors_bytes()
    header_len = struct.unpack('<Q', st_valid[:8])[0]
    header = json.loads(st_valid[8:8 + header_len])
    data = st_valid[8 + header_len:]

    def edit_header(edits):
        h = json.loads(json.dumps(header))
        for key, field, value in edits:
            if key in h and key != '__metadata__':
                h[key][field] = value
        return safetensors_with_header(h, data)

    field_values = st.one_of(
        st.tuples(st.just('dtype'), st.sampled_from(['F64', 'I8', 'BOOL', 'F8_E4M3', 'U64', 'XX', ''])),
        st.tuples(st.just('shape'), st.lists(st.one_of(st.integers(-2, 8), st.sampled_from(HUGE)), max_size=4)),
        st.tuples(st.just('data_offsets'), st.lists(st.one_of(st.integers(-4, 200), st.sampled_from(HUGE)),
                                                    max_size=3)))
    edits = st.lists(st.tuples(st.sampled_from(sorted(header)), field_values).map(
        lambda t: (t[0], t[1][0], t[1][1])), min_size=1, max_size=3)
    safetensors = st.one_of(st.just(st_valid).flatmap(mutated), edits.map(edit_header),
                            st.sampled_from(HUGE).map(lambda n: struct.pack('<Q', n % 2 ** 64) + st_valid[8:]))
    return st.one_of(safetensors.map(lambda d: ('ck.safetensors', d)),
                     st.just(torch_checkpoint_bytes()).flatmap(mutated).map(lambda d: ('ck.pth', d)))


def _read_npy(folder: Path, data: bytes):
    from timm_mobileone.verification_data import read_embeddings, read_npy
    path = folder / 'e.npy'
    path.write_bytes(data)
    arr = read_npy(path, mmap=True)
    read_npy(path)
    read_embeddings(path, 3)
    return arr


def _npy_strategy():
    valid = npy_bytes()
    data = valid[128:]
    headers = st.fixed_dictionaries({
        'descr': st.sampled_from(['<f4', '<f8', '|O', '<i8', 'V8', '|u1', '<c16', 'xx', '<U5']),
        'fortran_order': st.booleans(),
        'shape': st.lists(st.one_of(st.integers(0, 10), st.sampled_from(HUGE)), max_size=3).map(tuple)})
    return st.one_of(st.just(valid).flatmap(mutated), headers.map(lambda h: npy_with_header(h, data)))


IJB_VALID = {
    'ijbc_face_tid_mid.txt': ['1.jpg 3 100', '2.jpg 3 100', '3.jpg 5 101', '4.jpg 5 102'],
    'ijbc_name_5pts_score.txt': [f'{i}.jpg 38 52 74 52 56 72 42 92 70 92 0.9' for i in range(1, 5)],
    'ijbc_template_pair_label.txt': ['3 5 0', '5 3 1', '3 3 1'],
}


def _read_ijb_meta(folder: Path, files: Dict[str, bytes]):
    from eval import _ijb
    meta = folder / 'IJBC' / 'meta'
    meta.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        if data is not None:
            (meta / name).write_bytes(data)
    result = _ijb.read_meta(folder, 'IJBC')
    pooler = _ijb.TemplatePooler(result.templates, result.medias)
    pooler.add(0, np.ones((len(result.names), 4), np.float32))
    _ijb.pair_scores(pooler.template_features(), pooler.unique_templates, result.p1, result.p2)
    return result


def _ijb_strategy():
    valid = {k: ('\n'.join(v) + '\n').encode() for k, v in IJB_VALID.items()}
    return st.sampled_from(sorted(IJB_VALID)).flatmap(
        lambda which: st.one_of(text_lines(IJB_VALID[which]), st.just(None)).map(
            lambda d: dict(valid, **{which: d})))


def mxnet_ndarray_bytes(array: np.ndarray, version: str = 'v2') -> bytes:
    """One NDArray as MXNet's NDArray::Save writes it (v2: magic + storage type + int64 dims; legacy: uint32)."""
    flags = {np.dtype('<f4'): 0, np.dtype('<f8'): 1, np.dtype('<f2'): 2, np.dtype('u1'): 3, np.dtype('<i4'): 4}
    a = np.ascontiguousarray(array)
    if version == 'v2':
        head = struct.pack('<Ii', 0xF993FAC9, 0) + struct.pack('<I', a.ndim) + struct.pack(f'<{a.ndim}q', *a.shape)
    else:
        head = struct.pack('<I', a.ndim) + struct.pack(f'<{a.ndim}I', *a.shape)
    return head + struct.pack('<iii', 1, 0, flags[a.dtype.newbyteorder('<') if a.dtype.itemsize > 1 else a.dtype]) \
        + a.astype(a.dtype.newbyteorder('<')).tobytes()


def mxnet_params_bytes(arrays: Dict[str, np.ndarray], version: str = 'v2') -> bytes:
    """An MXNet `.params` file (NDArray list: magic 0x112, arrays, names) holding `arrays` ('arg:NAME' keys)."""
    out = struct.pack('<QQQ', 0x112, 0, len(arrays))
    out += b''.join(mxnet_ndarray_bytes(a, version) for a in arrays.values())
    out += struct.pack('<Q', len(arrays))
    for name in arrays:
        raw = name.encode()
        out += struct.pack('<Q', len(raw)) + raw
    return out


MXNET_VALID = {'arg:conv_1_conv2d_weight': np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2),
               'aux:conv_1_batchnorm_moving_var': np.ones(2, np.float32), 'arg:scale': np.float64([0.5, 2.0])}


def _read_mxnet(folder: Path, data: bytes):
    from timm_mobileone.mxnet import read_params
    path = folder / 'model-0000.params'
    path.write_bytes(data)
    return read_params(path)


def _packed(fmt: str, value: int) -> bytes:
    """`value` packed into a struct field: wrapped for unsigned formats, clamped into range for signed ones."""
    bits = 8 * struct.calcsize(fmt)
    if fmt[-1].isupper():
        return struct.pack(fmt, value % 2 ** bits)
    return struct.pack(fmt, max(min(value, 2 ** (bits - 1) - 1), -2 ** (bits - 1)))


def _mxnet_strategy():
    valid = [mxnet_params_bytes(MXNET_VALID), mxnet_params_bytes(MXNET_VALID, 'legacy')]
    # header fields set to what breaks readers: array count, ndim, a dimension, the dtype flag, a storage type
    first = 24  # the first NDArray starts after the list header and the array count
    fields = st.sampled_from([(16, '<Q'), (first + 8, '<I'), (first + 12, '<q'), (first + 52, '<i'), (first + 4, '<i')])
    values = st.one_of(st.sampled_from(HUGE), st.integers(-3, 40))
    edited = st.tuples(fields, values).map(
        lambda fv: _apply(valid[0], [('overwrite', fv[0][0], _packed(fv[0][1], fv[1]))]))
    return st.one_of(st.sampled_from(valid).flatmap(mutated), edited)


def _errors_mxnet():
    from timm_mobileone.mxnet import MXNetError
    return (MXNetError,)


def _errors_pack():
    from timm_mobileone.verification_data import PackError
    return (PackError,)


def _errors_image():
    from timm_mobileone.verification_data import ImageError
    return (ImageError,)


def _errors_recordio():
    from train.data import FaceDataError
    return (FaceDataError,)


def _errors_checkpoint():
    from timm_mobileone.errors import UserError
    return (UserError,)


TARGETS = {t.name: t for t in [
    Target('bin_pack', _pack_strategy, _read_pack, _errors_pack),
    Target('image', _image_strategy, _read_image, _errors_image),
    Target('pairs_txt', _pairs_strategy, _read_pairs, _errors_pack),
    Target('recordio', _recordio_strategy, _read_recordio, _errors_recordio),
    Target('checkpoint', _checkpoint_strategy, _read_checkpoint, _errors_checkpoint),
    Target('npy', _npy_strategy, _read_npy, _errors_pack),
    Target('ijb_meta', _ijb_strategy, _read_ijb_meta, _errors_pack),
    Target('mxnet_params', _mxnet_strategy, _read_mxnet, _errors_mxnet),
]}


def outcome(target: Target, folder: Path, example) -> str:
    """'accepted' or 'refused' (the target's own error, with a message); anything else propagates."""
    try:
        target.read(folder, example)
    except target.errors() as e:
        if not str(e).strip():
            raise AssertionError(f'{target.name}: {type(e).__name__} without a message') from e
        if '\n' in str(e).strip():
            raise AssertionError(f'{target.name}: a multi-line message: {e!r}') from e
        return 'refused'
    return 'accepted'
