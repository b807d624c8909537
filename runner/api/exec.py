"""``docker exec`` through the API: ``POST /containers/{id}/exec``, ``POST /exec/{id}/start``
(hijacked, or ``Detach``), ``POST /exec/{id}/resize``, ``GET /exec/{id}/json``.

An exec instance lives in the service's memory (as in dockerd). Its process is started
by the runner's own exec path (runner/nsexec.py, ``pyoverlay exec``) run as a child of the
service: service -> ``pyoverlay exec`` (joins the container's namespaces and cgroup,
relays) -> the process inside. Without a TTY its stdout and stderr are pipes the service
reads and multiplexes (dockerd's frames); with a TTY the service gives it a pty of its own
(its controlling terminal, so a resize reaches it as SIGWINCH and it resizes the
container-side pty).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .. import attach, state
from ..tty import write_all
from . import events
from .containers import _dims, _find, headers_read
from .server import ApiError, Request, Router

router = Router()


@dataclass
class ExecInstance:
    id: str
    cid: str
    argv: list[str]
    env: list[str]
    user: str
    workdir: str
    tty: bool
    stdin: bool
    stdout: bool
    stderr: bool
    privileged: bool
    running: bool = False
    started: bool = False
    exit_code: int | None = None
    pid: int = 0
    master: int | None = None  # the service's side of a TTY exec's pty
    proc: subprocess.Popen | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def json(self) -> dict[str, Any]:
        return {
            "ID": self.id,
            "ContainerID": self.cid,
            "Running": self.running,
            "ExitCode": self.exit_code,
            "Pid": self.pid,
            "OpenStdin": self.stdin,
            "OpenStdout": self.stdout,
            "OpenStderr": self.stderr,
            "CanRemove": False,
            "DetachKeys": "",
            "ProcessConfig": {
                "tty": self.tty,
                "entrypoint": self.argv[0] if self.argv else "",
                "arguments": self.argv[1:],
                "privileged": self.privileged,
                "user": self.user,
            },
        }


_execs: dict[str, ExecInstance] = {}
_lock = threading.Lock()


def _get(eid: str) -> ExecInstance:
    with _lock:
        inst = _execs.get(eid)
    if inst is None:
        raise ApiError(404, f"No such exec instance: {eid}")
    return inst


def _strs(v) -> list[str]:
    if v is None:
        return []
    return [v] if isinstance(v, str) else [str(x) for x in v]


@router.route("POST", "/containers/{id}/exec")
def exec_create(req: Request) -> None:
    rec = _find(req.params["id"])
    body = req.json_body()
    if not isinstance(body, dict):
        raise ApiError(400, "invalid JSON body: expected an object")
    argv = _strs(body.get("Cmd"))
    if not argv:
        raise ApiError(400, "No exec command specified")
    if state.status(rec) != "running":
        raise ApiError(409, f"Container {rec.id} is not running")
    if body.get("Privileged"):
        raise ApiError(501, "not implemented: exec --privileged")
    env = [e for e in _strs(body.get("Env")) if "=" in e and e.partition("=")[0] and "\0" not in e]
    workdir = body.get("WorkingDir") or ""
    if workdir and not workdir.startswith("/"):
        raise ApiError(400, f"the working directory {workdir!r} is invalid: it must be absolute")
    inst = ExecInstance(
        id=secrets.token_hex(32),
        cid=rec.id,
        argv=argv,
        env=env,
        user=str(body.get("User") or ""),
        workdir=workdir,
        tty=bool(body.get("Tty")),
        stdin=bool(body.get("AttachStdin")),
        stdout=bool(body.get("AttachStdout")),
        stderr=bool(body.get("AttachStderr")),
        privileged=False,
    )
    with _lock:
        _execs[inst.id] = inst
    events.publish("container", "exec_create: " + " ".join(argv), rec.id, {"execID": inst.id, "name": rec.label})
    req.json({"Id": inst.id}, 201)


@router.route("GET", "/exec/{id}/json")
def exec_inspect(req: Request) -> None:
    req.json(_get(req.params["id"]).json())


@router.route("POST", "/exec/{id}/resize")
def exec_resize(req: Request) -> None:
    inst = _get(req.params["id"])
    h, w = _dims(req)
    if inst.master is None or not inst.running:
        raise ApiError(409, f"exec {inst.id} is not running with a TTY")
    with contextlib.suppress(OSError):
        fcntl.ioctl(inst.master, termios.TIOCSWINSZ, struct.pack("HHHH", h, w, 0, 0))
    req.empty(201)


def _command(inst: ExecInstance) -> list[str]:
    args = [sys.executable, "-m", "pyoverlay_cli", "exec"]
    if inst.stdin:
        args.append("-i")
    if inst.tty:
        args.append("-t")
    for e in inst.env:
        args += ["-e", e]
    if inst.user:
        args += ["-u", inst.user]
    if inst.workdir:
        args += ["-w", inst.workdir]
    return [*args, inst.cid, "--", *inst.argv]


def _set_ctty() -> None:  # in the child, after setsid: the pty (its stdin) becomes its terminal
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


@router.route("POST", "/exec/{id}/start")
def exec_start(req: Request) -> None:
    inst = _get(req.params["id"])
    body = req.json_body() or {}
    detach = bool(body.get("Detach")) if isinstance(body, dict) else False
    with inst.lock:
        if inst.started:
            raise ApiError(409, f"exec {inst.id} has already been started")
        inst.started = True
    rec = _find(inst.cid)
    if state.status(rec) != "running":
        raise ApiError(409, f"Container {rec.id} is not running")
    env = dict(os.environ)
    if os.geteuid() != 0:
        from overlayfs_py.state import state_dir

        env["PYOVERLAY_STATE_DIR"] = state_dir()
        env["PYOVERLAY_DATA_DIR"] = state.data_root()
    slave = None
    if detach:
        inst.stdin = inst.stdout = inst.stderr = False
        proc = subprocess.Popen(
            _command(inst), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
        )
    elif inst.tty:
        master, slave = os.openpty()
        inst.master = master
        proc = subprocess.Popen(
            _command(inst),
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            preexec_fn=_set_ctty,  # noqa: PLW1509 - one ioctl
            env=env,
        )
        os.close(slave)
    else:
        proc = subprocess.Popen(
            _command(inst),
            stdin=subprocess.PIPE if inst.stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
    inst.proc, inst.running = proc, True
    inst.pid = _inner_pid(proc.pid)
    events.publish("container", "exec_start: " + " ".join(inst.argv), inst.cid, {"execID": inst.id})
    if detach:
        threading.Thread(target=_finish, args=(inst,), daemon=True).start()
        req.empty(200)
        return
    conn = req.hijack()
    headers_read(conn)
    try:
        if inst.tty:
            _relay_tty(req, conn, inst)
        else:
            _relay_pipes(req, conn, inst)
    finally:
        _finish(inst)
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)


def _inner_pid(helper: int) -> int:
    """The exec'd process (the helper's child) once it exists; else the helper."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{helper}/task/{helper}/children") as f:
                kids = f.read().split()
        except OSError:
            return helper
        if kids:
            return int(kids[0])
        time.sleep(0.02)
    return helper


