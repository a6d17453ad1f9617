"""Person-disjoint train / validation split of an aligned LFW-style folder, `python -m train.split`.

    python -m train.split --data ../shared/data/lfw_dev --val-folds 5 --output runs/lfw_dev-fold5

The validation side is the pairs of the chosen folds of the folder's `pairs.txt` (LFW's folds are person-disjoint);
the training side is every image of every person who appears in none of those pairs (labels: one identity per
person). No person is on both sides: the split is checked, and `split.json` records the counts.

Writes `OUTPUT/train/<person>/<image>` and `OUTPUT/val/<person>/<image>` as symbolic links to the source images
(`--copy` copies them instead) and `OUTPUT/val/pairs.txt`. LFW lists each fold's same-person pairs before its
different-person ones, so the validation pairs are rewritten as `--val-subfolds` balanced folds (header `K n`,
each fold n same then n different pairs, in the source order): insightface's cross-validation over them then
never holds out a single-class fold, where a model without signal would score far below chance. One JSON object
on stdout; user mistakes: one `error:` line, exit code 2, nothing written.
"""
import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from timm_mobileone.cli import cli
from timm_mobileone.errors import UserError
from timm_mobileone.files import atomic_write
from timm_mobileone.verification_data import IMAGE_EXTS, PackError, read_pairs_txt


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog='python -m train.split', description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--data', required=True, help='aligned folder with an LFW-style pairs.txt (header "folds n")')
    p.add_argument('--val-folds', type=int, nargs='+', default=[5], help='pairs.txt folds (1-based) to validate on')
    p.add_argument('--val-subfolds', type=int, default=10, help='balanced cross-validation folds of the val pairs')
    p.add_argument('--output', required=True, help='new folder for train/ and val/')
    p.add_argument('--copy', action='store_true', help='copy the images instead of linking them')
    return p.parse_args(argv)


def read_pairs(pairs_file: Path) -> Tuple[int, int, List[List[str]]]:
    """(folds, pairs per class per fold, pair lines as field lists) of an LFW pairs.txt with its header
    (`read_pairs_txt` parses; a split needs the header's folds and LFW's fold sizes)."""
    try:
        parsed = read_pairs_txt(pairs_file)
    except PackError as e:
        raise UserError(f'--data {e}') from None
    if parsed.folds is None or parsed.per_fold is None:
        raise UserError(f'--data {pairs_file}: no "folds pairs-per-fold" header line; the folds are needed')
    folds, n, pairs = parsed.folds, parsed.per_fold, parsed.pairs
    if folds < 1 or n < 1 or len(pairs) != 2 * folds * n:
        raise UserError(f'--data {pairs_file}: the header says {folds} folds x 2 x {n} pairs, the file has '
                        f'{len(pairs)}')
    return folds, n, pairs


def _place(src: Path, dst: Path, copy: bool) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if copy:
        shutil.copyfile(src, dst)
    else:
        os.symlink(src.resolve(), dst)


def split(args) -> Dict:
    root = Path(args.data)
    pairs_file = root / 'pairs.txt'
    if not pairs_file.is_file():
        raise UserError(f'--data {root}: no pairs.txt (an LFW-style aligned folder)')
    folds, n, pairs = read_pairs(pairs_file)
    wanted = sorted(set(args.val_folds))
    if not all(1 <= f <= folds for f in wanted):
        raise UserError(f'--val-folds {" ".join(map(str, args.val_folds))}: pairs.txt has folds 1..{folds}')
    if len(wanted) == folds:
        raise UserError('--val-folds: every fold validates; no person is left to train on')
    blocks = [pairs[(f - 1) * 2 * n:f * 2 * n] for f in wanted]
    same = [p for b in blocks for p in b[:n]]
    diff = [p for b in blocks for p in b[n:]]
    if any(len(p) != 3 for p in same) or any(len(p) != 4 for p in diff):
        raise UserError(f'--data {pairs_file}: a fold does not list its {n} same-person pairs before its {n} '
                        f'different-person ones (LFW\'s layout)')
    k = args.val_subfolds
    if k < 2 or len(same) % k:
        raise UserError(f'--val-subfolds {k}: must be >= 2 and divide the {len(same)} same-person pairs')
    per = len(same) // k
    val_people = {f[0] for f in same + diff} | {f[2] for f in diff}
    people = sorted(d.name for d in root.iterdir() if d.is_dir())
    train_people = [p for p in people if p not in val_people]
    missing = sorted(val_people - set(people))
    if missing:
        raise UserError(f'--data {root}: pairs.txt names {missing[0]}, who has no folder')
    out = Path(args.output)
    if out.exists() and any(out.iterdir()):
        raise UserError(f'--output {out}: exists and is not empty (choose a new folder)')
    images = {p: sorted(f for f in (root / p).iterdir() if f.suffix.lower() in IMAGE_EXTS)
              for p in people}
    train_people = [p for p in train_people if images[p]]
    if not train_people:
        raise UserError(f'--data {root}: no training images outside the validation folds')
    assert not set(train_people) & val_people  # person-disjoint by construction; checked all the same
    for p in train_people:
        for f in images[p]:
            _place(f, out / 'train' / p / f.name, args.copy)
    for p in sorted(val_people):
        for f in images[p]:
            _place(f, out / 'val' / p / f.name, args.copy)
    lines = [f'{k} {per}']
    for i in range(k):
        lines += [' '.join(p) for p in same[i * per:(i + 1) * per]]
        lines += [' '.join(p) for p in diff[i * per:(i + 1) * per]]
    atomic_write(out / 'val' / 'pairs.txt', lambda f: f.write(('\n'.join(lines) + '\n').encode()))
    result = dict(data=str(root), output=str(out), val_folds=wanted, val_subfolds=k, val_pairs=len(same) + len(diff),
                  val_people=len(val_people), val_images=sum(len(images[p]) for p in val_people),
                  train_people=len(train_people), train_images=sum(len(images[p]) for p in train_people),
                  linked=not args.copy)
    atomic_write(out / 'split.json', lambda f: f.write((json.dumps(result, indent=1) + '\n').encode()))
    return result


@cli  # the repo CLIs' wrapper: a user mistake is one `error:` line and exit code 2
def main(argv: Optional[List[str]] = None) -> Dict:
    """Split, print and return the JSON summary."""
    result = split(parse_args(argv))
    print(json.dumps(result))
    return result


if __name__ == '__main__':
    main()
