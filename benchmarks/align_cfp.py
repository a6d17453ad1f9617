"""Raw photos to CFP figures: alignment speed and settings, and eval on an aligned cache vs an insightface pack.

    python benchmarks/align_cfp.py --data ../shared/data/cfp_dev \
        --checkpoint ../shared/data/mobilefacenet_y1/model-0000.params [--min-sides 0,256,320,400,640]

1. For each --min-sides value (eval.align's --min-side; the others at their defaults): align every photo under
   `Data/Images` into a fresh folder with eval.align's engine (all cores), timed; how each photo was served and the
   detector's misses on profiles; the model's CFP-FP and CFP-FF (image + flip, the dataset's own folds) from the
   crops, each photo embedded once.
2. `python -m eval.cfp --data ROOT --protocol FP` on a warm alignment cache against `python -m eval.verify` on an
   insightface `.bin` pack of the same crops (the same 2N images), alternated --rounds times: the cost of reading a
   raw dataset once it is aligned.

stdout: one JSON object; progress on stderr. Machine and date go in the doc that quotes it.
"""
import argparse
import contextlib
import json
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from timm_mobileone.faces import align as A  # noqa: E402
from timm_mobileone.verification_data import list_images as list_photos  # noqa: E402
from eval.api import Alignment, CFP_PROTOCOLS, l2_normalize, pair_metrics, read_cfp_pairs  # noqa: E402


def settings_for(min_side: int) -> A.AlignSettings:
    return Alignment(min_side=min_side).settings()  # eval.align's defaults otherwise


@torch.no_grad()
def embed(model, paths, batch: int = 128) -> np.ndarray:
    """Flip-summed raw embeddings of aligned crops (the model's cfg normalization), decoded as eval decodes them
    (Pillow; OpenCV's decoder, used here before, gave the same pixels on all 3,500 cfp_dev crops)."""
    import timm
    from timm_mobileone.verification_data import decode_aligned
    cfg = timm.data.resolve_model_data_config(model)
    mean = torch.tensor(cfg['mean']).view(1, 3, 1, 1)
    std = torch.tensor(cfg['std']).view(1, 3, 1, 1)
    size = tuple(cfg['input_size'][-2:])
    out = []
    for i in range(0, len(paths), batch):
        rgb = np.stack([decode_aligned(Path(p).read_bytes(), size) for p in paths[i:i + batch]])
        x = (torch.from_numpy(rgb.copy()).permute(0, 3, 1, 2).float() / 255 - mean) / std
        out.append((model(x) + model(x.flip(3))).numpy())
    return np.concatenate(out)


def score(root: Path, crops: Path, embeddings: dict) -> dict:
    out = {}
    for protocol in CFP_PROTOCOLS:
        images, issame, folds = read_cfp_pairs(root, protocol)
        m = pair_metrics(l2_normalize(np.stack([embeddings[n] for n in images])), issame, num_folds=folds)
        out[f'cfp_{protocol.lower()}'] = dict(
            accuracy=round(m['accuracy'], 5), accuracy_std=round(m['accuracy_std'], 5),
            folds=[round(a, 5) for a in m['accuracies']], auc=round(m['auc'], 5), eer=round(m['eer'], 5))
    return out


def make_pack(root: Path, crops: Path, path: Path) -> int:
    """An insightface .bin pack of CFP-FP's pairs from the aligned crops; the pair count."""
    images, issame, _ = read_cfp_pairs(root, 'FP')
    bins = [np.frombuffer((crops / n).read_bytes(), np.uint8) for n in images]
    with open(path, 'wb') as f:
        pickle.dump((bins, issame.tolist()), f, protocol=4)
    return len(issame)


def timed_cli(module, argv) -> float:
    import importlib
    main = importlib.import_module(module).main
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        main(argv)
    return time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--data', type=Path, required=True, help='CFP root (Data/, Protocol/)')
    p.add_argument('--model', default='mobilefacenet')
    p.add_argument('--checkpoint', required=True)
    p.add_argument('--min-sides', default='320', help="eval.align --min-side values to compare (320: the default)")
    p.add_argument('--workers', type=int, default=os.cpu_count() or 1, help='alignment processes')
    p.add_argument('--rounds', type=int, default=2, help='alternated eval.cfp / pack timings')
    args = p.parse_args(argv)
    import timm
    from timm_mobileone.checkpoints import create_model_checked
    torch.set_num_threads(os.cpu_count() or 1)
    model = timm.utils.reparameterize_model(create_model_checked(args.model, False, args.checkpoint).eval())
    names = list_photos(args.data / 'Data' / 'Images')
    names = [f'Data/Images/{n}' for n in names]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for min_side in [int(s) for s in args.min_sides.split(',')]:
            settings = settings_for(min_side)
            dst = Path(tmp) / f'min_side_{min_side}'
            report = A.align_folder(args.data, dst, names, settings, A.DEFAULT_DETECTOR, workers=args.workers,
                                    desc=f'align (min side {min_side})')
            t0 = time.perf_counter()
            emb = embed(model, [dst / n for n in names])
            row = dict(min_side=min_side, photos=report['photos'], align_seconds=report['seconds'],
                       photos_per_second=report['photos_per_second'], served=report['served'],
                       several_faces=report['several_faces'],
                       profile_misses=sum('/profile/' in f['image'] for f in report['fallbacks']),
                       frontal_misses=sum('/frontal/' in f['image'] for f in report['fallbacks']),
                       embed_seconds=round(time.perf_counter() - t0, 1))
            row.update(score(args.data, dst, dict(zip(names, emb))))
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
        # eval on the warm cache vs a pack of the same crops
        cache = Path(tmp) / 'cache'
        common = ['--model', args.model, '--checkpoint', args.checkpoint, '--no-progress', '--align-cache',
                  str(cache)]
        timed_cli('eval.cfp', common + ['--data', str(args.data), '--protocol', 'FP'])  # aligns: not timed
        crops = next(cache.glob('*/*'))
        pack = Path(tmp) / 'cfp_fp_same_crops.bin'
        pairs = make_pack(args.data, crops, pack)
        cached, packed = [], []
        for _ in range(args.rounds):
            cached.append(timed_cli('eval.cfp', common + ['--data', str(args.data), '--protocol', 'FP']))
            packed.append(timed_cli('eval.verify', common + ['--data', str(pack)]))
        speed = dict(eval_cfp_cached_seconds=[round(s, 1) for s in cached],
                     eval_pack_seconds=[round(s, 1) for s in packed],
                     ratio_cached_to_pack=round(min(cached) / min(packed), 3), pairs=pairs)
    result = dict(model=args.model, checkpoint=args.checkpoint, data=str(args.data), rows=rows, speed=speed,
                  cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
                  command='python benchmarks/align_cfp.py ' + ' '.join(sys.argv[1:] if argv is None else argv))
    print(json.dumps(result))
    return result


if __name__ == '__main__':
    main()
