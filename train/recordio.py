"""insightface RecordIO packs (`train.rec` + `train.idx`) read without mxnet (unmaintained).

Each record: uint32 magic 0xced7230a, uint32 length word (low 29 bits: length, high 3 bits: continuation flag
0 whole / 1 first / 2 middle / 3 last part), the payload, zero padding to 4 bytes. A record split into parts had
the magic word at the split points; joining the parts puts it back. The payload starts with a `<IfQQ` header
(flag, label, id, id2); when flag > 0, `flag` float32 labels follow, then the encoded image. Record 0 (flag > 0)
holds the range of image keys in its first two labels: images are keys 1 .. label[0] - 1.
"""
import os
import struct
import warnings
from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from timm_mobileone.errors import UserError

MAGIC = 0xced7230a
_HEADER = struct.Struct('<IfQQ')
_LENGTH_MASK = (1 << 29) - 1
# A face image record is kilobytes; a length word beyond this is corruption, refused before anything is read.
MAX_RECORD_BYTES = 64 << 20
MAX_IMAGE_KEYS = 1 << 40  # record 0's declared image range: far above WebFace260M's 2.6e8


class RecordIOError(UserError, ValueError):
    """A malformed or missing RecordIO file (a user error)."""


class Record(NamedTuple):
    flag: int
    label: Union[float, np.ndarray]
    id: int
    id2: int
    data: bytes


def unpack(payload: bytes) -> Record:
    """Split a record payload into its header, labels and image bytes (mxnet.recordio.unpack)."""
    if len(payload) < _HEADER.size:
        raise RecordIOError(f'record of {len(payload)} bytes is shorter than its {_HEADER.size}-byte header')
    flag, label, id1, id2 = _HEADER.unpack_from(payload)
    data = payload[_HEADER.size:]
    if flag > 0:
        if 4 * flag > len(data):
            raise RecordIOError(f'record header declares {flag} labels ({4 * flag} bytes) but only {len(data)} '
                                f'bytes follow')
        labels = np.frombuffer(data[:4 * flag], dtype=np.float32).copy()
        return Record(flag, labels, id1, id2, data[4 * flag:])
    return Record(flag, label, id1, id2, data)


def pack(flag: int, label, id1: int, id2: int, data: bytes) -> bytes:
    """A record payload (mxnet.recordio.pack): with `flag` > 0, `label` is a sequence of `flag` floats."""
    if flag > 0:
        labels = np.asarray(label, dtype=np.float32).reshape(-1)
        if len(labels) != flag:
            raise ValueError(f'flag {flag} needs {flag} labels, got {len(labels)}')
        return _HEADER.pack(flag, 0.0, id1, id2) + labels.tobytes() + data
    return _HEADER.pack(0, float(label), id1, id2) + data


