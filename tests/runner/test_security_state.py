"""Issue 13, items 5 and 8 and the runner's "Low" items, as root: the state and data dirs
and the image store are private (0700, refused when a symlink, another user's or writable
by others), a record is trusted only in its expected shape (``rm`` never follows a record
out of the container's data dir), an unusable state dir is a one-line error, and
``-u nosuch`` is reported in docker's words. Real containers, real stores.
The attacks by an ordinary user are in tests/rootless/test_security_dirs.py.
"""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest

from helpers import archives as A
from helpers.containers import describe

pytestmark = [pytest.mark.needs_root, pytest.mark.usefixtures("_no_leftovers")]

OTHER_UID = 65534  # "another user" (nobody): root can give it a directory


def mode(p) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def one_line_error(r, code: int, *words) -> None:
    assert r.returncode == code, describe(r)
    assert "Traceback" not in r.stderr, describe(r)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyoverlay: "), describe(r)
    for w in words:
        assert w in lines[0], describe(r)


def plant_record(rt, cid: str, **fields) -> Path:
    d = rt.state / "containers" / cid
    d.mkdir(parents=True, exist_ok=True)
    rec = {
        "id": cid,
        "name": "planted",
        "command": ["true"],
        "status": "exited",
        "exit_code": 0,
        "created": time.time(),
        "finished": time.time(),
        "layers": [],
        **fields,
    }
    (d / "state.json").write_text(json.dumps(rec))
    return d


def make_store(rt) -> Path:
    keep = rt.data / "images" / "blobs" / "keep"
    keep.parent.mkdir(parents=True)
    keep.write_text("the image store\n")
    return keep


# --------------------------------------------------------------------------
# records: rm never leaves the container's data dir
# --------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["dotdot", "symlink", "other-id"])
def test_rm_does_not_follow_a_record_out_of_the_data_dir(rt, how):
    """A record whose data dir is ``<data>/containers/../images`` (f323dfb removed the image
    store), whose data dir is a symlink to the store, or which names another container's
    data dir: ``rm`` removes none of them."""
    rt.ok("ps")  # creates the state dir
    keep = make_store(rt)
    cid = "ab" * 32
    containers = rt.data / "containers"
    containers.mkdir(exist_ok=True)
    if how == "dotdot":
        data = f"{containers}/.."
    elif how == "symlink":
        os.symlink(rt.data / "images", containers / cid)
        data = str(containers / cid)
    else:
        other = "cd" * 32
        (containers / other / "upper").mkdir(parents=True)
        (containers / other / "upper" / "file").write_text("another container's\n")
        data = str(containers / other)
    plant_record(rt, cid, data_dir=data)
    rt.cli("rm", "-f", cid)
    assert keep.read_text() == "the image store\n", f"rm of a planted record ({how}) removed the image store"
    if how == "other-id":
        assert (containers / ("cd" * 32) / "upper" / "file").exists()


def test_rm_removes_a_real_container_through_fds(rt, img):
    """The ordinary case still works: the data dir and the record are gone, read-only
    directories in the upper included."""
    cid = rt.detach(img.spec, "sh", "-c", "mkdir -p /ro/sub && touch /ro/sub/f && chmod 555 /ro/sub /ro")
    rt.wait_status(cid, ("exited",))
    assert (rt.data / "containers" / cid / "upper" / "ro" / "sub" / "f").exists()
    rt.ok("rm", cid)
    assert not (rt.data / "containers" / cid).exists()
    assert cid not in rt.state_entries()


# --------------------------------------------------------------------------
# private dirs
# --------------------------------------------------------------------------


def test_state_and_data_dirs_are_made_private(rt, img):
    """Made 0700 (docker keeps /var/lib/docker 0710); an existing one we own that others
    may read (f323dfb's data dir was 0755, containers/<id> 0711) is closed on use."""
    os.chmod(rt.data, 0o755)
    os.chmod(rt.state, 0o755)
    r = rt.run("--rm", img.spec, "true")
    assert r.returncode == 0, describe(r)
    for p in (rt.state, rt.state / "containers", rt.data, rt.data / "containers"):
        assert mode(p) == 0o700, f"{p} is {mode(p):04o}"


