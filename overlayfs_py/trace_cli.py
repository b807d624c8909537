"""``pyoverlay trace MERGED|ID``: follow the live trace of a mount or container.

Reads the server's trace socket (or, with ``--file``, a JSON-lines file written by
``--trace FILE``), filters, and prints a table, JSON lines, or a summary at the end
(when the mount goes away, at EOF of a file, or on Ctrl-C).
"""

from __future__ import annotations

import json
import os
import signal
import sys

import click

from . import state
from .trace import CONTROL, EVENTS
from .tracesummary import HEADER, Filter, Summary, row


def socket_of(target: str) -> str:
    """The live trace socket of a container (a bare name or id is tried as one first, as
    docker's commands take names) or of a mountpoint.

    A mountpoint is found by its record in the caller's state dir (a file named after the
    resolved path), not in the caller's mount table: a rootless podman's mount is in
    podman's mount namespace only, and on the host its merged dir is an empty directory,
    yet the same user's ``pyoverlay trace MERGED`` follows it there. The mountpoint itself
    is never stat'ed (a dead FUSE mount answers ENOTCONN); the record counts only while
    its server runs (pid and start time)."""
    from .inspect_cli import _no_touch_realpath, bare_name
    from .resolvers import current

    c = current().find_container(target) if bare_name(target) else None
    if c is not None:
        if not c.running or not c.merged:
            raise click.ClickException(f"container {c.name} is not running")
        info = state.lookup(c.merged)
        if info is None:
            raise click.ClickException(f"container {c.name} has no live mount")
    else:  # a path
        info = state.lookup(_no_touch_realpath(target))
        if info is None:
            raise click.ClickException(f"{target} is neither a pyoverlay mountpoint nor a container")
    if not state.server_alive(info):
        raise click.ClickException(
            f"the server of {info['mountpoint']} (pid {info['pid']}) has exited: it is not a live pyoverlay mount"
        )
    path = info.get("trace_socket") or state.trace_socket(info["mountpoint"])
    if not os.path.exists(path):
        raise click.ClickException(f"the server of {info['mountpoint']} offers no live trace")
    return path


def events_from_socket(path: str, history: bool):
    from .unixsock import connect_unix

    try:
        sock = connect_unix(path)
    except OSError as e:
        raise click.ClickException(f"cannot connect to the trace socket {path}: {e.strerror or e}") from None
    return _events(sock, history)


def _events(sock, history: bool):
    try:
        sock.sendall(json.dumps({"history": history}).encode() + b"\n")
        f = sock.makefile("rb")
        for line in f:
            yield json.loads(line)
    finally:
        sock.close()


def events_from_file(path: str):
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


@click.command("trace")
@click.argument("target", required=False)
@click.option("--file", "from_file", metavar="FILE", help="Read a trace file written by --trace instead.")
@click.option("--pid", "pids", type=int, multiple=True, help="Only this process (host or container pid).")
@click.option("--path", "path_glob", metavar="GLOB", help="Only paths matching GLOB (a directory: all below).")
@click.option("--event", "events", multiple=True, metavar="NAME", help="Only these events (copy_up_done, ...).")
@click.option("--json", "as_json", is_flag=True, help="JSON lines, as the server sends them.")
@click.option("--summary", is_flag=True, help="Print only a summary at the end (or on Ctrl-C).")
@click.option("--history", is_flag=True, help="Start with the server's last 1000 events.")
def trace_cmd(target, from_file, pids, path_glob, events, as_json, summary, history):
    """Follow what a mount (MERGED) or a container (ID) does to its upper layer."""
    if bool(target) == bool(from_file):
        raise click.UsageError("give MERGED or ID, or --file FILE")
    unknown = sorted(set(events) - set(EVENTS) - set(CONTROL))
    if unknown:
        raise click.UsageError(f"unknown event {unknown[0]!r} (one of: {', '.join(EVENTS)})")
    source = events_from_file(from_file) if from_file else events_from_socket(socket_of(target), history)
    keep = Filter(frozenset(pids), path_glob, frozenset(events))
    total = Summary()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if not as_json and not summary:
            click.echo(HEADER)
        for ev in source:
            if not keep(ev):
                continue
            total.add(ev)
            if summary:
                continue
            click.echo(json.dumps(ev) if as_json else row(ev))
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:
        return
    if summary:
        click.echo(json.dumps(total.as_dict(), indent=1) if as_json else total.text())


def register(main: click.Group) -> None:
    main.add_command(trace_cmd)
