"""Detect and align faces: `python -m eval.align SRC DST` turns a folder of photos into 112x112 crops aligned to
insightface's ArcFace template, in the same folder layout.

Every photo under SRC (recursively; .jpg .jpeg .png .bmp .webp) gets a crop at the same relative path under DST,
made as insightface's `norm_crop` makes it: YuNet's 5 landmarks of the chosen face (OpenCV's `cv2.FaceDetectorYN`;
the detector shipped in `timm_mobileone/faces/detectors/` unless --detector names another), a least-squares similarity transform
onto the template, `warpAffine`. A photo without a face gets its centre square (unless `--fallback none`). A
`pairs.txt` at SRC's top is copied, so an LFW-style folder of photos becomes one `python -m eval.lfw --data DST`
reads.

The run resumes where it stopped (each crop lands whole, then is recorded in DST/align_records.jsonl with its photo's
size and time: a replaced photo is aligned again) and runs over --align-workers processes. Nothing of SRC is ever
written: DST may not be SRC or contain it, and an existing DST must be an earlier run's (align_settings.json).
DST/align_report.json lists how each photo was served (detector, fallback) and the photos with problems (not an image,
truncated, several faces); stdout carries that report's summary as one JSON object.
"""
import argparse
import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional

from timm_mobileone.cli import cli
from timm_mobileone.errors import UserError
from timm_mobileone.files import atomic_write, sha256_file
from timm_mobileone.verification_data import list_images as list_photos

from timm_mobileone.faces import align as A


def add_align_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The detection and alignment flags `eval.align`, `eval.cfp` and the raw-folder evals share."""
    group = parser.add_argument_group('detection and alignment (raw photos)')
    group.add_argument('--detector', default=str(A.DEFAULT_DETECTOR),
                       help='YuNet ONNX file run by cv2.FaceDetectorYN (default: the one shipped in the package, '
                            'Apache-2.0)')
    group.add_argument('--score-threshold', type=float, default=0.5, help='lowest detector score kept')
    group.add_argument('--select', default='area_score', choices=A.SELECT,
                       help='which face of a photo with several: largest box x score, largest box, highest score, '
                            'or nearest the centre')
    group.add_argument('--min-side', type=int, default=320,
                       help='upscale photos whose longer side is below this before detecting (0: never)')
    group.add_argument('--max-side', type=int, default=640,
                       help='downscale photos whose longer side is above this before detecting (0: never)')
    group.add_argument('--fallback', default='center', choices=('center', 'none'),
                       help='a photo without a detected face: its centre square resized, or no crop (reported)')
    group.add_argument('--jpeg-quality', type=int, default=95, help='quality of the .jpg crops written')
    group.add_argument('--align-workers', type=int, default=os.cpu_count() or 1,
                       help='processes detecting and aligning')
    return parser


def align_settings(args) -> A.AlignSettings:
    """The settings the flags ask for; UserError for impossible values."""
    if not 0 < args.score_threshold < 1:
        raise UserError(f'--score-threshold {args.score_threshold}: must be in (0, 1)')
    if args.min_side < 0 or args.max_side < 0 or (args.max_side and args.min_side > args.max_side):
        raise UserError(f'--min-side {args.min_side} / --max-side {args.max_side}: need 0 <= min <= max (0: off)')
    if not 1 <= args.jpeg_quality <= 100:
        raise UserError(f'--jpeg-quality {args.jpeg_quality}: must be in 1..100')
    if args.align_workers < 1:
        raise UserError('--align-workers must be >= 1')
    detector = Path(args.detector)
    if not detector.is_file():
        raise UserError(f'--detector {detector}: no such file')
    return A.AlignSettings(
        detector_sha256=sha256_file(detector), score_threshold=args.score_threshold, select=args.select,
        min_side=args.min_side, max_side=args.max_side,
        fallback='landmarks,center' if args.fallback == 'center' else 'landmarks', jpeg_quality=args.jpeg_quality)


def parse_args(argv: Optional[List[str]] = None):
    parser = argparse.ArgumentParser(prog='python -m eval.align', description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('src', help='folder of photos (searched recursively)')
    parser.add_argument('dst', help='folder for the crops (same layout); an earlier run there is resumed')
    add_align_flags(parser)
    parser.add_argument('--overwrite', action='store_true',
                        help='align every photo again, even into a DST made with other settings')
    parser.add_argument('--no-progress', dest='progress', action='store_false', help='no progress bar')
    return parser.parse_args(argv)


@cli
def main(argv: Optional[List[str]] = None) -> Dict:
    args = parse_args(argv)
    src, dst = Path(args.src), Path(args.dst)
    if not src.is_dir():
        raise UserError(f'{src}: no such folder')
    settings = align_settings(args)
    A.check_destination(src, dst, [])  # the folders themselves, before listing (align_folder checks every crop)
    inside = dst.resolve().is_relative_to(src.resolve())
    names = list_photos(src, skip=dst.resolve() if inside else None)
    if not names:
        raise UserError(f'{src}: no photos ({", ".join(A.IMAGE_EXTS)}) in it or its subfolders')
    report = A.align_folder(src, dst, names, settings, Path(args.detector), workers=args.align_workers,
                            progress=args.progress, overwrite=args.overwrite)
    if (src / 'pairs.txt').is_file():
        data = (src / 'pairs.txt').read_bytes()
        try:
            atomic_write(dst / 'pairs.txt', lambda f: f.write(data))
        except OSError as e:
            raise UserError(f'{dst / "pairs.txt"}: cannot be written ({e.strerror or e})') from None
    summary = {k: v for k, v in report.items() if k not in ('errors', 'fallbacks')}
    summary.update(src=str(src), dst=str(dst), report=str(dst / A.REPORT_FILE), errors=len(report['errors']),
                   fallbacks=len(report['fallbacks']),
                   first_errors=report['errors'][:5])
    print(json.dumps(summary))
    for e in report['errors'][:5]:
        print(f"warning: {e['image']}: {e['error']}", file=sys.stderr)
    return summary


if __name__ == '__main__':
    main()
