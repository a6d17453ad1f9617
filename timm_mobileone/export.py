"""Export of the fused (reparameterized) form: ONNX (+ INT8 QDQ), ExecuTorch (XNNPACK, FP32 / INT8), Core ML, ncnn.

    python -m timm_mobileone.export --model mobileone_112_s0 --checkpoint CKPT --onnx s0.onnx [--opset 18]
        [--dynamic-batch] [--int8 --calib lfw.bin|DIR [--int8-onnx s0_int8.onnx]]
    python -m timm_mobileone.export --model NAME [--checkpoint CKPT | --pretrained] --format FMT --out PATH
        [--int8 --calib DIR|PACK] [--verbose]        # FMT: onnx, executorch (.pte), coreml (.mlpackage), ncnn (.param)

ExecuTorch, Core ML and ncnn need `pip install "timm-mobileone[deploy]"`; what each does is in deploy.py. Every
format fuses first, checks the artifact (its ops, where the format allows), runs it where its runtime runs here
(ExecuTorch and ncnn: on held-out `--calib` crops, else on random inputs) and compares it with the PyTorch fused
model: FP32 must reach a cosine >= 0.99999 (what verification uses) and a relative error <= 1e-3 (a bound float32
reordering cannot trip; conversion bugs do), else the export fails and leaves no file; the JSON reports both.
Core ML is checked from its spec only (prediction needs macOS). The exporters' progress lines go nowhere unless
`--verbose`.

The exported graph holds only Conv, Relu, the SE ops of S4 (ReduceMean, Sigmoid, Mul), Reshape/Flatten and Gemm:
no BatchNormalization, no Add of branches (checked on every export). ONNX Runtime's output is compared with the
PyTorch fused model's (the same two bounds), else the export fails and the file is removed.

`--int8` writes a statically quantized model (onnxruntime.quantization: QDQ format, per-channel int8 weights, uint8
activations, MinMax calibration by default) calibrated on aligned face images from a folder or an insightface
`.bin` pack, and reports the cosine similarity of INT8 vs FP32 embeddings on held-out images (images never seen by
the calibration) and the latency ratio at batch 1. stdout carries one JSON object; user mistakes exit with code 2.
"""
import argparse
import contextlib
import io
import os
import shutil
import json
import logging
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

import timm
from timm.utils import reparameterize_model

from .data import IMAGE_EXTS
from ._io import ModelLoadError, atomic_write, create_model_checked
from .deploy import FORMATS
from .profile import median_seconds

_logger = logging.getLogger(__name__)

ALLOWED_OPS = {'Conv', 'Relu', 'Flatten', 'Reshape', 'Gemm', 'MatMul',  # every variant
               'GlobalAveragePool', 'ReduceMean', 'Sigmoid', 'Mul'}  # the SE blocks of S4
# FP32 acceptance, by what verification uses: the embedding's direction (cosine against PyTorch fused; what
# accuracy depends on) must hold to 1e-5, and the max error relative to the output's largest value must stay below a
# bound that float32 reordering cannot trip on a legitimate model (ncnn's and XNNPACK's kernels sum in other orders:
# up to 1.2e-4 measured on an S0 with BN calibrated on random batches) but any real conversion bug does (a dropped BN,
# a wrong padding or a flipped channel order: 1e-2 and far more)
FP32_MIN_COSINE = 0.99999
FP32_MAX_REL_ERR = 1e-3


class ExportError(Exception):
    """A user mistake or an export that fails its checks: one line, exit code 2."""


def onnx_ops(path: str) -> List[str]:
    import onnx
    return sorted({n.op_type for n in onnx.load(path, load_external_data=False).graph.node})


