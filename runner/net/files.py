"""The texts of a container's /etc/hosts and /etc/resolv.conf, as docker writes them.

Pure functions (runner/plan.py plans them; the monitor writes /etc/hosts again once the
bridge has given the container its address).
"""

from __future__ import annotations

import ipaddress

#: docker's fallback when the host names only loopback resolvers (systemd-resolved's
#: 127.0.0.53, a local dnsmasq): they cannot be reached from a bridge network
FALLBACK_DNS = ("8.8.8.8", "8.8.4.4")


def hosts_text(
    hostname: str,
    network: str,
    add_hosts: tuple[tuple[str, str], ...] | list[tuple[str, str]] = (),
    *,
    address: str | None = None,
    gateway: str | None = None,
    host_text: str = "",
) -> str:
    """/etc/hosts: with ``--net host`` the host's own file; otherwise localhost, the
    ``--add-host`` lines (``host-gateway`` = *gateway*, the bridge's address), then the
    container's own address and hostname (``127.0.0.1`` without a network)."""
    extra = "".join(f"{gateway if ip == 'host-gateway' else ip}\t{name}\n" for name, ip in add_hosts)
    if network == "host":
        return host_text + ("" if not host_text or host_text.endswith("\n") else "\n") + extra
    text = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n" + extra
    if network == "bridge":
        if address:
            text += f"{address}\t{hostname}\n"
    else:
        text += f"127.0.0.1\t{hostname}\n"
    return text


def _is_loopback(server: str) -> bool:
    try:
        return ipaddress.ip_address(server.split("%")[0]).is_loopback
    except ValueError:
        return False


def resolv_text(
    host_text: str, network: str, dns: tuple[str, ...] | list[str] = (), *, resolvers: tuple[str, ...] = ()
) -> str:
    """/etc/resolv.conf: the host's (its search and options lines kept); on a bridge
    without the host's loopback resolvers, docker's fallback if none is left, or the
    network's own *resolvers* (slirp4netns's forwarder); ``--dns`` replaces the name
    servers."""
    lines = host_text.splitlines()
    servers = [ln.split()[1] for ln in lines if ln.split()[:1] == ["nameserver"] and len(ln.split()) > 1]
    others = [ln for ln in lines if ln.split()[:1] != ["nameserver"]]
    if dns:
        servers = list(dns)
    elif resolvers:
        servers = list(resolvers)
    elif network == "bridge":
        servers = [s for s in servers if not _is_loopback(s)] or list(FALLBACK_DNS)
    else:  # none, host: the host's file as it is
        return host_text
    body = [ln for ln in others if ln.strip()]
    return "".join(f"{ln}\n" for ln in body) + "".join(f"nameserver {s}\n" for s in servers)
