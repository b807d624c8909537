"""The implementations under test, each with its own fresh upper/work/merged dirs.

* ``native``: a hard-linked pre-merged copy of the lowers, no overlay at all;
* ``kernel``: ``mount -t overlay``;
* ``fuse-overlayfs``: the C FUSE implementation (daemonizes itself);
* ``pyoverlay``: ``.venv/bin/pyoverlay mount`` (background server, recorded in the
  harness's own ``PYOVERLAY_STATE_DIR``), on its default engine;
* ``pyoverlay-direct`` and ``pyoverlay-pyfuse3``: the same with ``-o engine=direct``
  (pyoverlay's own FUSE engine) or ``-o engine=pyfuse3``, so that one run shows the
  engines side by side (``--impl pyoverlay-direct,pyoverlay-pyfuse3,...``).

``remount()`` gives an overlay fresh caches (what "cold" means, see docs/performance.md);
``native`` has none to drop.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

from overlayfs_py.mountinfo import is_mounted
from overlayfs_py.unmount import UnmountError, unmount

from .layers import Layers, build_native
from .util import REPO, BenchError, find_server_pid, force_unmount, proc_status_kib, run, wait_pid_gone

ALL = ["native", "kernel", "fuse-overlayfs", "pyoverlay"]
#: pyoverlay with its engine named: -o engine=ENGINE (not in ALL: the default run stays as it was)
ENGINES = {"pyoverlay-direct": "direct", "pyoverlay-pyfuse3": "pyfuse3"}
KNOWN = ALL + list(ENGINES)


def is_pyoverlay(name: str) -> bool:
    return name == "pyoverlay" or name in ENGINES


def available(name: str) -> str | None:
    """None if *name* can run here, else why not."""
    if name == "kernel":
        with open("/proc/filesystems") as f:
            if "overlay" not in f.read():
                run(["modprobe", "overlay"], check=False)
        return None if os.geteuid() == 0 else "needs root"
    if name == "fuse-overlayfs":
        return None if shutil.which("fuse-overlayfs") else "fuse-overlayfs is not installed"
    if is_pyoverlay(name):
        if not os.path.exists("/dev/fuse"):
            return "/dev/fuse is missing"
        return None
    return None


class Impl:
    name = "?"
    overlay = True

    def __init__(self, layers: Layers, base: str, log):
        self.layers, self.base, self.log = layers, os.path.join(base, self.name), log
        self.upper = os.path.join(self.base, "upper")
        self.work = os.path.join(self.base, "work")
        self.merged = os.path.join(self.base, "merged")
        self.warm: set[str] = set()  # what was read since the last (re)mount
        self.mounted = False
        self.rss_peaks_kib: list[int] = []  # VmHWM of each server at its unmount
        for d in (self.upper, self.work, self.merged):
            os.makedirs(d, exist_ok=True)

    @property
    def lowerdir(self) -> str:
        for p in self.layers.lowers + [self.upper, self.work, self.merged]:
            if ":" in p or "," in p:
                raise BenchError(f"path {p!r} contains ':' or ','")
        return ":".join(self.layers.lowers)

    def mount(self) -> None:
        self._mount()
        self.mounted = True
        self.warm.clear()

    def unmount(self) -> None:
        if self.mounted:
            self.mounted = False
            self._unmount()

    def remount(self) -> None:
        self.unmount()
        self.mount()

    def server_pid(self) -> int | None:
        return None

    def rss_kib(self) -> dict | None:
        pid = self.server_pid()
        if pid is None:
            return None
        return {"pid": pid, "VmHWM": proc_status_kib(pid, "VmHWM"), "VmRSS": proc_status_kib(pid, "VmRSS")}

    def _note_peak(self) -> None:
        r = self.rss_kib()
        if r and r["VmHWM"]:
            self.rss_peaks_kib.append(r["VmHWM"])

    def _mount(self) -> None:
        raise NotImplementedError

    def _unmount(self) -> None:
        force_unmount(self.merged)


class Native(Impl):
    name = "native"
    overlay = False

    def _mount(self) -> None:
        if not os.listdir(self.merged):
            build_native(self.layers, self.merged)

    def _unmount(self) -> None:
        pass

    def remount(self) -> None:  # nothing cached at the overlay level: nothing to drop
        pass


class Kernel(Impl):
    name = "kernel"
    options: list[str] = []  # extra -o options (scripts/bench --kernel-options)

    def _mount(self) -> None:
        opts = f"lowerdir={self.lowerdir},upperdir={self.upper},workdir={self.work}"
        opts += "".join("," + o for o in self.options)
        run(["mount", "-t", "overlay", "overlay", "-o", opts, self.merged])

    def _unmount(self) -> None:
        r = run(["umount", self.merged], check=False)
        if r.returncode != 0:
            force_unmount(self.merged)


class FuseOverlayfs(Impl):
    name = "fuse-overlayfs"
    _pid: int | None = None

    def _mount(self) -> None:
        opts = f"lowerdir={self.lowerdir},upperdir={self.upper},workdir={self.work}"
        run(["fuse-overlayfs", "-o", opts, self.merged], timeout=60)
        deadline = time.monotonic() + 10
        while not is_mounted(self.merged):
            if time.monotonic() > deadline:
                raise BenchError("fuse-overlayfs did not mount")
            time.sleep(0.01)
        self._pid = find_server_pid(self.merged, "fuse-overlayfs")

    def server_pid(self) -> int | None:
        return self._pid

    def _unmount(self) -> None:
        self._note_peak()
        force_unmount(self.merged)
        _reap(self._pid, self.name)
        self._pid = None


class Pyoverlay(Impl):
    name = "pyoverlay"
    options: list[str] = []  # extra -o options (scripts/bench --pyoverlay-options)
    engine: str | None = None  # -o engine=...; None: the default engine

    def __init__(self, layers, base, log):
        super().__init__(layers, base, log)
        self.state_dir = os.path.join(os.path.dirname(self.base), "state")
        os.makedirs(self.state_dir, exist_ok=True)
        self.logfile = os.path.join(os.path.dirname(self.base), f"{self.name}-server.log")
        self._pid: int | None = None
        self.served_engine: str | None = None  # from the server's mount record

    def cli(self) -> list[str]:
        exe = os.path.join(REPO, ".venv", "bin", "pyoverlay")
        return [exe] if os.access(exe, os.X_OK) else [sys.executable, "-m", "pyoverlay_cli"]

    def env(self) -> dict:
        return dict(os.environ, PYOVERLAY_STATE_DIR=self.state_dir)

    def _mount(self) -> None:
        argv = self.cli() + [
            "mount",
            self.lowerdir,
            self.upper,
            self.merged,
            "--workdir",
            self.work,
            "--log",
            self.logfile,
        ]
        opts = self.options + ([f"engine={self.engine}"] if self.engine else [])
        if opts:
            argv += ["-o", ",".join(opts)]
            if "volatile" in self.options:
                # the previous mount of this run was unmounted cleanly: its upper is whole,
                # so the kernel's volatile marker may go (what its docs tell users to do)
                shutil.rmtree(os.path.join(self.work, "work", "incompat"), ignore_errors=True)
        run(argv, env=self.env(), timeout=60)
        rec = mount_record(self.state_dir, self.merged)
        self._pid = rec["pid"] if rec else None
        if self._pid is None:
            raise BenchError(f"no pyoverlay mount record for {self.merged} in {self.state_dir}")
        self.served_engine = (rec.get("config") or {}).get("engine")
        if self.engine and self.served_engine != self.engine:
            raise BenchError(f"{self.name}: the server runs engine {self.served_engine!r}, not {self.engine!r}")

    def server_pid(self) -> int | None:
        return self._pid

    def _unmount(self) -> None:
        # what `pyoverlay umount` does (fusermount3 -u, wait for the server), minus a
        # Python start-up per remount
        self._note_peak()
        try:
            unmount(self.merged, timeout=90)
            failed = "still mounted" if is_mounted(self.merged) else None
        except (UnmountError, subprocess.TimeoutExpired) as e:
            failed = str(e)
        if failed:
            self.log(f"pyoverlay: unmount failed ({failed}); forcing")
            force_unmount(self.merged)
        _reap(self._pid, self.name)
        self._pid = None


def mount_record(state_dir: str, merged: str) -> dict | None:
    """pyoverlay's mount record of *merged* (``mount-*.json``, see overlayfs_py/state.py):
    the server's pid and its configuration."""
    mp = os.path.realpath(merged)
    for path in glob.glob(os.path.join(state_dir, "mount-*.json")):
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        if data.get("mountpoint") == mp and isinstance(data.get("pid"), int):
            return data
    return None


def _reap(pid: int | None, what: str) -> None:
    """Wait for a server we started to exit; SIGTERM, then SIGKILL it (by pid only)."""
    if pid is None:
        return
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
        if wait_pid_gone(pid, 10 if sig is None else 5):
            return
    raise BenchError(f"{what} server {pid} does not exit")


class PyoverlayDirect(Pyoverlay):
    name = "pyoverlay-direct"
    engine = ENGINES[name]


class PyoverlayPyfuse3(Pyoverlay):
    name = "pyoverlay-pyfuse3"
    engine = ENGINES[name]


CLASSES = {c.name: c for c in (Native, Kernel, FuseOverlayfs, Pyoverlay, PyoverlayDirect, PyoverlayPyfuse3)}


def make(names: list[str], layers: Layers, base: str, log) -> list[Impl]:
    return [CLASSES[n](layers, base, log) for n in names]
