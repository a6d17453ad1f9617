"""Shared plumbing of the verification entry points: flags, model creation, embedding, the JSON result.

Flags follow timm's validate.py. stdout carries exactly one JSON object; progress (tqdm, counting images) and
status lines (logging) go to stderr. User mistakes exit with code 2 and one `error: ...` line, no traceback.
"""
import argparse
import json
import logging
import os
import shlex
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from timm_mobileone import results as R
from timm_mobileone.checkpoints import create_model_checked
from timm_mobileone.cli import cli  # noqa: F401  (the eval CLIs import cli and UserError from here)
from timm_mobileone.deploy import formats
from timm_mobileone.errors import UserError, first_line
from timm_mobileone.files import atomic_write
from timm_mobileone.verification_data import (
    PackError, PairImages, VerificationSet, collate_images, load_verification_set, read_embeddings)

from . import _verification as V

_logger = logging.getLogger('eval')


# Decoding workers pay off once the model's threads leave cores free: on the 2-core box a worker competing with the
# model's 2 threads made an LFW-size eval 1.24x its forward passes, decoding in the main process 1.11x
# (benchmarks/eval_speed.py, README).
DEFAULT_WORKERS = max(0, min(4, (os.cpu_count() or 1) - 2))


def add_model_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags every embedding eval shares (model, runtime, batching, output), in timm's validate.py vocabulary."""
    parser.add_argument('-m', '--model', default='mobileone_112_s0',
                        help="timm model: a registry name (with optional .tag), 'hf-hub:ORG/NAME' or 'local-dir:DIR'")
    parser.add_argument('--pretrained', action='store_true', help='load the pretrained weights of --model')
    parser.add_argument('--onnx', default='', metavar='MODEL.onnx',
                        help='run this ONNX model (FP32 or INT8, from timm_mobileone.export) in ONNX Runtime instead; '
                             "--model then only supplies the preprocessing cfg")
    parser.add_argument('--runtime', default=None, choices=formats.RUNNABLE,
                        help='run --artifact (from timm_mobileone.export --format) in this runtime instead of PyTorch: '
                             'the same protocol on exactly what ships; fixed-batch artifacts run one image at a time')
    parser.add_argument('--artifact', default='', metavar='PATH', help='the exported model for --runtime (.onnx, '
                        '.pte, ncnn .param with its .bin beside it)')
    parser.add_argument('--checkpoint', default='', help='load this checkpoint (state dict) into the model')
    parser.add_argument('-b', '--batch-size', type=int, default=64, help='images per forward pass')
    parser.add_argument('-j', '--workers', type=int, default=DEFAULT_WORKERS,
                        help='DataLoader worker processes decoding JPEGs (0: decode in the main process)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='torch device')
    parser.add_argument('--amp', action='store_true', help='autocast (bfloat16 on CPU, float16 on CUDA)')
    parser.add_argument('--mean', type=float, nargs=3, default=None, metavar=('R', 'G', 'B'),
                        help="input mean as fractions of 255, as timm's validate.py (default: the model's cfg)")
    parser.add_argument('--std', type=float, nargs=3, default=None, metavar=('R', 'G', 'B'),
                        help="input std as fractions of 255, as timm's validate.py (default: the model's cfg)")
    parser.add_argument('--raw-pixels', action='store_true',
                        help='feed 0..255 pixel values unnormalized: for artifacts that normalize inside their graph '
                             "(insightface's mxnet2ncnn files, many published ONNX face models)")
    parser.add_argument('--channel-order', default='rgb', choices=('rgb', 'bgr'),
                        help='channel order the model or artifact takes (insightface ONNX models: bgr)')
    parser.add_argument('--no-flip', dest='flip', action='store_false',
                        help='embed each image alone (default: image + horizontal flip, summed)')
    parser.add_argument('--no-reparam', dest='reparam', action='store_false',
                        help='evaluate the train-time form instead of the reparameterized (fused) one')
    parser.add_argument('--no-channels-last', dest='channels_last', action='store_false',
                        help='keep NCHW memory format (default: channels_last, about 2x faster on CPU for S0)')
    parser.add_argument('--results-file', default='', help='also write the JSON result to this file')
    parser.add_argument('--plot', default='', metavar='ROC.png', help='save a ROC plot with the TAR@FAR point(s)')
    parser.add_argument('--no-progress', dest='progress', action='store_false', help='no progress bar')
    parser.add_argument('-v', '--verbose', action='store_true', help='log status lines at INFO level')
    return parser


def build_parser(prog: str, description: str, default_targets: Sequence[str], multi: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_flags(parser)
    parser.add_argument('--data', action='append', default=None, metavar='PATH',
                        help='verification data: an insightface .bin pack, a folder of aligned images with '
                             'pairs.txt (of photos, with --align), or a CFP root' + (' (repeatable)' if multi else ''))
    parser.add_argument('--data-dir', default='',
                        help=f'folder holding the packs named by --targets (default: {",".join(default_targets)})')
    parser.add_argument('--targets', default=','.join(default_targets),
                        help='comma-separated pack names looked up in --data-dir as NAME.bin')
    parser.add_argument('--embeddings', action='append', default=None, metavar='E.npy',
                        help='score precomputed (2N x D, interleaved pairs) embeddings instead of running a model; '
                             'one per dataset, in --data order; labels come from the data')
    parser.add_argument('--num-folds', type=int, default=None,
                        help="cross-validation folds (default: the count a pairs.txt header declares, LFW's "
                             "'10 300'; else 10, insightface's packs)")
    parser.add_argument('--save-embeddings', default='', metavar='PATH.npy',
                        help='save the normalized 2N x D embeddings the metric saw (PATH_<dataset>.npy for several)')
    parser.add_argument('--align', action='store_true',
                        help='--data folders hold photos, not aligned crops: detect and align them first (once; the '
                             'crops are cached). A CFP root (Protocol/Split/...) is always aligned')
    parser.add_argument('--align-cache', default='', metavar='DIR',
                        help='where aligned crops are cached (default: ~/.cache/timm-mobileone/aligned), one folder '
                             'per source and settings')
    from .align import add_align_flags  # eval.align imports nothing of this module
    add_align_flags(parser)
    return parser


def resolve_data(args, default_targets: Sequence[str], load_images: bool = True) -> List[VerificationSet]:
    paths: List[Path] = [Path(p) for p in (args.data or [])]
    if not paths:
        if not args.data_dir:
            raise UserError('give --data PATH (a .bin pack or an aligned folder) or --data-dir DIR')
        data_dir = Path(args.data_dir)
        if not data_dir.is_dir():
            raise UserError(f'--data-dir {data_dir}: no such folder')
        targets = [t.strip() for t in args.targets.split(',') if t.strip()]
        paths = [data_dir / f'{t}.bin' for t in targets if (data_dir / f'{t}.bin').is_file()]
        if not paths:
            raise UserError(f'--data-dir {data_dir}: none of {", ".join(t + ".bin" for t in targets)} found')
    from . import _photos
    from .align import align_settings
    out: List[VerificationSet] = []
    for p in paths:
        if _photos.is_cfp_root(p):
            for protocol in getattr(args, 'protocol', None) or _photos.CFP_PROTOCOLS:
                out.append(_photos.load_cfp(p, protocol, align_settings(args), args))
        elif args.align and (p.is_dir() or p.suffix == '.txt'):
            out.append(_photos.load_photo_folder(p, align_settings(args), args))
        elif args.align:
            raise UserError(f'--align: {p} is not a folder of photos with pairs.txt (packs hold aligned crops)')
        else:
            out.append(load_verification_set(p))
    return out


class ArtifactModel:
    """An exported artifact run by its runtime (`timm_mobileone.deploy.formats`), called like a model: (B, C, H, W)
    tensor in, (B, D) tensor out. Artifacts exported at a fixed batch size run in chunks of it (ExecuTorch, ncnn: one
    image)."""

    def __init__(self, runtime: str, path: str, pretrained_cfg: Dict):
        fmt = formats.FORMATS[runtime]
        fmt.require(flag='--runtime')
        try:
            with formats.quiet():
                self.run = fmt.runner(path)
                self.run(np.zeros((1, *pretrained_cfg['input_size']), np.float32))
        except UserError as e:
            raise UserError(f'--artifact {e}') from None
        except Exception as e:  # the runtime's own complaint, e.g. an input shape the program was not exported for
            raise UserError(f'--artifact {path}: {fmt.runtime} cannot run it on --model\'s input '
                            f'{"x".join(map(str, pretrained_cfg["input_size"]))} ({first_line(e)})') from None
        self.pretrained_cfg = pretrained_cfg

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.run(np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)))


