"""The runner's errors: :class:`RunnerError` is pyoverlay's one error base class
(:class:`overlayfs_py.errors.PyoverlayError`) with the runner's own exit status, 125
(docker's code for its own errors: 126 and 127 are the command's "cannot execute" and
"not found", given per error as ``exit_code=``)."""

from __future__ import annotations

from overlayfs_py.errors import PyoverlayError

EXIT_RUNNER = 125


class RunnerError(PyoverlayError):
    """A one-line error of the runner; exits 125 unless another status is given."""

    exit_code = EXIT_RUNNER


class SpecError(RunnerError):
    """A user error in the run options (one line; runner/spec.py and runner/net/ports.py)."""
