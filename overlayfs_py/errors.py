"""The one error base class of pyoverlay (the filesystem and the runner alike).

Every error meant for the user extends :class:`PyoverlayError`: ``message`` is one line
(``str(exc)`` is the same), ``exit_code`` the status a command exits with when the error
ends it (a class default, or given when raised). A catch site that needs another status
(the runner's commands exit 125 for their own errors, as docker's do) passes it to
:func:`fail`. The runner's errors extend this class too (runner -> overlayfs_py is the
allowed direction); some keep being another builtin class as well (``StateDirError`` is
an ``OSError``, ``IdMapError`` a ``ValueError``) for callers that catch those.
"""

from __future__ import annotations

import sys
from typing import NoReturn


class PyoverlayError(Exception):
    """A one-line user-facing error with the exit status of the command it ends."""

    exit_code: int = 1

    def __init__(self, message: str = "", *args: object, exit_code: int | None = None) -> None:
        super().__init__(message, *args)
        self.message = str(message)
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message


def fail(error: str | BaseException, exit_code: int | None = None) -> NoReturn:
    """Print ``pyoverlay: <message>`` on stderr and exit: with *exit_code* if given, else
    the error's own ``exit_code`` (1 for a plain message or another exception)."""
    import click

    click.echo(f"pyoverlay: {error}", err=True)
    if exit_code is None:
        exit_code = error.exit_code if isinstance(error, PyoverlayError) else 1
    sys.exit(exit_code)
