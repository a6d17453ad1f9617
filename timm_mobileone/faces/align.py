"""Face detection and alignment to insightface's ArcFace 112x112 template, in the wheel (`pip install
'timm-mobileone[faces]'` for OpenCV and scikit-image): what `timm_mobileone.faces`, `eval.align`, `eval.cfp` on raw
photos and `eval.ijb` share.

- Detection: YuNet (Wu, Peng, Yu; libfacedetection, Apache-2.0) run by OpenCV's `cv2.FaceDetectorYN`: boxes, a score
  and 5 landmarks (the subject's right eye, left eye, nose tip, right and left mouth corners: the template's order,
  left to right in the image). The photo is detected at its own size, downscaled where its longer side exceeds
  `max_side` (640) and upscaled where it is below `min_side` (320, the input size of OpenCV's YuNet demo). Measured
  on `cfp_dev` (docs/eval.md): small tight photos detected at their own size lose 1.1 points of CFP-FP to
  landmarks YuNet places less well; upscaling every photo to 640 loses 3 (more misses on profiles).
- The face: the largest box x score (`select='area_score'`), the largest box, the highest score, or the one nearest
  the photo's centre.
- The transform: scikit-image's least-squares similarity (Umeyama) of the 5 points onto the template, applied by
  OpenCV's `warpAffine` (bilinear, border 0) to the BGR photo: insightface's `norm_crop`, number for number
  (`tests/test_ijb.py` holds the IJB path to it).
- Fallbacks, in order, for photos the detector misses: 5 landmarks the caller knows (a dataset's own, e.g. CFP's 30
  fiducial points reduced to 5), then the centre square of the photo resized to 112x112. Each photo's record says
  which served.
"""
import hashlib
import io
import os
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import UserError, first_line
from ..verification_data import IMAGE_EXTS, sample_bits, to_rgb8

__all__ = ['ARCFACE_TEMPLATE', 'CROP_SIZE', 'SELECT', 'AlignSettings', 'Detector', 'similarity_matrix',
           'align_landmarks', 'center_crop', 'choose_face', 'read_photo', 'align_photo']

# The ArcFace 5-point template for 112x112 crops: the 96x112 points with x shifted by 8.
ARCFACE_TEMPLATE = np.array([
    [30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366], [33.5493, 92.3655], [62.7299, 92.2041]],
    dtype=np.float32)
ARCFACE_TEMPLATE[:, 0] += 8.0
CROP_SIZE = 112
SELECT = ('area_score', 'largest', 'score', 'central')
# The YuNet file used unless a detector is named (eval.align's --detector), shipped in the wheel with its licence and
# notice beside it (Apache-2.0)
DEFAULT_DETECTOR = Path(__file__).resolve().parent / 'detectors' / 'face_detection_yunet_2023mar.onnx'
# Largest photo decoded (pixels): a few hundred bytes of header can declare a 100,000 x 100,000 image
MAX_PIXELS = 100_000_000


