"""Every deployment format of the fused model, one registry entry each: ONNX, ExecuTorch, Core ML, ncnn.

An entry (`Format`) says what the format is called (`--format` of the export, `--runtime` of eval), its file
suffix, the modules it needs and the extra that installs them, how it exports, how it runs here (a `Runner`: a
(B, 3, H, W) float32 array, normalized as the model expects, to its (B, D) embedding; None where no runtime runs
here), what `--int8` means for it, and which precisions the deploy table times. `timm_mobileone.export` (one
pipeline: export into a temporary folder, check, run, compare, move into place), `eval --runtime`, the deploy table
(`python -m timm_mobileone --runtimes`) and `benchmarks/deploy_check.py` all dispatch through `FORMATS`: a new
runtime is one entry here (its exporter and runner functions above it) plus its tests.

- ONNX: torch.onnx's dynamo exporter (one self-contained file), run with ONNX Runtime on the CPU. The graph must hold
  only the fused ops (no BatchNormalization, no Add of branches). `--int8` writes a second, statically quantized
  QDQ model beside the FP32 one (onnxruntime.quantization; per-channel int8 weights, uint8 activations).
- ExecuTorch: `torch.export` of the fused model, lowered to the XNNPACK backend (`to_edge_transform_and_lower`
  with `XnnpackPartitioner`), a `.pte` program. INT8: PT2E static quantization with ExecuTorch's XNNPACK
  quantizer (symmetric, per-channel weights), calibrated on face crops, then lowered. Run here with ExecuTorch's
  Python runtime. Batch 1 (the shape is fixed at export).
- ncnn: pnnx (TorchScript trace -> pnnx -> ncnn `.param` + `.bin`). pnnx stores ncnn weights as fp16 by default,
  which costs a calibrated S0 a relative error of ~6e-4 (and a chaotic random-init model a cosine of 0.993): the
  export writes fp32 weights (`fp16=False`). ncnn's runtime also computes in fp16 by default on CPUs that have it
  (`opt.use_fp16_storage` / `use_fp16_arithmetic`); the check runs with those off and reports the fp16 runtime's
  error beside it. Run here with ncnn's Python bindings.
- Core ML: coremltools' converter on the `torch.export` program, an ML program (`.mlpackage`, a folder), FLOAT16
  compute precision by default. Input: an image by default (`ct.ImageType`, RGB, the model's mean/std folded in as
  Core ML's scale and bias, so an app hands the aligned 112x112 crop's pixel buffer straight to the model, as
  Vision does); `tensor` takes the normalized float array instead. `--int8` quantizes the weights to 8 bits
  (linear symmetric). Prediction needs macOS: here the spec is checked (input/output, op types) and nothing is run.
"""
import contextlib
import importlib
import io
import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import UserError, first_line
from ..files import atomic_write

DEPLOY_EXTRA = 'pip install "timm-mobileone[deploy]"'
ONNX_EXTRA = 'pip install "timm-mobileone[onnx]"'

Runner = Callable[[np.ndarray], np.ndarray]


@dataclass
class ExportOptions:
    """What an exporter may need beyond the fused model, the path and an example input (batch 1)."""
    int8: bool = False
    calib: Optional[np.ndarray] = None  # normalized crops an INT8 export calibrates on
    mean: Sequence[float] = (0.5, 0.5, 0.5)
    std: Sequence[float] = (0.5, 0.5, 0.5)
    opset: int = 18  # ONNX
    dynamic_batch: bool = False  # ONNX
    coreml_input: str = 'image'
    coreml_precision: str = 'float16'
    verbose: bool = False


