"""``scripts/bench --mount-times``: how long mounting and unmounting take, as a user sees it.

On the same small layers, round robin (the order rotates each repetition), each
implementation is mounted with its own command and unmounted with its own command:

* ``kernel``: ``mount -t overlay`` / ``umount``;
* ``fuse-overlayfs``: ``fuse-overlayfs -o ...`` (returns once mounted) / ``umount``;
* ``pyoverlay-direct``, ``pyoverlay-pyfuse3``: ``pyoverlay mount -o engine=...`` (returns
  once the mount is live) / ``pyoverlay umount`` (returns once the server has exited).

Per repetition: the wall time of the mount command, then of a first ``stat`` + read of a
file in the mount (for the direct engine this includes what its server still imports after
the mount command returned), then of the unmount command, then how long the server takes to
exit after it (``pyoverlay umount`` waits for that itself; fuse-overlayfs's does not), and
the CPU time of the two commands (user + sys of the command process: a figure the other
load of the machine moves less). One untimed round first writes Python's bytecode caches
(``PYTHONDONTWRITEBYTECODE`` is dropped for pyoverlay's commands: an installed package has
them) and warms the page cache. Reported: medians.
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from overlayfs_py import procfs
from overlayfs_py.mountinfo import is_mounted

from .util import REPO, BenchError, find_server_pid, force_unmount

ALL = ["kernel", "fuse-overlayfs", "pyoverlay-direct", "pyoverlay-pyfuse3"]
#: the columns, in milliseconds
FIELDS = ("mount", "first_access", "umount", "server_exit", "mount_cpu", "umount_cpu")
REPS = 10


def _pyoverlay_cli() -> list[str]:
    exe = os.path.join(REPO, ".venv", "bin", "pyoverlay")
    return [exe] if os.access(exe, os.X_OK) else [sys.executable, "-m", "pyoverlay_cli"]


class Target:
    """One implementation's mount and unmount commands on its own upper/work/merged."""

    def __init__(self, name: str, lower: str, base: str) -> None:
        self.name = name
        d = os.path.join(base, name)
        self.upper, self.work, self.merged = (os.path.join(d, x) for x in ("upper", "work", "merged"))
        for p in (self.upper, self.work, self.merged):
            os.makedirs(p, exist_ok=True)
        self.env = dict(os.environ)
        opts = f"lowerdir={lower},upperdir={self.upper},workdir={self.work}"
        if name == "kernel":
            self.mount_argv = ["mount", "-t", "overlay", "overlay", "-o", opts, self.merged]
            self.umount_argv = ["umount", self.merged]
        elif name == "fuse-overlayfs":
            self.mount_argv = ["fuse-overlayfs", "-o", opts, self.merged]
            self.umount_argv = ["umount", self.merged]
        else:
            engine = name.removeprefix("pyoverlay-")
            cli = _pyoverlay_cli()
            self.mount_argv = cli + ["mount", "-o", f"engine={engine}", lower, self.upper, self.merged]
            self.mount_argv += ["--workdir", self.work]
            self.umount_argv = cli + ["umount", self.merged]
            self.env["PYOVERLAY_STATE_DIR"] = os.path.join(base, "state")
            self.env.pop("PYTHONDONTWRITEBYTECODE", None)

    def server_pid(self) -> int | None:
        if self.name == "kernel":
            return None
        return find_server_pid(self.merged, "fuse-overlayfs" if self.name == "fuse-overlayfs" else "pyoverlay")


def available(name: str) -> str | None:
    if name == "kernel" and os.geteuid() != 0:
        return "needs root (a rootless run: --as-user)"
    if name == "fuse-overlayfs" and not shutil.which("fuse-overlayfs"):
        return "fuse-overlayfs is not installed"
    if name.startswith("pyoverlay") and not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    return None


def _timed(argv: list[str], env: dict, out) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the command) of running *argv*; BenchError if it fails.
    Output goes to a file: a daemon keeping it open cannot make us wait."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    r = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out, timeout=60)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        out.seek(0)
        raise BenchError(f"{argv[0]} {argv[1]} failed ({r.returncode}): {out.read()[-300:]!r}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _wait_gone(pid: int | None, timeout: float = 10) -> float:
    """Seconds until process *pid* has exited (polled every 0.5 ms)."""
    t = time.perf_counter()
    if pid is None:
        return 0.0
    while procfs.alive(pid):
        if time.perf_counter() - t > timeout:
            raise BenchError(f"server {pid} did not exit")
        time.sleep(0.0005)
    return time.perf_counter() - t


def _round(t: Target, out) -> dict[str, float]:
    m_wall, m_cpu = _timed(t.mount_argv, t.env, out)
    a = time.perf_counter()
    os.stat(os.path.join(t.merged, "f"))
    with open(os.path.join(t.merged, "f"), "rb") as f:
        if f.read() != b"hello\n":
            raise BenchError(f"{t.name}: wrong content")
    access = time.perf_counter() - a
    if not is_mounted(t.merged):
        raise BenchError(f"{t.name}: not mounted after its mount command")
    pid = t.server_pid()
    u_wall, u_cpu = _timed(t.umount_argv, t.env, out)
    gone = _wait_gone(pid)
    if is_mounted(t.merged):
        raise BenchError(f"{t.name}: still mounted after its unmount command")
    vals = (m_wall, access, u_wall, gone, m_cpu, u_cpu)
    return {k: v * 1000 for k, v in zip(FIELDS, vals, strict=True)}


def run_mounttimes(run_dir: str, names: list[str], reps: int, log) -> dict:
    base = os.path.join(run_dir, "mounttime")
    lower = os.path.join(base, "lower")
    os.makedirs(os.path.join(lower, "d"))
    with open(os.path.join(lower, "f"), "wb") as f:
        f.write(b"hello\n")
    targets = [Target(n, lower, base) for n in names]
    samples: dict[str, dict[str, list[float]]] = {t.name: {k: [] for k in FIELDS} for t in targets}
    try:
        with tempfile.TemporaryFile("w+") as out:
            for t in targets:  # untimed: bytecode caches, page cache
                _round(t, out)
            for rep in range(reps):
                order = targets[rep % len(targets) :] + targets[: rep % len(targets)]
                for t in order:
                    for k, v in _round(t, out).items():
                        samples[t.name][k].append(v)
                log(
                    f"mount times rep {rep + 1}/{reps}: "
                    + "  ".join(f"{n} {s['mount'][-1]:.0f}/{s['umount'][-1]:.0f} ms" for n, s in samples.items())
                )
    finally:
        for t in targets:
            if is_mounted(t.merged):
                force_unmount(t.merged)
    med = {n: {k: statistics.median(v) for k, v in d.items()} for n, d in samples.items()}
    return {"reps": reps, "median_ms": med, "samples_ms": samples}


def table(mt: dict) -> str:
    med = mt["median_ms"]
    lines = [
        f"**mount and umount: milliseconds, median of {mt['reps']} (interleaved)**",
        "",
        "| implementation | mount | first stat+read | umount | server exit after umount | mount CPU | umount CPU |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, d in med.items():
        lines.append(f"| {name} | " + " | ".join(f"{d[k]:.1f}" for k in FIELDS) + " |")
    return "\n".join(lines)


def main_names(wanted: list[str] | None, log) -> list[str]:
    """The implementations to time: *wanted* (default all) that can run here."""
    names = []
    for n in wanted or ALL:
        why = available(n)
        if why:
            log(f"mount times: skipping {n}: {why}")
        else:
            names.append(n)
    if not names:
        raise BenchError("mount times: nothing to time")
    return names
