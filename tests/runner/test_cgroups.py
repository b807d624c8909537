"""runner.cgroups: sizes, layout detection, a fake v2 tree, and real cgroups.

The real tests need root and create cgroups under the parent
"pyoverlay-test" (never "pyoverlay", so they cannot touch real containers);
every cgroup and child process is cleaned up by fixture finalizers.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from runner.cgroups import Cgroup, CgroupError, Layout, Limits, detect, parse_size

PARENT = "pyoverlay-test"
MiB = 1 << 20

V1_MOUNTINFO = """\
22 1 0:20 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 22 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset,clone_children
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
"""

HYBRID_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / {unified} rw,relatime - cgroup2 cgroup2 rw
"""


def v2_mountinfo(root) -> str:
    return (
        "24 1 0:22 / /proc rw,nosuid - proc proc rw\n"
        f"30 23 0:26 / {root} rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 "
        "rw,nsdelegate,memory_recursiveprot\n"
    )


# --------------------------------------------------------------------------
# pure
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, value",
    [
        ("1024", 1024),
        ("10b", 10),
        ("512k", 512 << 10),
        ("64m", 64 * MiB),
        ("64M", 64 * MiB),
        ("1g", 1 << 30),
        ("2G", 2 << 30),
        ("1", 1),
        ("1.5g", 3 << 29),
        ("64mb", 64 * MiB),
        ("64MiB", 64 * MiB),
        ("1t", 1 << 40),
        (" 8 k ", 8 << 10),
        (str(1 << 60), 1 << 60),
    ],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize(
    "text", ["", "m", "0", "0m", "0.0001k", "-1", "1e6", "1p", "64mib2", "ten", "1 g 2", "ib", "5i"]
)
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)


def test_limits():
    assert not Limits().any()
    assert Limits(memory=1).any() and Limits(pids=1).any() and Limits(cpus=0.5).any()
    for bad in (dict(memory=0), dict(pids=-1), dict(cpus=0), dict(cpus=0.001), dict(cpus=float("inf"))):
        with pytest.raises(ValueError):
            Limits(**bad)


def test_detect_v1_comounted():
    layout = detect(V1_MOUNTINFO)
    assert layout.mode == "v1"
    assert layout.v2_root is None and layout.v2_controllers == frozenset()
    assert layout.v1 == {
        "cpu": "/sys/fs/cgroup/cpu,cpuacct",
        "cpuacct": "/sys/fs/cgroup/cpu,cpuacct",
        "cpuset": "/sys/fs/cgroup/cpuset",
        "memory": "/sys/fs/cgroup/memory",
        "pids": "/sys/fs/cgroup/pids",
    }


def test_detect_v2(tmp_path):
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma misc\n")
    layout = detect(v2_mountinfo(tmp_path))
    assert layout.mode == "v2" and layout.v1 == {} and layout.v2_root == str(tmp_path)
    assert layout.v2_controllers == {"cpuset", "cpu", "io", "memory", "hugetlb", "pids", "rdma", "misc"}


def test_detect_hybrid(tmp_path):
    unified = tmp_path / "uni\\040fied"  # mountinfo escapes spaces as \040
    (tmp_path / "uni fied").mkdir()
    (tmp_path / "uni fied" / "cgroup.controllers").write_text("hugetlb\n")
    layout = detect(HYBRID_MOUNTINFO.format(unified=unified))
    assert layout.mode == "hybrid"
    assert layout.v2_root == str(tmp_path / "uni fied")
    assert layout.v2_controllers == {"hugetlb"}
    assert set(layout.v1) == {"cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids"}
    assert layout.v1["cpu"] == "/sys/fs/cgroup/cpu"


def test_detect_nothing():
    assert detect("24 1 0:22 / /proc rw - proc proc rw\n").mode == "none"


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "/abs", "x\0y"])
def test_create_rejects_bad_names(tmp_path, name):
    with pytest.raises(ValueError, match="single path component"):
        Cgroup.create(name, Limits(), Layout("v2", {}, str(tmp_path), frozenset()), parent=PARENT)


def test_from_dict_rejects_garbage():
    for bad in ({}, {"name": "x"}, {"name": "x", "paths": {"memory": 3}}, {"paths": {}}, []):
        with pytest.raises(CgroupError):
            Cgroup.from_dict(bad)


