"""Acting on containers through the API (docs/api.md, "Containers: ps, inspect, stop, rm,
diff, commit, export, cp"): ``docker ps``, ``inspect``, ``top``, ``stop``, ``kill``, ``rm``,
``container prune``, ``diff``, ``commit``, ``export``, and pyoverlay's own
``/pyoverlay/containers/{id}/trace`` and ``.../explain``.

The records are the CLI's (:mod:`runner.state`): a container made by ``pyoverlay run`` is
listed, inspected and stopped here like one made through the API, and the work is the
CLI's (:mod:`runner.control`, :mod:`overlayfs_py.diff`, :mod:`runner.images.commit`).
``docker cp`` (the archive endpoints) is in :mod:`.archive`, ``GET /events`` in
:mod:`.events_http`; their routers are included in this one (``router``).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import select
import shlex
import signal
import subprocess
import threading
import time
from typing import Any

from .. import _linux as L
from .. import control, state
from . import archive, events, events_http
from . import changes as changes_
from .records import (
    api_of,
    api_state,
    attrs,
    find,
    image_of,
    labels_of,
    lowers_of,
    parse_filters,
    parse_time,
    spec_of,
)
from .server import ApiError, Request, Router, peer_closed

router = Router()
router.include(archive.router)  # docker cp, docker export
router.include(events_http.router)  # GET /events

#: dockerd's zero time (a container never started or never finished)
ZERO_TIME = "0001-01-01T00:00:00Z"


# --- what dockerd shows of a container --------------------------------------------------------


def rfc3339(t: float | None) -> str:
    if not t:
        return ZERO_TIME
    dt = datetime.datetime.fromtimestamp(t, datetime.UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond:06d}000Z"


def human_duration(seconds: float) -> str:
    """docker's units.HumanDuration ("Less than a second", "3 seconds", "About a minute"...)."""
    s = int(seconds)
    if s < 1:
        return "Less than a second"
    if s == 1:
        return "1 second"
    if s < 60:
        return f"{s} seconds"
    m = int(seconds / 60)
    if m == 1:
        return "About a minute"
    if m < 60:
        return f"{m} minutes"
    h = int(seconds / 3600 + 0.5)
    if h == 1:
        return "About an hour"
    if h < 48:
        return f"{h} hours"
    if h < 24 * 7 * 2:
        return f"{h // 24} days"
    if h < 24 * 30 * 2:
        return f"{h // 24 // 7} weeks"
    if h < 24 * 365 * 2:
        return f"{h // 24 // 30} months"
    return f"{int(seconds / 3600) // 24 // 365} years"


def started_at(rec: dict) -> float | None:
    v = rec.get("started")
    if isinstance(v, (int, float)):
        return v
    return rec.get("created") if rec.get("status") in ("running", "exited") else None


def status_text(rec: dict, now: float | None = None) -> str:
    """dockerd's Status column: "Up 3 seconds", "Exited (0) 2 minutes ago", "Created"."""
    now = time.time() if now is None else now
    st = api_state(rec)
    if st == "running":
        return f"Up {human_duration(now - (started_at(rec) or now))}"
    if st == "exited":
        return f"Exited ({rec.get('exit_code') or 0}) {human_duration(now - (rec.get('finished') or now))} ago"
    if st == "dead":
        return "Dead"
    return "Created"


def config_of(rec: dict) -> dict:
    """The container's Config: the API's own (``rec["api"]["Config"]``), else built."""
    given = api_of(rec).get("Config")
    if isinstance(given, dict):
        return given
    spec = spec_of(rec)
    ref, _ = image_of(rec)
    return {
        "Hostname": rec.get("hostname") or rec["id"][:12],
        "Domainname": "",
        "User": spec.get("user") or "",
        "AttachStdin": False,
        "AttachStdout": False,
        "AttachStderr": False,
        "Tty": bool(spec.get("tty")),
        "OpenStdin": False,
        "StdinOnce": False,
        "Env": list(spec.get("env") or []),
        "Cmd": list(rec.get("command") or []),
        "Image": ref,
        "Volumes": None,
        "WorkingDir": spec.get("workdir") or "",
        "Entrypoint": None,
        "OnBuild": None,
        "Labels": {},
    }


