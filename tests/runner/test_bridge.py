"""Bridge networking as root (issue 20): real containers, real traffic.

Every test's runtime runs in a private network namespace (helpers/netns.py): the
bridge ``pyoverlay0``, pyoverlay's nftables table and ip_forward are that namespace's
own, and traffic only goes to its loopback, the containers' own addresses, and (the NAT
test) a second private namespace playing the outside. After each test nothing of a
container may be left in the namespace: no link but ``lo``, no address, no nftables
table, no allocator lease (as well as the usual: container, mount, cgroup, process).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import containers, netns
from helpers.containers import describe

pytestmark = [pytest.mark.fuse, pytest.mark.needs_root]

PAGE = "served from the container\n"


@pytest.fixture
def brt(tmp_path, ns):
    rt = netns.NetnsRuntime(tmp_path / "rt", ns)
    with containers.leftover_check(rt):
        yield rt
    assert_nothing_left(rt)


@pytest.fixture
def www(tmp_path):
    return netns.web_root(tmp_path / "www", PAGE)


assert_nothing_left = netns.assert_nothing_left
leases = netns.leases


def veths(rt) -> list[str]:
    """The host ends of the containers' veth pairs (``pyov`` + 11 hex digits of the id)."""
    return [n for n in rt.ns.links() if n.startswith("pyov") and n != "pyoverlay0"]


def record(rt, cid: str) -> dict:
    with open(rt.state / "containers" / cid / "state.json") as f:
        return json.load(f)


def http_get(rt, url: str, timeout: float = 60) -> str:
    """wget *url* from the host side (the test's namespace), retried until it answers."""
    deadline = time.monotonic() + timeout
    while True:
        r = rt.ns.run("wget", "-q", "-T", "10", "-t", "1", "-O", "-", url, check=False, timeout=30)
        if r.returncode == 0:
            return r.stdout
        if time.monotonic() > deadline:
            raise AssertionError(f"wget {url}: {r.returncode}\n{r.stderr}")
        time.sleep(0.2)


#: an HTTP GET from inside a container, retried (busybox's static wget crashes on
#: Debian: its nc speaks HTTP/1.0 instead)
GET_IN_CONTAINER = (
    "for i in $(seq 60); do"
    " printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' | nc {addr} {port} > /tmp/out"
    " && grep -q ' 200 ' /tmp/out && cat /tmp/out && exit 0; sleep 0.5; done; exit 1"
)


def body(response: str) -> str:
    return response.replace("\r\n", "\n").split("\n\n", 1)[1]


def refused(rt, host: str, port: int) -> bool:
    """Nothing listens on host:port in the test's namespace."""
    code = (
        "import socket\n"
        f"try:\n socket.create_connection(({host!r}, {port}), 10)\n"
        "except ConnectionRefusedError:\n print('refused')"
    )
    return rt.ns.run(sys.executable, "-c", code).stdout.strip() == "refused"


def httpd(rt, www, *opts) -> str:
    return rt.detach(*opts, "-v", f"{www}:/www:ro", rt.image, "httpd", "-f", "-p", "80", "-h", "/www")


@pytest.fixture(autouse=True)
def _image(brt, img):
    brt.image = img.spec


def ps_row(rt, cid: str) -> dict:
    row = rt.find(cid)
    assert row is not None, rt.ps()
    return row


# --------------------------------------------------------------------------
# the container's network
# --------------------------------------------------------------------------


def test_bridge_is_roots_default_with_address_route_and_files(brt):
    r = brt.run("--rm", brt.image, "sh", "-c", "ip -o -4 addr show dev eth0; ip route; cat /etc/hosts; hostname")
    assert r.returncode == 0, describe(r)
    out = r.stdout
    assert " inet 10.203.0.2/16 " in out, out
    assert "default via 10.203.0.1 dev eth0" in out, out
    hostname = out.split()[-1]
    assert f"10.203.0.2\t{hostname}\n" in out, out


def test_dns_and_add_host_in_the_files(brt):
    r = brt.run(
        "--rm",
        "--dns", "192.0.2.53",
        "--dns", "192.0.2.54",
        "--add-host", "db:192.0.2.7",
        "--add-host", "gw:host-gateway",
        "-h", "box",
        brt.image, "sh", "-c", "cat /etc/resolv.conf; echo ---; cat /etc/hosts",
    )  # fmt: skip
    assert r.returncode == 0, describe(r)
    resolv, hosts = r.stdout.split("---\n")
    assert [ln for ln in resolv.splitlines() if ln.startswith("nameserver")] == [
        "nameserver 192.0.2.53",
        "nameserver 192.0.2.54",
    ], resolv
    assert "192.0.2.7\tdb\n" in hosts and "10.203.0.1\tgw\n" in hosts, hosts
    assert hosts.endswith("10.203.0.2\tbox\n"), hosts


