"""Rootless runs: the container's user namespace, and its FUSE mount made from inside it.

``pyoverlay run`` as an ordinary user (docs/runner.md, "Rootless"):

1. a *holder* process forked by the monitor unshares ``CLONE_NEWUSER``; the monitor
   writes its maps from the parent user namespace (:class:`Plan`): with ``/etc/subuid``
   and ``/etc/subgid`` ranges and the setuid ``newuidmap``/``newgidmap``,
   ``0 UID 1`` + ``1 SUBSTART SUBCOUNT`` (the user is root inside, its ranges 1..N);
   otherwise the one id the kernel lets a user map itself (``setgroups`` deny,
   ``0 UID 1``);
2. the holder, root of that namespace, unshares ``CLONE_NEWNS``, opens ``/dev/fuse``
   and mount(2)s it on the container's merged dir with ``allow_other`` (allowed: the
   mounter is privileged in the namespace that owns the connection) and sends the fd
   back over a socket (``SCM_RIGHTS``);
3. the monitor starts the FUSE server on that fd *outside* the namespace (it keeps the
   user's view of the layers), opens the holder's user and mount namespaces and lets the
   holder exit; later it joins both (:func:`join`) and forks PID 1 from there.

Every failure is a :class:`UsernsError` with one line that names the setting to change.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
from dataclasses import dataclass

from . import _linux as L
from .errors import RunnerError

#: ``run --userns-map``'s choices; the environment variable gives the default.
MAP_MODES = ("auto", "subid", "single")
MAP_ENV = "PYOVERLAY_USERNS_MAP"

FUSE_OPTIONS = "rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions"


class UsernsError(RunnerError):
    pass


# --- the maps ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How the container's ids map to the user's: ``mode`` "subid" or "single"."""

    mode: str
    uid: int  # the user's host uid and gid (root inside)
    gid: int
    subuid: tuple[int, int] | None = None  # (start, count) from /etc/subuid
    subgid: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.mode == "subid" and (self.subuid is None or self.subgid is None):
            raise ValueError("a subid plan needs a subuid and a subgid range")

    def _ranges(self) -> tuple[tuple[int, int], tuple[int, int]] | None:
        """The (subuid, subgid) ranges of a "subid" plan; None for "single"."""
        if self.mode != "subid" or self.subuid is None or self.subgid is None:
            return None
        return self.subuid, self.subgid

    @property
    def size(self) -> int:
        """Number of container ids: 0 (the user) and 1..N (the subordinate range)."""
        ranges = self._ranges()
        return 1 + (min(ranges[0][1], ranges[1][1]) if ranges else 0)

    def kernel_lines(self, kind: str) -> list[tuple[int, int, int]]:
        """``/proc/PID/{uid,gid}_map`` lines: (inside, outside, count)."""
        lines = [(0, self.uid if kind == "uid" else self.gid, 1)]
        ranges = self._ranges()
        if ranges is not None:
            sub = ranges[0] if kind == "uid" else ranges[1]
            lines.append((1, sub[0], self.size - 1))
        return lines

    def storage_map(self, kind: str, users_image: bool) -> tuple[tuple[int, int, int], ...]:
        """The server's map (stored, presented, count): the user's own image (built or
        imported by the user) shifts the user to 0 and the ranges to 1..N, like the kernel
        map; any other (root's) is shown as it is: stored 0..N presented as 0..N."""
        if users_image:
            return tuple((outside, inside, n) for inside, outside, n in self.kernel_lines(kind))
        return ((0, 0, self.size),)

    def describe(self) -> str:
        ranges = self._ranges()
        if ranges is None:
            return f"single id: {self.uid} is root, no other uid inside"
        start = ranges[0][0]
        return f"subid: {self.uid} is root, uids 1..{self.size - 1} are {start}..{start + self.size - 2}"


def _subids(path: str, name: str, uid: int) -> tuple[int, int] | None:
    """The first range of *name* (or *uid*) in /etc/subuid or /etc/subgid."""
    with contextlib.suppress(OSError), open(path) as f:
        for line in f:
            parts = line.strip().split(":")
            if (
                len(parts) == 3
                and parts[0] in (name, str(uid))
                and parts[1].isdigit()
                and parts[2].isdigit()
                and int(parts[2]) > 0
            ):
                return int(parts[1]), int(parts[2])
    return None


def default_mode() -> str:
    return os.environ.get(MAP_ENV) or "auto"


