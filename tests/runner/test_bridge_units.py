"""Bridge networking's pure parts (issue 20): /etc/hosts and /etc/resolv.conf as docker
writes them, the bridge's configuration, docker's ps PORTS format."""

from __future__ import annotations

import pytest

from runner import control
from runner.net import bridge, files
from runner.net.ports import PortMapping

HOST_RESOLV = "# generated\nsearch example.org\nnameserver 127.0.0.53\noptions edns0 trust-ad\n"


def test_resolv_conf_on_a_bridge_replaces_loopback_resolvers_with_dockers_fallback():
    text = files.resolv_text(HOST_RESOLV, "bridge")
    assert "nameserver 127.0.0.53" not in text
    assert text.endswith("nameserver 8.8.8.8\nnameserver 8.8.4.4\n"), text
    assert "search example.org\n" in text and "options edns0 trust-ad\n" in text


def test_resolv_conf_keeps_reachable_resolvers_and_dns_replaces_them():
    mixed = HOST_RESOLV + "nameserver 192.0.2.10\n"
    assert files.resolv_text(mixed, "bridge").endswith("options edns0 trust-ad\nnameserver 192.0.2.10\n")
    assert files.resolv_text(mixed, "none") == mixed  # no network: the host's file as it is
    assert files.resolv_text(mixed, "host") == mixed
    for net in ("bridge", "none", "host"):
        text = files.resolv_text(mixed, net, ("192.0.2.53",))
        assert [ln for ln in text.splitlines() if ln.startswith("nameserver")] == ["nameserver 192.0.2.53"], net


def test_hosts_file_by_network():
    add = (("db", "192.0.2.7"), ("gw", "host-gateway"))
    text = files.hosts_text("box", "bridge", add, address="10.203.0.5", gateway="10.203.0.1")
    assert text.splitlines()[-3:] == ["192.0.2.7\tdb", "10.203.0.1\tgw", "10.203.0.5\tbox"]
    assert text.startswith("127.0.0.1\tlocalhost\n")
    assert files.hosts_text("box", "none", add, gateway="10.203.0.1").endswith("127.0.0.1\tbox\n")
    host = files.hosts_text("box", "host", add, gateway="10.203.0.1", host_text="127.0.0.1 localhost")
    assert host == "127.0.0.1 localhost\n192.0.2.7\tdb\n10.203.0.1\tgw\n"


def test_bridge_config_from_the_environment(monkeypatch):
    monkeypatch.delenv("PYOVERLAY_BRIDGE", raising=False)
    monkeypatch.delenv("PYOVERLAY_BRIDGE_SUBNET", raising=False)
    cfg = bridge.config()
    assert (cfg.name, cfg.subnet, cfg.gateway, cfg.prefix_len) == ("pyoverlay0", "10.203.0.0/16", "10.203.0.1", 16)
    monkeypatch.setenv("PYOVERLAY_BRIDGE", "pyotest1")
    monkeypatch.setenv("PYOVERLAY_BRIDGE_SUBNET", "192.168.77.0/24")
    cfg = bridge.config()
    assert (cfg.name, cfg.gateway) == ("pyotest1", "192.168.77.1")
    for name, subnet in (("a" * 16, "10.0.0.0/24"), ("bad name", "10.0.0.0/24"), ("b", "10.0.0.1/24"), ("b", "x")):
        monkeypatch.setenv("PYOVERLAY_BRIDGE", name)
        monkeypatch.setenv("PYOVERLAY_BRIDGE_SUBNET", subnet)
        with pytest.raises(bridge.NetError):
            bridge.config()


def test_allocator_skips_the_gateway_and_used_addresses():
    import ipaddress

    leases = bridge.Leases("b", "10.9.0.0/29", {"10.9.0.2": {}, "10.9.0.3": {}})
    assert leases.free_address(ipaddress.IPv4Network("10.9.0.0/29")) == "10.9.0.4"
    leases.leases.update({f"10.9.0.{i}": {} for i in (4, 5, 6)})
    with pytest.raises(bridge.NetError, match="no free address"):
        leases.free_address(ipaddress.IPv4Network("10.9.0.0/29"))
    # a lease whose owner is not that process any more is stale
    assert set(leases.stale()) == set(leases.leases)


def test_ps_ports_column_is_dockers_format():
    assert str(PortMapping("127.0.0.1", 8080, 80, "tcp")) == "127.0.0.1:8080->80/tcp"
    row = dict(
        id="a" * 64, name="web", command=["httpd"], status="running", pid=4, layers=["/l"], upper="/u",
        created=0.0, finished=None, exit_code=None, address="10.203.0.2",
        ports=["127.0.0.1:8080->80/tcp", "0.0.0.0:5353->53/udp"],
    )  # fmt: skip
    head, line = control.ps_table([row], 10.0).splitlines()
    assert head.split()[-2:] == ["ADDRESS", "PORTS"]
    assert line.endswith("10.203.0.2  127.0.0.1:8080->80/tcp, 0.0.0.0:5353->53/udp"), line