def _artifact(args) -> Tuple[str, str]:
    """(runtime, path) of an exported model to evaluate, or ('', '') for the PyTorch model."""
    runtime, path = getattr(args, 'runtime', None) or '', getattr(args, 'artifact', '')
    if args.onnx:
        if runtime not in ('', 'onnx') or path:
            raise UserError('--onnx PATH is --runtime onnx --artifact PATH: give one or the other')
        return 'onnx', args.onnx
    if bool(runtime) != bool(path):
        raise UserError('--runtime and --artifact go together (e.g. --runtime executorch --artifact s0.pte)')
    return runtime, path


def input_cfg(data_cfg: Dict, args) -> Dict:
    """The data cfg with the user's --mean/--std/--raw-pixels/--channel-order applied."""
    data_cfg = dict(data_cfg)
    if getattr(args, 'mean', None):
        data_cfg['mean'] = tuple(args.mean)
    if getattr(args, 'std', None):
        if not all(s > 0 for s in args.std):
            raise UserError(f'--std {" ".join(map(str, args.std))}: must be positive')
        data_cfg['std'] = tuple(args.std)
    data_cfg['raw_pixels'] = bool(getattr(args, 'raw_pixels', False))
    data_cfg['channel_order'] = getattr(args, 'channel_order', 'rgb')
    return data_cfg


