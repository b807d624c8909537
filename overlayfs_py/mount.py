"""The mount lifecycle: prepare the workdir, mount, serve, unmount.

``serve`` runs in the server process. It mounts, reports readiness through an optional
pipe fd, then serves until SIGTERM/SIGINT or until the mount vanishes (``fusermount3 -u`` /
``umount`` end the session). Teardown always runs in reverse order of setup.

Startup (docs/architecture.md, "The mount lifecycle"): this module imports only what the
checks before the mount need; the engines (pyfuse3, trio, the core) are imported by the
server when it gets to them. The direct engine mounts right after the workdir checks and
reports readiness at once: the kernel queues requests until INIT is answered, so the
caller goes on while the server imports and builds the overlay. A failure after that is
logged, the mount is removed and the server exits 1.
"""

from __future__ import annotations

import contextlib
import faulthandler
import gc
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from . import _sys, features, state, unixsock, userxattr, uuidmode
from .config import MountConfig, resolve_features, xino_default
from .errors import PyoverlayError
from .logs import one_line, setup_logging
from .privilege import privileged
from .whiteout import make_whiteout
from .workdir import WorkDir

if TYPE_CHECKING:
    import socket

    import trio

    from .budget import DropEntries
    from .core import Core
    from .overlay import Overlay

log = logging.getLogger(__name__)


def prepare_workdir(cfg: MountConfig) -> WorkDir | None:
    """Open (creating the default one if missing) the workdir and its ``work/`` dir, refusing
    either unless it is a directory of the server's own user (checked on the opened fds),
    and empty ``work/`` of an interrupted copy-up's leftovers (the kernel does the same).
    None for a mount without an upper. The caller closes what it returns."""
    if cfg.workdir is None or (cfg.read_only and not features.indexes(cfg)):
        return None  # (a read-only mount with index=on reads the index, as the kernel's ro)
    wd = WorkDir.prepare(cfg.workdir, volatile=cfg.volatile)
    if features.indexes(cfg):
        from . import index
        from .whiteout import XattrNames

        assert cfg.upperdir is not None
        try:
            wd.index_fd = index.prepare(
                wd.fd,
                cfg.upperdir,
                list(cfg.lowerdirs),
                XattrNames(cfg.xattr_prefix),
                _sys.fs_uuid,
                0o000 if os.geteuid() == 0 else 0o700,
            )
        except BaseException:
            wd.close()
            raise
    return wd


def check_whiteouts(cfg: MountConfig, wd: WorkDir | None) -> None:
    """Without privilege, make sure a whiteout (char 0/0) can be created in the upper's
    filesystem (Linux >= 5.8 allows it to anyone); refuse the mount otherwise. The kernel
    hides an xattr whiteout of an *upper* layer on lookup but still lists it in readdir
    (Linux 6.18), so falling back to that form would break the kernel's view."""
    if wd is None or privileged():
        return
    try:
        make_whiteout(wd.work_fd, b"#whiteout-probe")
        os.unlink("#whiteout-probe", dir_fd=wd.work_fd)
    except OSError as exc:
        raise MountFailed(
            f"cannot create whiteouts (char 0/0 devices) in {cfg.workdir}: {exc.strerror};"
            " without root this needs Linux 5.8 or later and a filesystem that allows it"
        ) from None


def fuse_options(cfg: MountConfig) -> set[str]:
    import pyfuse3

    opts = set(pyfuse3.default_options)
    opts.add(f"fsname={cfg.fsname}")
    opts.add("subtype=pyoverlay")
    if not cfg.default_permissions:
        opts.discard("default_permissions")
    if cfg.allow_other or os.geteuid() == 0:
        # A kernel overlay is visible to every user; as root do the same (fuse-overlayfs too).
        opts.add("allow_other")
    if os.geteuid() == 0:
        opts.update(("suid", "dev"))
    if cfg.read_only:
        opts.add("ro")
    opts.update(cfg.mount_flags)  # libfuse makes them mount flags
    if os.geteuid() == 0:
        opts.difference_update(f[2:] for f in cfg.mount_flags)  # nosuid beats the suid above
    if cfg.debug:
        opts.add("debug")
    return opts