def export_onnx(model: torch.nn.Module, path: str, opset: int = 18, dynamic_batch: bool = False,
                verbose: bool = False) -> None:
    """torch.onnx's exporter on the fused model; its progress lines (`[torch.onnx] ...`) go to stderr with
    `verbose`, else nowhere (stdout is the JSON result)."""
    input_size = tuple(model.pretrained_cfg['input_size'])
    x = torch.randn(1, *input_size)
    kwargs: Dict[str, Any] = dict(dynamo=True, opset_version=opset, input_names=['input'], output_names=['output'],
                                  external_data=False)  # one self-contained file (these models are small)
    if dynamic_batch:
        kwargs['dynamic_shapes'] = {'x': {0: torch.export.Dim('batch', min=1, max=4096)}}
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_file = Path(tmp) / out.name
        with contextlib.redirect_stdout(sys.stderr if verbose else io.StringIO()):
            torch.onnx.export(model.eval(), (x,), str(tmp_file), **kwargs)
        atomic_write(out, lambda f: f.write(tmp_file.read_bytes()))


def ort_session(path: str, threads: int = 0):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(path, sess_options=opts, providers=['CPUExecutionProvider'])


def ort_run(session, x: np.ndarray) -> np.ndarray:
    return session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(x, dtype=np.float32)})[0]


def load_face_images(source: str, input_size: Sequence[int], mean: Sequence[float], std: Sequence[float],
                     limit: int) -> np.ndarray:
    """Up to `limit` aligned face crops from a folder (recursively) or an insightface pack, normalized, NCHW."""
    from .data import PackError, PairImages, VerificationSet, load_pack
    path = Path(source)
    h, w = input_size[-2:]
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob('*') if p.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise ExportError(f'--calib {source}: no images ({", ".join(IMAGE_EXTS)}) in the folder')
        dataset = VerificationSet(name=path.name, source=str(path), issame=np.zeros(0, bool), images=files)
    elif path.is_file():
        try:
            dataset = load_pack(path)
        except PackError as e:
            raise ExportError(str(e)) from None
    else:
        raise ExportError(f'--calib {source}: no such file or folder')
    reader = PairImages(dataset, (h, w))
    out = []
    for i in range(min(limit, len(reader))):
        _, img, err = reader[i]
        if err:
            raise ExportError(err)
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
        raise ExportError(f'--calib {source}: {len(images)} images; need more than --calib-images '
                          f'({calib_images}) to keep some held out')
    return images[:calib_images], images[calib_images:]


def ort_run_each(session, images: np.ndarray) -> np.ndarray:
    """`session`'s outputs for `images`, one image per run (INT8 models are exported at batch 1)."""
    from .deploy import run_each
    return run_each(lambda x: ort_run(session, x), images)


def cpu_saturates_u8s8() -> bool:
    """Whether ONNX Runtime's uint8 x int8 kernels on this CPU may saturate: x86-64 without VNNI.

    Without VNNI, ORT multiplies uint8 activations by int8 weights with VPMADDUBSW, whose int16 pair sums saturate
    (ORT's quantization docs); its remedy is `reduce_range` (7-bit weights). Measured on an AVX2 AMD EPYC: a
    fresh-init S0 gave INT8 vs FP32 cosine 0.933 with full-range weights, >= 0.99 with reduce_range.
    """
    import platform
    if platform.machine().lower() not in ('x86_64', 'amd64'):
        return False
    try:
        flags = Path('/proc/cpuinfo').read_text()
    except OSError:
        return False
    return 'vnni' not in flags


