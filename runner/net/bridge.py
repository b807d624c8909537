"""Root bridge networking: the bridge, the address allocator, a container's veth pair.

One bridge (``pyoverlay0``, subnet ``10.203.0.0/16``, its first address the bridge's
own and every container's default route; both overridable with ``PYOVERLAY_BRIDGE`` and
``PYOVERLAY_BRIDGE_SUBNET``), created with its NAT rules (runner/net/links.py) when the
first container attaches and removed with them when the last one is gone: nothing of
pyoverlay stays on a machine without containers (ip_forward, set as docker sets it,
stays).

The allocator is a small JSON file per bridge and network namespace, machine-wide
(``/run/pyoverlay/net/<bridge>@netns-<inode>.json``: every runtime on that bridge shares
it, whatever its state dir), changed only under an flock of one lock file. A
lease names its container, its host-side veth (``pyov`` + 11 hex digits of the id) and
its owner: the container's monitor, by pid *and* start time. A lease whose owner is no
longer that process (the monitor was SIGKILLed, the machine crashed) is stale: the next
attach on the bridge (and ``rm`` of the container) deletes its veth if the kernel has
not already (a veth pair goes with the network namespace when PID 1 dies) and frees the
address, and the bridge goes if no lease is left.

:func:`attach` is called by the monitor before it forks PID 1: it makes a network
namespace (an fd, handed to PID 1 through ``Launch.net_fd``), the veth pair (host end on
the bridge, the peer moved into the namespace as ``eth0``), the address, ``lo`` and the
default route, all before the container's command can run.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from overlayfs_py.state import private_dir

from .. import _linux as L
from . import links
from .links import NetError

DEFAULT_BRIDGE = "pyoverlay0"
#: not docker's 172.17.0.0/16 nor podman's 10.88.0.0/16
DEFAULT_SUBNET = "10.203.0.0/16"
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


@dataclass(frozen=True)
class BridgeConfig:
    name: str
    subnet: str  # "10.203.0.0/16"

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.subnet)

    @property
    def gateway(self) -> str:
        """The bridge's own address: the first of the subnet."""
        return str(self.network.network_address + 1)

    @property
    def prefix_len(self) -> int:
        return self.network.prefixlen


def config() -> BridgeConfig:
    """The bridge to use: ``PYOVERLAY_BRIDGE`` / ``PYOVERLAY_BRIDGE_SUBNET`` or the
    defaults. NetError (exit 125) for a bad name or subnet."""
    name = os.environ.get("PYOVERLAY_BRIDGE") or DEFAULT_BRIDGE
    if not _IFNAME_RE.match(name):
        raise NetError(f"invalid bridge name {name!r} (PYOVERLAY_BRIDGE): 1 to 15 of A-Z a-z 0-9 _ . -")
    text = os.environ.get("PYOVERLAY_BRIDGE_SUBNET") or DEFAULT_SUBNET
    try:
        net = ipaddress.IPv4Network(text, strict=True)
    except ValueError as e:
        raise NetError(f"invalid bridge subnet {text!r} (PYOVERLAY_BRIDGE_SUBNET): {e}") from None
    if net.prefixlen > 30:
        raise NetError(f"bridge subnet {text!r} is too small (at most /30)")
    return BridgeConfig(name, str(net))


def veth_name(cid: str) -> str:
    return "pyov" + cid[:11]


def mac_of(address: str) -> str:
    """docker's scheme: 02:42 and the four bytes of the IPv4 address."""
    return "02:42:" + ":".join(f"{b:02x}" for b in ipaddress.IPv4Address(address).packed)


# --- the allocator ------------------------------------------------------------------------


@dataclass
class Leases:
    """The allocator's file: address -> lease (cid, veth, owner pid and start time)."""

    bridge: str
    subnet: str
    leases: dict[str, dict] = field(default_factory=dict)

    def owned(self, cid: str) -> list[str]:
        return [a for a, lease in self.leases.items() if lease.get("cid") == cid]

    def stale(self) -> list[str]:
        return [a for a, lease in self.leases.items() if not L.alive(lease.get("pid"), lease.get("start"))]

    def free_address(self, net: ipaddress.IPv4Network) -> str:
        used = set(self.leases)
        gw = net.network_address + 1
        for host in net.hosts():
            if host != gw and str(host) not in used:
                return str(host)
        raise NetError(f"no free address left on bridge {self.bridge} ({self.subnet})")


#: The leases belong to the bridge, which belongs to a network namespace, not to one
#: runtime: every state dir (a test's, the demo's, root's default) that attaches to the
#: same bridge must share them, so they live in one machine-wide place, keyed by bridge
#: and network namespace.
NET_DIR = "/run/pyoverlay/net"


def _net_dir() -> str:
    return private_dir(NET_DIR, "network state dir")


def leases_path(bridge: str, netns_inode: int | None = None) -> str:
    """The leases of *bridge* in the network namespace *netns_inode* (default: ours)."""
    ino = os.stat("/proc/self/ns/net").st_ino if netns_inode is None else netns_inode
    return os.path.join(_net_dir(), f"{bridge}@netns-{ino}.json")


