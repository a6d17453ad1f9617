"""The project's one user-error type and the wrapper every command-line entry point shares.

A user mistake (a bad flag value, a missing or unreadable file, a checkpoint that does not fit, a runtime that is
not installed, an export that fails its checks) raises `UserError` with one readable line. `cli` turns it into
`error: <line>` on stderr and exit code 2, with no traceback; Ctrl-C becomes exit code 130. The readers of
untrusted files raise subclasses (`PackError`, `ImageError`, `MXNetError`, `RecordIOError`, `FaceDataError`) so that
a library caller can catch one reader's failures; every CLI catches the base.
"""
import functools
import logging
import sys
from typing import Any, Callable, Dict, List, Optional

__all__ = ['UserError', 'cli']


class UserError(Exception):
    """A mistake in the command line or its inputs: reported as one line, exit code 2."""


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
            from ._io import keep_freed_memory_for_reuse
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
