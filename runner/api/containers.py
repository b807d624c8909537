"""Running containers through the API: create, start, attach, wait, resize, logs, restart
(docs/api.md, "Containers: create, start, attach, logs, exec" and "Processes").

* ``create`` turns dockerd's container config into the runner's :class:`RunSpec` and
  saves a record in state "created" (``pyoverlay ps -a`` shows it); the config as given
  is kept under the record's ``api`` key (``Config``, ``HostConfig``: what inspect shows)
  with the spec to run (``runspec``).
* ``start`` starts the container's monitor (runner/monitor.py) as a child of the service,
  in its own session and with no parent-death signal: it outlives the service. The
  monitor's stdio for the container is its attach socket and its log (runner/attach.py);
  clients attached before ``start`` are connected before PID 1 is let go.
* ``attach`` relays between the hijacked connection and the monitor's attach socket
  (dockerd's multiplexed frames without a TTY, raw bytes with one); ``logs`` reads the
  monitor's log (json-file lines); ``wait`` watches the record (and, for the service's
  own children, the monitor's exit status, which is the container's).
* After a restart of the service, running containers are found from their records:
  their monitors still serve attach, write the log and record the exit.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time

from .. import attach, control, seccomp, state
from ..cgroups import CGROUPNS_MODES, Limits, default_cgroupns
from ..net.ports import PortMapping, parse_add_host, parse_dns, parse_publishes
from ..spec import (
    RunSpec,
    SpecError,
    Volume,
    check_name,
    check_workdir,
    default_network,
    new_id,
    parse_caps,
    parse_volume,
)
from . import events
from .server import ApiError, Request, Router, peer_closed

router = Router()


# --- the spec, kept in the record ---------------------------------------------------------------


def spec_to_dict(spec: RunSpec) -> dict:
    return {
        "layers": list(spec.layers),
        "argv": list(spec.argv),
        "name": spec.name,
        "remove": spec.remove,
        "interactive": spec.interactive,
        "tty": spec.tty,
        "init": spec.init,
        "env": list(spec.env),
        "workdir": spec.workdir,
        "user": spec.user,
        "hostname": spec.hostname,
        "network": spec.network,
        "publish": [p.to_dict() for p in spec.publish],
        "dns": list(spec.dns),
        "add_hosts": [list(h) for h in spec.add_hosts],
        "volumes": [[v.host, v.target, v.read_only] for v in spec.volumes],
        "read_only": spec.read_only,
        "limits": {"memory": spec.limits.memory, "pids": spec.limits.pids, "cpus": spec.limits.cpus},
        "privileged": spec.privileged,
        "cap_add": sorted(spec.cap_add),
        "cap_drop": sorted(spec.cap_drop),
        "stop_timeout": spec.stop_timeout,
        "image": spec.image,
        "userns_map": spec.userns_map,
        "seccomp": spec.seccomp,
        "no_new_privileges": spec.no_new_privileges,
        "cgroupns": spec.cgroupns,
    }


def spec_from_dict(d: dict) -> RunSpec:
    return RunSpec(
        layers=tuple(d["layers"]),
        argv=list(d["argv"]),
        name=d.get("name"),
        remove=bool(d.get("remove")),
        detach=True,
        interactive=bool(d.get("interactive")),
        tty=bool(d.get("tty")),
        init=bool(d.get("init")),
        env=list(d.get("env") or []),
        workdir=d.get("workdir") or "/",
        user=d.get("user"),
        hostname=d.get("hostname"),
        network=d.get("network") or "none",
        publish=tuple(PortMapping.from_dict(p) for p in d.get("publish") or []),
        dns=tuple(d.get("dns") or []),
        add_hosts=tuple((str(n), str(ip)) for n, ip in d.get("add_hosts") or []),
        volumes=[Volume(h, t, bool(ro)) for h, t, ro in d.get("volumes") or []],
        read_only=bool(d.get("read_only")),
        limits=Limits(**(d.get("limits") or {})),
        privileged=bool(d.get("privileged")),
        cap_add=frozenset(d.get("cap_add") or []),
        cap_drop=frozenset(d.get("cap_drop") or []),
        stop_timeout=float(d.get("stop_timeout") or 10.0),
        image=d.get("image"),
        userns_map=d.get("userns_map") or "auto",
        seccomp=d.get("seccomp") or "default",
        no_new_privileges=bool(d.get("no_new_privileges")),
        cgroupns=d.get("cgroupns") or None,
    )


# --- create ----------------------------------------------------------------------------------

#: HostConfig fields that change what a container is and that pyoverlay does not do: a
#: request that sets one is refused (501), never run without it
_UNSUPPORTED_HOST = {
    "Mounts": "--mount is not implemented: use -v HOST:CONTAINER[:ro]",
    "VolumesFrom": "--volumes-from is not implemented",
    "Links": "--link is not implemented",
    "Devices": "--device is not implemented",
    "DnsOptions": "--dns-option is not implemented",
    "DnsSearch": "--dns-search is not implemented",
    "Sysctls": "--sysctl is not implemented",
    "Ulimits": "--ulimit is not implemented",
    "IpcMode": "--ipc is not implemented",
    "PidMode": "--pid is not implemented",
    "UTSMode": "--uts is not implemented",
    "UsernsMode": "--userns is not implemented",
    "CgroupParent": "--cgroup-parent is not implemented",
    "Runtime": "--runtime is not implemented",
}
_IGNORED_VALUES: dict[str, tuple] = {
    "IpcMode": ("", "private", "shareable"),
    "PidMode": ("",),
    "UTSMode": ("",),
    "UsernsMode": ("", "host"),
    "Runtime": ("", "runc"),
}


def _unsupported(host: dict, config: dict) -> str | None:
    for key, why in _UNSUPPORTED_HOST.items():
        v = host.get(key)
        if not v or v in _IGNORED_VALUES.get(key, ()):
            continue
        return why
    policy = (host.get("RestartPolicy") or {}).get("Name") or ""
    if policy not in ("", "no"):
        return f"--restart {policy} is not implemented"
    if config.get("Volumes"):
        return "anonymous volumes (-v /PATH, VOLUME) are not implemented: use -v HOST:CONTAINER"
    return None


def _network(mode: str | None) -> str:
    mode = mode or "default"
    if mode == "default":  # docker's bridge, unless $PYOVERLAY_NETWORK says otherwise
        return default_network()
    if mode == "bridge":
        return "bridge"
    if mode in ("none", "host"):
        return mode
    if mode.startswith("container:"):
        raise ApiError(501, f"not implemented: network mode {mode!r} (bridge, host, none)")
    raise ApiError(404, f"network {mode} not found")


def _publish(cfg: dict, host: dict, run: dict) -> tuple[PortMapping, ...]:
    """HostConfig.PortBindings (``{"80/tcp": [{"HostIp": "", "HostPort": "8080"}]}``, as
    the CLI expands ``-p``), and with PublishAllPorts every exposed port on a free one."""
    texts: list[str] = []
    bindings = host.get("PortBindings") or {}
    if not isinstance(bindings, dict):
        raise ApiError(400, "invalid PortBindings: expected an object")
    for port, binds in bindings.items():
        ctr, _, proto = str(port).partition("/")
        for b in binds or [{}]:
            b = b if isinstance(b, dict) else {}
            ip, hp = str(b.get("HostIp") or ""), str(b.get("HostPort") or "")
            ip = f"[{ip}]" if ":" in ip else ip
            texts.append(f"{ip}:{hp}:{ctr}/{proto or 'tcp'}" if ip else f"{hp}:{ctr}/{proto or 'tcp'}")
    if host.get("PublishAllPorts"):
        exposed = {**(run.get("ExposedPorts") or {}), **(cfg.get("ExposedPorts") or {})}
        for port in exposed:
            if port not in bindings:
                ctr, _, proto = str(port).partition("/")
                texts.append(f"{ctr}/{proto or 'tcp'}")
    # ":80/tcp" (no host port) is docker's "a free port"
    return parse_publishes([t[1:] if t.startswith(":") else t for t in texts])


def _cgroupns(mode) -> str:
    """HostConfig.CgroupnsMode: "private", "host", or "" (the daemon's default, which
    dockerd writes back into the container's HostConfig: so does create)."""
    if mode in (None, ""):
        return default_cgroupns()
    if mode not in CGROUPNS_MODES:
        raise ApiError(400, f"invalid cgroup namespace mode: {mode}")
    return mode


def _strs(v) -> list[str]:
    if v is None:
        return []
    return [v] if isinstance(v, str) else [str(x) for x in v]


def _spec_from_config(cfg: dict, host: dict, name: str | None) -> RunSpec:
    from ..images import ImageError
    from ..images.cli import find_image

    ref = cfg.get("Image")
    if not isinstance(ref, str) or not ref:
        raise ApiError(400, "Config cannot be empty in order to create a container")
    try:
        img = find_image(ref)
    except ImageError:
        raise ApiError(404, f"No such image: {ref}") from None
    if not img.layers:
        raise ApiError(400, f"image {ref} has no layers")
    why = _unsupported(host, cfg)
    if why:
        raise ApiError(501, f"not implemented: {why}")
    run = img.run_config()
    if cfg.get("Entrypoint") is not None:  # --entrypoint: the image's Cmd goes too
        entry = [x for x in _strs(cfg.get("Entrypoint")) if x != ""] if _strs(cfg.get("Entrypoint")) != [""] else []
        cmd = _strs(cfg.get("Cmd"))
    else:
        entry = _strs(run.get("Entrypoint"))
        cmd = _strs(cfg.get("Cmd")) or _strs(run.get("Cmd"))
    argv = entry + cmd
    if not argv:
        raise ApiError(400, "No command specified")
    env = _strs(run.get("Env")) + _strs(cfg.get("Env"))
    for item in env:
        if not item.partition("=")[0] or "\0" in item:
            raise ApiError(400, f"invalid environment variable: {item}")
    memory = host.get("Memory") or None
    pids = host.get("PidsLimit")
    pids = pids if isinstance(pids, int) and pids > 0 else None
    nano = host.get("NanoCpus") or 0
    try:
        spec = RunSpec(
            layers=tuple(img.layers),
            argv=argv,
            name=check_name(name) if name else None,
            remove=bool(host.get("AutoRemove")),
            detach=True,
            interactive=bool(cfg.get("OpenStdin")),
            tty=bool(cfg.get("Tty")),
            init=bool(host.get("Init")),
            env=env,
            workdir=check_workdir(cfg.get("WorkingDir") or run.get("WorkingDir") or "/"),
            user=cfg.get("User") or run.get("User") or None,
            hostname=cfg.get("Hostname") or None,
            image={"ref": ref, "id": img.id, "source": img.source},
            network=_network(host.get("NetworkMode")),
            publish=_publish(cfg, host, run),
            dns=tuple(parse_dns(d) for d in _strs(host.get("Dns"))),
            add_hosts=tuple(parse_add_host(h) for h in _strs(host.get("ExtraHosts"))),
            volumes=[parse_volume(b) for b in host.get("Binds") or []],
            read_only=bool(host.get("ReadonlyRootfs")),
            limits=Limits(memory=memory, pids=pids, cpus=nano / 1e9 if nano else None),
            privileged=bool(host.get("Privileged")),
            cap_add=parse_caps(list(host.get("CapAdd") or [])),
            cap_drop=parse_caps(list(host.get("CapDrop") or [])),
            stop_timeout=float(cfg.get("StopTimeout") or 10),
            userns_map=_userns_map(),
            **_security(host.get("SecurityOpt")),
            cgroupns=_cgroupns(host.get("CgroupnsMode")),
        )
        # the profile compiled now too: a profile libseccomp refuses fails the create (400)
        seccomp.compile_filter(spec.seccomp_profile(), spec.caps())
        return spec
    except (SpecError, ValueError) as e:
        raise ApiError(400, str(e)) from None


def _security(opts) -> dict:
    """HostConfig.SecurityOpt: the docker CLI has read a seccomp=FILE and sends its JSON
    text (``seccomp={...}``); ``unconfined``; ``no-new-privileges`` (runner/seccomp)."""
    if opts is not None and not (isinstance(opts, list) and all(isinstance(o, str) for o in opts)):
        raise SpecError("HostConfig.SecurityOpt: expected a list of strings")
    sec = seccomp.parse_security_opts(opts or [], inline_only=True)
    return {"seccomp": sec.seccomp, "no_new_privileges": sec.no_new_privileges}


def _userns_map() -> str:
    from ..userns import default_mode

    return default_mode()


@router.route("POST", "/containers/create")
def create(req: Request) -> None:
    body = req.json_body()
    if not isinstance(body, dict):
        raise ApiError(400, "invalid JSON body: expected an object")
    host = body.get("HostConfig") or {}
    name = req.arg("name") or None
    if name:
        name = name.lstrip("/")
    spec = _spec_from_config(body, host, name)
    cid = new_id()
    config = {k: v for k, v in body.items() if k not in ("HostConfig", "NetworkingConfig")}
    host = {**host, "CgroupnsMode": spec.cgroupns}  # inspect shows the mode used, as dockerd
    rec = state.Record(
        id=cid,
        name=spec.name,
        command=list(spec.argv),
        layers=list(spec.layers),
        created=time.time(),
        status="created",
        image=spec.image,
        spec=state.ExecDefaults(env=list(spec.env), workdir=spec.workdir, user=spec.user, tty=spec.tty),
        extra={"api": {"Config": config, "HostConfig": host, "runspec": spec_to_dict(spec)}},
    )
    with state.locked():
        if spec.name is None:
            from ..plan import generate_name

            rec.name = generate_name()
            rec.extra["api"]["runspec"]["name"] = rec.name
        else:
            other = state.name_taken(spec.name)
            if other:
                raise ApiError(
                    409,
                    f'Conflict. The container name "/{spec.name}" is already in use by container "{other}". '
                    "You have to remove (or rename) that container to be able to reuse that name.",
                )
        state.save(rec)
    events.publish("container", "create", cid, {"image": spec.image["ref"] if spec.image else "", "name": rec.label})
    req.json({"Id": cid, "Warnings": []}, 201)


# --- the service's children and what waits for them -------------------------------------------


class _Waiter:
    """An attach that came before ``start``: connected by the start, before PID 1 runs."""

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.sock: socket.socket | None = None


class Children:
    """The monitors this service started (its children: reaped here) and the exit codes
    they reported; containers found running after a restart are watched through pidfds."""

    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.procs: dict[str, subprocess.Popen | None] = {}  # None: being started
        self.exits: dict[str, int] = {}
        self.waiters: dict[str, list[_Waiter]] = {}
        self.adopted = False

    def notify(self) -> None:
        with self.lock:
            self.lock.notify_all()

    def adopt(self) -> None:
        """Once per service: watch the containers that were running before it started."""
        with self.lock:
            if self.adopted:
                return
            self.adopted = True
        with contextlib.suppress(state.StateError, OSError):
            for d in state.all_records():
                rec = state.Record.from_dict(d)
                if state.status(rec) == "running" and "api" in rec.extra:
                    threading.Thread(target=self._watch_adopted, args=(rec,), daemon=True).start()

    def _watch_adopted(self, rec: state.Record) -> None:
        try:
            fd = os.pidfd_open(rec.monitor_pid or 0)
        except OSError:
            return
        try:
            from .. import _linux as L

            if not L.alive(rec.monitor_pid, rec.monitor_start):
                return
            select.select([fd], [], [])
        finally:
            os.close(fd)
        cur = state.load_record(rec.id)
        code = cur.exit_code if cur is not None and cur.exit_code is not None else 255
        self._died(rec.id, code)

    def _reap(self, cid: str, proc: subprocess.Popen) -> None:
        code = proc.wait()
        with self.lock:
            if self.procs.get(cid) is proc:
                del self.procs[cid]
        self._died(cid, code)

    def _died(self, cid: str, code: int) -> None:
        with self.lock:
            self.exits[cid] = code
            self.lock.notify_all()
        events.publish("container", "die", cid, {"exitCode": str(code)})

    def start(self, cid: str) -> None:
        rec = _find(cid)
        cid = rec.id
        with self.lock:
            deadline = time.monotonic() + 60
            while cid in self.procs:  # a monitor of ours: starting (None), running, or ending
                if self.procs[cid] is None or state.status(_find(cid)) == "running":
                    raise _NotModified()
                if time.monotonic() > deadline:
                    raise ApiError(409, f"container {rec.label} is still stopping")
                self.lock.wait(0.25)  # its exit is recorded: the reaper forgets it soon
            self.procs[cid] = None  # reserved while starting
        try:
            self._start(rec)
        except BaseException:
            with self.lock:
                if self.procs.get(cid) is None:
                    self.procs.pop(cid, None)
            raise

    def _start(self, rec: state.Record) -> None:
        cid = rec.id
        st = state.status(rec)
        if st == "running":
            raise _NotModified()
        if st == "dead":
            control.cleanup_dead(rec)
            rec = _find(cid)
        api = rec.extra.get("api")
        if not isinstance(api, dict) or not isinstance(api.get("runspec"), dict):
            raise ApiError(409, f"container {rec.label} was not created through the API: start it with pyoverlay run")
        cfg = api.get("Config") or {}
        notify_r, notify_w = os.pipe()
        go_r, go_w = os.pipe()
        env = dict(os.environ)
        if os.geteuid() != 0:  # the monitor becomes root of a user namespace: pin the dirs now
            from overlayfs_py.state import state_dir

            env["PYOVERLAY_STATE_DIR"] = state_dir()
            env["PYOVERLAY_DATA_DIR"] = state.data_root()
        args = [sys.executable, "-m", "runner.api.monitor_main", cid, str(notify_w), str(go_r)]
        if cfg.get("StdinOnce"):
            args.append("--stdin-once")
        try:
            proc = subprocess.Popen(
                args,
                pass_fds=(notify_w, go_r),
                start_new_session=True,  # not the service's session: it outlives the service
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=env,
                cwd="/",
            )
        finally:
            os.close(notify_w)
            os.close(go_r)
        with self.lock:
            self.procs[cid] = proc
            self.exits.pop(cid, None)
        threading.Thread(target=self._reap, args=(cid, proc), daemon=True, name=f"reap-{cid[:12]}").start()
        try:
            line = _read_line(notify_r, proc)
            if line == "ready":
                self._connect_waiters(cid)
                with contextlib.suppress(OSError):
                    os.write(go_w, b"g")
                line = _read_line(notify_r, proc)
        finally:
            os.close(notify_r)
            os.close(go_w)
        if line.startswith("ok "):
            events.publish("container", "start", cid, {"name": rec.label})
            return
        if line.startswith("err "):
            _, code, msg = (line.split(" ", 2) + ["", ""])[:3]
            self._fail_waiters(cid)
            raise ApiError(_start_status(int(code)), _start_message(int(code), msg))
        self._fail_waiters(cid)
        raise ApiError(500, "the container monitor exited before starting the container")

    def add_waiter(self, cid: str) -> _Waiter:
        w = _Waiter()
        with self.lock:
            self.waiters.setdefault(cid, []).append(w)
        return w

    def drop_waiter(self, cid: str, w: _Waiter) -> None:
        with self.lock:
            ws = self.waiters.get(cid, [])
            if w in ws:
                ws.remove(w)

    def _connect_waiters(self, cid: str) -> None:
        with self.lock:
            ws = self.waiters.pop(cid, [])
        for w in ws:
            with contextlib.suppress(OSError):
                w.sock = attach.connect(state.container_dir(cid), timeout=10)
            w.ready.set()

    def _fail_waiters(self, cid: str) -> None:
        with self.lock:
            ws = self.waiters.pop(cid, [])
        for w in ws:
            w.ready.set()

    def wait(self, cid: str, condition: str, stop: threading.Event | None = None) -> int:
        """The exit code once *condition* (not-running, next-exit, removed) holds."""
        first = state.load_record(cid)
        seen_finished = first.finished if first is not None else None
        last_code: int | None = first.exit_code if first is not None else None
        while True:
            rec = state.load_record(cid)
            if rec is not None and rec.exit_code is not None:
                last_code = rec.exit_code
            with self.lock:
                proc = self.procs.get(cid)
                exit_now = self.exits.get(cid)
            if rec is None:
                if proc is not None:  # our child removed it (--rm): its status is the exit code
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        return proc.wait(60)
                if exit_now is not None:
                    return exit_now
                return last_code if last_code is not None else 0
            st = state.status(rec)
            # a record saved by a monitor that is still starting counts as running
            busy = st == "running" or (st == "created" and rec.monitor_pid is not None)
            if condition == "not-running" and not busy:
                return _code_of(rec)
            if condition == "next-exit" and st in ("exited", "dead") and rec.finished != seen_finished:
                return _code_of(rec)
            if stop is not None and stop.is_set():
                raise ApiError(500, "the client went away")
            with self.lock:
                self.lock.wait(0.25)


class _NotModified(Exception):
    pass


def _code_of(rec: state.Record) -> int:
    if rec.exit_code is not None:
        return rec.exit_code
    return 255 if rec.dead else 0


def _start_status(code: int) -> int:
    return 400 if code in (126, 127) else 500


def _start_message(code: int, msg: str) -> str:
    """dockerd's wording for a failed start (the docker CLI maps "executable file not
    found" and "no such file or directory" to 127, "permission denied" to 126)."""
    if code in (126, 127):
        return f"OCI runtime create failed: pyoverlay: unable to start container process: {msg}: unknown"
    return f"pyoverlay: cannot start the container: {msg}"


def _read_line(fd: int, proc: subprocess.Popen, timeout: float = 300) -> str:
    """One line from the monitor's notify pipe (EOF or the monitor's exit: "")."""
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        if time.monotonic() > deadline:
            return ""
        r, _, _ = select.select([fd], [], [], 0.5)
        if not r:
            # the monitor may have written before exiting: one more look
            if proc.poll() is not None and not select.select([fd], [], [], 0)[0]:
                return ""
            continue
        b = os.read(fd, 1)  # byte by byte: what follows the line is the next line's
        if not b:
            return ""
        buf += b
    return buf.decode(errors="replace").strip()


children = Children()


def _find(ref: str) -> state.Record:
    children.adopt()
    try:
        return state.find(ref)
    except state.StateError as e:
        if "ambiguous" in str(e):
            raise ApiError(400, str(e)) from None
        raise ApiError(404, f"No such container: {ref}") from None


# --- endpoints ---------------------------------------------------------------------------------


@router.route("POST", "/containers/{id}/start")
def start(req: Request) -> None:
    req.body()  # an old client's HostConfig: ignored (API >= 1.24 sets it at create)
    try:
        children.start(req.params["id"])
    except _NotModified:
        req.empty(304)
        return
    req.empty(204)


@router.route("POST", "/containers/{id}/restart")
def restart(req: Request) -> None:
    rec = _find(req.params["id"])
    t = req.arg("t")
    timeout = float(t) if t not in (None, "") else (rec.spec.stop_timeout if rec.spec else 10.0)
    if state.status(rec) in ("running", "dead"):
        try:
            control.stop(rec, max(timeout, 0.0))
        except control.ControlError as e:
            raise ApiError(500, str(e)) from None
    try:
        children.start(rec.id)
    except _NotModified:
        pass
    events.publish("container", "restart", rec.id, {"name": rec.label})
    req.empty(204)


@router.route("POST", "/containers/{id}/wait")
def wait(req: Request) -> None:
    rec = _find(req.params["id"])
    condition = req.arg("condition") or "not-running"
    if condition not in ("not-running", "next-exit", "removed"):
        raise ApiError(400, f"invalid condition: {condition!r}")
    # dockerd answers the headers at once (the CLI waits for them before starting)
    req.stream_start("application/json")
    stop = threading.Event()
    threading.Thread(target=_watch_client, args=(req, stop), daemon=True).start()
    try:
        code = children.wait(rec.id, condition, stop)
    finally:
        stop.set()
    req.stream_write(json.dumps({"StatusCode": code, "Error": None}).encode() + b"\n")


def _watch_client(req: Request, stop: threading.Event) -> None:
    """Set *stop* when the client closes its connection (a wait, a followed log)."""
    conn: socket.socket = req._h.connection
    while not stop.is_set():
        try:
            r, _, _ = select.select([conn], [], [], 0.5)
        except (OSError, ValueError):
            r = [conn]
        if r and peer_closed(conn):
            stop.set()
            return
        if r:
            time.sleep(0.5)  # data the client sent: not ours to read


@router.route("POST", "/containers/{id}/resize")
def resize(req: Request) -> None:
    rec = _find(req.params["id"])
    h, w = _dims(req)
    if state.status(rec) != "running":
        raise ApiError(409, f"Container {rec.id} is not running")
    if rec.spec is None or not rec.spec.tty:
        req.empty(200)
        return
    try:
        s = attach.connect(state.container_dir(rec.id), timeout=10)
    except OSError as e:
        raise ApiError(500, f"cannot reach the container's monitor: {e}") from None
    with s:
        s.sendall(attach.frame(attach.RESIZE, _winsize(h, w)))
        _done_with(s)
    events.publish("container", "resize", rec.id, {"height": str(h), "width": str(w), "name": rec.label})
    req.empty(200)


def _done_with(s: socket.socket) -> None:
    """End our side and wait until the monitor has read everything (it closes on our
    end): the request is answered once the resize is done."""
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_WR)
        s.settimeout(10)
        while s.recv(65536):
            pass  # the container's output, copied to every client: not ours