def host_config_of(rec: dict) -> dict:
    given = api_of(rec).get("HostConfig")
    if isinstance(given, dict):  # as the client sent it, with what dockerd fills in
        host = dict(given)
        if not (host.get("LogConfig") or {}).get("Type"):
            host["LogConfig"] = {"Type": "json-file", "Config": {}}
        if not (host.get("RestartPolicy") or {}).get("Name"):
            host["RestartPolicy"] = {"Name": "no", "MaximumRetryCount": 0}
        return host
    spec = spec_of(rec)
    limits = spec.get("limits") or {}
    cpus = limits.get("cpus")
    return {
        "Binds": list(spec.get("volumes") or []) or None,
        "NetworkMode": {"bridge": "default"}.get(spec.get("network") or "none", spec.get("network") or "none"),
        "RestartPolicy": {"Name": "no", "MaximumRetryCount": 0},
        "AutoRemove": bool(spec.get("remove")),
        "ReadonlyRootfs": bool(spec.get("read_only")),
        "Privileged": spec.get("caps", []) is None,
        "SecurityOpt": spec.get("security_opt") or None,
        "Init": bool(spec.get("init")),
        "Memory": int(limits.get("memory") or 0),
        "PidsLimit": limits.get("pids"),
        "NanoCpus": int(cpus * 1e9) if cpus else 0,
        "CgroupnsMode": spec.get("cgroupns") or "",
        "LogConfig": {"Type": "json-file", "Config": {}},
    }


def mounts_of(rec: dict) -> list[dict]:
    out = []
    for v in spec_of(rec).get("volumes") or []:
        parts = v.split(":")
        if len(parts) >= 2:
            out.append(
                {
                    "Type": "bind",
                    "Source": parts[0],
                    "Destination": parts[1],
                    "Mode": parts[2] if len(parts) > 2 else "",
                    "RW": not (len(parts) > 2 and parts[2] == "ro"),
                    "Propagation": "rprivate",
                }
            )
    return out


def _net_of(rec: dict) -> dict:
    """The running container's network (the record's ``net``, runner/net), else {}."""
    net = rec.get("net")
    return net if isinstance(net, dict) and api_state(rec) == "running" else {}


def _network_settings(rec: dict) -> dict:
    mode = host_config_of(rec).get("NetworkMode") or "none"
    name = "bridge" if mode == "default" else mode
    net = _net_of(rec)
    ports: dict[str, list[dict] | None] = {}
    for p in net.get("ports") or []:
        ports.setdefault(f"{p['container_port']}/{p['proto']}", []).append(  # type: ignore[union-attr]
            {"HostIp": p["host_ip"] or "0.0.0.0", "HostPort": str(p["host_port"])}
        )
    endpoint = {
        "NetworkID": net.get("bridge") or name,
        "EndpointID": rec["id"] if net else "",
        "Gateway": net.get("gateway") or "",
        "IPAddress": net.get("address") or "",
        "IPPrefixLen": int(net.get("prefix_len") or 0),
        "MacAddress": net.get("mac") or "",
    }
    return {
        "Bridge": net.get("bridge") or "",
        "SandboxID": "",
        "HairpinMode": False,
        "Ports": ports,
        "SandboxKey": "",
        "Gateway": endpoint["Gateway"],
        "IPAddress": endpoint["IPAddress"],
        "IPPrefixLen": endpoint["IPPrefixLen"],
        "MacAddress": endpoint["MacAddress"],
        "Networks": {name: endpoint},
    }


def _ps_ports(rec: dict) -> list[dict]:
    return [
        {
            "IP": p["host_ip"] or "0.0.0.0",
            "PrivatePort": p["container_port"],
            "PublicPort": p["host_port"],
            "Type": p["proto"],
        }
        for p in _net_of(rec).get("ports") or []
    ]


