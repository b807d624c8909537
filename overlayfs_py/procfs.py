"""``/proc/PID/stat``: the one reader for the server, the runner, the scripts and the tests.

The command name (field 2) is in parentheses and may itself hold spaces and ``)``, so the
fields after it are found after the *last* ``)`` (as procps does); proc(5) numbers them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stat:
    comm: str  # field 2, without the parentheses
    state: str  # field 3: R, S, D, Z, X, ...
    ppid: int  # field 4
    start_time: int  # field 22: clock ticks since boot

    @property
    def running(self) -> bool:
        """Not a zombie (exited, not reaped yet) nor dead."""
        return self.state not in ("Z", "X")


def stat(pid: int | str) -> Stat:
    """The fields of ``/proc/PID/stat`` used here; OSError if there is no such process."""
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    head, sep, tail = text.rpartition(")")
    rest = tail.split()
    if not sep or len(rest) < 20:
        raise ProcessLookupError(f"/proc/{pid}/stat: unexpected format")
    return Stat(head.partition("(")[2], rest[0], int(rest[1]), int(rest[19]))


def process_start_time(pid: int | str) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks since boot): with the pid it names one
    process for good, so a recycled pid is never mistaken for ours. None if the process
    is gone or a zombie."""
    try:
        st = stat(pid)
    except OSError:
        return None
    return st.start_time if st.running else None


def alive(pid: int | str) -> bool:
    """The process exists and is not a zombie."""
    return process_start_time(pid) is not None
