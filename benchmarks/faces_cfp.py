"""`faces compare` against `eval.cfp` on raw CFP photos: the same answers at one threshold, and photos/s.

    python benchmarks/faces_cfp.py --data ../shared/data/cfp_dev \
        --checkpoint ../shared/data/mobilefacenet_y1/model-0000.params [--model mobilefacenet] [--speed-photos 300]

1. `eval.cfp` (through `eval.api`): every CFP-FP and CFP-FF pair, its photos aligned into the crop cache (JPEG 95,
   as insightface's packs store crops), insightface's 10-fold protocol: accuracy and the folds' best thresholds.
2. `FaceEmbedder` (what `python -m timm_mobileone.faces compare` calls per pair): every photo detected, aligned and
   embedded in memory. At one fixed threshold (the cosine of eval's median fold threshold), the accuracy of its
   same / different answers over every pair, beside eval's embeddings' accuracy at that threshold; and
   `embed_crops` of eval's cached crops, which must be eval's embeddings (same crops, same embeddings).
3. Photos/s of detect + align + embed (flip on) on --speed-photos photos for the PyTorch model, its FP32 ONNX export
   and an INT8 ONNX export (calibrated on --calib, training crops), measured one after another in this process.

One JSON object on stdout. The model's licence is its own: insightface's MobileFaceNet weights are for
non-commercial research only, and are not this project's.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _accuracy(cosines: np.ndarray, issame: np.ndarray, threshold: float) -> float:
    return float(np.mean((cosines >= threshold) == issame))


def _pair_cosines(embeddings: np.ndarray) -> np.ndarray:
    e = np.asarray(embeddings, dtype=np.float64)
    return np.sum(e[0::2] * e[1::2], axis=1)


def _speed(embedder, photos) -> float:
    embedder(photos[:4])  # warm up
    t0 = time.perf_counter()
    for start in range(0, len(photos), 16):
        embedder(photos[start:start + 16], all_faces=False)
    return len(photos) / (time.perf_counter() - t0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--data', default=str(REPO.parent / 'shared' / 'data' / 'cfp_dev'))
    parser.add_argument('--model', default='mobilefacenet')
    parser.add_argument('--checkpoint', default=str(REPO.parent / 'shared' / 'data' / 'mobilefacenet_y1' /
                                                    'model-0000.params'))
    parser.add_argument('--calib', default=str(REPO.parent / 'shared' / 'data' / 'train_faces'),
                        help='aligned training crops to calibrate the INT8 export on')
    parser.add_argument('--speed-photos', type=int, default=300)
    parser.add_argument('--workers', type=int, default=os.cpu_count() or 1, help='alignment processes (eval.cfp)')
    parser.add_argument('--cache', default='', help='eval.cfp\'s crop cache (default: a temp folder)')
    args = parser.parse_args(argv)
    from eval.api import Alignment, EmbedOptions, ModelSpec, load_datasets, load_model, read_cfp_pairs, verify
    from PIL import Image

    from timm_mobileone.faces import FaceEmbedder
    root = Path(args.data)
    cache = args.cache or tempfile.mkdtemp(prefix='faces-cfp-cache-')
    spec = ModelSpec(args.model, checkpoint=args.checkpoint, device='cpu')
    t0 = time.perf_counter()
    datasets = load_datasets([root], protocols=['FP', 'FF'], alignment=Alignment(workers=args.workers, cache=cache))
    evaluator = load_model(spec)
    saved = Path(tempfile.mkdtemp(prefix='faces-cfp-emb-')) / 'cfp.npy'
    result = verify(evaluator, datasets, EmbedOptions(batch_size=64), save_embeddings=str(saved)).to_json()
    eval_seconds = time.perf_counter() - t0
    faces = FaceEmbedder(args.model, args.checkpoint)
    rows = []
    memory: dict = {}
    t0 = time.perf_counter()
    for ds, row in zip(datasets, result['results']):
        protocol = ds.name.split('_')[-1].upper()
        names, issame, _ = read_cfp_pairs(root, protocol)
        todo = [n for n in dict.fromkeys(names) if n not in memory]
        for start in range(0, len(todo), 64):
            chunk = todo[start:start + 64]
            for name, r in zip(chunk, faces([root / n for n in chunk], all_faces=False)):
                memory[name] = r.face.embedding if r.face is not None else None
        threshold = 1.0 - float(np.median(row['thresholds'])) / 2.0  # squared distance -> cosine
        eval_e = np.load(saved.with_name(f'{saved.stem}_{ds.name}.npy'))  # the normalized embeddings eval scored
        crops = np.stack([np.asarray(Image.open(p).convert('RGB')) for p in ds.images])  # eval's cached crops
        same_crops = faces.embed_crops(crops)
        missing = [n for n in names if memory[n] is None]
        mem = np.stack([memory[n] if memory[n] is not None else np.zeros(eval_e.shape[1], np.float32)
                        for n in names])
        rows.append(dict(
            protocol=protocol, pairs=int(len(issame)), eval_accuracy_10fold=row['accuracy'],
            threshold_cosine=round(threshold, 5),
            eval_accuracy_at_threshold=round(_accuracy(_pair_cosines(eval_e), issame, threshold), 5),
            compare_accuracy_at_threshold=round(_accuracy(_pair_cosines(mem), issame, threshold), 5),
            compare_on_eval_crops_accuracy=round(_accuracy(_pair_cosines(same_crops), issame, threshold), 5),
            max_abs_diff_on_eval_crops=float(np.abs(same_crops - eval_e).max()),
            compare_no_face=len(set(missing))))
    compare_seconds = time.perf_counter() - t0
    # photos/s: PyTorch FP32, ONNX FP32, ONNX INT8 (the export CLI, calibrated on training crops)
    photos = [root / n for n in list(dict.fromkeys(read_cfp_pairs(root, 'FP')[0]))[:args.speed_photos]]
    speed = dict(pytorch_fp32=round(_speed(faces, photos), 2))
    work = Path(tempfile.mkdtemp(prefix='faces-cfp-onnx-'))
    for label, extra in (('onnx_fp32', []), ('onnx_int8', ['--int8', '--calib', args.calib])):
        proc = subprocess.run([sys.executable, '-m', 'timm_mobileone.export', '--model', args.model, '--checkpoint',
                               args.checkpoint, '--onnx', str(work / 'fp32.onnx'), *extra], capture_output=True,
                              text=True, cwd=REPO)
        if proc.returncode:
            speed[label] = f'export failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "?"}'
            continue
        exported = json.loads(proc.stdout)
        path = exported.get('int8', {}).get('onnx') if label == 'onnx_int8' else str(work / 'fp32.onnx')
        if not path:
            speed[label] = 'no int8 file in the export result'
            continue
        artifact = FaceEmbedder(args.model, artifact=str(path), runtime='onnx')
        speed[label] = round(_speed(artifact, photos), 2)
    print(json.dumps(dict(rows=rows, photos_per_second=speed, speed_photos=len(photos),
                          eval_seconds=round(eval_seconds, 1), compare_seconds=round(compare_seconds, 1),
                          model=args.model, checkpoint=args.checkpoint, data=str(root), cpu_count=os.cpu_count(),
                          command='python benchmarks/faces_cfp.py ' + ' '.join(sys.argv[1:] if argv is None
                                                                               else argv))))


if __name__ == '__main__':
    main()
