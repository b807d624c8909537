"""Issue 14, "Runner: plan, then execute": ``pyoverlay run`` decides everything and finds
every error it can know before it creates anything (runner/plan.py), then runs named
steps whose errors name the step and, for a mount, the path inside the container.

The plan tests build plans in-process, on small layer directories, without mounting
anything; the last ones run real containers (root) and check what the user sees.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from helpers.containers import describe
from runner import initlayer, state
from runner.cgroups import Limits
from runner.plan import PlanError, RunPlan, build
from runner.spec import RunSpec, Volume

ROOT = os.geteuid() == 0


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    """A private runtime (state and data dirs as the CLI makes them before planning) and
    a small image: /bin/sh a file, /etc a directory, no /proc, /dev or /sys."""
    monkeypatch.setenv("PYOVERLAY_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("PYOVERLAY_DATA_DIR", str(tmp_path / "data"))
    state.records_dir()
    state.data_dir()
    image = tmp_path / "image"
    (image / "bin").mkdir(parents=True)
    (image / "bin" / "sh").write_text("#!not a shell\n")
    (image / "etc").mkdir()
    (image / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (image / "srv").mkdir()
    vol = tmp_path / "vol"
    (vol / "inner").mkdir(parents=True)
    (tmp_path / "afile").write_text("x\n")
    return tmp_path


def snapshot(base: Path) -> list[str]:
    """Everything below the state and data dirs, and the image (nothing may appear)."""
    out = []
    for top in ("state", "data", "image", "vol"):
        for root, ds, fs in os.walk(base / top):
            out += [os.path.relpath(os.path.join(root, n), base) for n in ds + fs]
    return sorted(out)


def spec_of(base: Path, *, volumes=(), **kw) -> RunSpec:
    return RunSpec(layers=(str(base / "image"),), argv=["/bin/sh"], volumes=list(volumes), **kw)


def plan_of(spec: RunSpec, **kw) -> RunPlan:
    # rootless=False: the root plan (cgroup with device rules) is read-only to build, so it
    # is tested as any user; rootless plans are in tests/rootless
    kw.setdefault("rootless", False)
    return build(spec, **kw)


# --------------------------------------------------------------------------
# a plan is built without side effects, and says everything
# --------------------------------------------------------------------------


def test_plan_holds_every_decision_and_creates_nothing(dirs):
    before = snapshot(dirs)
    spec = spec_of(
        dirs,
        name="web",
        hostname="box",
        read_only=True,
        user="root",
        volumes=[
            Volume(str(dirs / "vol" / "inner"), "/srv/data/inner"),
            Volume(str(dirs / "vol"), "/srv/data", read_only=True),
            Volume(str(dirs / "afile"), "/etc/extra.conf"),
        ],
        limits=Limits(pids=50),
    )
    plan = plan_of(spec, detach=True)
    assert snapshot(dirs) == before, "planning created something"
    assert not os.path.exists(plan.paths.data)

    assert (plan.name, plan.hostname, plan.rootless) == ("web", "box", False)
    data = os.path.join(dirs, "data", "containers", plan.cid)
    assert plan.paths.data == data
    assert (plan.paths.upper, plan.paths.workdir, plan.paths.merged, plan.paths.init) == tuple(
        os.path.join(data, n) for n in ("upper", "work", "merged", "init")
    )
    assert plan.paths.output_log == os.path.join(data, "output.log") and not plan.paths.upper_given
    # the /etc files, with their text, bound from the data dir
    etc = {f.target: f for f in plan.etc_files}
    assert sorted(etc) == ["/etc/hostname", "/etc/hosts", "/etc/resolv.conf"]
    assert etc["/etc/hostname"].text == "box\n" and etc["/etc/hostname"].source == os.path.join(data, "hostname")
    assert "127.0.0.1\tbox\n" in etc["/etc/hosts"].text
    # volumes: parents before children, kinds fixed
    assert [(v.target, v.is_dir, v.read_only) for v in plan.volumes] == [
        ("/srv/data", True, True),
        ("/etc/extra.conf", False, False),
        ("/srv/data/inner", True, False),
    ]
    # the init layer: what the image lacks (proc, dev, sys, the /etc files, the volume targets)
    todo = sorted(need.path for need, _found, _missing in plan.init_layer.todo)
    assert todo == [
        "dev",
        "etc/extra.conf",
        "etc/hostname",
        "etc/hosts",
        "etc/resolv.conf",
        "proc",
        "srv/data",
        "srv/data/inner",
        "sys",
    ]
    # the overlay: the init layer on top of the image, the generated upper
    cfg = plan.mount
    assert cfg.lowerdirs == (plan.paths.init, str(dirs / "image"))
    assert (cfg.upperdir, cfg.workdir, cfg.mountpoint) == (plan.paths.upper, plan.paths.workdir, plan.paths.merged)
    assert cfg.container == plan.cid and cfg.fsname == f"pyoverlay-{plan.cid[:12]}"
    # the cgroup: decided, not created
    if plan.cgroup is not None:
        assert plan.cgroup.limits.pids == 50 and plan.cgroup.devices
        assert all(not os.path.exists(p) for p in plan.cgroup.paths.values())
    # frozen
    with pytest.raises(AttributeError):
        plan.hostname = "other"  # type: ignore[misc]


def test_plan_record_is_the_record_format(dirs):
    """The record the first step saves: a dataclass with today's JSON keys."""
    spec = spec_of(
        dirs,
        name="db",
        env=["A=1"],
        workdir="/srv",
        user="1:2",
        read_only=True,
        volumes=[Volume(str(dirs / "vol"), "/data", read_only=True)],
    )
    plan = plan_of(spec)
    rec = plan.record()
    d = rec.to_dict()
    assert {
        "id",
        "name",
        "command",
        "layers",
        "created",
        "status",
        "data_dir",
        "monitor_pid",
        "monitor_start",
        "spec",
    } <= set(d)
    assert d["status"] == "created" and d["id"] == plan.cid and d["data_dir"] == plan.paths.data
    assert d["spec"]["volumes"] == [f"{dirs / 'vol'}:/data:ro"]
    assert (d["spec"]["user"], d["spec"]["workdir"], d["spec"]["read_only"], d["spec"]["env"]) == (
        "1:2",
        "/srv",
        True,
        ["A=1"],
    )
    assert None not in d.values(), "unknown fields are left out, as before"
    again = state.Record.from_dict(json.loads(json.dumps(d)))
    assert again.to_dict() == d
    # keys this version does not know survive a load and a save
    d["future_key"] = {"x": 1}
    assert state.Record.from_dict(d).to_dict()["future_key"] == {"x": 1}
    with pytest.raises(state.StateError):
        state.Record.from_dict({**d, "pid": "12"})


