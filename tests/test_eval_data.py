"""Reading verification data safely: insightface packs (both writers), aligned folders, bad files."""
import os
import pickle

import numpy as np
import pytest
import torch

from timm_mobileone.verification_data import (
    PackError, PairImages, load_pack, load_pairs_folder, load_verification_set, read_embeddings)

from helpers import SMALL_LFW, needs_small_lfw
from train.synthetic import jpeg_bytes, make_pack


def _decode_all(ds, size=(112, 112)):
    data = PairImages(ds, size)
    return [data[i] for i in range(len(data))]


@needs_small_lfw
def test_small_lfw_pack_loads_and_decodes():
    ds = load_pack(SMALL_LFW)
    assert ds.num_pairs == 10 and ds.issame.all() and len(ds.images) == 20
    assert isinstance(ds.images[0], np.ndarray)  # the newer writer
    for index, img, err in _decode_all(ds):
        assert err == '' and img.shape == (3, 112, 112) and img.dtype == torch.uint8
    assert ds.name == 'small_lfw'


@pytest.mark.parametrize('protocol', [2, 4])
def test_old_style_bytes_pack_loads(tmp_path, protocol):
    path = make_pack(tmp_path / 'old.bin', num_pairs=6, style='bytes', protocol=protocol)
    ds = load_pack(path)
    assert isinstance(ds.images[0], bytes)
    assert ds.issame.tolist() == [True, False] * 3
    assert all(err == '' for _, _, err in _decode_all(ds))


def test_python2_str_pack_loads(tmp_path):
    # a Python-2 pickle stores JPEG bytes as str (opcode SHORT_BINSTRING / BINSTRING): read with encoding='bytes'
    rng = np.random.default_rng(0)
    images = [jpeg_bytes(rng) for _ in range(4)]
    out = bytearray(b'\x80\x02(]q\x00(')
    for img in images:
        out += b'T' + len(img).to_bytes(4, 'little') + img
    out += b'e]q\x01(\x88\x89et.'
    path = tmp_path / 'py2.bin'
    path.write_bytes(bytes(out))
    ds = load_pack(path)
    assert ds.issame.tolist() == [True, False]
    assert ds.images[0] == images[0]


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f'touch {self.target}',))


class _EvilWrite:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, 'w'))


@pytest.mark.parametrize('evil', [_Evil, _EvilWrite])
def test_malicious_pack_is_refused_without_side_effect(tmp_path, evil):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.bin'
    with open(path, 'wb') as f:
        pickle.dump(([evil(str(marker)), b'x'], [True]), f)
    with pytest.raises(PackError, match='refusing to load'):
        load_pack(path)
    assert not marker.exists()


