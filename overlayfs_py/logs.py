"""Logging setup and one-line error messages, shared by the CLI, the server and the runner."""

from __future__ import annotations

import logging
import sys


def setup_logging(debug: bool, logfile: str | None = None) -> None:
    handler: logging.Handler
    handler = logging.FileHandler(logfile) if logfile else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(name)s %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)


def one_line(exc: BaseException) -> str:
    """An exception as a one-line message: ``strerror (path)`` for OSError; a group of one
    (trio's nurseries wrap what a task raised) is its exception."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