def test_a_given_upper_is_planned_not_made(dirs, tmp_path):
    up = tmp_path / "keep" / "upper"
    plan = plan_of(spec_of(dirs, upper=str(up)))
    assert plan.paths.upper_given and plan.paths.upper == str(up)
    assert plan.paths.workdir == str(tmp_path / "keep" / ".upper.pyoverlay-work")
    assert not (tmp_path / "keep").exists()


# --------------------------------------------------------------------------
# bad input: raised while planning, nothing created
# --------------------------------------------------------------------------


def _bad_specs(base: Path) -> dict:
    gone = base / "gone"
    gone.mkdir()
    spec_gone = spec_of(base, volumes=[Volume(str(gone), "/data")])
    gone.rmdir()  # vanished after the options were parsed
    return {
        "upper inside a lower": (spec_of(base, upper=str(base / "image" / "srv" / "up")), PlanError, "overlap"),
        "lower inside the upper": (spec_of(base, upper=str(base)), PlanError, "overlap"),
        "hostname too long": (spec_of(base, hostname="h" * 65), PlanError, "invalid hostname"),
        "duplicate volume target": (
            spec_of(base, volumes=[Volume(str(base / "vol"), "/data"), Volume(str(base / "afile"), "/data")]),
            PlanError,
            "duplicate mount point /data",
        ),
        "volume source gone": (spec_gone, PlanError, "volume source"),
        "volume under a file of the image": (
            spec_of(base, volumes=[Volume(str(base / "vol"), "/bin/sh/x")]),
            initlayer.InitLayerError,
            "cannot mount on /bin/sh/x",
        ),
        "missing layer": (RunSpec(layers=(str(base / "nope"),), argv=["true"]), PlanError, "not a directory"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "upper inside a lower",
        "lower inside the upper",
        "hostname too long",
        "duplicate volume target",
        "volume source gone",
        "volume under a file of the image",
        "missing layer",
    ],
)
def test_bad_input_raises_while_planning_and_creates_nothing(dirs, case):
    spec, exc, words = _bad_specs(dirs)[case]
    before = snapshot(dirs)
    with pytest.raises(exc, match=words):
        plan_of(spec)
    assert snapshot(dirs) == before
    assert os.listdir(dirs / "data" / "containers") == []
    assert [n for n in os.listdir(dirs / "state" / "containers") if not n.startswith(".")] == []


