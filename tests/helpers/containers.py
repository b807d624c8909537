"""Helpers for the ``pyoverlay run`` tests: run the CLI with private state and
data dirs, read ``ps --json``, inspect processes, and find leftovers.

``Runtime(base)`` owns ``base/state`` (PYOVERLAY_STATE_DIR) and ``base/data``
(PYOVERLAY_DATA_DIR), so nothing touches /run/pyoverlay or /var/lib/pyoverlay
and every mount the runner makes lies under the test's tmp dir (the conftest's
leftover-mount check covers it).

``leftover_check(rt)`` is a context manager for an autouse fixture: it fails
the test if, afterwards, a container process (a process in a pid namespace
other than ours that appeared during the test), a runner process (one whose
environment carries this runtime's PYOVERLAY_STATE_DIR), a cgroup under
``/sys/fs/cgroup/*/pyoverlay/`` or a mount under the runtime's dirs is left;
then it cleans all of that up (``rm -f`` of every container, SIGKILL, rmdir).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from overlayfs_py import procfs

from . import mounts

#: seconds any single CLI call may take before the test fails (a hang fails,
#: it does not block the run)
CLI_TIMEOUT = float(os.environ.get("PYOVERLAY_RUN_TIMEOUT", "60"))

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DOCKER_CAPBND = 0x00000000A80425FB
ID_RE = re.compile(r"^[0-9a-f]{64}$")


def pyoverlay_cmd() -> list[str]:
    """The console script next to our interpreter (the way users run it);
    ``python -m pyoverlay_cli`` if it is not installed."""
    script = Path(sys.executable).parent / "pyoverlay"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "pyoverlay_cli"]


def describe(r) -> str:
    """A CompletedProcess as text for assertion messages."""
    argv = r.args if isinstance(r.args, list) else [r.args]
    return (
        f"$ {' '.join(map(str, argv))}\nexit status {r.returncode}\n"
        f"--- stdout ---\n{_text(r.stdout)}\n--- stderr ---\n{_text(r.stderr)}"
    )


def _text(x) -> str:
    if x is None:
        return ""
    if isinstance(x, bytes):
        x = x.decode(errors="replace")
    return x[-4000:]


class CLIHang(AssertionError):
    pass


class Runtime:
    def __init__(self, base: Path):
        self.base = Path(base)
        self.state = self.base / "state"
        self.data = self.base / "data"
        self.state.mkdir(parents=True, exist_ok=True)
        self.data.mkdir(parents=True, exist_ok=True)
        self.env = mounts.pyoverlay_env()
        self.env["PYOVERLAY_STATE_DIR"] = str(self.state)
        self.env["PYOVERLAY_DATA_DIR"] = str(self.data)
        # a variable that must NOT leak into containers
        self.env["PYOVERLAY_TEST_HOST_ONLY"] = "leaked"
        # --network's default: none, not root's bridge, which would make the bridge, its
        # nftables table and ip_forward on the host; the network tests run their runtime
        # in a private network namespace (helpers/netns.py) with the real default
        self.env["PYOVERLAY_NETWORK"] = "none"

    @property
    def env_marker(self) -> bytes:
        return f"PYOVERLAY_STATE_DIR={self.state}".encode()

    def argv(self, *args) -> list[str]:
        return pyoverlay_cmd() + [os.fspath(a) for a in args]

    def cli(
        self, *args, timeout: float = CLI_TIMEOUT, input=None, stdin=None, env: dict | None = None, text: bool = True
    ) -> subprocess.CompletedProcess:
        """``pyoverlay ARGS...`` with captured output.  stdin is /dev/null
        unless ``input`` or ``stdin`` is given.  A call that outlives
        ``timeout`` is killed and fails the test (CLIHang)."""
        argv = self.argv(*args)
        e = dict(self.env)
        if env:
            e.update(env)
        if input is None and stdin is None:
            stdin = subprocess.DEVNULL
        try:
            return subprocess.run(
                argv,
                input=input,
                stdin=stdin,
                capture_output=True,
                text=text,
                env=e,
                cwd=mounts.REPO_ROOT,
                timeout=timeout,
                errors="replace" if text else None,
            )
        except subprocess.TimeoutExpired as ex:
            raise CLIHang(
                f"$ {' '.join(argv)}\ndid not finish within {timeout}s\n"
                f"--- stdout ---\n{_text(ex.stdout)}\n"
                f"--- stderr ---\n{_text(ex.stderr)}"
            ) from None

    def run(self, *args, **kw) -> subprocess.CompletedProcess:
        """``pyoverlay run ARGS...``"""
        return self.cli("run", *args, **kw)

    def popen(self, *args, **kw) -> subprocess.Popen:
        kw.setdefault("env", self.env)
        kw.setdefault("cwd", mounts.REPO_ROOT)
        return subprocess.Popen(self.argv(*args), **kw)

    def ok(self, *args, **kw) -> subprocess.CompletedProcess:
        """``pyoverlay ARGS...`` that must exit 0."""
        r = self.cli(*args, **kw)
        assert r.returncode == 0, describe(r)
        return r

    def detach(self, *run_args) -> str:
        """``pyoverlay run -d RUN_ARGS...``; returns the id it printed."""
        r = self.cli("run", "-d", *run_args)
        assert r.returncode == 0, describe(r)
        cid = r.stdout.strip()
        assert ID_RE.match(cid), f"run -d must print the 64-hex id, got {r.stdout!r}\n" + describe(r)
        return cid

    # ---- ps --json ---------------------------------------------------------

    def ps(self, all: bool = True) -> list[dict]:
        r = self.ok("ps", *(["-a"] if all else []), "--json")
        try:
            data = json.loads(r.stdout)
        except ValueError as e:
            raise AssertionError(f"ps --json is not JSON ({e}):\n{describe(r)}") from None
        assert isinstance(data, list), f"ps --json must be a list: {r.stdout!r}"
        return data

    def find(self, ref: str) -> dict | None:
        """The ``ps -a --json`` entry for a full id or name (None if absent)."""
        for c in self.ps(all=True):
            if c.get("id") == ref or c.get("name") == ref:
                return c
        return None

    def wait_status(self, ref: str, want=("exited",), timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            c = self.find(ref)
            if c is not None and c.get("status") in want:
                return c
            if time.monotonic() > deadline:
                raise AssertionError(f"container {ref} did not reach status {want} within {timeout}s: {c}")
            time.sleep(0.1)

    # ---- what is on disk ----------------------------------------------------

    def state_entries(self) -> list[str]:
        d = self.state / "containers"
        return sorted(p.name for p in d.iterdir() if not p.name.startswith(".")) if d.is_dir() else []

    def data_entries(self) -> list[str]:
        d = self.data / "containers"
        return sorted(p.name for p in d.iterdir() if not p.name.startswith(".")) if d.is_dir() else []

    def mounts(self) -> list[str]:
        return mounts.mounts_under(self.base)

    def remove_all(self) -> list[str]:
        """``rm -f`` every container this runtime knows; returns problems."""
        problems = []
        try:
            r = self.cli("ps", "-a", "--json", timeout=30)
            ids = [c["id"] for c in json.loads(r.stdout)] if r.returncode == 0 else []
        except (AssertionError, ValueError, KeyError, TypeError):
            ids = self.state_entries()
        for cid in ids:
            try:
                r = self.cli("rm", "-f", cid, timeout=60)
                if r.returncode != 0:
                    problems.append(f"cleanup: rm -f {cid} failed:\n{describe(r)}")
            except AssertionError as e:
                problems.append(f"cleanup: {e}")
        return problems


# --------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------


def host_pidns() -> str:
    return os.readlink("/proc/self/ns/pid")


def pidns_of(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def proc_stat(pid: int) -> procfs.Stat | None:
    """comm, state, ppid, start_time of a process (None if gone)."""
    try:
        return procfs.stat(pid)
    except OSError:
        return None


alive = procfs.alive


def status_field(pid: int, key: str) -> str | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k == key:
                    return v.strip()
    except OSError:
        return None
    return None


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def foreign_pidns_procs() -> dict[tuple[int, int], str]:
    """(pid, starttime) -> pid-ns link of every process NOT in our pid ns."""
    ours = host_pidns()
    out = {}
    for pid in all_pids():
        ns = pidns_of(pid)
        st = proc_stat(pid)
        if ns is None or st is None or ns == ours:
            continue
        out[(pid, st.start_time)] = ns
    return out


def procs_with_env(marker: bytes) -> list[int]:
    out = []
    for pid in all_pids():
        if pid == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if marker in env:
            out.append(pid)
    return out


def procs_rooted_under(path) -> list[int]:
    """Processes whose root directory is ``path`` or below it."""
    p = os.path.realpath(path).rstrip("/")
    out = []
    for pid in all_pids():
        try:
            root = os.readlink(f"/proc/{pid}/root")
        except OSError:
            continue
        if root == p or root.startswith(p + "/"):
            out.append(pid)
    return out


def describe_pid(pid: int) -> str:
    st = proc_stat(pid)
    if st is None:
        return f"pid {pid} (gone): {cmdline(pid)}"
    return f"pid {pid} ({st.state}, ppid {st.ppid}): {cmdline(pid) or st.comm}"


def wait_gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# --------------------------------------------------------------------------
# cgroups
# --------------------------------------------------------------------------

CGROUP_GLOBS = ("/sys/fs/cgroup/*/pyoverlay/*", "/sys/fs/cgroup/pyoverlay/*")


def pyoverlay_cgroups() -> set[str]:
    """Every container cgroup dir (v1: one per controller; v2: one)."""
    out = set()
    for g in CGROUP_GLOBS:
        out.update(p for p in glob.glob(g) if os.path.isdir(p))
    return out


def cgroups_of(cid: str) -> list[str]:
    return sorted(p for p in pyoverlay_cgroups() if os.path.basename(p) == cid)


def read_cgroup_file(cid: str, controller: str, name: str) -> str | None:
    """``name`` of the container's cgroup (v1 controller dir, else v2)."""
    for p in (f"/sys/fs/cgroup/{controller}/pyoverlay/{cid}/{name}", f"/sys/fs/cgroup/pyoverlay/{cid}/{name}"):
        try:
            return Path(p).read_text().strip()
        except OSError:
            continue
    return None


