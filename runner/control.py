"""Acting on containers from outside: ps, stop, kill, top, rm, and cleaning up dead ones.

Signals go through a pidfd opened after checking the recorded pid *and* its start
time, so a recycled pid is never signalled. A container is *dead* when its monitor
vanished without recording an exit (SIGKILL, a crash): ``stop`` and ``rm`` then do
the monitor's teardown themselves -- kill what is left of the container, unmount its
root, remove its cgroup.
"""

from __future__ import annotations

import contextlib
import os
import select
import shlex
import signal
import time

from overlayfs_py import procfs
from overlayfs_py.unmount import try_unmount

from . import _linux as L
from . import state
from .cgroups import Cgroup, CgroupError
from .errors import RunnerError
from .net import bridge as netbridge
from .net.ports import PortMapping


class ControlError(RunnerError):
    pass


def summary(rec: state.Record | dict) -> dict:
    """What ``ps`` shows of a record (``ps --json``'s keys)."""
    r = state.Record.of(rec)
    running = state.status(r) == "running"
    return {
        "id": r.id,
        "name": r.name,
        "command": r.command,
        "status": state.status(r),
        "exit_code": r.exit_code,
        "oom_killed": bool(r.oom_killed),
        "server_died": r.server_died,
        "pid": r.pid,
        "layers": r.layers,
        "upper": r.upper,
        "merged": r.merged,
        "created": r.created,
        "finished": r.finished,
        "hostname": r.hostname,
        "image": r.image,
        "network": r.spec.network if r.spec is not None else None,
        # the container's own address and the published ports (host port as bound), as
        # docker shows them: only while the container runs
        "address": (r.net or {}).get("address") if running else None,
        "ports": ports_of(r),
    }


def ports_of(r: state.Record) -> list[str]:
    """A running container's published ports as docker ps shows them
    (``127.0.0.1:8080->80/tcp``), from its record's network (runner/net)."""

    if not r.net or state.status(r) != "running":
        return []
    return [str(PortMapping.from_dict(p)) for p in r.net.get("ports") or []]


