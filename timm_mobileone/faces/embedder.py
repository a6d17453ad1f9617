"""Photos in, faces out: `FaceEmbedder` detects, aligns and embeds in one call, like insightface's `FaceAnalysis`.

    from timm_mobileone.faces import FaceEmbedder
    faces = FaceEmbedder('mobilefacenet', checkpoint='model-0000.params')      # or 'hf-hub:<repo>', 'local-dir:<dir>'
    a, b = faces(['a.jpg', 'b.jpg'])                                           # paths, PIL images or RGB arrays
    cosine = float(a.face.embedding @ b.face.embedding)

Each photo gives a `PhotoFaces`: a status (`ok`, `several_faces`, `no_face`, `error` with the reason: a photo that
cannot be decoded never raises for the whole batch) and its faces, the chosen one first (`face`), each with its box,
detector score, 5 landmarks, the aligned 112x112 crop (insightface's `norm_crop`, the crops `eval.align` writes) and
the L2-normalised embedding (image + horizontal flip summed before normalising, insightface's rule, unless
`flip=False`).

The model: a registered name with a checkpoint (`.safetensors`, `.pth`, insightface's MXNet `.params`), a
`hf-hub:` / `local-dir:` name (its weights come with it), or an exported artifact run by its runtime (`runtime=`
'onnx', 'executorch', 'ncnn': `timm_mobileone.deploy.formats`), whose input size and normalisation come from the
model name given beside it. `info` names what embeds: the artifact's path, runtime and sha256, or the model and its
checkpoint's sha256.
"""
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from ..errors import UserError, first_line
from ..files import sha256_file
import timm_mobileone.faces.align as A

__all__ = ['Face', 'PhotoFaces', 'FaceEmbedder', 'STATUSES']

STATUSES = ('ok', 'several_faces', 'no_face', 'error')
Photo = Union[str, Path, np.ndarray, Any]  # a path, an (H, W, 3) RGB / (H, W) gray uint8 array, or a PIL image


@dataclass
class Face:
    box: List[float]  # x, y, width, height in the photo's pixels (EXIF orientation applied)
    score: float
    landmarks: np.ndarray  # (5, 2): right eye, left eye, nose, right and left mouth corners
    crop: np.ndarray  # (112, 112, 3) uint8 RGB
    embedding: Optional[np.ndarray] = None  # (D,) float32, unit length

    def to_json(self) -> Dict[str, Any]:
        return dict(box=[round(float(v), 2) for v in self.box], score=round(float(self.score), 4),
                    landmarks=np.round(self.landmarks.astype(np.float64), 2).tolist())


@dataclass
class PhotoFaces:
    source: str
    status: str
    faces: List[Face] = field(default_factory=list)
    error: str = ''
    found: int = 0  # faces the detector found and aligned (`faces` may hold the chosen one only)

    @property
    def face(self) -> Optional[Face]:
        """The face the photo is about (largest box x score, or the embedder's `select`), None without one."""
        return self.faces[0] if self.faces else None

    def to_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = dict(photo=self.source, status=self.status, faces=max(self.found, len(self.faces)))
        if self.error:
            out['error'] = self.error
        if self.faces:
            out.update(self.faces[0].to_json())
        return out