class RecordIOReader:
    """Random access to an indexed RecordIO file: `reader.read(key)` -> Record."""

    def __init__(self, rec_path: Union[str, Path], idx_path: Optional[Union[str, Path]] = None) -> None:
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path else self.rec_path.with_suffix('.idx')
        if not self.rec_path.is_file():
            raise RecordIOError(f'{self.rec_path}: no such file')
        if not self.idx_path.is_file():
            raise RecordIOError(f'{self.idx_path}: no such file (a .rec pack needs its .idx index)')
        self.keys, self._offsets = _read_index(self.idx_path)
        self._file = None
        self._pid = None

    def _position(self, key: int) -> Optional[int]:
        i = int(np.searchsorted(self.keys, key))
        return i if i < len(self.keys) and int(self.keys[i]) == key else None

    def __contains__(self, key: int) -> bool:
        return self._position(key) is not None

    def offset(self, key: int) -> int:
        """The byte offset of record `key` in the .rec file."""
        i = self._position(key)
        if i is None:
            raise RecordIOError(f'{self.idx_path}: no record {key}')
        return int(self._offsets[i])

    def __getstate__(self):  # DataLoader workers (spawned) reopen the file
        state = dict(self.__dict__)
        state['_file'] = None
        return state

    def _handle(self):
        # one handle per process: forked DataLoader workers inherit the parent's open file, and a shared file
        # offset between seek() and read() in two workers reads one record's bytes at another's offset
        if self._file is None or self._pid != os.getpid():
            self._file = open(self.rec_path, 'rb')
            self._pid = os.getpid()
        return self._file

    def _read_part(self, f, offset: int) -> Tuple[int, bytes, int]:
        size = os.fstat(f.fileno()).st_size
        if offset < 0:
            raise RecordIOError(f'{self.rec_path}: record offset {offset} is negative; is {self.idx_path.name} the '
                                f'index of this .rec?')
        if offset > size - 8:
            raise RecordIOError(f'{self.rec_path}: truncated record at offset {offset} (the file ends at {size} '
                                f'bytes), or {self.idx_path.name} is not the index of this .rec')
        f.seek(offset)
        head = f.read(8)
        if len(head) < 8:
            raise RecordIOError(f'{self.rec_path}: truncated record at offset {offset}')
        magic, word = struct.unpack('<II', head)
        if magic != MAGIC:
            raise RecordIOError(f'{self.rec_path}: bad magic 0x{magic:08x} at offset {offset} '
                                f'(expected 0x{MAGIC:08x})')
        cflag, length = word >> 29, word & _LENGTH_MASK
        if length > MAX_RECORD_BYTES:
            raise RecordIOError(f'{self.rec_path}: record at offset {offset} declares {length} bytes (more than '
                                f'{MAX_RECORD_BYTES >> 20} MB): corrupt')
        if offset + 8 + length > size:
            raise RecordIOError(f'{self.rec_path}: truncated record at offset {offset} ({length} bytes declared, '
                                f'{size - offset - 8} left)')
        data = f.read(length)
        if len(data) < length:
            raise RecordIOError(f'{self.rec_path}: truncated record at offset {offset}')
        return cflag, data, offset + 8 + ((length + 3) & ~3)

    def read_at(self, offset: int) -> bytes:
        """The payload of the record starting at `offset`, its parts joined."""
        f = self._handle()
        cflag, data, nxt = self._read_part(f, offset)
        if cflag == 0:
            return data
        if cflag != 1:
            raise RecordIOError(f'{self.rec_path}: record at offset {offset} starts with continuation flag {cflag}')
        parts = [data]
        while True:
            cflag, data, nxt = self._read_part(f, nxt)
            parts.append(data)
            if cflag == 3:
                return struct.pack('<I', MAGIC).join(parts)
            if cflag != 2:
                raise RecordIOError(f'{self.rec_path}: broken multi-part record at offset {offset}')

    def read(self, key: int) -> Record:
        return unpack(self.read_at(self.offset(key)))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _read_index(idx_path: Path) -> Tuple[np.ndarray, np.ndarray]:
    """(keys, offsets) of a `.idx` file as sorted int64 arrays.

    Arrays, not a dict: MS1MV3's 5.2M entries make a dict of about 500 MB per process, and forked DataLoader workers
    copy the pages their reference counting touches; arrays stay shared. A fast parse first; a file it cannot
    read whole is read line by line, to name the bad line.
    """
    data = idx_path.read_bytes()
    values = None
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # numpy warns (here: raises) where it stops at unparseable text
        try:
            values = np.fromstring(data, dtype=np.int64, sep=' ')
        except (ValueError, DeprecationWarning):
            values = None
    lines = data.count(b'\n') + (0 if data.endswith(b'\n') or not data else 1)
    if values is None or values.size != 2 * lines:
        pairs = []
        for line_no, line in enumerate(data.decode('utf-8', 'replace').splitlines(), start=1):
            fields = line.split()
            if not fields:
                continue
            try:
                key, offset = int(fields[0]), int(fields[1])
            except (ValueError, IndexError):
                raise RecordIOError(f'{idx_path}:{line_no}: expected "key<TAB>offset", got {line!r}') from None
            if len(fields) > 2:
                raise RecordIOError(f'{idx_path}:{line_no}: expected "key<TAB>offset", got {line!r}')
            if not (-2 ** 63 <= key < 2 ** 63 and -2 ** 63 <= offset < 2 ** 63):  # (fuzz_soak: OverflowError)
                raise RecordIOError(f'{idx_path}:{line_no}: key or offset out of range, got {line[:80]!r}')
            pairs += [key, offset]
        values = np.array(pairs, dtype=np.int64)
    table = values.reshape(-1, 2)
    order = np.argsort(table[:, 0], kind='stable')
    return np.ascontiguousarray(table[order, 0]), np.ascontiguousarray(table[order, 1])


def image_keys(reader: RecordIOReader) -> Sequence[int]:
    """The image keys of an insightface pack: record 0's label range (a `range`), else every indexed key."""
    if 0 in reader:
        head = reader.read(0)
        if head.flag > 0:
            end = float(head.label[0])
            if not (np.isfinite(end) and 1 <= end <= MAX_IMAGE_KEYS):
                raise RecordIOError(f'{reader.rec_path}: header record 0 declares images 1..{end:g}: corrupt')
            return range(1, int(end))
    return reader.keys


def write_records(rec_path: Union[str, Path], payloads: List[bytes], max_part: int = _LENGTH_MASK) -> None:
    """Write payloads as an indexed RecordIO file (`.rec` + `.idx`, keys 0..n-1).

    A payload holding the magic word is split there into parts, as mxnet's writer does. `max_part` only exists so
    that tests can exercise other splits.
    """
    rec_path = Path(rec_path)
    magic = struct.pack('<I', MAGIC)
    index = []
    with open(rec_path, 'wb') as f:
        for key, payload in enumerate(payloads):
            index.append(f'{key}\t{f.tell()}\n')
            parts = payload.split(magic)
            for i, part in enumerate(parts):
                cflag = 0 if len(parts) == 1 else (1 if i == 0 else (3 if i == len(parts) - 1 else 2))
                if len(part) > max_part:
                    raise ValueError('record part too long')
                f.write(struct.pack('<II', MAGIC, (cflag << 29) | len(part)))
                f.write(part)
                f.write(b'\x00' * ((4 - len(part) % 4) % 4))
    rec_path.with_suffix('.idx').write_text(''.join(index))
