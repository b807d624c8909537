"""The issue's scenario end to end, with the docker CLI alone and then with docker-py, on
one service: import a busybox rootfs, ``run --rm`` (PID 1), a detached ``httpd`` seen by
``ps``, ``exec``, ``top`` and ``logs``, a change seen by ``diff``, ``commit`` and a ``run``
of the committed image through the service, ``stop`` and ``rm``."""

from __future__ import annotations

import time

import pytest

from helpers import api


def _until(check, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_the_scenario_with_the_docker_cli(service, images, tmp_path):
    tar = api.busybox_tarball(images.bare.layers[0], tmp_path / "busybox.tar")
    image_id = service.docker_ok("import", tar, "bb:scene").stdout.strip()
    assert image_id.startswith("sha256:")
    assert service.docker_ok("run", "--rm", "bb:scene", "sh", "-c", "echo $$").stdout == "1\n"
    service.docker_ok("run", "-d", "--name", "web", "bb:scene", "sh", "-c", "echo serving; exec httpd -f -p 8080")
    ps = service.docker_ok("ps", "--format", "{{.Names}} {{.Image}} {{.Status}}").stdout.splitlines()
    assert len(ps) == 1 and ps[0].startswith("web bb:scene Up"), ps
    procs = service.docker_ok("exec", "web", "ps", "-o", "pid,comm").stdout.split("\n")
    assert any(line.split() == ["1", "httpd"] for line in procs), procs
    top = service.docker_ok("top", "web").stdout
    assert "httpd -f -p 8080" in top, top
    _until(lambda: service.docker("logs", "web").stdout == "serving\n", "the log line")
    service.docker_ok("exec", "web", "sh", "-c", "echo changed > /etc/motd; rm /bin/vi")
    diff = service.docker_ok("diff", "web").stdout.splitlines()
    assert {"C /etc/motd", "D /bin/vi"} <= set(diff), diff
    service.docker_ok("commit", "web", "bb:committed")
    out = service.docker_ok(
        "run", "--rm", "bb:committed", "sh", "-c", "cat /etc/motd; test -e /bin/vi || echo no-vi"
    ).stdout
    assert out == "changed\nno-vi\n"
    service.docker_ok("stop", "-t", "2", "web")
    assert service.docker_ok("ps", "-q").stdout == ""
    assert service.docker_ok("ps", "-a", "--format", "{{.Names}} {{.Status}}").stdout.startswith("web Exited")
    service.docker_ok("rm", "web")
    assert service.docker_ok("ps", "-aq").stdout == ""
    service.docker_ok("rmi", "bb:committed")


def test_the_scenario_with_docker_py(service, images, tmp_path):
    why = api.which_docker_py()
    if why:
        pytest.fail(why)
    client = service.client()
    try:
        tar = api.busybox_tarball(images.bare.layers[0], tmp_path / "busybox.tar")
        client.api.import_image_from_file(str(tar), repository="bbpy", tag="1")
        assert client.containers.run("bbpy:1", ["sh", "-c", "echo $$"], remove=True) == b"1\n"
        web = client.containers.run("bbpy:1", ["httpd", "-f", "-p", "8080"], name="pyweb", detach=True)
        assert [c.name for c in client.containers.list()] == ["pyweb"]
        code, out = web.exec_run(["ps", "-o", "pid,comm"])
        assert code == 0 and any(line.split() == [b"1", b"httpd"] for line in out.split(b"\n")), out
        assert any("httpd" in " ".join(p) for p in web.top()["Processes"])
        web.exec_run(["sh", "-c", "echo changed > /etc/motd"])
        assert {"Path": "/etc/motd", "Kind": 0} in web.diff()
        img = client.api.commit(web.id, repository="bbpy", tag="committed")
        assert img["Id"].startswith("sha256:")
        assert client.containers.run("bbpy:committed", ["cat", "/etc/motd"], remove=True) == b"changed\n"
        web.stop(timeout=2)
        assert web.wait(timeout=30)["StatusCode"] in (137, 143)
        web.remove()
        assert client.containers.list(all=True) == []
    finally:
        client.close()
