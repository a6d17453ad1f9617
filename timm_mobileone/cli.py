"""The wrapper every command-line entry point shares, and the process-level memory settings of long CLI runs.

`cli` turns `fn(argv) -> result` into `main(argv=None)`: a `UserError` becomes one `error:` line on stderr and exit
code 2, with no traceback; Ctrl-C becomes exit code 130.
"""
import functools
import logging
import signal
import sys
from typing import Any, Callable, Dict, List, Optional

from .errors import UserError

__all__ = ['cli', 'keep_freed_memory_for_reuse', 'release_freed_memory']


def cli(fn: Optional[Callable[[Optional[List[str]]], Dict[str, Any]]] = None, *, log_level: int = logging.WARNING,
        log_format: str = '%(levelname)s %(name)s: %(message)s'):
    """Wrap `fn(argv) -> result` as an entry point's `main(argv=None)`.

    Sets up logging on stderr (stdout carries one JSON object) and glibc's malloc for a long-lived process, then runs
    `fn`: `UserError` -> one `error:` line and exit 2; KeyboardInterrupt -> `error: interrupted` (or the message it
    carries, e.g. how to resume) and exit 130. Usable as `@cli` or `@cli(log_level=logging.INFO)`.
    """

    def wrap(fn):
        @functools.wraps(fn)
        def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
            if getattr(signal.getsignal(signal.SIGINT), 'starting', False):  # see timm_mobileone/__init__.py
                signal.signal(signal.SIGINT, signal.default_int_handler)
            logging.basicConfig(level=log_level, format=log_format, stream=sys.stderr)
            keep_freed_memory_for_reuse()
            try:
                return fn(argv)
            except UserError as e:
                print(f'error: {e}', file=sys.stderr)
                raise SystemExit(2) from None
            except KeyboardInterrupt as e:
                print(f'error: {e.args[0] if e.args else "interrupted"}', file=sys.stderr)
                raise SystemExit(130) from None
        return main

    return wrap(fn) if fn is not None else wrap


def _glibc():
    """The C library, where it is glibc on Linux (its malloc tunables), else None."""
    import ctypes
    import ctypes.util
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
