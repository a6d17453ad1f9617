"""Training images: insightface RecordIO packs and ImageFolder trees, decoded in DataLoader workers.

Both datasets hand out `(uint8 CHW image, label, error)`; normalization runs on the training device, after the
batch arrives (as timm's prefetcher does), so workers only decode and flip. A record that cannot be used (corrupt
JPEG, wrong size, label outside the identity range) does not raise inside the worker, where the error would come
back as a multi-line traceback: the item carries one line, and the training loop stops with it (exit code 2).

Horizontal flips are drawn from a generator seeded by (seed, epoch, index), not from the worker's RNG, so the same
sample gets the same flip whether the epoch ran straight through or was resumed from a checkpoint mid-way.
"""
import math
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from timm_mobileone.verification_data import ImageError, decode_aligned
from timm_mobileone.errors import UserError

from .recordio import RecordIOError, RecordIOReader, image_keys, unpack

__all__ = ['FaceDataError', 'RecordIODataset', 'ImageFolderDataset', 'open_dataset', 'ResumableSampler',
           'collate', 'Preloaded', 'Unflipped']


class FaceDataError(UserError, ValueError):
    """Training data that cannot be used (a user error: one line, exit code 2)."""


class _FaceImages(Dataset):
    """Shared decode + flip; subclasses supply `_load(index) -> (encoded bytes, label, where)`."""

    def __init__(self, num_classes: int, input_size: Tuple[int, int], flip: bool, seed: int) -> None:
        self.num_classes = num_classes
        self.input_size = tuple(input_size)
        self.flip = flip
        self.seed = seed
        self.epoch = 0
        self.extra_start: Optional[int] = None  # index of the first --extra-data image (ImageFolderDataset)
        # distillation: the label becomes (identity, index, flipped), which picks the teacher's cached target
        self.with_index = False

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _load(self, index: int) -> Tuple[bytes, float, str]:
        raise NotImplementedError

    def _flip(self, index: int, epoch: int) -> bool:
        return self.flip and np.random.default_rng([self.seed, epoch, index]).random() < 0.5

    def _failed(self, message: str) -> Tuple[torch.Tensor, int, str]:
        return torch.zeros(3, *self.input_size, dtype=torch.uint8), 0, message

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, Union[int, Tuple[int, int, int]], str]:
        # a key of ResumableSampler carries its epoch (epoch * len + index): DataLoader workers that persist
        # across epochs hold a copy of this dataset made once, which set_epoch() no longer reaches
        epoch, index = divmod(index, len(self))
        flip = self._flip(index, epoch or self.epoch)
        image, label, error = self.decoded(index, flip)
        return image, ((label, index, int(flip)) if self.with_index else label), error

    def source_flag(self, index: int) -> str:
        """The flag that gave image `index`: --extra-data for the unlabeled crops appended, else --data."""
        return '--extra-data' if self.extra_start is not None and index >= self.extra_start else '--data'

    def decoded(self, index: int, flip: bool) -> Tuple[torch.Tensor, int, str]:
        """(uint8 CHW RGB image, flipped if asked, label, error line or ''); the line names the flag that gave
        the image (--data or --extra-data)."""
        flag = self.source_flag(index)
        try:
            data, label, where = self._load(index)
        except (RecordIOError, FaceDataError) as e:
            return self._failed(f'{flag} {e}')
        if not math.isfinite(label) or label != int(label) or not 0 <= label < self.num_classes:
            return self._failed(f'{flag} {where}: label {label:g} is outside the identity range '
                                f'0..{self.num_classes - 1} (num_classes {self.num_classes}; set --num-classes if the '
                                f'pack\'s count is wrong)')
        try:
            rgb = decode_aligned(data, self.input_size)
        except ImageError as e:
            return self._failed(f'{flag} {where}: image {e}')
        if flip:
            rgb = np.ascontiguousarray(rgb[:, ::-1])
        return torch.from_numpy(rgb).permute(2, 0, 1), int(label), ''


