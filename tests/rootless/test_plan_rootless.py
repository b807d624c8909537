"""Issue 14: the plan of a rootless run (runner/plan.py) is built by the ordinary user
without root, without a user namespace and without creating anything: the id maps, the
server's maps and the owner of what the container's root creates are decided there."""

from __future__ import annotations

import json
import os

from helpers.rootless import VENV_BIN, busybox_image

SCRIPT = """
import json, os, sys
from runner import state
from runner.plan import build
from runner.spec import RunSpec, Volume
state.records_dir(); state.data_dir()   # what the CLI makes before planning
img, vol = sys.argv[1], sys.argv[2]
spec = RunSpec(layers=(img,), argv=["true"], hostname="box", read_only=True, user="root",
               volumes=[Volume(vol, "/data")], userns_map="single")
p = build(spec)
print(json.dumps({"rootless": p.rootless, "mode": p.userns.maps.mode,
                  "users_image": p.userns.users_image, "new_owner": p.userns.new_owner,
                  "uidmap": p.mount.uidmap, "cgroup": p.cgroup is not None,
                  "hostname": p.hostname, "data": p.paths.data,
                  "data_exists": os.path.exists(p.paths.data),
                  "todo": sorted(n.path for n, _f, _m in p.init_layer.todo)}))
"""


def _walk(top) -> list[str]:
    return sorted(os.path.join(r, n) for r, ds, fs in os.walk(top) for n in ds + fs)


def test_rootless_plan_is_built_by_the_user_and_creates_nothing(user):
    img = busybox_image(user, "img", owned_by_user=True)
    (vol,) = user.mkdirs("vol")
    r = user.run([VENV_BIN / "python", "-c", SCRIPT, img, vol])
    assert r.returncode == 0, r.stderr
    before = _walk(user.dir)
    r = user.run([VENV_BIN / "python", "-c", SCRIPT, img, vol])
    assert r.returncode == 0, r.stderr
    assert _walk(user.dir) == before, "planning created something"
    p = json.loads(r.stdout)
    assert p["rootless"] and p["mode"] == "single" and p["users_image"]
    assert p["new_owner"] == [user.uid, user.gid]  # the user's files are root's inside
    assert p["uidmap"] == [[user.uid, 0, 1]]  # the server's map: stored UID shown as 0
    assert not p["cgroup"] and p["hostname"] == "box" and not p["data_exists"]
    assert "data" in p["todo"] and "proc" in p["todo"]


def test_unmapped_user_is_refused_before_anything_is_made(user):
    """``-u 1000`` with a single-id map: one line, 125, nothing left (found by the plan
    now; f323dfb found it in PID 1, after mounting, with the same words)."""
    img = busybox_image(user, "img", owned_by_user=False)
    r = user.pyoverlay("run", "--rm", "--userns-map", "single", "-u", "1000", img, "true")
    assert r.returncode == 125, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pyoverlay: cannot run as uid 1000 gid ") and "not mapped" in err[0], (
        r.stderr
    )
    for d in (user.state_dir / "containers", user.data_dir / "containers"):
        assert not d.exists() or [n for n in os.listdir(d) if not n.startswith(".")] == [], os.listdir(d)
    assert not (user.data_dir / "containers").exists() or not any((user.data_dir / "containers").iterdir())