#: the signals that unmount. A caller may send one as soon as the mount is live, before
#: _main's receiver is installed: serve blocks them (in every thread it starts) until then
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: the signal that makes the server log what it holds (``server_stats``), blocked as those
STATS_SIGNAL = signal.SIGUSR1


def server_stats(overlay: Overlay) -> dict[str, int]:
    """What the server holds now: live nodes, the node fds among them, open handles, the
    directory fd cache, the trace's open comm files, and every descriptor of the process
    (docs/architecture.md)."""
    return {
        "nodes": len(overlay.inodes),
        "node_fds": overlay.inodes.held,
        "handles": len(overlay.handles),
        "dir_fds": len(overlay.stack.dirfds),
        "comm_fds": overlay.trace.procs.open_files,  # the trace's processes' comm files
        "fds": len(os.listdir("/proc/self/fd")) - 1,  # less the one listing it
    }


def _no_drops(drops: list[tuple[int, bytes]]) -> None:
    return None


def _no_attr_change(node_id: int) -> None:
    return None


def build_overlay(
    cfg: MountConfig,
    wd: WorkDir | None,
    *,
    drop_entries: DropEntries = _no_drops,
    attr_changed: Callable[[int], None] = _no_attr_change,
    listing_changed: Callable[[int], None] = _no_attr_change,
) -> Core:
    """The filesystem core of *cfg*, every object given its collaborators here (and only
    here). A read-write one uses a ``Work`` on (a dup of) the checked ``work/`` fd of *wd*.
    The engine's two ways of telling the kernel's caches are *drop_entries* (the node
    budget's, ``fs.drop_entries``) and *attr_changed* (a node's attributes changed in a
    copy-up: its st_ino, its parent's size; ``fs.attr_changed``), and *listing_changed* (a
    directory's listing changed behind the kernel's back: ``dircache.ListingCache``); the
    defaults do nothing (the core used without a kernel)."""
    from .budget import NodeBudget, clamp_node_budget, node_fd_cap
    from .copyup import CopyUp
    from .core import Core
    from .dircache import ListingCache
    from .handles import HandleTable
    from .inodes import Node
    from .layers import LayerStack
    from .overlay import Overlay, new_inode_table
    from .ownership import Owners
    from .trace import Tracer
    from .whiteout import XattrNames
    from .write import WritePath

    names = XattrNames(cfg.xattr_prefix)
    stack = LayerStack(
        cfg.lowerdirs,
        cfg.upperdir,
        names,
        init_layer=cfg.container is not None,
        aufs=cfg.aufs_whiteouts,
        xino=cfg.xino or xino_default(),
        index=features.indexes(cfg),
        # ovl_allow_offline_changes: no metacopy, no redirect_dir=on (read-only mounts too)
        offline_changes=not (features.metacopy(cfg) or features.resolve(cfg).redirect_dir == "on"),
    )
    stack.follow_redirects = features.follows_redirects(cfg)
    stack.metacopy = features.metacopy(cfg)
    # -o uuid=: the overlay's UUID (overlay.uuid on the upper root, written here where the
    # kernel writes it: also on a read-only mount) and the UUIDs of origin records
    uuidmode.settle(stack, names, cfg.uuid)
    # Every node holds a descriptor: the budget and the table's cap fit RLIMIT_NOFILE.
    fd_limit = _sys.raise_nofile_limit()
    max_nodes = clamp_node_budget(cfg.max_nodes, fd_limit, stack.dirfds)
    inodes = new_inode_table(stack, node_fd_cap(fd_limit, stack.dirfds.capacity))
    budget = NodeBudget(inodes, max_nodes, drop_entries)
    tracer = Tracer(container=cfg.container)
    handles = HandleTable()
    listings = ListingCache(kernel_stale=listing_changed)
    owners = Owners(cfg.uidmap, cfg.gidmap, stack.layers, stack.upper, squash=(cfg.squash_uid, cfg.squash_gid))
    work = copyup = None
    index = None
    if wd is not None and wd.index_fd >= 0:
        from .index import Index

        index = Index(os.dup(wd.index_fd), names)
    if cfg.upperdir is not None and not cfg.read_only:
        if wd is None:
            raise ValueError("a read-write mount needs its prepared workdir")
        work = wd.work()

        def copied_up(node: Node, ino_changed: bool) -> None:
            listings.copied_up(node, ino_changed)  # the name is served by upper now
            handles.follow_copy_up(node)  # files open on the lower object read the upper one

        copyup = CopyUp(
            stack,
            names,
            inodes,
            work,
            tracer,
            owners,
            sync=not cfg.volatile,
            metacopy=stack.metacopy,
            on_copied_up=copied_up,
            on_attr_changed=attr_changed,
            index=index,
        )
    view = Overlay(
        stack, names, inodes, handles, listings, owners, tracer, copyup, on_out_of_fds=budget.out_of_fds, index=index
    )
    writes = WritePath(
        view,
        stack,
        inodes,
        handles,
        listings,
        copyup,
        owners,
        names,
        tracer,
        work,
        volatile=cfg.volatile,
        redirect_dir=features.creates_redirects(cfg),
        redirect_max=features.redirect_max(),
    )
    return Core(view, writes, budget, work)


