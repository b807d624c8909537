"""Issue 13 items 5 and 8, attacked by an ordinary user (``pyoverlay-test``):

* item 5: root's containers and image store are closed to other host users. The
  runtime's base is a world-traversable directory (as /var/lib is), so only pyoverlay's
  own modes stand between the user and them: f323dfb let the user write into a running
  container's /tmp through its merged mount (allow_other) and plant a file in an
  imported layer's 1777 /tmp.
* item 8: a state dir that is not the user's own is refused, so a record planted there by
  another user cannot make the victim's ``pyoverlay rm`` delete the victim's image store
  (f323dfb did). "Another user" is uid 65534: root gives it the planted directory.

Real containers, real imports, real ``rm``; each attack succeeded on f323dfb.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from helpers import archives as A
from helpers import containers, rootfs
from helpers.containers import describe
from helpers.rootless import BASE, VENV_BIN

ATTACKER = 65534
CID = "ef" * 32


@pytest.fixture
def root_base():
    """A root-owned, world-traversable directory for a root runtime (like /var/lib)."""
    BASE.mkdir(mode=0o755, exist_ok=True)
    base = BASE / f"root-{uuid.uuid4().hex[:12]}"
    base.mkdir(mode=0o755)
    os.chmod(base, 0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def bare_image(tmp_path_factory):
    return rootfs.images(tmp_path_factory).bare


def one_line_error(r, code: int, *words) -> None:
    assert r.returncode == code, describe(r)
    assert "Traceback" not in r.stderr, describe(r)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyoverlay: "), describe(r)
    for w in words:
        assert w in lines[0], describe(r)


# --------------------------------------------------------------------------
# item 5
# --------------------------------------------------------------------------


@pytest.mark.needs_root
@pytest.mark.fuse
def test_other_user_cannot_write_into_a_running_container(user, root_base, bare_image):
    rt = containers.Runtime(root_base)
    with containers.leftover_check(rt):
        cid = rt.detach(bare_image.spec, "sleep", "1000")
        try:
            rt.wait_status(cid, ("running",))
            merged = rt.data / "containers" / cid / "merged"
            r = user.sh(f"echo planted > {merged}/tmp/planted")
            assert r.returncode != 0, "another host user wrote into the container's /tmp\n" + describe(r)
            r = user.sh(f"ls {rt.data}/containers")
            assert r.returncode != 0, "another host user lists the containers\n" + describe(r)
            ls = rt.ok("exec", cid, "ls", "-a", "/tmp").stdout.split()
            assert "planted" not in ls
        finally:
            rt.cli("rm", "-f", cid)


@pytest.mark.needs_root
def test_other_user_cannot_plant_files_in_image_layers(user, root_base, tmp_path):
    layer = A.layer_tar([A.D("tmp", mode=0o1777), A.F("etc/motd", b"hi\n")])
    arch = A.write_docker_save(tmp_path / "img.tar", [([layer], ["sec:1"])])
    rt = containers.Runtime(root_base)
    rt.ok("import", arch)
    layers = rt.data / "images" / "layers"
    (layer_dir,) = list(layers.iterdir())
    r = user.sh(f"echo planted > {layer_dir}/tmp/planted")
    assert r.returncode != 0, "another host user planted a file in an image layer\n" + describe(r)
    assert not (layer_dir / "tmp" / "planted").exists()
    r = user.sh(f"ls {rt.data}/images")
    assert r.returncode != 0, describe(r)


# --------------------------------------------------------------------------
# item 8
# --------------------------------------------------------------------------


def _victim_store(user) -> Path:
    """The victim's data dir (with containers/, there after any run) and image store, made
    by the victim (0700 as pyoverlay makes them)."""
    r = user.sh(
        f"mkdir -p -m 700 {user.data_dir}/images/blobs {user.data_dir}/containers && "
        f"echo mine > {user.data_dir}/images/blobs/keep"
    )
    assert r.returncode == 0, describe(r)
    return user.data_dir / "images" / "blobs" / "keep"


def _plant(state: Path, user) -> None:
    """Another user's state dir with a record whose data dir leads to the victim's store."""
    d = state / "containers" / CID
    d.mkdir(parents=True)
    rec = {
        "id": CID,
        "name": "bait",
        "command": ["true"],
        "status": "exited",
        "exit_code": 0,
        "created": time.time(),
        "finished": time.time(),
        "layers": [],
        "data_dir": f"{user.data_dir}/containers/..",
    }
    (d / "state.json").write_text(json.dumps(rec))
    for p in (state, state / "containers", d, d / "state.json"):
        os.chown(p, ATTACKER, ATTACKER)
        os.chmod(p, 0o644 if p.is_file() else 0o755)


@pytest.mark.needs_root
def test_planted_state_dir_is_refused(user):
    keep = _victim_store(user)
    planted = user.dir / "planted-state"
    _plant(planted, user)
    for args in (("rm", "bait"), ("rm", CID), ("ps", "-a")):
        r = user.pyoverlay(*args, env={"PYOVERLAY_STATE_DIR": str(planted)})
        assert keep.exists(), "the victim's rm deleted the victim's image store\n" + describe(r)
        one_line_error(r, 1, str(planted), f"uid {ATTACKER}")


@pytest.mark.needs_root
def test_planted_default_state_dir_in_tmp_is_refused(user):
    """The default rootless state dir, /tmp/pyoverlay-<uid>, pre-created by another user.
    When that path exists already (the user's real one), the planted dir is bound over it
    in a private mount namespace of the victim's commands only (gone when they exit)."""
    default = Path(f"/tmp/pyoverlay-{user.uid}")
    keep = _victim_store(user)
    pyoverlay = ["env", "-u", "PYOVERLAY_STATE_DIR", "-u", "XDG_RUNTIME_DIR", str(VENV_BIN / "pyoverlay")]
    existed = os.path.lexists(default)
    planted = user.dir / "planted-default" if existed else default
    try:
        _plant(planted, user)

        def victim(*args):
            argv = [str(a) for a in user.argv([*pyoverlay, *args])]
            if existed:
                script = 'mount --bind "$0" "$1" && shift && exec "$@"'
                argv = [
                    "unshare",
                    "--mount",
                    "--propagation",
                    "private",
                    "sh",
                    "-c",
                    script,
                    str(planted),
                    str(default),
                    *argv,
                ]
            return subprocess.run(argv, capture_output=True, text=True, env=user.env(), cwd=user.dir, timeout=60)

        r = victim("rm", CID)
        assert keep.exists(), "the victim's rm deleted the victim's image store\n" + describe(r)
        one_line_error(r, 1, str(default), f"uid {ATTACKER}")
        r = victim("ps")
        one_line_error(r, 1, str(default))
    finally:
        if not existed:
            shutil.rmtree(default, ignore_errors=True)


@pytest.mark.needs_root
def test_unreadable_state_dir_is_one_line(user, tmp_path):
    """A state dir the user cannot read (root's, 0700): f323dfb gave a traceback."""
    d = user.dir / "roots-state"
    d.mkdir(mode=0o700)
    r = user.pyoverlay("ps", env={"PYOVERLAY_STATE_DIR": str(d)})
    one_line_error(r, 1, str(d))


@pytest.mark.needs_root
def test_xdg_runtime_dir_only_when_it_is_the_users(user):
    """$XDG_RUNTIME_DIR/pyoverlay when that dir is the user's own 0700 one."""
    xdg = user.dir / "xdg"
    xdg.mkdir(mode=0o700)
    os.chown(xdg, user.uid, user.gid)
    code = "from overlayfs_py.state import state_dir; print(state_dir())"
    argv = ["env", "-u", "PYOVERLAY_STATE_DIR", f"XDG_RUNTIME_DIR={xdg}", VENV_BIN / "python", "-c", code]
    r = user.run(argv)
    assert r.returncode == 0 and r.stdout.strip() == f"{xdg}/pyoverlay", describe(r)
    assert (xdg / "pyoverlay").stat().st_mode & 0o777 == 0o700
