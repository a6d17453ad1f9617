"""IJB-B / IJB-C 1:1 verification (TAR at FAR 1e-6 ... 1e-1): `python -m eval.ijb --model NAME --data-dir IJB_ROOT`.

insightface's `recognition/arcface_torch/eval_ijbc.py` protocol, number for number (eval/_ijb.py says how): 5-point
alignment to the ArcFace template, flip-summed raw features times the faceness score, media-averaged and summed
template features, L2-normalized dot products, sklearn's ROC. The data as insightface distributes it:
IJB_ROOT/IJBC/meta/ijbc_{face_tid_mid,template_pair_label,name_5pts_score}.txt and IJB_ROOT/IJBC/loose_crop/.

`--features F.npy` scores precomputed raw outputs (N x 2 x D: image, flipped image, in the face_tid_mid order; or
N x D with --no-flip) instead of running a model. Prints one JSON object (tar_at_far as fractions, keyed '1e-4' ...,
auc, num_images, num_templates, num_pairs, images_per_second, ...); a tqdm bar on stderr counts images.
"""
import argparse
import logging
import os
import resource
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from timm_mobileone import results as R
from timm_mobileone.files import sha256_file
from timm_mobileone.verification_data import read_npy

from . import _ijb as J
from . import api
from ._flags import UserError, add_model_flags, cli, embed_options, finish, load_model, parse
from ._plots import roc_figure, save_roc
from ._result import versions

_logger = logging.getLogger('eval')
FEATURE_CHUNK = 4096  # precomputed features pooled this many images at a time (they may be a memory-mapped file)