async def _main(
    cfg: MountConfig,
    overlay: Overlay,
    run: Callable[[], Awaitable[None]],
    stop: Callable[[], None],
    listener: socket.socket | None = None,
) -> None:
    """Serve (*run*: the engine's loop) beside the trace sink until unmounted or signalled
    (*stop* ends the engine's loop). *listener*: the trace socket, if bound already."""
    import trio

    from .tracesink import TraceSink

    sink = TraceSink(overlay.trace, cfg.trace_file, state.trace_socket(cfg.mountpoint), listener)
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)

        async def on_signal():
            with trio.open_signal_receiver(*STOP_SIGNALS) as sigs:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # held since serve began
                async for _ in sigs:
                    log.info("signal received: unmounting %s", cfg.mountpoint)
                    stop()
                    return

        async def on_stats():
            with trio.open_signal_receiver(STATS_SIGNAL) as sigs:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, (STATS_SIGNAL,))
                async for _ in sigs:
                    log.info("stats: %s", " ".join(f"{k}={v}" for k, v in server_stats(overlay).items()))

        nursery.start_soon(on_signal)
        nursery.start_soon(on_stats)
        try:
            await run()
        finally:
            overlay.trace.close()  # the sink writes the end record and returns
        with trio.move_on_after(5):
            while sink.running:  # it ends within a pass or two: `pyoverlay umount` waits for us
                await trio.sleep(0.001)
        nursery.cancel_scope.cancel()


class MountFailed(PyoverlayError):
    """The server could not mount (one line, from the server)."""


def start_background(
    cfg: MountConfig, *, debug: bool = False, logfile: str | None = None, parent_death_signal: int | None = None
) -> int:
    """Fork a server for *cfg* and return its pid once the mount is live.

    The server gets its own session and /dev/null for stdio (its log goes to
    *logfile*). With *parent_death_signal* it receives that signal when the calling
    process dies (the runner uses SIGTERM: a killed monitor leaves no mount behind).
    Raises MountFailed with the server's reason; nothing is mounted then. A configuration
    whose private xattr namespace is not decided yet is planned here, before the fork
    (``userxattr.plan``; ConfigError on a conflict).
    """
    if cfg.userxattr is None:
        cfg = userxattr.plan(cfg)
    cfg = resolve_features(cfg)  # ConfigError on options the kernel refuses together
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the server
        os.close(r)
        try:
            if parent_death_signal:
                _sys.set_parent_death_signal(parent_death_signal)
            os.setsid()
            _sys.close_fds_except(w, cfg.fuse_fd)  # a caller's mounted /dev/fuse fd stays open
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            os.close(devnull)
            if logfile:  # stderr (faulthandler, C-level messages) goes to the log too, never
                # to the caller's stderr: a caller capturing it would wait for the server's exit
                err = os.open(logfile, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
                os.dup2(err, 2)
                os.close(err)
            os.chdir("/")
            setup_logging(debug, logfile)
            rc = serve(cfg, ready_fd=w)
        except BaseException as exc:  # report to the parent if it still waits, then die
            with contextlib.suppress(OSError):
                os.write(w, f"error: {one_line(exc)}\n".encode())
            log.error("server failed: %s", one_line(exc))  # one line; the traceback with --debug
            log.debug("server failed", exc_info=True)
            os._exit(1)
        os._exit(rc)
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 4096)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    msg = b"".join(chunks).decode(errors="replace").strip()
    if msg.startswith("ok"):
        return pid
    os.waitpid(pid, 0)
    raise MountFailed(msg.removeprefix("error: ") or "server exited")


