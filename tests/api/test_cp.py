"""``docker cp`` both ways through the archive endpoints (GET, HEAD, PUT
``/containers/{id}/archive``), into and out of running and stopped containers, with
untrusted paths and tars: a symlink in the container is resolved inside it, never on the
host, and a tar's members cannot climb out of the container."""

from __future__ import annotations

import io
import os
import tarfile
import time
from pathlib import Path

import pytest

from helpers.api import which_docker_py


@pytest.fixture
def web(service, image, rt):
    cid = rt.detach("--name", "web", "--image", "busybox:latest", "httpd", "-f")
    yield cid
    rt.cli("rm", "-f", cid)


def upper(rt) -> Path:
    return Path(rt.find("web")["upper"])


def test_cp_a_file_and_a_dir_out(service, rt, web, tmp_path):
    rt.ok("exec", "web", "sh", "-c", "mkdir -p /data/sub && echo one > /data/a && echo two > /data/sub/b")
    service.docker_ok("cp", "web:/etc/passwd", tmp_path / "passwd")
    assert (tmp_path / "passwd").read_text().startswith("root:x:0:0:")
    service.docker_ok("cp", "web:/data", tmp_path / "data")
    assert (tmp_path / "data" / "a").read_text() == "one\n"
    assert (tmp_path / "data" / "sub" / "b").read_text() == "two\n"
    (tmp_path / "dot").mkdir()
    service.docker_ok("cp", "web:/data/.", tmp_path / "dot")  # the directory's content
    assert sorted(os.listdir(tmp_path / "dot")) == ["a", "sub"]
    service.docker_ok("cp", "web:/", tmp_path / "whole")
    assert (tmp_path / "whole" / "data" / "sub" / "b").read_text() == "two\n"
    assert (tmp_path / "whole" / "bin" / "busybox").stat().st_size > 100000
    missing = service.docker("cp", "web:/nope", tmp_path / "x")
    assert missing.returncode == 1 and "No such container:path: web:/nope" in missing.stderr  # as with dockerd


def test_cp_into_a_running_container_goes_through_its_mount(service, rt, web, tmp_path):
    (tmp_path / "in.txt").write_text("from the host\n")
    (tmp_path / "tree" / "deep").mkdir(parents=True)
    (tmp_path / "tree" / "deep" / "f").write_text("deep\n")
    service.docker_ok("cp", tmp_path / "in.txt", "web:/tmp/")
    service.docker_ok("cp", tmp_path / "tree", "web:/srv")
    assert rt.ok("exec", "web", "cat", "/tmp/in.txt", "/srv/deep/f").stdout == "from the host\ndeep\n"
    assert (upper(rt) / "tmp" / "in.txt").read_text() == "from the host\n"
    # overwriting a lower file copies it up: the lower layer is untouched
    (tmp_path / "motd").write_text("replaced\n")
    service.docker_ok("cp", tmp_path / "motd", "web:/etc/motd")
    assert rt.ok("exec", "web", "cat", "/etc/motd").stdout == "replaced\n"
    lower = Path(rt.find("web")["layers"][-1])
    assert (lower / "etc" / "motd").read_text() != "replaced\n"


def test_cp_into_and_out_of_a_stopped_container(service, rt, web, tmp_path):
    rt.ok("exec", "web", "sh", "-c", "echo before > /tmp/kept")
    service.docker_ok("stop", "-t", "0", "web")
    (tmp_path / "late.txt").write_text("while stopped\n")
    service.docker_ok("cp", tmp_path / "late.txt", "web:/tmp/late.txt")
    assert (upper(rt) / "tmp" / "late.txt").read_text() == "while stopped\n"
    service.docker_ok("cp", "web:/tmp/kept", tmp_path / "kept")
    assert (tmp_path / "kept").read_text() == "before\n"
    assert "A /tmp/late.txt" in service.docker_ok("diff", "web").stdout.splitlines()
    no_private_mount_left(rt)


def no_private_mount_left(rt, timeout: float = 30) -> None:
    """The private mount of a stopped container is gone once its request has ended (the
    client may go before the last chunk: wait for it)."""
    deadline = time.monotonic() + timeout
    while rt.mounts() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert rt.mounts() == []


def test_a_container_symlink_is_resolved_in_the_container(service, rt, web, tmp_path):
    rt.ok(
        "exec",
        "web",
        "sh",
        "-c",
        "echo container-shadow > /etc/shadow; ln -s /etc/shadow /tmp/link; ln -s /etc /tmp/etc;"
        " ln -s ../../../../../../../etc/shadow /tmp/climb",
    )
    # -L: the link's target, resolved in the container
    service.docker_ok("cp", "-L", "web:/tmp/link", tmp_path / "followed")
    assert (tmp_path / "followed").read_text() == "container-shadow\n"
    # a directory symlink in the middle of the path
    service.docker_ok("cp", "web:/tmp/etc/shadow", tmp_path / "middle")
    assert (tmp_path / "middle").read_text() == "container-shadow\n"
    # ".." stops at the container's root
    service.docker_ok("cp", "-L", "web:/tmp/climb", tmp_path / "climbed")
    assert (tmp_path / "climbed").read_text() == "container-shadow\n"
    # without -L the link itself
    service.docker_ok("cp", "web:/tmp/link", tmp_path / "asis")
    assert os.readlink(tmp_path / "asis") == "/etc/shadow"


