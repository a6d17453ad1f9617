"""IJB-B / IJB-C 1:1 template verification: insightface's `eval_ijbc.py` protocol as numpy functions.

Reproduces `recognition/arcface_torch/eval_ijbc.py` of deepinsight/insightface (MIT) number for number, with its
defaults (flip test F2, feature norm kept N1, detector score D1):
- alignment: the similarity transform from the five landmarks to the ArcFace 112x112 template, estimated by
  scikit-image's `SimilarityTransform` (Umeyama), applied by OpenCV's `warpAffine` (bilinear, border 0) to the
  `cv2.imread` (BGR) image, then converted to RGB. Both libraries are the reference's own: OpenCV's bilinear warp uses
  5-bit fixed-point weights on uint8, which neither Pillow nor torch's grid_sample reproduce bit for bit;
- image feature: raw output of the crop + raw output of its flip (float32), times the faceness score;
- template feature: images of one media averaged, media features summed (float32), L2-normalized (float64);
- score: the dot product of the two template features (float64), in chunks of pairs;
- TAR@FAR: `sklearn.metrics.roc_curve`, both curves reversed, the TPR at the first index of the smallest
  `|fpr - FAR|`.

Scale (IJB-C: 469,375 images, 23,124 templates, 15,658,489 pairs): image features are pooled into per-(template,
media) float32 sums as they arrive (`TemplatePooler`), so memory holds one row per media, not per image. Adding the
images of a media one by one, in file order, is exactly the float32 summation `np.mean(..., axis=0)` performs.
"""
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from timm_mobileone.verification_data import PackError

from timm_mobileone.faces.align import ARCFACE_TEMPLATE, CROP_SIZE, align_landmarks, similarity_matrix  # noqa: F401 (this module's API)

_logger = logging.getLogger('eval')

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
TARGETS = ('IJBC', 'IJBB')
PAIR_CHUNK = 10_000  # pairs scored at once: 3 float64 arrays of PAIR_CHUNK x D (120 MB at 512-d; 50,000 took 0.6 GB)


def far_key(far: float) -> str:
    """'1e-4' for 1e-4: the JSON key of a FAR point."""
    return f'1e{int(round(np.log10(far)))}'


# ----------------------------------------------------------------------------------------------------------------
# meta files


@dataclass
class IJBMeta:
    """The meta files of one IJB target, line i of the image lists describing image i."""
    root: Path
    target: str
    names: List[str]
    templates: np.ndarray  # (N,) int64 template id per image
    medias: np.ndarray  # (N,) int64 media id per image
    landmarks: Optional[np.ndarray]  # (N, 5, 2) float32, or None where the landmark file was not read
    faceness: Optional[np.ndarray]  # (N,) float32
    p1: np.ndarray  # (P,) template ids
    p2: np.ndarray
    label: np.ndarray  # (P,) 0/1

    @property
    def image_dir(self) -> Path:
        return self.root / 'loose_crop'


def target_root(data_dir: Path, target: str) -> Path:
    """The folder holding `meta/` and `loose_crop/`: DATA_DIR/IJBC (insightface's layout) or DATA_DIR itself."""
    for root in (data_dir / target, data_dir):
        if (root / 'meta').is_dir():
            return root
    raise PackError(f'{data_dir}: no {target}/meta folder (expected {data_dir / target / "meta"}, as insightface '
                    f'distributes IJB)')


def meta_file(root: Path, target: str, kind: str) -> Path:
    return root / 'meta' / f'{target.lower()}_{kind}.txt'


def _lines(path: Path):
    if not path.is_file():
        raise PackError(f'{path}: no such file')
    try:
        with open(path, 'rb') as f:
            for no, raw in enumerate(f, 1):
                try:
                    line = raw.decode('utf-8')
                except UnicodeDecodeError:
                    raise PackError(f'{path}:{no}: not UTF-8 text') from None
                if line.strip():
                    yield no, line.split()
    except OSError as e:
        raise PackError(f'{path}: cannot be read ({e.strerror or e})') from None


