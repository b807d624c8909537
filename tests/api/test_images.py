"""The image endpoints with the real docker CLI (Debian's docker.io 20.10) and docker-py:
``docker import`` of a busybox rootfs tarball, ``images``, ``inspect``, ``history``,
``tag``, ``rmi``, ``save | load`` (ids kept), ``image prune``; and what the service
refuses (a pull, an import tarball that escapes or carries device nodes as a user...)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pytest

from helpers import api


@pytest.fixture
def tarball(images, tmp_path):
    return api.busybox_tarball(images.bare.layers[0], tmp_path / "busybox.tar")


def _import(service, tarball, ref="bb:1", *changes) -> str:
    args = []
    for c in changes:
        args += ["--change", c]
    r = service.docker_ok("import", *args, tarball, ref)
    out = r.stdout.strip()
    assert out.startswith("sha256:") and len(out) == 71, out
    return out


def test_docker_import_images_inspect_history(service, tarball, rt):
    iid = _import(service, tarball, "bb:1", 'CMD ["sh", "-c", "echo hi"]', "ENV A=b C=d", "WORKDIR /tmp", "USER 1000")
    r = service.docker_ok("images", "--format", "{{.Repository}} {{.Tag}} {{.ID}}")
    assert r.stdout.split("\n")[0].split() == ["bb", "1", iid[7:19]]
    info = json.loads(service.docker_ok("inspect", "bb:1").stdout)[0]
    assert info["Id"] == iid
    assert info["RepoTags"] == ["bb:1"]
    assert info["Config"]["Cmd"] == ["sh", "-c", "echo hi"]
    assert info["Config"]["Env"] == ["A=b", "C=d"]
    assert info["Config"]["WorkingDir"] == "/tmp"
    assert info["Config"]["User"] == "1000"
    assert info["RootFS"]["Type"] == "layers" and len(info["RootFS"]["Layers"]) == 1
    assert info["Size"] > 100_000
    assert info["Os"] == "linux" and info["Created"].startswith("20")
    hist = service.docker_ok("history", "--no-trunc", "--format", "{{.ID}}|{{.Comment}}", "bb:1").stdout.splitlines()
    assert hist == [f"{iid}|Imported from -"]
    # the CLI and the service see the same store
    assert "bb:1" in rt.ok("images").stdout


def test_tag_rmi_and_conflicts(service, tarball):
    iid = _import(service, tarball, "bb:1")
    service.docker_ok("tag", "bb:1", "example.com/team/bb:two")
    tags = service.docker_ok("images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split()
    assert sorted(tags) == ["bb:1", "example.com/team/bb:two"]
    # by id with two names: must be forced (dockerd's message and 409 -> exit 1)
    r = service.docker("rmi", iid[7:19])
    assert r.returncode == 1 and "must be forced" in r.stderr and "multiple repositories" in r.stderr
    r = service.docker_ok("rmi", "bb:1")
    assert r.stdout.strip() == "Untagged: bb:1"
    r = service.docker_ok("rmi", "example.com/team/bb:two")
    assert r.stdout.split("\n")[:2] == ["Untagged: example.com/team/bb:two", f"Deleted: {iid}"]
    assert service.docker_ok("images", "-q").stdout.strip() == ""
    r = service.docker("rmi", "bb:1")
    assert r.returncode == 1 and "No such image: bb:1" in r.stderr
    r = service.docker("inspect", "--type", "image", "nosuch:1")
    assert r.returncode == 1 and "No such image: nosuch:1" in r.stderr


def test_rmi_of_an_image_a_container_uses_is_409(service, rt, tarball):
    """dockerd's conflicts: the last name of an image a container was made from is not
    removed without force; by id, not without force (stopped container)."""
    iid = _import(service, tarball, "bb:1")
    r = rt.run("--image", "bb:1", "--name", "user-of-bb", "true")
    assert r.returncode == 0, r.stderr
    try:
        r = service.docker("rmi", "bb:1")
        assert r.returncode == 1, r.stdout
        assert "conflict: unable to remove repository reference" in r.stderr and "must force" in r.stderr
        r = service.docker("rmi", iid)
        assert r.returncode == 1 and "being used by stopped container" in r.stderr
        # forced: untagged, the image stays for its container
        service.docker_ok("rmi", "-f", "bb:1")
        assert service.docker_ok("images", "-q", "--no-trunc").stdout.split() == [iid]
    finally:
        rt.ok("rm", "user-of-bb")


def test_save_load_round_trip_keeps_ids(service, tarball, tmp_path):
    iid = _import(service, tarball, "bb:1", 'CMD ["sh"]')
    service.docker_ok("tag", "bb:1", "bb:2")
    archive = tmp_path / "saved.tar"
    service.docker_ok("save", "-o", archive, "bb:1", "bb:2")
    with tarfile.open(archive) as tf:
        manifest = json.load(tf.extractfile("manifest.json"))
        assert manifest[0]["Config"] == f"{iid[7:]}.json"
        assert sorted(manifest[0]["RepoTags"]) == ["bb:1", "bb:2"]
        layer = tf.extractfile(manifest[0]["Layers"][0]).read()
    diff_id = json.loads(service.docker_ok("inspect", "bb:1").stdout)[0]["RootFS"]["Layers"][0]
    assert "sha256:" + hashlib.sha256(layer).hexdigest() == diff_id
    service.docker_ok("rmi", "bb:1", "bb:2")
    assert service.docker_ok("images", "-q").stdout.strip() == ""
    # docker save | docker load
    r = service.docker_ok("load", "-i", archive)
    assert sorted(r.stdout.split("\n")[:2]) == ["Loaded image: bb:1", "Loaded image: bb:2"]
    assert set(service.docker_ok("images", "-q", "--no-trunc").stdout.split()) == {iid}
    # and through a pipe, as `docker save X | docker load`
    data = service.docker_ok("save", "bb:1", text=False).stdout
    service.docker_ok("rmi", "-f", iid)
    r = service.docker_ok("load", "-q", input=data, text=False)
    assert b"Loaded image: bb:1" in r.stdout
    assert service.docker_ok("inspect", "--format", "{{.Id}}", "bb:1").stdout.strip() == iid


def test_image_prune(service, tarball, images, tmp_path):
    keep = _import(service, tarball, "bb:keep")
    # a second, untagged image (another tarball: another id)
    other = tmp_path / "other.tar"
    with tarfile.open(other, "w") as tf:
        data = b"hello\n"
        ti = tarfile.TarInfo("hello.txt")
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))
    dangling = service.docker_ok("import", other).stdout.strip()
    listed = service.docker_ok("images", "-q", "--no-trunc", "--filter", "dangling=true").stdout.split()
    assert listed == [dangling]
    r = service.docker_ok("image", "prune", "-f")
    assert f"deleted: {dangling}" in r.stdout
    assert service.docker_ok("images", "-q", "--no-trunc").stdout.split() == [keep]
    r = service.docker_ok("image", "prune", "-a", "-f")
    assert f"deleted: {keep}" in r.stdout and "untagged: bb:keep" in r.stdout
    assert service.docker_ok("images", "-q").stdout.strip() == ""


def test_pull_is_501_with_a_clear_message(service):
    r = service.docker("pull", "busybox")
    assert r.returncode == 1
    assert "no registry access" in r.stderr and "docker load or docker import" in r.stderr


def _tar(entries) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for ti, data in entries:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def test_import_refuses_escaping_tarballs(service, tmp_path):
    evil = tarfile.TarInfo("../../escaped")
    evil.size = 3
    r = service.docker("import", "-", "evil:1", input=_tar([(evil, b"bad")]), text=False)
    assert r.returncode == 1
    assert b"escaped" in r.stderr or b".." in r.stderr
    link = tarfile.TarInfo("etc")
    link.type = tarfile.SYMTYPE
    link.linkname = "/tmp"
    through = tarfile.TarInfo("etc/through-symlink")
    through.size = 3
    r = service.docker("import", "-", "evil:2", input=_tar([(link, None), (through, b"bad")]), text=False)
    assert r.returncode == 1 and b"symlink" in r.stderr
    assert service.docker_ok("images", "-q").stdout.strip() == ""
    assert not (tmp_path.parent / "escaped").exists()


def test_docker_py_images(service, tarball, tmp_path):
    client = service.client()
    try:
        with open(tarball, "rb") as f:
            out = client.api.import_image_from_data(f.read(), repository="pybb", tag="1")
        iid = json.loads(out.strip().split("\n")[-1])["status"]
        imgs = client.images.list()
        assert [i.id for i in imgs] == [iid]
        assert imgs[0].tags == ["pybb:1"]
        saved = b"".join(client.images.get("pybb:1").save())
        client.images.remove("pybb:1")
        assert client.images.list() == []
        loaded = client.images.load(saved)
        assert [i.id for i in loaded] == [iid]
        assert client.images.get("pybb:1").id == iid
    finally:
        client.close()


def test_images_filters(service, tarball):
    a = _import(service, tarball, "aa:1")
    b = _import(service, tarball, "bb:1", 'CMD ["true"]')  # another config: another image
    assert a != b
    ref = service.docker_ok("images", "-q", "--no-trunc", "--filter", "reference=aa*").stdout.split()
    assert ref == [a]
    since = service.docker_ok("images", "-q", "--no-trunc", "--filter", "since=aa:1").stdout.split()
    before = service.docker_ok("images", "-q", "--no-trunc", "--filter", "before=bb:1").stdout.split()
    # whole-second creation times: a second may separate the two or not
    assert since in ([b], []) and before in ([a], [])
    assert (since == []) == (before == [])
    r = service.docker("images", "--filter", "bogus=1")
    assert r.returncode == 1 and "invalid filter" in r.stderr


@pytest.mark.timeout(300)
def test_archives_round_trip_with_a_real_dockerd(service, tarball, tmp_path):
    """``docker save`` from the service loads into a real (private) dockerd with the same
    image id and config; a real dockerd's ``docker save`` loads into the service with its id."""
    from helpers import dockerd

    missing = dockerd.missing_binaries()
    if missing:
        pytest.skip(f"docker is not installed here (missing: {', '.join(missing)})")
    ours = _import(service, tarball, "ours:1", 'CMD ["sh", "-c", "echo ours"]', "ENV X=1")
    saved = service.docker_ok("save", "ours:1", text=False).stdout
    base = tmp_path / "d"
    base.mkdir()
    try:
        with dockerd.LiveDocker(base) as d:
            out = d.docker("load", input=saved).stdout.decode()
            assert "Loaded image: ours:1" in out
            info = json.loads(d.docker("image", "inspect", "ours:1").stdout)[0]
            assert info["Id"] == ours
            assert info["Config"]["Cmd"] == ["sh", "-c", "echo ours"] and "X=1" in info["Config"]["Env"]
            d.docker("import", "-c", 'CMD ["true"]', "-", "theirs:1", input=tarball.read_bytes())
            theirs = d.docker("image", "inspect", "-f", "{{.Id}}", "theirs:1").stdout.decode().strip()
            theirs_saved = d.docker("save", "theirs:1").stdout
    except dockerd.Unavailable as e:
        pytest.skip(f"no live dockerd: {e}")
    r = service.docker_ok("load", input=theirs_saved, text=False)
    assert b"Loaded image: theirs:1" in r.stdout
    assert service.docker_ok("inspect", "--format", "{{.Id}}", "theirs:1").stdout.strip() == theirs


