"""The runner's pure parts, without namespaces or FUSE: option parsing, users, the
init layer (on real layer directories), container records and exit codes."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys

import pytest

from runner import control, initlayer, spec, state
from runner.init import exit_code
from runner.spec import SpecError

# --- options ----------------------------------------------------------------------------


def test_parse_volume(tmp_path):
    v = spec.parse_volume(f"{tmp_path}:/data")
    assert (v.host, v.target, v.read_only) == (str(tmp_path), "/data", False)
    assert spec.parse_volume(f"{tmp_path}:/a/b/:ro") == spec.Volume(str(tmp_path), "/a/b", True)
    for bad in (
        "x",
        f"{tmp_path}:rel",
        f"{tmp_path}:/",
        f"{tmp_path}:/a:rx",
        f"{tmp_path}:/a/../b",
        f"{tmp_path}/missing:/a",
        f"{tmp_path}:/a:ro:x",
    ):
        with pytest.raises(SpecError):
            spec.parse_volume(bad)


def test_parse_env_takes_bare_names_from_the_caller():
    env = {"HOME": "/h", "EMPTY": ""}
    assert spec.parse_env(["A=1", "HOME", "UNSET", "EMPTY", "B=x=y"], env) == ["A=1", "HOME=/h", "EMPTY=", "B=x=y"]
    with pytest.raises(SpecError):
        spec.parse_env(["=x"], env)


def test_build_env_order_and_overrides():
    env = spec.build_env(["PATH=/x", "FOO=1", "FOO=2"], "h1", "/root", tty=True)
    assert env == ["PATH=/x", "HOSTNAME=h1", "TERM=xterm", "FOO=2", "HOME=/root"]
    assert spec.build_env([], "h", "/", tty=False)[0] == f"PATH={spec.DEFAULT_PATH}"


def test_caps():
    assert sum(1 << c for c in spec.DOCKER_DEFAULT_CAPS) == 0xA80425FB  # docker's CapBnd (containers: test_run.py)
    s = spec.RunSpec(
        layers=("/",), argv=["sh"], cap_add=spec.parse_caps(["sys_admin"]), cap_drop=spec.parse_caps(["CAP_NET_RAW"])
    )
    caps = s.caps()
    assert spec.CAPS["SYS_ADMIN"] in caps and spec.CAPS["NET_RAW"] not in caps
    assert spec.RunSpec(layers=("/",), argv=["sh"], privileged=True).caps() is None
    assert spec.RunSpec(layers=("/",), argv=["sh"], cap_drop=spec.parse_caps(["ALL"])).caps() == frozenset()
    with pytest.raises(SpecError):
        spec.parse_cap("FLY")


def test_names_and_network_and_workdir():
    assert spec.check_name("web-1.a_b") == "web-1.a_b"
    for bad in ("", "-x", "a/b", "a b"):
        with pytest.raises(SpecError):
            spec.check_name(bad)
    assert spec.parse_network("host") == "host"
    assert spec.parse_network("bridge") == spec.parse_network("default") == "bridge"
    for bad in ("macvlan", "slirp4netns:mtu=9", "nosuchnet"):
        with pytest.raises(SpecError):
            spec.parse_network(bad)
    assert spec.check_workdir("/a/./b/") == "/a/b"
    with pytest.raises(SpecError):
        spec.check_workdir("rel")


PASSWD = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n"
GROUP = "root:x:0:\nusers:x:100:app,bob\napp:x:1001:\nstaff:x:50:\n"


@pytest.mark.parametrize(
    "user, expect",
    [
        (None, (0, 0, (), "/root")),
        ("app", (1000, 1001, (100,), "/home/app")),
        ("1000", (1000, 1001, (100,), "/home/app")),  # a known uid finds its entry
        ("2000", (2000, 0, (), "/")),  # unknown uid: gid 0, as docker
        ("app:staff", (1000, 50, (100,), "/home/app")),
        ("2000:77", (2000, 77, (), "/")),
        ("0", (0, 0, (), "/root")),
    ],
)
def test_resolve_user(user, expect):
    ids = spec.resolve_user(user, PASSWD, GROUP)
    assert (ids.uid, ids.gid, ids.groups, ids.home) == expect


def test_resolve_user_errors():
    with pytest.raises(SpecError, match="unable to find user nobody"):
        spec.resolve_user("nobody", PASSWD, GROUP)
    with pytest.raises(SpecError, match="unable to find group wheel"):
        spec.resolve_user("app:wheel", PASSWD, GROUP)


def test_exit_codes_and_signals():
    def status_of(code: str) -> int:
        p = subprocess.Popen([sys.executable, "-c", code])
        return os.waitpid(p.pid, 0)[1]

    assert exit_code(status_of("raise SystemExit(7)")) == 7
    assert exit_code(status_of("import os, signal; os.kill(os.getpid(), signal.SIGTERM)")) == 143
    assert control.parse_signal("term") == signal.SIGTERM
    assert control.parse_signal("SIGKILL") == 9 and control.parse_signal("15") == 15
    with pytest.raises(ValueError):
        control.parse_signal("NOPE")


# --- the init layer (real directories, kernel-format whiteouts) ---------------------------

needs_root = pytest.mark.needs_root


def _needs(*items):
    return [initlayer.Needed(p, k, r) for p, k, r in items]


@needs_root
def test_init_layer_supplies_only_what_is_missing(tmp_path):
    base, top, init = tmp_path / "base", tmp_path / "top", tmp_path / "init"
    (base / "etc").mkdir(parents=True)
    (base / "etc" / "hosts").write_text("image hosts\n")
    (base / "proc").mkdir()
    (base / "data").mkdir()
    os.chmod(base / "etc", 0o750)
    os.chown(base / "etc", 12, 34)
    os.utime(base / "etc", ns=(1_000_000_000, 2_000_000_000))
    top.mkdir()
    os.mknod(top / "data", stat.S_IFCHR, 0)  # the top layer whites out /data
    needed = _needs(
        ("proc", "dir", True),
        ("dev", "dir", True),
        ("etc/hostname", "file", False),
        ("etc/hosts", "file", False),
        ("data/x", "dir", True),
    )
    usable = initlayer.build(str(init), (str(top), str(base)), None, False, needed)
    assert sorted(usable) == sorted(["proc", "dev", "etc/hostname", "etc/hosts", "data/x"])
    assert sorted(os.listdir(init)) == ["data", "dev", "etc"]  # proc exists in the image
    assert os.listdir(init / "etc") == ["hostname"]  # hosts exists too
    st = os.lstat(init / "etc")  # looks like the image's /etc
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns) == (0o750, 12, 34, 2_000_000_000)
    assert os.path.isdir(init / "data" / "x")  # /data is whited out: all new
    assert stat.S_IMODE(os.lstat(init / "data").st_mode) == 0o755


@needs_root
def test_init_layer_never_follows_a_symlink_in_the_image(tmp_path):
    base, init, outside = tmp_path / "base", tmp_path / "init", tmp_path / "outside"
    base.mkdir()
    outside.mkdir()
    os.symlink(str(outside), base / "etc")  # absolute symlink out of the image
    os.symlink("/", base / "sys")
    needed = _needs(("etc/hosts", "file", False), ("sys", "dir", True))
    usable = initlayer.build(str(init), (str(base),), None, False, needed)
    assert usable == ["sys"]  # exists (as a symlink: the mount resolves it in the root)
    assert os.listdir(outside) == [] and not (init / "etc").exists()
    with pytest.raises(initlayer.InitLayerError, match="not a directory"):
        initlayer.build(str(init), (str(base),), None, False, _needs(("etc/x", "dir", True)))


# --- records --------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("PYOVERLAY_STATE_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("PYOVERLAY_DATA_DIR", str(tmp_path / "data"))
    return tmp_path


def _rec(cid, name, **kw):
    return {"id": cid, "name": name, "created": len(cid), "status": "exited", **kw}


def test_resolve_by_id_name_and_prefix(store):
    state.save(_rec("abc123" + "0" * 58, "web"))
    state.save(_rec("abd456" + "0" * 58, "db"))
    assert state.resolve("web")["name"] == "web"
    assert state.resolve("abd")["name"] == "db"
    with pytest.raises(state.StateError, match="ambiguous"):
        state.resolve("ab")
    with pytest.raises(state.StateError, match="no such container"):
        state.resolve("zzz")
    assert state.name_taken("db") and not state.name_taken("x")


def test_a_running_record_whose_monitor_is_gone_is_dead(store):
    from runner import _linux

    p = subprocess.Popen(["sleep", "30"])
    try:
        rec = _rec("f" * 64, "x", status="running", monitor_pid=p.pid, monitor_start=_linux.process_start_time(p.pid))
        assert state.status(rec) == "running"
        rec["monitor_start"] += 1  # same pid, another process: a recycled pid
        assert state.status(rec) == "dead"
    finally:
        p.kill()
        p.wait()
    rec["monitor_start"] -= 1
    assert state.status(rec) == "dead"


@needs_root
def test_remove_refuses_while_something_is_mounted_below(store):
    data = os.path.join(state.data_dir(), "e" * 64)
    merged = os.path.join(data, "merged")
    os.makedirs(merged)
    rec = _rec("e" * 64, "m", data_dir=data)
    state.save(rec)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", merged], check=True)
    try:
        with open(os.path.join(merged, "precious"), "w") as f:
            f.write("x")
        with pytest.raises(state.StateError, match="still mounted"):
            state.remove(rec)
        assert os.path.exists(os.path.join(merged, "precious"))
    finally:
        subprocess.run(["umount", merged], check=True)
    state.remove(rec)
    assert not os.path.exists(data) and state.load(rec["id"]) is None


def test_ps_table_statuses():
    rows = [
        dict(
            id="a" * 64,
            name="up",
            command=["sleep", "1000"],
            status="running",
            pid=42,
            layers=["/l1", "/l2"],
            upper="/u",
            created=100.0,
            finished=None,
            exit_code=None,
        ),
        dict(
            id="b" * 64,
            name="gone",
            command=["sh", "-c", "x" * 40],
            status="exited",
            pid=7,
            layers=["/l"],
            upper="/u2",
            created=0.0,
            finished=40.0,
            exit_code=137,
            oom_killed=True,
        ),
    ]
    text = control.ps_table(rows, 220.0)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["CONTAINER", "ID", "NAME"]
    assert "Up 2 minutes" in lines[1] and " 42 " in lines[1]
    assert "Exited (137) 3 minutes ago (OOM killed)" in lines[2] and '..."' in lines[2]
