"""Mount helpers: pyoverlay (through its CLI contract), the kernel's overlayfs
(the oracle), fuse-overlayfs (dev stand-in only) and tmpfs.

All context managers ALWAYS unmount on exit, whatever happened inside.
``is_mounted`` / ``mounts_under`` read /proc/self/mountinfo and never touch
the mounted filesystem itself (a hung FUSE server cannot hang them).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from overlayfs_py import mountinfo

REPO_ROOT = Path(__file__).resolve().parents[2]

#: log files of every pyoverlay server started in this process, in start
#: order; conftest attaches the tails of the ones a failing test started.
SERVER_LOGS: list[Path] = []

FUSERMOUNT = "fusermount3"

#: ``PYOVERLAY_ENGINE=direct|pyfuse3`` (the product's own variable, config.ENGINE_ENV): every
#: pyoverlay mount of the tests gets ``-o engine=...`` (unless it names one itself), and the
#: runner's mounts inherit it; unset: the default engine. scripts/test runs the suite on each.
ENGINE_ENV = "PYOVERLAY_ENGINE"

#: ``PYOVERLAY_TEST_PASSTHROUGH=auto|on|off``: every pyoverlay mount gets ``-o passthrough=...``
#: (unless it names it itself); unset: the default.
PASSTHROUGH_ENV = "PYOVERLAY_TEST_PASSTHROUGH"

#: seconds a pyoverlay mount may stay in use before the watchdog aborts it
DEFAULT_WATCHDOG = float(os.environ.get("PYOVERLAY_TEST_WATCHDOG", "120"))


class MountError(AssertionError):
    """A mount could not be set up or torn down (reported as a test failure)."""


# --------------------------------------------------------------------------
# mountinfo
# --------------------------------------------------------------------------

from overlayfs_py.unmount import UnmountError, try_unmount, unmount  # noqa: E402

# overlayfs_py.mountinfo is the parser; these take any path (resolved here).


def mount_table() -> list[mountinfo.Mount]:
    return mountinfo.mounts()


def mount_entry(path) -> mountinfo.Mount | None:
    """The topmost mountinfo row whose mountpoint is exactly ``path``."""
    return mountinfo.mount_at(os.path.realpath(path))


def is_mounted(path) -> bool:
    return mount_entry(path) is not None


def mounts_under(prefix) -> list[str]:
    return mountinfo.mounts_under(os.path.realpath(prefix))


FUSECTL = Path("/sys/fs/fuse/connections")


def holds_file_under(pid: int, prefix: str) -> bool:
    """Whether process *pid* has an fd open on a path starting with *prefix* (a server
    building a copy in its workdir or index dir: an unnamed O_TMPFILE file shows there)."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(prefix):
                return True
        except OSError:
            continue
    return False


