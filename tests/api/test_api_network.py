"""Networks through ``pyoverlay serve``: ``docker run -p`` on the bridge, ``docker port``,
``ps``'s ports, inspect's NetworkSettings, ``docker network ls/inspect``, ``--dns`` and
``--add-host`` (the docker CLI and docker-py). The service runs in a private network
namespace (tests/helpers/netns.py), so the bridge, its firewall table and ip_forward are
that namespace's own; test traffic goes to its loopback only."""

from __future__ import annotations

import json
import os
import socket
import subprocess

import pytest

from helpers import api, netns
from helpers.apipty import wait_for

PAGE = "served through pyoverlay serve\n"


@pytest.fixture
def nrt(tmp_path, ns):
    return netns.NetnsRuntime(tmp_path / "rt", ns)


@pytest.fixture
def nsvc(nrt, tmp_path):
    with api.running(nrt, tmp_path / "svc" / "docker.sock") as svc:
        yield svc
    netns.assert_nothing_left(nrt)


@pytest.fixture
def nimage(nrt, images) -> str:
    api.store_image(nrt, images.bare.layers[0], "busybox:latest")
    return "busybox:latest"


@pytest.fixture
def www(tmp_path):
    return netns.web_root(tmp_path / "www", PAGE)


def fetch(ns: netns.NetNS, port: int, check: bool = True):
    return ns.run("curl", "-sS", "--max-time", "10", f"http://127.0.0.1:{port}/", check=check)


