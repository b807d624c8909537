"""``/proc/self/mountinfo``, read without ever touching a mount (a hung FUSE server
cannot hang the reader). One parser for the server, the runner, the benchmark and the
tests."""

from __future__ import annotations

import re
from dataclasses import dataclass

_OCTAL = re.compile(r"\\([0-7]{3})")


def unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as ``\\ooo``."""
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True)
class Mount:
    devno: str  # "major:minor"
    mountpoint: str
    options: str
    fstype: str
    source: str
    super_options: str
    root: str = "/"  # the mount's root within its filesystem (a bind's subtree)


def parse(text: str) -> list[Mount]:
    """The rows of a mountinfo text (proc(5)); a line without the ``-`` separator or with
    too few fields is skipped."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        try:
            sep = parts.index("-", 6)
        except ValueError:
            continue
        if len(parts) <= sep + 1:
            continue
        source = unescape(parts[sep + 2]) if len(parts) > sep + 2 else ""
        super_options = parts[sep + 3] if len(parts) > sep + 3 else ""
        out.append(
            Mount(parts[2], unescape(parts[4]), parts[5], parts[sep + 1], source, super_options, unescape(parts[3]))
        )
    return out


def mounts(path: str = "/proc/self/mountinfo") -> list[Mount]:
    with open(path, errors="surrogateescape") as f:
        return parse(f.read())


def mount_at(path: str) -> Mount | None:
    """The topmost mount whose mountpoint is exactly *path* (an absolute, resolved path)."""
    found = None
    for m in mounts():
        if m.mountpoint == path:
            found = m
    return found


def is_mounted(path: str) -> bool:
    """Something is mounted at *path* (an absolute, resolved path)."""
    return mount_at(path) is not None


def mounts_under(path: str) -> list[str]:
    """Mountpoints at or below *path* (an absolute, resolved path)."""
    prefix = path.rstrip("/") + "/"
    return [m.mountpoint for m in mounts() if m.mountpoint == path or m.mountpoint.startswith(prefix)]