def test_published_port_serves_the_containers_file(brt, www):
    cid = httpd(brt, www, "-p", "127.0.0.1:8080:80")
    assert http_get(brt, "http://127.0.0.1:8080/index.html") == PAGE
    row = ps_row(brt, cid)
    assert row["address"] == "10.203.0.2" and row["ports"] == ["127.0.0.1:8080->80/tcp"], row
    head, line = brt.ok("ps").stdout.splitlines()
    assert head.split()[-2:] == ["ADDRESS", "PORTS"], head
    assert line.split()[-2:] == ["10.203.0.2", "127.0.0.1:8080->80/tcp"], line
    # exec joins the container's network namespace
    assert containers.interfaces(brt.ok("exec", cid, "cat", "/proc/net/dev").stdout) == ["lo", "eth0"]
    # the host sees the bridge, the veth and the rules while the container runs
    assert "pyoverlay0" in brt.ns.links() and any(n.startswith("pyov" + cid[:11]) for n in brt.ns.links())
    assert "table ip pyoverlay" in brt.ns.nft_tables()

    brt.ok("stop", cid)
    assert refused(brt, "127.0.0.1", 8080), "the published port must be gone after stop"
    assert ps_row(brt, cid)["ports"] == []
    brt.ok("rm", cid)


def test_host_port_0_is_a_free_port_and_recorded(brt, www):
    cid = httpd(brt, www, "-p", "127.0.0.1::80")
    (port,) = ps_row(brt, cid)["ports"]
    host, _, rest = port.partition("->")
    bound = int(host.rsplit(":", 1)[1])
    assert bound > 0 and rest == "80/tcp", port
    assert http_get(brt, f"http://127.0.0.1:{bound}/index.html") == PAGE
    brt.ok("rm", "-f", cid)


def test_proxy_relays_a_large_file_intact(brt, www, tmp_path):
    data = os.urandom(3 * 1024 * 1024 + 17)
    (www / "big.bin").write_bytes(data)
    cid = httpd(brt, www, "-p", "127.0.0.1:8080:80")
    http_get(brt, "http://127.0.0.1:8080/index.html")  # up
    out = tmp_path / "got.bin"
    brt.ns.run("wget", "-q", "-T", "60", "-t", "1", "-O", str(out), "http://127.0.0.1:8080/big.bin", timeout=120)
    assert out.read_bytes() == data
    brt.ok("rm", "-f", cid)