def create_model(args):
    import timm
    import timm_mobileone  # noqa: F401  (registers the mobileone_112 models)
    runtime, path = _artifact(args)
    if runtime and Path(path).is_file() and not getattr(args, 'raw_pixels', False):
        inside = formats.normalizes_inside(runtime, path)
        if inside:
            raise UserError(f'--artifact {path} normalizes its input inside its graph ({inside}): it takes 0..255 '
                            f'pixels; add --raw-pixels (and --channel-order bgr if it was exported for BGR)')
    if runtime:
        if not Path(path).is_file():
            raise UserError(f'{"--onnx" if args.onnx else "--artifact"} {path}: no such file')
        if args.checkpoint or args.pretrained:
            raise UserError('--artifact holds its weights: --checkpoint and --pretrained do not apply')
        return ArtifactModel(runtime, path, timm.create_model(args.model).pretrained_cfg)
    model = create_model_checked(args.model, args.pretrained, args.checkpoint)
    model.eval()
    if args.reparam:
        model = timm.utils.reparameterize_model(model)
    try:
        model = model.to(args.device)
    except (RuntimeError, AssertionError) as e:
        raise UserError(f'--device {args.device}: {e}') from None
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


@torch.no_grad()
def embed_batches(model, images: torch.utils.data.Dataset, name: str, data_cfg: Dict,
                  args) -> Iterator[Tuple[int, np.ndarray, Optional[np.ndarray], float]]:
    """Run the model over a dataset of (index, uint8 CHW RGB tensor, error message) items, in order.

    Yields (index of the batch's first image, (n, D) raw outputs, (n, D) raw outputs of the horizontal flips or None,
    forward seconds). The arrays are views that the next batch overwrites: copy what you keep. An item that carries an
    error message raises PackError with it. The tqdm bar (stderr, only on a terminal) counts images.
    """
    from tqdm import tqdm
    mean = torch.tensor(data_cfg['mean'], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(data_cfg['std'], dtype=torch.float32).view(1, 3, 1, 1)
    loader = torch.utils.data.DataLoader(images, batch_size=args.batch_size, shuffle=False,
                                         num_workers=args.workers, collate_fn=collate_images)
    device = torch.device(args.device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16 if device.type == 'cpu' else torch.float16) \
        if args.amp else nullcontext()
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    inputs = None
    done = 0
    show = args.progress and sys.stderr.isatty()
    bar = tqdm(total=len(images), desc=name, unit='img', disable=not show, file=sys.stderr)
    try:
        for _, batch, errors in loader:
            if errors:
                raise PackError(errors[0])
            n = len(batch)
            if inputs is None:
                # one input buffer, reused: fresh float copies of every batch fragment the heap when batches
                # arrive from workers through shared memory (RSS grew by 1.5 GB over an LFW-size pack)
                inputs = torch.empty((args.batch_size * (2 if args.flip else 1), *batch.shape[1:]))
                inputs = inputs.contiguous(memory_format=memory_format)
            views = inputs[:2 * n] if args.flip else inputs[:n]
            if data_cfg.get('channel_order', 'rgb') == 'bgr':
                batch = batch.flip(1)
            views[:n].copy_(batch)
            if args.flip:
                views[n:].copy_(batch.flip(3))
            if not data_cfg.get('raw_pixels'):
                # the cfg's normalization, in insightface's order: (x / 255 - mean) / std, float32
                views.div_(255).sub_(mean).div_(std)
            views = views.to(device)
            t0 = time.perf_counter()
            with amp:
                out = model(views)
            out = out.float().cpu()
            forward_s = time.perf_counter() - t0
            if out.ndim != 2:
                raise UserError(f'model {args.model!r} returns a {out.ndim}-D output; verification needs (B, D) '
                                f'embeddings (use num_classes=0 and a pooling head)')
            out = out.numpy()
            yield done, out[:n], (out[n:2 * n] if args.flip else None), forward_s
            done += n
            bar.update(n)
    finally:
        bar.close()


def embed(model, dataset: VerificationSet, data_cfg: Dict, args) -> Tuple[np.ndarray, Optional[np.ndarray], float]:
    """Raw model outputs of every image (and of its horizontal flip): ((2N, D), (2N, D) or None, forward seconds)."""
    input_size = tuple(data_cfg['input_size'][-2:])
    total = len(dataset.images)
    raw = raw_flip = None
    forward_s = 0.0
    for start, out, out_flip, seconds in embed_batches(model, PairImages(dataset, input_size), dataset.name,
                                                       data_cfg, args):
        if raw is None:
            # preallocated and filled by copy: keeping numpy views of each batch's output fragments the heap
            # (RSS grew by about a batch of inputs per batch, 1 GB over an LFW-size pack)
            raw = np.empty((total, out.shape[1]), dtype=np.float32)
            raw_flip = np.empty_like(raw) if out_flip is not None else None
        raw[start:start + len(out)] = out
        if out_flip is not None:
            raw_flip[start:start + len(out)] = out_flip
        forward_s += seconds
    return raw, raw_flip, forward_s


def resolve_folds(dataset: VerificationSet, num_folds: Optional[int]) -> Tuple[int, str]:
    """(fold count, where it came from): --num-folds, else the pairs.txt header, else insightface's 10."""
    if num_folds is not None:
        return num_folds, '--num-folds'
    if dataset.folds is not None:
        return dataset.folds, dataset.folds_from
    return 10, 'default (insightface)'


def score(dataset: VerificationSet, embeddings: np.ndarray, num_folds: int) -> Dict:
    if dataset.num_pairs < num_folds:
        raise UserError(f'{dataset.source}: {dataset.num_pairs} pairs cannot make {num_folds} folds '
                        f'(use --num-folds)')
    metrics = V.evaluate(embeddings, dataset.issame, num_folds=num_folds)
    # LFW's lists give each fold's same-person pairs before its different ones: over a subset (or the wrong fold
    # count) a cross-validation fold can hold one class, where a model without signal scores near 0, not 0.5
    single = sum(bool(dataset.issame[test].all() or not dataset.issame[test].any())
                 for _, test in V.fold_indices(dataset.num_pairs, num_folds))
    metrics['single_class_folds'] = single
    if single:
        _logger.warning(f'{dataset.name}: {single} of {num_folds} folds hold pairs of one class only (LFW lists a '
                        f'fold\'s same-person pairs first): the fold accuracy is not meaningful there, the AUC is; '
                        f'use the pairs.txt header\'s fold count (--num-folds)')
    return metrics


def _rounded(x):
    return None if x is None else round(float(x), 5)


def dataset_result(dataset: VerificationSet, metrics: Dict, xnorm: Optional[float], seconds: float,
                   images_per_s: Optional[float], folds: Tuple[int, str]) -> Dict:
    return dict(
        dataset=dataset.name,
        data=dataset.source,
        num_pairs=dataset.num_pairs,
        num_folds=folds[0],
        folds_from=folds[1],
        single_class_folds=metrics.get('single_class_folds', 0),
        accuracy=_rounded(metrics['accuracy']),
        accuracy_std=_rounded(metrics['accuracy_std']),
        accuracies=[_rounded(a) for a in metrics['accuracies']],
        thresholds=[round(t, 5) for t in metrics['thresholds']],
        tar_at_far=_rounded(metrics['tar_at_far']),
        tar_at_far_std=_rounded(metrics['tar_at_far_std']),
        far=_rounded(metrics['far']),
        far_target=metrics['far_target'],
        auc=_rounded(metrics['auc']),
        eer=_rounded(metrics.get('eer')),
        xnorm=None if xnorm is None else round(xnorm, 5),
        seconds=round(seconds, 3),
        images_per_second=None if images_per_s is None else round(images_per_s, 1),
    )


def _versions() -> Dict[str, str]:
    import timm
    import timm_mobileone
    return dict(timm_mobileone=timm_mobileone.__version__, timm=timm.__version__, torch=torch.__version__,
                numpy=np.__version__)


def _save_embeddings(path: str, name: str, embeddings: np.ndarray, several: bool) -> None:
    out = Path(path)
    if several:
        out = out.with_name(f'{out.stem}_{name}{out.suffix or ".npy"}')
    atomic_write(out, lambda f: np.save(f, embeddings))


def roc_figure():
    """(pyplot, figure, axes) for a ROC plot; UserError without matplotlib."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError('--plot needs matplotlib (pip install matplotlib)') from None
    fig, ax = plt.subplots(figsize=(5, 4.5))
    return plt, fig, ax


def save_roc(plt, fig, ax, path: str, xlim: Tuple[float, float], title: str) -> None:
    """Log-FAR axes, labels, legend, then write the ROC plot to `path`."""
    ax.set_xscale('log')
    ax.set_xlim(*xlim)
    ax.set_xlabel('false accept rate')
    ax.set_ylabel('true accept rate')
    ax.set_title(title)
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(loc='lower right', fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot(path: str, curves: List[Tuple[str, Dict]]) -> None:
    plt, fig, ax = roc_figure()
    for name, m in curves:
        ax.plot(m['fpr'], m['tpr'], label=f"{name} (acc {m['accuracy']:.4f})")
        if m['tar_at_far'] is not None:
            ax.scatter([m['far_target']], [m['tar_at_far']], marker='o', zorder=3)
            ax.annotate(f"TAR {m['tar_at_far']:.4f} @ FAR {m['far_target']:g}", (m['far_target'], m['tar_at_far']),
                        textcoords='offset points', xytext=(6, -12), fontsize=8)
    save_roc(plt, fig, ax, path, (1e-4, 1), 'ROC (10-fold mean)')


def run(args, datasets: List[VerificationSet], model: Optional[torch.nn.Module] = None) -> Dict:
    """Embed (or read) and score each dataset; the common part of the JSON result plus one entry per dataset.

    `model`: an already built model in eval mode, on `args.device` (training validation passes its fused copy);
    otherwise the model is created from the flags.
    """
    import timm
    t_start = time.perf_counter()
    results, curves = [], []
    data_cfg = None
    if args.embeddings:
        if len(args.embeddings) != len(datasets):
            raise UserError(f'{len(args.embeddings)} --embeddings files for {len(datasets)} datasets')
        model = None
    else:
        model = create_model(args) if model is None else model
        if isinstance(model, ArtifactModel):
            args.channels_last = False
            data_cfg = timm.data.resolve_data_config(pretrained_cfg=model.pretrained_cfg)
        else:
            data_cfg = timm.data.resolve_model_data_config(model)
        data_cfg = input_cfg(data_cfg, args)
    for i, ds in enumerate(datasets):
        t0 = time.perf_counter()
        if args.embeddings:
            raw = read_embeddings(args.embeddings[i], ds.num_pairs)
            embeddings, x_norm, images_per_s = V.l2_normalize(raw), V.xnorm(raw), None
        else:
            _logger.info(f'{ds.name}: embedding {len(ds.images)} images from {ds.source}')
            raw, raw_flip, forward_s = embed(model, ds, data_cfg, args)
            embeddings = V.combine_views(raw, raw_flip)
            x_norm = V.xnorm(raw, raw_flip) if raw_flip is not None else V.xnorm(raw)
            images_per_s = len(ds.images) / max(time.perf_counter() - t0, 1e-9)
        folds = resolve_folds(ds, args.num_folds)
        metrics = score(ds, embeddings, folds[0])
        if args.save_embeddings:
            _save_embeddings(args.save_embeddings, ds.name, embeddings, len(datasets) > 1)
        results.append(dataset_result(ds, metrics, x_norm, time.perf_counter() - t0, images_per_s, folds))
        curves.append((ds.name, metrics))
        _logger.info(f"{ds.name}: accuracy {metrics['accuracy']:.5f} +- {metrics['accuracy_std']:.5f}")
    if args.plot:
        _plot(args.plot, curves)
    runtime, artifact = _artifact(args)
    common = dict(
        model=args.model if not args.embeddings else None,
        tag=(model.pretrained_cfg.get('tag') if model is not None else None),
        onnx=args.onnx or None,
        runtime=runtime or ('pytorch' if not args.embeddings else None),
        artifact=artifact or None,
        checkpoint=args.checkpoint or None,
        embeddings=args.embeddings or None,
        flip=bool(args.flip and not args.embeddings),
        reparam=bool(args.reparam and not args.embeddings and not runtime),
        input_size=list(data_cfg['input_size']) if data_cfg else None,
        preprocessing=None if not data_cfg else dict(
            pixels='0..255' if data_cfg.get('raw_pixels') else 'normalized', mean=list(data_cfg['mean']),
            std=list(data_cfg['std']), channel_order=data_cfg.get('channel_order', 'rgb')),
        num_folds=results[0]['num_folds'] if len(results) == 1 else args.num_folds,
        command=args.command,
    )
    return dict(common=common, results=results, seconds=round(time.perf_counter() - t_start, 3),
                versions=_versions())


def finish(result: Dict, args, rows: List[Dict]) -> Dict:
    """Add the result schema's fields (`timm_mobileone.results`: `schema`, `rows`, `rerun`), then write the JSON
    object to --results-file and stdout."""
    result = dict(result, schema=R.SCHEMA, rows=rows, rerun=args.rerun)
    text = json.dumps(result)
    if args.results_file:
        atomic_write(args.results_file, lambda f: f.write((text + '\n').encode()))
    print(text)
    return result


# what the result's `rerun` leaves out (the model and its local weights, local outputs, saved inputs that stand for the
# model) and which flags it quotes by file name: see timm_mobileone.results
RERUN_DROP = ('-m', '--model', '--pretrained', '--checkpoint', '--results-file', '--save-embeddings',
              '--save-features', '--plot', '--embeddings', '--features', '--faceness', '--align-cache')
RERUN_PATHS = ('--data', '--data-dir', '--onnx', '--artifact', '--detector')


def parse(parser: argparse.ArgumentParser, argv: Optional[List[str]]):
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    args.command = f"{parser.prog} {shlex.join(argv)}".strip()
    args.rerun = dict(module=parser.prog.split()[-1], args=R.portable_args(parser, argv, RERUN_DROP, RERUN_PATHS))
    if args.verbose:
        logging.getLogger().setLevel(logging.INFO)
    if args.batch_size < 1:
        parser.error('--batch-size must be >= 1')
    if args.workers < 0:
        parser.error('--workers must be >= 0')
    if (getattr(args, 'num_folds', 2) or 2) < 2:
        parser.error('--num-folds must be >= 2')
    return args