def _int(token: str, path: Path, no: int, what: str) -> int:
    try:
        value = int(token)
    except ValueError:
        raise PackError(f'{path}:{no}: {what} {token!r} is not an integer') from None
    if not -2 ** 62 < value < 2 ** 62:  # ids are int64 arrays (benchmarks/fuzz_soak.py found 2^64: OverflowError)
        raise PackError(f'{path}:{no}: {what} {token!r} is out of range')
    return value


def read_template_media(path: Path) -> Tuple[List[str], np.ndarray, np.ndarray]:
    """`*_face_tid_mid.txt`: image name, template id, media id per line."""
    names, templates, medias = [], [], []
    for no, fields in _lines(path):
        if len(fields) != 3:
            raise PackError(f'{path}:{no}: expected 3 fields (image template media), got {len(fields)}')
        names.append(fields[0])
        templates.append(_int(fields[1], path, no, 'template id'))
        medias.append(_int(fields[2], path, no, 'media id'))
    if not names:
        raise PackError(f'{path}: no images listed')
    return names, np.asarray(templates, dtype=np.int64), np.asarray(medias, dtype=np.int64)


def read_landmarks(path: Path, names: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
    """`*_name_5pts_score.txt`: image name, five (x, y) points, faceness score per line, in `names`' order."""
    landmarks = np.empty((len(names), 10), dtype=np.float32)
    faceness: List[str] = []
    count = 0
    for no, fields in _lines(path):
        if len(fields) != 12:
            raise PackError(f'{path}:{no}: expected 12 fields (image, 5 landmark points x y, score), got '
                            f'{len(fields)}')
        if count >= len(names):
            raise PackError(f'{path}: lists more images than the {len(names)} of the template file')
        if fields[0] != names[count]:
            raise PackError(f'{path}:{no}: image {fields[0]!r}, but line {count + 1} of the template file lists '
                            f'{names[count]!r} (both files list the images in one order)')
        try:
            landmarks[count] = [float(x) for x in fields[1:11]]
            float(fields[11])
        except ValueError:
            raise PackError(f'{path}:{no}: a landmark or score is not a number') from None
        faceness.append(fields[11])
        count += 1
    if count != len(names):
        raise PackError(f'{path}: {count} images, but the template file lists {len(names)}')
    if not np.isfinite(landmarks).all():
        bad = int(np.flatnonzero(~np.isfinite(landmarks).all(1))[0])
        raise PackError(f'{path}: the landmarks of image {names[bad]!r} are not finite')
    # insightface parses the score strings straight to float32
    scores = np.asarray(faceness).astype(np.float32)
    if not np.isfinite(scores).all():
        bad = int(np.flatnonzero(~np.isfinite(scores))[0])
        raise PackError(f'{path}: the faceness score of image {names[bad]!r} is not finite')
    return landmarks.reshape(-1, 5, 2), scores


_PLAIN_INTEGER_BYTES = np.zeros(256, dtype=bool)
_PLAIN_INTEGER_BYTES[list(b'0123456789 \t\r\n-+')] = True


def _plain_integer_text(path: Path) -> bool:
    """Whether the file holds only ASCII digits, signs and whitespace (checked 16 MB at a time)."""
    with open(path, 'rb') as f:
        while True:
            chunk = f.read(16 << 20)
            if not chunk:
                return True
            if not _PLAIN_INTEGER_BYTES[np.frombuffer(chunk, dtype=np.uint8)].all():
                return False


def read_pairs(path: Path) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`*_template_pair_label.txt`: template 1, template 2, label (0/1) per line. 15.7M lines for IJB-C: numpy's
    C parser, and a line-by-line rescan only to name the line that broke it.

    numpy's loadtxt only ever sees ASCII digits, signs and whitespace: on other text (a non-ASCII field that does not
    convert) numpy 2.4's parser crashed the process with a segmentation fault about one run in three (found by
    tests/test_fuzz.py). Anything else is read line by line in Python."""
    if not path.is_file():
        raise PackError(f'{path}: no such file')
    try:
        if not _plain_integer_text(path):
            raise ValueError('not plain integers')
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # "input contained no data": refused below, in one line
            pairs = np.loadtxt(path, dtype=np.int64, ndmin=2, comments=None, encoding='ascii')
    except ValueError:
        for no, fields in _lines(path):
            if len(fields) != 3:
                raise PackError(f'{path}:{no}: expected 3 fields (template1 template2 label), got {len(fields)}')
            for token in fields:
                if not token.lstrip('+-').isascii() or not token.lstrip('+-').isdigit():
                    raise PackError(f'{path}:{no}: {token!r} is not an integer')
        raise PackError(f'{path}: cannot be parsed as lines of three integers') from None
    except OSError as e:
        raise PackError(f'{path}: cannot be read ({e.strerror or e})') from None
    if pairs.size == 0:
        raise PackError(f'{path}: no pairs listed')
    if pairs.shape[1] != 3:
        raise PackError(f'{path}: expected 3 fields (template1 template2 label) per line, got {pairs.shape[1]}')
    label = pairs[:, 2]
    bad = np.flatnonzero((label != 0) & (label != 1))
    if bad.size:
        raise PackError(f'{path}: line {int(bad[0]) + 1}: label {int(label[bad[0]])} is not 0 or 1')
    return pairs[:, 0].copy(), pairs[:, 1].copy(), label.astype(np.int8)


def read_meta(data_dir: Path, target: str, landmarks: bool = True) -> IJBMeta:
    """Read and cross-check the meta files of `target` ('IJBC' or 'IJBB') under `data_dir`.

    `landmarks=False` skips the landmark file (scoring precomputed features needs only its scores; see
    `read_faceness`)."""
    root = target_root(Path(data_dir), target)
    names, templates, medias = read_template_media(meta_file(root, target, 'face_tid_mid'))
    lmk = score = None
    if landmarks:
        lmk, score = read_landmarks(meta_file(root, target, 'name_5pts_score'), names)
    p1, p2, label = read_pairs(meta_file(root, target, 'template_pair_label'))
    pair_path = meta_file(root, target, 'template_pair_label')
    known = np.unique(templates)
    for side in (p1, p2):
        missing = ~np.isin(side, known)
        if missing.any():
            first = int(np.flatnonzero(missing)[0])
            raise PackError(f'{pair_path}: line {first + 1}: template {int(side[first])} has no images in '
                            f'{meta_file(root, target, "face_tid_mid")} ({int(missing.sum())} pairs name templates '
                            f'without images)')
    return IJBMeta(root, target, names, templates, medias, lmk, score, p1, p2, label)


# ----------------------------------------------------------------------------------------------------------------
# alignment: insightface's norm_crop (timm_mobileone.faces.align)

align = align_landmarks


class AlignedCrops:
    """A torch Dataset of the aligned crops of the listed images: items (index, uint8 CHW RGB tensor, error).

    Decoding and alignment run in DataLoader workers; a failure travels as the item's message (see
    eval.api.embed_batches), so the main process reports it as one line naming the image.
    """

    def __init__(self, image_dir: Path, names: Sequence[str], landmarks: np.ndarray) -> None:
        self.image_dir = Path(image_dir)
        self.names = list(names)
        self.landmarks = landmarks

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int):
        import cv2
        import torch
        cv2.setNumThreads(1)  # workers and the model already share the cores
        path = self.image_dir / self.names[index]
        image = cv2.imread(str(path))  # BGR, as insightface reads it
        error = ''
        crop = None
        if image is None:
            error = f'{path}: cannot be read as an image'
        else:
            crop = align(image, self.landmarks[index])
            if crop is None:
                error = f'{path}: its landmarks {self.landmarks[index].tolist()} do not define a similarity transform'
        if crop is None:
            return index, torch.zeros(3, CROP_SIZE, CROP_SIZE, dtype=torch.uint8), error
        return index, torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1), ''


# ----------------------------------------------------------------------------------------------------------------
# features -> templates -> scores -> TAR@FAR


def image_features(raw: np.ndarray, raw_flip: Optional[np.ndarray], faceness: Optional[np.ndarray],
                   normalize: bool = False) -> np.ndarray:
    """insightface's per-image feature (float32): raw + flipped raw, optionally L2-normalized (its N0 mode),
    times the faceness score (D1; None: D0)."""
    feats = np.asarray(raw, dtype=np.float32)
    if raw_flip is not None:
        feats = feats + np.asarray(raw_flip, dtype=np.float32)
    if normalize:
        feats = feats / np.sqrt(np.sum(feats ** 2, -1, keepdims=True))
    if faceness is not None:
        feats = feats * np.asarray(faceness, dtype=np.float32)[:, np.newaxis]
    return feats


class TemplatePooler:
    """Pools image features into template features as they arrive, in image order.

    Memory: one float32 row per (template, media), not per image. The sums are built by adding the images of each
    media in file order, which is the float32 summation of insightface's `np.mean(feats[ind_m], axis=0)`.
    """

    def __init__(self, templates: np.ndarray, medias: np.ndarray) -> None:
        self.num_images = len(templates)
        self.unique_templates, t_index = np.unique(templates, return_inverse=True)
        keys, self.group = np.unique(np.stack([t_index.ravel(), np.asarray(medias).ravel()], 1), axis=0,
                                     return_inverse=True)
        self.group = self.group.ravel()
        self.group_template = keys[:, 0]  # groups sorted by (template, media id), as insightface's np.unique
        self.counts = np.bincount(self.group, minlength=len(keys))
        self.sums: Optional[np.ndarray] = None
        self.seen = 0

    @property
    def num_media(self) -> int:
        return len(self.group_template)

    def add(self, start: int, feats: np.ndarray) -> None:
        """Add the features of images start .. start + len(feats) - 1 (in order, every image once)."""
        if start != self.seen:
            raise ValueError(f'images must arrive in order: expected image {self.seen}, got {start}')
        if self.sums is None:
            self.sums = np.zeros((self.num_media, feats.shape[1]), dtype=np.float32)
        groups = self.group[start:start + len(feats)]
        for g, f in zip(groups, feats.astype(np.float32, copy=False)):
            self.sums[g] += f
        self.seen += len(feats)

    def template_features(self) -> np.ndarray:
        """(T, D) float64 L2-normalized template features, rows in `unique_templates` order."""
        from sklearn.preprocessing import normalize
        if self.seen != self.num_images:
            raise ValueError(f'{self.seen} of {self.num_images} images were added')
        media = self.sums / self.counts[:, None].astype(np.float32)
        dim = media.shape[1]
        template = np.zeros((len(self.unique_templates), dim), dtype=np.float32)
        for g, t in enumerate(self.group_template):  # media in ascending id order: np.sum's float32 order
            template[t] += media[g]
        return normalize(template.astype(np.float64))


def pair_scores(template_feats: np.ndarray, unique_templates: np.ndarray, p1: np.ndarray, p2: np.ndarray,
                chunk: int = PAIR_CHUNK) -> np.ndarray:
    """Dot products of the template features of each pair (float64), `chunk` pairs at a time."""
    i1 = np.searchsorted(unique_templates, p1)
    i2 = np.searchsorted(unique_templates, p2)
    score = np.empty(len(p1), dtype=np.float64)
    for s in range(0, len(p1), chunk):
        score[s:s + chunk] = np.sum(template_feats[i1[s:s + chunk]] * template_feats[i2[s:s + chunk]], -1)
    return score


def tar_at_far(label: np.ndarray, score: np.ndarray, fars: Sequence[float] = FARS) -> Dict:
    """insightface's TPR@FPR table: {'tar_at_far': {'1e-4': tar, ...}, 'auc', 'fpr', 'tpr'} (fractions)."""
    from sklearn.metrics import auc, roc_curve
    label = np.asarray(label)
    if label.min() == label.max():
        raise PackError('the pair list holds only ' + ('genuine' if label[0] else 'impostor') +
                        ' pairs; TAR@FAR needs both')
    fpr, tpr, _ = roc_curve(label, score)
    roc_auc = float(auc(fpr, tpr))
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    table = {far_key(far): float(tpr[int(np.argmin(np.abs(fpr - far)))]) for far in fars}
    return dict(tar_at_far=table, auc=roc_auc, fpr=fpr, tpr=tpr)
