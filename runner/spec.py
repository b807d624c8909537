"""What a container is asked to be: ``RunSpec``, parsed and checked before anything runs.

Pure data and parsing (docker's spellings): volumes, users, environment, capabilities.
Every user error is a :class:`SpecError` with a one-line message; the runner turns it
into exit status 125, as docker does for its own errors.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .cgroups import Limits
from .errors import SpecError

if TYPE_CHECKING:
    from .net.ports import PortMapping

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: Linux capability numbers (linux/capability.h).
CAPS = {
    "CHOWN": 0,
    "DAC_OVERRIDE": 1,
    "DAC_READ_SEARCH": 2,
    "FOWNER": 3,
    "FSETID": 4,
    "KILL": 5,
    "SETGID": 6,
    "SETUID": 7,
    "SETPCAP": 8,
    "LINUX_IMMUTABLE": 9,
    "NET_BIND_SERVICE": 10,
    "NET_BROADCAST": 11,
    "NET_ADMIN": 12,
    "NET_RAW": 13,
    "IPC_LOCK": 14,
    "IPC_OWNER": 15,
    "SYS_MODULE": 16,
    "SYS_RAWIO": 17,
    "SYS_CHROOT": 18,
    "SYS_PTRACE": 19,
    "SYS_PACCT": 20,
    "SYS_ADMIN": 21,
    "SYS_BOOT": 22,
    "SYS_NICE": 23,
    "SYS_RESOURCE": 24,
    "SYS_TIME": 25,
    "SYS_TTY_CONFIG": 26,
    "MKNOD": 27,
    "LEASE": 28,
    "AUDIT_WRITE": 29,
    "AUDIT_CONTROL": 30,
    "SETFCAP": 31,
    "MAC_OVERRIDE": 32,
    "MAC_ADMIN": 33,
    "SYSLOG": 34,
    "WAKE_ALARM": 35,
    "BLOCK_SUSPEND": 36,
    "AUDIT_READ": 37,
    "PERFMON": 38,
    "BPF": 39,
    "CHECKPOINT_RESTORE": 40,
}

#: Docker's default capability set (moby oci/caps/defaults.go): bounding mask 0xa80425fb.
DOCKER_DEFAULT_CAPS = frozenset(
    CAPS[n]
    for n in (
        "CHOWN",
        "DAC_OVERRIDE",
        "FOWNER",
        "FSETID",
        "KILL",
        "SETGID",
        "SETUID",
        "SETPCAP",
        "NET_BIND_SERVICE",
        "NET_RAW",
        "SYS_CHROOT",
        "MKNOD",
        "AUDIT_WRITE",
        "SETFCAP",
    )
)

_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")
_ENV_KEY_RE = re.compile(r"^[^=\0]+$")


@dataclass(frozen=True)
class Volume:
    host: str  # absolute, resolved host path
    target: str  # absolute path inside the container
    read_only: bool = False


@dataclass
class RunSpec:
    layers: tuple[str, ...]  # lower layers, top first, resolved
    argv: list[str]
    name: str | None = None
    upper: str | None = None  # keep the upper here (else a fresh one)
    remove: bool = False  # --rm
    detach: bool = False
    interactive: bool = False
    tty: bool = False
    init: bool = False
    env: list[str] = field(default_factory=list)  # KEY=VAL, -e order
    workdir: str = "/"
    user: str | None = None
    hostname: str | None = None
    network: str = "none"
    publish: tuple[PortMapping, ...] = ()  # -p (runner/net/ports.py)
    dns: tuple[str, ...] = ()  # --dns
    add_hosts: tuple[tuple[str, str], ...] = ()  # --add-host NAME:IP
    volumes: list[Volume] = field(default_factory=list)
    read_only: bool = False
    limits: Limits = field(default_factory=Limits)
    privileged: bool = False
    cap_add: frozenset[int] = frozenset()
    cap_drop: frozenset[int] = frozenset()
    stop_timeout: float = 10.0
    trace_file: str | None = None  # --trace FILE
    trace_summary: bool = False  # --trace-summary
    image: dict | None = None  # --image: {"ref", "id", "source"}
    userns_map: str = "auto"  # rootless: auto | subid | single (runner/userns.py)
    seccomp: str = "default"  # --security-opt seccomp=: default | unconfined | a profile's JSON text
    no_new_privileges: bool = False  # --security-opt no-new-privileges (also with --privileged)
    cgroupns: str | None = None  # --cgroupns private | host; None: the host's default (plan.py)

    def caps(self) -> frozenset[int] | None:
        """Capabilities to keep in the bounding set; None keeps them all."""
        if self.privileged:
            return None
        return (DOCKER_DEFAULT_CAPS | self.cap_add) - self.cap_drop

    def no_new_privs(self) -> bool:
        return not self.privileged or self.no_new_privileges

    def seccomp_profile(self) -> str:
        """The seccomp profile to compile (runner/seccomp): --privileged is unconfined, as docker."""
        return "unconfined" if self.privileged else self.seccomp


def new_id() -> str:
    return secrets.token_hex(32)


def check_name(name: str) -> str:
    if not _NAME_RE.match(name) or len(name) > 128:
        raise SpecError(f"invalid container name {name!r}: use [a-zA-Z0-9][a-zA-Z0-9_.-]*")
    return name


def parse_volume(text: str) -> Volume:
    parts = text.split(":")
    mode = "rw"
    if len(parts) == 3:
        host, target, mode = parts
    elif len(parts) == 2:
        host, target = parts
    else:
        raise SpecError(f"invalid volume {text!r}: expected HOST:CONTAINER[:ro|rw]")
    if mode not in ("ro", "rw"):
        raise SpecError(f"invalid volume mode {mode!r} in {text!r}: expected ro or rw")
    if not host or not target:
        raise SpecError(f"invalid volume {text!r}: empty path")
    if not target.startswith("/"):
        raise SpecError(f"invalid volume {text!r}: the container path must be absolute")
    if ".." in target.split("/"):
        raise SpecError(f"invalid volume {text!r}: bad container path {target!r}")
    target = os.path.normpath(target)
    if target == "/":
        raise SpecError(f"invalid volume {text!r}: bad container path {target!r}")
    real = os.path.realpath(host)
    if not os.path.exists(real):
        raise SpecError(f"volume source {host!r} does not exist")
    return Volume(real, target, mode == "ro")


def parse_env(items: list[str], environ: Mapping[str, str] | None = None) -> list[str]:
    """``-e KEY=VAL`` as given; ``-e KEY`` takes KEY from the caller's environment
    (and is dropped when unset), as docker does."""
    env: Mapping[str, str] = os.environ if environ is None else environ
    out = []
    for item in items:
        key, eq, _ = item.partition("=")
        if not _ENV_KEY_RE.match(key):
            raise SpecError(f"invalid environment variable {item!r}")
        if eq:
            out.append(item)
        elif key in env:
            out.append(f"{key}={env[key]}")
    return out


def parse_cap(name: str) -> int:
    n = name.upper().removeprefix("CAP_")
    if n not in CAPS:
        raise SpecError(f"unknown capability {name!r}")
    return CAPS[n]


def parse_caps(names: list[str]) -> frozenset[int]:
    if any(n.upper() == "ALL" for n in names):
        return frozenset(CAPS.values())
    return frozenset(parse_cap(n) for n in names)


NETWORKS = ("bridge", "none", "host")


def parse_network(net: str) -> str:
    if net == "default":
        return "bridge"
    if net in NETWORKS:
        return net
    if net == "slirp4netns" or net.startswith("slirp4netns:"):  # rootless only (the plan says so)
        parse_slirp_options(net)
        return net
    raise SpecError(f"network {net!r} is not supported (use bridge, none or host)")


#: ``--network slirp4netns:OPTS`` (podman's spelling; runner/net/slirp.py): the options taken
SLIRP_OPTIONS = ("allow_host_loopback",)


def parse_slirp_options(network: str) -> dict[str, bool]:
    """``slirp4netns[:allow_host_loopback=true|false]`` -> its options (SpecError)."""
    _, _, text = network.partition(":")
    out = {"allow_host_loopback": False}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if key not in SLIRP_OPTIONS or (sep and value.lower() not in ("true", "false")):
            raise SpecError(f"invalid --network option {item!r}: slirp4netns takes allow_host_loopback=true|false")
        out[key] = not sep or value.lower() == "true"
    return out


#: ``--network``'s default when none is given (tests set ``none``)
NETWORK_ENV = "PYOVERLAY_NETWORK"


def default_network() -> str:
    """``--network``'s default: ``$PYOVERLAY_NETWORK``, else docker's ``bridge`` (as root
    the pyoverlay0 bridge, for an ordinary user slirp4netns, as rootless podman)."""
    return os.environ.get(NETWORK_ENV) or "bridge"


def parse_cgroupns(mode: str) -> str:
    """``--cgroupns private|host`` (runner/cgroups.py CGROUPNS_MODES)."""
    from .cgroups import CGROUPNS_MODES

    if mode not in CGROUPNS_MODES:
        raise SpecError(f"invalid --cgroupns value {mode!r}: expected private or host")
    return mode


def check_workdir(path: str) -> str:
    if not path.startswith("/"):
        raise SpecError(f"the working directory {path!r} is invalid: it must be absolute")
    return os.path.normpath(path)


def _strs(v) -> list[str]:
    """A Cmd/Entrypoint/Env value: a list, ``null``, or (old configs) one string."""
    if v is None:
        return []
    return [v] if isinstance(v, str) else [str(x) for x in v]


def apply_image(
    run_config: dict, argv: list[str], env: list[str], workdir: str | None, user: str | None
) -> tuple[list[str], list[str], str, str | None]:
    """Docker's merge of an image config (:meth:`runner.images.Image.run_config`) with
    run's own CMD, ``-e``, ``-w`` and ``-u``: argv = Entrypoint + (CMD if given, else the
    image's Cmd); the image's Env first, then ``-e`` (a later value wins); the image's
    WorkingDir unless ``-w``; its User unless ``-u``."""
    full = _strs(run_config.get("Entrypoint")) + (list(argv) or _strs(run_config.get("Cmd")))
    if not full:
        raise SpecError(
            "no command specified: the image has no Cmd or Entrypoint (give one: run --image REF CMD [ARGS...])"
        )
    merged_env = _strs(run_config.get("Env")) + list(env)
    wd = check_workdir(workdir or run_config.get("WorkingDir") or "/")
    return full, merged_env, wd, user or run_config.get("User") or None


def build_env(spec_env: list[str], hostname: str, home: str, tty: bool) -> list[str]:
    """The container's environment, in docker's order: PATH, HOSTNAME, TERM, the -e
    values (a later one replaces an earlier one), then HOME if still unset."""
    env: dict[str, str] = {"PATH": DEFAULT_PATH, "HOSTNAME": hostname}
    if tty:
        env["TERM"] = "xterm"
    for item in spec_env:
        k, _, v = item.partition("=")
        env[k] = v
    env.setdefault("HOME", home)
    return [f"{k}={v}" for k, v in env.items()]


@dataclass(frozen=True)
class Ids:
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str


def resolve_user(user: str | None, passwd: str, group: str) -> Ids:
    """``-u`` (``uid``, ``name``, ``uid:gid``, ``name:group``) against the container's
    /etc/passwd and /etc/group text, as docker does: a numeric uid need not exist
    (then gid 0, HOME /); supplementary groups come from /etc/group."""
    users = [line.split(":") for line in passwd.splitlines() if line.count(":") >= 6]
    groups = [line.split(":") for line in group.splitlines() if line.count(":") >= 3]
    u, _, g = (user or "0").partition(":")
    entry = next((e for e in users if e[0] == u), None)
    if entry is None and u.isdigit():
        entry = next((e for e in users if e[2] == u), None)
    if entry is not None:
        uid, gid, home, uname = int(entry[2]), int(entry[3]), entry[5] or "/", entry[0]
    elif u.isdigit():
        uid, gid, home, uname = int(u), 0, "/", None
    else:
        raise SpecError(f"unable to find user {u}: no matching entries in passwd file")
    if g:
        gent = next((e for e in groups if e[0] == g), None)
        if gent is not None:
            gid = int(gent[2])
        elif g.isdigit():
            gid = int(g)
        else:
            raise SpecError(f"unable to find group {g}: no matching entries in group file")
    supp = tuple(
        int(e[2]) for e in groups if uname and uname in e[3].split(",") and e[2].isdigit() and int(e[2]) != gid
    )
    if uid == 0 and entry is None:
        home = "/root"
    return Ids(uid, gid, supp, home)
