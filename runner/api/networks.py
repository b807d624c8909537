"""The networks a container can join, as dockerd lists them: ``docker network ls`` and
``docker network inspect`` (docs/api.md, "Networks").

pyoverlay has three, fixed (runner/net): ``bridge`` (as root the ``pyoverlay0`` bridge,
its subnet from runner/net/bridge.py; for a user's service slirp4netns, one private
network per container), ``host`` and ``none``. Creating, removing, connecting and
disconnecting networks are dockerd features pyoverlay does not have: those requests fall
through to runner/api/system.py's 501.
"""

from __future__ import annotations

import hashlib
import os

from .. import state
from ..net import bridge as netbridge
from ..net import slirp
from .ctl import rfc3339
from .records import api_state
from .server import ApiError, Request, Router

router = Router()

NAMES = ("bridge", "host", "none")


def network_id(name: str) -> str:
    """A stable 64-hex id per network (dockerd's are random; the CLI shows 12 digits)."""
    return hashlib.sha256(f"pyoverlay network {name}".encode()).hexdigest()


def _ipam(name: str, rootless: bool) -> dict:
    if name != "bridge":
        return {"Driver": "default", "Options": None, "Config": []}
    if rootless:
        return {
            "Driver": "default",
            "Options": None,
            "Config": [{"Subnet": f"10.0.2.0/{slirp.PREFIX_LEN}", "Gateway": slirp.GATEWAY}],
        }
    try:
        cfg = netbridge.config()
    except netbridge.NetError as e:
        raise ApiError(500, str(e)) from None
    return {"Driver": "default", "Options": None, "Config": [{"Subnet": cfg.subnet, "Gateway": cfg.gateway}]}


def _members(name: str) -> dict:
    """The running containers on network *name*, keyed by id, with their endpoint."""
    out = {}
    for rec in state.all_records():
        spec = rec.get("spec") or {}
        if api_state(rec) != "running" or (spec.get("network") or "none") != name:
            continue
        net: dict = rec["net"] if isinstance(rec.get("net"), dict) else {}
        addr = net.get("address") or ""
        out[rec["id"]] = {
            "Name": rec.get("name") or rec["id"][:12],
            "EndpointID": rec["id"] if addr else "",
            "MacAddress": net.get("mac") or "",
            "IPv4Address": f"{addr}/{net.get('prefix_len') or slirp.PREFIX_LEN}" if addr else "",
            "IPv6Address": "",
        }
    return out


def describe(name: str, verbose: bool = True) -> dict:
    rootless = os.geteuid() != 0
    driver = {"bridge": "slirp4netns" if rootless else "bridge", "host": "host", "none": "null"}[name]
    options = {}
    if name == "bridge" and not rootless:
        options = {"com.docker.network.bridge.name": netbridge.config().name}
    out = {
        "Name": name,
        "Id": network_id(name),
        "Created": rfc3339(None),
        "Scope": "local",
        "Driver": driver,
        "EnableIPv6": False,
        "IPAM": _ipam(name, rootless),
        "Internal": False,
        "Attachable": False,
        "Ingress": False,
        "ConfigFrom": {"Network": ""},
        "ConfigOnly": False,
        "Containers": _members(name) if verbose else {},
        "Options": options,
        "Labels": {},
    }
    return out


def find(ref: str) -> str:
    """The network named *ref*, or whose id starts with it; 404 as dockerd."""
    if ref in NAMES:
        return ref
    hits = [n for n in NAMES if ref and network_id(n).startswith(ref)]
    if len(hits) == 1:
        return hits[0]
    raise ApiError(404, f"network {ref} not found")


@router.route("GET", "/networks")
def list_networks(req: Request) -> None:
    req.json([describe(n, verbose=False) for n in NAMES])


@router.route("GET", "/networks/{id}")
def inspect_network(req: Request) -> None:
    req.json(describe(find(req.params["id"])))
