"""Rootless networking (docs/runner.md, "Rootless networking"): an ordinary user's container
gets a network namespace of its own, owned by its user namespace, with slirp4netns on the
host side (runner/net/slirp.py); ``-p`` goes through slirp4netns's API.

Everything runs for real as the user ``pyoverlay-test``: a busybox httpd in the container
answers the test on 127.0.0.1 through the published port; the container reaches a server
the test runs on the host's loopback through 10.0.2.2 (with ``allow_host_loopback``). All
traffic stays on loopback. The ``user`` fixture fails a test that leaves one of the user's
processes (slirp4netns included) or mounts behind."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from helpers.rootless import VENV_BIN, busybox_image
from runner.net import slirp
from runner.net.ports import parse_publishes
from runner.plan import PlanError
from runner.plan import build as build_plan
from runner.spec import RunSpec, SpecError, parse_network

pytestmark = pytest.mark.slow

TOKEN = "served-from-the-container-7f3a"


@pytest.fixture(autouse=True)
def _slirp4netns():
    if slirp.shutil.which(slirp.BINARY) is None:
        pytest.fail("slirp4netns is missing (scripts/setup installs it)")


@pytest.fixture
def image(user) -> Path:
    return busybox_image(user, "busybox", owned_by_user=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fetch(port: int, path: str = "/index.html", timeout: float = 60) -> str:
    """GET http://127.0.0.1:PORT/PATH, retried until the container's server answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
                return r.read().decode()
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def refused(port: int) -> bool:
    """Nothing listens on 127.0.0.1:PORT any more."""
    with socket.socket() as s:
        s.settimeout(10)
        try:
            s.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            return True
        return False


def slirp_procs(user) -> list[int]:
    """This test's slirp4netns processes (the user's, tagged)."""
    out = []
    for pid in user.processes():
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().strip() == "slirp4netns":
                out.append(pid)
    return out