def _ago(seconds: float) -> str:
    for unit, n in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= n:
            k = int(seconds // n)
            return f"{k} {unit}{'s' if k > 1 else ''}"
    k = int(seconds)
    return "Less than a second" if k < 1 else f"{k} second{'s' if k > 1 else ''}"


def status_text(row: dict, now: float) -> str:
    st = row["status"]
    if st == "running":
        return f"Up {_ago(now - (row['created'] or now))}"
    if st == "exited":
        oom = " (OOM killed)" if row.get("oom_killed") else ""
        if row.get("server_died"):  # its root's FUSE server ended first: the monitor stopped it
            oom += " (filesystem server died)"
        return f"Exited ({row['exit_code']}) {_ago(now - (row['finished'] or now))} ago{oom}"
    return st.capitalize()


def ps_table(rows: list[dict], now: float) -> str:
    head = ("CONTAINER ID", "NAME", "COMMAND", "STATUS", "PID", "LAYERS", "UPPER", "ADDRESS", "PORTS")
    lines = [head]
    for r in rows:
        cmd = shlex.join(r["command"])
        cmd = cmd if len(cmd) <= 24 else cmd[:21] + "..."
        lines.append(
            (
                r["id"][:12],
                r["name"] or "",
                f'"{cmd}"',
                status_text(r, now),
                str(r["pid"] or "") if r["status"] == "running" else "-",
                str(len(r["layers"])),
                r["upper"] or "",
                r.get("address") or ("-" if r.get("ports") else ""),
                ", ".join(r.get("ports") or []),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def parse_signal(text: str) -> int:
    t = text.upper()
    if t.isdigit():
        return int(t)
    name = t if t.startswith("SIG") else "SIG" + t
    try:
        return int(getattr(signal, name))
    except AttributeError:
        raise ValueError(f"unknown signal {text!r}") from None


def _pidfd(rec: state.Record) -> int | None:
    """A pidfd on the container's PID 1, or None if it is gone."""
    pid = rec.pid
    if not L.alive(pid, rec.pid_start):
        return None
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    if not L.alive(pid, rec.pid_start):  # recycled between the check and the open
        os.close(fd)
        return None
    return fd


def pid1_fd(rec: state.Record | dict) -> int | None:
    """A pidfd on running container *rec*'s PID 1 (checked against its recorded start
    time), or None if it is gone: to signal it, or to ``setns`` into its namespaces."""
    return _pidfd(state.Record.of(rec))


def kill(rec: state.Record | dict, sig: int) -> None:
    rec = state.Record.of(rec)
    if state.status(rec) != "running":
        raise ControlError(f"container {rec.name} is not running")
    fd = _pidfd(rec)
    if fd is None:
        raise ControlError(f"container {rec.name} is not running")
    try:
        signal.pidfd_send_signal(fd, sig)
    finally:
        os.close(fd)


def _wait_fd(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def stop(rec: state.Record | dict, timeout: float) -> None:
    """SIGTERM, SIGKILL after *timeout*, then wait until the monitor has cleaned up."""
    rec = state.Record.of(rec)
    st = state.status(rec)
    if st == "dead":
        cleanup_dead(rec)
        return
    if st != "running":
        return
    fd = _pidfd(rec)
    if fd is not None:
        try:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGTERM)
            if not _wait_fd(fd, timeout):
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                _wait_fd(fd, 10)
        finally:
            os.close(fd)
    _wait_monitor(rec)


def _wait_monitor(rec: state.Record, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cur = state.load_record(rec.id)
        if cur is None or state.status(cur) != "running":
            if cur is not None and state.status(cur) == "dead":
                cleanup_dead(cur)
            return
        time.sleep(0.02)
    raise ControlError(f"container {rec.name} did not finish within {timeout:g}s")


def cleanup_dead(rec: state.Record | dict) -> None:
    """Do what the vanished monitor would have done."""
    rec = state.Record.of(rec)
    fd = _pidfd(rec)
    if fd is not None:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        _wait_fd(fd, 10)
        os.close(fd)
    merged = rec.merged
    # only the container's own mountpoint (a record's paths are checked by state.load too)
    if merged and merged == os.path.join(state.container_dir(rec.id), "merged") and state.mounts_under(merged):
        try_unmount(merged, lazy=True)
    server, start = rec.server_pid, rec.server_start
    deadline = time.monotonic() + 10
    while L.alive(server, start) and time.monotonic() < deadline:
        time.sleep(0.02)
    if L.alive(server, start):
        os.kill(server, signal.SIGKILL)
    if rec.cgroup:
        with contextlib.suppress(CgroupError, OSError):
            cg = Cgroup.from_dict(rec.cgroup)
            cg.kill_all()
            cg.remove()
    release_network(rec)
    rec.status, rec.finished, rec.dead = "exited", time.time(), True
    if rec.spec is not None and rec.spec.remove:
        state.remove(rec)
    else:
        state.save(rec)


def release_network(rec: state.Record) -> None:
    """The container's address, its veth and (if it was the last) the bridge and its
    NAT rules: what its monitor would have released (runner/net/bridge.py). The proxy of
    its ports died with the monitor (PR_SET_PDEATHSIG); it is killed here if not."""
    net = rec.net or {}
    proxy, start = net.get("proxy_pid"), net.get("proxy_start")
    if L.alive(proxy, start):
        with contextlib.suppress(ProcessLookupError):
            os.kill(proxy, signal.SIGKILL)
    with contextlib.suppress(RunnerError, OSError):
        netbridge.detach_record(rec.net, rec.id)


def remove(rec: state.Record | dict, force: bool) -> None:
    rec = state.Record.of(rec)
    st = state.status(rec)
    if st == "running":
        if not force:
            raise ControlError(f"container {rec.name} is running: stop it first or use rm -f")
        stop(rec, 0)
    elif st == "dead":
        cleanup_dead(rec)
    rec = state.load_record(rec.id) or rec
    if state.status(rec) != "running":
        release_network(rec)  # a lease left by a monitor that died (idempotent)
    try:
        state.remove(rec)
    except state.StateError as e:
        raise ControlError(str(e)) from None


def top_table(rec: state.Record | dict) -> str:
    rec = state.Record.of(rec)
    pidns = rec.pidns
    if state.status(rec) != "running" or not L.alive(rec.pid, rec.pid_start) or pidns is None:
        raise ControlError(f"container {rec.name} is not running")
    lines = [("PID", "CPID", "PPID", "UID", "CMD")]
    for pid in L.pids_in_pid_ns(pidns):
        ns = L.nspid(pid)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
            ppid = str(procfs.stat(pid).ppid)
            uid = str(os.stat(f"/proc/{pid}").st_uid)
        except OSError:
            continue  # exited meanwhile
        lines.append((str(pid), str(ns[-1]) if ns else "?", ppid, uid, cmd))
    widths = [max(len(line[i]) for line in lines) for i in range(4)]
    return "\n".join(
        "  ".join(c.rjust(w) for c, w in zip(line[:4], widths, strict=True)) + "  " + line[4] for line in lines
    )
