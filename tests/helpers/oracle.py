"""Mount a named stack with the kernel (oracle) or the implementation under
test, in one of three modes, and take comparable snapshots.

Modes (see ``Stack.modes``):

* ``ro``    -- lowers only (read-only overlay; the kernel needs >= 2 lowers);
* ``rw``    -- a fresh EMPTY upper + workdir for every mount (kernel and
               subject never share them).  Both fresh uppers live in the same
               parent dir and get the same mode/owner/mtime, so the only
               legitimate differences are the identity of the upper root dir
               itself (st_ino, ctime); ``normalize`` replaces those by tokens;
* ``upper`` -- the stack's prepared upper, used by ONE mount at a time (the
               kernel first, then the subject), each with its own fresh workdir.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from dataclasses import dataclass
from pathlib import Path

from . import mounts
from .snapshot import snapshot
from .stacks import T_UPPER, Stack, build_stack, set_root_attrs

UPPER_ROOT_INO = "<ino of this mount's upper root>"
UPPER_ROOT_CTIME = "<ctime of this mount's upper root>"


@dataclass
class View:
    kind: str  # "kernel" or the subject's name
    mode: str
    path: Path  # the mountpoint
    upper: Path | None
    mount: object  # the mount context manager object

    def check_alive(self):
        self.mount.check_alive()

    def snapshot(self, **kw) -> dict:
        try:
            snap = snapshot(self.path, **kw)
        except OSError:
            self.check_alive()  # a hung/dead server explains the error better
            raise
        self.check_alive()
        broken = [
            p
            for p, r in snap["entries"].items()
            if any(isinstance(v, str) and ("ENOTCONN" in v or "ECONNABORTED" in v) for v in r.values())
        ]
        if broken:
            proc = getattr(self.mount, "proc", None)
            if proc is not None:
                try:
                    proc.wait(3)  # let a crashing server finish writing its log
                except Exception:  # noqa: BLE001
                    pass
            tail = self.mount.log_tail() if hasattr(self.mount, "log_tail") else ""
            raise mounts.MountError(
                f"the FUSE connection of {self.kind} at {self.path} broke during the walk "
                f"(ENOTCONN/ECONNABORTED on {len(broken)} entries, first {broken[0]!r}); "
                f"server crashed or aborted?\n--- log tail ---\n{tail}"
            )
        return self.normalize(snap)

    def normalize(self, snap: dict) -> dict:
        if self.mode != "rw" or self.upper is None:
            return snap
        st = os.lstat(self.upper)
        for rec in snap["entries"].values():
            for k in ("ino", "d_ino", "dot_d_ino", "dotdot_d_ino"):
                if rec.get(k) == st.st_ino:
                    rec[k] = UPPER_ROOT_INO
        root = snap["entries"].get(".")
        if root is not None and root.get("ctime_ns") == st.st_ctime_ns:
            root["ctime_ns"] = UPPER_ROOT_CTIME
        snap["problems"] = [p.replace(str(st.st_ino), UPPER_ROOT_INO) for p in snap["problems"]]
        return snap


class Lab:
    """Builds named stacks (once each) under ``base`` and mounts them."""

    def __init__(self, base: Path):
        self.base = Path(base)
        self._stacks: dict[str, Stack] = {}
        self._cache: dict = {}
        self._counter = itertools.count(1)
        self._uppers_in_use: set[Path] = set()
        self._hung: dict[str, str] = {}  # stack name -> watchdog message

    def stack(self, name: str) -> Stack:
        if name not in self._stacks:
            self._stacks[name] = build_stack(name, self.base / "stacks" / name)
        return self._stacks[name]

    def scratch(self, label: str) -> Path:
        p = self.base / "mounts" / f"{next(self._counter):04d}-{label}"
        p.mkdir(parents=True)
        return p

    def _pair_dir(self, stack: Stack) -> Path:
        p = self.base / "mounts" / f"uppers-{stack.name}"
        p.mkdir(parents=True, exist_ok=True)
        return p

    @contextlib.contextmanager
    def view(self, stack: Stack, mode: str, impl: str = "subject", *, extra_options=(), watchdog=None):
        """Mount ``stack`` in ``mode`` with ``impl`` ("kernel" or "subject");
        yields a ``View``; always unmounts."""
        if mode not in stack.modes and not (mode == "rw" and stack.upper is None):
            raise ValueError(f"stack {stack.name} does not support mode {mode}")
        if impl != "kernel" and stack.name in self._hung:
            raise mounts.MountError(
                f"not mounting stack {stack.name!r} again: the subject hung on it earlier in "
                f"this session (fail fast instead of waiting for the watchdog again):\n"
                f"{self._hung[stack.name]}"
            )
        tag = "k" if impl == "kernel" else "s"
        scratch = self.scratch(f"{stack.name}-{mode}-{tag}")
        mnt = scratch / "mnt"
        upper = workdir = None
        if mode == "rw":
            n = next(self._counter)
            upper = self._pair_dir(stack) / f"{tag}-upper-{n}"
            upper.mkdir()
            set_root_attrs(upper, mode=0o755, uid=0, gid=0, mtime_ns=T_UPPER)
            workdir = scratch / "work"
        elif mode == "upper":
            upper = stack.upper
            workdir = scratch / "work"
        if workdir is not None:
            workdir.mkdir()
        options = list(stack.options) + list(extra_options)
        if upper is not None:
            if upper in self._uppers_in_use:
                raise mounts.MountError(f"upper {upper} is already used by a live mount")
            self._uppers_in_use.add(upper)
        try:
            if impl == "kernel":
                cm = mounts.KernelOverlay(stack.lowers, mnt, upper=upper, workdir=workdir, options=options)
                kind = "kernel"
            else:
                cm = mounts.subject_mount(
                    stack.lowers,
                    mnt,
                    upper=upper,
                    workdir=workdir,
                    options=options,
                    log_path=scratch / "server.log",
                    watchdog=watchdog,
                )
                kind = mounts.subject_name()
            with cm as m:
                try:
                    yield View(kind, mode, mnt, upper, m)
                finally:
                    if getattr(m, "aborted", False):
                        self._hung[stack.name] = f"watchdog aborted {kind} on {stack.name} [{mode}]; log: {m.log_path}"
        finally:
            if upper is not None:
                self._uppers_in_use.discard(upper)

    def snapshots(self, name: str, mode: str, watchdog=None) -> tuple[dict, dict]:
        """(kernel snapshot, subject snapshot) of a stack; cached, including a
        failure of the subject (re-raised for every test that asks)."""
        key = (name, mode, mounts.engine_name())  # the engine under test counts
        if key not in self._cache:
            stack = self.stack(name)
            try:
                with self.view(stack, mode, "kernel") as kv:
                    ks = kv.snapshot()
                with self.view(stack, mode, "subject", watchdog=watchdog) as sv:
                    ss = sv.snapshot()
                self._cache[key] = (ks, ss)
            except BaseException as e:  # noqa: BLE001 - cached and re-raised
                if not isinstance(e, Exception):
                    raise
                self._cache[key] = e
        val = self._cache[key]
        if isinstance(val, Exception):
            raise val
        return val
