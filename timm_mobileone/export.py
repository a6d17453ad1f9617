"""Export of the fused (reparameterized) form to every deployment format: ONNX (+ INT8 QDQ), ExecuTorch (XNNPACK, FP32
/ INT8), Core ML, ncnn.

    python -m timm_mobileone.export --model NAME [--checkpoint CKPT | --pretrained] --format FMT --out PATH
        [--int8 --calib DIR|PACK] [--verbose]        # FMT: onnx, executorch (.pte), coreml (.mlpackage), ncnn (.param)
    python -m timm_mobileone.export --model mobileone_112_s0 --checkpoint CKPT --onnx s0.onnx [--opset 18]
        [--dynamic-batch] [--int8 --calib lfw.bin|DIR [--int8-onnx s0_int8.onnx]]     # --onnx P: --format onnx --out P

One pipeline for every format (timm_mobileone/deploy/formats.py holds one entry per format): fuse, export into a hidden
temporary folder beside `--out`, check the artifact (its ops: no BatchNorm, no Add of branches), run it in its
runtime here on held-out `--calib` crops (else 8 random inputs) one image at a time, compare with the PyTorch fused
model, and only then move it into place. An FP32 artifact must reach a cosine >= 0.99999 against PyTorch (what
verification uses) and a relative error <= 1e-3 (a bound float32 reordering cannot trip; conversion bugs do), else
the export fails and leaves no file. Every format reports the same keys: `path`, `files`, `size_bytes`, `runtime`,
`ran`, `precision`, `max_rel_err`, `min_cosine`, `mean_cosine` (null where the runtime does not run here: Core ML is
checked from its spec only, prediction needs macOS), plus the format's own facts (`ops`, `layers`, `delegates`).
ExecuTorch, Core ML and ncnn need `pip install "timm-mobileone[deploy]"`, ONNX `[onnx]`.

`--int8`: ONNX writes a second, statically quantized model (QDQ, per-channel int8 weights, uint8 activations, MinMax
calibration by default) beside the FP32 one and reports INT8 vs FP32 cosine on held-out crops and the latency
ratio under `int8`; ExecuTorch's program itself is INT8 (PT2E, XNNPACK quantizer), compared with FP32 PyTorch under
`int8_vs_fp32_cosine_*`; Core ML stores 8-bit weights; ncnn is refused. stdout carries one JSON object; user
mistakes exit with code 2 (`--int8` without the `--calib` it needs is refused before anything is written).
"""
import argparse
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

import timm
from timm.utils import reparameterize_model

from .checkpoints import create_model_checked
from .cli import cli
from .deploy import formats
from .deploy.formats import FORMATS
from .errors import UserError, first_line
from .verification_data import IMAGE_EXTS

_logger = logging.getLogger(__name__)

# FP32 acceptance, by what verification uses: the embedding's direction (cosine against PyTorch fused; what
# accuracy depends on) must hold to 1e-5, and the max error relative to the output's largest value must stay below a
# bound that float32 reordering cannot trip on a legitimate model (ncnn's and XNNPACK's kernels sum in other orders:
# up to 1.2e-4 measured on an S0 with BN calibrated on random batches) but any real conversion bug does (a dropped BN,
# a wrong padding or a flipped channel order: 1e-2 and far more)
FP32_MIN_COSINE = 0.99999
FP32_MAX_REL_ERR = 1e-3