def test_users_are_looked_up_in_the_image_while_planning(dirs):
    """``-u NAME`` is resolved in the image's /etc/passwd now, not after mounting; a known
    name, a numeric id (docker runs an unknown one with gid 0) and root plan fine."""
    from runner.spec import SpecError

    before = snapshot(dirs)
    with pytest.raises(SpecError, match="unable to find user nosuch: no matching entries in passwd file"):
        plan_of(spec_of(dirs, user="nosuch"))
    with pytest.raises(SpecError, match="unable to find group nogroup"):
        plan_of(spec_of(dirs, user="root:nogroup"))
    assert snapshot(dirs) == before
    for user in ("root", "0", "1234", "1234:5"):
        plan_of(spec_of(dirs, user=user))
    # a volume on /etc/passwd: only the container can tell
    plan_of(spec_of(dirs, user="nosuch", volumes=[Volume(str(dirs / "afile"), "/etc/passwd")]))
    # a symlinked /etc/passwd: only the container can tell (it resolves it inside)
    os.unlink(dirs / "image" / "etc" / "passwd")
    os.symlink("/elsewhere/passwd", dirs / "image" / "etc" / "passwd")
    plan_of(spec_of(dirs, user="nosuch"))


def test_rootless_single_map_refuses_an_unmapped_user_while_planning(dirs):
    """With a single-id user namespace only root exists inside: ``-u 1234`` is refused by
    the plan (f323dfb found it in PID 1, after mounting)."""
    spec = spec_of(dirs, user="1234", userns_map="single")
    before = snapshot(dirs)
    with pytest.raises(PlanError, match="cannot run as uid 1234 gid 0: not mapped"):
        build(spec, rootless=True)
    assert snapshot(dirs) == before
    build(spec_of(dirs, user="root", userns_map="single"), rootless=True)


def test_a_name_in_use_is_found_while_planning(dirs):
    state.save({"id": "a" * 64, "name": "taken", "created": 1.0, "status": "exited"})
    before = snapshot(dirs)
    with pytest.raises(PlanError, match="'taken' is already in use"):
        plan_of(spec_of(dirs, name="taken"))
    assert snapshot(dirs) == before


# --------------------------------------------------------------------------
# real runs (root): errors in one line, 125, nothing left; mount errors name the step
# and the path inside the container
# --------------------------------------------------------------------------

needs_root = pytest.mark.needs_root


def _runner_error(rt, r, *words) -> str:
    assert r.returncode == 125, describe(r)
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("pyoverlay: "), describe(r)
    assert "Traceback" not in r.stderr and "/proc/self/fd" not in r.stderr, describe(r)
    for w in words:
        assert w in err[0], describe(r)
    assert rt.state_entries() == [] and rt.data_entries() == [] and rt.mounts() == [], describe(r)
    return err[0]


@needs_root
@pytest.mark.usefixtures("_no_leftovers")
def test_upper_inside_a_lower_is_refused_before_it_is_made(rt, tmp_path):
    """f323dfb made ``--upper LOWER/x`` (inside the image) before checking the mount
    configuration, so a refused run still changed the image."""
    from helpers import rootfs

    lower = tmp_path / "img"
    rootfs.build_busybox_rootfs(lower)
    up = lower / "new-upper"
    _runner_error(rt, rt.run("--rm", "--upper", up, lower, "true"), "inside")
    assert not up.exists(), "the refused run created its upper layer inside the image"
    assert not (lower / ".new-upper.pyoverlay-work").exists()


@needs_root
@pytest.mark.usefixtures("_no_leftovers")
def test_too_long_hostname_is_refused_before_starting(rt, img):
    _runner_error(rt, rt.run("--rm", "-h", "h" * 65, img.spec, "true"), "invalid hostname")


@needs_root
@pytest.mark.usefixtures("_no_leftovers")
@pytest.mark.parametrize("target", ["/bin", "/dev/full/x"])
def test_failing_volume_mount_names_the_step_and_the_container_path(rt, img, tmp_path, target):
    """A file bound on the image's /bin directory, a directory under the /dev/full device
    node: the kernel refuses the mount in PID 1. The error names the step and the path
    inside the container, not the host path or /proc/self/fd/N."""
    src = tmp_path / "src"
    if target == "/bin":
        src.write_text("a file\n")
    else:
        src.mkdir()
    line = _runner_error(rt, rt.run("--rm", "-v", f"{src}:{target}", img.spec, "true"))
    assert line == f"pyoverlay: mounting volume {target}: Not a directory", line


@needs_root
@pytest.mark.usefixtures("_no_leftovers")
def test_upper_in_use_names_it(rt, img, tmp_path):
    """What can only be known by trying (the lock of another container's upper layer)
    fails in its step, still in one line and leaving nothing."""
    import fcntl

    up = tmp_path / "up"
    up.mkdir()
    work = tmp_path / ".up.pyoverlay-work"
    work.mkdir()
    fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _runner_error(rt, rt.run("--rm", "--upper", up, img.spec, "true"), f"upper layer {up} is in use")
    finally:
        os.close(fd)
    assert stat.S_ISDIR(os.lstat(up).st_mode)
