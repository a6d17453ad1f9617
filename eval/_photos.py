"""Verification pairs over raw photos: CFP's own layout and LFW-style folders, aligned once into a cache.

- CFP (Sengupta et al., WACV 2016) as published: `Data/Images/<id>/{frontal,profile}/NN.jpg`, `Protocol/
  Pair_list_{F,P}.txt` (image number -> path relative to `Protocol/`) and `Protocol/Split/{FF,FP}/NN/{same,diff}.txt`
  (pairs of image numbers, `a,b`). Every split folder present is a fold (10 in the full dataset), in its own
  order: its same pairs, then its different ones, so the contiguous folds of insightface's protocol are the
  dataset's folds, not re-cut.
- An LFW-style folder (`pairs.txt` + `<Name>/<Name>_NNNN.jpg`) of photos that are not aligned crops yet.

The photos are aligned (`timm_mobileone.faces.align`) into a cache keyed by the source folder and the alignment settings, each crop by
its photo's size and modification time; a second run reads the crops (and aligns a replaced photo again). A photo that
cannot be aligned (not an image, truncated, no face with `--fallback none`) stops the evaluation with one line naming
it: a protocol's figure over fewer pairs would not be the protocol's.
"""
import hashlib
import logging
import os
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from timm_mobileone.errors import UserError
from timm_mobileone.verification_data import PackError, VerificationSet, load_pairs_folder

from timm_mobileone.faces import align as A

_logger = logging.getLogger('eval')

CFP_PROTOCOLS = ('FP', 'FF')


def is_cfp_root(path: Path) -> bool:
    return path.is_dir() and (path / 'Protocol' / 'Split').is_dir()


def _protocol_lines(path: Path):
    """(line number, line) of one of CFP's protocol files, numbered as an editor numbers them (at \\n only)."""
    try:
        text = path.read_bytes().decode('utf-8-sig', errors='replace')
    except OSError as e:
        raise PackError(f'{path}: cannot be read ({e.strerror or e})') from None
    for line_no, line in enumerate(text.split('\n'), start=1):
        yield line_no, line


def _image_number(field: str, where: str):
    """An image number of CFP's protocol (ASCII digits), else None: str.isdigit() also takes '²', which int() then
    refuses, and '١', which int() reads as 1. PackError for a number of more than 18 digits (int() refuses 4,300,
    leading zeros included)."""
    if not (field.isascii() and field.isdigit()):
        return None
    digits = field.lstrip('0') or '0'
    if len(digits) > 18:
        raise PackError(f'{where}: image number {digits[:12]}... ({len(digits)} digits) is out of range')
    return int(digits)


def _read_pair_list(root: Path, view: str) -> Dict[int, str]:
    """CFP's `Pair_list_{F,P}.txt`: image number -> path relative to the root (POSIX)."""
    path = root / 'Protocol' / f'Pair_list_{view}.txt'
    if not path.is_file():
        raise PackError(f'{path}: no such file (a CFP root holds Protocol/Pair_list_F.txt and Pair_list_P.txt)')
    out: Dict[int, str] = {}
    first_line: Dict[int, int] = {}
    top = root.resolve()
    for line_no, line in _protocol_lines(path):
        fields = line.split()
        if not fields:
            continue
        number = _image_number(fields[0], f'{path}:{line_no}') if len(fields) == 2 else None
        if number is None:
            raise PackError(f'{path}:{line_no}: expected "NUMBER PATH" (NUMBER in digits 0-9), got '
                            f'{line.strip()[:80]!r}')
        if any(ord(c) < 32 or 0x7f <= ord(c) <= 0x9f for c in fields[1]):  # C0, DEL, C1: no photo is named so
            raise PackError(f'{path}:{line_no}: the path {fields[1][:80]!r} holds a control character')
        if number in first_line:
            raise PackError(f'{path}:{line_no}: image {number} is listed again (first on line {first_line[number]})')
        try:
            image = (root / 'Protocol' / fields[1]).resolve()
        except (OSError, RuntimeError, ValueError) as e:  # a symlink loop (RuntimeError before Python 3.13)
            raise PackError(f'{path}:{line_no}: {fields[1][:80]!r} cannot be resolved ({e})') from None
        if not image.is_relative_to(top):
            raise PackError(f'{path}:{line_no}: {fields[1][:80]!r} lies outside the CFP root {root}')
        out[number] = image.relative_to(top).as_posix()
        first_line[number] = line_no
    if not out:
        raise PackError(f'{path}: no images listed')
    return out