def load_face_images(source: str, input_size: Sequence[int], mean: Sequence[float], std: Sequence[float],
                     limit: int) -> np.ndarray:
    """Up to `limit` aligned face crops from a folder (recursively) or an insightface pack, normalized, NCHW."""
    from .verification_data import PackError, PairImages, VerificationSet, list_images, load_pack
    path = Path(source)
    h, w = input_size[-2:]
    if path.is_dir():
        # eval's and train.face's lister: hidden files (an AppleDouble ._x.jpg) left out; on lfw_dev, train_faces
        # and a train.split folder it lists the same files in the same order as the sorted rglob it replaced
        files = [str(path / name) for name in list_images(path)]
        if not files:
            raise UserError(f'--calib {source}: no images ({", ".join(IMAGE_EXTS)}) in the folder')
        dataset = VerificationSet(name=path.name, source=str(path), issame=np.zeros(0, bool), images=files)
    elif path.is_file():
        try:
            dataset = load_pack(path)
        except PackError as e:
            raise UserError(str(e)) from None
    else:
        raise UserError(f'--calib {source}: no such file or folder')
    reader = PairImages(dataset, (h, w))
    out = []
    for i in range(min(limit, len(reader))):
        _, img, err = reader[i]
        if err:
            raise UserError(err)
        out.append(img.numpy())
    x = np.stack(out).astype(np.float32)
    mean = np.asarray(mean, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(std, np.float32).reshape(1, 3, 1, 1)
    return (x / 255 - mean) / std


def calib_and_heldout(source: str, cfg: Dict[str, Any], calib_images: int,
                      heldout_images: int) -> Tuple[np.ndarray, np.ndarray]:
    """The INT8 calibration crops and the held-out crops after them, from a folder or pack (normalized by `cfg`)."""
    images = load_face_images(source, cfg['input_size'], cfg['mean'], cfg['std'], calib_images + heldout_images)
    if len(images) <= calib_images:
        raise UserError(f'--calib {source}: {len(images)} images; need more than --calib-images '
                        f'({calib_images}) to keep some held out')
    return images[:calib_images], images[calib_images:]


def create_fused(args) -> Tuple[torch.nn.Module, bool]:
    """The fused model of `args.model` (+ checkpoint), cross-layer equalized when `--equalize` asks; (model,
    equalized)."""
    model = create_model_checked(args.model, args.pretrained, args.checkpoint)
    fused = reparameterize_model(model.eval())
    mode = getattr(args, 'equalize', 'off')
    if mode == 'on' or (mode == 'auto' and args.int8 and hasattr(fused, 'equalization_pairs')):
        from .deploy.quant import equalize
        if not hasattr(fused, 'equalization_pairs'):
            raise UserError(f'--equalize on: {args.model} lists no layer pairs to equalize')
        equalize(fused)
        return fused, True
    return fused, False


def compare(run: formats.Runner, fused: torch.nn.Module, images: np.ndarray) -> Dict[str, float]:
    """An artifact's outputs, one image at a time, vs the PyTorch fused model: max relative error (to the output's
    largest value, per image), min and mean cosine."""
    got = formats.run_each(run, images)
    with torch.no_grad():
        ref = fused(torch.from_numpy(images)).numpy()
    rel = max(float(np.abs(g - r).max() / max(np.abs(r).max(), 1e-12)) for g, r in zip(got, ref))
    cos = formats.cosine(got, ref)
    return dict(max_rel_err=rel, min_cosine=float(cos.min()), mean_cosine=float(cos.mean()))


def _move(src: Path, dst: Path) -> None:
    """Into place (same folder, so a rename); a folder artifact (.mlpackage) replaces an older one."""
    if src.is_dir() and dst.exists():
        shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
    os.replace(src, dst)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob('*') if p.is_file()) if path.is_dir() else path.stat().st_size


def check_flags(args, fmt: formats.Format) -> None:
    """What the format refuses or needs, before anything is built or written."""
    with formats.quiet(args.verbose):
        fmt.require()
    if args.int8 and not fmt.int8:
        raise UserError(f'--format {fmt.name} --int8: not supported ({fmt.int8_refusal})')
    if args.int8 and fmt.int8_needs_calib and not args.calib:
        raise UserError('--int8 needs --calib DIR_OR_PACK (aligned face images)')


