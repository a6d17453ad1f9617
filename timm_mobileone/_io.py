"""Atomic file writes: a temporary file beside the target, then a rename, so no half-written file is left."""
import os
import tempfile
from pathlib import Path
from typing import Callable, IO, Union


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
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