def quantize_int8(fp32_path: str, int8_path: str, calib: np.ndarray, method: str = 'minmax',
                  reduce_range: bool = False) -> None:
    """Static QDQ quantization: per-channel int8 weights (7-bit with `reduce_range`), uint8 activations,
    calibrated on `calib` images."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, \
        quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self, images: np.ndarray, name: str):
            self.batches = iter([{name: images[i:i + 1]} for i in range(len(images))])

        def get_next(self):
            return next(self.batches, None)

    methods = dict(minmax=CalibrationMethod.MinMax, percentile=CalibrationMethod.Percentile,
                   entropy=CalibrationMethod.Entropy)
    input_name = ort_session(fp32_path).get_inputs()[0].name
    out = Path(int8_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        pre = Path(tmp) / 'pre.onnx'
        quant_pre_process(fp32_path, str(pre), skip_symbolic_shape=True)
        q = Path(tmp) / out.name
        with contextlib.redirect_stdout(sys.stderr):
            quantize_static(str(pre), str(q), Reader(calib, input_name), quant_format=QuantFormat.QDQ,
                            per_channel=True, reduce_range=reduce_range, weight_type=QuantType.QInt8,
                            activation_type=QuantType.QUInt8,
                            calibrate_method=methods[method])
        atomic_write(out, lambda f: f.write(q.read_bytes()))


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.sum(a * b, axis=1)


def create_fused(args) -> torch.nn.Module:
    try:
        model = create_model_checked(args.model, args.pretrained, args.checkpoint)
    except ModelLoadError as e:
        raise ExportError(str(e)) from None
    fused = reparameterize_model(model.eval())
    mode = getattr(args, 'equalize', 'off')
    if mode == 'on' or (mode == 'auto' and args.int8 and hasattr(fused, 'equalization_pairs')):
        from .quant import equalize
        if not hasattr(fused, 'equalization_pairs'):
            raise ExportError(f'--equalize on: {args.model} lists no layer pairs to equalize')
        equalize(fused)
        args.equalized = True
    return fused


def _compare(run_one, fused: torch.nn.Module, images: np.ndarray) -> Tuple[float, float, float]:
    """(max relative error, min cosine, mean cosine) of an artifact's outputs, one image at a time, vs the PyTorch
    fused model."""
    from .deploy import run_each
    got = run_each(run_one, images)
    with torch.no_grad():
        ref = fused(torch.from_numpy(images)).numpy()
    rel = max(float(np.abs(g - r).max() / max(np.abs(r).max(), 1e-12)) for g, r in zip(got, ref))
    cos = cosine(got, ref)
    return rel, float(cos.min()), float(cos.mean())


def _run_artifact(deploy, fmt: str, art: Path, fused: torch.nn.Module, images: np.ndarray):
    """[(max relative error, min cosine, mean cosine)] of the artifact in its runtime here (ncnn: fp32, then its
    fp16 default)."""
    if fmt == 'executorch':
        return [_compare(deploy.executorch_runner(str(art)), fused, images)]
    if fmt == 'ncnn':
        return [_compare(deploy.ncnn_runner(str(art), fp16=fp16), fused, images) for fp16 in (False, True)]
    return []


def _move(src: Path, dst: Path) -> None:
    """Into place (same folder, so a rename); a folder artifact (.mlpackage) replaces an older one."""
    if src.is_dir() and dst.exists():
        shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
    os.replace(src, dst)


def run_deploy(args, fused: torch.nn.Module, cfg: Dict[str, Any]) -> Dict[str, Any]:
    """--format executorch | coreml | ncnn: export into a temporary folder, check, run, compare, then move."""
    from . import deploy
    fmt, out = args.format, Path(args.out)
    with deploy.quiet(args.verbose):
        deploy.require(fmt)
    if args.int8 and fmt == 'ncnn':
        raise ExportError('--format ncnn --int8: not supported (ncnn\'s INT8 needs its own calibration table tool, '
                          'ncnn2table); export FP32')
    if args.int8 and fmt == 'executorch' and not args.calib:
        raise ExportError('--int8 needs --calib DIR_OR_PACK (aligned face images)')
    if args.calib:
        calib, images = calib_and_heldout(args.calib, cfg, args.calib_images, args.heldout_images)
        inputs = f'{len(images)} held-out face crops from {args.calib}'
    else:
        calib = None
        images = torch.randn((8, *cfg['input_size']), generator=torch.Generator().manual_seed(0)).numpy()
        inputs = '8 random normal inputs (no --calib)'
    example = torch.from_numpy(images[:1].copy())
    out.parent.mkdir(parents=True, exist_ok=True)
    result: Dict[str, Any] = dict(model=args.model, checkpoint=args.checkpoint or None, format=fmt, path=str(out),
                                  input_size=list(cfg['input_size']), batch=1, inputs=inputs)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix='.export-') as tmp:
        art = Path(tmp) / out.name
        try:
            with deploy.quiet(args.verbose):
                if fmt == 'executorch':
                    result.update(deploy.export_executorch(fused, art, example, calib if args.int8 else None))
                elif fmt == 'ncnn':
                    result.update(deploy.export_ncnn(fused, art, example))
                else:
                    result.update(deploy.export_coreml(fused, art, example, cfg['mean'], cfg['std'],
                                                       args.coreml_input, args.coreml_precision, args.int8))
        except deploy.DeployError:
            raise
        except Exception as e:  # a converter's own failure: one line, no file
            raise ExportError(f'--format {fmt}: the converter failed ({type(e).__name__}: '
                              f'{(str(e).strip().splitlines() or [""])[0][:300]})') from None
        with deploy.quiet(args.verbose):
            compared = _run_artifact(deploy, fmt, art, fused, images)
        if fmt == 'executorch':
            rel, cos, cos_mean = compared[0]
            result.update(runtime='ExecuTorch (Python runtime, XNNPACK delegate)', ran=True,
                          precision='int8 weights and activations (PT2E, XNNPACK quantizer, per-channel)'
                          if args.int8 else 'fp32 (XNNPACK fp32 kernels)')
        elif fmt == 'ncnn':
            (rel, cos, cos_mean), (rel16, cos16, _) = compared
            result.update(runtime='ncnn (Python bindings)', ran=True, precision='fp32 weights; checked with ncnn\'s '
                          'fp16/bf16 storage and arithmetic off (set opt.use_fp16_* = false in the app)',
                          fp16_runtime=dict(max_rel_err=rel16, min_cosine=cos16))
        else:
            rel = cos = cos_mean = None
            result.update(runtime='Core ML', ran=False)
        result.update(max_rel_err=rel, min_cosine=cos)
        if args.int8:
            result.update(int8_vs_fp32_cosine_min=cos, int8_vs_fp32_cosine_mean=cos_mean)
        elif rel is not None and not (rel <= FP32_MAX_REL_ERR and cos >= FP32_MIN_COSINE):
            raise ExportError(f'{out}: {result["runtime"]} output differs from PyTorch (relative error {rel:.3g}, '
                              f'limit {FP32_MAX_REL_ERR:g}; cosine {cos:.6f}, limit {FP32_MIN_COSINE}); '
                              f'nothing written')
        files = [art] + ([art.with_suffix('.bin')] if fmt == 'ncnn' else [])
        for f in files:
            _move(f, out.parent / f.name)
        result['files'] = [str(out.parent / f.name) for f in files]
        result['size_bytes'] = sum(_size(out.parent / f.name) for f in files)
    return result


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob('*') if p.is_file()) if path.is_dir() else path.stat().st_size


def run(args) -> Dict[str, Any]:
    if args.int8 and not args.calib and args.format in ('onnx', 'executorch'):  # before anything is written
        raise ExportError('--int8 needs --calib DIR_OR_PACK (aligned face images)')
    fused = create_fused(args)
    cfg = timm.data.resolve_model_data_config(fused)
    if args.format != 'onnx':
        return run_deploy(args, fused, cfg)
    export_onnx(fused, args.onnx, args.opset, args.dynamic_batch, args.verbose)
    ops = onnx_ops(args.onnx)
    allowed = getattr(fused, 'deploy_onnx_ops', ALLOWED_OPS)  # a family with adds and PReLU (MobileFaceNet) says so
    bad = sorted(set(ops) - allowed)
    if bad:
        raise ExportError(f'{args.onnx}: the fused graph holds {", ".join(bad)} (expected only '
                          f'{", ".join(sorted(allowed))}); reparameterization is incomplete')
    session = ort_session(args.onnx)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2 if args.dynamic_batch else 1, *cfg['input_size']), generator=g)
    with torch.no_grad():
        ref = fused(x).numpy()
    got = ort_run(session, x.numpy())
    err = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12))
    cos = float(cosine(got, ref).min())
    if not (err <= FP32_MAX_REL_ERR and cos >= FP32_MIN_COSINE):
        Path(args.onnx).unlink(missing_ok=True)
        raise ExportError(f'{args.onnx}: ONNX Runtime output differs from PyTorch (relative error {err:.3g}, limit '
                          f'{FP32_MAX_REL_ERR:g}; cosine {cos:.6f}, limit {FP32_MIN_COSINE}); nothing written')
    result: Dict[str, Any] = dict(model=args.model, checkpoint=args.checkpoint or None, format='onnx', onnx=args.onnx,
                                  path=args.onnx, size_bytes=Path(args.onnx).stat().st_size,
                                  opset=args.opset, dynamic_batch=args.dynamic_batch, ops=ops,
                                  ort_rel_err=err, ort_cosine_min=cos, input_size=list(cfg['input_size']))
    if args.int8:
        if not args.calib:
            raise ExportError('--int8 needs --calib DIR_OR_PACK (aligned face images)')
        calib, heldout = calib_and_heldout(args.calib, cfg, args.calib_images, args.heldout_images)
        int8_path = args.int8_onnx or str(Path(args.onnx).with_name(Path(args.onnx).stem + '_int8.onnx'))
        reduce_range = cpu_saturates_u8s8() if args.reduce_range == 'auto' else args.reduce_range == 'on'
        quantize_int8(args.onnx, int8_path, calib, args.calib_method, reduce_range)
        q_session = ort_session(int8_path)
        cos = cosine(ort_run_each(q_session, heldout), ort_run_each(session, heldout))
        lat_fp32 = median_seconds(lambda: ort_run(session, heldout[:1]), 20)
        lat_int8 = median_seconds(lambda: ort_run(q_session, heldout[:1]), 20)
        result['int8'] = dict(
            onnx=int8_path, calib=args.calib, calib_images=len(calib), heldout_images=len(heldout),
            calib_method=args.calib_method, reduce_range=reduce_range,
            cosine_mean=float(cos.mean()), cosine_min=float(cos.min()),
            latency_ms_fp32=lat_fp32 * 1e3, latency_ms_int8=lat_int8 * 1e3, latency_ratio=lat_int8 / lat_fp32,
            ops=onnx_ops(int8_path))
    return result


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='python -m timm_mobileone.export', description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('-m', '--model', required=True,
                        help="model: registry name (with .tag), 'hf-hub:ORG/NAME' or 'local-dir:DIR'")
    parser.add_argument('--pretrained', action='store_true', help='load the pretrained weights of --model')
    parser.add_argument('--checkpoint', default='', help='train-time checkpoint to load before fusing')
    parser.add_argument('--format', default='onnx', choices=FORMATS,
                        help='onnx (.onnx), executorch (.pte, XNNPACK), coreml (.mlpackage), ncnn (.param + .bin)')
    parser.add_argument('--out', default='', help='output path (the artifact of --format)')
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
                             '(timm_mobileone.quant); auto: on with --int8 for models that list their layer pairs')
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
        args.onnx = args.onnx or args.out
        if not args.onnx:
            parser.error('the output file is required: --out PATH (or --onnx PATH)')
    elif not args.out:
        parser.error(f'--format {args.format} needs --out PATH')
    return args


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    from .deploy import DeployError
    args = parse_args(argv)
    if args.format == 'onnx':
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError:
            print('error: ONNX export needs onnx and onnxruntime: pip install "timm-mobileone[onnx]"', file=sys.stderr)
            raise SystemExit(2) from None
    try:
        result = run(args)
    except (ExportError, DeployError) as e:
        print(f'error: {e}', file=sys.stderr)
        raise SystemExit(2) from None
    result['equalized'] = bool(getattr(args, 'equalized', False))
    result['command'] = 'python -m timm_mobileone.export ' + shlex.join(sys.argv[1:] if argv is None else argv)
    print(json.dumps(result))
    return result


if __name__ == '__main__':
    main()