def _tune_gc() -> None:
    """The server allocates a node per name it has seen (a walk of a big tree: millions).
    The cyclic collector would rescan all of them again and again; the few cycles the
    server makes are collected rarely instead (see docs/performance.md)."""
    gc.freeze()
    gc.set_threshold(100_000, 50, 1000)


def serve(cfg: MountConfig, ready_fd: int | None = None) -> int:
    """Mount *cfg* and serve it until unmounted. Returns an exit status."""
    faulthandler.enable()
    # before any thread; until _main's receivers
    signal.pthread_sigmask(signal.SIG_BLOCK, (*STOP_SIGNALS, STATS_SIGNAL))
    _tune_gc()
    _sys.raise_nofile_limit()  # the last use of CAP_SYS_RESOURCE: it goes next
    # like the kernel's overlay (ovl_fill_super): the upper's quotas and reserved space apply
    # to what the server writes there; before any thread (capabilities are per thread)
    _sys.lower_effective_cap(_sys.CAP_SYS_RESOURCE)
    os.umask(0)  # modes of new objects are exactly what the caller asked for
    if cfg.userxattr is None:
        raise ValueError("the mount is not planned: run userxattr.plan(cfg) before serving it")
    if cfg.engine == "direct":
        return _serve_direct(cfg, ready_fd)
    return _serve_pyfuse3(cfg, ready_fd)


def _ready(cfg: MountConfig, wd: WorkDir | None, ready_fd: int | None) -> None:
    """The mount is live: record it (``pyoverlay umount`` finds the server there), record
    the workdir's xattr namespace and tell the waiting caller. An unusable state dir
    raises: the caller unmounts."""
    state.record(cfg.mountpoint, os.getpid(), cfg)
    userxattr.record(cfg, wd.fd if wd is not None else None)
    if ready_fd is not None:
        os.write(ready_fd, b"ok\n")
        # the caller reads to EOF: end the pipe, but leave its number on /dev/null, so that a
        # later error report (start_background) can never land in a file opened since
        null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        os.dup2(null, ready_fd, inheritable=False)
        os.close(null)


def _serve_pyfuse3(cfg: MountConfig, ready_fd: int | None) -> int:
    """``serve`` with pyfuse3 (libfuse mounts; ``pyfuse3.init`` needs the operations, so the
    overlay is built before the mount)."""
    import pyfuse3
    import trio

    from . import fs

    wd = prepare_workdir(cfg)
    try:
        check_whiteouts(cfg, wd)
        cfg = uuidmode.settle_config(cfg)  # overlay.uuid written before the mount goes live
        core = build_overlay(cfg, wd, drop_entries=fs.drop_entries, attr_changed=fs.attr_changed)
    except BaseException:
        if wd is not None:
            wd.close()
        raise
    ops = fs.Operations(core)
    # libfuse >= 3.3 takes /dev/fd/N as "already mounted, serve fd N" (and never unmounts it)
    target = cfg.mountpoint if cfg.fuse_fd is None else f"/dev/fd/{cfg.fuse_fd}"
    try:
        pyfuse3.init(ops, target, fuse_options(cfg))
    except Exception:
        core.destroy()
        if wd is not None:
            wd.close()
        raise
    unmount_clean = False
    try:
        try:
            _ready(cfg, wd, ready_fd)
        finally:
            if wd is not None:
                wd.close()  # the overlay holds its own work/ fd
        trio.run(_main, cfg, core.view, pyfuse3.main, pyfuse3.terminate)
        unmount_clean = True
    finally:
        pyfuse3.close(unmount=cfg.fuse_fd is None)
        core.destroy()
        state.forget(cfg.mountpoint, os.getpid())
        log.debug("server exiting (clean=%s)", unmount_clean)
    return 0