class FaceEmbedder:
    """Detect, align and embed faces. Made once (the model and the detector load here), called on any number of
    photos; `embed_crops` embeds aligned 112x112 crops directly."""

    def __init__(self, model: str = 'mobileone_112_s0', checkpoint: str = '', *, artifact: str = '', runtime: str = '',
                 device: str = 'cpu', flip: bool = True, batch_size: int = 32, detector: str = '',
                 score_threshold: float = 0.5, min_side: int = 320, max_side: int = 640, select: str = 'area_score',
                 raw_pixels: Optional[bool] = None, channel_order: str = 'rgb', allow_random: bool = False) -> None:
        import timm
        import torch

        import timm_mobileone  # noqa: F401  (registers the models)
        from ..checkpoints import create_model_checked
        from ..deploy import formats
        if select not in A.SELECT:
            raise UserError(f'select {select!r}: one of {", ".join(A.SELECT)}')
        if channel_order not in ('rgb', 'bgr'):
            raise UserError(f"channel order {channel_order!r}: 'rgb' or 'bgr'")
        if batch_size < 1:
            raise UserError('batch size must be >= 1')
        self.flip, self.batch_size, self.select, self.channel_order = flip, batch_size, select, channel_order
        # a Hub / local-dir model's own verification result (config.json's face_verification, written by `hub
        # export --results`): the cosine threshold `compare` answers at when none is given
        self.verification: Optional[Dict[str, Any]] = None
        hub = model.startswith(('hf-hub:', 'local-dir:'))
        if not (checkpoint or hub or artifact or allow_random):
            raise UserError(f'{model}: no weights given (a checkpoint, an hf-hub: / local-dir: name or an artifact); '
                            f'random weights embed nothing')
        try:
            self.device = torch.device(device)
        except RuntimeError as e:
            raise UserError(f'device {device!r}: {first_line(e)}') from None
        if bool(artifact) != bool(runtime):
            raise UserError('an artifact needs its runtime (e.g. runtime="onnx") and a runtime an artifact')
        if artifact:
            if checkpoint:
                raise UserError('an artifact holds its weights: give a checkpoint or an artifact, not both')
            if not Path(artifact).is_file():
                raise UserError(f'{artifact}: no such file')
            if runtime not in formats.FORMATS or formats.FORMATS[runtime].runner is None:
                runnable = [n for n, f in formats.FORMATS.items() if f.runner is not None]
                raise UserError(f'runtime {runtime!r}: one of {", ".join(runnable)}')
            fmt = formats.FORMATS[runtime]
            fmt.require(flag='runtime')
            try:
                self.cfg = dict(timm.create_model(model).pretrained_cfg)
            except (RuntimeError, ValueError, KeyError, OSError) as e:
                raise UserError(f'cannot create model {model!r} for the input size: {first_line(e)}') from None
            inside = formats.normalizes_inside(runtime, artifact)
            self.raw_pixels = bool(inside) if raw_pixels is None else raw_pixels
            try:
                with formats.quiet():
                    self._run = fmt.runner(artifact)
                    self._run(np.zeros((1, *self.cfg['input_size']), np.float32))
            except UserError:
                raise
            except Exception as e:  # the runtime's own complaint (another input size, a broken file)
                raise UserError(f'{artifact}: {fmt.runtime} cannot run it ({first_line(e)})') from None
            self.model = None
            self.info = dict(artifact=str(artifact), runtime=runtime, sha256=sha256_file(artifact),
                             input_cfg_from=model)
        else:
            net = create_model_checked(model, pretrained=hub, checkpoint=checkpoint)
            # channels_last, as eval runs it: CPU depthwise convs are 2-3x faster in it (MobileFaceNet, MobileOne)
            try:
                self.model = timm.utils.reparameterize_model(net.eval()).to(self.device,
                                                                            memory_format=torch.channels_last)
            except (RuntimeError, AssertionError) as e:  # no such device here (cuda without a driver, ...)
                raise UserError(f'device {device!r}: {first_line(e)}') from None
            self.cfg = dict(self.model.pretrained_cfg)
            self.raw_pixels = bool(raw_pixels)
            self.info = dict(model=model, checkpoint=str(checkpoint) if checkpoint else None,
                             checkpoint_sha256=sha256_file(checkpoint) if checkpoint else None)
            if hub:
                self.verification = _hub_verification(model)
        if tuple(self.cfg.get('input_size', (3, 112, 112))[-2:]) != (A.CROP_SIZE, A.CROP_SIZE):
            raise UserError(f'{model}: takes {self.cfg["input_size"]} inputs; faces are aligned to '
                            f'{A.CROP_SIZE}x{A.CROP_SIZE} crops')
        self.mean = np.array(self.cfg.get('mean', (0.5, 0.5, 0.5)), np.float32).reshape(1, 3, 1, 1)
        self.std = np.array(self.cfg.get('std', (0.5, 0.5, 0.5)), np.float32).reshape(1, 3, 1, 1)
        self.info.update(flip=flip)
        path = Path(detector) if detector else A.DEFAULT_DETECTOR
        self.detector = A.Detector(path, score_threshold, 0.3, max_side, min_side)

    # ------------------------------------------------------------------------------------------------------------

    def _forward(self, x: np.ndarray) -> np.ndarray:
        if self.model is None:
            return np.asarray(self._run(np.ascontiguousarray(x, dtype=np.float32)), dtype=np.float32)
        import torch
        with torch.inference_mode():
            x = torch.from_numpy(x).to(self.device).contiguous(memory_format=torch.channels_last)
            return self.model(x).float().cpu().numpy()

    def embed_crops(self, crops: np.ndarray) -> np.ndarray:
        """(N, D) float32 unit embeddings of (N, 112, 112, 3) uint8 RGB aligned crops, in batches: the model's
        normalisation ((x / 255 - mean) / std, or 0..255 pixels for an artifact that normalises inside), the image
        and its horizontal flip summed in float64 before normalising (insightface's rule)."""
        crops = np.asarray(crops)
        if crops.ndim != 4 or crops.shape[1:] != (A.CROP_SIZE, A.CROP_SIZE, 3):
            raise ValueError(f'crops must be (N, {A.CROP_SIZE}, {A.CROP_SIZE}, 3) uint8 RGB, got {crops.shape}')
        out = []
        for start in range(0, len(crops), self.batch_size):
            x = crops[start:start + self.batch_size].transpose(0, 3, 1, 2).astype(np.float32)
            if self.channel_order == 'bgr':
                x = x[:, ::-1]
            if not self.raw_pixels:
                x = (x / 255 - self.mean) / self.std
            n = len(x)
            if self.flip:  # the image and its mirror in one forward pass, as eval batches them
                x = np.concatenate([x, x[..., ::-1]])
            raw = self._forward(np.ascontiguousarray(x, dtype=np.float32)).astype(np.float64)
            if raw.ndim != 2:
                raise UserError(f'the model returns {raw.ndim}-D outputs; faces need (B, D) embeddings')
            if self.flip:
                raw = raw[:n] + raw[n:]
            norms = np.linalg.norm(raw, axis=1, keepdims=True)
            out.append((raw / np.where(norms > 0, norms, 1)).astype(np.float32))
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def detect(self, photo: Photo, source: str = '') -> PhotoFaces:
        """One photo's faces, aligned, not yet embedded (the chosen face first)."""
        try:
            bgr = _bgr(photo)
        except (OSError, ValueError) as e:
            return PhotoFaces(source, 'error', error=first_line(e))
        rows = self.detector.detect(bgr)
        if not len(rows):
            return PhotoFaces(source, 'no_face')
        chosen = A.choose_face(rows, bgr.shape[:2], self.select)
        order = [chosen] + [i for i in np.argsort(-(rows[:, 2] * rows[:, 3] * rows[:, 14])) if i != chosen]
        faces = []
        for i in order:
            landmarks = rows[i, 4:14].reshape(5, 2).astype(np.float32)
            crop = A.align_landmarks(bgr, landmarks)
            if crop is not None:
                faces.append(Face(box=rows[i, :4].tolist(), score=float(rows[i, 14]), landmarks=landmarks, crop=crop))
        if not faces:
            return PhotoFaces(source, 'no_face')
        return PhotoFaces(source, 'several_faces' if len(faces) > 1 else 'ok', faces, found=len(faces))

    def __call__(self, photos: Union[Photo, Sequence[Photo]], all_faces: bool = True) -> List[PhotoFaces]:
        """Detect, align and embed every face of every photo (`all_faces=False`: the chosen face only). A photo that
        cannot be decoded, or holds no face, gets its status; the others are embedded in batches across photos."""
        if isinstance(photos, (str, Path, np.ndarray)) or hasattr(photos, 'getbands'):
            photos = [photos]
        results = []
        for i, photo in enumerate(photos):
            source = os.fsdecode(photo) if isinstance(photo, (str, Path)) else f'<photo {i}>'
            result = self.detect(photo, source)
            if not all_faces:
                result.faces = result.faces[:1]
            results.append(result)
        faces = [f for r in results for f in r.faces]
        if faces:
            for f, e in zip(faces, self.embed_crops(np.stack([f.crop for f in faces]))):
                f.embedding = e
        for r in results:  # a model that outputs NaN or inf for a face: that photo's error, not a cosine of NaN
            if any(not np.isfinite(f.embedding).all() for f in r.faces):
                r.status, r.error, r.faces = 'error', 'the model\'s embedding of its face is not finite', []
        return results


