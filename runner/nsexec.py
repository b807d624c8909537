"""``pyoverlay exec``: run a process inside a running container.

The caller keeps its own namespaces except its pid namespace *for children*:

1. check PID 1 is still the recorded process (pid + start time), open its
   ``/proc/PID/ns/*`` fds;
2. ``setns`` the pid namespace (applies to children only), fork;
3. the child joins the container's cgroup (host paths still visible), then its cgroup
   namespace, ipc, uts, net and, last, mnt (its root and cwd become the container's);
4. then the same final steps as PID 1 (:func:`runner.container.become`): terminal,
   capabilities, no_new_privs, user, working directory, ``execve``.

The parent relays the terminal and signals and returns the child's exit status.
"""

from __future__ import annotations

import json
import os
import socket

from . import _linux as L
from . import container, seccomp, state
from .cgroups import Cgroup
from .errors import RunnerError
from .init import exit_code
from .spec import build_env, resolve_user
from .supervise import supervise
from .tty import PtyRelay, recv_master


class ExecError(RunnerError):
    pass


def exec_in(
    rec: state.Record | dict,
    argv: list[str],
    *,
    env: list[str],
    user: str | None,
    workdir: str | None,
    tty: bool,
    interactive: bool,
) -> int:
    rec = state.Record.of(rec)
    if state.status(rec) != "running" or not L.alive(rec.pid, rec.pid_start):
        raise ExecError(f"container {rec.name} is not running")
    pid1 = rec.pid
    sp = rec.spec or state.ExecDefaults()
    fds = {}
    try:
        names = [ns for ns, _ in L.NAMESPACES] + ["cgroup"] + (["user"] if rec.rootless else [])
        for ns in names:
            fds[ns] = os.open(f"/proc/{pid1}/ns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
        if not L.alive(pid1, rec.pid_start):  # it may have died while we opened
            raise ExecError(f"container {rec.name} is not running")
        cg = Cgroup.from_dict(rec.cgroup) if rec.cgroup else None
        err_r, err_w = os.pipe()
        tty_parent = tty_child = None
        if tty:
            tty_parent, tty_child = socket.socketpair()
        rootless = rec.rootless is not None
        if rootless:
            # first the container's user namespace (its owner gets every capability there,
            # which joining the others needs); there is no way back, and this process
            # forks nothing else, so its pid namespace stays the container's too
            try:
                L.setns(fds["user"], L.CLONE_NEWUSER)
            except OSError as e:
                raise ExecError(f"cannot join the user namespace of {rec.name}: {e.strerror}") from None
            own = None
        else:
            own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        L.setns(fds["pid"], L.CLONE_NEWPID)
        try:
            child = os.fork()
            if child == 0:
                _child(
                    fds,
                    cg,
                    rec,
                    sp,
                    argv,
                    env,
                    user,
                    workdir,
                    tty,
                    interactive,
                    err_w,
                    tty_child.fileno() if tty_child else None,
                )
        finally:
            if own is not None:
                L.setns(own, L.CLONE_NEWPID)
                os.close(own)
    finally:
        for fd in fds.values():
            os.close(fd)
    os.close(err_w)
    if tty_child:
        tty_child.close()
    msg = _read_all(err_r)
    os.close(err_r)
    if msg:
        os.waitpid(child, 0)
        err = json.loads(msg.splitlines()[0])
        raise container.ContainerError(err["msg"], exit_code=err["code"])
    relay = None
    if tty_parent is not None:  # tty
        relay = PtyRelay(recv_master(tty_parent), 0 if interactive else None, 1)
        tty_parent.close()
    try:
        return exit_code(supervise(child, relay))
    finally:
        if relay:
            relay.close()


def _child(fds, cg, rec, sp, argv, env, user, workdir, tty, interactive, err_w, tty_sock) -> None:
    code = container.EXIT_RUNNER
    try:
        # before anything of the container is joined: the caller's own descriptors (a
        # shell's `exec 5</etc`) would let the process reach the host's tree (runc does
        # the same); only stdio, the error pipe, the tty socket and the ns fds stay
        L.close_fds_from(3, keep=[err_w, tty_sock, *fds.values()])
        L.clear_inheritable_caps()
        if cg is not None:
            cg.add(os.getpid())
        if not _same_ns(fds["cgroup"], "/proc/self/ns/cgroup"):  # --cgroupns host: ours already
            # (joining even one's own is EPERM without CAP_SYS_ADMIN over its owner: rootless)
            L.setns(fds["cgroup"], L.CLONE_NEWCGROUP)  # after the cgroup: rooted where PID 1's is
        for ns, flag in L.NAMESPACES:
            if ns != "pid":
                L.setns(fds[ns], flag)
        for fd in fds.values():
            os.close(fd)
        ids = resolve_user(
            user if user is not None else sp.user, container.read_text("/etc/passwd"), container.read_text("/etc/group")
        )
        full_env = build_env(list(sp.env) + env, rec.hostname or "", ids.home, tty)
        caps = sp.caps
        container.become(
            ids,
            full_env,
            argv,
            workdir or sp.workdir,
            frozenset(caps) if caps is not None else None,
            sp.no_new_privs,
            err_w,
            tty_sock=tty_sock,
            winsize=container.winsize_of(0) if tty else None,
            stdin_null=not interactive,
            seccomp_filter=seccomp.Filter.from_record(sp.seccomp),
        )
    except RunnerError as e:  # its one line (-u nosuch: docker's wording) and its status
        code = e.exit_code
        container.report(err_w, code, str(e))
    except BaseException as e:  # noqa: BLE001
        container.report(err_w, code, f"exec failed: {container.describe(e)}")
    os._exit(code)


def _same_ns(fd: int, path: str) -> bool:
    a, b = os.fstat(fd), os.stat(path)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_all(fd: int) -> str:
    chunks = []
    while b := os.read(fd, 4096):
        chunks.append(b)
    return b"".join(chunks).decode(errors="replace")