def run(args) -> Dict[str, Any]:
    """Export `args.model` to `args.format` at `args.out`: export, check, run, compare, move (see the docstring)."""
    fmt = FORMATS[args.format]
    check_flags(args, fmt)
    fused, equalized = create_fused(args)
    cfg = timm.data.resolve_model_data_config(fused)
    if args.calib:
        calib, images = calib_and_heldout(args.calib, cfg, args.calib_images, args.heldout_images)
        inputs = f'{len(images)} held-out face crops from {args.calib}'
    else:
        calib = None
        images = torch.randn((8, *cfg['input_size']), generator=torch.Generator().manual_seed(0)).numpy()
        inputs = '8 random normal inputs (no --calib)'
    example = torch.from_numpy(images[:1].copy())
    int8_here = args.int8 and fmt.int8_beside is None  # ONNX keeps the FP32 file and writes the INT8 one beside
    opts = formats.ExportOptions(int8=int8_here, calib=calib, mean=cfg['mean'], std=cfg['std'], opset=args.opset,
                                 dynamic_batch=args.dynamic_batch, coreml_input=args.coreml_input,
                                 coreml_precision=args.coreml_precision, verbose=args.verbose)
    out = fmt.artifact_path(Path(args.out))
    out.parent.mkdir(parents=True, exist_ok=True)
    result: Dict[str, Any] = dict(model=args.model, checkpoint=args.checkpoint or None, format=fmt.name, path=str(out),
                                  input_size=list(cfg['input_size']), batch=1, inputs=inputs, equalized=equalized,
                                  runtime=fmt.runtime, ran=fmt.runner is not None,
                                  precision=fmt.precision[1] if int8_here else fmt.precision[0])
    with tempfile.TemporaryDirectory(dir=out.parent, prefix='.export-') as tmp:
        art = Path(tmp) / out.name
        try:
            with formats.quiet(args.verbose):
                result.update(fmt.export(fused, art, example, opts))
        except UserError:
            raise
        except Exception as e:  # a converter's own failure: one line, no file
            raise UserError(f'--format {fmt.name}: the converter failed ({type(e).__name__}: '
                            f'{first_line(e)[:300]})') from None
        checked = dict(max_rel_err=None, min_cosine=None, mean_cosine=None)
        if fmt.runner is not None:
            with formats.quiet(args.verbose):
                checked = compare(fmt.runner(str(art)), fused, images)
                for name, runner in fmt.extra_runs(str(art)).items():
                    result[name] = compare(runner, fused, images)
        result.update(checked)
        if int8_here:
            result.update(int8_vs_fp32_cosine_min=checked['min_cosine'],
                          int8_vs_fp32_cosine_mean=checked['mean_cosine'])
        elif fmt.runner is not None and not (checked['max_rel_err'] <= FP32_MAX_REL_ERR and
                                             checked['min_cosine'] >= FP32_MIN_COSINE):
            raise UserError(f'{out}: {fmt.runtime} output differs from PyTorch (relative error '
                            f'{checked["max_rel_err"]:.3g}, limit {FP32_MAX_REL_ERR:g}; cosine '
                            f'{checked["min_cosine"]:.6f}, limit {FP32_MIN_COSINE}); nothing written')
        files = fmt.files(art)
        for f in files:
            _move(f, out.parent / f.name)
        result['files'] = [str(out.parent / f.name) for f in files]
        result['size_bytes'] = sum(_size(out.parent / f.name) for f in files)
    if args.int8 and fmt.int8_beside is not None:
        int8_path = Path(args.int8_onnx or out.with_name(out.stem + '_int8' + out.suffix))
        reduce_range = None if args.reduce_range == 'auto' else args.reduce_range == 'on'
        result['int8'] = dict(fmt.int8_beside(out, int8_path, calib, images, args.calib_method, reduce_range),
                              calib=args.calib)
    return result


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='python -m timm_mobileone.export', description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('-m', '--model', required=True,
                        help="model: registry name (with .tag), 'hf-hub:ORG/NAME' or 'local-dir:DIR'")
    parser.add_argument('--pretrained', action='store_true', help='load the pretrained weights of --model')
    parser.add_argument('--checkpoint', default='', help='train-time checkpoint to load before fusing')
    parser.add_argument('--format', default='onnx', choices=list(FORMATS),
                        help=', '.join(f'{f.name} ({f.suffix})' for f in FORMATS.values()))
    parser.add_argument('--out', default='',
                        help='output path (the artifact of --format; ncnn: X or X.param writes X.param + X.bin)')
    parser.add_argument('--onnx', default='', help='output ONNX file (the fused FP32 model): --format onnx --out')
    parser.add_argument('--verbose', action='store_true', help='show the exporters\' progress lines on stderr')
    parser.add_argument('--coreml-input', default='image', choices=('image', 'tensor'),
                        help='Core ML input: an RGB image with the normalization folded in, or the normalized tensor')
    parser.add_argument('--coreml-precision', default='float16', choices=('float16', 'float32'),
                        help='Core ML compute precision')
    parser.add_argument('--opset', type=int, default=18, help='ONNX opset')
    parser.add_argument('--dynamic-batch', action='store_true', help='export with a dynamic batch dimension')
    parser.add_argument('--int8', action='store_true',
                        help='onnx: also write a statically quantized INT8 (QDQ) model; executorch: the .pte is INT8 '
                             '(PT2E, XNNPACK quantizer); coreml: 8-bit weights')
    parser.add_argument('--equalize', default='auto', choices=('auto', 'on', 'off'),
                        help='cross-layer equalization of the fused model before export: the same FP32 function '
                             'with per-channel ranges evened out, which per-tensor INT8 activations need '
                             '(timm_mobileone.deploy.quant); auto: on with --int8 for models that list their layer '
                             'pairs')
    parser.add_argument('--int8-onnx', default='', help='INT8 output file (default: <onnx stem>_int8.onnx)')
    parser.add_argument('--calib', default='', help='aligned face images for calibration: a folder or a .bin pack')
    parser.add_argument('--calib-images', type=int, default=200, help='images used to calibrate')
    parser.add_argument('--heldout-images', type=int, default=100, help='further images to compare INT8 vs FP32')
    parser.add_argument('--calib-method', default='minmax', choices=('minmax', 'percentile', 'entropy'),
                        help='activation range calibration')
    parser.add_argument('--reduce-range', default='auto', choices=('auto', 'on', 'off'),
                        help='7-bit weights (ONNX Runtime\'s remedy for uint8 x int8 saturation on x86-64 CPUs '
                             'without VNNI); auto: on exactly there')
    args = parser.parse_args(argv)
    if args.calib_images < 1 or args.heldout_images < 1:
        parser.error('--calib-images and --heldout-images must be >= 1')
    if args.onnx and args.out and args.format == 'onnx' and args.onnx != args.out:
        parser.error('--onnx and --out name two files; give one')
    if args.format == 'onnx':
        args.out = args.onnx = args.onnx or args.out
        if not args.onnx:
            parser.error('the output file is required: --out PATH (or --onnx PATH)')
    elif not args.out:
        parser.error(f'--format {args.format} needs --out PATH')
    return args


@cli
def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    result = run(args)
    result['command'] = 'python -m timm_mobileone.export ' + shlex.join(sys.argv[1:] if argv is None else argv)
    print(json.dumps(result))
    return result


if __name__ == '__main__':
    main()
