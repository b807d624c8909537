"""The monitor: one process per container that owns its whole life (like conmon/shim).

``pyoverlay run`` becomes the monitor (``run -d`` forks it into the background). It
never serves FUSE and never enters the container's namespaces itself:

    monitor ── fork ──> FUSE server (own session; SIGTERM when the monitor dies)
       │
       ├─ unshare(CLONE_NEWPID) ── fork ──> PID 1 (runner.container) ── execve CMD
       │   setns back to its own pid ns (later children stay on the host)
       ├─ cgroup: create, limits, add PID 1, then "go"
       ├─ wait: PID 1's pidfd, forwarded signals, the terminal relay, and the server's
       │  pidfd (if the server dies first, the root is dead: record it, SIGKILL PID 1)
       └─ teardown: unmount, wait for the server, remove the cgroup, record the exit

Every step that creates something registers its undo on an ExitStack, so an error at
any point (or a signal) unwinds exactly what was done, in reverse order.

Rootless (an ordinary user, docs/runner.md "Rootless"): a holder process makes the
container's user namespace and the FUSE mount inside it (runner/userns.py); the server
is forked on that fd in the host's namespaces; then the monitor joins the holder's user
and mount namespaces, unshares the pid namespace there and forks PID 1. It stays in that
user namespace (there is no way back) and forks nothing else; teardown detaches its copy
of the mount instead of running fusermount3. A rootless ``bridge`` network: the holder
also unshares the network namespace, and the monitor starts slirp4netns on it (and
publishes ``-p``) before it joins anything (runner/net/slirp.py); PID 1 joins it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import sys
import time

from overlayfs_py.config import validate
from overlayfs_py.errors import PyoverlayError
from overlayfs_py.logs import one_line

from . import _linux as L
from . import attach, container, state, userns
from .cgroups import Cgroup, CgroupError, create_rootless
from .errors import RunnerError
from .init import exit_code
from .net import bridge as netbridge
from .net import proxy as netproxy
from .net import slirp
from .plan import RunPlan, UsernsPlan, device_rules_needed, generate_name, with_storage_maps
from .plan import build as build_plan
from .spec import RunSpec
from .supervise import Relay, catch_signals, supervise
from .tty import PtyRelay, recv_master

__all__ = ["Monitor", "RunError", "generate_name"]


class RunError(RunnerError):
    """A run failed before its command ran: 125, or PID 1's status (``exit_code=``)."""


#: the one-line errors of planning and of the steps: every project error
_ERRORS = PyoverlayError


def _code(e: PyoverlayError) -> int:
    """A runner error's own status (125, or 126/127 ...); any other project error (a
    ConfigError's own status is the mount command's 2) ends a run with 125."""
    return e.exit_code if isinstance(e, RunnerError) else container.EXIT_RUNNER


@contextlib.contextmanager
def step(name: str):
    """One named step of the setup: any error in it becomes a RunError that names the
    step (``mounting the container's root: ...``); a RunError passes as it is (it already
    says what failed)."""
    try:
        yield
    except RunError:
        raise
    except _ERRORS as e:
        raise RunError(f"{name}: {e}", exit_code=_code(e)) from None
    except OSError as e:
        raise RunError(f"{name}: {one_line(e)}") from None


@dataclasses.dataclass
class ApiStart:
    """A container created through the API (runner/api/containers.py) being started by
    the service: its record exists (status "created", or "exited" for a restart), its
    stdio goes to the attach socket and the log (runner/attach.py), and PID 1 waits for
    the service's go (read from *go_fd*) once the attach socket listens, so that every
    client attached before ``start`` sees the first byte of output."""

    cid: str
    go_fd: int
    stdin_once: bool = False