def ps_entry(rec: dict, size: bool = False) -> dict:
    ref, image_id = image_of(rec)
    cmd = list(rec.get("command") or [])
    out: dict[str, Any] = {
        "Id": rec["id"],
        "Names": ["/" + (rec.get("name") or rec["id"][:12])],
        "Image": ref or image_id,
        "ImageID": image_id,
        "Command": shlex.join(cmd),
        "Created": int(rec.get("created") or 0),
        "Ports": _ps_ports(rec),
        "Labels": labels_of(rec),
        "State": api_state(rec),
        "Status": status_text(rec),
        "HostConfig": {"NetworkMode": host_config_of(rec).get("NetworkMode") or "none"},
        "NetworkSettings": {"Networks": _network_settings(rec)["Networks"]},
        "Mounts": mounts_of(rec),
    }
    if size:
        out["SizeRw"] = _tree_size(rec.get("upper"))
        out["SizeRootFs"] = out["SizeRw"] + sum(_tree_size(p) for p in lowers_of(rec))
    return out


def _tree_size(path: str | None) -> int:
    """Bytes of the regular files under *path* (no symlink followed; best effort)."""
    if not path or not os.path.isdir(path):
        return 0
    total = 0
    for top, dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(top, f))
                if st.st_mode & 0o170000 != 0o120000:
                    total += st.st_size
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(top, d))]
    return total


def inspect(rec: dict, size: bool = False) -> dict:
    st = api_state(rec)
    cmd = list(rec.get("command") or [])
    _ref, image_id = image_of(rec)
    running = st == "running"
    data = rec.get("data_dir")
    out: dict[str, Any] = {
        "Id": rec["id"],
        "Created": rfc3339(rec.get("created")),
        "Path": cmd[0] if cmd else "",
        "Args": cmd[1:],
        "State": {
            "Status": st,
            "Running": running,
            "Paused": False,
            "Restarting": False,
            "OOMKilled": bool(rec.get("oom_killed")),
            "Dead": st == "dead",
            "Pid": int(rec.get("pid") or 0) if running else 0,
            "ExitCode": int(rec.get("exit_code") or 0),
            "Error": rec.get("server_died") or "",
            "StartedAt": rfc3339(started_at(rec)),
            "FinishedAt": rfc3339(rec.get("finished")),
        },
        "Image": image_id,
        "ResolvConfPath": "",
        "HostnamePath": "",
        "HostsPath": "",
        "LogPath": os.path.join(data, "output.log") if data else "",
        "Name": "/" + (rec.get("name") or rec["id"][:12]),
        "RestartCount": 0,
        "Driver": "pyoverlay",
        "Platform": "linux",
        "MountLabel": "",
        "ProcessLabel": "",
        "AppArmorProfile": "",
        "ExecIDs": None,
        "HostConfig": host_config_of(rec),
        "GraphDriver": {
            "Name": "pyoverlay",
            "Data": {
                "LowerDir": ":".join(lowers_of(rec)),
                "UpperDir": rec.get("upper") or "",
                "MergedDir": rec.get("merged") or "",
                "WorkDir": rec.get("workdir") or "",
            },
        },
        "Mounts": mounts_of(rec),
        "Config": config_of(rec),
        "NetworkSettings": _network_settings(rec),
    }
    if size:
        out["SizeRw"] = _tree_size(rec.get("upper"))
        out["SizeRootFs"] = out["SizeRw"] + sum(_tree_size(p) for p in lowers_of(rec))
    return out


# --- filters -----------------------------------------------------------------------------------


_PS_FILTERS = {"id", "name", "status", "ancestor", "exited", "label", "before", "since"}


def _label_match(labels: dict, wants: list[str]) -> bool:
    for w in wants:
        k, eq, v = w.partition("=")
        if k not in labels or (eq and labels[k] != v):
            return False
    return True


def _ps_match(rec: dict, f: dict[str, list[str]]) -> bool:
    if "id" in f and not any(rec["id"].startswith(x) for x in f["id"]):
        return False
    name = rec.get("name") or ""
    if "name" in f:
        import re

        def hit(pat: str) -> bool:
            try:
                return re.search(pat.lstrip("/"), name) is not None
            except re.error:
                return pat.lstrip("/") in name

        if not any(hit(x) for x in f["name"]):
            return False
    if "status" in f:
        valid = {"created", "restarting", "running", "removing", "paused", "exited", "dead"}
        for s in f["status"]:
            if s not in valid:
                raise ApiError(400, f"Unrecognised filter value for status: {s}")
        if api_state(rec) not in f["status"]:
            return False
    exited = api_state(rec) == "exited"
    if "exited" in f and (not exited or str(rec.get("exit_code") or 0) not in f["exited"]):
        return False
    if "ancestor" in f:
        ref, image_id = image_of(rec)
        hexid = image_id.removeprefix("sha256:")

        def ancestor(a: str) -> bool:
            if a in (ref, image_id) or (len(a) >= 4 and hexid.startswith(a.removeprefix("sha256:"))):
                return True
            return ":" not in a.rsplit("/", 1)[-1] and "@" not in a and f"{a}:latest" == ref

        if not any(ancestor(a) for a in f["ancestor"]):
            return False
    return not ("label" in f and not _label_match(labels_of(rec), f["label"]))


