"""train.data: RecordIO and ImageFolder datasets (the same images either way), forked workers, flips that depend on
(seed, epoch, index) only, and the sampler a resumed run continues from."""
import pytest
import torch

from train.data import ImageFolderDataset, RecordIODataset, ResumableSampler, collate, open_dataset
from train.synthetic import identity_images, write_image_folder, write_rec_pack


@pytest.fixture(scope='module')
def samples():
    return identity_images(identities=8, per_identity=8, seed=0)


def test_rec_and_folder_datasets_agree(tmp_path, samples):
    rec = RecordIODataset(write_rec_pack(tmp_path / 'r', samples) / 'train.rec', flip=False)
    folder = ImageFolderDataset(write_image_folder(tmp_path / 'f', samples), flip=False)
    assert len(rec) == len(folder) == 64 and rec.num_classes == folder.num_classes == 8
    for i in (0, 17, 63):
        img_r, label_r, err_r = rec[i]
        img_f, label_f, err_f = folder[i]
        assert err_r == err_f == '' and label_r == label_f == samples[i][0]
        assert img_r.dtype == torch.uint8 and img_r.shape == (3, 112, 112) and torch.equal(img_r, img_f)


def test_forked_workers_read_a_pack_opened_in_the_parent(tmp_path):
    """Workers inherit the parent's open .rec handle when forked: each must read through its own."""
    samples = identity_images(identities=8, per_identity=24, seed=2)
    ds = RecordIODataset(write_rec_pack(tmp_path / 'r', samples) / 'train.rec', flip=False)
    ds[0]  # the parent opens the file before the workers fork
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate)
    labels = []
    for _, batch_labels, errors in loader:
        assert errors == []
        labels += batch_labels.tolist()
    assert labels == [label for label, _ in samples]


def test_num_classes_from_property_header_or_labels(tmp_path, samples):
    assert RecordIODataset(write_rec_pack(tmp_path / 'a', samples[:24]) / 'train.rec').num_classes == 3
    no_property = write_rec_pack(tmp_path / 'b', samples[:24], property_file=False)
    assert RecordIODataset(no_property / 'train.rec').num_classes == 3  # header's identity key range
    bare = write_rec_pack(tmp_path / 'c', samples[:24], property_file=False, header=False)
    ds = RecordIODataset(bare / 'train.rec')
    assert ds.num_classes == 3 and len(ds) == 24  # no header: every indexed record is an image


def test_flip_depends_on_seed_epoch_and_index_only(tmp_path, samples):
    ds = open_dataset(write_rec_pack(tmp_path / 'r', samples), (112, 112), flip=True, seed=5)
    plain = open_dataset(tmp_path / 'r', (112, 112), flip=False)
    flips = [torch.equal(ds[i][0], plain[i][0].flip(2)) for i in range(16)]
    assert 3 < sum(flips) < 13 and flips == [torch.equal(ds[i][0], plain[i][0].flip(2)) for i in range(16)]
    ds.set_epoch(1)
    assert flips != [torch.equal(ds[i][0], plain[i][0].flip(2)) for i in range(16)]


def test_resumable_sampler_skips_what_was_consumed():
    data = list(range(37))
    for rank in (0, 1):
        full = ResumableSampler(data, num_replicas=2, rank=rank, seed=7)
        full.set_epoch(3)
        part = ResumableSampler(data, num_replicas=2, rank=rank, seed=7)
        part.set_epoch(3, start=8)
        assert list(part) == list(full)[8:] and len(part) == len(full) - 8
    a, b = ResumableSampler(data, 2, 0, seed=7), ResumableSampler(data, 2, 1, seed=7)
    assert not set(a) & set(b)  # replicas see disjoint samples


def test_sampler_keys_carry_the_epoch_to_persistent_workers(tmp_path):
    """train.face's DataLoader workers persist across epochs: the sampler's keys (epoch * len + index) must give
    the flips of that epoch without set_epoch() reaching the worker's copy of the dataset."""
    from train.synthetic import identity_images, write_image_folder
    write_image_folder(tmp_path / 'f', identity_images(2, 8, seed=1))
    ds = open_dataset(tmp_path / 'f', (112, 112), flip=True, seed=3)
    sampler = ResumableSampler(ds, seed=3)
    sampler.set_epoch(2)
    keys = list(sampler)
    assert all(k >= 2 * len(ds) for k in keys)
    reference = open_dataset(tmp_path / 'f', (112, 112), flip=True, seed=3)
    reference.set_epoch(2)
    for k in keys[:6]:
        assert torch.equal(ds[k][0], reference[k - 2 * len(ds)][0])
