"""Running pyoverlay as an ordinary user, from a test that runs as root.

``scripts/setup`` adds the user ``pyoverlay-test`` (with the /etc/subuid and /etc/subgid
ranges useradd gives every regular user) and makes /dev/fuse 0666 as Debian ships it.
A :class:`User` runs commands as that user with ``setpriv`` and a clean environment, in
a private directory it owns; :func:`leftover_check` fails a test that leaves one of the
user's mounts or processes behind, and removes them.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import stat
import subprocess
import time
import uuid
from pathlib import Path

from overlayfs_py.procfs import process_start_time
from overlayfs_py.procfs import stat as proc_stat

from . import mounts

USER = "pyoverlay-test"
BASE = Path("/tmp/pyoverlay-rootless")
VENV_BIN = mounts.REPO_ROOT / ".venv" / "bin"


def skip_reason() -> str | None:
    """Why the rootless tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root to act as the ordinary user pyoverlay-test (setpriv)"
    try:
        pwd.getpwnam(USER)
    except KeyError:
        return f"no user {USER} (scripts/setup adds it)"
    if not os.path.exists("/dev/fuse") or os.stat("/dev/fuse").st_mode & 0o006 != 0o006:
        return "/dev/fuse is not open to ordinary users (scripts/setup makes it 0666)"
    if shutil.which("fusermount3") is None:
        return "needs fusermount3"
    if shutil.which("setpriv") is None:
        return "needs setpriv (util-linux)"
    return None


def with_test_engine(argv: list[str]) -> list[str]:
    """*argv* with ``-o engine=E`` after a pyoverlay ``mount`` when ``PYOVERLAY_ENGINE``
    names one (as ``mounts.PyoverlayMount`` does for root's mounts), unless it names its own."""
    engine = os.environ.get(mounts.ENGINE_ENV)
    if not engine or any("engine=" in a for a in argv):
        return argv
    for i, arg in enumerate(argv[:-1]):
        if os.path.basename(arg) in ("pyoverlay", "pyoverlay_cli") and argv[i + 1] == "mount":
            return [*argv[: i + 2], "-o", f"engine={engine}", *argv[i + 2 :]]
    return argv