#: a mount served without trio (``Session.serve_early``) imports it after this long without
#: a request, or at once when something needs it (docs/performance.md, "Startup")
EARLY_IDLE_MS = 500


def _serve_direct(cfg: MountConfig, ready_fd: int | None) -> int:
    """``serve`` with pyoverlay's own FUSE engine (``-o engine=direct``, overlayfs_py/fuse/).

    Mounts as soon as the workdir is checked and reports readiness then; the engine and the
    core are imported and built afterwards (the kernel holds requests until INIT is
    answered). If that fails, the mount is removed before the error propagates."""
    from .fuse import mounting as direct
    from .fuse import passthrough as direct_passthrough

    direct_passthrough.refuse_if_impossible(cfg.passthrough)
    wd = prepare_workdir(cfg)
    try:
        check_whiteouts(cfg, wd)
        cfg = uuidmode.settle_config(cfg)  # overlay.uuid written before the mount goes live
        fm = direct.mount_fuse(cfg)  # or the fd handed in (cfg.fuse_fd)
    except BaseException:
        if wd is not None:
            wd.close()
        raise
    fd = fm.fd
    # bound before the caller returns: a reader may connect at once (and wakes the server)
    socket_path = state.trace_socket(cfg.mountpoint)
    listener = unixsock.listen(socket_path)
    try:
        _ready(cfg, wd, ready_fd)
    except BaseException:
        if listener is not None:
            unixsock.unbind_unix(listener, socket_path)
        direct.unmount_fuse(fm, False)
        if fm.owned:
            os.close(fd)
        if wd is not None:
            wd.close()
        raise
    # the caller has returned: from here on a failure is logged, unmounted and exit status 1
    notifier: Any = None
    sess: Any = None
    core: Core | None = None
    unmount_clean = False
    try:
        from .fuse import ops as direct_ops
        from .fuse import session

        notifier = session.Notifier()
        cancel: list[trio.CancelScope] = []

        async def run() -> None:
            with trio.CancelScope() as scope:
                cancel.append(scope)
                await sess.run()

        def stop() -> None:
            for scope in cancel:
                scope.cancel()

        try:
            core = build_overlay(
                cfg,
                wd,
                drop_entries=notifier.drop_entries,
                attr_changed=notifier.attr_changed,
                listing_changed=notifier.listing_changed,
            )
        finally:
            if wd is not None:
                wd.close()  # the overlay holds its own work/ fd
        notifier.start(fd)
        ops = direct_ops.Ops(core, direct_passthrough.Passthrough(cfg.passthrough))
        sess = session.Session(fd, ops, core.view.trace)
        why = "a trace file is written"  # as events come: by trio's sink
        if cfg.trace_file is None:
            signalled = _sys.signalfd((*STOP_SIGNALS, STATS_SIGNAL))  # both received in trio
            try:
                wake = [signalled] if listener is None else [signalled, listener.fileno()]
                woken = sess.serve_early(wake, EARLY_IDLE_MS)
            finally:
                os.close(signalled)
            why = (
                "a signal" if woken == signalled
                else "a trace reader" if woken is not None
                else "a request that needs a task" if sess.has_deferred
                else f"the mount ended ({sess.end_reason})" if sess.end_reason is not None
                else f"idle for {EARLY_IDLE_MS} ms"
            )  # fmt: skip
        log.info("direct engine: requests answered before trio: %d; then %s", sess.early_served, why)
        if sess.end_reason is None or cfg.trace_file is not None:
            import trio

            sink_listener, listener = listener, None  # the sink's now: it closes and unlinks it
            trio.run(_main, cfg, core.view, run, stop, sink_listener)
        # else: unmounted before anything needed trio: no reader came, no file is written
        unmount_clean = True
    finally:
        if listener is not None:
            unixsock.unbind_unix(listener, socket_path)
        direct.unmount_fuse(fm, sess is not None and sess.ended_by_kernel)
        if notifier is not None:
            notifier.stop()
        if fm.owned:
            os.close(fd)
        if core is not None:
            core.destroy()
        state.forget(cfg.mountpoint, os.getpid())
        log.debug("server exiting (clean=%s)", unmount_clean)
    return 0
