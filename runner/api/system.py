"""System endpoints: ``/_ping``, ``/version``, ``/info`` (what ``docker version`` and
``docker info`` show), and the answers for dockerd's endpoints pyoverlay does not
implement (networks, volumes, build, swarm, plugins...): 501 with a message the docker
CLI prints as it is."""

from __future__ import annotations

import functools
import os
import platform
import socket
import subprocess
import time
import uuid

from .server import API_VERSION, MIN_API_VERSION, ApiError, Request, Router

router = Router()

_PING_HEADERS = {
    "Cache-Control": "no-cache, no-store, must-revalidate",
    "Pragma": "no-cache",
    "Builder-Version": "1",
    "Swarm": "inactive",
}


@router.route("GET", "/_ping")  # HEAD too (the router answers HEAD with the GET handler)
def ping(req: Request) -> None:
    req.text("OK", headers=_PING_HEADERS)


@functools.cache
def _ours() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as pkg_version

    try:
        return pkg_version("pyoverlay")
    except PackageNotFoundError:
        return "dev"


@functools.cache
def _git() -> tuple[str, str]:
    """(commit, commit time) of the checkout pyoverlay runs from, if it is one."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        r = subprocess.run(
            ["git", "-C", here, "log", "-1", "--format=%h %cI"],
            capture_output=True,
            text=True,
            timeout=10,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError):
        return "", ""
    parts = r.stdout.split()
    return (parts[0], parts[1]) if r.returncode == 0 and len(parts) == 2 else ("", "")


def _arch() -> str:
    m = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(m, m)


@router.route("GET", "/version")
def version(req: Request) -> None:
    commit, built = _git()
    details = {
        "ApiVersion": API_VERSION,
        "Arch": _arch(),
        "BuildTime": built,
        "Experimental": "false",
        "GitCommit": commit,
        "GoVersion": "python" + platform.python_version(),
        "KernelVersion": platform.release(),
        "MinAPIVersion": MIN_API_VERSION,
        "Os": "linux",
    }
    req.json(
        {
            "Platform": {"Name": "pyoverlay"},
            "Components": [
                {"Name": "Engine", "Version": _ours(), "Details": details},
                {"Name": "pyoverlay runner", "Version": _ours(), "Details": {"GitCommit": commit}},
            ],
            "Version": _ours(),
            "ApiVersion": API_VERSION,
            "MinAPIVersion": MIN_API_VERSION,
            "GitCommit": commit,
            "GoVersion": details["GoVersion"],
            "Os": "linux",
            "Arch": _arch(),
            "KernelVersion": platform.release(),
            "Experimental": False,
            "BuildTime": built,
        }
    )


# --- /info -------------------------------------------------------------------------------------


def _os_name() -> str:
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return "Linux"


def _mem_total() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _sysctl(name: str) -> bool:
    try:
        with open(f"/proc/sys/{name}") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def _cgroup_version() -> str:
    from ..cgroups import cgroup_version

    return cgroup_version()


def _daemon_id(root: str) -> str:
    """Stable for one data dir on one machine (dockerd keeps a random one in its root)."""
    try:
        with open("/etc/machine-id") as f:
            mid = f.read().strip()
    except OSError:
        mid = socket.gethostname()
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"pyoverlay:{mid}:{root}")).upper()


def _counts() -> tuple[int, int, int]:
    """(running, paused, stopped) containers of the shared records."""
    from .. import state

    try:
        recs = state.all_records()
    except state.StateError:
        return 0, 0, 0
    running = sum(1 for r in recs if state.status(r) == "running")
    return running, 0, len(recs) - running


@router.route("GET", "/info")
def info(req: Request) -> None:
    from ..state import data_root
    from . import images

    running, paused, stopped = _counts()
    try:
        n_images = len(images.all_images())
    except ApiError:
        n_images = 0
    root = data_root()
    rootless = os.geteuid() != 0
    cgv = _cgroup_version()
    warnings = list(getattr(req.server, "warnings", []))
    commit = {"ID": "", "Expected": ""}
    req.json(
        {
            "ID": _daemon_id(root),
            "Containers": running + paused + stopped,
            "ContainersRunning": running,
            "ContainersPaused": paused,
            "ContainersStopped": stopped,
            "Images": n_images,
            "Driver": "pyoverlay",
            "DriverStatus": [["Implementation", "userspace OverlayFS (FUSE, Python)"]],
            "Plugins": {"Volume": [], "Network": ["host", "none"], "Authorization": None, "Log": ["pyoverlay"]},
            "MemoryLimit": True,
            "SwapLimit": False,
            "KernelMemory": False,
            "KernelMemoryTCP": False,
            "CpuCfsPeriod": True,
            "CpuCfsQuota": True,
            "CPUShares": True,
            "CPUSet": True,
            "PidsLimit": True,
            "IPv4Forwarding": _sysctl("net/ipv4/ip_forward"),
            "BridgeNfIptables": _sysctl("net/bridge/bridge-nf-call-iptables"),
            "BridgeNfIp6tables": _sysctl("net/bridge/bridge-nf-call-ip6tables"),
            "Debug": False,
            "NFd": len(os.listdir("/proc/self/fd")),
            "OomKillDisable": False,
            "NGoroutines": 0,
            "SystemTime": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{time.time_ns() % 10**9:09d}Z",
            "LoggingDriver": "pyoverlay",
            "CgroupDriver": "cgroupfs",
            "CgroupVersion": cgv,
            "NEventsListener": 0,
            "KernelVersion": platform.release(),
            "OperatingSystem": _os_name(),
            "OSVersion": "",
            "OSType": "linux",
            "Architecture": platform.machine(),
            "IndexServerAddress": "",
            "RegistryConfig": {
                "AllowNondistributableArtifactsCIDRs": [],
                "AllowNondistributableArtifactsHostnames": [],
                "InsecureRegistryCIDRs": [],
                "IndexConfigs": {},
                "Mirrors": [],
            },
            "NCPU": os.cpu_count() or 1,
            "MemTotal": _mem_total(),
            "GenericResources": None,
            "DockerRootDir": root,
            "HttpProxy": "",
            "HttpsProxy": "",
            "NoProxy": "",
            "Name": socket.gethostname(),
            "Labels": [],
            "ExperimentalBuild": False,
            "ServerVersion": images_version(),
            "Runtimes": {"pyoverlay": {"path": "pyoverlay"}},
            "DefaultRuntime": "pyoverlay",
            "Swarm": {
                "NodeID": "",
                "NodeAddr": "",
                "LocalNodeState": "inactive",
                "ControlAvailable": False,
                "Error": "",
                "RemoteManagers": None,
            },
            "LiveRestoreEnabled": True,
            "Isolation": "",
            "InitBinary": "",
            "ContainerdCommit": commit,
            "RuncCommit": commit,
            "InitCommit": commit,
            # dockerd's order: seccomp first; name=cgroupns when its default cgroup namespace
            # mode is private (v2)
            "SecurityOptions": ["name=seccomp,profile=default"]
            + (["name=rootless"] if rootless else [])
            + (["name=cgroupns"] if cgv == "2" else []),
            "Warnings": warnings or None,
        }
    )


def images_version() -> str:
    return _ours()


# --- what pyoverlay does not implement ----------------------------------------------------------

#: dockerd's endpoint groups pyoverlay serve does not implement: path prefix -> what
UNIMPLEMENTED = {
    "/networks": "network changes (create, rm, connect, disconnect, prune)",  # ls, inspect: networks.py
    "/volumes": "volumes",
    "/build": "image builds (docker build)",
    "/swarm": "swarm mode",
    "/nodes": "swarm nodes",
    "/services": "swarm services",
    "/tasks": "swarm tasks",
    "/secrets": "secrets",
    "/configs": "swarm configs",
    "/plugins": "plugins",
    "/distribution": "registry distribution (no registry access)",
    "/session": "build sessions",
    "/grpc": "build sessions",
    "/images/search": "image search (no registry access)",
    "/auth": "registry logins (no registry access)",
    "/system/df": "disk usage (docker system df)",
}


def _unimplemented(what: str):
    def handler(req: Request) -> None:
        raise ApiError(501, f"pyoverlay serve does not implement {what} (not supported)")

    return handler


for _prefix, _what in UNIMPLEMENTED.items():
    for _method in ("GET", "POST", "PUT", "DELETE"):
        router.add(_method, _prefix, _unimplemented(_what))
        router.add(_method, _prefix + "/{rest:path}", _unimplemented(_what))


def _push(req: Request) -> None:
    raise ApiError(501, "pyoverlay serve does not implement image push (no registry access)")


router.add("POST", "/images/{name:path}/push", _push)
