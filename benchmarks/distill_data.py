"""The faces of the distillation benchmark (`benchmarks/gpu_distill.sh`), laid out in one folder small enough to carry
to a GPU machine (64 MiB with the checkout), from `../shared/data`:

    python benchmarks/distill_data.py --out .distill_data            # then: bash benchmarks/gpu_distill.sh
    python benchmarks/distill_data.py --out /tmp/dd --extra 40 --train-people 40 --select-folds 1   # a CPU check

- `split/train`, `split/val`: `lfw_dev` split by `train.split` (LFW fold 5's 600 pairs held out, balanced into 10
  folds; training on every crop of the 3,132 people in no fold-5 pair). Fold 5 is reported once, at the end.
- `select/`: the pairs of `train_faces/celeba200`'s folds `--select-folds` (other people than LFW's, none trained
  on): the set that chooses the best step and the recipe, so that nothing is tuned to fold 5.
- `teacher/`: insightface's MobileFaceNet (`mobilefacenet_y1`: `.params` and symbol), the teacher.
- `extra/utkface/`: `--extra` UTKFace crops (no identities; distillation only), a seeded random sample,
  re-encoded at JPEG quality `--quality` (the README's measure: quality 75 is 0.68x the bytes).

Crops are copied, not linked (links do not travel). One JSON object on stdout (counts and bytes); nothing is
overwritten: an existing `--out` is refused.
"""
import argparse
import io
import json
import random
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from timm_mobileone.cli import cli  # noqa: E402
from timm_mobileone.errors import UserError  # noqa: E402


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--shared', default=str(REPO.parent / 'shared' / 'data'), help='the shared data folder')
    p.add_argument('--out', default=str(REPO / '.distill_data'), help='new folder to write')
    p.add_argument('--extra', type=int, default=6000, help='UTKFace crops to include (0: none)')
    p.add_argument('--quality', type=int, default=75, help='JPEG quality of the re-encoded UTKFace crops')
    p.add_argument('--select-folds', type=int, nargs='+', default=[1, 2], help='celeba200 pairs.txt folds')
    p.add_argument('--seed', type=int, default=0, help='seed of the UTKFace sample')
    p.add_argument('--train-people', type=int, default=0,
                   help='keep only the first N training people (0: all; a small set for a CPU check)')
    return p.parse_args(argv)


def folder_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob('*') if p.is_file())


@cli
def main(argv: Optional[List[str]] = None) -> Dict:
    from PIL import Image
    from train import split
    args = parse_args(argv)
    shared, out = Path(args.shared), Path(args.out)
    lfw, celeba, utk = shared / 'lfw_dev', shared / 'train_faces' / 'celeba200', shared / 'train_faces' / 'utkface'
    for path in (lfw, celeba, shared / 'mobilefacenet_y1') + ((utk,) if args.extra else ()):
        if not path.is_dir():
            raise UserError(f'{path}: missing (see ../shared/data/README.md)')
    if out.exists():
        raise UserError(f'--out {out} exists; remove it or give another folder')
    out.mkdir(parents=True)
    quiet = io.StringIO()  # train.split prints its own JSON: keep stdout to this script's one object
    saved, sys.stdout = sys.stdout, quiet
    try:
        lfw_split = split.main(['--data', str(lfw), '--val-folds', '5', '--output', str(out / 'split'), '--copy'])
        tmp = out / '.select'
        select = split.main(['--data', str(celeba), '--val-folds', *map(str, args.select_folds), '--output',
                             str(tmp), '--copy'])
    finally:
        sys.stdout = saved
    (tmp / 'val').rename(out / 'select')
    if args.train_people:
        for person in sorted((out / 'split' / 'train').iterdir())[args.train_people:]:
            shutil.rmtree(person)
    shutil.rmtree(tmp)
    teacher = out / 'teacher'  # insightface's MobileFaceNet (non-commercial research licence): to run, not to ship
    teacher.mkdir()
    for name in ('model-0000.params', 'model-symbol.json'):
        shutil.copy(shared / 'mobilefacenet_y1' / name, teacher / name)
    extra = 0
    if args.extra:
        files = sorted(utk.glob('*.jpg'))
        random.Random(args.seed).shuffle(files)
        dst = out / 'extra' / 'utkface'
        dst.mkdir(parents=True)
        for f in files[:args.extra]:
            with Image.open(f) as im:
                im.convert('RGB').save(dst / f.name, quality=args.quality)
            extra += 1
    parts = {name: folder_bytes(out / name) for name in ('split', 'select', 'extra', 'teacher')
             if (out / name).exists()}
    train_images = sum(1 for f in (out / 'split' / 'train').rglob('*') if f.is_file())
    result = dict(out=str(out), train_images=train_images, val_pairs=lfw_split.get('val_pairs'),
                  select_pairs=select.get('val_pairs'), extra_images=extra, bytes=parts,
                  total_mib=round(sum(parts.values()) / 2 ** 20, 1))
    print(json.dumps(result))
    return result


if __name__ == '__main__':
    main()