@dataclass(frozen=True)
class AlignSettings:
    """Everything that changes a crop; `key()` names an alignment cache."""
    detector_sha256: str
    score_threshold: float = 0.5
    nms_threshold: float = 0.3
    max_side: int = 640
    min_side: int = 320
    select: str = 'area_score'
    fallback: str = 'landmarks,center'
    jpeg_quality: int = 95
    version: int = 1  # bumped when the algorithm changes what a crop holds

    def key(self) -> str:
        text = repr(sorted(asdict(self).items()))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class Detector:
    """YuNet through `cv2.FaceDetectorYN`: `detect(bgr)` -> (N, 15) float32 rows `x, y, w, h, 5 x (px, py), score`
    in the photo's own pixel coordinates."""

    def __init__(self, path: Path, score_threshold: float = 0.5, nms_threshold: float = 0.3, max_side: int = 640,
                 min_side: int = 320) -> None:
        import cv2
        path = Path(path)
        if not path.is_file():
            raise UserError(f'--detector {path}: no such file')
        level = cv2.utils.logging.getLogLevel()
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # OpenCV 5 warns on every net it builds
        try:
            self.net = cv2.FaceDetectorYN.create(str(path), '', (320, 320), score_threshold, nms_threshold, 5000)
            # a file OpenCV loads can still be another network: run it once and check what comes out
            _, faces = self.net.detect(np.zeros((320, 320, 3), np.uint8))
        except cv2.error as e:
            raise UserError(f'--detector {path}: not a YuNet face detector OpenCV can run '
                            f'({first_line(e).strip()[-160:]})') from None
        finally:
            cv2.utils.logging.setLogLevel(level)
        if faces is not None and (faces.ndim != 2 or faces.shape[1] != 15):
            raise UserError(f'--detector {path}: not a YuNet face detector (rows of {faces.shape[-1]} values, '
                            f'expected 15)')
        self.max_side, self.min_side = max_side, min_side

    def detect(self, bgr: np.ndarray) -> np.ndarray:
        import cv2
        h, w = bgr.shape[:2]
        scale = 1.0
        if self.max_side and max(h, w) > self.max_side:
            scale = self.max_side / max(h, w)
        elif self.min_side and max(h, w) < self.min_side:
            scale = self.min_side / max(h, w)
        image = bgr if scale == 1 else cv2.resize(
            bgr, (max(1, round(w * scale)), max(1, round(h * scale))),
            interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        self.net.setInputSize((image.shape[1], image.shape[0]))
        _, faces = self.net.detect(image)
        if faces is None or not len(faces):
            return np.zeros((0, 15), np.float32)
        faces = faces.astype(np.float32).copy()
        faces[:, :14] /= scale
        return faces


def choose_face(faces: np.ndarray, shape: Tuple[int, int], select: str = 'area_score') -> int:
    """Index of the face to align among `Detector.detect`'s rows of a photo of (h, w) `shape`."""
    area = faces[:, 2] * faces[:, 3]
    if select == 'area_score':
        return int(np.argmax(area * faces[:, 14]))
    if select == 'largest':
        return int(np.argmax(area))
    if select == 'score':
        return int(np.argmax(faces[:, 14]))
    if select == 'central':
        centre = faces[:, :2] + faces[:, 2:4] / 2
        return int(np.argmin(np.sum((centre - np.array([shape[1], shape[0]]) / 2) ** 2, axis=1)))
    raise ValueError(f'select must be one of {SELECT}, got {select!r}')


def similarity_matrix(landmarks: np.ndarray) -> Optional[np.ndarray]:
    """The 2x3 matrix of scikit-image's least-squares similarity transform from `landmarks` (5, 2) to the ArcFace
    template (insightface's `estimate_norm`), or None where the points are degenerate."""
    from skimage.transform import SimilarityTransform
    src = np.asarray(landmarks, dtype=np.float32)
    if hasattr(SimilarityTransform, 'from_estimate'):  # scikit-image >= 0.26 (estimate() is deprecated there)
        tform = SimilarityTransform.from_estimate(src, ARCFACE_TEMPLATE)
        if not tform:
            return None
    else:
        tform = SimilarityTransform()
        if not tform.estimate(src, ARCFACE_TEMPLATE):
            return None
    matrix = tform.params[0:2, :]
    return matrix if np.isfinite(matrix).all() and abs(np.linalg.det(matrix[:, :2])) > 1e-12 else None


def align_landmarks(image_bgr: np.ndarray, landmarks: np.ndarray) -> Optional[np.ndarray]:
    """The (112, 112, 3) uint8 RGB crop of a BGR image, as insightface's `norm_crop` makes it; None for degenerate
    landmarks."""
    import cv2
    matrix = similarity_matrix(landmarks)
    if matrix is None:
        return None
    crop = cv2.warpAffine(image_bgr, matrix, (CROP_SIZE, CROP_SIZE), borderValue=0.0)
    return cv2.cvtColor(crop, cv2.COLOR_BGR2RGB)


def center_crop(image_bgr: np.ndarray) -> np.ndarray:
    """The photo's centre square resized to 112x112, RGB: the last fallback (no alignment at all)."""
    import cv2
    h, w = image_bgr.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = cv2.resize(image_bgr[top:top + side, left:left + side], (CROP_SIZE, CROP_SIZE),
                      interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(crop, cv2.COLOR_BGR2RGB)


def read_photo(data: bytes) -> np.ndarray:
    """(H, W, 3) uint8 BGR of an encoded photo, EXIF orientation applied, every mode Pillow opens brought to 8 bits
    by its range (`verification_data.to_rgb8`). Raises ValueError with the reason for anything that is not a whole
    image (a truncated JPEG included: OpenCV would decode its top half and go on) or has no known range."""
    from PIL import Image, ImageOps
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.size[0] * img.size[1] > MAX_PIXELS:
                raise ValueError(f'{img.size[0]}x{img.size[1]} pixels is more than this reads ({MAX_PIXELS:,})')
            img.load()
            rgb = to_rgb8(ImageOps.exif_transpose(img), sample_bits(img))
    except ValueError:
        raise
    except Image.UnidentifiedImageError:  # its message names the BytesIO object, an address
        raise ValueError('cannot be decoded as an image (not an image format Pillow reads)') from None
    except (OSError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise ValueError(f'cannot be decoded as an image ({first_line(e)})') from None
    if rgb.ndim != 3 or min(rgb.shape[:2]) < 8:
        raise ValueError(f'is {rgb.shape[1]}x{rgb.shape[0]} pixels, too small to hold a face')
    return np.ascontiguousarray(rgb[:, :, ::-1])


def align_photo(bgr: np.ndarray, detector: Detector, settings: AlignSettings,
                landmarks: Optional[np.ndarray] = None) -> Tuple[np.ndarray, Dict]:
    """(112x112x3 RGB crop, record) of one photo: the detector's face, else the fallbacks `settings.fallback` lists
    ('landmarks': `landmarks` (5, 2) given by the caller; 'center': the centre square). The record holds `served`
    ('detector', 'landmarks' or 'center'), `faces` (how many the detector found) and the chosen face's `score`."""
    faces = detector.detect(bgr)
    record: Dict = dict(faces=int(len(faces)))
    if len(faces):
        face = faces[choose_face(faces, bgr.shape[:2], settings.select)]
        crop = align_landmarks(bgr, face[4:14].reshape(5, 2))
        if crop is not None:
            return crop, dict(record, served='detector', score=round(float(face[14]), 4))
    fallbacks = [f for f in settings.fallback.split(',') if f]
    if 'landmarks' in fallbacks and landmarks is not None:
        crop = align_landmarks(bgr, landmarks)
        if crop is not None:
            return crop, dict(record, served='landmarks')
    if 'center' in fallbacks:
        return center_crop(bgr), dict(record, served='center')
    raise ValueError('no face found' + (' (no fallback left)' if fallbacks else ''))


# ----------------------------------------------------------------------------------------------------------------
# a folder of photos -> a folder of crops, resumable and parallel

SETTINGS_FILE = 'align_settings.json'
RECORDS_FILE = 'align_records.jsonl'  # one line per photo, appended as its crop lands: what a resumed run skips
REPORT_FILE = 'align_report.json'

_worker: Dict = {}


def _init_worker(detector_path: str, settings: AlignSettings) -> None:
    import cv2
    cv2.setNumThreads(1)  # the processes share the cores
    _worker.update(settings=settings, detector=Detector(Path(detector_path), settings.score_threshold,
                                                        settings.nms_threshold, settings.max_side, settings.min_side))


def _align_one(job: Tuple[str, str, Optional[np.ndarray]]) -> Tuple[str, Optional[bytes], Dict]:
    """(name, encoded crop or None, record) of one photo; per-photo problems go in the record, never raise."""
    import cv2
    name, path, landmarks = job
    settings = _worker['settings']
    source = None
    try:
        with open(path, 'rb') as f:
            source = _stat_key(os.fstat(f.fileno()))
            bgr = read_photo(f.read())
        crop, record = align_photo(bgr, _worker['detector'], settings, landmarks)
    except (OSError, ValueError) as e:
        return name, None, dict(image=name, error=first_line(e), source=source)
    ext = Path(name).suffix.lower()
    params = [cv2.IMWRITE_JPEG_QUALITY, settings.jpeg_quality] if ext in ('.jpg', '.jpeg') else []
    ok, encoded = cv2.imencode(ext if ext in IMAGE_EXTS else '.png', cv2.cvtColor(crop, cv2.COLOR_RGB2BGR), params)
    if not ok:
        return name, None, dict(image=name, error=f'OpenCV cannot encode a {ext} crop', source=source)
    return name, encoded.tobytes(), dict(record, image=name, source=source)


def _stat_key(st: os.stat_result) -> List[int]:
    """What says a source photo is the one a crop was made from: its size and modification time (ns), as make and
    rsync judge it; a photo replaced under the same name is aligned again."""
    return [int(st.st_size), int(st.st_mtime_ns)]


def source_key(path: Path) -> Optional[List[int]]:
    """A photo's size and modification time (ns), None where it cannot be read: what says a crop or an embedding
    was made from the file there now."""
    try:
        return _stat_key(path.stat())
    except OSError:
        return None


def _plain_name(name: str) -> bool:
    """A relative path that stays inside the folder it is joined to (no '..', not absolute): records are files a
    user can edit, and a crop is only ever removed inside the destination."""
    parts = PurePosixPath(name).parts
    return bool(parts) and not PurePosixPath(name).is_absolute() and '..' not in parts and '\\' not in name


def _check_target(path: Path) -> None:
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise UserError(f'{path}: exists and is not a plain file (the crops and records are written there)')
    if path.name == RECORDS_FILE and path.exists() and path.stat().st_nlink > 1:  # appended in place, not replaced
        raise UserError(f'{path}: is a hard link to another file, which appending records would change')


def check_destination(src: Path, dst: Path, names: Sequence[str]) -> None:
    """UserError, before anything is written, where writing the crops of `names` (relative to `src`) into `dst`
    could change a source photo or a file no alignment run wrote: `dst` is `src`, contains it, holds files but no
    alignment settings (e.g. `eval.align` with its two folders swapped), or a crop's path leads out of `dst` (a link)
    or onto something that is not a plain file (a folder named like a crop)."""
    try:
        _check_destination(src, dst, names)
    except OSError as e:  # a folder on the way that cannot be read
        raise UserError(f'{dst}: cannot be checked ({e.strerror or first_line(e)})') from None


def _check_destination(src: Path, dst: Path, names: Sequence[str]) -> None:
    s, d = src.resolve(), dst.resolve()
    if d == s:
        raise UserError(f'{dst}: the crops need their own folder, not the photos\' folder itself')
    if s.is_relative_to(d):
        raise UserError(f'{dst}: contains the photos\' folder {src}; the crops need a folder outside it')
    if dst.exists() or dst.is_symlink():
        if not dst.is_dir():
            raise UserError(f'{dst}: exists and is not a folder')
        if not (dst / SETTINGS_FILE).is_file() and any(dst.iterdir()):
            raise UserError(f'{dst}: holds files no alignment run wrote (no {SETTINGS_FILE}); the crops need a new '
                            f'or empty folder (are the two folders swapped?)')
    for name in (SETTINGS_FILE, RECORDS_FILE, REPORT_FILE):
        _check_target(dst / name)
    inside = d.is_relative_to(s)
    parents: Dict[Path, Path] = {}
    for name in names:
        out = dst / name
        if out.parent not in parents:
            parents[out.parent] = out.parent.resolve()
        if not parents[out.parent].is_relative_to(d):
            raise UserError(f'{out}: lies outside {dst} (a link in its path leads to {parents[out.parent]})')
        if inside and (src / name).resolve().is_relative_to(d):
            raise UserError(f'{src / name}: a photo inside the destination {dst}; the crops need a folder outside '
                            f'the photos they are made from')
        _check_target(out)


def read_records(path: Path, key: str = 'image') -> Dict[str, Dict]:
    """The records of an earlier run (a JSON object a line), by their `key` field; a line cut short by a crash is
    ignored (its photo runs again). Shared by `align_folder` and `faces embed`'s resumable runs."""
    import json
    records: Dict[str, Dict] = {}
    if path.is_file():
        for line in path.read_text(encoding='utf-8', errors='replace').splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get(key), str):
                records[record[key]] = record
    return records


def align_folder(src: Path, dst: Path, names: Sequence[str], settings: AlignSettings, detector_path: Path,
                 workers: int = 1, progress: bool = True, landmarks: Optional[Dict[str, np.ndarray]] = None,
                 overwrite: bool = False, desc: str = 'align') -> Dict:
    """Align the photos `names` (paths relative to `src`) into `dst` under the same relative paths.

    Resumable: each crop is written whole (atomic rename) and then recorded in `dst/align_records.jsonl` with its
    source's size and modification time; a rerun skips the photos recorded with their crop in place and their source
    unchanged, and refuses a `dst` aligned with other settings unless `overwrite`, which first removes every crop the
    earlier records list. Photos that fail (not an image, truncated, no face and no fallback) are recorded with the
    reason and get no crop (an earlier crop of theirs is removed). Nothing is written where `check_destination` refuses
    `dst`; file-system errors are one-line `UserError`s. Returns the report written to `dst/align_report.json`:
    settings, counts and per-photo problems of every photo in `dst` (earlier runs' included).
    """
    import json
    import multiprocessing
    import sys
    import time

    from tqdm import tqdm

    from ..files import atomic_write

    check_destination(src, dst, names)
    Detector(detector_path, settings.score_threshold)  # a bad detector file: one error line, before anything
    try:
        dst.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f'{dst}: cannot create the folder ({e.strerror or first_line(e)})') from None
    stated = dict(asdict(settings), detector=str(detector_path))
    settings_path = dst / SETTINGS_FILE
    if settings_path.is_file() and not overwrite:
        try:
            before = json.loads(settings_path.read_text())
        except ValueError:
            before = None
        if not isinstance(before, dict) or {k: v for k, v in before.items() if k != 'detector'} != \
                {k: v for k, v in stated.items() if k != 'detector'}:
            changed = sorted(k for k in stated if k != 'detector' and (before or {}).get(k) != stated[k])
            raise UserError(f'{dst} holds crops aligned with other settings ({", ".join(changed) or "unreadable"}'
                            f' differ): give another destination, or --overwrite to align everything again')
    records_path = dst / RECORDS_FILE
    try:
        if overwrite:  # the destination becomes exactly what these settings make: no crop of an earlier run stays
            inside = dst.resolve()
            for name in read_records(records_path):  # a file a user can edit: each name checked before a removal
                crop = dst / name
                if _plain_name(name) and crop.is_file() and not crop.is_symlink() \
                        and crop.parent.resolve().is_relative_to(inside):
                    crop.unlink()
            records_path.unlink(missing_ok=True)
        done = read_records(records_path)
        atomic_write(settings_path, lambda f: f.write((json.dumps(stated, indent=1) + '\n').encode()))
    except OSError as e:
        raise UserError(f'{dst}: cannot be written ({e.strerror or first_line(e)})') from None
    # a photo is done when its crop is in place and its source is the one the crop was made from
    todo = [n for n in names if not (n in done and 'error' not in done[n] and (dst / n).is_file()
                                     and done[n].get('source') == source_key(src / n))]
    landmarks = landmarks or {}
    jobs = [(n, str(src / n), landmarks.get(n)) for n in todo]
    t0 = time.perf_counter()
    bar = tqdm(total=len(jobs), desc=desc, unit='photo', disable=not (progress and sys.stderr.isatty()),
               file=sys.stderr)
    workers = max(1, min(workers, len(jobs)))
    name = ''
    try:
        with open(records_path, 'a', encoding='utf-8') as log:
            if workers == 1:
                _init_worker(str(detector_path), settings)
                results = map(_align_one, jobs)
                pool = None
            else:
                pool = multiprocessing.get_context('spawn').Pool(workers, _init_worker, (str(detector_path), settings))
                results = pool.imap_unordered(_align_one, jobs, chunksize=8)
            try:
                for name, encoded, record in results:
                    if encoded is not None:
                        atomic_write(dst / name, lambda f: f.write(encoded))
                    elif (dst / name).is_file():  # an earlier crop of a photo that now fails is not its crop
                        (dst / name).unlink()
                    log.write(json.dumps(record) + '\n')
                    log.flush()
                    done[name] = record
                    bar.update(1)
            finally:
                if pool is not None:
                    pool.terminate()
    except OSError as e:  # a full disk, a folder made read-only meanwhile: what is recorded stays, a rerun resumes
        raise UserError(f'{dst / name}: cannot be written ({e.strerror or first_line(e)}); a rerun resumes') from None
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    report = summarize(done, stated)  # every photo of the folder, this run's and earlier runs'
    report.update(aligned_now=len(jobs), seconds=round(seconds, 3),
                  photos_per_second=round(len(jobs) / seconds, 1) if jobs and seconds > 0 else None)
    atomic_write(dst / REPORT_FILE, lambda f: f.write((json.dumps(report, indent=1) + '\n').encode()))
    return report


def summarize(records: Dict[str, Dict], settings: Dict) -> Dict:
    """Counts of how each photo was served, and the photos that need a look (errors, fallbacks, several faces)."""
    served: Dict[str, int] = {}
    for r in records.values():
        key = r.get('served', 'error')
        served[key] = served.get(key, 0) + 1
    return dict(
        settings=settings, photos=len(records), served=served,
        several_faces=sum(r.get('faces', 0) > 1 for r in records.values()),
        errors=[dict(image=n, error=r['error']) for n, r in sorted(records.items()) if 'error' in r],
        fallbacks=[dict(image=n, served=r['served']) for n, r in sorted(records.items())
                   if r.get('served') not in (None, 'detector')],
    )
