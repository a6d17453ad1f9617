"""train.recordio: insightface's RecordIO packs read and written without mxnet, byte for byte, and what broken packs
get."""
import struct

import numpy as np
import pytest

from train import recordio
from train.synthetic import jpeg_bytes


def _pack_file(tmp_path, num_images=6, identities=3):
    rng = np.random.default_rng(0)
    images = [jpeg_bytes(rng) for _ in range(num_images)]
    header0 = recordio.pack(2, [num_images + 1, num_images + 1 + identities], 0, 0, b'')
    payloads = [header0] + [recordio.pack(0, float(i % identities), i + 1, 0, img) for i, img in enumerate(images)]
    path = tmp_path / 'train.rec'
    recordio.write_records(path, payloads)
    return path, images


def test_pack_round_trip(tmp_path):
    path, images = _pack_file(tmp_path)
    reader = recordio.RecordIOReader(path)
    assert list(recordio.image_keys(reader)) == [1, 2, 3, 4, 5, 6]
    head = reader.read(0)
    assert head.flag == 2 and head.label.tolist() == [7.0, 10.0]
    rec = reader.read(4)
    assert rec.flag == 0 and rec.label == 0.0 and rec.id == 4 and rec.data == images[3]


def test_record_layout_on_disk(tmp_path):
    path, _ = _pack_file(tmp_path, num_images=1, identities=1)
    raw = path.read_bytes()
    magic, word = struct.unpack('<II', raw[:8])
    assert magic == 0xced7230a and word >> 29 == 0
    assert (word & ((1 << 29) - 1)) == 24 + 8  # header + two float32 labels, no image
    offsets = [int(line.split('\t')[1]) for line in (tmp_path / 'train.idx').read_text().splitlines()]
    assert offsets[1] % 4 == 0  # records are padded to 4 bytes


def test_multi_part_record_is_joined_with_the_magic(tmp_path):
    magic = struct.pack('<I', recordio.MAGIC)
    payload = recordio.pack(0, 1.0, 1, 0, b'abc' + magic + b'defgh' + magic + b'ij')
    path = tmp_path / 'split.rec'
    recordio.write_records(path, [payload])
    raw = path.read_bytes()
    assert raw.count(magic) == 3  # three parts, each with its own magic: first / middle / last
    assert recordio.RecordIOReader(path).read(0).data == b'abc' + magic + b'defgh' + magic + b'ij'


def test_bad_magic_names_its_offset(tmp_path):
    path, _ = _pack_file(tmp_path)
    data = bytearray(path.read_bytes())
    offset = int((tmp_path / 'train.idx').read_text().splitlines()[3].split('\t')[1])
    data[offset:offset + 4] = b'\x00\x00\x00\x00'
    path.write_bytes(bytes(data))
    reader = recordio.RecordIOReader(path)
    with pytest.raises(recordio.RecordIOError, match=f'bad magic 0x00000000 at offset {offset}'):
        reader.read(3)


def test_missing_idx_and_truncation(tmp_path):
    path, _ = _pack_file(tmp_path)
    (tmp_path / 'train.idx').rename(tmp_path / 'other.idx')
    with pytest.raises(recordio.RecordIOError, match=r'train.idx: no such file'):
        recordio.RecordIOReader(path)
    reader = recordio.RecordIOReader(path, tmp_path / 'other.idx')
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(recordio.RecordIOError, match='truncated record'):
        reader.read(6)


def test_index_lines_are_checked_and_keys_sorted(tmp_path):
    path, images = _pack_file(tmp_path)
    idx = tmp_path / 'train.idx'
    lines = idx.read_text().splitlines()
    idx.write_text('\n'.join(reversed(lines)))  # any order, no final newline
    reader = recordio.RecordIOReader(path)
    assert reader.keys.tolist() == list(range(7)) and 3 in reader and 9 not in reader
    assert reader.read(4).data == images[3]
    with pytest.raises(recordio.RecordIOError, match='no record 9'):
        reader.read(9)
    idx.write_text('\n'.join(lines[:3] + ['3\tabc'] + lines[4:]) + '\n')
    with pytest.raises(recordio.RecordIOError, match=r'train.idx:4: expected "key<TAB>offset", got \'3\\tabc\''):
        recordio.RecordIOReader(path)