def test_proxy_does_not_stall_on_an_idle_connection(brt, www):
    cid = httpd(brt, www, "-p", "127.0.0.1:8080:80")
    assert http_get(brt, "http://127.0.0.1:8080/index.html") == PAGE
    # a client that connects and says nothing, held open in the namespace
    idle = brt.ns.popen(
        sys.executable,
        "-c",
        "import socket,time\ns=socket.create_connection(('127.0.0.1',8080))\nprint('ok',flush=True)\ntime.sleep(600)",
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert idle.stdout.readline().strip() == "ok"
        for _ in range(3):
            assert http_get(brt, "http://127.0.0.1:8080/index.html", timeout=30) == PAGE
    finally:
        idle.kill()
        idle.wait()
    brt.ok("rm", "-f", cid)


def test_udp_port_is_forwarded(brt):
    # busybox has no UDP server: the test's own echo server runs in the container's
    # network namespace (nsenter), on its address; the reply comes back through the
    # published port
    cid = brt.detach("-p", "127.0.0.1:5353:5353/udp", brt.image, "sleep", "1000")
    rec = record(brt, cid)
    echo = (
        "import socket\n"
        f"s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.bind(({rec['net']['address']!r},5353))\n"
        "print('up',flush=True)\n"
        "while True:\n"
        "  d,a=s.recvfrom(100); s.sendto(b'got-'+d,a)\n"
    )
    server = subprocess.Popen(
        ["nsenter", f"--net=/proc/{rec['pid']}/ns/net", "--", sys.executable, "-c", echo],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout.readline().strip() == "up"
        code = (
            "import socket\n"
            "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.settimeout(30)\n"
            "s.sendto(b'ping',('127.0.0.1',5353)); print(s.recvfrom(100)[0].decode())\n"
        )
        out = brt.ns.run(sys.executable, "-c", code, timeout=120).stdout
        assert out.strip() == "got-ping", out
    finally:
        server.kill()
        server.wait()
    assert ps_row(brt, cid)["ports"] == ["127.0.0.1:5353->5353/udp"]
    brt.ok("rm", "-f", cid)


def test_two_containers_reach_each_other_by_address(brt, www):
    web = httpd(brt, www)
    addr = ps_row(brt, web)["address"]
    r = brt.run("--rm", brt.image, "sh", "-c", GET_IN_CONTAINER.format(addr=addr, port=80, path="/index.html"))
    assert r.returncode == 0, describe(r)
    assert body(r.stdout) == PAGE
    brt.ok("rm", "-f", web)


@pytest.mark.parametrize("firewall", ["nft", "iptables"])
def test_outbound_nat_masquerades_with_the_hosts_address(brt, tmp_path, firewall):
    # "the outside": a second private namespace at 192.0.2.2, linked to the test's
    # namespace (the host, 192.0.2.1), with no route back to the bridge's subnet: only a
    # masqueraded connection can be answered
    if firewall == "iptables":  # the fallback where nft is missing
        brt.env["PYOVERLAY_NO_NFT"] = "1"
    outside = netns.NetNS()
    server = None
    try:
        netns.link(brt.ns, outside, "192.0.2.1", "192.0.2.2")
        code = (
            "import http.server\n"
            "class H(http.server.BaseHTTPRequestHandler):\n"
            "  def do_GET(self):\n"
            "    b=self.client_address[0].encode(); self.send_response(200)\n"
            "    self.send_header('Content-Length',str(len(b))); self.end_headers(); self.wfile.write(b)\n"
            "  def log_message(self,*a): pass\n"
            "s=http.server.HTTPServer(('192.0.2.2',8000),H); print('up',flush=True); s.serve_forever()\n"
        )
        server = outside.popen(sys.executable, "-c", code, stdout=subprocess.PIPE, text=True)
        assert server.stdout.readline().strip() == "up"
        r = brt.run("--rm", brt.image, "sh", "-c", GET_IN_CONTAINER.format(addr="192.0.2.2", port=8000, path="/"))
        assert r.returncode == 0, describe(r)
        assert body(r.stdout) == "192.0.2.1", "the outside must see the host's address (masquerade)"
        if firewall == "iptables":
            assert "pyoverlay" not in brt.ns.nft_tables()
    finally:
        if server is not None:
            server.kill()
            server.wait()
        outside.close()  # its end of the veth pair goes with it, and ours with it
    deadline = time.monotonic() + 30
    while "vout" in brt.ns.links() and time.monotonic() < deadline:
        time.sleep(0.1)


# --------------------------------------------------------------------------
# errors and cleanup
# --------------------------------------------------------------------------


def test_port_in_use_is_125_and_leaves_nothing(brt, www):
    first = httpd(brt, www, "-p", "127.0.0.1:8080:80")
    r = brt.run("--rm", "-p", "127.0.0.1:8080:80", brt.image, "true")
    assert r.returncode == 125, describe(r)
    assert len(r.stderr.strip().splitlines()) == 1 and "8080" in r.stderr and "in use" in r.stderr, r.stderr
    assert [c["id"] for c in brt.ps()] == [first]
    assert list(leases(brt).values())[0]["cid"] == first and len(leases(brt)) == 1
    assert veths(brt) == ["pyov" + first[:11]]
    brt.ok("rm", "-f", first)


def test_publish_with_network_none_is_refused(brt):
    r = brt.run("--rm", "--network", "none", "-p", "80", brt.image, "true")
    assert r.returncode == 125, describe(r)
    assert len(r.stderr.strip().splitlines()) == 1 and "publish" in r.stderr, r.stderr
    assert brt.state_entries() == []


def test_publish_with_network_host_is_a_warning(brt):
    r = brt.run("--rm", "--network", "host", "-p", "80", brt.image, "true")
    assert r.returncode == 0, describe(r)
    assert "Published ports are discarded when using host network mode" in r.stderr


def _kill_monitor(brt, cid: str) -> dict:
    rec = record(brt, cid)
    os.kill(rec["monitor_pid"], signal.SIGKILL)
    assert containers.wait_gone(rec["pid"], 30), "PID 1 must die with its monitor"
    assert containers.wait_gone(rec["net"]["proxy_pid"], 30), "the proxy must die with its monitor"
    return rec


def test_sigkilled_monitor_then_rm_leaves_nothing(brt, www):
    cid = httpd(brt, www, "-p", "127.0.0.1:8080:80")
    assert http_get(brt, "http://127.0.0.1:8080/index.html") == PAGE
    _kill_monitor(brt, cid)
    assert cid in [lease["cid"] for lease in leases(brt).values()], "the dead monitor's lease is still there"
    assert refused(brt, "127.0.0.1", 8080)
    brt.ok("rm", cid)  # the fixture checks that nothing is left


def test_sigkilled_monitor_is_cleaned_at_the_next_run(brt, www):
    cid = httpd(brt, www, "-p", "127.0.0.1:8080:80")
    old = _kill_monitor(brt, cid)
    # the next run on the bridge frees the stale address (and its veth, if the kernel
    # has not removed it with the namespace yet): the new container gets the same one
    r = brt.run("--rm", brt.image, "sh", "-c", "ip -o -4 addr show dev eth0")
    assert r.returncode == 0, describe(r)
    assert f" inet {old['net']['address']}/16 " in r.stdout, r.stdout
    assert not leases(brt)
    assert not veths(brt)
    brt.ok("rm", cid)


def test_failed_start_releases_the_network(brt, www):
    # the command is not found after the network was set up: everything is undone
    # (the fixture checks the namespace), and the port can be published again
    r = brt.run("-p", "127.0.0.1:8080:80", brt.image, "no-such-command")
    assert r.returncode == 127, describe(r)
    assert brt.state_entries() == [] and not leases(brt)
    cid = httpd(brt, www, "-p", "127.0.0.1:8080:80")
    assert http_get(brt, "http://127.0.0.1:8080/index.html") == PAGE
    brt.ok("rm", "-f", cid)