def free_port(ns: netns.NetNS) -> int:
    """A port free in the namespace (nothing listens there but what the test starts)."""
    with socket.socket() as s:  # any number is free in a fresh namespace; one the host has free
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_docker_run_publishes_a_port_on_the_bridge(nsvc, nimage, ns, www):
    port = free_port(ns)
    nsvc.docker_ok(
        "run", "-d", "--name", "web", "-p", f"127.0.0.1:{port}:80", "-v", f"{www}:/www:ro",
        nimage, "httpd", "-f", "-p", "80", "-h", "/www",
    )  # fmt: skip
    wait_for(lambda: fetch(ns, port, check=False).returncode == 0, what="httpd answering")
    assert fetch(ns, port).stdout == PAGE

    ps = nsvc.docker_ok("ps", "--format", "{{.Names}} {{.Ports}}").stdout
    assert f"web 127.0.0.1:{port}->80/tcp" in ps, ps
    assert nsvc.docker_ok("port", "web").stdout.strip() == f"80/tcp -> 127.0.0.1:{port}"
    info = json.loads(nsvc.docker_ok("inspect", "web").stdout)[0]
    ip = info["NetworkSettings"]["IPAddress"]
    assert ip.startswith("10.203."), info["NetworkSettings"]
    assert info["NetworkSettings"]["Networks"]["bridge"]["IPAddress"] == ip
    assert info["NetworkSettings"]["Ports"] == {"80/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(port)}]}
    # the container's own address, on the namespace's bridge
    assert ns.run("curl", "-sS", "--max-time", "10", f"http://{ip}/").stdout == PAGE

    names = nsvc.docker_ok("network", "ls", "--format", "{{.Name}} {{.Driver}}").stdout.split("\n")
    assert {"bridge bridge", "host host", "none null"} <= set(names), names
    net = json.loads(nsvc.docker_ok("network", "inspect", "bridge").stdout)[0]
    assert net["IPAM"]["Config"] == [{"Subnet": "10.203.0.0/16", "Gateway": "10.203.0.1"}]
    assert [c["IPv4Address"] for c in net["Containers"].values()] == [f"{ip}/16"]
    r = nsvc.docker("network", "create", "mine")
    assert r.returncode != 0 and "not implement" in r.stderr, r.stderr

    nsvc.docker_ok("stop", "-t", "1", "web")
    assert fetch(ns, port, check=False).returncode != 0, "the published port is still open after stop"
    assert nsvc.docker_ok("port", "web").stdout.strip() == ""
    nsvc.docker_ok("rm", "web")


def test_free_host_port_and_network_modes(nsvc, nimage, ns, www):
    nsvc.docker_ok(
        "run", "-d", "--name", "any", "-p", "80", "-v", f"{www}:/www:ro", nimage, "httpd", "-f", "-h", "/www"
    )
    mapped = nsvc.docker_ok("port", "any", "80").stdout.strip()
    assert mapped.startswith("0.0.0.0:"), mapped
    port = int(mapped.rsplit(":", 1)[1])
    wait_for(lambda: fetch(ns, port, check=False).returncode == 0, what="httpd answering")
    nsvc.docker_ok("rm", "-f", "any")

    out = nsvc.docker_ok("run", "--rm", "--network", "none", nimage, "ip", "-o", "link").stdout
    assert "eth0" not in out and "lo" in out, out
    # dockerd's 404 (the docker CLI takes any 404 of create for a missing image and tries
    # a pull, as with dockerd; docker-py shows the message)
    import docker

    client = nsvc.client()
    try:
        with pytest.raises(docker.errors.NotFound, match="network nosuch not found"):
            client.containers.create(nimage, "true", network="nosuch")
    finally:
        client.close()
    r = nsvc.docker("run", "--rm", "--network", "none", "-p", "80", nimage, "true")
    assert r.returncode == 125 and "port publishing" in r.stderr, r.stderr


def test_docker_py_dns_and_extra_hosts(nsvc, nimage):
    client = nsvc.client()
    try:
        out = client.containers.run(
            nimage,
            ["sh", "-c", "cat /etc/resolv.conf /etc/hosts; ip -4 -o addr show eth0"],
            dns=["192.0.2.53"],
            extra_hosts={"db": "192.0.2.7"},
            remove=True,
        ).decode()
    finally:
        client.close()
    assert "nameserver 192.0.2.53" in out, out
    assert "192.0.2.7\tdb" in out, out
    assert "inet 10.203." in out, out


def test_publish_all_maps_the_images_exposed_ports(nsvc, ns, images, tmp_path, www):
    """-P: every port the image exposes (docker import --change "EXPOSE 80") on a free
    host port, shown by docker port and answered there."""
    tarball = api.busybox_tarball(images.bare.layers[0], tmp_path / "busybox.tar")
    nsvc.docker_ok("import", "--change", "EXPOSE 80", "--change", 'CMD ["httpd", "-f", "-h", "/www"]', tarball, "web:1")
    nsvc.docker_ok("run", "-d", "--name", "all", "-P", "-v", f"{www}:/www:ro", "web:1")
    mapped = nsvc.docker_ok("port", "all").stdout.strip()
    assert mapped.startswith("80/tcp -> 0.0.0.0:"), mapped
    port = int(mapped.rsplit(":", 1)[1])
    wait_for(lambda: fetch(ns, port, check=False).returncode == 0, what="httpd answering")
    assert fetch(ns, port).stdout == PAGE
    nsvc.docker_ok("rm", "-f", "all")


def test_users_service_publishes_through_slirp4netns(user, images):
    """An ordinary user's service: its containers' bridge is slirp4netns, and -p is
    forwarded by it on the host's loopback (nothing of the host's network changes)."""
    www = netns.web_root(user.dir / "www", PAGE)
    os.chown(www, user.uid, user.gid)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with api.UserService(user) as us:
        us.docker_ok("import", us.tar(images.bare.layers[0]), "bb:1")
        us.docker_ok(
            "run", "-d", "--name", "web", "-p", f"127.0.0.1:{port}:80", "-v", f"{www}:/www:ro",
            "bb:1", "httpd", "-f", "-p", "80", "-h", "/www",
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}/"

        def get(check: bool = True) -> subprocess.CompletedProcess:
            return subprocess.run(["curl", "-sS", "--max-time", "10", url], capture_output=True, text=True, check=check)

        wait_for(lambda: get(check=False).returncode == 0, what="httpd answering through slirp4netns")
        assert get().stdout == PAGE
        assert f"127.0.0.1:{port}->80/tcp" in us.docker_ok("ps", "--format", "{{.Ports}}").stdout
        assert us.docker_ok("port", "web").stdout.strip() == f"80/tcp -> 127.0.0.1:{port}"
        assert us.docker_ok("inspect", "-f", "{{.NetworkSettings.IPAddress}}", "web").stdout.strip() == "10.0.2.100"
        us.docker_ok("stop", "-t", "1", "web")
        assert get(check=False).returncode != 0, "the published port is still open after stop"
        us.docker_ok("rm", "web")