class User:
    """The test user, with a fresh directory of its own (``self.dir``)."""

    def __init__(self) -> None:
        pw = pwd.getpwnam(USER)
        self.name, self.uid, self.gid, self.home = pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir
        BASE.mkdir(mode=0o755, exist_ok=True)
        os.chmod(BASE, 0o755)
        self.dir = BASE / uuid.uuid4().hex[:12]
        self.dir.mkdir(mode=0o755)
        os.chown(self.dir, self.uid, self.gid)
        self.state_dir = self.dir / "state"
        self.data_dir = self.dir / "data"
        # Every process this test starts carries the tag in its environment, or descends
        # from one that does (a container's processes get a fresh environment): so the
        # leftover check sees this test's processes only, not another test's running
        # as the same user at the same time.
        self.tag = f"PYOVERLAY_TEST_TAG={self.dir.name}".encode()

    # -- running things as the user ---------------------------------------------------------
    def env(self, extra: dict | None = None) -> dict:
        env = {
            "HOME": self.home,
            "USER": self.name,
            "LOGNAME": self.name,
            "PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "LANG": "C.UTF-8",
            "PYOVERLAY_STATE_DIR": str(self.state_dir),
            "PYOVERLAY_DATA_DIR": str(self.data_dir),
            "PYOVERLAY_TEST_TAG": self.dir.name,
        }
        if os.environ.get(mounts.ENGINE_ENV):  # the engine under test, as for root's mounts
            env[mounts.ENGINE_ENV] = os.environ[mounts.ENGINE_ENV]
        env.update(extra or {})
        return env

    def argv(self, args) -> list[str]:
        return [
            "setpriv",
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            "--init-groups",
            "--inh-caps=-all",
            "--",
            *with_test_engine(list(map(str, args))),
        ]

    def run(
        self, args, *, check: bool = False, timeout: float = 120, env: dict | None = None, **kw
    ) -> subprocess.CompletedProcess:
        """Run *args* as the user (cwd: the user's directory); text output captured."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("cwd", self.dir)
        return subprocess.run(self.argv(args), check=check, timeout=timeout, env=self.env(env), **kw)

    def sh(self, script: str, **kw) -> subprocess.CompletedProcess:
        return self.run(["sh", "-ec", script], **kw)

    def pyoverlay(self, *args, **kw) -> subprocess.CompletedProcess:
        return self.run([VENV_BIN / "pyoverlay", *args], **kw)

    def mkdirs(self, *names: str) -> list[Path]:
        """Directories in ``self.dir`` owned by the user."""
        out = []
        for name in names:
            p = self.dir / name
            p.mkdir(parents=True, exist_ok=True)
            os.chown(p, self.uid, self.gid)
            out.append(p)
        return out

    def chown_tree(self, path: Path) -> None:
        for root, dirs, files in os.walk(path):
            for n in [root, *(os.path.join(root, d) for d in dirs), *(os.path.join(root, f) for f in files)]:
                os.lchown(n, self.uid, self.gid)

    # -- what the user left behind ------------------------------------------------------------
    def mounts(self) -> list[str]:
        return mounts.mounts_under(self.dir)

    def subuid_ranges(self) -> list[tuple[int, int]]:
        """The user's (start, count) ranges in /etc/subuid."""
        out = []
        with contextlib.suppress(OSError), open("/etc/subuid") as f:
            for line in f:
                parts = line.strip().split(":")
                if len(parts) == 3 and parts[0] in (self.name, str(self.uid)):
                    out.append((int(parts[1]), int(parts[2])))
        return out

    def owns(self, host_uid: int) -> bool:
        """Whether *host_uid* is the user's own or one of its subordinate ids."""
        return host_uid == self.uid or any(s <= host_uid < s + n for s, n in self.subuid_ranges())

    def processes(self) -> list[int]:
        """Pids of this test's live processes: running as the user or one of its
        subordinate ids (host view), tagged or descending from a tagged one."""
        out = []
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                if self.owns(os.stat(f"/proc/{d}").st_uid) and not _gone(int(d)) and self._ours(int(d)):
                    out.append(int(d))
            except OSError:
                pass
        return out

    def _ours(self, pid: int) -> bool:
        for _ in range(64):  # up the parent chain
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if self.tag in f.read().split(b"\0"):
                        return True
                pid = proc_stat(pid).ppid
            except (OSError, ValueError):
                return False
            if pid <= 1:
                return False
        return False

    def cleanup(self) -> list[str]:
        """Unmount and kill what is left (returns a description of it), remove the dir."""
        left = []
        for _ in range(50):
            procs = self.processes()
            if not procs:
                break
            if _ == 0:
                left.append(f"processes {procs}")
            for pid in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        for mp in sorted(self.mounts(), key=len, reverse=True):
            left.append(f"mount {mp}")
            subprocess.run(["umount", "-l", mp], capture_output=True)
        _rmtree(self.dir)
        return left


def _gone(pid: int) -> bool:
    """Exited, or a zombie (its parent reaps it)."""
    return process_start_time(pid) is None


def _rmtree(path: Path) -> None:
    def onerror(func, p, exc):
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(p), 0o755)
            st = os.lstat(p)
            if stat.S_ISDIR(st.st_mode):
                os.chmod(p, 0o755)
            func(p)

    shutil.rmtree(path, onerror=onerror)


def busybox_image(user: User, name: str, owned_by_user: bool) -> Path:
    """A busybox rootfs (tests/helpers/rootfs.py) in the user's directory, readable by the
    user: owned by root as an image pulled by root is, or by the user (an image the user
    built or imported)."""
    from .rootfs import build_busybox_rootfs

    root = build_busybox_rootfs(user.dir / name)
    if owned_by_user:
        user.chown_tree(root)
    return root
