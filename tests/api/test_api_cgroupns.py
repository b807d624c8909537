"""``pyoverlay serve`` and the cgroup namespace: HostConfig.CgroupnsMode in create (the
docker CLI's ``--cgroupns``, docker-py's ``cgroupns=``), the mode inspect shows (dockerd
writes the default it used back), a bad mode, and ``docker info``'s CgroupVersion
(docs/api.md, "Containers: create, start, attach, logs, exec")."""

from __future__ import annotations

import json
import os

import pytest

from helpers import api
from runner.cgroups import cgroup_version, default_cgroupns, detect

SCRIPT = (
    "readlink /proc/self/ns/cgroup; cat /proc/self/cgroup; echo ==; cat /sys/fs/cgroup/memory/memory.limit_in_bytes"
)


def _paths(text: str) -> set[str]:
    return {line.split(":", 2)[2] for line in text.splitlines() if line.count(":") >= 2}


def _ps_all(rt) -> list[dict]:
    return json.loads(rt.ok("ps", "-a", "--json").stdout)


def test_docker_cli_cgroupns_private_and_host(service, image, rt):
    host_ns = os.readlink("/proc/self/ns/cgroup")
    r = service.docker_ok("run", "--rm", "--cgroupns", "private", "-m", "64m", image, "sh", "-c", SCRIPT)
    head, limit = r.stdout.split("==\n")
    ns, cgroup = head.split("\n", 1)
    assert ns != host_ns and _paths(cgroup) == {"/"}, r.stdout
    if "memory" in detect().v1:  # v1: the container's own limit, read inside
        assert limit.strip() == "67108864"

    r = service.docker_ok(
        "run", "--rm", "--cgroupns", "host", image, "sh", "-c", "readlink /proc/self/ns/cgroup; hostname"
    )
    assert r.stdout.split("\n")[0] == host_ns
    r = service.docker("run", "--rm", "--cgroupns", "private", image, "touch", "/sys/fs/cgroup/x")
    assert r.returncode == 1 and "Read-only file system" in r.stderr, r
    assert _ps_all(rt) == []


def test_inspect_shows_the_mode_used(service, image, rt):
    given = service.docker_ok("create", "--name", "given", "--cgroupns", "private", image, "true").stdout.strip()
    default = service.docker_ok("create", "--name", "dflt", image, "true").stdout.strip()
    try:
        mode = service.docker_ok("inspect", "-f", "{{.HostConfig.CgroupnsMode}}", given).stdout.strip()
        assert mode == "private"
        mode = service.docker_ok("inspect", "-f", "{{.HostConfig.CgroupnsMode}}", default).stdout.strip()
        assert mode == default_cgroupns() == ("private" if detect().mode == "v2" else "host")
    finally:
        service.docker("rm", "-f", given, default)
    # a container of `pyoverlay run`: inspect says its recorded mode
    cid = rt.detach("--cgroupns", "private", "--image", image, "sleep", "300")
    try:
        assert service.docker_ok("inspect", "-f", "{{.HostConfig.CgroupnsMode}}", cid).stdout.strip() == "private"
    finally:
        rt.ok("rm", "-f", cid)


def test_docker_info_cgroup_version(service):
    info = json.loads(service.docker_ok("info", "--format", "{{json .}}").stdout)
    assert info["CgroupVersion"] == cgroup_version() == ("2" if detect().mode == "v2" else "1")
    assert ("name=cgroupns" in info["SecurityOptions"]) == (default_cgroupns() == "private")


def test_docker_py_cgroupns_and_a_bad_mode(service, image, rt):
    why = api.which_docker_py()
    if why:
        pytest.fail(why)
    import docker

    client = service.client()
    try:
        out = client.containers.run(image, ["cat", "/proc/self/cgroup"], cgroupns="private", remove=True)
        assert _paths(out.decode()) == {"/"}
        with pytest.raises(docker.errors.APIError) as e:
            client.api.create_container(image, ["true"], host_config={"CgroupnsMode": "bogus"})
        assert e.value.status_code == 400
        assert e.value.explanation == "invalid cgroup namespace mode: bogus"
    finally:
        client.close()
    assert _ps_all(rt) == []
