"""The ``pyoverlay`` command line. Options become a ``MountConfig``; nothing else lives here."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time

import click

from .config import ConfigError, build_config


def _setup_logging(debug: bool, logfile: str | None = None) -> None:
    handler: logging.Handler
    handler = logging.FileHandler(logfile) if logfile else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(name)s %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)


def _fail(msg: str, code: int = 1) -> None:
    click.echo(f"pyoverlay: {msg}", err=True)
    sys.exit(code)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """pyoverlay: OverlayFS in userspace."""


@main.command("mount")
@click.argument("args", nargs=-1, required=True)
@click.option("--workdir", "workdir", metavar="DIR", help="Work directory (same filesystem as UPPER).")
@click.option("-o", "options", multiple=True, metavar="OPTS",
              help="Kernel-style options: lowerdir=,upperdir=,workdir=,ro,userxattr,allow_other,...")
@click.option("-f", "--foreground", is_flag=True, help="Stay attached; Ctrl-C/SIGTERM unmounts.")
@click.option("-d", "--debug", is_flag=True, help="Log every request.")
@click.option("--log", "logfile", metavar="FILE", help="Server log file (background mode).")
def mount_cmd(args, workdir, options, foreground, debug, logfile):
    """Mount LOWER1[:LOWER2...] [UPPER] MERGED (LOWER1 is the top lower layer).

    Without UPPER the mount is read-only. `-o lowerdir=...,upperdir=...,workdir=... MERGED`
    is accepted as with the kernel's overlayfs.
    """
    if len(args) == 1:
        layers, upper, merged = None, None, args[0]
    elif len(args) == 2:
        layers, upper, merged = args[0], None, args[1]
    elif len(args) == 3:
        layers, upper, merged = args
    else:
        _fail("usage: pyoverlay mount LOWER1[:LOWER2...] [UPPER] MERGED", 2)
    try:
        cfg = build_config(layers, upper, merged, workdir=workdir, options=options, debug=debug)
    except ConfigError as exc:
        _fail(str(exc), 2)
    if foreground:
        _setup_logging(debug, logfile)
        from .mount import serve

        try:
            sys.exit(serve(cfg))
        except Exception as exc:  # mount failed: nothing is mounted
            _fail(f"cannot mount {cfg.mountpoint}: {_one_line(exc)}")
    _mount_background(cfg, debug, logfile)


def _mount_background(cfg, debug: bool, logfile: str | None) -> None:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the server
        os.close(r)
        try:
            os.setsid()
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, 0)
            os.dup2(devnull, 1)
            if not logfile:
                os.dup2(devnull, 2)
            os.close(devnull)
            os.chdir("/")
            _setup_logging(debug, logfile)
            from .mount import serve

            rc = serve(cfg, ready_fd=w)
        except BaseException as exc:  # report to the waiting parent, then die
            try:
                os.write(w, f"error: {_one_line(exc)}\n".encode())
            except OSError:
                pass
            logging.getLogger(__name__).exception("server failed")
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
        sys.exit(0)
    os.waitpid(pid, 0)
    _fail(f"cannot mount {cfg.mountpoint}: {msg.removeprefix('error: ') or 'server exited'}")


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@main.command("umount")
@click.argument("merged")
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait for the server to exit.")
def umount_cmd(merged, timeout):
    """Unmount MERGED and wait for its server to exit."""
    from . import state

    mp = os.path.realpath(merged)
    if not os.path.ismount(mp):
        _fail(f"{merged} is not mounted")
    info = state.lookup(mp)
    tool = shutil.which("fusermount3")
    cmd = [tool, "-u", mp] if tool else ["umount", mp]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        _fail(f"cannot unmount {merged}: {res.stderr.strip() or 'failed'}")
    if info is not None:
        deadline = time.monotonic() + timeout
        while _pid_alive(info["pid"]):
            if time.monotonic() > deadline:
                _fail(f"server {info['pid']} of {merged} did not exit within {timeout:g}s")
            time.sleep(0.02)


if __name__ == "__main__":  # pragma: no cover
    main()