def _dims(req: Request) -> tuple[int, int]:
    try:
        h, w = int(req.arg("h") or 0), int(req.arg("w") or 0)
    except ValueError:
        raise ApiError(400, "invalid resize: h and w must be numbers") from None
    if not (0 <= h < 65536 and 0 <= w < 65536):
        raise ApiError(400, "invalid resize: out of range")
    return h, w


def _winsize(h: int, w: int) -> bytes:
    import struct

    return struct.pack(">HH", h, w)


@router.route("POST", "/containers/{id}/attach")
def attach_(req: Request) -> None:
    rec = _find(req.params["id"])
    want_stdin = req.flag("stdin")
    streams = {1: req.flag("stdout"), 2: req.flag("stderr")}
    tty = bool(rec.spec and rec.spec.tty)
    st = state.status(rec)
    if not req.flag("stream") and not req.flag("logs"):
        raise ApiError(400, "Bad parameters: you must choose at least one stream")
    waiter = None
    if st == "created" and rec.monitor_pid is None or st == "exited":
        if req.flag("stream"):
            waiter = children.add_waiter(rec.id)  # connected by the next start
    elif st != "running" and st != "created":
        raise ApiError(409, "You cannot attach to a stopped container, start it first")
    conn = req.hijack()
    headers_read(conn)
    events.publish("container", "attach", rec.id, {"name": rec.label})
    if req.flag("logs"):
        for entry in _log_entries(rec.id):
            kind = 1 if entry.get("stream") == "stdout" else 2
            if streams[kind]:
                data = entry.get("log", "").encode("utf-8", "surrogateescape")
                conn.sendall(data if tty else attach.frame(kind, data))
    if not req.flag("stream"):
        return
    if waiter is not None:
        while not waiter.ready.wait(0.5):
            if peer_closed(conn):
                children.drop_waiter(rec.id, waiter)
                return
        sock = waiter.sock
    else:
        try:
            sock = attach.connect(state.container_dir(rec.id), timeout=10)
        except OSError:
            sock = None
    if sock is None:
        return
    _relay(req, conn, sock, want_stdin, streams, tty)


