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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Tuple

import numpy as np


class _Strategies:
    """`hypothesis.strategies`, imported at first use: the file builders here (valid packs, PNG headers, folder
    snapshots) serve tests that run no property, and under pytest every module of Hypothesis is assertion-rewritten
    at import (its distribution is a pytest plugin): 2-3 s for each test process that collects such a test."""

    def __getattr__(self, name):
        from hypothesis import strategies
        return getattr(strategies, name)


st = _Strategies()

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
    strategy: 'Callable[[], st.SearchStrategy]'  # a string: no Hypothesis import to define the class
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
    from eval.api import ijb_pair_scores, read_ijb_meta
    meta = folder / 'IJBC' / 'meta'
    meta.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        if data is not None:
            (meta / name).write_bytes(data)
    result = read_ijb_meta(folder, 'IJBC')
    ijb_pair_scores(result, np.ones((len(result.names), 4), np.float32))
    return result


def _ijb_strategy():
    valid = {k: ('\n'.join(v) + '\n').encode() for k, v in IJB_VALID.items()}
    return st.sampled_from(sorted(IJB_VALID)).flatmap(
        lambda which: st.one_of(text_lines(IJB_VALID[which]), st.just(None)).map(
            lambda d: dict(valid, **{which: d})))


# ----------------------------------------------------------------------------------------------------------------
# CFP's protocol text (eval.api.read_cfp_pairs): Protocol/Pair_list_{F,P}.txt ("NUMBER PATH") and
# Protocol/Split/{FF,FP}/NN/{same,diff}.txt ("A,B"), with digits of every script, control characters, broken lines,
# empty and missing files, one fold or none

# str.isdigit() takes all of these; int() refuses some ('²', '①') and reads others ('٣' as 3)
UNICODE_DIGITS = ['²', '³', '¹', '⁴', '①', '٣', '۴', '१', '１', '𝟙', '߁', '๓']
CONTROLS = ['\x00', '\x01', '\x08', '\x1b', '\x7f', '\x80', '\x85', '\x9f', '\t', '\r', '\x0b', '\x0c', '\x1c',
            '\u2028', '\ufeff', '\u200b']


def cfp_files(folds: int = 2) -> Dict[str, bytes]:
    """A valid CFP protocol (no photos: reading the protocol opens none) of 4 frontal and 4 profile images and
    `folds` folds of 2 same and 2 different pairs, for both protocols: {path under the root: bytes}."""
    files = {f'Protocol/Pair_list_{key}.txt': ''.join(f'{n} ../Data/Images/{n:03d}/{view}/01.jpg\n'
                                                      for n in range(1, 5)).encode()
             for key, view in (('F', 'frontal'), ('P', 'profile'))}
    for protocol in ('FF', 'FP'):
        for k in range(1, folds + 1):
            a, b = (1, 2) if k % 2 else (3, 4)
            files[f'Protocol/Split/{protocol}/{k:02d}/same.txt'] = f'{a},{a}\n{b},{b}\n'.encode()
            files[f'Protocol/Split/{protocol}/{k:02d}/diff.txt'] = f'{a},{b}\n{b},{a}\n'.encode()
    return files


CFP_EXTRA_LINES = {  # lines a real file could hold, beyond the valid ones: valid or not, they must read cleanly
    'pair_list': ['5 ../Data/Images/005/frontal/01.jpg', '1 ../Data/Images/009/frontal/01.jpg', '6 /etc/passwd',
                  '7 ../../outside.jpg', '8 ../Data/Images/00²/frontal/01.jpg', '0001 ../Data/x.jpg',
                  '0' * 5000 + '9 ../Data/y.jpg', '12345678901234567890 ../Data/z.jpg', '3', '3 a b'],
    'split': ['1,9', '4,1', '1, 2', '1 2', '1,,2', '1,2,3', ',1', '0' * 5000 + '1,1', '99999999999999999999,1',
              '-1,2', '1.0,2'],
}