class Monitor:
    def __init__(self, spec: RunSpec, notify_fd: int | None = None, api: ApiStart | None = None):
        self.spec = spec
        self.api = api
        self.previous: state.Record | None = None  # api: the record before this start
        self.notify_fd = notify_fd  # run -d: tell the waiting CLI "ok ID" / "err CODE MSG"
        self.detach = notify_fd is not None
        self.started = False  # CMD was executed: from here on the exit is recorded
        self.rec: state.Record | None = None  # saved from the step "reserving the name" on
        self.pending: list[int] = []  # signals that arrived before the wait loop
        self.rootless = os.geteuid() != 0
        self.ns_fds: list[int] = []  # rootless: the container's user and mount namespaces
        self.net_fd: int | None = None  # rootless network: the namespace PID 1 joins
        self.server: int | None = None  # the FUSE server of the container's root (our child)
        self.server_pidfd: int | None = None  # watched while the container runs
        self.net_attachment: netbridge.Attachment | None = None  # --network bridge

    @property
    def record(self) -> state.Record:
        """The container's record, once the step "reserving the name" has saved it."""
        if self.rec is None:
            raise AssertionError("the container has no record before its name is reserved")
        return self.rec

    # --- public ------------------------------------------------------------------------

    def run(self) -> int:
        catch_signals(self.pending)
        try:  # decide everything and check everything; nothing is created yet
            plan = build_plan(
                self.spec, detach=self.detach, rootless=self.rootless, cid=self.api.cid if self.api else None
            )
        except _ERRORS as e:
            return self._failed(_code(e), str(e))
        except OSError as e:
            return self._failed(container.EXIT_RUNNER, one_line(e))
        with contextlib.ExitStack() as undo:
            try:
                pid, relay = self._execute(plan, undo)
            except _ERRORS as e:
                return self._failed(_code(e), str(e))
            except OSError as e:
                return self._failed(container.EXIT_RUNNER, one_line(e))
            self._notify(f"ok {plan.cid}")
            code = self._wait(pid, relay)
            rec = self.record
            rec.exit_code, rec.finished = code, time.time()
        # the ExitStack has unmounted (the trace file is complete) and removed the cgroup
        if self.spec.trace_summary:
            _print_summary(rec.trace_file)
        rec.status = "exited"
        if self.spec.remove:
            state.remove(rec)
        else:
            state.save(rec)
        return code

    # --- start: the plan's steps, each undone by the ExitStack ---------------------------------

    def _execute(self, plan: RunPlan, undo: contextlib.ExitStack):
        paths = plan.paths
        for warning in plan.warnings:
            print(warning, file=sys.stderr)
        with step("clearing inherited capabilities"):
            # inheritable/ambient capabilities handed down by our caller must not reach the
            # container (root's execve adds the inheritable set to the permitted one)
            L.clear_inheritable_caps()
        with step("reserving the name"), state.locked():
            if state.name_taken(plan.name) not in (None, plan.cid):
                raise RunError(f"the container name {plan.name!r} is already in use")
            rec = plan.record()
            if self.api is not None:  # the record the API created (or the last run's)
                prev = state.load_record(plan.cid)
                if prev is None:
                    raise RunError(f"no such container: {plan.cid}")
                if state.status(prev) == "running" or (
                    prev.status == "created" and L.alive(prev.monitor_pid, prev.monitor_start)
                ):  # running, or another monitor is starting it
                    raise RunError(f"container {prev.label} is already running")
                self.previous = prev
                rec.created, rec.extra = prev.created, dict(prev.extra)
            self.rec = rec
            state.save(self.rec)
        undo.callback(self._forget_if_failed)
        with step(f"creating the data directory {paths.data}"):
            state.data_dir()  # <data root>/containers, private
            if self.api is not None and os.path.isdir(paths.data):
                _clear_init_layer(paths.data)  # a restart: the upper layer and the log stay
            else:
                os.mkdir(paths.data, 0o700)  # private, as its parents (docs/runner.md, "Security model")
        if paths.output_log is not None:
            with step("redirecting output to the container's log"):
                _redirect_output(paths.output_log)
        with step(f"creating the upper layer {paths.upper}"):
            os.makedirs(paths.upper, mode=0o755, exist_ok=True)
            if paths.upper_given:
                os.makedirs(paths.workdir, mode=0o755, exist_ok=True)
                undo.enter_context(_exclusive(paths.workdir, paths.upper))
            os.makedirs(paths.merged, mode=0o755, exist_ok=True)
        with step("writing /etc/hostname, /etc/hosts and /etc/resolv.conf"):
            for f in plan.etc_files:
                with open(f.source, "w") as out:
                    out.write(f.text)
        new_owner = plan.userns.new_owner if plan.userns is not None else None
        if new_owner is not None:
            with step("giving the upper layer's root its owner"):
                # the user's own image shows the user as root; any other (root's) is shown
                # as it is (runner/userns.py, Plan.storage_map)
                _own_root(paths.upper, new_owner)
        with step(f"building the init layer {paths.init}"):
            plan.init_layer.create(paths.init, new_owner)
        cfg = plan.mount
        with step("checking the mount configuration"):
            validate(cfg, workdir_may_be_missing=True)

        holder = None
        if plan.userns is not None:
            with step("creating the user namespace"):
                holder, fuse_fd, users = self._userns_mount(
                    undo, plan.userns, paths.merged, net=plan.rootless_net is not None
                )
            if users.note:
                print(f"pyoverlay: note: {users.note}", file=sys.stderr)
            cfg = dataclasses.replace(with_storage_maps(cfg, users), fuse_fd=fuse_fd)
        with step("mounting the container's root"):
            server = _start_server(cfg, paths.server_log, holder is not None)
            self.server = server
            # watched while the container runs (its death stops the container); opened now,
            # in the host's pid namespace, and closed before the teardown waits for it
            self.server_pidfd = os.pidfd_open(server)
            undo.callback(self._close_server_pidfd)
        if holder is None:
            undo.callback(_unmount, paths.merged, server)
        else:
            undo.callback(self._teardown_rootless, holder, paths.merged, server)
            with step("joining the user namespace"):
                self.ns_fds = list(holder.namespaces())
            if plan.rootless_net is not None:  # while the holder lives: slirp4netns joins by its /proc paths
                self._rootless_net(undo, plan.rootless_net, holder)
            holder.release()
            self.record.rootless = state.RootlessInfo(
                map=users.maps.mode,
                uid_map=users.maps.kernel_lines("uid"),
                gid_map=users.maps.kernel_lines("gid"),
                storage_uidmap=list(cfg.uidmap),
                storage_gidmap=list(cfg.gidmap),
            )
        r = self.record
        r.upper, r.workdir, r.merged, r.init_layer = paths.upper, paths.workdir, paths.merged, paths.init
        r.trace_file, r.hostname = paths.trace_file, plan.hostname
        r.server_pid, r.server_start = server, L.process_start_time(server)

        with step("creating the cgroup"):
            cg = self._cgroup(plan)
        if cg is not None:
            undo.callback(cg.remove)
            self.record.cgroup = cg.to_dict()

        net_fd = self._network(undo, plan)

        with step("starting the container"):
            return self._spawn(undo, plan, cg, net_fd)

    def _network(self, undo: contextlib.ExitStack, plan: RunPlan) -> int | None:
        """``--network bridge``: the container's network namespace, configured and on the
        bridge (runner/net/bridge.py), /etc/hosts with its address, and the proxy of its
        published ports (runner/net/proxy.py). Returns the namespace's fd for PID 1."""
        cfg = plan.bridge
        if cfg is None:
            return None
        me = os.getpid()
        with step(f"connecting the container to bridge {cfg.name}"):
            att = netbridge.attach(cfg, plan.cid, me, L.process_start_time(me) or 0)
        undo.callback(netbridge.detach, cfg.name, cfg.subnet, plan.cid)
        undo.callback(att.close_ns)
        self.net_attachment = att
        net = att.to_dict()
        hosts = plan.hosts_file
        if hosts is not None:
            with step("writing /etc/hosts"), open(hosts.source, "w") as out:
                out.write(plan.hosts_text(att.address))
        if self.spec.publish:
            with step("publishing ports"):
                published = netproxy.bind(self.spec.publish)
                try:
                    proxy = netproxy.start(published, att.address)
                finally:
                    netproxy.close(published)
            undo.callback(netproxy.stop, proxy)
            net["ports"] = [p.mapping.to_dict() for p in published]
            net["proxy_pid"], net["proxy_start"] = proxy, L.process_start_time(proxy)
        self.record.net = net
        return att.ns_fd

    def _cgroup(self, plan: RunPlan):
        limits = self.spec.limits
        if plan.rootless:  # without limits, no cgroup (an ordinary user rarely may create one)
            return create_rootless(plan.cid, limits) if limits.any() else None
        if plan.cgroup is None:
            return None
        try:
            return plan.cgroup.create()
        except CgroupError as e:
            if plan.cgroup_optional:
                return None
            if plan.cgroup.devices and not limits.any():
                raise RunError(device_rules_needed(e)) from None
            raise

    def _spawn(self, undo: contextlib.ExitStack, plan: RunPlan, cg, net_fd: int | None = None):
        spec = self.spec
        go_r, go_w = os.pipe()
        err_r, err_w = os.pipe()
        stdio = listener = None
        if self.api is not None:  # pipes (or the pty) and the attach socket, not our stdio
            stdio = attach.Stdio(spec.tty, spec.interactive)
            listener = attach.listen(plan.paths.data)
            undo.callback(attach.unlink, plan.paths.data)
            undo.callback(listener.close)
        tty_parent = tty_child = None
        if spec.tty:
            tty_parent, tty_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        launch = container.Launch(
            plan=plan,
            go_fd=go_r,
            err_fd=err_w,
            tty_sock=tty_child.fileno() if tty_child else None,
            winsize=container.winsize_of(0) if spec.tty else None,
            net_fd=net_fd if net_fd is not None else self.net_fd,  # bridge, or rootless
        )

        def fork_pid1() -> int:
            L.unshare(L.CLONE_NEWPID)
            child = os.fork()
            if child == 0:
                os.close(go_w)
                os.close(err_r)
                if stdio is not None:
                    stdio.install()
                container.main(launch)  # never returns
            return child

        if self.rootless:
            # Become root of the container's user namespace, in the mount namespace that
            # holds its root: the pid namespace unshared next is owned by that user
            # namespace (PID 1 can mount proc). No way back: the monitor forks nothing else.
            user_fd, mnt_fd = self.ns_fds
            try:
                userns.join(user_fd, mnt_fd)
            finally:
                self._close_ns_fds()
            pid = fork_pid1()
        else:
            own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
            try:
                pid = fork_pid1()
            finally:
                L.setns(own_pidns, L.CLONE_NEWPID)  # later children (fusermount3...) stay on the host
                os.close(own_pidns)
        os.close(go_r)
        os.close(err_w)
        self._close_net_fd()  # PID 1 has it
        if self.net_attachment is not None:  # PID 1 holds the namespace now (it dies with PID 1)
            self.net_attachment.close_ns()
        if tty_child:
            tty_child.close()
        if stdio is not None:
            stdio.close_child_ends()
        undo.callback(_reap, pid)
        r = self.record
        r.pid, r.pid_start, r.pidns = pid, L.process_start_time(pid), L.ns_inode(pid, "pid")
        r.status = "running"
        try:
            if cg is not None:
                cg.add(pid)
            state.save(r)
            if self.api is not None:  # the service connects what was attached before start
                self._notify_line("ready")
                _wait_go(self.api.go_fd)
            os.write(go_w, b"go")
        finally:
            os.close(go_w)
        msg = _read_all(err_r)
        os.close(err_r)
        if msg:
            try:
                err = json.loads(msg.splitlines()[0])
            except ValueError:
                err = {"code": container.EXIT_RUNNER, "msg": msg.strip()}
            raise RunError(err["msg"], exit_code=err["code"])
        self.started = True
        relay: Relay | None = None
        master = None
        if tty_parent is not None:  # spec.tty
            master = recv_master(tty_parent)
            tty_parent.close()
        if stdio is not None and listener is not None:
            once = self.api.stdin_once if self.api else False
            arelay = attach.AttachRelay(listener, plan.paths.data, stdio, master, once)
            undo.callback(arelay.close)
            relay = arelay
        elif master is not None:
            stdin = 0 if spec.interactive and not self.detach else None
            prelay = PtyRelay(master, stdin, 1)
            undo.callback(prelay.close)
            relay = prelay
        return pid, relay

    # --- rootless ----------------------------------------------------------------------------

    def _userns_mount(self, undo: contextlib.ExitStack, users: UsernsPlan, merged: str, net: bool = False):
        """The holder (runner/userns.py): the container's user namespace (as *users*
        plans it) and its FUSE mount (and, with *net*, its network namespace). With
        ``--userns-map auto``, a failing newuidmap falls back to a single-id map. Returns
        the holder, the /dev/fuse fd and the user namespace used."""
        holder = userns.Holder(users.maps, net)
        undo.callback(holder.kill)
        try:
            return holder, holder.mount(merged), users
        except userns.MapFailed as e:
            holder.kill()
            if self.spec.userns_map != "auto":
                raise RunError(str(e)) from None
            note = f"{e}; using a single-id map (only root inside the container)"
        users = users.with_maps(userns.Plan("single", users.maps.uid, users.maps.gid), note)
        holder = userns.Holder(users.maps, net)
        undo.callback(holder.kill)
        return holder, holder.mount(merged), users

    def _rootless_net(self, undo: contextlib.ExitStack, net: slirp.SlirpPlan, holder: userns.Holder) -> None:
        """slirp4netns on the holder's network namespace, started from the host's
        namespaces as the user (runner/net/slirp.py); then the published ports. It ends
        with the monitor (its exit fd), whatever way the monitor ends."""
        with step("opening the container's network namespace"):
            self.net_fd = holder.netns()
        undo.callback(self._close_net_fd)
        s = slirp.Slirp(net)
        undo.callback(s.stop)
        with step(f"starting {slirp.BINARY}"):
            s.start(holder.ns_path("user"), holder.ns_path("net"))
        if net.ports:
            with step("publishing the ports"):
                s.publish()
        self.record.net = s.record()

    def _close_net_fd(self) -> None:
        if self.net_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.net_fd)
            self.net_fd = None

    def _close_ns_fds(self) -> None:
        for fd in self.ns_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.ns_fds = []

    def _teardown_rootless(self, holder, merged: str, server: int) -> None:
        """The mount lives only in namespaces of the container: once PID 1 is gone and the
        holder too, the monitor's own copy is the last one; detach it and the server sees
        the connection end."""
        holder.kill()
        self._close_ns_fds()
        with contextlib.suppress(OSError):
            L.umount2(merged, L.MNT_DETACH)  # EINVAL if the monitor never joined
        _wait_server(server, first=5.0)

    # --- wait ------------------------------------------------------------------------------

    def _wait(self, pid: int, relay: Relay | None) -> int:
        status = supervise(
            pid,
            relay,
            pending=self.pending,
            stop_timeout=self.spec.stop_timeout,
            server_pidfd=self.server_pidfd,
            on_server_exit=self._server_died,
        )
        rec = self.record
        rec.pid_reaped = True
        if rec.cgroup:
            with contextlib.suppress(OSError, CgroupError):
                rec.oom_killed = Cgroup.from_dict(rec.cgroup).oom_killed()
        return exit_code(status)

    def _server_died(self) -> None:
        """The FUSE server of the container's root exited while the container ran (it was
        killed, or it crashed): the root is dead, every access fails with ENOTCONN. Record
        why (``ps`` shows it) and say it; :func:`supervise` then kills the container and the
        teardown unmounts the dead mount as usual."""
        how = _exit_text(self.server) if self.server is not None else "exited"
        rec = self.record
        rec.server_died = how
        with contextlib.suppress(OSError, state.StateError):
            state.save(rec)
        print(
            f"pyoverlay: container {rec.label}: the filesystem server of its root (pid {self.server})"
            f" {how}; stopping the container",
            file=sys.stderr,
            flush=True,
        )

    def _close_server_pidfd(self) -> None:
        if self.server_pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self.server_pidfd)
            self.server_pidfd = None

    # --- endings -----------------------------------------------------------------------------

    def _failed(self, code: int, msg: str) -> int:
        if self.detach:
            self._notify(f"err {code} {msg}")
        else:
            print(f"pyoverlay: {msg}", file=sys.stderr)
        return code

    def _forget_if_failed(self) -> None:
        if self.started or self.rec is None:
            return
        if self.api is not None and self.previous is not None and not self.spec.remove:
            # a start through the API that failed: the container stays as it was (docker
            # keeps a created container whose command was not found), its data dir too
            prev = self.previous
            if os.path.isdir(self.record.data_dir or ""):
                prev.data_dir = self.record.data_dir
            with contextlib.suppress(OSError, state.StateError):
                state.save(prev)
            return
        with contextlib.suppress(OSError, state.StateError):  # never ran: leave no trace (record, data dir)
            state.remove(self.rec)

    def _notify_line(self, msg: str) -> None:
        """One line to the service, the pipe kept open (the final ``ok``/``err`` follows)."""
        if self.notify_fd is not None:
            with contextlib.suppress(OSError):
                os.write(self.notify_fd, (msg + "\n").encode())

    def _notify(self, msg: str) -> None:
        if self.notify_fd is not None:
            with contextlib.suppress(OSError):
                os.write(self.notify_fd, (msg + "\n").encode())
                os.close(self.notify_fd)
            self.notify_fd = None