def _tar(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.mode = 0o644
    return ti, data


def _link(name: str, target: str) -> tuple[tarfile.TarInfo, None]:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname = tarfile.SYMTYPE, target
    return ti, None


def test_docker_py_archives_and_hostile_tars(service, rt, web, tmp_path):
    why = which_docker_py()
    if why:
        pytest.fail(why)
    import docker

    client = service.client()
    try:
        c = client.containers.get("web")
        assert c.put_archive("/tmp", _tar(_file("hello.txt", b"hi\n")))
        chunks, stat = c.get_archive("/tmp/hello.txt")
        assert stat["name"] == "hello.txt" and stat["size"] == 3
        with tarfile.open(fileobj=io.BytesIO(b"".join(chunks))) as tf:
            assert tf.extractfile("hello.txt").read() == b"hi\n"
        # a member that climbs out of the destination is refused
        with pytest.raises(docker.errors.APIError) as e:
            c.put_archive("/tmp", _tar(_file("../../../../../../.." + str(tmp_path / "escaped"), b"x")))
        assert e.value.status_code == 400
        assert not (tmp_path / "escaped").exists()
        # a symlink member to "/" and a file through it: lands in the container's tree
        c.put_archive("/tmp", _tar(_link("evil", "/"), _file("evil" + str(tmp_path / "pwned"), b"pwned\n")))
        assert not (tmp_path / "pwned").exists()
        inside = rt.ok("exec", "web", "cat", str(tmp_path / "pwned")).stdout
        assert inside == "pwned\n"
        # hard links: to a member of the same tar, kept; to a path climbing out, refused
        hl = tarfile.TarInfo("hl")
        hl.type, hl.linkname = tarfile.LNKTYPE, "orig"
        c.put_archive("/tmp", _tar(_file("orig", b"linked\n"), (hl, None)))
        assert rt.ok("exec", "web", "sh", "-c", "cat /tmp/hl; stat -c %h /tmp/orig").stdout.split() == ["linked", "2"]
        out = tarfile.TarInfo("out")
        out.type, out.linkname = tarfile.LNKTYPE, "../../../../etc/passwd"
        with pytest.raises(docker.errors.APIError) as e:
            c.put_archive("/tmp", _tar((out, None)))
        assert e.value.status_code == 400
        # the stat header of a symlink names its target resolved in the container
        rt.ok("exec", "web", "sh", "-c", "ln -s ../../etc/motd /tmp/m")
        _chunks, st = c.get_archive("/tmp/m")
        assert st["linkTarget"] == "/etc/motd"
        with pytest.raises(docker.errors.NotFound):
            c.get_archive("/does/not/exist")
    finally:
        client.close()


def test_cp_in_gives_root_ownership_unless_a(service, rt, web, tmp_path):
    """Without ``-a`` the copied files belong to the container's root, as dockerd makes
    them; with ``-a`` (copyUIDGID) they keep the tar's owner."""
    f = tmp_path / "owned.txt"
    f.write_text("x\n")
    os.chown(f, 1234, 2345)
    service.docker_ok("cp", f, "web:/tmp/plain.txt")
    service.docker_ok("cp", "-a", f, "web:/tmp/kept.txt")
    out = rt.ok("exec", "web", "stat", "-c", "%u:%g", "/tmp/plain.txt", "/tmp/kept.txt").stdout.split()
    assert out == ["0:0", "1234:2345"]


def test_cp_and_export_of_a_running_rootless_container(images, user):
    """An ordinary user's service, a running (rootless) container: its mount exists only in
    its own namespaces, where FUSE lets only its user namespace in, so the copy runs in a
    child of the service that joined them. Out, in (landing in its upper layer, owned by
    the container's root), export, diff; the connection is closed after each such answer
    and the docker CLI goes on with a new one."""

    from helpers import api

    with api.UserService(user) as us:
        docker = us.docker_ok
        docker("import", us.tar(images.bare.layers[0]), "bb:1")
        docker("run", "-d", "--name", "w", "bb:1", "sleep", "600")
        out = user.dir / "out"
        out.mkdir()
        os.chown(out, user.uid, user.gid)
        docker("cp", "w:/etc/passwd", out / "passwd")
        assert (out / "passwd").read_text().startswith("root:x:0:0:")
        src = user.dir / "in.txt"
        src.write_text("into a rootless container\n")
        os.chown(src, user.uid, user.gid)
        docker("cp", src, "w:/tmp/in.txt")
        r = docker("exec", "w", "stat", "-c", "%u:%g %n", "/tmp/in.txt")
        assert r.stdout.strip() == "0:0 /tmp/in.txt"
        assert docker("exec", "w", "cat", "/tmp/in.txt").stdout == "into a rootless container\n"
        assert "A /tmp/in.txt" in docker("diff", "w").stdout.splitlines()
        exported = user.run(
            ["sh", "-c", f"{api.DOCKER} export w | tar -t"], env={**us.env, "DOCKER_HOST": f"unix://{us.sock}"}
        )
        names = exported.stdout.split()
        assert "bin/busybox" in names and "tmp/in.txt" in names, exported.stderr
        docker("rm", "-f", "w")