def _cfp_line(line: str):
    pos = st.integers(0, len(line))
    odd = st.one_of(st.sampled_from(UNICODE_DIGITS), st.sampled_from(CONTROLS))
    in_path = st.integers(line.find(' ') + 1, len(line))  # a pair list's PATH (the whole line where none)
    return st.one_of(
        st.just(line),
        st.tuples(pos, odd).map(lambda t: line[:t[0]] + t[1] + line[t[0]:]),  # a character inserted
        st.tuples(in_path, st.sampled_from(CONTROLS)).map(lambda t: line[:t[0]] + t[1] + line[t[0]:]),
        st.tuples(pos, st.sampled_from(UNICODE_DIGITS)).map(lambda t: line[:t[0]] + t[1] + line[t[0] + 1:]),
        pos.map(lambda k: line[:k]),  # a broken line
        st.text(max_size=12),  # any Unicode: digits of every script, controls, separators
        st.lists(_token(), max_size=4).map(' '.join))


def _cfp_text(valid_lines):
    lines = st.lists(st.sampled_from(valid_lines).flatmap(_cfp_line), max_size=6)
    text = st.tuples(lines, st.sampled_from(['\n', '\n', '\r\n', '\r'])).map(
        lambda t: (t[1].join(t[0]) + t[1]).encode('utf-8', 'surrogatepass'))
    return st.one_of(text, text, st.just(b''), st.none(), text.flatmap(lambda d: mutated(d, 2)))


def _cfp_strategy():
    def broken(files):
        def content(name):
            kind = 'split' if '/Split/' in name else 'pair_list'
            return _cfp_text(files[name].decode().splitlines() + CFP_EXTRA_LINES[kind]).map(lambda d: (name, d))

        names = st.one_of(st.sampled_from(sorted(n for n in files if '/Split/' not in n)),  # as often as the splits
                          st.sampled_from(sorted(n for n in files if '/Split/' in n) or sorted(files)))
        edits = st.lists(names.flatmap(content), min_size=1, max_size=3)
        return st.one_of(edits.map(lambda es: dict(files, **dict(es))), edits.map(lambda es: dict(files, **dict(es))),
                         st.just({n: b'' if '/Split/' in n else d for n, d in files.items()}),  # every split empty
                         st.just(files))

    layouts = st.sampled_from([2, 2, 2, 3, 1, 0]).map(cfp_files)
    return st.tuples(st.sampled_from(['FP', 'FF']), layouts.flatmap(broken))


def _read_cfp_protocol(folder: Path, example):
    from eval.api import read_cfp_pairs as read_cfp
    protocol, files = example  # files: {path under the root: bytes, or None for a missing file}
    root = folder / 'cfp'
    (root / 'Protocol' / 'Split').mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        if data is not None:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
    images, issame, folds = read_cfp(root, protocol)
    # an accepted protocol is one the evaluation can score: pairs, >= 2 folds of one size, clean paths in the root
    assert len(issame) > 0 and len(images) == 2 * len(issame) and folds >= 2 and len(issame) % folds == 0
    for name in images:
        assert not any(ord(c) < 32 or 0x7f <= ord(c) <= 0x9f for c in name), name
        assert (root / name).resolve().is_relative_to(root.resolve()), name
    return images


def _errors_cfp():
    from timm_mobileone.errors import UserError
    from timm_mobileone.verification_data import PackError
    return (PackError, UserError)


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


# ----------------------------------------------------------------------------------------------------------------
# photos in every mode Pillow opens (timm_mobileone.faces.align.read_photo): 8-bit RGB by the mode's range, or a per-photo refusal

PHOTO_MODES = ['1', 'L', 'P', 'LA', 'PA', 'RGB', 'RGBA', 'CMYK', 'YCbCr', 'LAB', 'HSV', 'I;16', 'I;16B', 'I', 'F']
PHOTO_FORMATS = ['PNG', 'TIFF', 'WEBP', 'BMP', 'GIF', 'JPEG']