def plan(mode: str) -> tuple[Plan, str | None]:
    """The map to use for *mode* (auto|subid|single); with auto, a note when it falls
    back to a single id. UsernsError when subid is asked for but impossible."""
    if mode not in MAP_MODES:
        raise UsernsError(
            f"invalid user namespace map {mode!r}: expected one of {', '.join(MAP_MODES)} (--userns-map or ${MAP_ENV})"
        )
    uid, gid = os.getuid(), os.getgid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    if mode == "single":
        return Plan("single", uid, gid), None
    missing = []
    subuid = _subids("/etc/subuid", name, uid)
    subgid = _subids("/etc/subgid", name, uid)
    if subuid is None:
        missing.append(f"no range for {name} in /etc/subuid")
    if subgid is None:
        missing.append(f"no range for {name} in /etc/subgid")
    for tool in ("newuidmap", "newgidmap"):
        if shutil.which(tool) is None:
            missing.append(f"{tool} not found (install the uidmap package)")
    if missing:
        if mode == "subid":
            raise UsernsError(f"--userns-map subid: {'; '.join(missing)}")
        return Plan("single", uid, gid), f"{missing[0]}: only root is mapped inside the container"
    return Plan("subid", uid, gid, subuid, subgid), None


# --- machine checks ----------------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def userns_hint() -> str:
    """The setting that forbids unprivileged user namespaces here, if one does."""
    if _read("/proc/sys/user/max_user_namespaces") == "0":
        return "user namespaces are disabled: sysctl user.max_user_namespaces is 0 (set it to e.g. 28633)"
    if _read("/proc/sys/kernel/unprivileged_userns_clone") == "0":
        return "unprivileged user namespaces are disabled: sysctl kernel.unprivileged_userns_clone is 0 (set it to 1)"
    if _read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == "1":
        return (
            "AppArmor restricts unprivileged user namespaces: sysctl "
            "kernel.apparmor_restrict_unprivileged_userns is 1 (set it to 0, or give "
            "pyoverlay an AppArmor profile that allows userns)"
        )
    return ""


def check_machine() -> None:
    """What must hold before anything is created: user namespaces and /dev/fuse."""
    hint = userns_hint()
    if hint and not hint.startswith("AppArmor"):  # AppArmor may still allow us: try
        raise UsernsError(f"cannot run rootless: {hint}")
    if not os.path.exists("/dev/fuse"):
        raise UsernsError("cannot run rootless: /dev/fuse is missing (modprobe fuse)")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise UsernsError(
            "cannot run rootless: no access to /dev/fuse (a distribution makes it "
            "mode 0666: chmod 0666 /dev/fuse, or a udev rule)"
        )


# --- the holder ---------------------------------------------------------------------------


