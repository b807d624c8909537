"""The container side: what PID 1 does between ``fork`` and ``execve``.

Runs in a child of the monitor that is already PID 1 of a new pid namespace (the
monitor unshared CLONE_NEWPID for its children). Steps, in order (docs/runner.md):

1. die with the monitor (PR_SET_PDEATHSIG) and wait for "go" (the monitor has put
   us in the cgroup by then, so everything we start is counted);
2. unshare mount, uts, ipc (and net, and with ``--cgroupns private`` cgroup) namespaces;
3. build the root (:mod:`runner.rootfs`) and ``pivot_root`` into it;
4. hostname, ``lo`` up;
5. with ``--init``: fork CMD as PID 2 and become the reaper (:mod:`runner.init`);
6. terminal (a pty from the container's own devpts, master sent to the monitor),
   capabilities, no_new_privs, user, working directory;
7. ``execve`` CMD, looked up in the container's PATH.

Any failure is written as one JSON line to the error pipe (close-on-exec: a
successful ``execve`` closes it with nothing written) and ends the process with
125 (our error), 126 (cannot execute) or 127 (not found), docker's codes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
import socket
import struct
import termios
from dataclasses import dataclass
from typing import TYPE_CHECKING

from overlayfs_py import _sys

from . import _linux as L
from . import cgroups, rootfs, seccomp
from . import init as pid1
from .errors import RunnerError
from .spec import SpecError, build_env, resolve_user
from .userns import setgroups_allowed  # imported now: exec calls it inside the container

if TYPE_CHECKING:
    from .plan import RunPlan

EXIT_RUNNER, EXIT_CANNOT_EXEC, EXIT_NOT_FOUND = 125, 126, 127


class ContainerError(RunnerError):
    """PID 1's setup or exec failed: 125, or docker's 126/127 (``exit_code=``)."""


@dataclass
class Launch:
    """Everything PID 1 needs: the plan (made by the monitor before anything was created)
    and the descriptors it shares with the monitor."""

    plan: RunPlan
    go_fd: int
    err_fd: int
    tty_sock: int | None
    winsize: bytes | None
    #: a network namespace the monitor prepared (bridge, rootless network): PID 1 joins
    #: it instead of unsharing an empty one
    net_fd: int | None = None


@contextlib.contextmanager
def step(name: str):
    """A named step of PID 1's setup: an OSError in it becomes a ContainerError naming the
    step and the path inside the container (``mounting volume /data: Not a directory``)."""
    try:
        yield
    except OSError as e:  # the kernel's reason; its filename would be /proc/self/fd/N
        raise ContainerError(f"{name}: {os.strerror(e.errno) if e.errno else e}") from None


def report(err_fd: int, code: int, msg: str) -> None:
    try:
        os.write(err_fd, (json.dumps({"code": code, "msg": msg}) + "\n").encode())
    except OSError:
        pass


def main(launch: Launch) -> None:
    """Never returns."""
    code = EXIT_RUNNER
    try:
        _setup_and_exec(launch)
    except RunnerError as e:  # its one line (-u nosuch: docker's wording) and its status
        code = e.exit_code
        report(launch.err_fd, code, str(e))
    except BaseException as e:  # noqa: BLE001 - say what failed, whatever it was
        report(launch.err_fd, code, f"container setup failed: {describe(e)}")
    os._exit(code)


def describe(e: BaseException) -> str:
    if isinstance(e, SpecError):  # a user error (-u nosuch): its message is the whole story
        return str(e)
    if isinstance(e, OSError) and e.strerror:
        return e.strerror + (f": {e.filename}" if e.filename else "")
    return f"{type(e).__name__}: {e}"


def _setup_and_exec(launch: Launch) -> None:
    plan = launch.plan
    spec = plan.spec
    L.prctl(L.PR_SET_PDEATHSIG, signal.SIGKILL)
    _sys.close_fds_except(launch.go_fd, launch.err_fd, launch.tty_sock, launch.net_fd)
    if os.read(launch.go_fd, 2) != b"go":
        os._exit(EXIT_RUNNER)  # the monitor gave up before starting us
    os.close(launch.go_fd)

    # the monitor has put us in our cgroup before "go": a new cgroup namespace is rooted there
    cgroup_fs = cgroup_view(plan)
    flags = L.CLONE_NEWNS | L.CLONE_NEWUTS | L.CLONE_NEWIPC
    if launch.net_fd is not None:
        with step("joining the container's network namespace"):
            L.setns(launch.net_fd, L.CLONE_NEWNET)
            os.close(launch.net_fd)
    elif spec.network != "host":
        flags |= L.CLONE_NEWNET
    if plan.cgroupns == "private":
        flags |= L.CLONE_NEWCGROUP
    with step("creating the namespaces"):
        L.unshare(flags)

    merged = plan.paths.merged
    with step("binding the container's root"):
        rootfs.make_private()
        rootfs.bind_root(merged)
        root_fd = os.open(merged, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with step("mounting /proc"):
            rootfs.mount_proc(root_fd, spec.privileged)
        with step("mounting /dev"):
            rootfs.mount_dev(root_fd, bind_devices=plan.rootless)
        with step("mounting /sys"):
            rootfs.mount_sys(root_fd)
        with step("mounting /sys/fs/cgroup"):
            rootfs.mount_cgroup(root_fd, cgroup_fs, plan.cgroupns == "private", plan.rootless)
        for f in plan.etc_files:
            with step(f"mounting {f.target}"):
                rootfs.bind(root_fd, f.source, f.target, False, must_exist=False)
        for v in plan.volumes:  # parents first
            with step(f"mounting volume {v.target}"):
                rootfs.mount_volume(root_fd, v)
        if not spec.privileged:
            rootfs.mask_paths(root_fd)
    finally:
        os.close(root_fd)
    with step("pivot_root into the container's root"):
        rootfs.pivot(merged)
    if spec.read_only:
        with step("remounting / read-only"):
            rootfs.remount_root_read_only()

    with step(f"setting the hostname {plan.hostname}"):
        socket.sethostname(plan.hostname)
    if spec.network != "host":
        with step("bringing lo up"):
            rootfs.loopback_up()
    os.umask(0o022)

    ids = resolve_user(spec.user, read_text("/etc/passwd"), read_text("/etc/group"))
    env = build_env(spec.env, plan.hostname, ids.home, spec.tty)
    if spec.workdir != "/":
        with step(f"creating the working directory {spec.workdir}"):
            rootfs.ensure_dir(spec.workdir)

    if spec.init:
        signal.pthread_sigmask(signal.SIG_BLOCK, pid1.SIGNALS)
        child = os.fork()
        if child:
            os.close(launch.err_fd)
            if launch.tty_sock is not None:
                os.close(launch.tty_sock)
            L.set_comm("init")
            # the reaper runs under the container's filter too, as docker's init does
            if spec.no_new_privs():
                L.set_no_new_privs()
            seccomp.install(plan.seccomp)
            pid1.reap_and_forward(child)  # never returns
    become(
        ids,
        env,
        spec.argv,
        spec.workdir,
        spec.caps(),
        spec.no_new_privs(),
        launch.err_fd,
        tty_sock=launch.tty_sock,
        winsize=launch.winsize,
        stdin_null=not spec.interactive,
        seccomp_filter=plan.seccomp,
    )


def cgroup_view(plan: RunPlan) -> tuple[cgroups.CgroupMount, ...]:
    """What /sys/fs/cgroup will show (:func:`runner.cgroups.container_mounts`), read while
    /proc/self/cgroup still names the host's paths: the hierarchies our cgroup is in
    (rootless, without a cgroup of its own: the user's own cgroups)."""
    own = None if plan.rootless else frozenset(plan.cgroup.paths.values() if plan.cgroup else ())
    try:
        return cgroups.container_mounts(own)
    except (OSError, ValueError):  # an unreadable /proc/self/mountinfo: nothing to show
        return ()


def read_text(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def become(
    ids,
    env: list[str],
    argv: list[str],
    workdir: str,
    caps,
    no_new_privs: bool,
    err_fd: int,
    *,
    tty_sock: int | None,
    winsize: bytes | None,
    stdin_null: bool,
    seccomp_filter: seccomp.Filter | None = None,
) -> None:
    """The last steps, shared with ``pyoverlay exec``: terminal, privileges, exec (the
    seccomp filter is loaded last, right before ``execve``: runner/seccomp)."""
    if tty_sock is not None:
        master, slave = os.openpty()
        if winsize:
            fcntl.ioctl(slave, termios.TIOCSWINSZ, winsize)
        socket.send_fds(socket.socket(fileno=tty_sock), [b"m"], [master])
        os.close(master)
        os.login_tty(slave)
    elif stdin_null:
        fd = os.open("/dev/null", os.O_RDONLY)
        os.dup2(fd, 0)
        os.close(fd)
    if caps is not None:
        L.drop_bounding_caps(set(caps))
    if no_new_privs:
        L.set_no_new_privs()
    set_ids(ids)
    try:
        os.chdir(workdir)
    except OSError as e:
        raise ContainerError(f"cannot enter working directory {workdir}: {e.strerror}") from None
    for sig in range(1, signal.NSIG):  # ignored signals would stay ignored across execve
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            try:
                signal.signal(sig, signal.SIG_DFL)
            except (OSError, ValueError):
                pass
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    with step("loading the seccomp filter"):
        seccomp.install(seccomp_filter)
    execvpe(argv, env)


def set_ids(ids) -> None:
    """setgroups, setresgid, setresuid. In a user namespace an id outside its map is
    EINVAL, and a single-id map denies setgroups (the groups stay as they are)."""
    try:
        if setgroups_allowed():
            os.setgroups(list(ids.groups))
        os.setresgid(ids.gid, ids.gid, ids.gid)
        os.setresuid(ids.uid, ids.uid, ids.uid)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        raise ContainerError(
            f"cannot run as uid {ids.uid} gid {ids.gid}: not mapped in the container's user "
            "namespace (rootless with a single-id map only has root; see --userns-map)"
        ) from None


def execvpe(argv: list[str], env: list[str]) -> None:
    """``execve`` *argv[0]* looked up in the container's PATH; on failure raise
    ContainerError with docker's 126/127 and its wording."""
    cmd = argv[0]
    envmap = _envmap(env)
    candidates = [cmd] if "/" in cmd else [os.path.join(d or ".", cmd) for d in envmap.get("PATH", "").split(":")]
    denied = None
    for path in candidates:
        try:
            os.execve(path, argv, envmap)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except PermissionError:
            denied = path
            continue
        except OSError as e:
            if e.errno == errno.ENOEXEC:
                raise ContainerError(f"exec {path}: exec format error", exit_code=EXIT_CANNOT_EXEC) from None
            raise ContainerError(f"exec {path}: {e.strerror}", exit_code=EXIT_CANNOT_EXEC) from None
    if denied:
        raise ContainerError(f"exec: {denied!r}: permission denied", exit_code=EXIT_CANNOT_EXEC)
    if "/" in cmd:
        raise ContainerError(f"exec: {cmd!r}: no such file or directory", exit_code=EXIT_NOT_FOUND)
    raise ContainerError(f"exec: {cmd!r}: executable file not found in $PATH", exit_code=EXIT_NOT_FOUND)


def _envmap(env: list[str]) -> dict[str, str]:
    out = {}
    for e in env:
        k, _, v = e.partition("=")
        out[k] = v
    return out


def winsize_of(fd: int) -> bytes | None:
    try:
        return fcntl.ioctl(fd, termios.TIOCGWINSZ, struct.pack("HHHH", 0, 0, 0, 0))
    except OSError:
        return None