def photo_in_mode(mode: str, fmt: str, seed: int, size=(24, 20), high: float = 1.0):
    """(bytes, the decoded gray 8-bit image this must give or None, the mode Pillow opens it as) of a random photo
    saved in `mode` as `fmt`, or None where Pillow cannot write that mode in that format. `high`: the largest pixel as
    a share of the mode's range (float pixels: the largest value itself, so > 1 has no known range)."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    h, w = size
    if mode in ('I;16', 'I;16B', 'I', 'F'):
        top = {'F': high}.get(mode, int(high * 65535))
        values = rng.uniform(0, top, (h, w))
        if mode == 'F':
            img = Image.fromarray(values.astype(np.float32), 'F')
        elif mode == 'I':
            img = Image.fromarray(values.astype(np.int32))
        else:
            img = Image.fromarray(values.astype(np.uint16)).convert(mode) if mode == 'I;16B' else \
                Image.fromarray(values.astype(np.uint16))
    else:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    try:
        img.save(buf, format=fmt)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    with Image.open(io.BytesIO(buf.getvalue())) as back:
        opened = back.mode
        expect = None
        if opened.startswith('I;16'):
            expect = (np.asarray(back).astype(np.uint32) >> 8).astype(np.uint8)  # cv2.imread's 16-bit reading
        elif opened == 'F' and 0 <= high <= 1:
            expect = np.rint(np.asarray(back).astype(np.float64) * 255).astype(np.uint8)
    return buf.getvalue(), expect, opened


def _read_photo_mode(folder: Path, example):
    from timm_mobileone.faces.align import read_photo
    data, expect, opened = example
    bgr = read_photo(data)
    assert bgr.dtype == np.uint8 and bgr.ndim == 3 and bgr.shape[2] == 3, (opened, bgr.shape)
    if expect is not None:  # 16-bit and float photos: by their range, never saturated
        assert np.array_equal(bgr[:, :, 0], expect) and np.array_equal(bgr[:, :, 1], expect), opened
    return bgr


def _photo_mode_strategy():
    whole = st.builds(photo_in_mode, st.sampled_from(PHOTO_MODES), st.sampled_from(PHOTO_FORMATS),
                      st.integers(0, 2 ** 16), st.tuples(st.integers(8, 40), st.integers(8, 40)),
                      st.sampled_from([1.0, 0.5, 0.01, 1.5, 300.0])).filter(lambda x: x is not None)
    broken = whole.flatmap(lambda x: mutated(x[0]).map(lambda data: (data, None, x[2])))
    return st.one_of(whole, whole, broken)


def _errors_photo():
    return (ValueError,)


# ----------------------------------------------------------------------------------------------------------------
# destinations that alias the source (timm_mobileone.faces.align.align_folder): refused before anything is written, or written
# without changing one source file

ALIAS_DESTINATIONS = ['sibling', 'sibling_used', 'inside_src', 'src', 'parent_of_src', 'src_sub', 'under_a_file',
                      'foreign_files', 'link_to_src', 'link_to_src_sub']
ALIAS_HAZARDS = ['none', 'folder_named_like_a_crop', 'folder_named_like_records', 'linked_subfolder', 'linked_crop',
                 'linked_records']


def snapshot(root: Path) -> Dict[str, object]:
    """Every entry under root: a file's bytes, a link's target, a folder's presence (links not followed)."""
    import os
    out: Dict[str, object] = {}
    if not os.path.lexists(root):
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                out[rel] = ('link', os.readlink(path))
            elif path.is_dir():
                out[rel] = 'dir'
            else:
                out[rel] = path.read_bytes()
    return out


