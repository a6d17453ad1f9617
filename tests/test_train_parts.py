"""Training building blocks: RecordIO packs without mxnet, ArcFace / CosFace margin heads."""
import math
import struct

import numpy as np
import pytest
import torch

from train import recordio
from train.margin import MarginHead

from conftest import jpeg_bytes


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


@pytest.mark.parametrize('kind, m', [('arcface', 0.5), ('cosface', 0.4)])
def test_margin_only_on_the_target_logit(kind, m):
    torch.manual_seed(0)
    head = MarginHead(16, 5, kind=kind, s=64.0)
    emb = torch.randn(4, 16)
    labels = torch.tensor([0, 3, 1, 4])
    logits, _ = head(emb, labels)
    cos = head.cosine(emb).clamp(-1 + 1e-7, 1 - 1e-7)
    mask = torch.zeros_like(cos, dtype=torch.bool).scatter(1, labels.view(-1, 1), True)
    torch.testing.assert_close(logits[~mask], 64.0 * cos[~mask])
    target = cos[mask]
    expected = torch.cos(torch.acos(target) + m) if kind == 'arcface' else target - m
    torch.testing.assert_close(logits[mask], 64.0 * expected, rtol=1e-5, atol=1e-4)


def test_arcface_target_logit_keeps_decreasing_past_pi():
    head = MarginHead(2, 2, kind='arcface', s=1.0, m=0.5)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    angles = torch.linspace(2.4, 3.1, 8)  # theta + m beyond pi for the later ones
    emb = torch.stack([torch.cos(angles), torch.sin(angles)], 1)
    with torch.no_grad():
        target = head(emb, torch.zeros(8, dtype=torch.long))[0][:, 0]
    assert (target[1:] < target[:-1]).all()
    assert target[-1].item() == pytest.approx(math.cos(3.1) - 0.5 * math.sin(0.5), abs=1e-4)


def test_margin_loss_falls_on_separable_toy_data():
    torch.manual_seed(0)
    centres = torch.randn(4, 8) * 3
    labels = torch.arange(4).repeat(16)
    x = centres[labels] + 0.3 * torch.randn(64, 8)
    encoder = torch.nn.Linear(8, 8)
    head = MarginHead(8, 4, kind='arcface', s=16.0, m=0.3)
    opt = torch.optim.SGD(list(encoder.parameters()) + list(head.parameters()), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(*head(encoder(x), labels))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_bad_head_arguments():
    with pytest.raises(ValueError, match="'arcface', 'cosface' or 'adaface'"):
        MarginHead(8, 4, kind='sphereface')
    with pytest.raises(ValueError, match='>= 2 classes'):
        MarginHead(8, 1)


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