def read_cfp(root: Path, protocol: str) -> Tuple[List[str], np.ndarray, int]:
    """(2N image paths relative to the root, interleaved by pair; N issame labels; fold count) of one protocol.

    Every problem of the protocol text (a malformed line, an image number that is not ASCII digits, a path with a
    control character, no pairs at all, a single fold) is a one-line PackError here, before any photo is aligned."""
    if protocol not in CFP_PROTOCOLS:
        raise UserError(f'--protocol {protocol}: CFP has {" and ".join(CFP_PROTOCOLS)}')
    frontal = _read_pair_list(root, 'F')
    second = frontal if protocol == 'FF' else _read_pair_list(root, 'P')
    split = root / 'Protocol' / 'Split' / protocol
    folds = sorted((d for d in split.iterdir() if d.is_dir()), key=lambda d: (len(d.name), d.name)) \
        if split.is_dir() else []
    if not folds:
        raise PackError(f'{split}: no fold folders (Split/{protocol}/01, 02, ...)')
    # each fold's threshold comes from the others: one fold is no protocol (the metric's "num_folds must be >= 2",
    # after aligning every photo). Refused even where --num-folds would re-cut it: a root's protocol is its own folds,
    # as the equal-size check below holds
    if len(folds) < 2:
        raise PackError(f'{split}: one fold folder ({folds[0].name!r}); cross-validation needs at least 2 (CFP has '
                        f'10: Split/{protocol}/01 ... 10)')
    images: List[str] = []
    issame: List[bool] = []
    sizes = []
    for fold in folds:
        before = len(issame)
        for kind, same in (('same', True), ('diff', False)):
            path = fold / f'{kind}.txt'
            if not path.is_file():
                raise PackError(f'{path}: no such file (each fold holds same.txt and diff.txt)')
            for line_no, line in _protocol_lines(path):
                if not line.strip():
                    continue
                fields = line.replace(',', ' ').split()
                where = f'{path}:{line_no}'
                numbers = [_image_number(f, where) for f in fields] if len(fields) == 2 else [None]
                if None in numbers:
                    raise PackError(f'{path}:{line_no}: expected "A,B" (two image numbers, digits 0-9), got '
                                    f'{line.strip()[:80]!r}')
                a, b = numbers
                if a not in frontal or b not in second:
                    missing = a if a not in frontal else b
                    raise PackError(f'{path}:{line_no}: image {missing} is not in Pair_list_'
                                    f'{"F" if a not in frontal or protocol == "FF" else "P"}.txt')
                images += [frontal[a], second[b]]
                issame.append(same)
        sizes.append(len(issame) - before)
    if not issame:
        raise PackError(f'{split}: no pairs (every same.txt and diff.txt of its {len(folds)} folds is empty)')
    if len(set(sizes)) != 1:
        raise PackError(f'{split}: folds of {", ".join(map(str, sizes))} pairs; insightface\'s protocol scores '
                        f'contiguous folds of one size')
    return images, np.array(issame, dtype=bool), len(folds)


def cache_folder(src: Path, settings: A.AlignSettings, cache: str = '') -> Path:
    """Where the crops of `src`'s photos live: under `cache` (--align-cache) or the user's cache folder, keyed by
    the source folder's path and the settings."""
    src = src.resolve()
    base = Path(cache) if cache else Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache') / \
        'timm-mobileone' / 'aligned'
    tag = hashlib.sha256(str(src).encode()).hexdigest()[:8]
    return base / f'{src.name}-{tag}' / settings.key()


def aligned(src: Path, names: Sequence[str], settings: A.AlignSettings, args, desc: str) -> Path:
    """Align `names` (relative to `src`) into the cache; the cache folder. UserError for missing photos and for
    photos that could not be aligned."""
    missing = [n for n in dict.fromkeys(names) if not (src / n).is_file()]
    if missing:
        raise PackError(f'{src / missing[0]}: no such photo ({len(missing)} photos the pairs name are missing)')
    dst = cache_folder(src, settings, getattr(args, 'align_cache', ''))
    unique = list(dict.fromkeys(names))
    report = A.align_folder(src, dst, unique, settings, Path(args.detector), workers=args.align_workers,
                            progress=args.progress, desc=desc)
    _logger.info(f'{desc}: {len(unique)} photos aligned in {dst} ({report["served"]})')
    wanted = set(unique)
    errors = [e for e in report['errors'] if e['image'] in wanted]
    if errors:
        raise UserError(f'{len(errors)} of {len(unique)} photos could not be aligned (report: '
                        f'{dst / A.REPORT_FILE}); first: {src / errors[0]["image"]}: {errors[0]["error"]}')
    return dst


def load_cfp(root: Path, protocol: str, settings: A.AlignSettings, args) -> VerificationSet:
    images, issame, folds = read_cfp(root, protocol)
    dst = aligned(root, images, settings, args, desc=f'align CFP ({protocol})')
    return VerificationSet(name=f'cfp_{protocol.lower()}', source=str(root), issame=issame,
                           images=[str(dst / n) for n in images], folds=folds, folds_from=f'Split/{protocol}')


def load_photo_folder(path: Path, settings: A.AlignSettings, args) -> VerificationSet:
    """An LFW-style folder (or its pairs.txt) of photos, aligned into the cache first."""
    ds = load_pairs_folder(path)
    src = Path(ds.source).parent.resolve()
    names = [Path(p).resolve().relative_to(src).as_posix() for p in ds.images]
    dst = aligned(src, names, settings, args, desc=f'align {ds.name}')
    return VerificationSet(name=ds.name, source=ds.source, issame=ds.issame, images=[str(dst / n) for n in names],
                           folds=ds.folds)
