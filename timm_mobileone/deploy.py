"""On-device formats of the fused model: ExecuTorch (XNNPACK, FP32 or INT8), Core ML and ncnn.

Used by `python -m timm_mobileone.export --format executorch|coreml|ncnn` (export.py: fusing, the checks, the JSON),
and by `eval.lfw --runtime` to run an exported artifact. Each exporter writes into a folder it is given (the caller
moves the finished artifact into place, so a failed export leaves nothing); each runner maps a (1, 3, H, W) float32
array, normalized as the model expects, to its (1, D) embedding.

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
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

FORMATS = ('onnx', 'executorch', 'coreml', 'ncnn')
DEPLOY_EXTRA = 'pip install "timm-mobileone[deploy]"'
# which modules each format needs (to export it, or to run it here)
REQUIRES = dict(executorch=('executorch', 'torchao'), coreml=('coremltools',), ncnn=('pnnx', 'ncnn'))
SUFFIX = dict(onnx='.onnx', executorch='.pte', coreml='.mlpackage', ncnn='.param')

Runner = Callable[[np.ndarray], np.ndarray]


def run_each(run_one: Runner, images: np.ndarray) -> np.ndarray:
    """`run_one`'s outputs for `images`, one image per call (artifacts exported at batch 1)."""
    return np.concatenate([run_one(images[i:i + 1]) for i in range(len(images))])


class DeployError(Exception):
    """A missing runtime, a bad artifact or a failed check: one line, exit code 2."""


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


def require(fmt: str) -> None:
    """Raise DeployError naming the extra when a module `fmt` needs is not installed."""
    for name in REQUIRES[fmt]:
        try:
            importlib.import_module(name)
        except ImportError:
            raise DeployError(f'--format {fmt} needs {name}, which is not installed: {DEPLOY_EXTRA}') from None


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
        raise DeployError(f'ExecuTorch: not lowered to XNNPACK: {", ".join(outside)}')
    path.write_bytes(lowered.to_executorch().buffer)
    return dict(delegates=sum('executorch_call_delegate' in c for c in calls), not_delegated=[])


def executorch_runner(path: str) -> Runner:
    from executorch.runtime import Runtime
    try:
        method = Runtime.get().load_program(str(path)).load_method('forward')
    except Exception as e:  # the runtime raises RuntimeError / ValueError with its own error codes
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DeployError(f'{path}: ExecuTorch cannot load it ({why})') from None

    def run(x: np.ndarray) -> np.ndarray:
        return method.execute([torch.from_numpy(np.ascontiguousarray(x, np.float32))])[0].numpy()
    return run


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
        raise DeployError('pnnx wrote no ncnn model')
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
        raise DeployError(f'{param}: ncnn cannot load it (with {bin_path})')
    names_in, names_out = net.input_names(), net.output_names()
    if len(names_in) != 1 or len(names_out) != 1:
        raise DeployError(f'{param}: expected one input and one output, found {names_in} and {names_out}')

    def run(x: np.ndarray) -> np.ndarray:
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
            raise DeployError(f'{param}: ncnn failed to run (error {ret})')
        return np.array(out, dtype=np.float32).reshape(1, -1)
    return run


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
            raise DeployError(f'Core ML image input folds one scale for all channels; std {list(std)} differs per '
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
        raise DeployError(f'Core ML program holds {counts.get("batch_norm", 0)} batch_norm and {counts.get("add", 0)} '
                          f'add ops: reparameterization is incomplete')
    model.save(str(path))
    out = spec.description.output[0].type.multiArrayType
    return dict(input=input_kind, input_shape=list(shape), output_shape=[int(d) for d in out.shape],
                compute_precision=precision, weights='int8' if int8 else precision, ops=counts,
                predicted=False, note='prediction needs macOS (Core ML); the spec was checked, nothing was run here')
