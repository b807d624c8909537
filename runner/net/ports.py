"""Published ports and the other network options, parsed as docker spells them.

Pure parsing, no side effects: ``-p [IP:][HOST:]CTR[/tcp|udp]`` (ranges ``A-B`` on both
sides, of the same length), ``--dns IP``, ``--add-host NAME:IP``. Every error is a
:class:`runner.errors.SpecError` one-liner (exit status 125).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from ..errors import SpecError

PROTOS = ("tcp", "udp")
_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?$")


class NetOptionError(SpecError):
    """A malformed network option (one line; exit status 125)."""


@dataclass(frozen=True)
class PortMapping:
    """One published port: *host_ip*:*host_port* on the host to *container_port* inside.

    *host_ip* "" means every address (docker's 0.0.0.0); *host_port* 0 means a free port
    chosen when it is published (docker's ``-p 80``)."""

    host_ip: str
    host_port: int
    container_port: int
    proto: str = "tcp"

    def __str__(self) -> str:  # docker ps: 127.0.0.1:8080->80/tcp
        ip = self.host_ip or "0.0.0.0"
        host = f"[{ip}]" if ":" in ip else ip
        return f"{host}:{self.host_port}->{self.container_port}/{self.proto}"

    def to_dict(self) -> dict:
        return {
            "host_ip": self.host_ip,
            "host_port": self.host_port,
            "container_port": self.container_port,
            "proto": self.proto,
        }

    @classmethod
    def from_dict(cls, d: dict) -> PortMapping:
        return cls(str(d["host_ip"]), int(d["host_port"]), int(d["container_port"]), str(d.get("proto", "tcp")))


def _port_range(text: str, what: str, spec: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)(?:-(\d+))?", text)
    if not m:
        raise NetOptionError(f"invalid {what} port {text!r} in -p {spec!r}")
    lo = int(m.group(1))
    hi = int(m.group(2)) if m.group(2) is not None else lo
    if not (1 <= lo <= 65535 and 1 <= hi <= 65535) or hi < lo:
        raise NetOptionError(f"invalid {what} port {text!r} in -p {spec!r}: ports are 1-65535")
    return lo, hi


def parse_publish(spec: str) -> list[PortMapping]:
    """``-p`` as docker reads it: ``CTR``, ``HOST:CTR``, ``IP:HOST:CTR``, ``IP::CTR``,
    ``[IPv6]:HOST:CTR``, each with an optional ``/tcp`` or ``/udp``."""
    text, _, proto = spec.partition("/")
    proto = (proto or "tcp").lower()
    if proto not in PROTOS:
        raise NetOptionError(f"invalid protocol {proto!r} in -p {spec!r} (tcp or udp)")
    ip = ""
    if text.startswith("["):  # [::1]:8080:80
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise NetOptionError(f"invalid -p {spec!r}: expected [IPv6]:HOST:CTR")
        ip, rest = text[1:close], text[close + 2 :]
        parts = rest.split(":")
        if len(parts) != 2:
            raise NetOptionError(f"invalid -p {spec!r}: expected [IPv6]:HOST:CTR")
        host, ctr = parts
    else:
        parts = text.split(":")
        if len(parts) == 1:
            host, ctr = "", parts[0]
        elif len(parts) == 2:
            host, ctr = parts
        elif len(parts) == 3:
            ip, host, ctr = parts
        else:
            raise NetOptionError(f"invalid -p {spec!r}: expected [IP:][HOST:]CTR[/tcp|udp]")
    if ip:
        try:
            ip = str(ipaddress.ip_address(ip))
        except ValueError:
            raise NetOptionError(f"invalid host address {ip!r} in -p {spec!r}") from None
        if ip in ("0.0.0.0", "::"):
            ip = ""
    clo, chi = _port_range(ctr, "container", spec)
    if host:
        hlo, hhi = _port_range(host, "host", spec)
        if hhi - hlo != chi - clo:
            raise NetOptionError(f"invalid -p {spec!r}: the host and container ranges differ in length")
    else:
        hlo = hhi = 0
    return [
        PortMapping(ip, (hlo + i) if hlo else 0, clo + i, proto)  # 0: a free port at publish time
        for i in range(chi - clo + 1)
    ]


def parse_publishes(specs: list[str] | tuple[str, ...]) -> tuple[PortMapping, ...]:
    out: list[PortMapping] = []
    for s in specs:
        out.extend(parse_publish(s))
    seen: set[tuple[str, int, str]] = set()
    for p in out:
        if p.host_port:
            key = (p.host_ip, p.host_port, p.proto)
            if key in seen:
                raise NetOptionError(f"host port {p.host_port}/{p.proto} is published twice")
            seen.add(key)
    return tuple(out)


def parse_dns(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise NetOptionError(f"invalid --dns {text!r}: an IP address is expected") from None


def parse_add_host(text: str) -> tuple[str, str]:
    """``NAME:IP`` (docker also takes ``NAME=IP``; the IP may be IPv6). ``host-gateway``
    is resolved by the network (the bridge's address)."""
    sep = "=" if "=" in text else ":"
    name, _, ip = text.partition(sep)
    if not name or not ip or not _HOSTNAME_RE.match(name):
        raise NetOptionError(f"invalid --add-host {text!r}: expected NAME:IP")
    if ip == "host-gateway":
        return name, ip
    ip = ip.strip("[]")
    try:
        return name, str(ipaddress.ip_address(ip))
    except ValueError:
        raise NetOptionError(f"invalid --add-host {text!r}: {ip!r} is not an IP address") from None
