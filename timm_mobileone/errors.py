"""The project's one user-error type, and the one-line form of any exception's message.

A user mistake (a bad flag value, a missing or unreadable file, a checkpoint that does not fit, a runtime that is
not installed, an export that fails its checks) raises `UserError` with one readable line; `timm_mobileone.cli.cli`
turns it into `error: <line>` on stderr and exit code 2. The readers of untrusted files raise subclasses
(`PackError`, `ImageError`, `MXNetError`, `RecordIOError`, `FaceDataError`) so that a library caller can catch one
reader's failures; every CLI catches the base.

A leaf: it imports nothing of the project, so every module can raise `UserError` without an import circle.
"""

__all__ = ['UserError', 'first_line']


class UserError(Exception):
    """A mistake in the command line or its inputs: reported as one line, exit code 2."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none), for one-line `error:` output."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