def _wait_go(fd: int) -> None:
    """The service's go (one byte; its end, if it died meanwhile, is a go too)."""
    with contextlib.suppress(OSError):
        os.read(fd, 1)
    with contextlib.suppress(OSError):
        os.close(fd)


def _clear_init_layer(data: str) -> None:
    """A restart through the API: the init layer is built again (the upper layer, the
    container's log and its /etc files stay or are rewritten)."""
    fd = os.open(data, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        state.rmtree_at(fd, "init")
    finally:
        os.close(fd)


def _print_summary(path: str | None) -> None:
    from overlayfs_py.trace_cli import events_from_file
    from overlayfs_py.tracesummary import Summary

    if path is None:
        print("pyoverlay: no trace summary: the container has no trace file", file=sys.stderr)
        return
    total = Summary()
    try:
        for ev in events_from_file(path):
            total.add(ev)
    except (OSError, ValueError, TypeError) as e:
        print(f"pyoverlay: no trace summary: {e}", file=sys.stderr)
        return
    print("\n-- pyoverlay trace summary --\n" + total.text(), file=sys.stderr)


def _redirect_output(log: str) -> None:
    """run -d: stdin from /dev/null, stdout and stderr to the container's log."""
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(out)
    os.close(null)


def _start_server(cfg, logfile: str, fd_given: bool) -> int:
    """Fork the FUSE server on *cfg* (overlayfs_py.mount.start_background); its pid.
    *fd_given*: cfg.fuse_fd is ours to close once the server has it."""
    from overlayfs_py.mount import MountFailed, start_background

    try:
        return start_background(cfg, logfile=logfile, parent_death_signal=signal.SIGTERM)
    except MountFailed as e:
        raise RunError(f"mounting the container's root: {e}") from None
    finally:
        if fd_given:
            os.close(cfg.fuse_fd)


@contextlib.contextmanager
def _exclusive(workdir: str, upper: str):
    """One container per upper layer at a time (the kernel refuses a busy upperdir too)."""
    import fcntl

    fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunError(f"upper layer {upper} is in use by another container") from None
    try:
        yield
    finally:
        os.close(fd)


def _read_all(fd: int) -> str:
    chunks: list[bytes] = []
    while True:
        b = os.read(fd, 4096)
        if not b:
            return b"".join(chunks).decode(errors="replace")
        chunks.append(b)


def _reap(pid: int) -> None:
    """Undo of a started PID 1 that never reached the wait loop: kill and reap it."""
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def _own_root(upper: str, owner: tuple[int, int]) -> None:
    """Rootless: the merged root shows the upper root's owner. When it is not the owner the
    container's root should see (root's image: 0:0), record that one in the override."""
    from overlayfs_py.idmap import OVERRIDE_XATTR, encode_override

    st = os.stat(upper)
    if (st.st_uid, st.st_gid) == owner:
        return
    try:
        os.getxattr(upper, OVERRIDE_XATTR)
        return  # already recorded (a kept --upper)
    except OSError:
        pass
    os.setxattr(upper, OVERRIDE_XATTR, encode_override(*owner, st.st_mode))


def _exit_text(pid: int) -> str:
    """How our exited child *pid* ended ("was killed by SIGKILL", "exited with status 1"),
    read without reaping it (the teardown does)."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        info = None
    if info is None:
        return "exited"
    if info.si_code in (os.CLD_KILLED, os.CLD_DUMPED):
        try:
            name = signal.Signals(info.si_status).name
        except ValueError:
            name = f"signal {info.si_status}"
        return f"was killed by {name}"
    return f"exited with status {info.si_status}"


def _unmount(merged: str, server: int, timeout: float = 20.0) -> None:
    """Unmount the container's root and wait for its server (our child) to exit."""
    from overlayfs_py.unmount import unmount_or_detach

    unmount_or_detach(merged)  # a busy mount is detached
    _wait_server(server, timeout)


def _wait_server(server: int, first: float = 20.0) -> None:
    """Wait for the server (our child); SIGTERM after *first* seconds, SIGKILL 5 s later."""
    timeout = first
    deadline = time.monotonic() + timeout
    sent = None
    while True:
        try:
            done, _ = os.waitpid(server, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        now = time.monotonic()
        if now > deadline and sent != signal.SIGKILL:
            sent = signal.SIGTERM if sent is None else signal.SIGKILL
            with contextlib.suppress(ProcessLookupError):
                os.kill(server, sent)
            deadline = now + 5
        time.sleep(0.02)
