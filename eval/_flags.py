"""The eval CLIs' shared flags and their translation into `eval.api`'s types: flags -> spec -> API call -> result.

Flags follow timm's validate.py. stdout carries exactly one JSON object; progress (tqdm, counting images) and
status lines (logging) go to stderr. User mistakes exit with code 2 and one `error: ...` line, no traceback.
"""
import argparse
import logging
import shlex
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from timm_mobileone import results as R
from timm_mobileone.cli import cli  # noqa: F401  (the eval CLIs import cli and UserError from here)
from timm_mobileone.deploy import formats
from timm_mobileone.errors import UserError
from timm_mobileone.verification_data import VerificationSet

from . import api
from ._embed import DEFAULT_WORKERS
from ._model import DEFAULT_MODEL, check_artifact
from ._result import write_result

__all__ = ['DEFAULT_WORKERS', 'RERUN_DROP', 'RERUN_PATHS', 'UserError', 'add_model_flags', 'alignment',
           'artifact_flags', 'build_parser', 'cli', 'embed_options', 'finish', 'load_model', 'model_spec', 'parse',
           'resolve_data', 'verification']


def add_model_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags every embedding eval shares (model, runtime, batching, output), in timm's validate.py vocabulary."""
    parser.add_argument('-m', '--model', default=DEFAULT_MODEL,
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


# ----------------------------------------------------------------------------------------------------------------
# flags -> the API's types


def artifact_flags(args) -> Tuple[str, str]:
    """(runtime, path) of an exported model to evaluate, or ('', '') for the PyTorch model."""
    runtime, path = getattr(args, 'runtime', None) or '', getattr(args, 'artifact', '')
    if args.onnx:
        if runtime not in ('', 'onnx') or path:
            raise UserError('--onnx PATH is --runtime onnx --artifact PATH: give one or the other')
        return 'onnx', args.onnx
    if bool(runtime) != bool(path):
        raise UserError('--runtime and --artifact go together (e.g. --runtime executorch --artifact s0.pte)')
    return runtime, path


def model_spec(args) -> api.Spec:
    """The model the flags name: an ArtifactSpec (--onnx, --runtime/--artifact) or a ModelSpec."""
    runtime, path = artifact_flags(args)
    preprocessing = dict(mean=tuple(args.mean) if args.mean else None, std=tuple(args.std) if args.std else None,
                         raw_pixels=bool(args.raw_pixels), channel_order=args.channel_order)
    if runtime:
        spec = api.ArtifactSpec(path=path, runtime=runtime, model=args.model, via_onnx_flag=bool(args.onnx),
                                **preprocessing)
        if args.checkpoint or args.pretrained:
            check_artifact(spec)  # a missing or self-normalizing artifact is named first, as it always was
            raise UserError('--artifact holds its weights: --checkpoint and --pretrained do not apply')
        return spec
    return api.ModelSpec(model=args.model, checkpoint=args.checkpoint, pretrained=args.pretrained,
                         reparam=args.reparam, device=args.device, channels_last=args.channels_last, **preprocessing)


def load_model(args) -> api.Embedder:
    return api.load_model(model_spec(args))


def embed_options(args) -> api.EmbedOptions:
    return api.EmbedOptions(batch_size=args.batch_size, workers=args.workers, flip=args.flip, amp=args.amp,
                            progress=args.progress)


def alignment(args) -> api.Alignment:
    return api.Alignment(detector=args.detector, score_threshold=args.score_threshold, select=args.select,
                         min_side=args.min_side, max_side=args.max_side, fallback=args.fallback,
                         jpeg_quality=args.jpeg_quality, workers=args.align_workers,
                         cache=getattr(args, 'align_cache', ''), progress=args.progress)


def resolve_data(args, default_targets: Sequence[str]) -> List[VerificationSet]:
    """The sets --data names, or the --targets packs found in --data-dir."""
    paths = args.data or []
    if not paths:
        if not args.data_dir:
            raise UserError('give --data PATH (a .bin pack or an aligned folder) or --data-dir DIR')
        paths = api.find_packs(args.data_dir, [t.strip() for t in args.targets.split(',') if t.strip()])
    return api.load_datasets(paths, align=args.align, protocols=getattr(args, 'protocol', None),
                             alignment=alignment(args))


def verification(args, datasets: List[VerificationSet]) -> api.VerificationResult:
    """eval.lfw / cfp / verify: the flags' model (or --embeddings) on the sets, with the command line recorded."""
    if args.embeddings:
        result = api.verify_embeddings(args.embeddings, datasets, num_folds=args.num_folds,
                                       save_embeddings=args.save_embeddings, plot=args.plot)
        # model flags given beside --embeddings are recorded as given (they made no embedding)
        runtime, artifact = artifact_flags(args)
        result.setup.update(onnx=args.onnx or None, runtime=runtime or None, artifact=artifact or None,
                            checkpoint=args.checkpoint or None)
    else:
        t_start = time.perf_counter()
        result = api.verify(load_model(args), datasets, embed_options(args), num_folds=args.num_folds,
                            save_embeddings=args.save_embeddings, plot=args.plot)
        result.seconds = round(time.perf_counter() - t_start, 3)  # the command's time includes building the model
    result.command, result.rerun = args.command, args.rerun
    return result


def finish(result: Dict, args, rows: List[Dict]) -> Dict:
    """Add the result schema's fields (`timm_mobileone.results`: `schema`, `rows`, `rerun`), then write the JSON
    object to --results-file and stdout."""
    return write_result(dict(result, schema=R.SCHEMA, rows=rows, rerun=args.rerun), args.results_file)