def headers_read(conn: socket.socket, timeout: float = 2.0) -> None:
    """After the upgrade answer, wait (a little) until the client has read it: a client
    that reads the answer's head through a buffer and then takes the raw socket (docker-py)
    loses stream bytes that arrived with the head. On a unix socket the send queue
    (TIOCOUTQ) is empty once the peer has read everything."""
    import fcntl
    import struct
    import termios

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            left = struct.unpack("i", fcntl.ioctl(conn.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
        except OSError:
            return
        if left == 0:
            return
        time.sleep(0.002)


def _relay(req: Request, conn: socket.socket, mon: socket.socket, want_stdin: bool, streams, tty: bool) -> None:
    """Client <-> the monitor's attach socket, until the monitor ends the stream."""
    rfile = req._h.rfile  # what the client sent after its request may be buffered there

    def stdin_pump() -> None:
        try:
            while True:
                data = rfile.read1(65536)
                if not data:
                    break
                mon.sendall(attach.frame(attach.STDIN, data))
            mon.sendall(attach.frame(attach.CLOSE_STDIN, b""))
        except (OSError, ValueError):
            pass

    if want_stdin:
        threading.Thread(target=stdin_pump, daemon=True).start()
    reader = attach.FrameReader()
    try:
        while True:
            data = mon.recv(65536)
            if not data:
                break
            for kind, payload in reader.feed(data):
                if kind in streams and streams[kind]:
                    conn.sendall(payload if tty else attach.frame(kind, payload))
    except OSError:
        pass
    finally:
        mon.close()
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)


# --- logs --------------------------------------------------------------------------------------


def _open_log(cid: str):
    """The container's log (json-file lines), opened beneath its data dir without following
    a symlink; None if there is none."""
    try:
        dfd = os.open(state.container_dir(cid), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fd = os.open(attach.LOG_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    except OSError:
        return None
    finally:
        os.close(dfd)
    return open(fd, "rb")


def _log_entries(cid: str) -> list[dict]:
    f = _open_log(cid)
    if f is None:
        return []
    with f:
        return [e for e in (_parse(line) for line in f) if e is not None]


def _parse(line: bytes) -> dict | None:
    try:
        e = json.loads(line)
    except ValueError:
        return None
    return e if isinstance(e, dict) else None


def _ts(text: str) -> float:
    try:
        return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.UTC).timestamp()
    except (ValueError, TypeError):
        return 0.0


def _since(v: str | None) -> float | None:
    if v in (None, "", "0"):
        return None
    try:
        return float(v)
    except ValueError:
        raise ApiError(400, f"invalid time value {v!r}") from None


@router.route("GET", "/containers/{id}/logs")
def logs(req: Request) -> None:
    rec = _find(req.params["id"])
    streams = {"stdout": req.flag("stdout"), "stderr": req.flag("stderr")}
    if not any(streams.values()):
        raise ApiError(400, "Bad parameters: you must choose at least one stream")
    follow, stamps = req.flag("follow"), req.flag("timestamps")
    since, until = _since(req.arg("since")), _since(req.arg("until"))
    tail_arg = req.arg("tail") or "all"
    try:
        tail = None if tail_arg == "all" else int(tail_arg)
    except ValueError:
        raise ApiError(400, f"invalid tail value {tail_arg!r}") from None
    tty = bool(rec.spec and rec.spec.tty)
    req.stream_start("application/vnd.docker.raw-stream")

    def emit(entries: list[dict]) -> None:
        out = bytearray()
        for e in entries:
            stream = e.get("stream")
            if not streams.get(stream or ""):
                continue
            t = _ts(e.get("time", ""))
            if since is not None and t < since or until is not None and t > until:
                continue
            data = str(e.get("log", "")).encode("utf-8", "surrogateescape")
            if stamps:
                data = (str(e.get("time", "")) + " ").encode() + data
            out += data if tty else attach.frame(1 if stream == "stdout" else 2, data)
        if out:
            req.stream_write(bytes(out))

    f = _open_log(rec.id)
    if f is None and not follow:
        return
    pending = b""
    if f is not None:
        first = [e for e in (_parse(line) for line in f.read().splitlines()) if e is not None]
        if tail is not None:
            first = first[-tail:] if tail > 0 else []
        emit(first)
    if not follow:
        if f is not None:
            f.close()
        return
    stop = threading.Event()
    threading.Thread(target=_watch_client, args=(req, stop), daemon=True).start()
    try:
        while not stop.is_set():
            if f is None:
                f = _open_log(rec.id)
            chunk = f.read() if f is not None else b""
            if chunk:
                pending += chunk
                *lines, pending = pending.split(b"\n")
                emit([e for e in (_parse(line) for line in lines) if e is not None])
                continue
            cur = state.load_record(rec.id)
            if (
                cur is None
                or state.status(cur) not in ("running",)
                and not (state.status(cur) == "created" and cur.monitor_pid is not None)
            ):
                if f is not None:  # the monitor's last lines
                    rest = pending + f.read()
                    emit([e for e in (_parse(line) for line in rest.split(b"\n")) if e is not None])
                return
            time.sleep(0.2)
    finally:
        stop.set()
        if f is not None:
            f.close()