def _align_paths(folder: Path, example):
    import os
    from timm_mobileone.faces import align as A
    where, hazard, nested = example
    src = folder / 'photos'
    names = ['a.jpg', 'sub/b.jpg'] + (['sub/deep/c.png'] if nested else [])
    for i, name in enumerate(names):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(tiny_jpeg(i, (64, 48)))
    dst = {'sibling': folder / 'crops', 'sibling_used': folder / 'crops', 'inside_src': src / 'crops',
           'src': src, 'parent_of_src': folder, 'src_sub': src / 'sub', 'under_a_file': folder / 'afile' / 'crops',
           'foreign_files': folder / 'crops', 'link_to_src': folder / 'crops',
           'link_to_src_sub': folder / 'crops'}[where]
    settings = A.AlignSettings(detector_sha256='-', min_side=64, max_side=64)
    earlier_run = json.dumps(dict(asdict(settings), detector=str(A.DEFAULT_DETECTOR)))  # same settings: resumable
    if where == 'under_a_file':
        (folder / 'afile').write_bytes(b'a file')
    elif where == 'foreign_files':
        dst.mkdir()
        (dst / 'notes.txt').write_bytes(b'mine')
    elif where == 'link_to_src':
        os.symlink(src, dst)
    elif where == 'link_to_src_sub':
        os.symlink(src / 'sub', dst)
    elif where == 'sibling_used':
        dst.mkdir()
        (dst / A.SETTINGS_FILE).write_text(earlier_run)
    if hazard != 'none' and where in ('sibling', 'sibling_used', 'inside_src', 'foreign_files'):  # a hazard in dst
        if not dst.exists():
            dst.mkdir()
            (dst / A.SETTINGS_FILE).write_text(earlier_run)  # an earlier run's, so only the hazard can stop this one
        if hazard == 'folder_named_like_a_crop':
            (dst / 'a.jpg').mkdir(exist_ok=True)
        elif hazard == 'folder_named_like_records':
            (dst / A.RECORDS_FILE).mkdir(exist_ok=True)
        elif hazard == 'linked_subfolder' and not (dst / 'sub').exists():
            os.symlink(src / 'sub', dst / 'sub')
        elif hazard == 'linked_crop' and not (dst / 'a.jpg').exists():
            os.symlink(src / 'a.jpg', dst / 'a.jpg')
        elif hazard == 'linked_records' and not (dst / A.RECORDS_FILE).exists():
            os.symlink(src / 'a.jpg', dst / A.RECORDS_FILE)
    listed = [n for n in names if not (src / n).resolve().is_relative_to(dst.resolve())]
    before_src, before_dst = snapshot(src), snapshot(dst)
    fair = where in ('sibling', 'sibling_used', 'inside_src') and hazard == 'none'
    try:
        report = A.align_folder(src, dst, listed, settings, A.DEFAULT_DETECTOR, workers=1, progress=False)
    except Exception as e:
        assert not fair, f'{where}: a fair destination refused ({e})'
        assert snapshot(src) == before_src, 'a refused run changed the source'
        assert snapshot(dst) == before_dst, 'a refused run changed the destination'
        raise
    assert fair, f'{where} with {hazard}: accepted'
    after = snapshot(src)  # the photos unchanged (a crops folder inside them is new)
    assert {k: v for k, v in after.items() if not k.startswith('crops')} == before_src, 'the source changed'
    assert report['photos'] == len(listed) and all((dst / n).is_file() for n in listed)
    return report


def _align_paths_strategy():
    return st.tuples(st.sampled_from(ALIAS_DESTINATIONS), st.sampled_from(ALIAS_HAZARDS), st.booleans())


def _errors_align_paths():
    from timm_mobileone.errors import UserError
    return (UserError,)


# ----------------------------------------------------------------------------------------------------------------
# gallery files (timm_mobileone.faces.gallery): opened and searched, or one GalleryError line


def gallery_bytes(n: int = 5, dim: int = 8, dtype: str = 'float32') -> bytes:
    import tempfile
    from timm_mobileone.faces.gallery import save_gallery
    with tempfile.TemporaryDirectory() as d:
        path = save_gallery(Path(d) / 'g.npz', np.random.default_rng(n).standard_normal((n, dim)),
                            [f'p/{i}.jpg' for i in range(n)], dict(model='m'), dtype)
        return path.read_bytes()


def _read_gallery(folder: Path, data: bytes):
    from timm_mobileone.faces.gallery import open_gallery, search
    path = folder / 'g.npz'
    path.write_bytes(data)
    g = open_gallery(path)
    scores, rows = search(g, np.ones((2, g.dim), np.float32), k=3, chunk=2)
    assert rows.shape == (2, min(3, len(g))) and ((rows >= 0) & (rows < len(g))).all()
    assert all(isinstance(g.path(i), str) for i in range(len(g)))
    return g


def _gallery_strategy():
    seeds = [gallery_bytes(), gallery_bytes(3, 16, 'float16'), gallery_bytes(1, 4)]
    return st.sampled_from(seeds).flatmap(mutated)


def _errors_gallery():
    from timm_mobileone.faces.gallery import GalleryError
    return (GalleryError,)


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
    Target('photo_modes', _photo_mode_strategy, _read_photo_mode, _errors_photo),
    Target('align_paths', _align_paths_strategy, _align_paths, _errors_align_paths),
    Target('gallery', _gallery_strategy, _read_gallery, _errors_gallery),
    Target('mxnet_params', _mxnet_strategy, _read_mxnet, _errors_mxnet),
    Target('cfp_protocol', _cfp_strategy, _read_cfp_protocol, _errors_cfp),
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
