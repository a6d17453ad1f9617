"""A page to try it: two photos in, the faces found, their aligned crops, the cosine and the answer (Gradio).

    python -m timm_mobileone.faces demo --model M --checkpoint W --threshold 0.3      # needs the [demo] extra

or, as a Hugging Face Space's `app.py`:

    from timm_mobileone.faces import FaceEmbedder
    from timm_mobileone.faces.demo import build_demo
    build_demo(FaceEmbedder('hf-hub:<repo>'), threshold=0.3).launch()

`compare_photos` is the page's work without the page (what the button runs): the same steps as `python -m
timm_mobileone.faces compare` (each photo decoded, its faces detected and aligned, the chosen face of each embedded
in one batch, the cosine in float64), so the page shows the cosine that command prints for the same photos. This is
the only module of the package that imports gradio.
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Tuple

import gradio as gr
import numpy as np

from ..errors import first_line
from . import align as A
from .embedder import FaceEmbedder, PhotoFaces

__all__ = ['build_demo', 'compare_photos', 'Comparison', 'SAME', 'DIFFERENT', 'NO_THRESHOLD']

SAME, DIFFERENT, NO_THRESHOLD = 'same person', 'different people', 'no threshold given: cosine only'
DISPLAY_SIDE = 1024  # the annotated photos are shown at most this many pixels on their longer side
CHOSEN, OTHER = (0, 200, 0), (255, 170, 0)  # RGB: the face compared, the other faces found
SELECT_RULE = dict(area_score='largest box x detector score', largest='largest box', score='highest detector score',
                   central='nearest the centre')


@dataclass
class Comparison:
    """What the page shows for two photos: each photo's faces drawn (the chosen one highlighted), the chosen faces'
    crops, one message per photo, the cosine (None without two faces) and the answer line."""
    photos: List[Optional[np.ndarray]] = field(default_factory=lambda: [None, None])  # RGB uint8, scaled for display
    crops: List[Optional[np.ndarray]] = field(default_factory=lambda: [None, None])  # (112, 112, 3) RGB uint8
    messages: List[str] = field(default_factory=lambda: ['', ''])
    results: List[Optional[PhotoFaces]] = field(default_factory=lambda: [None, None])
    cosine: Optional[float] = None  # rounded to 6 decimals, as compare prints it
    same: Optional[bool] = None
    answer: str = ''


def _draw(bgr: np.ndarray, result: PhotoFaces) -> np.ndarray:
    """The photo as RGB, at most DISPLAY_SIDE pixels on its longer side, every face's box drawn and the chosen one
    (the first) highlighted with its 5 landmarks."""
    import cv2
    h, w = bgr.shape[:2]
    scale = min(1.0, DISPLAY_SIDE / max(h, w))
    rgb = np.ascontiguousarray(bgr[:, :, ::-1])
    if scale < 1:
        rgb = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    thick = max(2, round(max(rgb.shape[:2]) / 200))
    for i, face in reversed(list(enumerate(result.faces))):  # the chosen face drawn last, on top
        x, y, bw, bh = (np.asarray(face.box, np.float64) * scale).tolist()
        colour = CHOSEN if i == 0 else OTHER
        cv2.rectangle(rgb, (round(x), round(y)), (round(x + bw), round(y + bh)), colour,
                      thick if i == 0 else max(1, thick // 2), cv2.LINE_AA)
        if i == 0:
            for px, py in (face.landmarks.astype(np.float64) * scale).tolist():
                cv2.circle(rgb, (round(px), round(py)), thick + 1, colour, -1, cv2.LINE_AA)
    return rgb


def _message(name: str, result: PhotoFaces, select: str) -> str:
    if result.status == 'error':
        return f'**Photo {name}** cannot be used: {result.error}. Upload a JPEG, PNG or WebP photo.'
    if result.status == 'no_face':
        return f'**Photo {name}**: no face found. Try a photo where the face is larger, frontal and well lit.'
    face = result.faces[0]
    if result.status == 'several_faces':
        return (f'**Photo {name}**: {len(result.faces)} faces found; the one compared ({SELECT_RULE[select]}) is '
                f'highlighted in green (detector score {face.score:.2f}).')
    return f'**Photo {name}**: one face found (detector score {face.score:.2f}).'


def compare_photos(embedder: FaceEmbedder, threshold: Optional[float], a: Optional[str], b: Optional[str]) \
        -> Comparison:
    """Compare the photos at paths `a` and `b` (None: not uploaded yet) as the page does."""
    out = Comparison()
    chosen = []
    for i, (name, path) in enumerate(zip('AB', (a, b))):
        if not path:
            out.messages[i] = f'**Photo {name}**: no photo yet: upload one.'
            continue
        try:
            bgr = A.read_photo(Path(path).read_bytes())
        except (OSError, ValueError) as e:
            result = PhotoFaces(str(path), 'error', error=first_line(e))
        else:
            # the decoded photo as an RGB array: the embedder converts it back to these BGR pixels, so detection
            # sees what it sees from the path (one decode instead of two)
            result = embedder.detect(bgr[:, :, ::-1], str(path))
            out.photos[i] = _draw(bgr, result)
        out.results[i] = result
        out.messages[i] = _message(name, result, embedder.select)
        if result.face is not None:
            out.crops[i] = result.face.crop
            chosen.append(result.face)
    if len(chosen) == 2:  # both chosen faces in one batch, as compare embeds them
        for face, e in zip(chosen, embedder.embed_crops(np.stack([f.crop for f in chosen]))):
            face.embedding = e
        cosine = float(np.dot(chosen[0].embedding.astype(np.float64), chosen[1].embedding.astype(np.float64)))
        out.cosine = round(cosine, 6)
        if threshold is None:
            out.answer = f'**{NO_THRESHOLD}** (cosine {out.cosine:.4f})'
        else:
            out.same = bool(cosine >= threshold)
            out.answer = (f'**{SAME if out.same else DIFFERENT}**: cosine {out.cosine:.4f} '
                          f'{">=" if out.same else "<"} threshold {threshold:.4f}')
    else:
        missing = [name for name, r in zip('AB', out.results) if r is None or r.face is None]
        out.answer = f'**no answer**: photo {" and ".join(missing)} {"has" if len(missing) == 1 else "have"} ' \
                     f'no face to compare (see the message above)'
    return out


def build_demo(embedder: FaceEmbedder, threshold: Optional[float] = None, *, threshold_from: str = '',
               title: str = 'Same person? Compare two faces') -> gr.Blocks:
    """The page: two photo uploads and a Compare button; each photo shown with its detected faces (the compared one
    highlighted), the two aligned crops, the cosine and the answer at `threshold` (a cosine; None: the cosine alone).
    `threshold_from` says where the threshold came from (shown on the page). Launch it with `.launch()`."""
    if threshold is not None and not -1 <= threshold <= 1:
        raise ValueError(f'threshold {threshold}: a cosine, in [-1, 1]')
    info = embedder.info
    what = (f'`{info["artifact"]}` ({info["runtime"]})' if info.get('artifact') else
            f'`{info["model"]}`' + (f' with `{Path(info["checkpoint"]).name}`' if info.get('checkpoint') else ''))
    rule = (f'**same person** when the cosine of the two faces\' embeddings is at least **{threshold:.4f}**'
            + (f' (from {threshold_from})' if threshold_from else '') if threshold is not None else
            'no threshold given: the page shows the cosine only (1: identical, around 0: unrelated)')

    def run(a: Optional[str], b: Optional[str]) -> Tuple[Any, ...]:
        c = compare_photos(embedder, threshold, a, b)
        return (*c.photos, *c.crops, *c.messages, c.cosine, c.answer)

    # delete_cache: the uploaded photos and the pictures shown are deleted after 10 to 20 minutes, and at shutdown
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(600, 600)) as page:
        gr.Markdown(f'# {title}\n\nFaces are found by YuNet, aligned to the ArcFace template (112x112) and embedded '
                    f'by {what}. Answer: {rule}. The server deletes the photos within 20 minutes.')
        uploads, photos, crops, messages = [], [], [], []
        with gr.Row():
            for name in 'ab':
                with gr.Column():
                    uploads.append(gr.File(label=f'photo {name.upper()}', file_types=['image'], type='filepath',
                                           elem_id=f'upload-{name}'))
                    messages.append(gr.Markdown(elem_id=f'message-{name}'))
                    photos.append(gr.Image(label=f'photo {name.upper()}: faces found (green: the one compared)',
                                           type='numpy', interactive=False, height=320, elem_id=f'faces-{name}'))
                    crops.append(gr.Image(label=f'photo {name.upper()}: aligned crop', type='numpy',
                                          interactive=False, height=160, elem_id=f'crop-{name}'))
        button = gr.Button('Compare', variant='primary', elem_id='compare')
        with gr.Row():
            cosine = gr.Number(label='cosine', interactive=False, elem_id='cosine')
            answer = gr.Markdown(elem_id='answer')
        button.click(run, inputs=uploads, outputs=[*photos, *crops, *messages, cosine, answer],
                     api_name='compare')
    return page

