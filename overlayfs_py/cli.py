"""The ``pyoverlay`` command line. Options become a ``MountConfig``; nothing else lives here."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import click

from . import procfs
from .config import ConfigError, build_config
from .logs import one_line as _one_line
from .logs import setup_logging as _setup_logging


def _fail(msg: str, code: int = 1) -> None:
    click.echo(f"pyoverlay: {msg}", err=True)
    sys.exit(code)


class _Main(click.Group):
    """Runner commands exit with 125 on a usage error (docker's code for its own errors)."""

    def main(self, args=None, prog_name=None, **extra):
        from runner.cli import USAGE_125

        from .state import StateDirError

        extra.pop("standalone_mode", None)
        argv = list(sys.argv[1:] if args is None else args)
        try:
            rv = super().main(argv, prog_name, standalone_mode=False, **extra)
        except StateDirError as e:  # a state or data dir that is not the user's own
            click.echo(f"pyoverlay: {e}", err=True)
            sys.exit(125 if argv and argv[0] in USAGE_125 else 1)
        except click.ClickException as e:  # one line, like every other error
            ctx = getattr(e, "ctx", None)
            where = ctx.command_path if ctx is not None else "pyoverlay"
            hint = f" (see '{where} --help')" if isinstance(e, click.UsageError) else ""
            click.echo(f"pyoverlay: {e.format_message()}{hint}", err=True)
            name = ctx.command.name if ctx is not None else None
            sys.exit(125 if name in USAGE_125 else e.exit_code)
        except click.exceptions.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """pyoverlay: OverlayFS in userspace, and containers on it."""


@main.command("mount")
@click.argument("args", nargs=-1, required=True)
@click.option("--workdir", "workdir", metavar="DIR", help="Work directory (same filesystem as UPPER).")
@click.option("-o", "options", multiple=True, metavar="OPTS",
              help="Kernel-style options: lowerdir=,upperdir=,workdir=,ro,userxattr,nouserxattr,allow_other,...")
@click.option("-f", "--foreground", is_flag=True, help="Stay attached; Ctrl-C/SIGTERM unmounts.")
@click.option("-d", "--debug", is_flag=True, help="Log every request.")
@click.option("--log", "logfile", metavar="FILE", help="Server log file (background mode).")
@click.option("--trace", "trace_file", metavar="FILE",
              help="Write every copy-up, whiteout and opaque-dir event to FILE (JSON lines).")
@click.option("--image", metavar="REF",
              help="The lower layers are the image REF's (then the arguments are [UPPER] MERGED).")
@click.option("--docker-root", metavar="DIR",
              help="Docker's data root for --image (default $PYOVERLAY_DOCKER_ROOT or /var/lib/docker).")
@click.option("--uidmap", "uidmap", multiple=True, metavar="S:P:N",
              help="Show stored uids S..S+N-1 as P..P+N-1 (repeatable; docs/rootless.md).")
@click.option("--gidmap", "gidmap", multiple=True, metavar="S:P:N", help="The same for gids.")
def mount_cmd(args, workdir, options, foreground, debug, logfile, trace_file, image, docker_root,
              uidmap, gidmap):
    """Mount LOWER1[:LOWER2...] [UPPER] MERGED (LOWER1 is the top lower layer).

    Without UPPER the mount is read-only. `-o lowerdir=...,upperdir=...,workdir=... MERGED`
    is accepted as with the kernel's overlayfs. `--image REF [UPPER] MERGED` takes the
    lower layers from an image (docs/images.md).
    """
    if image is not None:
        layers, upper, merged = _image_args(image, docker_root, args, options)
    elif docker_root is not None:
        _fail("--docker-root needs --image", 2)
    elif len(args) == 1:
        layers, upper, merged = None, None, args[0]
    elif len(args) == 2:
        layers, upper, merged = args[0], None, args[1]
    elif len(args) == 3:
        layers, upper, merged = args
    else:
        _fail("usage: pyoverlay mount LOWER1[:LOWER2...] [UPPER] MERGED", 2)
    try:
        cfg = build_config(layers, upper, merged, workdir=workdir, options=options, debug=debug,
                           trace_file=trace_file, uidmap=uidmap, gidmap=gidmap)
        from .privilege import check_fuse_access

        check_fuse_access(cfg)  # /dev/fuse, fusermount3, allow_other: before anything is forked
    except ConfigError as exc:
        _fail(str(exc), 2)
    from .state import StateDirError, state_dir

    try:
        state_dir()  # the user's own (0700) before anything is mounted: the server records there
    except StateDirError as exc:
        _fail(str(exc))
    if foreground:
        _setup_logging(debug, logfile)
        from .mount import serve

        try:
            sys.exit(serve(cfg))
        except Exception as exc:  # mount failed: nothing is mounted
            _fail(f"cannot mount {cfg.mountpoint}: {_one_line(exc)}")
    _mount_background(cfg, debug, logfile)


def _image_args(ref: str, docker_root: str | None, args: tuple[str, ...], options):
    """``mount --image REF [UPPER] MERGED``: (lowerdir spec, upper, merged); exits 2 on error."""
    from runner.images import ImageError
    from runner.images.cli import find_image

    if len(args) not in (1, 2):
        _fail("usage: pyoverlay mount --image REF [UPPER] MERGED", 2)
    if any(o.startswith("lowerdir=") or ",lowerdir=" in o for o in options):
        _fail("--image and -o lowerdir= both give the lower layers", 2)
    try:
        img = find_image(ref, docker_root)
    except ImageError as exc:
        _fail(str(exc), 2)
    if not img.layers:
        _fail(f"image {ref} has no layers", 2)
    upper, merged = (None, args[0]) if len(args) == 1 else args
    return list(img.layers), upper, merged


def _mount_background(cfg, debug: bool, logfile: str | None) -> None:
    from .mount import MountFailed, start_background

    try:
        start_background(cfg, debug=debug, logfile=logfile)
    except MountFailed as exc:
        _fail(f"cannot mount {cfg.mountpoint}: {exc}")
    sys.exit(0)


#: the filesystem type of a pyoverlay mount in /proc/self/mountinfo (fuse, subtype pyoverlay)
PYOVERLAY_FSTYPE = "fuse.pyoverlay"


def _mountpoint_path(path: str) -> str:
    """The absolute, resolved *path* without stat'ing its last component (a mountpoint whose
    server hangs would hang us)."""
    a = os.path.abspath(path)
    head, tail = os.path.split(a)
    return os.path.join(os.path.realpath(head), tail) if tail else a


@main.command("umount")
@click.argument("merged")
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait for the server to exit.")
def umount_cmd(merged, timeout):
    """Unmount MERGED (a pyoverlay mount) and wait for its server to exit."""
    from . import state
    from .mountinfo import mounts

    mp = _mountpoint_path(merged)
    try:
        here = [m for m in mounts() if m.mountpoint == mp]
    except OSError as e:
        _fail(f"cannot read /proc/self/mountinfo: {e.strerror}")
    if not here:
        _fail(f"{merged} is not mounted")
    top = here[-1]  # the mount on top at that point is the one umount(2) would remove
    if top.fstype != PYOVERLAY_FSTYPE:
        _fail(f"{merged} is not a pyoverlay mount (it is {top.fstype} from {top.source or 'none'}); "
              "not unmounting it")
    info = state.lookup(mp)
    tool = shutil.which("fusermount3")
    cmd = [tool, "-u", mp] if tool else ["umount", mp]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        _fail(f"cannot unmount {merged}: {res.stderr.strip() or 'failed'}")
    if info is not None:
        deadline = time.monotonic() + timeout
        while procfs.alive(info["pid"]):
            if time.monotonic() > deadline:
                _fail(f"server {info['pid']} of {merged} did not exit within {timeout:g}s")
            time.sleep(0.02)


def _register_commands() -> None:
    """The commands that live in their own modules: the runner's, trace, diff, explain."""
    from runner.cli import register as register_runner
    from runner.images.cli import register as register_images
    from runner.images.store_cli import register as register_store

    from .inspect_cli import register as register_inspect
    from .trace_cli import register as register_trace

    register_runner(main)
    register_trace(main)
    register_inspect(main)
    register_images(main)
    register_store(main)


_register_commands()

if __name__ == "__main__":  # pragma: no cover
    main()