@router.route("GET", "/containers/json")
def list_containers(req: Request) -> None:
    f = parse_filters(req, _PS_FILTERS)
    show_all = req.flag("all")
    try:
        recs = state.all_records()
    except state.StateError as e:
        raise ApiError(500, str(e)) from None
    recs = sorted(recs, key=lambda r: r.get("created") or 0, reverse=True)  # newest first, as dockerd
    if not show_all and "status" not in f and "exited" not in f:
        recs = [r for r in recs if api_state(r) == "running"]
    recs = [r for r in recs if _ps_match(r, f)]
    for key, keep in (("before", lambda c, t: c < t), ("since", lambda c, t: c > t)):
        for ref in f.get(key, []):
            t = find(ref).get("created") or 0
            recs = [r for r in recs if keep(r.get("created") or 0, t)]
    try:
        limit = int(req.arg("limit") or -1)
    except ValueError:
        raise ApiError(400, "invalid limit") from None
    if limit > 0:
        recs = recs[:limit]
    req.json([ps_entry(r, size=req.flag("size")) for r in recs])


@router.route("GET", "/containers/{id}/json")
def inspect_container(req: Request) -> None:
    req.json(inspect(find(req.params["id"]), size=req.flag("size")))


@router.route("GET", "/containers/{id}/top")
def top(req: Request) -> None:
    rec = find(req.params["id"])
    if api_state(rec) != "running" or not rec.get("pidns") or not L.alive(rec.get("pid"), rec.get("pid_start")):
        raise ApiError(409, f"Container {rec['id']} is not running")
    pids = set(L.pids_in_pid_ns(rec["pidns"]))
    ps_args = req.arg("ps_args") or "-ef"
    try:
        argv = shlex.split(ps_args)
    except ValueError as e:
        raise ApiError(400, f"invalid ps_args: {e}") from None
    try:
        r = subprocess.run(["ps", *argv], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ApiError(500, f"Error running ps: {e}") from None
    if r.returncode != 0:
        raise ApiError(500, f"Error running ps: exit status {r.returncode}: {r.stderr.strip()}")
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    if not lines:
        raise ApiError(500, "ps printed nothing")
    titles = lines[0].split()
    if "PID" not in titles:
        raise ApiError(500, "Couldn't find PID field in ps output")
    at = titles.index("PID")
    procs = []
    for ln in lines[1:]:
        fields = ln.split(None, len(titles) - 1)
        try:
            pid = int(fields[at])
        except (IndexError, ValueError):
            continue
        if pid in pids:
            procs.append(fields)
    req.json({"Titles": titles, "Processes": procs})


# --- stop, kill, rm, prune -----------------------------------------------------------------------


def stop_timeout(rec: dict, given: str | None) -> float:
    if given not in (None, ""):
        try:
            return max(0.0, float(given))
        except ValueError:
            raise ApiError(400, f"invalid t: {given!r}") from None
    v = spec_of(rec).get("stop_timeout")
    return float(v) if isinstance(v, (int, float)) else 10.0


@router.route("POST", "/containers/{id}/stop")
def stop(req: Request) -> None:
    rec = find(req.params["id"])
    st = api_state(rec)
    if st == "dead":
        control.cleanup_dead(rec)
    if st != "running":
        req.empty(304)  # dockerd: "container already stopped"
        return
    events.publish("container", "kill", rec["id"], attrs(rec, signal=str(int(signal.SIGTERM))))
    try:
        control.stop(rec, stop_timeout(rec, req.arg("t")))
    except control.ControlError as e:
        raise ApiError(500, f"Cannot stop container {req.params['id']}: {e}") from None
    events.publish("container", "stop", rec["id"], attrs(rec))
    req.empty(204)


@router.route("POST", "/containers/{id}/kill")
def kill(req: Request) -> None:
    rec = find(req.params["id"])
    name = req.arg("signal") or "KILL"
    try:
        sig = control.parse_signal(name)
    except ValueError:
        raise ApiError(400, f"Invalid signal: {name}") from None
    if sig <= 0 or sig >= 65:
        raise ApiError(400, f"Invalid signal: {name}")
    if api_state(rec) != "running":
        raise ApiError(409, f"Container {rec['id']} is not running")
    try:
        control.kill(rec, sig)
    except control.ControlError:
        raise ApiError(409, f"Container {rec['id']} is not running") from None
    events.publish("container", "kill", rec["id"], attrs(rec, signal=str(sig)))
    req.empty(204)


def remove(rec: dict, force: bool) -> None:
    st = api_state(rec)
    if st == "running" and not force:
        raise ApiError(
            409,
            f"You cannot remove a running container {rec['id']}. Stop the container before attempting removal"
            " or force remove",
        )
    if st == "running":
        events.publish("container", "kill", rec["id"], attrs(rec, signal=str(int(signal.SIGKILL))))
    try:
        control.remove(rec, force=True)
    except control.ControlError as e:
        raise ApiError(500, f"Could not remove container {rec['id']}: {e}") from None
    events.publish("container", "destroy", rec["id"], attrs(rec))


@router.route("DELETE", "/containers/{id}")
def delete(req: Request) -> None:
    rec = find(req.params["id"])
    if req.flag("link"):
        raise ApiError(501, "not implemented: links (rm --link)")
    remove(rec, req.flag("force"))
    req.empty(204)


@router.route("POST", "/containers/prune")
def prune(req: Request) -> None:
    f = parse_filters(req, ("until", "label", "label!"))
    until = min((parse_time(u) for u in f.get("until", [])), default=None)
    deleted, space = [], 0
    for rec in state.all_records():
        if api_state(rec) == "running":
            continue
        if until is not None and (rec.get("created") or 0) >= until:
            continue
        labels = labels_of(rec)
        if "label" in f and not _label_match(labels, f["label"]):
            continue
        if "label!" in f and _label_match(labels, f["label!"]):
            continue
        size = _tree_size(rec.get("upper")) if not spec_of(rec).get("upper_given") else 0
        try:
            control.remove(rec, force=False)
        except control.ControlError:
            continue  # started or gone meanwhile
        events.publish("container", "destroy", rec["id"], attrs(rec))
        deleted.append(rec["id"])
        space += size
    events.publish("container", "prune", "", {"reclaimed": str(space)})
    req.json({"ContainersDeleted": deleted or None, "SpaceReclaimed": space})


# --- diff, commit ---------------------------------------------------------------------------------

_KIND = {"C": 0, "A": 1, "D": 2}


@router.route("GET", "/containers/{id}/changes")
def changes(req: Request) -> None:
    from overlayfs_py.diff import diff

    rec = find(req.params["id"])
    upper = rec.get("upper")
    if not upper or not os.path.isdir(upper):
        req.json(None)  # never started: dockerd answers null for an empty diff
        return
    try:
        out = diff(upper, lowers_of(rec))
    except OSError as e:
        raise ApiError(500, f"cannot read the layers of {rec['id'][:12]}: {e}") from None
    req.json([{"Kind": _KIND[c.kind], "Path": c.path} for c in out] or None)


#: the Dockerfile instructions ``commit --change`` accepts, as dockerd
_commit_lock = threading.Lock()


@router.route("POST", "/commit")
def commit(req: Request) -> None:
    from ..images import ImageError, resolve
    from ..images.commit import commit_image, new_name
    from ..images.core import local_root
    from ..images.local import LocalStore

    ref = req.arg("container")
    if not ref:
        raise ApiError(400, "container is required")
    rec = find(ref)
    repo, tag = req.arg("repo") or "", req.arg("tag") or ""
    name = None
    try:
        if repo:
            name = new_name(f"{repo}:{tag}" if tag else repo)
        elif tag:
            raise ApiError(400, "tag without repository")
    except ImageError as e:
        raise ApiError(400, str(e)) from None
    upper = rec.get("upper")
    if not upper or not os.path.isdir(upper):
        raise ApiError(409, f"container {rec['id'][:12]} has no upper layer (never started)")
    body = req.json_body()
    try:
        parent = resolve(rec["image"]["id"]) if (rec.get("image") or {}).get("id") else None
    except ImageError as e:
        raise ApiError(409, f"the container's image is gone: {e}") from None
    log: list[str] = []
    edit = _commit_edit(body, req)
    with _commit_lock:
        try:
            img = commit_image(upper, rec, name, parent, LocalStore(local_root()), log=log.append, edit=edit)
        except (ImageError, OSError) as e:
            raise ApiError(500, f"commit: {e}") from None
    events.publish("container", "commit", rec["id"], attrs(rec, comment=req.arg("comment") or ""))
    req.json({"Id": img.id}, 201)


def _commit_edit(body: Any, req: Request):
    """What the request adds to the new image's config: *body* (a Config), ``changes``,
    ``comment``, ``author``. Checked now (a bad change is a 400 before anything is
    stored); applied by commit_image."""
    changes: list[str] = []
    for c in req.query.get("changes") or []:
        changes += c.splitlines()
    changes_.apply({}, changes)  # the check
    comment, author = req.arg("comment") or "", req.arg("author") or ""

    def edit(cfg: dict) -> None:
        inner = cfg.setdefault("config", {})
        if isinstance(body, dict):
            for k, v in body.items():
                if v not in (None, "", [], {}):
                    inner[k] = v
        changes_.apply(inner, changes)
        if author:
            cfg["author"] = author
        if comment:
            cfg["comment"] = comment
            if cfg.get("history"):
                cfg["history"][-1]["comment"] = comment

    return edit


# --- pyoverlay's own: trace, explain ----------------------------------------------------------


@router.route("GET", "/pyoverlay/containers/{id}/explain")
def explain(req: Request) -> None:
    from overlayfs_py.explain import explain as explain_path

    rec = find(req.params["id"])
    path = req.arg("path")
    if not path:
        raise ApiError(400, "path is required")
    upper = rec.get("upper")
    if not upper or not os.path.isdir(upper):
        raise ApiError(409, f"container {rec['id'][:12]} has no upper layer yet")
    lowers = lowers_of(rec)
    labels = ["upper"] + (["init"] if rec.get("init_layer") in lowers else [])
    labels += [f"lower{i + 1}" for i in range(len(rec.get("layers") or []))]
    try:
        ex = explain_path(upper, lowers, path, labels=labels, userxattr=_userxattr(upper), aufs=False, index=None)
    except OSError as e:
        raise ApiError(500, f"cannot read the layers: {e}") from None
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    req.json(ex.to_dict())


def _userxattr(upper: str) -> bool:
    from overlayfs_py.diff import detect_userxattr

    return bool(detect_userxattr(upper))


@router.route("GET", "/pyoverlay/containers/{id}/trace")
def trace(req: Request) -> None:
    from overlayfs_py import state as mstate
    from overlayfs_py.unixsock import connect_unix

    rec = find(req.params["id"])
    if api_state(rec) != "running" or not rec.get("merged"):
        raise ApiError(409, f"Container {rec['id']} is not running")
    info = mstate.lookup(rec["merged"])
    if info is None or not mstate.server_alive(info):
        raise ApiError(409, f"container {rec['id'][:12]} has no live mount")
    path = info.get("trace_socket") or mstate.trace_socket(info["mountpoint"])
    try:
        sock = connect_unix(path)
    except OSError as e:
        raise ApiError(500, f"cannot connect to the trace socket: {e}") from None
    conn = req.connection
    try:
        sock.sendall(json.dumps({"history": req.flag("history")}).encode() + b"\n")
        req.stream_start("application/json")
        buf = b""
        while True:
            r, _, _ = select.select([sock, conn], [], [], 1.0)
            if conn in r and peer_closed(conn):
                return
            if sock in r:
                data = sock.recv(65536)
                if not data:
                    break
                buf += data
                *lines, buf = buf.split(b"\n")
                out = b"".join(ln + b"\n" for ln in lines if ln.strip())
                req.stream_write(out)
    finally:
        sock.close()
