"""The mount lifecycle: prepare the workdir, mount, serve, unmount.

``serve`` runs in the server process. It mounts (``pyfuse3.init``), reports
readiness through an optional pipe fd, then serves until SIGTERM/SIGINT or until the
mount vanishes (``fusermount3 -u`` / ``umount`` end the session and ``pyfuse3.main``
returns). Teardown always runs in reverse order of setup.
"""

from __future__ import annotations

import errno
import faulthandler
import gc
import logging
import os
import shutil
import signal

import pyfuse3
import trio

from . import _sys, state
from .config import MountConfig
from .fs import Operations
from .layers import LayerStack
from .logs import one_line, setup_logging
from .overlay import Overlay
from .trace import Tracer
from .tracesink import TraceSink
from .whiteout import XattrNames

log = logging.getLogger(__name__)

WORK_SUBDIR = "work"  # like the kernel: <workdir>/work holds objects being built


def prepare_workdir(cfg: MountConfig) -> None:
    """Create the workdir (if it is the default one) and its ``work/`` dir, emptying leftovers
    of an interrupted copy-up there (the kernel does the same with its ``work/`` dir)."""
    if cfg.workdir is None or cfg.read_only:
        return
    os.makedirs(cfg.workdir, mode=0o755, exist_ok=True)
    wfd = os.open(cfg.workdir, _sys.DIR_FLAGS)
    try:
        work = os.path.join(cfg.workdir, WORK_SUBDIR)
        try:
            os.mkdir(WORK_SUBDIR, 0o000, dir_fd=wfd)
        except FileExistsError:
            if not os.path.isdir(work) or os.path.islink(work):
                raise OSError(errno.ENOTDIR, f"{work} is not a directory") from None
            os.chmod(work, 0o000)
            for name in os.listdir(work):
                p = os.path.join(work, name)
                if os.path.isdir(p) and not os.path.islink(p):
                    shutil.rmtree(p)
                else:
                    os.unlink(p)
    finally:
        os.close(wfd)


def fuse_options(cfg: MountConfig) -> set[str]:
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
    if cfg.debug:
        opts.add("debug")
    return opts


def build_overlay(cfg: MountConfig) -> Overlay:
    names = XattrNames(cfg.xattr_prefix)
    stack = LayerStack(cfg.lowerdirs, cfg.upperdir, names, init_layer=cfg.container is not None)
    work_fd = None
    if cfg.upperdir is not None and not cfg.read_only:
        work_fd = os.open(os.path.join(cfg.workdir, WORK_SUBDIR), _sys.DIR_FLAGS)
    return Overlay(stack, names, read_only=cfg.read_only, work_fd=work_fd,
                   tracer=Tracer(container=cfg.container))


async def _main(cfg: MountConfig, overlay: Overlay) -> None:
    sink = TraceSink(overlay.trace, cfg.trace_file, state.trace_socket(cfg.mountpoint))
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)

        async def on_signal():
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
                async for _ in sigs:
                    log.info("signal received: unmounting %s", cfg.mountpoint)
                    pyfuse3.terminate()
                    return

        nursery.start_soon(on_signal)
        try:
            await pyfuse3.main()
        finally:
            overlay.trace.close()  # the sink writes the end record and returns
        with trio.move_on_after(5):
            while sink.running:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()


class MountFailed(Exception):
    """The server could not mount (one line, from the server)."""


def start_background(cfg: MountConfig, *, debug: bool = False, logfile: str | None = None,
                     parent_death_signal: int | None = None) -> int:
    """Fork a server for *cfg* and return its pid once the mount is live.

    The server gets its own session and /dev/null for stdio (its log goes to
    *logfile*). With *parent_death_signal* it receives that signal when the calling
    process dies (the runner uses SIGTERM: a killed monitor leaves no mount behind).
    Raises MountFailed with the server's reason; nothing is mounted then.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the server
        os.close(r)
        try:
            if parent_death_signal:
                import ctypes

                ctypes.CDLL(None).prctl(1, parent_death_signal, 0, 0, 0)  # PR_SET_PDEATHSIG
            os.setsid()
            _sys.close_fds_except(w)
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1) if logfile else (0, 1, 2):
                os.dup2(devnull, fd)
            os.close(devnull)
            os.chdir("/")
            setup_logging(debug, logfile)
            rc = serve(cfg, ready_fd=w)
        except BaseException as exc:  # report to the waiting parent, then die
            try:
                os.write(w, f"error: {one_line(exc)}\n".encode())
            except OSError:
                pass
            log.exception("server failed")
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
    _tune_gc()
    _sys.raise_nofile_limit()
    os.umask(0)  # modes of new objects are exactly what the caller asked for
    prepare_workdir(cfg)
    overlay = build_overlay(cfg)
    ops = Operations(overlay)
    try:
        pyfuse3.init(ops, cfg.mountpoint, fuse_options(cfg))
    except Exception:
        overlay.destroy()
        raise
    unmount_clean = False
    state.record(cfg.mountpoint, os.getpid(), cfg)
    try:
        if ready_fd is not None:
            os.write(ready_fd, b"ok\n")
            os.close(ready_fd)
        trio.run(_main, cfg, overlay)
        unmount_clean = True
    finally:
        pyfuse3.close(unmount=True)
        overlay.destroy()
        state.forget(cfg.mountpoint, os.getpid())
        log.debug("server exiting (clean=%s)", unmount_clean)
    return 0