class Holder:
    """The process that owns the container's user namespace until the monitor joins it."""

    def __init__(self, plan: Plan, net: bool = False):
        self.plan = plan
        self.net = net  # also a network namespace, owned by the user namespace (runner/net/slirp.py)
        self.pid: int | None = None
        self.sock: socket.socket | None = None

    def mount(self, merged: str) -> int:
        """Create the namespace, map it, mount FUSE on *merged* inside; return the fd."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:
            parent.close()
            _holder_main(child, merged, self.net)  # never returns
        child.close()
        self.pid, self.sock = pid, parent
        msg = _recv_line(parent)
        if msg != "unshared":
            raise UsernsError(self._error(msg, "cannot create a user namespace"))
        _write_maps(pid, self.plan)
        parent.sendall(b"mapped\n")
        data, fds, _flags, _addr = socket.recv_fds(parent, 4096, 1)
        if not fds:
            raise UsernsError(self._error(data.decode(errors="replace").strip(), "cannot mount the container's root"))
        return fds[0]

    def _error(self, msg: str, what: str) -> str:
        try:
            err = json.loads(msg)
        except ValueError:
            err = {"msg": msg or "the namespace process exited", "errno": 0}
        text = f"{what}: {err['msg']}"
        if err.get("errno") in (errno.EPERM, errno.EACCES, errno.ENOSPC, errno.EINVAL):
            hint = userns_hint()
            if hint:
                text += f" ({hint})"
        return text

    def namespaces(self) -> tuple[int, int]:
        """fds on the holder's user and mount namespaces (close them)."""
        user = os.open(f"/proc/{self.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        try:
            mnt = os.open(f"/proc/{self.pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            os.close(user)
            raise
        return user, mnt

    def ns_path(self, kind: str) -> str:
        """``/proc/PID/ns/KIND`` of the holder (valid while it lives: before :meth:`release`)."""
        return f"/proc/{self.pid}/ns/{kind}"

    def netns(self) -> int:
        """An fd on the holder's network namespace (close it)."""
        return os.open(self.ns_path("net"), os.O_RDONLY | os.O_CLOEXEC)

    def release(self) -> None:
        """Let the holder exit (closing our end is its signal) and reap it."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.pid is not None:
            with contextlib.suppress(ChildProcessError):
                try:
                    os.waitpid(self.pid, 0)
                except KeyboardInterrupt:
                    os.kill(self.pid, signal.SIGKILL)
                    os.waitpid(self.pid, 0)
            self.pid = None

    def kill(self) -> None:
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        self.release()


def _recv_line(sock: socket.socket) -> str:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        buf += chunk
    return buf.decode(errors="replace").strip()


def _write_maps(pid: int, plan: Plan) -> None:
    if plan.mode == "subid":
        for kind, tool in (("uid", "newuidmap"), ("gid", "newgidmap")):
            args = [str(x) for line in plan.kernel_lines(kind) for x in line]
            res = subprocess.run([tool, str(pid), *args], capture_output=True, text=True)
            if res.returncode != 0:
                detail = (res.stderr.strip().splitlines() or [f"exit status {res.returncode}"])[-1]
                raise MapFailed(f"{tool} {pid} {' '.join(args)} failed: {detail}")
        return
    try:
        with open(f"/proc/{pid}/setgroups", "w") as f:
            f.write("deny")
        with open(f"/proc/{pid}/uid_map", "w") as f:
            f.write(f"0 {plan.uid} 1\n")
        with open(f"/proc/{pid}/gid_map", "w") as f:
            f.write(f"0 {plan.gid} 1\n")
    except OSError as e:
        hint = userns_hint()
        raise UsernsError(
            f"cannot write the user namespace's id map: {e.strerror}" + (f" ({hint})" if hint else "")
        ) from None


class MapFailed(UsernsError):
    """newuidmap/newgidmap failed (the caller may retry with a single-id map)."""


def _holder_main(sock: socket.socket, merged: str, net: bool) -> None:
    """The holder (a child of the monitor). Never returns."""
    step = "unshare(CLONE_NEWUSER)"
    try:
        from overlayfs_py import _sys

        _sys.close_fds_except(0, 1, 2, sock.fileno())
        L.prctl(L.PR_SET_PDEATHSIG, signal.SIGKILL)
        L.unshare(L.CLONE_NEWUSER)
        sock.sendall(b"unshared\n")
        if _recv_line(sock) != "mapped":
            os._exit(1)
        step = "setresuid(0) in the user namespace"
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
        step = "unshare(CLONE_NEWNS|CLONE_NEWNET)" if net else "unshare(CLONE_NEWNS)"
        L.unshare(L.CLONE_NEWNS | (L.CLONE_NEWNET if net else 0))
        L.mount(None, "/", None, L.MS_REC | L.MS_PRIVATE)
        step = "open /dev/fuse"
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        step = f"mount fuse on {merged}"
        L.mount("pyoverlay", merged, "fuse.pyoverlay", L.MS_NOSUID | L.MS_NODEV, f"fd={fd},{FUSE_OPTIONS}")
        socket.send_fds(sock, [b"fd"], [fd])
        os.close(fd)
        sock.recv(1)  # EOF: the monitor has what it needs (its ns fds), or died
        os._exit(0)
    except BaseException as e:  # noqa: BLE001 - report what failed, whatever it was
        err = getattr(e, "errno", 0) or 0
        text = f"{step}: {e.strerror if isinstance(e, OSError) and e.strerror else e}"
        with contextlib.suppress(OSError):
            sock.sendall((json.dumps({"msg": text, "errno": err}) + "\n").encode())
        os._exit(1)


def join(user_fd: int, mnt_fd: int) -> None:
    """Enter the container's user namespace (the caller becomes its root, with every
    capability in it), then its mount namespace. There is no way back to the host's."""
    L.setns(user_fd, L.CLONE_NEWUSER)
    L.setns(mnt_fd, L.CLONE_NEWNS)


def setgroups_allowed() -> bool:
    """False in a user namespace whose ``setgroups`` is "deny" (a single-id map)."""
    return _read("/proc/self/setgroups") != "deny"
