"""The monitor: one process per container that owns its whole life (like conmon/shim).

``pyoverlay run`` becomes the monitor (``run -d`` forks it into the background). It
never serves FUSE and never enters the container's namespaces itself:

    monitor ── fork ──> FUSE server (own session; SIGTERM when the monitor dies)
       │
       ├─ unshare(CLONE_NEWPID) ── fork ──> PID 1 (runner.container) ── execve CMD
       │   setns back to its own pid ns (later children stay on the host)
       ├─ cgroup: create, limits, add PID 1, then "go"
       ├─ wait: PID 1's pidfd, forwarded signals, the terminal relay
       └─ teardown: unmount, wait for the server, remove the cgroup, record the exit

Every step that creates something registers its undo on an ExitStack, so an error at
any point (or a signal) unwinds exactly what was done, in reverse order.

Rootless (an ordinary user, docs/runner.md "Rootless"): a holder process makes the
container's user namespace and the FUSE mount inside it (runner/userns.py); the server
is forked on that fd in the host's namespaces; then the monitor joins the holder's user
and mount namespaces, unshares the pid namespace there and forks PID 1. It stays in that
user namespace (there is no way back) and forks nothing else; teardown detaches its copy
of the mount instead of running fusermount3.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import signal
import socket
import sys
import time

from overlayfs_py.config import ConfigError, MountConfig, default_workdir, validate
from overlayfs_py.logs import one_line

from . import _linux as L
from . import container, initlayer, state, userns
from .cgroups import Cgroup, CgroupError, create_rootless
from .init import exit_code
from .spec import RunSpec, SpecError, new_id
from .supervise import catch_signals, supervise
from .tty import PtyRelay, recv_master
from .errors import RunnerError


class RunError(RunnerError):
    def __init__(self, msg: str, code: int = container.EXIT_RUNNER):
        super().__init__(msg)
        self.code = code


_ADJ = ("brave", "calm", "eager", "fancy", "gentle", "happy", "jolly", "keen", "lucid",
        "merry", "nimble", "quiet", "sharp", "swift", "tidy", "vivid", "witty", "zesty")
_NOUN = ("badger", "bee", "crane", "dingo", "eel", "falcon", "gecko", "heron", "ibis", "koala",
         "lemur", "mole", "newt", "otter", "panda", "quail", "raven", "seal", "tern", "wren")


def generate_name() -> str:
    while True:
        name = f"{secrets.choice(_ADJ)}_{secrets.choice(_NOUN)}_{secrets.randbelow(100)}"
        if state.name_taken(name) is None:
            return name


class Monitor:
    def __init__(self, spec: RunSpec, notify_fd: int | None = None):
        self.spec = spec
        self.notify_fd = notify_fd      # run -d: tell the waiting CLI "ok ID" / "err CODE MSG"
        self.detach = notify_fd is not None
        self.started = False            # CMD was executed: from here on the exit is recorded
        self.rec: dict = {}
        self.pending: list[int] = []    # signals that arrived before the wait loop
        self.rootless = os.geteuid() != 0
        self.ns_fds: list[int] = []     # rootless: the container's user and mount namespaces

    # --- public ------------------------------------------------------------------------

    def run(self) -> int:
        catch_signals(self.pending)
        with contextlib.ExitStack() as undo:
            try:
                pid, relay = self._start(undo)
            except (RunError, SpecError, ConfigError, CgroupError, initlayer.InitLayerError,
                    userns.UsernsError) as e:
                return self._failed(getattr(e, "code", container.EXIT_RUNNER), str(e))
            except OSError as e:
                return self._failed(container.EXIT_RUNNER, one_line(e))
            self._notify(f"ok {self.rec['id']}")
            code = self._wait(pid, relay)
            self.rec.update(exit_code=code, finished=time.time())
        # the ExitStack has unmounted (the trace file is complete) and removed the cgroup
        if self.spec.trace_summary:
            _print_summary(self.rec.get("trace_file"))
        self.rec["status"] = "exited"
        if self.spec.remove:
            state.remove(self.rec)
        else:
            state.save(self.rec)
        return code

    # --- start ---------------------------------------------------------------------------

    def _start(self, undo: contextlib.ExitStack):
        spec = self.spec
        # inheritable/ambient capabilities handed down by our caller must not reach the
        # container (root's execve adds the inheritable set to the permitted one)
        L.clear_inheritable_caps()
        plan = note = None
        if self.rootless:
            userns.check_machine()
            plan, note = userns.plan(spec.userns_map)
            if spec.limits.any():  # refused before anything is created
                create_rootless(None, spec.limits, dry_run=True)
        cid = new_id()
        with state.locked():
            if spec.name and state.name_taken(spec.name):
                raise RunError(f"the container name {spec.name!r} is already in use")
            name = spec.name or generate_name()
            data = os.path.join(state.data_dir(), cid)
            self.rec = {
                "id": cid, "name": name, "command": spec.argv, "layers": list(spec.layers),
                "created": time.time(), "status": "created", "data_dir": data,
                "monitor_pid": os.getpid(), "monitor_start": L.process_start_time(os.getpid()),
                "spec": _spec_record(spec), "image": spec.image,
            }
            state.save(self.rec)
        undo.callback(self._forget_if_failed)
        os.makedirs(data, mode=0o711)
        if self.notify_fd is not None:  # run -d: output goes to the container's log
            out = os.open(os.path.join(data, "output.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(out, 1)
            os.dup2(out, 2)
            os.close(out)
            os.close(null)

        hostname = spec.hostname or (socket.gethostname() if spec.network == "host" else cid[:12])
        upper = spec.upper or os.path.join(data, "upper")
        workdir = default_workdir(upper) if spec.upper else os.path.join(data, "work")
        merged = os.path.join(data, "merged")
        init = os.path.join(data, "init")
        for d in ([upper] if not spec.upper else []) + [merged]:
            os.makedirs(d, mode=0o755, exist_ok=True)
        if spec.upper:
            os.makedirs(upper, mode=0o755, exist_ok=True)
            os.makedirs(workdir, mode=0o755, exist_ok=True)
            undo.enter_context(_exclusive(workdir, upper))
        etc = _etc_files(data, hostname, spec.network)
        needed = [initlayer.Needed(p, k, k == "dir") for p, k in initlayer.BASE_MOUNTPOINTS]
        needed += [initlayer.Needed(v.target.lstrip("/"), "dir" if os.path.isdir(v.host) else "file", True)
                   for v in spec.volumes if not v.target.startswith("/dev/")]  # /dev is a tmpfs
        users_image = new_owner = None
        if self.rootless:
            # the user's own image (built or imported by the user) shows the user as root;
            # any other (root's) is shown as it is (runner/userns.py, Plan.storage_map)
            users_image = os.stat(spec.layers[0]).st_uid == os.getuid()
            new_owner = (os.getuid(), os.getgid()) if users_image else (0, 0)
            _own_root(upper, new_owner)
        usable = initlayer.build(init, spec.layers, upper, self.rootless, needed, new_owner)
        etc = {k: v for k, v in etc.items() if k in usable}

        trace_file = spec.trace_file or (os.path.join(data, "trace.jsonl") if spec.trace_summary else None)
        cfg = MountConfig(lowerdirs=(init, *spec.layers), upperdir=upper, workdir=workdir,
                          mountpoint=merged, fsname=f"pyoverlay-{cid[:12]}",
                          trace_file=trace_file, container=cid)
        validate(cfg, workdir_may_be_missing=True)
        from overlayfs_py.mount import MountFailed, start_background

        holder = None
        if self.rootless:
            holder, fuse_fd, plan, note = self._userns_mount(undo, plan, note, merged)
            if note:
                print(f"pyoverlay: note: {note}", file=sys.stderr)
            cfg = dataclasses.replace(cfg, fuse_fd=fuse_fd,
                                      uidmap=plan.storage_map("uid", users_image),
                                      gidmap=plan.storage_map("gid", users_image))
        try:
            try:
                server = start_background(cfg, logfile=os.path.join(data, "server.log"),
                                          parent_death_signal=signal.SIGTERM)
            finally:
                if holder is not None:
                    os.close(cfg.fuse_fd)
        except MountFailed as e:
            raise RunError(f"cannot mount the container's root: {e}") from None
        if holder is None:
            undo.callback(_unmount, merged, server)
        else:
            undo.callback(self._teardown_rootless, holder, merged, server)
            self.ns_fds = list(holder.namespaces())
            holder.release()
            self.rec["rootless"] = {
                "map": plan.mode, "uid_map": plan.kernel_lines("uid"), "gid_map": plan.kernel_lines("gid"),
                "storage_uidmap": cfg.uidmap, "storage_gidmap": cfg.gidmap}
        self.rec.update(upper=upper, workdir=workdir, merged=merged, init_layer=init, trace_file=trace_file,
                        server_pid=server, server_start=L.process_start_time(server),
                        hostname=hostname)

        cg = None
        try:
            if self.rootless:  # without limits, no cgroup (an ordinary user rarely may create one)
                cg = create_rootless(cid, spec.limits) if spec.limits.any() else None
            else:  # docker's device rules, unless --privileged (every device, as docker)
                cg = Cgroup.create(cid, spec.limits, devices=not spec.privileged)
        except CgroupError as e:
            if spec.limits.any():
                raise
            if not self.rootless and not spec.privileged:
                # root in the container could mknod and open any host device
                raise RunError(f"{e}; a root container needs device restrictions "
                               "(--privileged runs without them)") from None
        if cg is not None:
            undo.callback(cg.remove)
            self.rec["cgroup"] = cg.to_dict()

        pid, relay = self._spawn(undo, merged, hostname, etc, cg)
        return pid, relay

    def _spawn(self, undo, merged, hostname, etc, cg):
        spec = self.spec
        go_r, go_w = os.pipe()
        err_r, err_w = os.pipe()
        tty_parent = tty_child = None
        if spec.tty:
            tty_parent, tty_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        launch = container.Launch(
            spec=spec, merged=merged, hostname=hostname, etc_files=etc, go_fd=go_r,
            err_fd=err_w, tty_sock=tty_child.fileno() if tty_child else None,
            winsize=container.winsize_of(0) if spec.tty else None, rootless=self.rootless)

        def fork_pid1() -> int:
            L.unshare(L.CLONE_NEWPID)
            child = os.fork()
            if child == 0:
                os.close(go_w)
                os.close(err_r)
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
        if tty_child:
            tty_child.close()
        undo.callback(_reap, pid)
        self.rec.update(pid=pid, pid_start=L.process_start_time(pid),
                        pidns=L.ns_inode(pid, "pid"), status="running")
        try:
            if cg is not None:
                cg.add(pid)
            state.save(self.rec)
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
            raise RunError(err["msg"], err["code"])
        self.started = True
        relay = None
        if spec.tty:
            master = recv_master(tty_parent)
            tty_parent.close()
            stdin = 0 if spec.interactive and not self.detach else None
            relay = PtyRelay(master, stdin, 1)
            undo.callback(relay.close)
        return pid, relay

    # --- rootless ----------------------------------------------------------------------------

    def _userns_mount(self, undo, plan, note, merged):
        """The holder (runner/userns.py): the container's user namespace and its FUSE mount.
        With ``--userns-map auto``, a failing newuidmap falls back to a single-id map."""
        holder = userns.Holder(plan)
        undo.callback(holder.kill)
        try:
            return holder, holder.mount(merged), plan, note
        except userns.MapFailed as e:
            holder.kill()
            if self.spec.userns_map != "auto":
                raise RunError(str(e)) from None
            note = f"{e}; using a single-id map (only root inside the container)"
        plan = userns.Plan("single", plan.uid, plan.gid)
        holder = userns.Holder(plan)
        undo.callback(holder.kill)
        return holder, holder.mount(merged), plan, note

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

    def _wait(self, pid: int, relay: PtyRelay | None) -> int:
        status = supervise(pid, relay, pending=self.pending, stop_timeout=self.spec.stop_timeout)
        self.rec["pid_reaped"] = True
        cg = self.rec.get("cgroup")
        if cg:
            with contextlib.suppress(OSError, CgroupError):
                self.rec["oom_killed"] = Cgroup.from_dict(cg).oom_killed()
        return exit_code(status)

    # --- endings -----------------------------------------------------------------------------

    def _failed(self, code: int, msg: str) -> int:
        if self.detach:
            self._notify(f"err {code} {msg}")
        else:
            print(f"pyoverlay: {msg}", file=sys.stderr)
        return code

    def _forget_if_failed(self) -> None:
        if not self.started:  # never ran: leave no trace (record, data dir)
            with contextlib.suppress(OSError, state.StateError):
                state.remove(self.rec)

    def _notify(self, msg: str) -> None:
        if self.notify_fd is not None:
            with contextlib.suppress(OSError):
                os.write(self.notify_fd, (msg + "\n").encode())
                os.close(self.notify_fd)
            self.notify_fd = None


def _print_summary(path: str | None) -> None:
    from overlayfs_py.trace_cli import events_from_file
    from overlayfs_py.tracesummary import Summary

    total = Summary()
    try:
        for ev in events_from_file(path):
            total.add(ev)
    except (OSError, ValueError, TypeError) as e:
        print(f"pyoverlay: no trace summary: {e}", file=sys.stderr)
        return
    print("\n-- pyoverlay trace summary --\n" + total.text(), file=sys.stderr)


def _spec_record(spec: RunSpec) -> dict:
    """What ``exec`` needs to run a process the way the container's PID 1 was run."""
    caps = spec.caps()
    return {"env": spec.env, "workdir": spec.workdir, "user": spec.user, "tty": spec.tty,
            "caps": sorted(caps) if caps is not None else None,
            "no_new_privs": not spec.privileged, "network": spec.network,
            "read_only": spec.read_only, "init": spec.init, "upper_given": spec.upper is not None,
            "volumes": [f"{v.host}:{v.target}:{'ro' if v.read_only else 'rw'}" for v in spec.volumes],
            "limits": {"memory": spec.limits.memory, "pids": spec.limits.pids, "cpus": spec.limits.cpus},
            "remove": spec.remove, "stop_timeout": spec.stop_timeout}


def _etc_files(data: str, hostname: str, network: str) -> dict[str, str]:
    files = {"etc/hostname": f"{hostname}\n"}
    if network == "host":
        files["etc/hosts"] = _host_file("/etc/hosts")
    else:
        files["etc/hosts"] = (f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
                              f"127.0.0.1\t{hostname}\n")
    files["etc/resolv.conf"] = _host_file("/etc/resolv.conf")
    out = {}
    for rel, text in files.items():
        path = os.path.join(data, os.path.basename(rel))
        with open(path, "w") as f:
            f.write(text)
        out[rel] = path
    return out


def _host_file(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


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
    chunks = []
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