class RecordIODataset(_FaceImages):
    """An insightface `train.rec` + `train.idx` pack (MS1MV3, Glint360K, WebFace as insightface ships them).

    The identity count comes from `num_classes`, else the pack's `property` file (`num_classes,h,w`), else the
    header record's identity key range, else a scan of every label (small packs only).
    """

    def __init__(self, rec_path: Union[str, Path], input_size: Tuple[int, int] = (112, 112), flip: bool = True,
                 seed: int = 0, num_classes: Optional[int] = None) -> None:
        self.reader = RecordIOReader(rec_path)
        try:
            self.keys = image_keys(self.reader)
        except RecordIOError as e:
            raise FaceDataError(str(e)) from None
        if len(self.keys) == 0:
            raise FaceDataError(f'{rec_path}: the pack holds no images')
        missing = [int(k) for k in (self.keys[0], self.keys[-1]) if k not in self.reader]
        if missing:
            raise FaceDataError(f'{self.reader.idx_path}: the header announces images 1..{self.keys[-1]} but '
                                f'record {missing[0]} is not indexed')
        super().__init__(num_classes or self._count_classes(), input_size, flip, seed)

    def _count_classes(self) -> int:
        prop = self.reader.rec_path.with_name('property')
        if prop.is_file():
            try:
                count = int(prop.read_text().split(',')[0])
            except (ValueError, UnicodeDecodeError, OSError):
                raise FaceDataError(f'{prop}: expected "num_classes,height,width"') from None
            if count < 1:
                raise FaceDataError(f'{prop}: {count} identities; expected "num_classes,height,width"')
            return count
        try:
            head = self.reader.read(0) if 0 in self.reader else None
            if head is not None and head.flag > 0 and len(head.label) >= 2 and head.label[1] > head.label[0]:
                return int(head.label[1] - head.label[0])  # identity records follow the images
            labels = [self.reader.read(k).label for k in self.keys]
        except RecordIOError as e:
            raise FaceDataError(str(e)) from None
        values = [float(np.asarray(x).reshape(-1)[0]) if np.asarray(x).size else math.nan for x in labels]
        if not all(math.isfinite(v) and v >= 0 for v in values):
            raise FaceDataError(f'{self.reader.rec_path}: a label is missing, negative, NaN or inf; cannot count '
                                f'identities (write a property file or pass --num-classes)')
        return int(max(values)) + 1

    def __len__(self) -> int:
        return len(self.keys)

    def _load(self, index: int) -> Tuple[bytes, float, str]:
        key = int(self.keys[index])
        offset = self.reader.offset(key)
        rec = unpack(self.reader.read_at(offset))
        label = float(np.asarray(rec.label).reshape(-1)[0])
        return rec.data, label, f'{self.reader.rec_path} record {key} (offset {offset})'


class ImageFolderDataset(_FaceImages):
    """One folder per identity (`root/<identity>/<image>`), as timm's folder reader finds them."""

    def __init__(self, root: Union[str, Path], input_size: Tuple[int, int] = (112, 112), flip: bool = True,
                 seed: int = 0, num_classes: Optional[int] = None, extra: Sequence[Union[str, Path]] = ()) -> None:
        from timm.data.readers.reader_image_folder import find_images_and_targets
        self.samples, self.class_to_idx = find_images_and_targets(str(root))
        if not self.samples:
            raise FaceDataError(f'{root}: no images found (expected one folder per identity with .jpg/.png files)')
        super().__init__(num_classes or len(self.class_to_idx), input_size, flip, seed)
        if extra:
            self.extra_start = len(self.samples)
        for folder in extra:  # unlabeled faces (distillation only): label 0, which no loss reads
            found = _images_under(Path(folder))
            if not found:
                raise FaceDataError(f'--extra-data {folder}: no images found (a folder of aligned crops, searched '
                                    f'recursively)')
            self.samples.extend((str(path), 0) for path in found)

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int) -> Tuple[bytes, float, str]:
        path, label = self.samples[index]
        try:
            return Path(path).read_bytes(), float(label), path
        except OSError as e:
            raise FaceDataError(f'{path}: cannot be read ({e.strerror})') from None


def _images_under(folder: Path) -> List[Path]:
    from timm_mobileone.verification_data import list_images
    if not folder.is_dir():
        raise FaceDataError(f'--extra-data {folder}: no such folder')
    return [folder / name for name in list_images(folder)]


