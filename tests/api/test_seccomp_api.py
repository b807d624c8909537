"""Seccomp through ``pyoverlay serve`` (docs/api.md, "Seccomp"): HostConfig.SecurityOpt as
the docker CLI and docker-py send it (``seccomp=unconfined``; a profile FILE is read by
the client and sent as its JSON text), Privileged, docker info's SecurityOptions, exec."""

from __future__ import annotations

import json

import pytest

from helpers import api

DENY_MKDIR = {
    "defaultAction": "SCMP_ACT_ALLOW",
    "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13}],
}


def _ps_all(rt) -> list[dict]:
    return json.loads(rt.ok("ps", "-a", "--json").stdout)


def _mode(service, *args) -> str:
    r = service.docker_ok("run", "--rm", *args, "grep", "^Seccomp:", "/proc/self/status")
    return r.stdout.split()[-1]


def test_info_lists_the_seccomp_profile(service):
    r = service.docker_ok("info", "--format", "{{json .SecurityOptions}}")
    assert "name=seccomp,profile=default" in json.loads(r.stdout)


def test_default_unconfined_privileged(service, image, rt):
    assert _mode(service, image) == "2"
    r = service.docker("run", "--rm", image, "unshare", "-U", "true")
    assert r.returncode == 1 and "Operation not permitted" in r.stderr, r
    assert _mode(service, "--security-opt", "seccomp=unconfined", image) == "0"
    service.docker_ok("run", "--rm", "--security-opt", "seccomp=unconfined", image, "unshare", "-U", "true")
    assert _mode(service, "--privileged", image) == "0"
    assert _ps_all(rt) == []


def test_profile_file_and_inspect(service, image, rt, tmp_path):
    prof = tmp_path / "deny-mkdir.json"
    prof.write_text(json.dumps(DENY_MKDIR, indent=2))
    r = service.docker("run", "--rm", "--security-opt", f"seccomp={prof}", image, "mkdir", "/tmp/x")
    assert r.returncode == 1 and "Permission denied" in r.stderr, r
    cid = service.docker_ok("create", "--security-opt", f"seccomp={prof}", image, "sleep", "300").stdout.strip()
    try:
        host = json.loads(service.docker_ok("inspect", "--format", "{{json .HostConfig}}", cid).stdout)
        (opt,) = host["SecurityOpt"]
        assert opt.startswith("seccomp=") and json.loads(opt.removeprefix("seccomp=")) == DENY_MKDIR
        service.docker_ok("start", cid)
        r = service.docker("exec", cid, "mkdir", "/tmp/y")  # exec runs under the filter too
        assert r.returncode == 1 and "Permission denied" in r.stderr, r
        r = service.docker_ok("exec", cid, "grep", "^Seccomp:", "/proc/self/status")
        assert r.stdout.split()[-1] == "2"
    finally:
        service.docker("rm", "-f", cid)
    assert _ps_all(rt) == []


def test_bad_profile_is_refused_at_create(service, image, rt, tmp_path):
    prof = tmp_path / "bad.json"
    prof.write_text(json.dumps({"defaultAction": "SCMP_ACT_NOPE"}))
    r = service.docker("run", "--rm", "--security-opt", f"seccomp={prof}", image, "true")
    assert r.returncode == 125 and "unknown action 'SCMP_ACT_NOPE'" in r.stderr, r
    r = service.docker("run", "--rm", "--security-opt", "apparmor=docker-default", image, "true")
    assert r.returncode == 125 and "not supported" in r.stderr, r
    assert _ps_all(rt) == []


def test_docker_py_security_opt(service, image, rt):
    why = api.which_docker_py()
    if why:
        pytest.fail(why)
    client = service.client()
    try:
        cmd = ["grep", "^Seccomp:", "/proc/self/status"]
        assert client.containers.run(image, cmd, remove=True).split()[-1] == b"2"
        out = client.containers.run(image, cmd, remove=True, security_opt=["seccomp=unconfined"])
        assert out.split()[-1] == b"0"
        out = client.containers.run(
            image,
            ["sh", "-c", "mkdir /tmp/x 2>&1; true"],
            remove=True,
            security_opt=[f"seccomp={json.dumps(DENY_MKDIR)}"],
        )
        assert b"Permission denied" in out
    finally:
        client.close()
    assert _ps_all(rt) == []


def test_inspect_of_a_runner_container_shows_its_security_opt(service, images, rt, tmp_path):
    """A container started by `pyoverlay run`: inspect shows what docker's would."""
    prof = tmp_path / "p.json"
    prof.write_text(json.dumps(DENY_MKDIR, indent=2))
    spec = images.bare.spec
    plain = rt.detach(spec, "sleep", "300")
    unconfined = rt.detach(
        "--security-opt", "seccomp=unconfined", "--security-opt", "no-new-privileges", spec, "sleep", "300"
    )
    custom = rt.detach("--security-opt", f"seccomp={prof}", spec, "sleep", "300")
    try:

        def opts(cid):
            return json.loads(service.docker_ok("inspect", "--format", "{{json .HostConfig.SecurityOpt}}", cid).stdout)

        assert opts(plain) is None
        assert opts(unconfined) == ["seccomp=unconfined", "no-new-privileges"]
        (opt,) = opts(custom)
        assert json.loads(opt.removeprefix("seccomp=")) == DENY_MKDIR
    finally:
        for cid in (plain, unconfined, custom):
            rt.ok("rm", "-f", cid)