def wait_no_slirp(user, timeout: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := slirp_procs(user)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def sockets_left(user) -> list[str]:
    data = user.data_dir / "containers"
    return [str(p) for p in data.rglob(slirp.SOCKET_NAME)] if data.is_dir() else []


def httpd(user, image, *publish: str, name: str = "web") -> str:
    """A detached busybox httpd serving TOKEN at /index.html on port 80; its id."""
    args = [a for p in publish for a in ("-p", p)]
    r = user.pyoverlay(
        "run",
        "-d",
        "--name",
        name,
        *args,
        image,
        "sh",
        "-c",
        f"mkdir -p /www && echo {TOKEN} > /www/index.html && exec httpd -f -p 80 -h /www",
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def ps_json(user) -> list[dict]:
    return json.loads(user.pyoverlay("ps", "-a", "--json", check=True).stdout)


def record(user, cid: str) -> dict:
    return json.loads((user.state_dir / "containers" / cid / "state.json").read_text())


# --- the published port ----------------------------------------------------------------------


def test_httpd_published_port_answers_the_host_and_is_gone_after_stop(user, image):
    """`-p 127.0.0.1:PORT:80` and `-p 127.0.0.1::80` (a free port, picked and recorded):
    the container's httpd answers on both with the file it serves; ps shows both; after
    stop nothing listens, slirp4netns and its socket are gone; after rm nothing is left."""
    port = free_port()
    cid = httpd(user, image, f"127.0.0.1:{port}:80", "127.0.0.1::80")
    assert fetch(port).strip() == TOKEN

    (row,) = ps_json(user)
    assert row["ports"][0] == f"127.0.0.1:{port}->80/tcp"
    other = row["ports"][1]
    assert other.startswith("127.0.0.1:") and other.endswith("->80/tcp"), row["ports"]
    picked = int(other.split(":")[1].split("->")[0])
    assert picked not in (0, port)
    assert fetch(picked).strip() == TOKEN
    net = record(user, cid)["net"]
    assert (net["mode"], net["address"], net["gateway"]) == ("slirp4netns", "10.0.2.100", "10.0.2.2")
    assert [p["host_port"] for p in net["ports"]] == [port, picked]

    head, line = user.pyoverlay("ps", check=True).stdout.splitlines()
    assert head.split()[-1] == "PORTS"
    assert line.endswith(f"  127.0.0.1:{port}->80/tcp, {other}"), line
    assert len(slirp_procs(user)) == 1
    assert len(sockets_left(user)) == 1

    user.pyoverlay("stop", "-t", "2", "web", check=True)
    assert refused(port) and refused(picked)
    assert wait_no_slirp(user) == []
    assert sockets_left(user) == []
    (row,) = ps_json(user)
    assert (row["status"], row["ports"]) == ("exited", [])
    user.pyoverlay("rm", "web", check=True)
    assert ps_json(user) == []


def test_port_in_use_is_a_one_line_error_and_leaves_nothing(user, image):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        r = user.pyoverlay("run", "--rm", "-p", f"127.0.0.1:{port}:80", image, "true")
        assert r.returncode == 125, r.stderr
        assert r.stderr.count("\n") == 1, r.stderr
        assert f"127.0.0.1:{port}->80/tcp" in r.stderr and "address already in use" in r.stderr, r.stderr
    assert ps_json(user) == []
    assert wait_no_slirp(user) == []
    assert list((user.data_dir / "containers").iterdir()) == []


def test_sigkill_of_the_monitor_ends_slirp4netns_and_rm_leaves_nothing(user, image):
    port = free_port()
    cid = httpd(user, image, f"127.0.0.1:{port}:80")
    assert fetch(port).strip() == TOKEN
    assert len(slirp_procs(user)) == 1
    os.kill(record(user, cid)["monitor_pid"], signal.SIGKILL)
    assert wait_no_slirp(user) == []  # its exit fd: the monitor's end closed with it
    deadline = time.monotonic() + 30
    while not refused(port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert refused(port)
    user.pyoverlay("rm", "-f", "web", check=True)
    assert ps_json(user) == []
    assert sockets_left(user) == []
    assert not (user.data_dir / "containers" / cid).exists()


# --- what the container sees, outbound -------------------------------------------------------


class _Files(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        body = f"host-side {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def host_server():
    """An HTTP server of the test on the host's loopback only; its port."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()
    t.join()


def test_container_network_and_host_loopback_through_the_gateway(user, image, host_server):
    """The container's own namespace: tap0 10.0.2.100, the default route via 10.0.2.2,
    slirp's DNS in resolv.conf; with allow_host_loopback it reaches a server on the host's
    127.0.0.1 through 10.0.2.2 (outbound through slirp4netns)."""
    url = f"http://10.0.2.2:{host_server}/from-container"
    r = user.pyoverlay(
        "run",
        "--rm",
        "--network",
        "slirp4netns:allow_host_loopback=true",
        image,
        "sh",
        "-c",
        f"ip -o -4 addr show tap0; ip route; cat /etc/resolv.conf; wget -q -O - {url}",
    )
    assert r.returncode == 0, r.stderr
    assert "inet 10.0.2.100/24" in r.stdout
    assert "default via 10.0.2.2 dev tap0" in r.stdout
    assert "nameserver 10.0.2.3" in r.stdout
    assert "host-side /from-container" in r.stdout
    assert wait_no_slirp(user) == []


def test_host_loopback_is_closed_by_default(user, image, host_server):
    """The default network (bridge = slirp4netns) runs with --disable-host-loopback: the
    same server is unreachable; --dns and --add-host land in the container's files."""
    r = user.pyoverlay(
        "run",
        "--rm",
        "--dns",
        "10.0.2.3",
        "--dns",
        "192.0.2.53",
        "--add-host",
        "db:192.0.2.7",
        "--add-host",
        "gw:host-gateway",
        image,
        "sh",
        "-c",
        f"cat /etc/resolv.conf /etc/hosts; ip -o -4 addr show tap0;"
        f" if nc -w 5 10.0.2.2 {host_server} </dev/null; then echo REACHED; else echo UNREACHABLE; fi",
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[:2] == ["nameserver 10.0.2.3", "nameserver 192.0.2.53"]
    assert "192.0.2.7\tdb" in out and "10.0.2.2\tgw" in out
    assert "inet 10.0.2.100/24" in r.stdout
    assert out[-1] == "UNREACHABLE"


def test_network_none_stays_only_lo(user, image):
    r = user.pyoverlay("run", "--rm", "--network", "none", image, "cat", "/proc/net/dev")
    assert r.returncode == 0, r.stderr
    assert [line.split(":")[0].strip() for line in r.stdout.splitlines()[2:]] == ["lo"]
    assert wait_no_slirp(user) == []


# --- errors ---------------------------------------------------------------------------------


def test_missing_slirp4netns_is_a_one_line_error(user, image):
    """Without slirp4netns on PATH: 125, one line naming the package and --network none
    (which still runs)."""
    (bin_dir,) = user.mkdirs("bin")  # setpriv only (the test runs the user's commands with it)
    (bin_dir / "setpriv").symlink_to(slirp.shutil.which("setpriv") or "/usr/bin/setpriv")
    env = {"PATH": f"{VENV_BIN}:{bin_dir}"}  # no /usr/bin: no slirp4netns (nor newuidmap: single map)
    r = user.pyoverlay("run", "--rm", "--userns-map", "single", image, "true", env=env)
    assert r.returncode == 125, r.stderr
    assert r.stderr.count("\n") == 1, r.stderr
    assert "slirp4netns" in r.stderr and "--network none" in r.stderr
    r = user.pyoverlay("run", "--rm", "--userns-map", "single", "--network", "none", image, "true", env=env)
    assert r.returncode == 0, r.stderr
    assert ps_json(user) == []


def test_bad_network_options_are_refused(user, image):
    r = user.pyoverlay("run", "--rm", "--network", "slirp4netns:mtu=9", image, "true")
    assert r.returncode == 125
    assert "allow_host_loopback" in r.stderr and r.stderr.count("\n") == 1
    r = user.pyoverlay("run", "--rm", "-p", "[::1]:8080:80", image, "true")
    assert r.returncode == 125
    assert "IPv4" in r.stderr and r.stderr.count("\n") == 1
    r = user.pyoverlay("run", "--rm", "--network", "none", "-p", "8080:80", image, "true")
    assert r.returncode == 125 and r.stderr.count("\n") == 1
    assert ps_json(user) == []


def test_slirp4netns_network_is_refused_for_root(tmp_path):
    """Planning only (reads only): ``--network slirp4netns`` is a rootless network."""
    layer = tmp_path / "layer"
    layer.mkdir()
    assert parse_network("slirp4netns:allow_host_loopback=true") == "slirp4netns:allow_host_loopback=true"
    with pytest.raises(SpecError):
        parse_network("slirp4netns:nope=1")
    spec = RunSpec(layers=(str(layer),), argv=["true"], network="slirp4netns", publish=parse_publishes(["80"]))
    with pytest.raises(PlanError, match="rootless"):
        build_plan(spec, rootless=False)
