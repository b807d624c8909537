"""The filesystem's commands: ``pyoverlay mount``, ``umount`` (here), ``trace``
(trace_cli.py), ``diff`` and ``explain`` (inspect_cli.py). Options become a ``MountConfig``.

:func:`new_group` builds a command group of them; the top-level ``pyoverlay`` command
(:mod:`pyoverlay_cli`) adds the runner's and the image store's commands to one and passes
the runner's container and image look-ups (:class:`overlayfs_py.resolvers.Resolvers`).
``main`` here is the filesystem alone (``python -m overlayfs_py``). This package never
imports the runner.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import click

from . import features, procfs
from .config import build_config
from .errors import PyoverlayError, fail
from .logs import one_line as _one_line
from .logs import setup_logging as _setup_logging
from .resolvers import Resolvers, current


def own_error_code(cmd: click.Command | None, default: int) -> int:
    """The exit status of a command's own errors (usage errors included): a command may
    carry ``own_error_code`` (the runner's ``run`` and ``exec``: 125, as docker's)."""
    return getattr(cmd, "own_error_code", None) or default


#: adds commands to a group when one of them is first needed (see ``_Main.lazy``)
Registrar = Callable[[click.Group], None]


class _Main(click.Group):
    """Every error is one line; a PyoverlayError that reaches here exits with its status.

    Commands other than ``mount`` and ``umount`` are registered lazily: ``lazy`` holds
    registrars run the first time a command the group does not have yet is asked for (or
    the list of all of them, for ``--help``). ``pyoverlay mount``/``umount`` so never import
    the trace tools, trio, the runner or the image store (docs/performance.md, Startup)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy: list[Registrar] = []

    def _register_all(self) -> None:
        while self.lazy:
            self.lazy.pop(0)(self)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        cmd = super().get_command(ctx, cmd_name)
        if cmd is None and self.lazy:
            self._register_all()
            cmd = super().get_command(ctx, cmd_name)
        return cmd

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._register_all()
        return super().list_commands(ctx)

    def main(  # always exits, whatever standalone_mode says
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> NoReturn:
        argv = list(sys.argv[1:] if args is None else args)
        try:
            rv = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except PyoverlayError as e:  # e.g. a state or data dir that is not the user's own
            cmd = self.commands.get(argv[0]) if argv else None
            fail(e, own_error_code(cmd, e.exit_code))
        except click.ClickException as e:  # one line, like every other error
            ctx = getattr(e, "ctx", None)
            where = ctx.command_path if ctx is not None else "pyoverlay"
            hint = f" (see '{where} --help')" if isinstance(e, click.UsageError) else ""
            fail(f"{e.format_message()}{hint}", own_error_code(ctx.command if ctx else None, e.exit_code))
        except click.exceptions.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


def _register_trace(group: click.Group) -> None:
    from .trace_cli import register

    register(group)


def _register_inspect(group: click.Group) -> None:
    from .inspect_cli import register

    register(group)


def _register_check(group: click.Group) -> None:
    group.add_command(check_cmd)


def new_group(
    resolvers: Resolvers | None = None,
    help: str = "pyoverlay: OverlayFS in userspace, and containers on it.",
    more: Sequence[Registrar] = (),
) -> click.Group:
    """A ``pyoverlay`` command group with the filesystem's commands; *resolvers* are the
    container and image look-ups its commands may use (the click context's ``obj``).
    *more* registers further commands (the runner's), lazily as trace and diff/explain
    are: only when one of them is asked for."""

    @click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"], "obj": resolvers or Resolvers()})
    def group() -> None:
        pass

    group.name = "pyoverlay"
    group.help = help
    group.add_command(mount_cmd)
    group.add_command(umount_cmd)
    group.add_command(mounts_cmd)
    assert isinstance(group, _Main)
    group.lazy.extend((_register_trace, _register_inspect, _register_check, *more))
    return group


@click.command("mount")
@click.argument("args", nargs=-1, required=True)
@click.option("--workdir", "workdir", metavar="DIR", help="Work directory (same filesystem as UPPER).")
@click.option(
    "-o",
    "options",
    multiple=True,
    metavar="OPTS",
    help="Kernel-style options: lowerdir=,upperdir=,workdir=,ro,userxattr,nouserxattr,allow_other,...",
)
@click.option("-f", "--foreground", is_flag=True, help="Stay attached; Ctrl-C/SIGTERM unmounts.")
@click.option("-d", "--debug", is_flag=True, help="Log every request.")
@click.option("--log", "logfile", metavar="FILE", help="Server log file (background mode).")
@click.option(
    "--trace",
    "trace_file",
    metavar="FILE",
    help="Write every copy-up, whiteout and opaque-dir event to FILE (JSON lines).",
)
@click.option(
    "--image", metavar="REF", help="The lower layers are the image REF's (then the arguments are [UPPER] MERGED)."
)
@click.option(
    "--docker-root",
    metavar="DIR",
    help="Docker's data root for --image (default $PYOVERLAY_DOCKER_ROOT or /var/lib/docker).",
)
@click.option(
    "--uidmap",
    "uidmap",
    multiple=True,
    metavar="S:P:N",
    help="Show stored uids S..S+N-1 as P..P+N-1 (repeatable; docs/rootless.md).",
)
@click.option("--gidmap", "gidmap", multiple=True, metavar="S:P:N", help="The same for gids.")
def mount_cmd(args, workdir, options, foreground, debug, logfile, trace_file, image, docker_root, uidmap, gidmap):
    """Mount LOWER1[:LOWER2...] [UPPER] MERGED (LOWER1 is the top lower layer).

    Without UPPER the mount is read-only. `-o lowerdir=...,upperdir=...,workdir=... MERGED`
    is accepted as with the kernel's overlayfs. `--image REF [UPPER] MERGED` takes the
    lower layers from an image (docs/images.md).
    """
    if image is not None:
        layers, upper, merged = _image_args(image, docker_root, args, options)
    elif docker_root is not None:
        fail("--docker-root needs --image", 2)
    elif len(args) == 1:
        layers, upper, merged = None, None, args[0]
    elif len(args) == 2:
        layers, upper, merged = args[0], None, args[1]
    elif len(args) == 3:
        layers, upper, merged = args
    else:
        fail("usage: pyoverlay mount LOWER1[:LOWER2...] [UPPER] MERGED", 2)
    from .privilege import check_fuse_access
    from .state import state_dir
    from .userxattr import plan

    try:
        cfg = build_config(
            layers,
            upper,
            merged,
            workdir=workdir,
            options=options,
            debug=debug,
            trace_file=trace_file,
            uidmap=uidmap,
            gidmap=gidmap,
        )
        cfg = plan(cfg)  # the private xattr namespace: decided once, before the fork
        check_fuse_access(cfg)  # /dev/fuse, fusermount3, allow_other: before anything is forked
        state_dir()  # the user's own (0700) before anything is mounted: the server records there
    except PyoverlayError as exc:
        fail(f"{exc}{_dead_mount_hint(merged, str(exc))}", exc.exit_code)
    if foreground:
        _setup_logging(debug, logfile)
        from .mount import serve

        try:
            sys.exit(serve(cfg))
        except Exception as exc:  # mount failed: nothing is mounted
            fail(f"cannot mount {cfg.mountpoint}: {_one_line(exc)}")
    _mount_background(cfg, debug, logfile)


def _dead_mount_hint(merged: str, msg: str) -> str:
    """After "MERGED is already a mount point": if that mount is a pyoverlay mount whose
    recorded server is gone (killed: the dead mount stays, every call on it but a cached
    stat fails with ENOTCONN), how to remove it; else nothing."""
    if not msg.endswith("is already a mount point"):
        return ""
    from . import state
    from .mountinfo import mounts

    mp = _mountpoint_path(merged)
    try:
        here = [m for m in mounts() if m.mountpoint == mp]
        rec = state.lookup(mp)
    except (OSError, PyoverlayError):
        return ""
    if not here or here[-1].fstype != PYOVERLAY_FSTYPE or rec is None or state.server_alive(rec):
        return ""  # not pyoverlay's, not known, or served
    return f" (its server is gone: 'pyoverlay umount {merged}' removes the dead mount)"


def _image_args(ref: str, docker_root: str | None, args: tuple[str, ...], options):
    """``mount --image REF [UPPER] MERGED``: (lower layers, upper, merged); exits 2 on error.
    The image is looked up by the resolver the top-level command passed (the runner's)."""
    find_image = current().find_image
    if find_image is None:
        fail("--image needs the image store: use the pyoverlay command", 2)
    if len(args) not in (1, 2):
        fail("usage: pyoverlay mount --image REF [UPPER] MERGED", 2)
    if any(o.startswith("lowerdir=") or ",lowerdir=" in o for o in options):
        fail("--image and -o lowerdir= both give the lower layers", 2)
    try:
        layers = find_image(ref, docker_root)
    except PyoverlayError as exc:
        fail(exc, 2)
    if not layers:
        fail(f"image {ref} has no layers", 2)
    upper, merged = (None, args[0]) if len(args) == 1 else args
    return list(layers), upper, merged


def _mount_background(cfg, debug: bool, logfile: str | None) -> None:
    from .mount import MountFailed, start_background

    try:
        start_background(cfg, debug=debug, logfile=logfile)
    except MountFailed as exc:
        fail(f"cannot mount {cfg.mountpoint}: {exc}")
    _done()


def _done() -> NoReturn:
    """Exit 0 at once: ``mount`` and ``umount`` have nothing left to clean up, and the
    interpreter's own teardown would add a good part of their run time."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


#: the filesystem type of a pyoverlay mount in /proc/self/mountinfo (fuse, subtype pyoverlay)
PYOVERLAY_FSTYPE = "fuse.pyoverlay"


def _mountpoint_path(path: str) -> str:
    """The absolute, resolved *path* without stat'ing its last component (a mountpoint whose
    server hangs would hang us)."""
    a = os.path.abspath(path)
    head, tail = os.path.split(a)
    return os.path.join(os.path.realpath(head), tail) if tail else a


@click.command("umount")
@click.argument("merged")
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait for the server to exit.")
def umount_cmd(merged, timeout):
    """Unmount MERGED (a pyoverlay mount) and wait for its server to exit."""
    from . import state
    from .mountinfo import mounts
    from .unmount import UnmountError, try_unmount, unmount

    mp = _mountpoint_path(merged)
    try:
        here = [m for m in mounts() if m.mountpoint == mp]
    except OSError as e:
        fail(f"cannot read /proc/self/mountinfo: {e.strerror}")
    if not here:
        fail(f"{merged} is not mounted")
    top = here[-1]  # the mount on top at that point is the one umount(2) would remove
    if top.fstype != PYOVERLAY_FSTYPE:
        fail(f"{merged} is not a pyoverlay mount (it is {top.fstype} from {top.source or 'none'}); not unmounting it")
    info = state.lookup(mp)
    try:
        unmount(mp)
    except UnmountError as e:
        # a mount whose server is gone (killed: its record stays) is dead for good (every
        # call fails with ENOTCONN); busy, it is detached instead of left behind
        if info is None or state.server_alive(info) or not try_unmount(mp, lazy=True):
            fail(f"cannot unmount {merged}: {e}")
        click.echo(
            f"pyoverlay: {merged}: its server (pid {info['pid']}) is gone and the mount is busy:"
            " detached it (it goes once no process uses it)",
            err=True,
        )
    if info is not None:
        if not _wait_exit(info["pid"], timeout):
            fail(f"server {info['pid']} of {merged} did not exit within {timeout:g}s")
        state.forget(mp, info["pid"])  # a killed server could not remove its record itself
    _done()


def _wait_exit(pid: int, timeout: float) -> bool:
    """Wait until process *pid* has exited (a zombie counts: it is no one's child of ours);
    False after *timeout* seconds. A pidfd wakes us the moment it exits; without one
    (ESRCH: gone already; ENOSYS: Linux < 5.3) /proc is polled."""
    import select

    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        pidfd = None
    deadline = time.monotonic() + timeout
    try:
        poller = None
        if pidfd is not None:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
        while procfs.alive(pid):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if poller is not None:
                poller.poll(min(left, 1.0) * 1000)  # readable once the process has exited
            else:
                time.sleep(min(left, 0.005))
        return True
    finally:
        if pidfd is not None:
            os.close(pidfd)


def mount_summary(rec: dict) -> dict:
    """What ``pyoverlay mounts --json`` shows of a state record (state.records)."""
    cfg = rec.get("config") or {}
    return {
        "mountpoint": rec["mountpoint"],
        "pid": rec["pid"],
        "engine": cfg.get("engine"),
        "fsname": cfg.get("fsname"),
        "lowerdirs": list(cfg.get("lowerdirs") or ()),
        "upperdir": cfg.get("upperdir"),
        "workdir": cfg.get("workdir"),
        "read_only": bool(cfg.get("read_only")),
        "volatile": bool(cfg.get("volatile")),
        "aufs_whiteouts": bool(cfg.get("aufs_whiteouts")),
        "redirect_dir": cfg.get("redirect_dir") or features.redirect_default(),
        "uuid": cfg.get("uuid") or "auto",  # the effective mode (uuidmode.settle_config)
        "index": bool(cfg.get("index")),
        "metacopy": cfg.get("metacopy") or features.metacopy_default(),
        "container": cfg.get("container"),
        "trace_socket": rec.get("trace_socket"),
    }


@click.command("mounts")
@click.option("--json", "as_json", is_flag=True, help="One JSON list of the mounts.")
def mounts_cmd(as_json):
    """List the live pyoverlay mounts: mountpoint, server pid, engine, layers, trace socket.

    Read from the mount records (this user's state dir): every mount made by `pyoverlay
    mount`, mount.fuse.pyoverlay (mount(8), fstab, podman's mount_program) or the runner.
    Records of servers that are gone are removed. `pyoverlay trace MOUNTPOINT` follows one.
    """
    from . import state

    try:
        found = [mount_summary(r) for r in state.records()]
    except OSError as e:
        fail(f"cannot read the mount records: {_one_line(e)}")
    if as_json:
        import json

        click.echo(json.dumps(found, indent=2))
        _done()
    for m in found:
        mode = "read-only" if m["read_only"] else "read-write" + (", volatile" if m["volatile"] else "")
        mode += ", aufs whiteouts" if m["aufs_whiteouts"] else ""
        if m["redirect_dir"] != features.redirect_default():  # as the kernel shows its options
            mode += f", redirect_dir={m['redirect_dir']}"
        if m["index"] != features.defaults().index:
            mode += f", index={'on' if m['index'] else 'off'}"
        if m["metacopy"] == "on":  # the kernel shows metacopy=on only
            mode += ", metacopy=on"
        extra = f", container {m['container']}" if m["container"] else ""
        click.echo(f"{m['mountpoint']}  (pid {m['pid']}, engine {m['engine']}, {mode}{extra})")
        for lower in m["lowerdirs"]:
            click.echo(f"  lower  {lower}")
        if m["upperdir"]:
            click.echo(f"  upper  {m['upperdir']}")
            click.echo(f"  work   {m['workdir']}")
        click.echo(f"  trace  {m['trace_socket']}")
    _done()


#: the filesystem alone: ``python -m overlayfs_py`` (no containers, no images)
main = new_group(help="pyoverlay's filesystem commands (`pyoverlay` has the runner's too).")

if __name__ == "__main__":  # pragma: no cover
    main()


@click.command("check")
@click.argument("upper", metavar="UPPER")
@click.option("--workdir", "workdir", required=True, metavar="WORK", help="The workdir used with UPPER.")
@click.option(
    "--lower",
    "lower",
    multiple=True,
    metavar="L1:L2...",
    help="The lower layers, top first (repeatable; default: those of a container using UPPER).",
)
@click.option(
    "--userxattr/--nouserxattr",
    "userxattr",
    default=None,
    help="The private xattrs are user.overlay.* / trusted.overlay.* (default: as the mount chooses).",
)
@click.option("--repair", is_flag=True, help="Fix what is safe to fix, and say what was done.")
@click.option("--force", is_flag=True, help="Check even though UPPER or WORK is mounted.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def check_cmd(upper, workdir, lower, userxattr, repair, force, as_json):
    """Check an upper layer and its workdir while nothing has them mounted, as fsck.overlay
    does: work/ leftovers, orphan whiteouts, bad redirects, origins, opaque and override
    xattrs. Exit status (fsck's): 0 clean, 1 problems found and all repaired, 4 problems
    left, 8 the check could not run, 16 a usage error."""
    import json

    from .check import EXIT_ERROR, CheckError, check, choose_userxattr, in_use

    try:
        lowers = _check_lowers(upper, lower)
        if not force:
            user = in_use(upper, workdir)
            if user is not None:
                raise CheckError(f"{upper} or {workdir} is in use by {user}: unmount it first (or --force)")
        ux = choose_userxattr(upper, workdir, userxattr)
        report = check(upper, workdir, lowers, userxattr=ux, repair=repair)
    except PyoverlayError as e:
        fail(e, e.exit_code if e.exit_code == 16 else EXIT_ERROR)
    except OSError as e:
        fail(f"cannot check the layers: {e}", EXIT_ERROR)

    def out(line: str, err: bool = False) -> None:  # names are bytes on disk: print them as such
        click.echo(os.fsencode(line) + b"\n", nl=False, err=err)

    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=1))
    else:
        for p in report.problems:
            out(str(p))
        if repair:
            for p in report.left:
                if not any(q.kind == p.kind and q.path == p.path for q in report.problems):
                    out(f"{p} (after the repair)")
        for note in report.notes:
            out(f"note: {note}", err=True)
        n, left = len(report.problems), len(report.left)
        if not n:
            out(f"{upper}: clean")
        elif repair:
            done = sum(p.repaired for p in report.problems)
            out(f"{upper}: {n} problem(s), {done} repaired, {left} left")
        else:
            fixable = sum(p.repair is not None for p in report.problems)
            out(f"{upper}: {n} problem(s) (--repair fixes {fixable})")
    sys.exit(report.exit_status())


check_cmd.own_error_code = 16  # type: ignore[attr-defined]  # fsck's usage error


def _check_lowers(upper: str, specs: Sequence[str]) -> list[str] | None:
    """``--lower`` (each L1:L2..., split as ``mount`` splits them, in order), else a
    container's lowers, else None (unknown). A given layer is not resolved: a symlink in
    its place is refused when it is opened (check.py)."""
    from .config import ConfigError, split_positional_lowers
    from .inspect_cli import InspectError, _lowers_of_upper

    usage = 16  # fsck's usage error
    if specs:
        out: list[str] = []
        for spec in specs:
            try:
                parts = split_positional_lowers(spec)
            except ConfigError as e:
                raise InspectError(str(e), exit_code=usage) from None
            for p in parts:
                if not os.path.lexists(p):
                    raise InspectError(f"lower layer {p!r} does not exist", exit_code=usage)
                out.append(os.path.abspath(p))
        return out
    try:
        return _lowers_of_upper(os.path.realpath(upper))[0]
    except InspectError:
        return None