@dataclass(frozen=True)
class Format:
    """One deployment format: see the module docstring."""
    name: str  # --format of the export, --runtime of eval
    suffix: str
    runtime: str  # what runs it here, as the JSON's `runtime` and the tables say
    requires: Tuple[str, ...]  # modules needed to export it (and run it here)
    extra: str  # the pip command that installs them
    export: Callable[..., Dict[str, Any]]  # (fused, path, example, ExportOptions) -> facts for the JSON
    runner: Optional[Callable[..., Runner]]  # (path) -> Runner; None: not runnable here
    precision: Tuple[str, str]  # (FP32 label, INT8 label) for the JSON's `precision`
    int8: str = ''  # what --int8 does ('' : refused, with `int8_refusal`)
    int8_refusal: str = ''
    int8_needs_calib: bool = True  # static activation ranges need face crops (Core ML's weight-only INT8 does not)
    int8_beside: Optional[Callable[..., Dict[str, Any]]] = None  # ONNX: writes a second, INT8 file beside the FP32
    companions: Tuple[str, ...] = ()  # suffixes of files written beside the artifact (ncnn: .bin)
    timed: Tuple[str, ...] = ()  # the deploy table's columns: 'fp32', 'int8'
    extra_runs: Callable[[str], Dict[str, Runner]] = field(default=lambda path: {})  # more runtime settings to report
    input_normalization: Callable[[str], str] = field(default=lambda path: '')  # see normalizes_inside

    def require(self, flag: str = '--format') -> None:
        """UserError naming the extra when a module the format needs is not installed."""
        for name in self.requires:
            try:
                with quiet():
                    importlib.import_module(name)
            except ImportError:
                raise UserError(f'{flag} {self.name} needs {name}, which is not installed: {self.extra}') from None

    def files(self, path: Path) -> List[Path]:
        return [path] + [path.with_suffix(s) for s in self.companions]

    def artifact_path(self, out: Path) -> Path:
        """The artifact's path for `--out`: a format that writes several files names them all from `--out`, with or
        without its suffix (ncnn: `--out X`, `X.param` and `X.bin` each write `X.param` + `X.bin`)."""
        if not self.companions or out.suffix == self.suffix:
            return out
        if out.suffix in self.companions:
            return out.with_suffix(self.suffix)
        return out.with_name(out.name + self.suffix)

    def column(self, precision: str) -> str:
        """The deploy table's column id (`<format>_<precision>`) and label."""
        return f'{self.name}_{precision}'

    def label(self, precision: str) -> str:
        return f'{self.runtime} {precision.upper()}'


def run_each(run_one: Runner, images: np.ndarray) -> np.ndarray:
    """`run_one`'s outputs for `images`, one image per call (artifacts exported at batch 1)."""
    return np.concatenate([run_one(images[i:i + 1]) for i in range(len(images))])


@contextlib.contextmanager
def quiet(verbose: bool = False):
    """Silence the converters and runtimes (Python prints and their C++ parts' writes to fds 1 and 2) unless
    `verbose`: stdout carries the one JSON result, and their progress lines are no use to a user."""
    if verbose:
        with contextlib.redirect_stdout(sys.stderr):
            yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