@pytest.mark.parametrize("kind", ["file", "symlink", "other-owner", "world-writable"])
def test_unsafe_state_dir_is_refused_in_one_line(rt, img, tmp_path, kind):
    """A state dir that is a file (f323dfb: a traceback), a symlink, another user's or
    writable by others (f323dfb used them): refused by ps, rm and run in one line."""
    bad = tmp_path / "bad-state"
    if kind == "file":
        bad.write_text("")
    elif kind == "symlink":
        real = tmp_path / "real"
        real.mkdir(mode=0o700)
        bad.symlink_to(real)
    else:
        bad.mkdir(mode=0o700)
        if kind == "other-owner":
            os.chown(bad, OTHER_UID, OTHER_UID)
        else:
            os.chmod(bad, 0o777)
    env = {"PYOVERLAY_STATE_DIR": str(bad)}
    one_line_error(rt.cli("ps", env=env), 1, str(bad))
    one_line_error(rt.cli("rm", "x", env=env), 1, str(bad))
    one_line_error(rt.cli("run", "--rm", img.spec, "true", env=env), 125, str(bad))
    assert not (bad.is_dir() and (bad / "containers").exists()), "nothing is made in a refused dir"


def test_unsafe_data_dir_is_refused(rt, img):
    os.chown(rt.data, OTHER_UID, OTHER_UID)
    try:
        one_line_error(rt.run("--rm", img.spec, "true"), 125, str(rt.data), f"uid {OTHER_UID}")
    finally:
        os.chown(rt.data, 0, 0)


# --------------------------------------------------------------------------
# the image store
# --------------------------------------------------------------------------


def _archive(tmp_path) -> Path:
    layer = A.layer_tar([A.D("tmp", mode=0o1777), A.F("etc/motd", b"hi\n")])
    return A.write_docker_save(tmp_path / "img.tar", [([layer], ["sec:1"])])


def test_image_store_is_private(rt, tmp_path):
    """The default store (<data dir>/images) is 0700 under a 0700 data dir; a store left
    0755 by f323dfb is closed when it is next used; a store owned by another user is
    refused in one line."""
    arch = _archive(tmp_path)
    r = rt.ok("import", arch)
    store = rt.data / "images"
    assert mode(store) == 0o700 and mode(rt.data) == 0o700
    layer = next((store / "layers").iterdir())
    assert mode(layer / "tmp") == 0o1777, "a layer keeps the image's modes"
    os.chmod(store, 0o755)
    os.chmod(rt.data, 0o755)
    out = rt.ok("images").stdout
    assert "sec:1" in out, out
    assert mode(store) == 0o700 and mode(rt.data) == 0o700
    os.chown(store, OTHER_UID, OTHER_UID)
    try:
        one_line_error(rt.cli("images"), 1, str(store), f"uid {OTHER_UID}")
        one_line_error(rt.cli("import", arch), 1, str(store))
    finally:
        os.chown(store, 0, 0)
    assert r.returncode == 0


# --------------------------------------------------------------------------
# -u nosuch
# --------------------------------------------------------------------------


def test_unknown_user_in_dockers_words(rt, img):
    r = rt.run("--rm", "-u", "nosuch", img.spec, "true")
    one_line_error(r, 125, "unable to find user nosuch: no matching entries in passwd file")
    assert "SpecError" not in r.stderr, describe(r)
    cid = rt.detach(img.spec, "sleep", "1000")
    try:
        rt.wait_status(cid, ("running",))
        r = rt.cli("exec", "-u", "nosuch", cid, "true")
        one_line_error(r, 125, "unable to find user nosuch: no matching entries in passwd file")
        assert "SpecError" not in r.stderr, describe(r)
    finally:
        rt.cli("rm", "-f", cid)