def _finish(inst: ExecInstance) -> None:
    assert inst.proc is not None
    code = inst.proc.wait()
    if inst.master is not None:
        with contextlib.suppress(OSError):
            os.close(inst.master)
    with inst.lock:
        if inst.running:
            inst.exit_code, inst.running = code, False
            events.publish("container", "exec_die", inst.cid, {"execID": inst.id, "exitCode": str(code)})


def _stdin_pump(req: Request, write, close) -> threading.Thread:
    rfile = req._h.rfile

    def run() -> None:
        try:
            while True:
                data = rfile.read1(65536)
                if not data:
                    break
                write(data)
        except (OSError, ValueError):
            pass
        finally:
            with contextlib.suppress(OSError):
                close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _relay_pipes(req: Request, conn: socket.socket, inst: ExecInstance) -> None:
    proc = inst.proc
    assert proc is not None and proc.stdout is not None and proc.stderr is not None
    send_lock = threading.Lock()

    def pump(f, kind: int, wanted: bool) -> None:
        try:
            while True:
                data = f.read1(65536)
                if not data:
                    return
                if wanted:
                    with send_lock:
                        conn.sendall(attach.frame(kind, data))
        except OSError:
            pass

    if inst.stdin and proc.stdin is not None:
        pin = proc.stdin

        def write(data: bytes) -> None:
            pin.write(data)
            pin.flush()

        _stdin_pump(req, write, pin.close)
    threads = [
        threading.Thread(target=pump, args=(proc.stdout, 1, inst.stdout), daemon=True),
        threading.Thread(target=pump, args=(proc.stderr, 2, inst.stderr), daemon=True),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    proc.wait()


def _relay_tty(req: Request, conn: socket.socket, inst: ExecInstance) -> None:
    master = inst.master
    assert master is not None and inst.proc is not None
    if inst.stdin:
        _stdin_pump(req, lambda d: write_all(master, d), lambda: None)
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the helper and the process are gone
            break
        if not data:
            break
        try:
            conn.sendall(data)
        except OSError:
            break
    inst.proc.wait()