def test_import_message_and_bad_changes(service, tarball):
    r = service.docker_ok("import", "--message", "from the test", tarball, "msg:1")
    iid = r.stdout.strip()
    hist = service.docker_ok("history", "--format", "{{.Comment}}", "msg:1").stdout.strip()
    assert hist == "from the test"
    assert service.docker_ok("inspect", "--format", "{{.Comment}}", iid).stdout.strip() == "from the test"
    r = service.docker("import", "--change", "RUN echo no", tarball, "bad:1")
    assert r.returncode == 1 and "RUN is not a valid change command" in r.stderr
    r = service.docker("import", "--change", "ENV", tarball, "bad:2")
    assert r.returncode == 1 and "ENV requires at least one argument" in r.stderr
    assert service.docker_ok("images", "--format", "{{.Repository}}").stdout.split() == ["msg"]


def test_gzipped_import_saves_the_uncompressed_layer(service, tarball, tmp_path):
    """A gzip'd tarball is stored as imported; ``docker save`` writes the uncompressed
    layer.tar whose digest is the diff id, and loading it back gives the same image."""
    import gzip

    gz = tmp_path / "busybox.tar.gz"
    gz.write_bytes(gzip.compress(tarball.read_bytes()))
    iid = _import(service, gz, "gz:1")
    diff_id = json.loads(service.docker_ok("inspect", "gz:1").stdout)[0]["RootFS"]["Layers"][0]
    assert diff_id == "sha256:" + hashlib.sha256(tarball.read_bytes()).hexdigest()
    data = service.docker_ok("save", iid, text=False).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        manifest = json.load(tf.extractfile("manifest.json"))
        assert manifest[0]["RepoTags"] == ["gz:1"]  # saved by id: all its names
        layer = tf.extractfile(manifest[0]["Layers"][0]).read()
    assert layer == tarball.read_bytes()
    service.docker_ok("rmi", "gz:1")
    service.docker_ok("load", input=data, text=False)
    assert service.docker_ok("inspect", "--format", "{{.Id}}", "gz:1").stdout.strip() == iid