# --------------------------------------------------------------------------
# fake trees in tmp_path (plain directories, not cgroupfs)
# --------------------------------------------------------------------------


def fake_v2(tmp_path, controllers="cpuset cpu io memory pids") -> Layout:
    root = tmp_path / "cgroup2"
    root.mkdir()
    (root / "cgroup.controllers").write_text(controllers + "\n")
    (root / "cgroup.subtree_control").write_text("")
    return detect(v2_mountinfo(root))


def test_fake_v2_create_writes_limits_and_remove(tmp_path):
    layout = fake_v2(tmp_path)
    root = Path(layout.v2_root)
    cg = Cgroup.create("c1", Limits(memory=32 * MiB, pids=20, cpus=0.5), layout, parent=PARENT)
    d = root / PARENT / "c1"
    assert cg.paths == {"memory": str(d), "pids": str(d), "cpu": str(d), "unified": str(d)}
    assert (root / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    assert (root / PARENT / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    assert (d / "memory.max").read_text() == str(32 * MiB)
    assert (d / "pids.max").read_text() == "20"
    assert (d / "cpu.max").read_text() == "50000 100000"
    assert Cgroup.from_dict(cg.to_dict()) == cg

    # a real cgroupfs directory is empty for rmdir; a fake one holds the files we wrote
    for f in ("memory.max", "pids.max", "cpu.max"):
        (d / f).unlink()
    cg.remove()
    assert not d.exists() and (root / PARENT).is_dir()  # the shared parent stays
    cg.remove()  # idempotent


def test_fake_v2_without_limits_or_controllers(tmp_path):
    layout = fake_v2(tmp_path, controllers="hugetlb")
    cg = Cgroup.create("c2", Limits(), layout, parent=PARENT)
    assert cg.paths == {"unified": str(Path(layout.v2_root) / PARENT / "c2")}
    assert (Path(layout.v2_root) / "cgroup.subtree_control").read_text() == ""
    assert cg.procs() == [] and cg.oom_killed() is False
    assert not any((Path(cg.paths["unified"]) / f).exists() for f in ("memory.max", "pids.max", "cpu.max"))
    cg.remove()
    assert not Path(cg.paths["unified"]).exists()


def test_fake_v2_missing_controller(tmp_path):
    layout = fake_v2(tmp_path, controllers="cpu pids")
    with pytest.raises(CgroupError, match=r"cannot limit memory: no memory controller.*offers: cpu, pids"):
        Cgroup.create("c3", Limits(memory=MiB), layout, parent=PARENT)
    assert not (Path(layout.v2_root) / PARENT).exists()  # nothing created


def test_fake_hybrid_uses_v2_only_for_what_v1_lacks(tmp_path):
    layout = fake_v2(tmp_path, controllers="pids hugetlb")
    (tmp_path / "memory").mkdir()
    layout = Layout("hybrid", {"memory": str(tmp_path / "memory")}, layout.v2_root, layout.v2_controllers)
    cg = Cgroup.create("c6", Limits(memory=64 * MiB, pids=5), layout, parent=PARENT)
    mem, uni = tmp_path / "memory" / PARENT / "c6", Path(layout.v2_root) / PARENT / "c6"
    assert cg.paths == {"memory": str(mem), "pids": str(uni), "unified": str(uni)}
    assert (mem / "memory.limit_in_bytes").read_text() == str(64 * MiB)
    assert (uni / "pids.max").read_text() == "5"
    assert (Path(layout.v2_root) / "cgroup.subtree_control").read_text() == "+pids"
    (mem / "memory.limit_in_bytes").unlink()
    (uni / "pids.max").unlink()
    cg.remove()
    assert not mem.exists() and not uni.exists()


def test_fake_v1_half_way_failure_is_undone(tmp_path):
    for h in ("memory", "pids", "cpu,cpuacct"):
        (tmp_path / h).mkdir()
    (tmp_path / "pids" / PARENT).write_text("not a directory")
    layout = Layout(
        "v1",
        {"memory": str(tmp_path / "memory"), "pids": str(tmp_path / "pids"), "cpu": str(tmp_path / "cpu,cpuacct")},
        None,
        frozenset(),
    )
    with pytest.raises(CgroupError, match="cannot create cgroup"):
        Cgroup.create("c4", Limits(), layout, parent=PARENT)
    assert not (tmp_path / "memory" / PARENT / "c4").exists()
    assert not (tmp_path / "cpu,cpuacct" / PARENT / "c4").exists()


def test_fake_existing_cgroup_is_an_error_and_kept(tmp_path):
    layout = fake_v2(tmp_path)
    (Path(layout.v2_root) / PARENT / "c5").mkdir(parents=True)
    with pytest.raises(CgroupError, match="already exists"):
        Cgroup.create("c5", Limits(), layout, parent=PARENT)
    assert (Path(layout.v2_root) / PARENT / "c5").is_dir()


# --------------------------------------------------------------------------
# real cgroups (root)
# --------------------------------------------------------------------------


@pytest.fixture
def real_layout():
    if os.geteuid() != 0:
        pytest.skip("needs root (creates cgroups)")
    return detect()


@pytest.fixture(scope="module", autouse=True)
def _remove_test_parents():
    """Cgroup.remove() keeps the shared parent; the tests' own parent goes at the end."""
    yield
    layout = detect()
    for mount in {*layout.v1.values(), *([layout.v2_root] if layout.v2_root else [])}:
        try:
            os.rmdir(os.path.join(mount, PARENT))
        except OSError:
            pass  # absent, or still in use


@pytest.fixture
def make_cgroup():
    """Create real cgroups; the finalizer kills their processes and removes them."""
    made = []

    def make(limits, layout=None):
        name = f"t{os.getpid()}-{secrets.token_hex(4)}"
        cg = Cgroup.create(name, limits, layout, parent=PARENT)
        made.append(cg)
        return cg

    yield make
    for cg in made:
        cg.kill_all()
        cg.remove()


@pytest.fixture
def spawn():
    """Popen children that wait for one byte on stdin (sent by go()) before working."""
    children = []

    def start(argv, **kw):
        p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)
        children.append(p)
        return p

    yield start
    for p in children:
        if p.poll() is None:
            p.kill()
        p.communicate(timeout=10)


def go(p, timeout=60):
    out, err = p.communicate(b"x", timeout=timeout)
    return out.decode(), err.decode()


WAIT = "import sys; sys.stdin.read(1); "
HOG = WAIT + "b = bytearray(64 << 20); b[::4096] = b'x' * len(range(0, len(b), 4096)); print('survived')"
FORK_40 = "read x; i=0; while [ $i -lt 40 ]; do sleep 30 >/dev/null 2>&1 & i=$((i+1)); done; echo started"


def need_v1(layout, *controllers):
    missing = [c for c in controllers if c not in layout.v1]
    if missing:
        pytest.skip(f"no cgroup v1 {', '.join(missing)} controller here ({layout.mode})")


def assert_gone(layout, cg):
    for mount in {*layout.v1.values(), *([layout.v2_root] if layout.v2_root else [])}:
        assert not os.path.exists(os.path.join(mount, PARENT, cg.name)), mount


def test_real_v1_limits_files(real_layout, make_cgroup):
    need_v1(real_layout, "memory", "pids", "cpu")
    cg = make_cgroup(Limits(memory=32 * MiB, pids=20, cpus=0.5))
    read = lambda c, f: Path(cg.paths[c], f).read_text().strip()  # noqa: E731
    assert read("memory", "memory.limit_in_bytes") == str(32 * MiB)
    assert read("pids", "pids.max") == "20"
    assert read("cpu", "cpu.cfs_period_us") == "100000"
    assert read("cpu", "cpu.cfs_quota_us") == "50000"
    for c in ("memory", "pids", "cpu"):
        assert cg.paths[c] == os.path.join(real_layout.v1[c], PARENT, cg.name)
    assert read("memory", "memory.usage_in_bytes") == "0" and read("pids", "pids.current") == "0"
    cg.remove()
    assert_gone(real_layout, cg)


def test_real_v1_without_limits_still_tracks_pids(real_layout, make_cgroup, spawn):
    need_v1(real_layout, "pids")
    cg = make_cgroup(Limits())
    assert cg.paths["pids"] == os.path.join(real_layout.v1["pids"], PARENT, cg.name)
    p = spawn(["sleep", "60"])
    cg.add(p.pid)
    assert cg.procs() == [p.pid]
    assert Path(cg.paths["pids"], "pids.current").read_text().strip() == "1"
    assert Path(cg.paths["pids"], "pids.max").read_text().strip() == "max"  # no limit
    cg.kill_all()
    assert p.wait(timeout=10) == -signal.SIGKILL
    assert cg.procs() == []
    cg.remove()
    assert_gone(real_layout, cg)


def test_real_v1_memory_limit_oom_kills(real_layout, make_cgroup, spawn):
    need_v1(real_layout, "memory")
    cg = make_cgroup(Limits(memory=32 * MiB))
    p = spawn([sys.executable, "-c", HOG])
    cg.add(p.pid)
    assert cg.procs() == [p.pid] and not cg.oom_killed()
    out, _ = go(p)
    assert p.returncode == -signal.SIGKILL and "survived" not in out
    assert cg.oom_killed()
    cg.remove()
    assert_gone(real_layout, cg)


def test_real_v1_pids_limit_stops_forks(real_layout, make_cgroup, spawn):
    need_v1(real_layout, "pids")
    cg = make_cgroup(Limits(pids=20))
    p = spawn(["sh", "-c", FORK_40])
    cg.add(p.pid)
    out, err = go(p)
    assert p.returncode != 0 and "started" not in out
    assert "fork" in err.lower(), err
    left = cg.procs()
    assert 0 < len(left) <= 20  # the sleeps that did start
    cg.kill_all()
    assert cg.procs() == []
    cg.remove()
    assert_gone(real_layout, cg)


def test_real_to_dict_reopens(real_layout, make_cgroup, spawn):
    cg = make_cgroup(Limits())
    again = Cgroup.from_dict(cg.to_dict())
    p = spawn(["sleep", "60"])
    again.add(p.pid)
    assert cg.procs() == [p.pid]
    again.kill_all()
    assert p.wait(timeout=10) == -signal.SIGKILL
    again.remove()
    assert_gone(real_layout, cg)


def test_real_remove_refuses_busy_cgroup(real_layout, make_cgroup, spawn):
    cg = make_cgroup(Limits())
    p = spawn(["sleep", "60"])
    cg.add(p.pid)
    with pytest.raises(CgroupError, match=rf"cannot remove cgroup .*busy.*{p.pid}"):
        cg.remove(timeout=0.2)


def forced_v2(layout) -> Layout:
    if layout.v2_root is None:
        pytest.skip("no cgroup2 mount here")
    return Layout("v2", {}, layout.v2_root, layout.v2_controllers)


def test_real_v2_membership_and_cgroup_kill(real_layout, make_cgroup, spawn):
    layout = forced_v2(real_layout)
    cg = make_cgroup(Limits(), layout)
    d = os.path.join(layout.v2_root, PARENT, cg.name)
    assert cg.paths["unified"] == d and os.path.isdir(d)
    p = spawn(["sleep", "60"])
    cg.add(p.pid)
    assert cg.procs() == [p.pid]
    assert f"0::/{PARENT}/{cg.name}\n" in Path(f"/proc/{p.pid}/cgroup").read_text()
    cg.kill_all()  # through cgroup.kill when the kernel has it
    assert p.wait(timeout=10) == -signal.SIGKILL
    cg.remove()
    assert not os.path.exists(d)


def test_real_v2_limits(real_layout, make_cgroup, spawn):
    layout = forced_v2(real_layout)
    if not {"memory", "pids"} <= layout.v2_controllers:
        pytest.skip("no memory/pids controllers in cgroup v2 here")
    cg = make_cgroup(Limits(memory=32 * MiB, pids=20), layout)
    d = Path(cg.paths["unified"])
    assert (d / "memory.max").read_text().strip() == str(32 * MiB)
    assert (d / "pids.max").read_text().strip() == "20"
    p = spawn([sys.executable, "-c", HOG])
    cg.add(p.pid)
    go(p)
    assert p.returncode == -signal.SIGKILL and cg.oom_killed()
    cg.remove()
    assert not d.exists()