def abort_fuse_connection(path) -> bool:
    """Abort the FUSE connection of the mount at ``path`` (pending and future
    requests fail with ENOTCONN).  Mounts fusectl if needed.  True if done."""
    row = mount_entry(path)
    if row is None:
        return False
    minor = row.devno.split(":")[1]
    if not (FUSECTL / minor).exists() and not any(r.fstype == "fusectl" for r in mount_table()):
        subprocess.run(
            ["mount", "-t", "fusectl", "none", str(FUSECTL)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
    try:
        (FUSECTL / minor / "abort").write_text("1")
        return True
    except OSError:
        return False


def force_unmount(path) -> None:
    """Best effort: lazily detach whatever is mounted at ``path``."""
    if is_mounted(path):
        try_unmount(str(path), lazy=True)


def _check_layer_path(p) -> str:
    s = os.fspath(p)
    if ":" in s or "," in s:
        raise MountError(f"layer path {s!r} contains ':' or ',' (not supported by the harness)")
    return s


def _tail(path: Path, n: int = 60) -> str:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return f"<cannot read log {path}: {e}>"
    lines = data.decode("utf-8", "replace").splitlines()
    return "\n".join(lines[-n:])


# --------------------------------------------------------------------------
# pyoverlay (the product), via its CLI contract
# --------------------------------------------------------------------------


def pyoverlay_argv(lowers, mountpoint, upper=None, workdir=None, options=(), foreground=True) -> list[str]:
    argv = [sys.executable, "-m", "pyoverlay_cli", "mount"]
    if foreground:
        argv.append("--foreground")
    if workdir is not None:
        argv += ["--workdir", os.fspath(workdir)]
    if options:
        argv += ["-o", ",".join(options)]
    argv.append(":".join(_check_layer_path(lower) for lower in lowers))
    if upper is not None:
        argv.append(_check_layer_path(upper))
    argv.append(os.fspath(mountpoint))
    return argv


def pyoverlay_env() -> dict:
    env = dict(os.environ)
    pp = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + pp if pp else "")
    return env


class PyoverlayMount(contextlib.AbstractContextManager):
    """``with PyoverlayMount(lowers, mnt, upper, workdir, log_path=...) as m:``

    Starts ``python -m pyoverlay_cli mount --foreground ...`` (cwd = repo root,
    PYTHONPATH = repo root), waits until the mount shows up in mountinfo
    (fails with the server's log tail if the server exits first or the
    timeout expires), and on exit always unmounts (fusermount3 -u, fallback
    umount), waits for the server (timeout -> SIGTERM -> SIGKILL) and lazily
    detaches the mount if it is still there.
    """

    kind = "pyoverlay"

    def __init__(
        self,
        lowers,
        mountpoint,
        upper=None,
        workdir=None,
        options=(),
        log_path=None,
        start_timeout: float = 20.0,
        exit_timeout: float = 15.0,
        watchdog: float | None = None,
    ):
        self.lowers = [Path(lower) for lower in lowers]
        self.mountpoint = Path(mountpoint)
        self.upper = Path(upper) if upper is not None else None
        self.workdir = Path(workdir) if workdir is not None else None
        self.options = list(options)
        engine = os.environ.get(ENGINE_ENV)
        if engine and not any(o.startswith("engine=") for o in self.options):
            self.options.append(f"engine={engine}")
        passthrough = os.environ.get(PASSTHROUGH_ENV)
        if passthrough and not any(o.startswith("passthrough=") for o in self.options):
            self.options.append(f"passthrough={passthrough}")
        self.log_path = (
            Path(log_path) if log_path else self.mountpoint.parent / (self.mountpoint.name + ".pyoverlay.log")
        )
        self.start_timeout = start_timeout
        self.exit_timeout = exit_timeout
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None
        self.teardown_notes: list[str] = []
        # a hung FUSE server blocks syscalls uninterruptibly (pytest-timeout
        # cannot help): after ``watchdog`` seconds inside the with-block the
        # FUSE connection is aborted so the test fails instead of hanging.
        self.watchdog = DEFAULT_WATCHDOG if watchdog is None else watchdog
        self.aborted = False
        self._done = threading.Event()

    @property
    def path(self) -> Path:
        return self.mountpoint

    def check_alive(self) -> None:
        """Raise if the watchdog fired or the server died while mounted."""
        if self.aborted:
            raise MountError(
                f"watchdog: {self.kind} at {self.mountpoint} did not finish within "
                f"{self.watchdog}s; the FUSE connection was aborted (server hung?)\n"
                f"--- log tail ({self.log_path}) ---\n{self.log_tail()}"
            )
        if self.proc is not None and self.proc.poll() is not None:
            raise MountError(
                f"{self.kind} server exited with status {self.proc.returncode} while "
                f"mounted\n--- log tail ({self.log_path}) ---\n{self.log_tail()}"
            )

    def _watch(self) -> None:
        if not self._done.wait(self.watchdog):
            self.aborted = True
            abort_fuse_connection(self.mountpoint)

    def argv(self) -> list[str]:
        return pyoverlay_argv(self.lowers, self.mountpoint, self.upper, self.workdir, self.options, foreground=True)

    def log_tail(self, n: int = 60) -> str:
        return _tail(self.log_path, n)

    def __enter__(self):
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        if is_mounted(self.mountpoint):
            raise MountError(f"{self.mountpoint} is already a mountpoint")
        argv = self.argv()
        logf = open(self.log_path, "ab")
        logf.write(("$ " + " ".join(argv) + "\n").encode())
        logf.flush()
        SERVER_LOGS.append(self.log_path)
        try:
            self.proc = subprocess.Popen(
                argv,
                cwd=REPO_ROOT,
                env=pyoverlay_env(),
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
            )
        finally:
            logf.close()
        deadline = time.monotonic() + self.start_timeout
        while True:
            if is_mounted(self.mountpoint):
                if self.watchdog:
                    threading.Thread(target=self._watch, daemon=True).start()
                return self
            rc = self.proc.poll()
            if rc is not None:
                raise MountError(
                    f"pyoverlay server exited with status {rc} before {self.mountpoint} "
                    f"was mounted\n$ {' '.join(argv)}\n--- log tail ({self.log_path}) ---\n"
                    f"{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self._stop()
                raise MountError(
                    f"pyoverlay did not mount {self.mountpoint} within {self.start_timeout}s"
                    f"\n$ {' '.join(argv)}\n--- log tail ({self.log_path}) ---\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.05)

    def unmount(self) -> None:
        """Unmount now (what ``__exit__`` does); idempotent."""
        self._stop()

    def _stop(self) -> None:
        self._done.set()
        if is_mounted(self.mountpoint):
            try:  # fusermount3 -u, then umount (overlayfs_py.unmount)
                unmount(str(self.mountpoint), timeout=20)
            except UnmountError as e:
                self.teardown_notes.append(f"unmount failed: {e}")
            except subprocess.TimeoutExpired as e:
                self.teardown_notes.append(f"{' '.join(e.cmd)} timed out; aborting the connection")
                abort_fuse_connection(self.mountpoint)
        if self.proc is not None and self.returncode is None:
            try:
                self.returncode = self.proc.wait(self.exit_timeout)
            except subprocess.TimeoutExpired:
                self.teardown_notes.append("server did not exit after unmount; SIGTERM")
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.returncode = self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.teardown_notes.append("server ignored SIGTERM; SIGKILL")
                    self.proc.kill()
                    self.returncode = self.proc.wait(5)
        if is_mounted(self.mountpoint):
            self.teardown_notes.append("still mounted after the server exited; lazy unmount")
            abort_fuse_connection(self.mountpoint)
            force_unmount(self.mountpoint)

    def __exit__(self, *exc):
        self._stop()
        return False


# --------------------------------------------------------------------------
# the kernel's overlayfs (oracle)
# --------------------------------------------------------------------------


class KernelOverlay(contextlib.AbstractContextManager):
    """``mount -t overlay``; always unmounted on exit.  Without ``upper`` it
    is a read-only overlay, for which the kernel needs >= 2 lowers."""

    kind = "kernel"

    def __init__(self, lowers, mountpoint, upper=None, workdir=None, options=(), **_ignored):
        self.log_path = None
        self.lowers = [Path(lower) for lower in lowers]
        self.mountpoint = Path(mountpoint)
        self.upper = Path(upper) if upper is not None else None
        self.workdir = Path(workdir) if workdir is not None else None
        self.options = list(options)
        if self.upper is None and len(self.lowers) < 2:
            raise MountError("a read-only kernel overlay needs at least 2 lower layers")
        if (self.upper is None) != (self.workdir is None):
            raise MountError("kernel overlay: upperdir and workdir go together")

    @property
    def path(self) -> Path:
        return self.mountpoint

    def log_tail(self, n: int = 60) -> str:
        return ""

    def check_alive(self) -> None:
        pass

    def optstring(self) -> str:
        opts = ["lowerdir=" + ":".join(_check_layer_path(lower) for lower in self.lowers)]
        if self.upper is not None:
            opts += [f"upperdir={_check_layer_path(self.upper)}", f"workdir={_check_layer_path(self.workdir)}"]
        return ",".join(opts + self.options)

    def __enter__(self):
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        if self.workdir is not None:
            self.workdir.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", self.optstring(), str(self.mountpoint)],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            dmesg = subprocess.run(["dmesg"], capture_output=True, text=True).stdout
            tail = "\n".join(line for line in dmesg.splitlines()[-10:] if "overlay" in line)
            raise MountError(f"kernel overlay mount failed: {r.stderr.strip()}\noptions: {self.optstring()}\n{tail}")
        return self

    def unmount(self) -> None:
        if is_mounted(self.mountpoint):
            r = subprocess.run(["umount", str(self.mountpoint)], capture_output=True, text=True)
            if r.returncode != 0:
                subprocess.run(["umount", "-l", str(self.mountpoint)])

    def __exit__(self, *exc):
        self.unmount()
        return False


# --------------------------------------------------------------------------
# fuse-overlayfs: ONLY a stand-in to self-test the harness (known divergences:
# no xattr whiteouts, no escaped overlay.overlay.* xattrs, OCI .wh. names,
# one lowerdir is enough for read-only, no ST_RDONLY)
# --------------------------------------------------------------------------


class FuseOverlayfsMount(PyoverlayMount):
    kind = "fuse-overlayfs"

    def argv(self) -> list[str]:
        opts = ["lowerdir=" + ":".join(_check_layer_path(lower) for lower in self.lowers)]
        if self.upper is not None:
            wd = self.workdir or self.mountpoint.parent / (self.mountpoint.name + ".fwork")
            wd.mkdir(parents=True, exist_ok=True)
            opts += [f"upperdir={self.upper}", f"workdir={wd}"]
        return ["fuse-overlayfs", "-f", "-o", ",".join(opts + self.options), str(self.mountpoint)]


class TmpfsMount(contextlib.AbstractContextManager):
    def __init__(self, mountpoint, size: str = "64m"):
        self.mountpoint = Path(mountpoint)
        self.size = size

    @property
    def path(self) -> Path:
        return self.mountpoint

    def __enter__(self):
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size}", "tmpfs", str(self.mountpoint)], check=True)
        return self

    def __exit__(self, *exc):
        if is_mounted(self.mountpoint):
            r = subprocess.run(["umount", str(self.mountpoint)], capture_output=True)
            if r.returncode != 0:
                subprocess.run(["umount", "-l", str(self.mountpoint)])
        return False


# --------------------------------------------------------------------------
# the implementation under test
# --------------------------------------------------------------------------

#: ``PYOVERLAY_TEST_SUBJECT`` selects what the tests treat as "the product".
#: Default (and the only value for real runs): ``pyoverlay``.  ``kernel`` and
#: ``fuse-overlayfs`` exist only to self-test the harness while pyoverlay is
#: not usable; results with them are NOT results about pyoverlay.
SUBJECTS = {
    "pyoverlay": PyoverlayMount,
    "kernel": KernelOverlay,
    "fuse-overlayfs": FuseOverlayfsMount,
}


def engine_name() -> str:
    """The FUSE engine pyoverlay's mounts in this test run use (``PYOVERLAY_ENGINE``,
    else the default)."""
    from overlayfs_py.config import MountConfig

    return os.environ.get(ENGINE_ENV) or MountConfig.engine


def subject_name() -> str:
    name = os.environ.get("PYOVERLAY_TEST_SUBJECT", "pyoverlay")
    if name not in SUBJECTS:
        raise MountError(f"PYOVERLAY_TEST_SUBJECT={name!r}: want one of {sorted(SUBJECTS)}")
    return name


def subject_mount(lowers, mountpoint, upper=None, workdir=None, options=(), log_path=None, watchdog=None):
    """A mount of the implementation under test (pyoverlay unless overridden
    for harness self-tests)."""
    cls = SUBJECTS[subject_name()]
    return cls(lowers, mountpoint, upper=upper, workdir=workdir, options=options, log_path=log_path, watchdog=watchdog)
