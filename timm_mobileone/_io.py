"""Process-level helpers for the CLIs: atomic file (and safetensors) writes, the CPU allocator setting for long
batched runs, and one-line error messages."""
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, IO, Optional, Union

from .errors import UserError

if TYPE_CHECKING:
    import torch


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none), for one-line `error:` output."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def atomic_write(path: Union[str, Path], write: Callable[[IO[bytes]], None]) -> None:
    """Call `write(f)` on a temporary file, then rename it over `path`.

    A path that exists and is not a regular file (/dev/null, a FIFO, /dev/stdout) is written in place: renaming
    over a device would replace it.
    """
    path = Path(path)
    if path.exists() and not path.is_file():
        with open(path, 'wb') as f:
            write(f)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~umask)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_safetensors(path: Union[str, Path], tensors: Dict[str, 'torch.Tensor'],
                     metadata: Optional[Dict[str, str]] = None) -> None:
    """Write `tensors` (moved to the CPU, made contiguous) as one safetensors file, atomically (`atomic_write`)."""
    from safetensors.torch import save
    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata or {})
    atomic_write(path, lambda f: f.write(data))


def _glibc():
    """The C library, where it is glibc on Linux (its malloc tunables), else None."""
    import ctypes
    import ctypes.util
    import sys
    if not sys.platform.startswith('linux'):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    except OSError:
        return None


def keep_freed_memory_for_reuse() -> bool:
    """Serve large CPU tensors from the heap instead of fresh mmaps (glibc only; no-op elsewhere).

    glibc maps every block above its (dynamic, at most 32 MB) mmap threshold afresh, so each activation of a
    batched CPU forward pays page faults on allocation; and with the dynamic threshold, long runs fragment the heap.
    A fixed 1 GB threshold keeps freed activation blocks for reuse: measured on the 2-core box, S0 forward passes
    took 8.3 s instead of 11.8 s for 2,000 images, with flat memory. Called by the CLIs that run many batches
    (`eval.*`, the zoo report, the benchmarks), never on import. Returns whether the setting took.
    """
    libc = _glibc()
    m_mmap_threshold = -3
    try:
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) if libc is not None else False
    except AttributeError:
        return False


def release_freed_memory() -> bool:
    """Hand the heap's free pages back to the OS (glibc's malloc_trim; no-op elsewhere). Between the steps of a long
    job: each step's freed peak (a float64 copy, an export) otherwise stays resident. Returns whether it ran."""
    libc = _glibc()
    try:
        return bool(libc.malloc_trim(0)) if libc is not None else False
    except AttributeError:
        return False


def read_state_dict(path: Union[str, Path], flag: str = '--checkpoint'):
    """A state dict of tensors from safetensors or a torch checkpoint (read with weights_only=True).

    Unwraps `state_dict` / `model` entries and strips a `module.` prefix. Whatever is wrong with the file
    (missing, truncated, corrupt header, a pickle of something else) raises UserError naming it.
    """
    import torch
    p = Path(path)
    if not p.is_file():
        raise UserError(f'{flag} {path}: no such file')
    if p.suffix == '.params':  # insightface's MXNet checkpoints: arrays by MXNet name, converted on loading
        from .mxnet import MXNetError, read_params
        try:
            return {k: torch.from_numpy(v) for k, v in read_params(p).items()}
        except MXNetError as e:
            raise UserError(f'{flag} {e}') from None
    try:
        if p.suffix == '.safetensors':
            from safetensors.torch import load_file
            state_dict = load_file(str(p), device='cpu')
        else:
            state_dict = torch.load(str(p), map_location='cpu', weights_only=True)
    except Exception as e:  # safetensors, torch's zip reader and its unpickler raise many unrelated types
        raise UserError(f'{flag} {path}: cannot be read, corrupt or truncated? ({first_line(e)})') from None
    if isinstance(state_dict, dict):
        for key in ('state_dict', 'model'):
            if isinstance(state_dict.get(key), dict):
                state_dict = state_dict[key]
                break
    if not isinstance(state_dict, dict) or not state_dict or \
            not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()):
        raise UserError(f'{flag} {path}: not a state dict of tensors')
    return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state_dict.items()}


def create_model_checked(model_name: str, pretrained: bool = False, checkpoint: str = '', **kwargs):
    """`timm.create_model` for the CLIs: a missing checkpoint, unknown name or unusable weights raise one line.

    An MXNet `.params` checkpoint (insightface) loads into a model that has an MXNet port (`mobilefacenet`), its
    `-symbol.json` beside it checked against the model first.
    """
    import timm
    from . import mobileone_112, mobilefacenet  # noqa: F401  (registers the models)
    state = read_state_dict(checkpoint) if checkpoint else None  # a file timm's loader would choke on: one line
    mxnet = bool(checkpoint) and Path(checkpoint).suffix == '.params'
    if state is not None and not mxnet and model_name in timm.list_models('mobileone_112_*'):
        # the head's sizes as the weights were trained (a distilled student's embed_dim=128 loads as given)
        for key, value in mobileone_112.infer_model_args(state).items():
            kwargs.setdefault(key, value)
    try:
        model = timm.create_model(model_name, pretrained=pretrained,
                                  checkpoint_path=checkpoint if checkpoint and not mxnet else None, **kwargs)
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        raise UserError(f'cannot create model {model_name!r}: {first_line(e)}') from None
    if mxnet:
        _load_mxnet(model, model_name, checkpoint, state)
    return model


def _load_mxnet(model, model_name: str, checkpoint: str, state) -> None:
    """Load MXNet arrays (by MXNet name) into `model` through its family's port, or raise UserError."""
    import sys
    from .mxnet import MXNetError, read_symbol, symbol_path_for
    check = getattr(sys.modules.get(type(model).__module__), 'check_mxnet_symbol', None)
    if check is None:
        raise UserError(f'--checkpoint {checkpoint}: an MXNet checkpoint, and {model_name} has no MXNet port '
                        f'(mobilefacenet has)')
    symbol = symbol_path_for(checkpoint)
    try:
        if symbol.is_file():
            check(read_symbol(symbol), model, str(symbol))
        result = model.load_state_dict(state, strict=False)
    except MXNetError as e:
        raise UserError(f'--checkpoint {e}') from None
    except KeyError as e:
        raise UserError(f'--checkpoint {checkpoint}: {e.args[0]}') from None
    except RuntimeError as e:  # size mismatch
        detail = [line.strip() for line in str(e).splitlines() if 'size mismatch' in line]
        raise UserError(f'--checkpoint {checkpoint} does not fit {model_name}: '
                        f'{detail[0] if detail else first_line(e)}') from None
    if result.missing_keys or result.unexpected_keys:
        raise UserError(
            f'--checkpoint {checkpoint} does not fit {model_name}: it lacks {len(result.missing_keys)} tensors the '
            f'model needs ({", ".join(result.missing_keys[:4])}{" ..." if len(result.missing_keys) > 4 else ""})'
            + (f', holds {len(result.unexpected_keys)} it lacks' if result.unexpected_keys else ''))