def _bgr(photo: Photo) -> np.ndarray:
    """(H, W, 3) uint8 BGR of a path, an RGB or gray array, or a PIL image (every mode by its range, EXIF applied for
    files); ValueError / OSError with the reason otherwise."""
    if isinstance(photo, (str, Path)):
        with open(photo, 'rb') as f:
            return A.read_photo(f.read())
    if isinstance(photo, np.ndarray):
        a = photo
        if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
            raise ValueError(f'an array photo must be (H, W) or (H, W, 3) uint8 RGB, got {a.dtype} {a.shape}')
        rgb = np.repeat(a[:, :, None], 3, axis=2) if a.ndim == 2 else a[:, :, :3]
    elif hasattr(photo, 'getbands'):  # a PIL image
        from ..verification_data import sample_bits, to_rgb8
        if photo.size[0] * photo.size[1] > A.MAX_PIXELS:
            raise ValueError(f'{photo.size[0]}x{photo.size[1]} pixels is more than this reads ({A.MAX_PIXELS:,})')
        rgb = to_rgb8(photo, sample_bits(photo))
    else:
        raise ValueError(f'a photo is a path, an array or a PIL image, not {type(photo).__name__}')
    if min(rgb.shape[:2]) < 8:
        raise ValueError(f'is {rgb.shape[1]}x{rgb.shape[0]} pixels, too small to hold a face')
    return np.ascontiguousarray(rgb[:, :, ::-1])


def _hub_verification(model: str) -> Optional[Dict[str, Any]]:
    """config.json's `face_verification` of an `hf-hub:` / `local-dir:` model (its threshold a number), else None."""
    import json
    try:
        if model.startswith('local-dir:'):
            path = Path(model[len('local-dir:'):]) / 'config.json'
        else:
            from huggingface_hub import hf_hub_download
            repo, _, revision = model[len('hf-hub:'):].partition('@')
            path = Path(hf_hub_download(repo, 'config.json', revision=revision or None))  # cached by timm's load
        found = json.loads(path.read_text()).get('face_verification')
    except Exception:  # no config, offline, not JSON: the threshold is simply unknown
        return None
    if isinstance(found, dict) and isinstance(found.get('threshold'), (int, float)) and -1 <= found['threshold'] <= 1:
        return found
    return None