@contextlib.contextmanager
def _locked(cfg: BridgeConfig) -> Iterator[Leases]:
    """The bridge's leases, under its lock; written back (atomically) when the block
    ends without an exception; the file is removed when no lease is left."""
    d = _net_dir()
    fd = os.open(os.path.join(d, "leases.lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        path = leases_path(cfg.name)
        try:
            with open(path) as f:
                raw = json.load(f)
            leases = Leases(cfg.name, str(raw.get("subnet") or cfg.subnet), dict(raw.get("leases") or {}))
        except FileNotFoundError:
            leases = Leases(cfg.name, cfg.subnet)
        except (OSError, ValueError, AttributeError) as e:
            raise NetError(f"bridge {cfg.name}: unreadable allocator state {path}: {e}") from None
        try:
            yield leases
        finally:  # what was done is recorded even when a later step failed
            _write(path, leases)
    finally:
        os.close(fd)


def _write(path: str, leases: Leases) -> None:
    if not leases.leases:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"subnet": leases.subnet, "leases": leases.leases}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _drop(leases: Leases, address: str) -> None:
    lease = leases.leases.pop(address, None)
    if lease and lease.get("veth"):
        links.delete_link(str(lease["veth"]))


def _purge_stale(leases: Leases) -> None:
    for address in leases.stale():
        _drop(leases, address)


def _teardown_if_unused(leases: Leases) -> None:
    """No container left on the bridge: remove it and its NAT rules."""
    if leases.leases:
        return
    links.nat_down(leases.bridge)
    links.delete_link(leases.bridge)


def _bridge_up(cfg: BridgeConfig) -> None:
    if not links.link_exists(cfg.name):
        links.ip("link", "add", cfg.name, "type", "bridge")
    addr = f"{cfg.gateway}/{cfg.prefix_len}"
    if addr not in links.ip("-o", "-4", "addr", "show", "dev", cfg.name):
        links.ip("addr", "add", addr, "dev", cfg.name)
    links.ip("link", "set", cfg.name, "up")
    links.enable_ip_forward()
    links.nat_up(cfg.name, cfg.subnet)


# --- a container's attachment ----------------------------------------------------------------


@dataclass
class Attachment:
    """A container on the bridge: its network namespace (*ns_fd*, ours to close once
    PID 1 has joined it) and what the record keeps."""

    cfg: BridgeConfig
    cid: str
    ns_fd: int
    address: str
    veth: str

    def to_dict(self) -> dict:
        return {
            "mode": "bridge",
            "address": self.address,
            "prefix_len": self.cfg.prefix_len,
            "gateway": self.cfg.gateway,
            "mac": mac_of(self.address),
            "bridge": self.cfg.name,
            "subnet": self.cfg.subnet,
            "veth": self.veth,
            "ports": [],
        }

    def close_ns(self) -> None:
        if self.ns_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.ns_fd)
            self.ns_fd = -1


def attach(cfg: BridgeConfig, cid: str, owner_pid: int, owner_start: int) -> Attachment:
    """Put container *cid* on the bridge (module doc). The lease is owned by the process
    *owner_pid* started at *owner_start* (the monitor). On an error nothing is left."""
    veth = veth_name(cid)
    with _locked(cfg) as leases:
        _purge_stale(leases)
        if leases.subnet != cfg.subnet and leases.leases:
            raise NetError(
                f"bridge {cfg.name} is in use with subnet {leases.subnet}, not {cfg.subnet}: stop its containers first"
            )
        leases.subnet = cfg.subnet
        for old in leases.owned(cid):  # a restart whose last monitor died
            _drop(leases, old)
        links.delete_link(veth)
        address = leases.free_address(cfg.network)
        leases.leases[address] = {"cid": cid, "veth": veth, "pid": owner_pid, "start": owner_start}
        ns_fd = -1
        try:
            _bridge_up(cfg)
            ns_fd = links.new_netns()
            # made inside the namespace, its peer sent to ours (iproute2 takes a pid for
            # that, not a namespace fd): eth0 is never seen in the host's namespace
            links.ip_batch_in(
                ns_fd, [f"link add eth0 address {mac_of(address)} type veth peer name {veth} netns {os.getpid()}"]
            )
            links.ip("link", "set", veth, "master", cfg.name, "up")
            links.ip_batch_in(
                ns_fd,
                [
                    "link set lo up",
                    f"addr add {address}/{cfg.prefix_len} dev eth0",
                    "link set eth0 up",
                    f"route add default via {cfg.gateway} dev eth0",
                ],
            )
        except BaseException:
            if ns_fd >= 0:
                os.close(ns_fd)
            _drop(leases, address)
            _teardown_if_unused(leases)
            raise
        return Attachment(cfg, cid, ns_fd, address, veth)


def detach(bridge: str, subnet: str, cid: str) -> None:
    """Free container *cid*'s address on *bridge* and delete its veth (and stale
    leases); the bridge and its rules go with the last lease. Idempotent."""
    cfg = BridgeConfig(bridge, subnet)
    with _locked(cfg) as leases:
        for address in leases.owned(cid):
            _drop(leases, address)
        links.delete_link(veth_name(cid))
        _purge_stale(leases)
        _teardown_if_unused(leases)


def detach_record(net: dict | None, cid: str) -> None:
    """:func:`detach` for a record's ``net`` (``rm``, or the cleanup of a dead container)."""
    if not net or net.get("mode") != "bridge" or not net.get("bridge"):
        return
    bridge = str(net["bridge"])
    if not _IFNAME_RE.match(bridge):
        return
    detach(bridge, str(net.get("subnet") or DEFAULT_SUBNET), cid)