@contextlib.contextmanager
def converter_logs_quiet(verbose: bool = False, names: Sequence[str] = ('onnx_ir', 'onnxscript', 'torch.onnx')):
    """Hold the ONNX converters' loggers at WARNING unless `verbose`: a CLI that logs at INFO (train.compare_blocks)
    would otherwise print their per-pass lines ("unused_removal: Removed 1 unused nodes")."""
    loggers = [logging.getLogger(n) for n in names]
    saved = [lg.level for lg in loggers]
    if not verbose:
        for lg in loggers:
            lg.setLevel(max(lg.level, logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, saved):
            lg.setLevel(level)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two (N, D) embedding arrays: what verification compares."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.sum(a * b, axis=1)


# ----------------------------------------------------------------------------------------------------------------
# ONNX (ONNX Runtime)

ALLOWED_ONNX_OPS = {'Conv', 'Relu', 'Flatten', 'Reshape', 'Gemm', 'MatMul',  # every variant
                    'GlobalAveragePool', 'ReduceMean', 'Sigmoid', 'Mul'}  # the SE blocks of S4


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
        with contextlib.redirect_stdout(sys.stderr if verbose else io.StringIO()), converter_logs_quiet(verbose):
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


def _export_onnx_format(fused: torch.nn.Module, path: Path, example: torch.Tensor,
                        opts: ExportOptions) -> Dict[str, Any]:
    fused.pretrained_cfg = dict(getattr(fused, 'pretrained_cfg', {}), input_size=tuple(example.shape[1:]))
    export_onnx(fused, str(path), opts.opset, opts.dynamic_batch, opts.verbose)
    ops = onnx_ops(str(path))
    allowed = getattr(fused, 'deploy_onnx_ops', ALLOWED_ONNX_OPS)  # a family with adds and PReLU says so
    bad = sorted(set(ops) - allowed)
    if bad:
        raise UserError(f'{path.name}: the fused graph holds {", ".join(bad)} (expected only '
                        f'{", ".join(sorted(allowed))}); reparameterization is incomplete')
    if opts.dynamic_batch:  # the dynamic batch dimension really takes another batch size
        ort_run(ort_session(str(path)), np.concatenate([example.numpy()] * 2))
    return dict(ops=ops, opset=opts.opset, dynamic_batch=opts.dynamic_batch)


def onnx_runner(path: str, threads: int = 0) -> Runner:
    """ONNX Runtime on the CPU; a graph exported at a fixed batch size is fed in chunks of it."""
    try:
        session = ort_session(path, threads)
    except Exception as e:  # ORT raises its own Fail / InvalidGraph / NoSuchFile types
        raise UserError(f'{path}: ONNX Runtime cannot load it ({first_line(e)})') from None
    batch = session.get_inputs()[0].shape[0]
    fixed = batch if isinstance(batch, int) else None

    def run(x: np.ndarray) -> np.ndarray:
        step = fixed or len(x)
        return np.concatenate([ort_run(session, x[i:i + step]) for i in range(0, len(x), step)])
    return run


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
        with converter_logs_quiet():
            quant_pre_process(fp32_path, str(pre), skip_symbolic_shape=True)
        q = Path(tmp) / out.name
        with contextlib.redirect_stdout(sys.stderr), converter_logs_quiet():
            quantize_static(str(pre), str(q), Reader(calib, input_name), quant_format=QuantFormat.QDQ,
                            per_channel=True, reduce_range=reduce_range, weight_type=QuantType.QInt8,
                            activation_type=QuantType.QUInt8,
                            calibrate_method=methods[method])
        atomic_write(out, lambda f: f.write(q.read_bytes()))


def onnx_int8_beside(fp32_path: Path, int8_path: Path, calib: np.ndarray, heldout: np.ndarray, method: str = 'minmax',
                     reduce_range: Optional[bool] = None) -> Dict[str, Any]:
    """Quantize the FP32 `.onnx` into `int8_path` (QDQ) and report INT8 vs FP32 on the held-out crops: cosine of the
    embeddings and the batch-1 latency ratio (sequential medians of 20 runs each)."""
    from .profile import median_seconds
    reduce_range = cpu_saturates_u8s8() if reduce_range is None else reduce_range
    quantize_int8(str(fp32_path), str(int8_path), calib, method, reduce_range)
    fp32, int8 = ort_session(str(fp32_path)), ort_session(str(int8_path))
    a, b = run_each(lambda x: ort_run(int8, x), heldout), run_each(lambda x: ort_run(fp32, x), heldout)
    cos = cosine(a, b)
    lat_fp32 = median_seconds(lambda: ort_run(fp32, heldout[:1]), 20)
    lat_int8 = median_seconds(lambda: ort_run(int8, heldout[:1]), 20)
    return dict(onnx=str(int8_path), path=str(int8_path), calib_images=len(calib), heldout_images=len(heldout),
                calib_method=method, reduce_range=reduce_range, cosine_mean=float(cos.mean()),
                cosine_min=float(cos.min()), latency_ms_fp32=lat_fp32 * 1e3, latency_ms_int8=lat_int8 * 1e3,
                latency_ratio=lat_int8 / lat_fp32, ops=onnx_ops(str(int8_path)))


def onnx_input_normalization(path: str) -> str:
    """The first op on the input when it subtracts or scales by a 0..255-sized scalar (published face models), or ''."""
    import onnx
    graph = onnx.load(path, load_external_data=False).graph
    consts = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer if np.prod(i.dims) <= 3}
    first = graph.input[0].name
    for node in graph.node:
        if node.op_type in ('Sub', 'Mul', 'Div', 'Add') and first in node.input:
            other = [consts[n] for n in node.input if n in consts]
            if other and float(np.abs(other[0]).max()) >= 2:  # a 0..255 scale, not the cfg's mean/std
                return f'{node.op_type} by {other[0].ravel().tolist()}'
    return ''


