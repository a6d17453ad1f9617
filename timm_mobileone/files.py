"""Atomic file writes: a file is replaced whole or left as it was (a crash or Ctrl-C never leaves half a file); file
hashes."""
import hashlib
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, IO, Optional, Union

if TYPE_CHECKING:
    import torch

__all__ = ['atomic_write', 'save_safetensors', 'sha256_file']


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


def sha256_file(path: Union[str, Path]) -> str:
    """Hex sha256 of a file's bytes, read 1 MB at a time (weights, detector files, index files)."""
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def save_safetensors(path: Union[str, Path], tensors: Dict[str, 'torch.Tensor'],
                     metadata: Optional[Dict[str, str]] = None) -> None:
    """Write `tensors` (moved to the CPU, made contiguous) as one safetensors file, atomically (`atomic_write`)."""
    from safetensors.torch import save
    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata or {})
    atomic_write(path, lambda f: f.write(data))