@pytest.mark.parametrize('content, match', [
    (b'', 'empty file'),
    (b'hello, this is not a pickle\n', 'not an insightface .bin pack'),
    (None, 'truncated'),
])
def test_bad_files(tmp_path, content, match):
    path = tmp_path / 'bad.bin'
    if content is None:
        full = make_pack(tmp_path / 'full.bin', num_pairs=4).read_bytes()
        content = full[:len(full) // 2]
    path.write_bytes(content)
    with pytest.raises(PackError, match=match):
        load_pack(path)


def test_missing_file(tmp_path):
    with pytest.raises(PackError, match='no such file'):
        load_verification_set(tmp_path / 'nope.bin')


def _write(path, obj):
    with open(path, 'wb') as f:
        pickle.dump(obj, f)
    return path


def test_inconsistent_packs(tmp_path):
    img = jpeg_bytes(np.random.default_rng(0))
    with pytest.raises(PackError, match='odd number of images'):
        load_pack(_write(tmp_path / 'odd.bin', ([img] * 3, [True])))
    with pytest.raises(PackError, match='4 images but 1 labels'):
        load_pack(_write(tmp_path / 'mismatch.bin', ([img] * 4, [True])))
    with pytest.raises(PackError, match='no pairs'):
        load_pack(_write(tmp_path / 'empty.bin', ([], [])))
    with pytest.raises(PackError, match=r'expected a pickle of \(bins, issame_list\)'):
        load_pack(_write(tmp_path / 'dict.bin', {'a': 1}))
    with pytest.raises(PackError, match='image 1 is a int'):
        load_pack(_write(tmp_path / 'ints.bin', ([img, 3], [True])))


def test_corrupt_jpeg_names_its_index(tmp_path):
    path = make_pack(tmp_path / 'p.bin', num_pairs=3, style='bytes')
    with open(path, 'rb') as f:
        bins, issame = pickle.load(f)
    bins[3] = bins[3][:40]  # truncated JPEG
    ds = load_pack(_write(tmp_path / 'corrupt.bin', (bins, issame)))
    errors = [err for _, _, err in _decode_all(ds) if err]
    assert len(errors) == 1 and 'image 3 cannot be decoded' in errors[0]


def test_wrong_size_images_are_refused(tmp_path):
    ds = load_pack(make_pack(tmp_path / 'big.bin', num_pairs=2, size=(120, 100)))
    errors = [err for _, _, err in _decode_all(ds) if err]
    assert len(errors) == 4 and 'image 0 is 100x120, expected aligned 112x112' in errors[0]


def test_pairs_folder(tmp_path):
    rng = np.random.default_rng(0)
    for person, n in (('Alice', 2), ('Bob', 1)):
        (tmp_path / person).mkdir()
        for i in range(1, n + 1):
            (tmp_path / person / f'{person}_{i:04d}.jpg').write_bytes(jpeg_bytes(rng))
    (tmp_path / 'pairs.txt').write_text('10 300\nAlice 1 2\nAlice 1 Bob 1\n')
    ds = load_verification_set(tmp_path)
    assert ds.issame.tolist() == [True, False]
    assert ds.images[2].endswith('Alice_0001.jpg') and ds.images[3].endswith('Bob_0001.jpg')
    assert all(err == '' for _, _, err in _decode_all(ds))
    (tmp_path / 'pairs.txt').write_text('Alice 1 3\n')
    with pytest.raises(PackError, match=r'pairs.txt:1: no image .*Alice_0003'):
        load_pairs_folder(tmp_path)
    (tmp_path / 'pairs.txt').write_text('Alice 1\n')
    with pytest.raises(PackError, match='expected "name n1 n2"'):
        load_pairs_folder(tmp_path)


def test_read_embeddings(tmp_path):
    good = tmp_path / 'e.npy'
    np.save(good, np.ones((8, 3), dtype=np.float32))
    assert read_embeddings(good, 4).shape == (8, 3)
    with pytest.raises(PackError, match='8 embeddings for 5 pairs'):
        read_embeddings(good, 5)
    obj = tmp_path / 'o.npy'
    np.save(obj, np.array([{'a': 1}], dtype=object), allow_pickle=True)
    with pytest.raises(PackError, match='holds Python objects'):
        read_embeddings(obj, 1)


def test_aligned_crops_in_16_bits_decode_by_their_range():
    """A 16-bit crop (a pack or folder written by another tool) is its top 8 bits, as cv2.imread reads it, not
    Pillow's clip to white; a file that is no image says so without an object's address."""
    import io
    from PIL import Image
    from timm_mobileone.verification_data import ImageError, decode_aligned
    rgb = np.random.default_rng(0).integers(0, 256, (112, 112), dtype=np.uint8)
    encoded = {}
    for bits, array in (('8', rgb), ('16', rgb.astype(np.uint16) * 256 + 255)):
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format='PNG')
        encoded[bits] = buf.getvalue()
    assert np.array_equal(decode_aligned(encoded['16'], (112, 112)), decode_aligned(encoded['8'], (112, 112)))
    with pytest.raises(ImageError, match=r'not an image format') as e:
        decode_aligned(b'not an image at all', (112, 112))
    assert '0x' not in str(e.value)