def _remove_cgroup(path: str) -> None:
    for _ in range(50):
        try:
            for pid in Path(path, "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)


# --------------------------------------------------------------------------
# leftovers
# --------------------------------------------------------------------------


def _env_has(pid: int, marker: bytes) -> bool | None:
    """Whether *pid*'s environment holds *marker* (None: gone or unreadable)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return marker in f.read().split(b"\0")
    except OSError:
        return None


def descends_from_marked(pid: int, marker: bytes) -> bool:
    """Whether *pid* or an ancestor carries *marker* in its environment: the runner's
    processes carry the runtime's state dir; a container's processes get a fresh
    environment but descend from their monitor, which carries it."""
    for _ in range(64):  # up the parent chain
        if _env_has(pid, marker):
            return True
        st = proc_stat(pid)
        if st is None or st.ppid <= 1:
            return False
        pid = st.ppid
    return False


def _cgroup_pids(path: str) -> list[int]:
    try:
        return [int(p) for p in Path(path, "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def other_runtimes_alive(marker: bytes) -> bool:
    """Whether a runner of another test runtime (another state dir) is running: then a new
    empty cgroup of unknown origin may be that runtime's, being set up."""
    for pid in all_pids():
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if marker not in env and any(e.startswith(b"PYOVERLAY_STATE_DIR=") for e in env):
            return True
    return False


class _Scope:
    """What of the machine's new container processes and cgroups belongs to *rt*: its
    runner processes and their descendants, and the cgroups they are in or that are named
    by one of its containers. Another test run's containers on the same machine (a second
    suite, a helper's run) are neither reported nor killed."""

    def __init__(self, rt: Runtime, procs_before, cgroups_before):
        self.rt, self.procs_before, self.cgroups_before = rt, procs_before, cgroups_before
        self.known_ids: set[str] = set()

    def note_ids(self) -> None:
        with contextlib.suppress(OSError):
            self.known_ids.update(self.rt.state_entries())

    def ours(self, pid: int) -> bool:
        """A process of this runtime: descends from one of its runner processes, or runs in
        a root directory under the runtime's dirs (a container whose monitor is gone)."""
        if descends_from_marked(pid, self.rt.env_marker):
            return True
        try:
            root = os.readlink(f"/proc/{pid}/root")
        except OSError:
            return False
        base = os.path.realpath(self.rt.base).rstrip("/")
        return root == base or root.startswith(base + "/")

    def procs(self) -> list[int]:
        return [
            pid
            for pid, _start in sorted(set(foreign_pidns_procs()) - set(self.procs_before))
            if alive(pid) and self.ours(pid)
        ]

    def cgroups(self) -> list[str]:
        out = []
        lone = None
        for c in sorted(pyoverlay_cgroups() - self.cgroups_before):
            pids = _cgroup_pids(c)
            if pids:
                if any(self.ours(p) for p in pids):
                    out.append(c)
            elif os.path.basename(c) in self.known_ids:
                out.append(c)
            else:
                if lone is None:
                    lone = not other_runtimes_alive(self.rt.env_marker)
                if lone:
                    out.append(c)
        return out


def find_leftovers(rt: Runtime, procs_before, cgroups_before, scope: _Scope | None = None) -> list[str]:
    """What the test left behind (empty list: nothing)."""
    scope = scope or _Scope(rt, procs_before, cgroups_before)
    problems = []
    for m in rt.mounts():
        problems.append(f"mount left: {m}")
    for c in scope.cgroups():
        problems.append(f"cgroup left: {c}")
    for pid in scope.procs():
        problems.append(f"container process left: {describe_pid(pid)}")
    for pid in procs_with_env(rt.env_marker):
        if alive(pid):
            problems.append(f"runner process left: {describe_pid(pid)}")
    return problems


@contextlib.contextmanager
def leftover_check(rt: Runtime, grace: float = 5.0):
    scope = _Scope(rt, foreign_pidns_procs(), pyoverlay_cgroups())
    yield
    scope.note_ids()
    deadline = time.monotonic() + grace
    while True:
        problems = find_leftovers(rt, scope.procs_before, scope.cgroups_before, scope)
        if not problems or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    # clean up whatever is there, reported or not (a failed test may leave
    # containers running on purpose: they must not disturb the next test)
    problems += rt.remove_all()
    ours = scope.procs()  # before the runner processes die: the chain still leads to them
    for pid in procs_with_env(rt.env_marker):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    for pid in ours:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    for c in scope.cgroups():
        _remove_cgroup(c)
    for m in sorted(rt.mounts(), key=len, reverse=True):
        mounts.abort_fuse_connection(m)
        mounts.force_unmount(m)
    if problems:
        raise AssertionError("the test left things behind (cleaned up now):\n  " + "\n  ".join(problems))


# --------------------------------------------------------------------------
# parsing command output
# --------------------------------------------------------------------------


def ps_table(text: str) -> list[dict]:
    """Rows of a ``ps``/``top``-style table: dicts keyed by the header words;
    the last column takes the rest of the line."""
    lines = [line for line in text.replace("\r", "").splitlines() if line.strip()]
    if not lines:
        return []
    header = lines[0].split()
    rows = []
    for line in lines[1:]:
        parts = line.split(None, len(header) - 1)
        rows.append(dict(zip(header, parts, strict=False)))  # empty trailing columns: fewer parts
    return rows


def interfaces(proc_net_dev: str) -> list[str]:
    """Interface names of a /proc/net/dev text (2 header lines)."""
    out = []
    for line in proc_net_dev.replace("\r", "").splitlines()[2:]:
        if ":" in line:
            out.append(line.split(":", 1)[0].strip())
    return out


def status_map(text: str) -> dict[str, str]:
    out = {}
    for line in text.replace("\r", "").splitlines():
        k, sep, v = line.partition(":")
        if sep:
            out[k.strip()] = v.strip()
    return out
