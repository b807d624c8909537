"""Small helpers: commands, unmounting, /proc, host cache-drop counters, formatting.

Mounts are read with ``overlayfs_py.mountinfo`` (never touching a mount, which could hang
on a dead FUSE server); ``is_mounted`` and ``mounts_under`` are its."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time

from overlayfs_py import mountinfo, procfs
from overlayfs_py.mountinfo import is_mounted
from overlayfs_py.unmount import try_unmount

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class BenchError(Exception):
    """A setup step failed (mount, build, tool missing)."""


class SanityError(BenchError):
    """An implementation gave a wrong result: the run is invalid."""


def run(argv, *, check=True, timeout=None, env=None, capture=True) -> subprocess.CompletedProcess:
    """Run *argv*; its output is captured through a temporary file, not a pipe, so a
    daemon that keeps the inherited stderr open cannot make us wait for it."""
    with tempfile.TemporaryFile("w+") as out:
        r = subprocess.run(
            [str(a) for a in argv],
            stdout=out if capture else None,
            stderr=subprocess.STDOUT if capture else None,
            text=True,
            timeout=timeout,
            env=env,
            stdin=subprocess.DEVNULL,
        )
        out.seek(0)
        r.stdout = out.read() if capture else None
        r.stderr = r.stdout
    if check and r.returncode != 0:
        err = (r.stderr or r.stdout or "").strip().splitlines()[-5:] if capture else []
        raise BenchError(f"{' '.join(map(str, argv))}: exit {r.returncode}: " + " | ".join(err))
    return r


def abort_fuse(path: str) -> None:
    """Abort the FUSE connection of the mount at *path* (a hung server can't block us)."""
    for m in mountinfo.mounts():
        if m.mountpoint == path and m.fstype.startswith("fuse"):
            ctl = f"/sys/fs/fuse/connections/{m.devno.split(':')[1]}/abort"
            if not os.path.exists(os.path.dirname(ctl)):
                subprocess.run(["mount", "-t", "fusectl", "none", "/sys/fs/fuse/connections"], capture_output=True)
            try:
                with open(ctl, "w") as f:
                    f.write("1")
            except OSError:
                pass


def force_unmount(path: str) -> None:
    """Unmount *path* whatever it takes: normal, then abort FUSE + lazy."""
    if is_mounted(path):
        try_unmount(path, timeout=60)
    if is_mounted(path):
        abort_fuse(path)
        try_unmount(path, lazy=True, timeout=60)


def wait_pid_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while procfs.alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def proc_status_kib(pid: int, key: str) -> int | None:
    """A ``VmHWM``/``VmRSS`` style field of /proc/PID/status, in KiB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def find_server_pid(merged: str, prog: str) -> int | None:
    """The pid of a FUSE daemon whose command line names *prog* and ends with *merged*."""
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in args if a]
        if args and prog in os.path.basename(args[0]) and merged in args[1:]:
            return int(d)
    return None


def cache_drops() -> tuple[int, int]:
    """(drop_pagecache, drop_slab) from /proc/vmstat: they move when the host (or
    anyone) drops this machine's caches."""
    vals = {}
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                k, _, v = line.partition(" ")
                if k in ("drop_pagecache", "drop_slab"):
                    vals[k] = int(v)
    except OSError:
        pass
    return vals.get("drop_pagecache", 0), vals.get("drop_slab", 0)


def read_tree(path: str) -> int:
    """Read every regular file under *path* (untimed priming of a page cache). Bytes read."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            p = os.path.join(root, name)
            try:
                total += read_file(p)
            except OSError:
                pass
    return total


def read_file(path: str, bufsize: int = 1 << 20) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        total = 0
        buf = bytearray(bufsize)
        while True:
            n = os.readv(fd, [buf])
            if not n:
                return total
            total += n
    finally:
        os.close(fd)


def rmtree(path: str) -> None:
    if os.path.lexists(path):
        subprocess.run(["rm", "-rf", "--one-file-system", path], capture_output=True)


def fmt_value(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "s":
        return f"{v * 1000:.1f}ms" if v < 1 else f"{v:.2f}s"
    if unit == "IOPS":
        return f"{v / 1000:.1f}k" if v >= 1000 else f"{v:.0f}"
    return f"{v:.0f}{unit}"


def fmt_ratio(r: float | None) -> str:
    if r is None:
        return "-"
    return f"{r:.2f}x" if r < 10 else f"{r:.1f}x"


def tool_version(argv: list[str]) -> str | None:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    out = (r.stdout + r.stderr).strip().splitlines()
    out = [line for line in out if "unknown argument" not in line]
    return " / ".join(out[:2]) if out else None