# ----------------------------------------------------------------------------------------------------------------
# ExecuTorch


def export_executorch(fused: torch.nn.Module, path: Path, example: torch.Tensor,
                      calib: Optional[np.ndarray] = None) -> Dict[str, Any]:
    """Write the XNNPACK-lowered `.pte` (INT8 PT2E when `calib` crops are given); returns what was lowered."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    program = torch.export.export(fused.eval(), (example,))
    if calib is not None:
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer, \
            get_symmetric_quantization_config
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
        prepared = prepare_pt2e(program.module(), quantizer)
        with torch.no_grad():
            for i in range(len(calib)):
                prepared(torch.from_numpy(calib[i:i + 1]))
        program = torch.export.export(convert_pt2e(prepared), (example,))
    lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    graph = lowered.exported_program().graph_module.graph
    calls = [str(n.target) for n in graph.nodes if n.op == 'call_function']
    outside = sorted({c for c in calls if 'executorch_call_delegate' not in c and 'getitem' not in c})
    if outside:  # everything must run in XNNPACK: an op left to the portable kernels is slow and a surprise
        raise UserError(f'ExecuTorch: not lowered to XNNPACK: {", ".join(outside)}')
    path.write_bytes(lowered.to_executorch().buffer)
    return dict(delegates=sum('executorch_call_delegate' in c for c in calls), not_delegated=[])


def executorch_runner(path: str) -> Runner:
    from executorch.runtime import Runtime
    try:
        method = Runtime.get().load_program(str(path)).load_method('forward')
    except Exception as e:  # the runtime raises RuntimeError / ValueError with its own error codes
        raise UserError(f'{path}: ExecuTorch cannot load it ({first_line(e)})') from None

    def run_one(x: np.ndarray) -> np.ndarray:
        return method.execute([torch.from_numpy(np.ascontiguousarray(x, np.float32))])[0].numpy()
    return lambda x: run_each(run_one, x)


# ----------------------------------------------------------------------------------------------------------------
# ncnn


def export_ncnn(fused: torch.nn.Module, param: Path, example: torch.Tensor) -> Dict[str, Any]:
    """pnnx -> `param` (+ the `.bin` beside it), fp32 weights; returns the ncnn layer types."""
    import pnnx
    work = param.parent / 'pnnx'
    work.mkdir()
    bin_path = param.with_suffix('.bin')
    pnnx.export(fused.eval(), str(work / 'model.pt'), example, ncnnparam=str(param), ncnnbin=str(bin_path), fp16=False)
    if not (param.is_file() and bin_path.is_file()):
        raise UserError('pnnx wrote no ncnn model')
    layers = [line.split()[0] for line in param.read_text().splitlines()[2:] if line.strip()]
    return dict(layers=sorted(set(layers)))


def ncnn_runner(param: str, fp16: bool = False) -> Runner:
    """ncnn on this CPU; `fp16=False` turns off ncnn's fp16/bf16 storage and arithmetic (its defaults where the CPU
    has them)."""
    import ncnn
    net = ncnn.Net()
    if not fp16:
        for opt in ('use_fp16_packed', 'use_fp16_storage', 'use_fp16_arithmetic', 'use_bf16_storage'):
            setattr(net.opt, opt, False)
    bin_path = str(Path(param).with_suffix('.bin'))
    if net.load_param(str(param)) != 0 or net.load_model(bin_path) != 0:
        raise UserError(f'{param}: ncnn cannot load it (with {bin_path})')
    names_in, names_out = net.input_names(), net.output_names()
    if len(names_in) != 1 or len(names_out) != 1:
        raise UserError(f'{param}: expected one input and one output, found {names_in} and {names_out}')

    def run_one(x: np.ndarray) -> np.ndarray:
        # ncnn.Mat(array) wraps the array's memory without a reference to it: the array must be a named local that
        # outlives the copy (a temporary is freed as soon as Mat() returns, and ncnn then reads freed memory). The
        # copy (clone) is needed too: a first layer that works in place (a BinaryOp with a scalar, as mxnet2ncnn
        # writes the input normalization) crashed ncnn with a segmentation fault on a Mat that wraps foreign memory
        image = np.ascontiguousarray(x[0], np.float32)
        mat = ncnn.Mat(image).clone()
        ex = net.create_extractor()
        ex.input(names_in[0], mat)
        ret, out = ex.extract(names_out[0])
        if ret != 0:
            raise UserError(f'{param}: ncnn failed to run (error {ret})')
        return np.array(out, dtype=np.float32).reshape(1, -1)
    return lambda x: run_each(run_one, x)


def ncnn_input_normalization(path: str) -> str:
    """A first BinaryOp with a scalar on the input (mxnet2ncnn's `(x - 127.5) * 0.0078125`), or ''."""
    lines = Path(path).read_text(encoding='utf-8', errors='replace').splitlines()[2:]
    fields = [ln.split() for ln in lines if ln.split()]
    inputs = {f[-1] for f in fields if f[0] == 'Input'}
    for f in fields:
        if f[0] == 'BinaryOp' and f[2] == '1' and f[4] in inputs:
            params = dict(kv.split('=', 1) for kv in f[6:] if '=' in kv)
            if params.get('1') == '1':
                return f'BinaryOp {f[1]} (op {params.get("0", "0")}, scalar {params.get("2", "0")})'
    return ''


# ----------------------------------------------------------------------------------------------------------------
# Core ML


def coreml_ops(spec) -> List[str]:
    ops: List[str] = []
    for fn in spec.mlProgram.functions.values():
        for block in fn.block_specializations.values():
            ops += [op.type for op in block.operations]
    return ops


def export_coreml(fused: torch.nn.Module, path: Path, example: torch.Tensor, mean: Sequence[float],
                  std: Sequence[float], input_kind: str = 'image', precision: str = 'float16',
                  int8: bool = False) -> Dict[str, Any]:
    """Write the `.mlpackage` (a folder) and return its spec facts: input, output, op counts."""
    import coremltools as ct
    program = torch.export.export(fused.eval(), (example,)).run_decompositions({})
    shape = tuple(example.shape)
    if input_kind == 'image':
        if len(set(std)) != 1:
            raise UserError(f'Core ML image input folds one scale for all channels; std {list(std)} differs per '
                            f'channel: use --coreml-input tensor')
        scale = 1.0 / (255.0 * std[0])
        inputs = [ct.ImageType(name='image', shape=shape, scale=scale, bias=[-m / s for m, s in zip(mean, std)],
                               color_layout=ct.colorlayout.RGB)]
    else:
        inputs = [ct.TensorType(name='input', shape=shape, dtype=np.float32)]
    model = ct.convert(program, inputs=inputs, outputs=[ct.TensorType(name='embedding', dtype=np.float32)],
                       convert_to='mlprogram', minimum_deployment_target=ct.target.iOS16,
                       compute_precision=ct.precision.FLOAT16 if precision == 'float16' else ct.precision.FLOAT32)
    if int8:
        from coremltools.optimize.coreml import OpLinearQuantizerConfig, OptimizationConfig, linear_quantize_weights
        config = OptimizationConfig(global_config=OpLinearQuantizerConfig(mode='linear_symmetric', dtype='int8'))
        model = linear_quantize_weights(model, config=config)
    spec = model.get_spec()
    ops = coreml_ops(spec)
    counts = {op: ops.count(op) for op in sorted(set(ops))}
    # the image input's scale and bias are one mul and one add on the input; anything beyond is an unfused branch
    allowed_adds = 1 if input_kind == 'image' else 0
    if 'batch_norm' in counts or counts.get('add', 0) > allowed_adds:
        raise UserError(f'Core ML program holds {counts.get("batch_norm", 0)} batch_norm and {counts.get("add", 0)} '
                        f'add ops: reparameterization is incomplete')
    model.save(str(path))
    out = spec.description.output[0].type.multiArrayType
    return dict(input=input_kind, input_shape=list(shape), output_shape=[int(d) for d in out.shape],
                compute_precision=precision, weights='int8' if int8 else precision, ops=counts,
                note='prediction needs macOS (Core ML); the spec was checked, nothing was run here')


# ----------------------------------------------------------------------------------------------------------------
# the registry

FORMATS: Dict[str, Format] = {f.name: f for f in (
    Format(name='onnx', suffix='.onnx', runtime='ONNX Runtime', requires=('onnx', 'onnxruntime', 'onnxscript'),
           extra=ONNX_EXTRA, export=_export_onnx_format, runner=onnx_runner,
           precision=('fp32', 'int8 QDQ (per-channel int8 weights, uint8 activations)'),
           int8='a second, statically quantized QDQ model beside the FP32 one (--int8-onnx)', timed=('fp32', 'int8'),
           int8_beside=onnx_int8_beside,
           input_normalization=onnx_input_normalization),
    Format(name='executorch', suffix='.pte', runtime='ExecuTorch XNNPACK', requires=('executorch', 'torchao'),
           extra=DEPLOY_EXTRA,
           export=lambda fused, path, x, opts: export_executorch(fused, path, x, opts.calib if opts.int8 else None),
           runner=executorch_runner,
           precision=('fp32 (XNNPACK fp32 kernels)', 'int8 weights and activations (PT2E, XNNPACK quantizer, '
                      'per-channel)'),
           int8='the program is INT8 (PT2E static quantization, calibrated on --calib)', timed=('fp32', 'int8')),
    Format(name='coreml', suffix='.mlpackage', runtime='Core ML', requires=('coremltools',), extra=DEPLOY_EXTRA,
           export=lambda fused, path, x, opts: export_coreml(fused, path, x, opts.mean, opts.std, opts.coreml_input,
                                                             opts.coreml_precision, opts.int8),
           runner=None, precision=('--coreml-precision compute', '8-bit linear weights'), int8='8-bit weights',
           int8_needs_calib=False),
    Format(name='ncnn', suffix='.param', runtime='ncnn', requires=('pnnx', 'ncnn'), extra=DEPLOY_EXTRA,
           export=lambda fused, path, x, opts: export_ncnn(fused, path, x), runner=ncnn_runner,
           precision=("fp32 weights; checked with ncnn's fp16/bf16 storage and arithmetic off (set "
                      "opt.use_fp16_* = false in the app)", ''),
           int8_refusal="ncnn's INT8 needs its own calibration table tool, ncnn2table; export FP32",
           companions=('.bin',), timed=('fp32',),
           extra_runs=lambda path: dict(fp16_runtime=ncnn_runner(path, fp16=True)),
           input_normalization=ncnn_input_normalization),
)}
RUNNABLE = tuple(name for name, f in FORMATS.items() if f.runner is not None)


def get(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise UserError(f'unknown format {name!r}; choose from {", ".join(FORMATS)}') from None


def normalizes_inside(name: str, path: str) -> str:
    """A description of the input normalization an artifact's graph applies itself (first op on the input: a
    subtraction or scaling by a scalar, as mxnet2ncnn files and many published ONNX face models have), or ''."""
    try:
        return FORMATS[name].input_normalization(path)
    except Exception:  # an unreadable artifact is reported by its runtime's own loading, with its message
        return ''