def parse_args(argv: Optional[List[str]] = None):
    parser = argparse.ArgumentParser(prog='python -m eval.ijb', description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_flags(parser)
    parser.add_argument('--data-dir', required=True, metavar='IJB_ROOT',
                        help='folder holding IJBC/ (or IJBB/) with meta/ and loose_crop/, or that target folder')
    parser.add_argument('--target', default='IJBC', type=str.upper, choices=J.TARGETS, help='IJB-C or IJB-B')
    parser.add_argument('--features', default='', metavar='F.npy',
                        help='score these raw per-image outputs (N x 2 x D: image, flip; N x D with --no-flip) '
                             'instead of running a model')
    parser.add_argument('--faceness', default='', metavar='S.npy',
                        help='per-image faceness scores (N,) for --features, where the name_5pts_score meta file '
                             'is absent')
    parser.add_argument('--no-detector-score', dest='detector_score', action='store_false',
                        help="do not weight image features by the detector's faceness score (insightface's D0)")
    parser.add_argument('--normalize-before-pooling', action='store_true',
                        help="L2-normalize image features before pooling, dropping the norm's quality weight "
                             "(insightface's N0)")
    parser.add_argument('--save-features', default='', metavar='F.npy',
                        help='save the raw per-image outputs (N x 2 x D, or N x D with --no-flip), for --features')
    args = parse(parser, argv)
    if args.features and (args.save_features or args.checkpoint or args.onnx or args.artifact or args.pretrained):
        parser.error('--features scores saved outputs: it takes no --checkpoint, --onnx, --artifact, --pretrained or '
                     '--save-features')
    if args.faceness and not args.features:
        parser.error('--faceness goes with --features (a model run reads the scores from the meta file)')
    return args


def _load_array(path: str, what: str) -> np.ndarray:
    return read_npy(path, f'--{what}', mmap=True)  # PackError: one error line


def _features(args, num_images: int) -> np.ndarray:
    feats = _load_array(args.features, 'features')
    expected = f'({num_images}, 2, D) or, with --no-flip, ({num_images}, D)'
    if not np.issubdtype(feats.dtype, np.floating) or feats.ndim not in (2, 3) or feats.shape[0] != num_images \
            or (feats.ndim == 3 and feats.shape[1] != 2) or feats.shape[-1] < 1:
        raise UserError(f'--features {args.features}: shape {feats.shape} of {feats.dtype}; expected {expected} '
                        f'floats, one row per line of the face_tid_mid file')
    if feats.ndim == 2 and args.flip:
        raise UserError(f'--features {args.features}: (N, D) features hold no flipped views; pass --no-flip, or '
                        f'save (N, 2, D)')
    return feats


def _faceness(args, meta: J.IJBMeta) -> Optional[np.ndarray]:
    if not args.detector_score:
        return None
    if args.faceness:
        scores = _load_array(args.faceness, 'faceness')
        if scores.shape != (len(meta.names),) or not np.issubdtype(scores.dtype, np.floating):
            raise UserError(f'--faceness {args.faceness}: shape {scores.shape} of {scores.dtype}; expected '
                            f'({len(meta.names)},) floats')
        scores = np.asarray(scores, dtype=np.float32)
        if not np.isfinite(scores).all():
            raise UserError(f'--faceness {args.faceness}: holds NaN or inf')
        return scores
    if meta.faceness is None:
        raise UserError(f'{J.meta_file(meta.root, meta.target, "name_5pts_score")}: no such file; it holds the '
                        f'faceness scores (give --faceness S.npy, or --no-detector-score)')
    return meta.faceness


def _pool_features(args, meta: J.IJBMeta, pooler: J.TemplatePooler, faceness) -> None:
    feats = _features(args, len(meta.names))
    for s in range(0, len(feats), FEATURE_CHUNK):
        chunk = np.asarray(feats[s:s + FEATURE_CHUNK], dtype=np.float32)
        if not np.isfinite(chunk).all():
            bad = s + int(np.flatnonzero(~np.isfinite(chunk.reshape(len(chunk), -1)).all(1))[0])
            raise UserError(f'--features {args.features}: the features of image {bad} ({meta.names[bad]}) are '
                            f'not finite')
        raw, raw_flip = (chunk[:, 0], chunk[:, 1] if args.flip else None) if chunk.ndim == 3 else (chunk, None)
        pooler.add(s, J.image_features(raw, raw_flip, None if faceness is None else faceness[s:s + len(chunk)],
                                       args.normalize_before_pooling))


def _check_images(meta: J.IJBMeta) -> None:
    """Every listed image must exist before hours of embedding start."""
    if not meta.image_dir.is_dir():
        raise UserError(f'{meta.image_dir}: no such folder (the loose crops of {meta.target})')
    for name in meta.names:
        if not os.path.isfile(meta.image_dir / name):
            raise UserError(f'{meta.image_dir / name}: no such file (listed in '
                            f'{J.meta_file(meta.root, meta.target, "face_tid_mid").name})')


def _embed_and_pool(args, meta: J.IJBMeta, pooler: J.TemplatePooler, faceness) -> Dict:
    _check_images(meta)
    embedder = load_model(args)
    data_cfg = embedder.data_cfg
    if tuple(data_cfg['input_size'][-2:]) != (J.CROP_SIZE, J.CROP_SIZE):
        raise UserError(f'--model {args.model}: input size {data_cfg["input_size"][-2:]}; the IJB alignment '
                        f'template makes {J.CROP_SIZE}x{J.CROP_SIZE} crops')
    crops = J.AlignedCrops(meta.image_dir, meta.names, meta.landmarks)
    saved = None
    tmp = None
    t0 = time.perf_counter()
    forward_s = 0.0
    try:
        for start, out, out_flip, seconds in api.embed_batches(embedder, crops, embed_options(args), meta.target):
            forward_s += seconds
            n = len(out)
            if args.save_features:
                if saved is None:
                    target = Path(args.save_features)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    tmp = target.with_name(f'.{target.name}.{os.getpid()}.tmp')
                    shape = (len(meta.names), 2, out.shape[1]) if args.flip else (len(meta.names), out.shape[1])
                    saved = np.lib.format.open_memmap(tmp, mode='w+', dtype=np.float32, shape=shape)
                if args.flip:
                    saved[start:start + n, 0] = out
                    saved[start:start + n, 1] = out_flip
                else:
                    saved[start:start + n] = out
            pooler.add(start, J.image_features(out, out_flip, None if faceness is None else faceness[start:start + n],
                                               args.normalize_before_pooling))
        if saved is not None:
            saved.flush()
            del saved
            os.replace(tmp, args.save_features)
            tmp = None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    return dict(embedder=embedder, data_cfg=data_cfg, images_per_second=round(len(meta.names) / max(seconds, 1e-9), 1),
                forward_seconds=round(forward_s, 3))


def _plot(path: str, target: str, metrics: Dict) -> None:
    plt, fig, ax = roc_figure()
    ax.plot(metrics['fpr'], metrics['tpr'], lw=1, label=f"{target} (AUC {metrics['auc'] * 100:.2f}%)")
    for far in J.FARS:
        tar = metrics['tar_at_far'][J.far_key(far)]
        ax.scatter([far], [tar], s=12, zorder=3)
        ax.annotate(f'{tar * 100:.2f}', (far, tar), textcoords='offset points', xytext=(3, -10), fontsize=7)
    save_roc(plt, fig, ax, path, (1e-6, 1e-1), f'ROC on {target} (1:1 template verification)')


@cli
def main(argv: Optional[List[str]] = None) -> Dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        raise UserError(f'--data-dir {data_dir}: no such folder')
    root = J.target_root(data_dir, args.target)
    lmk_file = J.meta_file(root, args.target, 'name_5pts_score')
    # precomputed features need the landmark file only for its scores, and not even that with --faceness
    need_lmk = not args.features or (args.detector_score and not args.faceness)
    if args.features and need_lmk and not lmk_file.is_file():
        need_lmk = False  # _faceness names the missing file and the way out
    meta = J.read_meta(data_dir, args.target, landmarks=need_lmk)
    faceness = _faceness(args, meta)
    pooler = J.TemplatePooler(meta.templates, meta.medias)
    _logger.info(f'{args.target}: {len(meta.names)} images, {len(pooler.unique_templates)} templates, '
                 f'{pooler.num_media} media, {len(meta.label)} pairs')
    run = dict(embedder=None, data_cfg=None, images_per_second=None, forward_seconds=None)
    if args.features:
        _pool_features(args, meta, pooler, faceness)
    else:
        run = _embed_and_pool(args, meta, pooler, faceness)
    t_score = time.perf_counter()
    feats = pooler.template_features()
    scores = J.pair_scores(feats, pooler.unique_templates, meta.p1, meta.p2)
    metrics = J.tar_at_far(meta.label, scores)
    score_s = time.perf_counter() - t_score
    if args.plot:
        _plot(args.plot, args.target, metrics)
    embedder = run['embedder']
    peak = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    artifact = args.onnx or getattr(args, 'artifact', '') or ''
    result = dict(
        model=None if args.features or artifact else args.model,  # an artifact is named by itself, not a model
        tag=embedder.tag if embedder is not None and not artifact else None,
        onnx=args.onnx or None,
        artifact=artifact or None,
        artifact_sha256=sha256_file(artifact) if artifact else None,
        checkpoint=args.checkpoint or None,
        features=args.features or None,
        dataset=args.target.lower(),
        target=args.target,
        data=str(root),
        num_images=len(meta.names),
        num_templates=len(pooler.unique_templates),
        num_media=pooler.num_media,
        num_pairs=len(meta.label),
        num_genuine=int(meta.label.sum()),
        flip=bool(args.flip),
        detector_score=bool(args.detector_score),
        norm_score=not args.normalize_before_pooling,
        reparam=bool(args.reparam and not args.features and not args.onnx),
        input_size=list(run['data_cfg']['input_size']) if run['data_cfg'] else None,
        tar_at_far=metrics['tar_at_far'],
        auc=metrics['auc'],
        images_per_second=run['images_per_second'],
        forward_seconds=run['forward_seconds'],
        scoring_seconds=round(score_s, 3),
        seconds=round(time.perf_counter() - t_start, 3),
        peak_rss_mb=round(peak / 1024, 1),
        command=args.command,
        versions=versions(),
    )
    if args.save_features:
        result['saved_features'] = args.save_features
    _logger.info(f"{args.target}: TAR@FAR=1e-4 {metrics['tar_at_far']['1e-4']:.5f}")
    row = dict(dataset=result['dataset'], kind='ijb', num=result['num_pairs'], flip=result['flip'],
               tar_at_far={k: metrics['tar_at_far'][k] for k in R.IJB_FARS}, auc=metrics['auc'])
    return finish(result, args, [row])


if __name__ == '__main__':
    main()
