"""A generated IJB-style folder (synthetic identities), laid out as insightface distributes IJB-B/C.

`python -m eval.ijb_synthetic OUT --images 20000` writes OUT/IJBC/meta/ijbc_{face_tid_mid,name_5pts_score,
template_pair_label}.txt and OUT/IJBC/loose_crop/*.jpg: each identity a smooth random pattern, each image that
pattern with noise and a brightness shift, placed in a larger loose crop by a random similarity transform (scale,
rotation, shift) whose image of the ArcFace template is the image's five landmarks. Templates hold several media,
media one or several images (as video frames do), template ids have gaps, one media id can appear in several
templates. Pairs: every genuine template pair, plus `--impostor-ratio` times as many impostor pairs.

For the tests and benchmarks/eval_ijb.py; it checks eval.ijb's plumbing and speed, not a model's quality.
"""
import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from timm_mobileone.cli import cli

from timm_mobileone.faces.align import ARCFACE_TEMPLATE, CROP_SIZE


def _pattern(rng: np.random.Generator) -> np.ndarray:
    import cv2
    base = rng.integers(0, 256, size=(CROP_SIZE // 16 + 1, CROP_SIZE // 16 + 1, 3)).astype(np.uint8)
    return cv2.resize(base, (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_LINEAR).astype(np.float32)


def write_synthetic_ijb(out: Path, target: str = 'IJBC', identities: int = 12, templates_per_identity: int = 3,
                        max_media: int = 3, max_images_per_media: int = 3, impostor_ratio: float = 2.0,
                        loose_size: int = 160, seed: int = 0, quality: int = 90) -> Dict:
    """Write the folder; returns counts (images, templates, pairs) and the target folder."""
    import cv2
    rng = np.random.default_rng(seed)
    root = Path(out) / target
    (root / 'meta').mkdir(parents=True, exist_ok=True)
    (root / 'loose_crop').mkdir(parents=True, exist_ok=True)
    prefix = target.lower()
    tid_lines: List[str] = []
    lmk_lines: List[str] = []
    template_identity: Dict[int, int] = {}
    image_no = 0
    media_no = 100
    template_no = 1
    encode = [int(cv2.IMWRITE_JPEG_QUALITY), quality]
    for identity in range(identities):
        pattern = _pattern(rng)
        shared_media = None
        for _ in range(templates_per_identity):
            template_no += int(rng.integers(1, 4))  # ids with gaps
            template_identity[template_no] = identity
            for m in range(int(rng.integers(1, max_media + 1))):
                if m == 0 and shared_media is not None and rng.random() < 0.5:
                    media = shared_media  # one media in two templates, as in IJB
                else:
                    media_no += int(rng.integers(1, 3))
                    media = media_no
                shared_media = media
                for _ in range(int(rng.integers(1, max_images_per_media + 1))):
                    image_no += 1
                    name = f'{image_no}.jpg'
                    face = np.clip(pattern + rng.normal(0, 10, pattern.shape) + rng.uniform(-20, 20), 0, 255)
                    scale = rng.uniform(0.9, 1.3)
                    angle = rng.uniform(-0.35, 0.35)
                    c, s = scale * np.cos(angle), scale * np.sin(angle)
                    shift = (loose_size - CROP_SIZE * scale) / 2 + rng.uniform(-8, 8, size=2)
                    forward = np.array([[c, -s, shift[0]], [s, c, shift[1]]])  # aligned crop -> loose crop
                    loose = cv2.warpAffine(face.astype(np.uint8)[:, :, ::-1], forward, (loose_size, loose_size),
                                           borderMode=cv2.BORDER_REFLECT)
                    ok, data = cv2.imencode('.jpg', loose, encode)
                    if not ok:
                        raise RuntimeError('OpenCV could not encode a JPEG')
                    (root / 'loose_crop' / name).write_bytes(data.tobytes())
                    points = ARCFACE_TEMPLATE.astype(np.float64) @ forward[:, :2].T + forward[:, 2]
                    points += rng.normal(0, 0.5, points.shape)
                    tid_lines.append(f'{name} {template_no} {media}')
                    lmk_lines.append(' '.join([name, *(f'{v:.3f}' for v in points.ravel()),
                                               f'{rng.uniform(0.3, 1.0):.6f}']))
    templates = np.array(sorted(template_identity))
    ids = np.array([template_identity[t] for t in templates])
    pairs = [(int(a), int(b), 1) for i, a in enumerate(templates) for b in templates[i + 1:]
             if template_identity[a] == template_identity[b]]
    want = int(round(len(pairs) * impostor_ratio))
    impostors = set()
    while len(impostors) < want:
        i, j = rng.integers(0, len(templates), size=2)
        if ids[i] != ids[j]:
            impostors.add((int(templates[min(i, j)]), int(templates[max(i, j)]), 0))
    pairs += sorted(impostors)
    order = rng.permutation(len(pairs))
    (root / 'meta' / f'{prefix}_face_tid_mid.txt').write_text('\n'.join(tid_lines) + '\n')
    (root / 'meta' / f'{prefix}_name_5pts_score.txt').write_text('\n'.join(lmk_lines) + '\n')
    (root / 'meta' / f'{prefix}_template_pair_label.txt').write_text(
        '\n'.join(' '.join(map(str, pairs[k])) for k in order) + '\n')
    return dict(root=str(root), images=image_no, templates=len(templates), pairs=len(pairs),
                genuine=len(pairs) - want)


@cli
def main(argv: Optional[List[str]] = None) -> Dict:
    parser = argparse.ArgumentParser(prog='python -m eval.ijb_synthetic', description=__doc__.splitlines()[0])
    parser.add_argument('out', help='output folder (OUT/TARGET is written)')
    parser.add_argument('--target', default='IJBC', type=str.upper, choices=('IJBC', 'IJBB'))
    parser.add_argument('--images', type=int, default=2000, help='about this many images')
    parser.add_argument('--templates-per-identity', type=int, default=4)
    parser.add_argument('--impostor-ratio', type=float, default=20.0, help='impostor pairs per genuine pair')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    if args.images < 10:
        parser.error('--images must be >= 10')
    # about 2 x 2 images per template: identities follow from the image count
    identities = max(2, round(args.images / (4 * args.templates_per_identity)))
    result = write_synthetic_ijb(Path(args.out), args.target, identities, args.templates_per_identity,
                                 impostor_ratio=args.impostor_ratio, seed=args.seed)
    print(json.dumps(result))
    return result


if __name__ == '__main__':
    main()