def open_dataset(path: Union[str, Path], input_size: Tuple[int, int], flip: bool = True, seed: int = 0,
                 num_classes: Optional[int] = None, extra: Sequence[Union[str, Path]] = ()) -> _FaceImages:
    """A RecordIO pack (a `.rec` file, or a folder holding `train.rec`) or an ImageFolder tree; `extra`: folders of
    unlabeled crops appended to an ImageFolder tree (label 0)."""
    p = Path(path)
    try:
        if p.suffix == '.rec' or (p.is_dir() and (p / 'train.rec').is_file()):
            if extra:
                raise FaceDataError(f'--extra-data goes with an image-folder --data; {path} is a RecordIO pack')
            return RecordIODataset(p if p.suffix == '.rec' else p / 'train.rec', input_size, flip, seed, num_classes)
        if p.is_dir():
            return ImageFolderDataset(p, input_size, flip, seed, num_classes, extra)
    except RecordIOError as e:
        raise FaceDataError(str(e)) from None
    raise FaceDataError(f'--data {path}: no such folder or .rec file (give a folder with train.rec + train.idx, '
                        f'a .rec file, or an ImageFolder tree)')


class ResumableSampler(DistributedSampler):
    """timm/torch's DistributedSampler that can start an epoch part-way (`set_epoch(epoch, start=k)` skips the
    first k samples of this replica), so a resumed run sees the batches the interrupted one would have seen."""

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        """This epoch's dataset indices from `start`, as keys `epoch * len(dataset) + index` that carry the epoch
        to the dataset (in whichever worker process decodes them)."""
        indices: List[int] = list(super().__iter__())
        offset = self.epoch * len(self.dataset)
        return iter([offset + i for i in indices[self.start:]])

    def __len__(self) -> int:
        return self.num_samples - self.start


def collate(items: Sequence[Tuple[torch.Tensor, int, str]]) -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
    images = torch.stack([img for img, _, _ in items])
    labels = torch.tensor([label for _, label, _ in items], dtype=torch.long)
    return images, labels, [e for _, _, e in items if e]


class Unflipped(Dataset):
    """Every training image once, in order, never flipped: `(index, uint8 CHW, label, error)` items, or eval's
    `(index, uint8 CHW, error)` with `labels=False` (the teacher's targets embed them with eval's batcher)."""

    def __init__(self, dataset: _FaceImages, labels: bool = True) -> None:
        self.dataset = dataset
        self.labels = labels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label, error = self.dataset.decoded(index, flip=False)
        return (index, image, label, error) if self.labels else (index, image, error)


class Preloaded:
    """`--preload`: every training image decoded once and kept, as uint8, on the training device (37 KB a 112x112
    crop: 230 MB for 6,000 crops); a step then indexes its batch there and reads no file.

    It yields exactly the batches the DataLoader path yields (the sampler's order, the dataset's flips drawn from
    (seed, epoch, index)), so a run may switch between the two, and resume, without changing a single step.
    Why: with augmentation on the device and a small model, decoding JPEGs on the host is what limits a step (a
    hundred epochs of a small face set re-decode every crop a hundred times)."""

    def __init__(self, dataset: _FaceImages, device: torch.device, workers: int, batch_size: int = 256) -> None:
        self.dataset = dataset
        n = len(dataset)
        images = torch.empty((n, 3, *dataset.input_size), dtype=torch.uint8)
        labels = torch.empty(n, dtype=torch.long)
        loader = torch.utils.data.DataLoader(Unflipped(dataset), batch_size=batch_size, num_workers=workers,
                                             collate_fn=lambda items: items)
        for items in loader:
            for index, image, label, error in items:
                if error:
                    raise FaceDataError(error)
                images[index], labels[index] = image, label
        self.images, self.labels = images.to(device), labels

    def batches(self, sampler: 'ResumableSampler', batch_size: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor,
                                                                                       List[str]]]:
        """This epoch's full batches from the sampler's position: (images on the device, labels, no errors)."""
        keys = list(iter(sampler))
        n = len(self.dataset)
        for start in range(0, len(keys) - batch_size + 1, batch_size):  # drop_last, as the DataLoader
            epoch_index = [divmod(k, n) for k in keys[start:start + batch_size]]
            index = torch.tensor([i for _, i in epoch_index])
            flips = torch.tensor([self.dataset._flip(i, e or self.dataset.epoch) for e, i in epoch_index])
            images = self.images[index.to(self.images.device)]
            flip_dev = flips.to(images.device).view(-1, 1, 1, 1)
            images = torch.where(flip_dev, images.flip(3), images)
            label = self.labels[index]
            if self.dataset.with_index:
                label = torch.stack([label, index, flips.long()], 1)
            yield images, label, []
