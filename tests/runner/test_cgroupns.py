"""The cgroup namespace (``--cgroupns private|host``) and the read-only ``/sys/fs/cgroup``
inside (docs/runner.md, "Cgroup namespace").

The default follows the host's cgroups as dockerd's does (private on v2, host on v1 or
hybrid): checked on mountinfo texts of each layout. The rest runs real containers on this
machine (hybrid: v1 controllers and an empty cgroup2): /proc/self/cgroup inside, the
mounts at /sys/fs/cgroup compared with the host's hierarchies, the limits read from inside,
EROFS on writes, ``exec`` in the same cgroup namespace, a bad value, and rootless runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from helpers import containers, rootless
from helpers.containers import describe
from overlayfs_py import mountinfo
from runner.cgroups import cgroup_version, default_cgroupns, detect

pytestmark = pytest.mark.timeout(180)

V1 = """\
31 22 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,release_agent=/x,name=systemd
"""
HYBRID = V1 + "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
V2 = "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"


def _host_cgroupns() -> str:
    return os.readlink("/proc/self/ns/cgroup")


def _lines(text: str) -> dict[str, str]:
    """/proc/self/cgroup as {hierarchy: path}."""
    return dict(line.split(":", 2)[1:] for line in text.splitlines() if line.count(":") >= 2)


def _cgroup_mounts(text: str) -> list[mountinfo.Mount]:
    """The mounts at or under /sys/fs/cgroup in a mountinfo *text*."""
    return [
        m
        for m in mountinfo.parse(text)
        if m.mountpoint == "/sys/fs/cgroup" or m.mountpoint.startswith("/sys/fs/cgroup/")
    ]


def _v1_names() -> list[str]:
    """The host's v1 hierarchies as the container's /sys/fs/cgroup names them."""
    return sorted(os.path.basename(mp) for mp, _ in detect().v1_hierarchies)


def _need_v1():
    if not detect().v1_hierarchies:
        pytest.skip("no cgroup v1 hierarchy on this machine (the v1 layout of /sys/fs/cgroup)")


def _run(rt, img, *opts, script: str):
    r = rt.run("--rm", *opts, img.spec, "sh", "-c", script)
    assert r.returncode == 0, describe(r)
    return r.stdout


# --- the default: the host's layout decides, in one place -------------------------------------


@pytest.mark.parametrize("text, mode, version", [(V1, "host", "1"), (HYBRID, "host", "1"), (V2, "private", "2")])
def test_default_follows_the_hosts_cgroups_as_dockerd(tmp_path, text, mode, version):
    layout = detect(text)
    assert default_cgroupns(layout) == mode
    assert cgroup_version(layout) == version


def test_detect_lists_every_v1_hierarchy_named_ones_too():
    assert detect(V1).v1_hierarchies == (
        ("/sys/fs/cgroup/cpu,cpuacct", "cpu,cpuacct"),
        ("/sys/fs/cgroup/memory", "memory"),
        ("/sys/fs/cgroup/systemd", "name=systemd"),
    )
    assert detect(V2).v1_hierarchies == ()


# --- private and host, for real -----------------------------------------------------------------


@pytest.mark.usefixtures("_no_leftovers")
def test_private_shows_root_paths_and_its_own_namespace(rt, img):
    out = _run(rt, img, "--cgroupns", "private", script="readlink /proc/self/ns/cgroup; cat /proc/self/cgroup")
    ns, _, cgroup = out.partition("\n")
    assert ns != _host_cgroupns()
    paths = _lines(cgroup)
    assert paths and set(paths.values()) == {"/"}, out


@pytest.mark.usefixtures("_no_leftovers")
@pytest.mark.parametrize("opts", [("--cgroupns", "host"), ()], ids=["host", "default"])
def test_host_shows_the_containers_host_path(rt, img, opts):
    """--cgroupns host; and, this machine being hybrid, the default (dockerd's too)."""
    _need_v1()
    assert default_cgroupns() == "host"
    out = _run(rt, img, *opts, script="hostname; readlink /proc/self/ns/cgroup; cat /proc/self/cgroup")
    hostname, ns, cgroup = out.split("\n", 2)
    assert ns == _host_cgroupns()
    paths = _lines(cgroup)
    for _, held in detect().v1_hierarchies:  # in its own cgroup in every v1 hierarchy, as docker
        assert paths[held].startswith(f"/pyoverlay/{hostname}"), (held, out)  # hostname: the id's first 12


@pytest.mark.usefixtures("_no_leftovers")
def test_record_says_the_mode(rt, img):
    cid = rt.detach("--cgroupns", "private", img.spec, "sleep", "300")
    try:
        rec = json.loads((rt.state / "containers" / cid / "state.json").read_text())
        assert rec["spec"]["cgroupns"] == "private"
    finally:
        rt.ok("rm", "-f", cid)
    cid = rt.detach(img.spec, "sleep", "300")
    try:
        rec = json.loads((rt.state / "containers" / cid / "state.json").read_text())
        assert rec["spec"]["cgroupns"] == default_cgroupns()
    finally:
        rt.ok("rm", "-f", cid)


# --- /sys/fs/cgroup -------------------------------------------------------------------------------

MOUNTS_AND_WRITES = (
    "hostname; echo ==; grep ' /sys/fs/cgroup' /proc/self/mountinfo; echo ==; ls /sys/fs/cgroup; echo ==;"
    " touch /sys/fs/cgroup/memory/x; mkdir /sys/fs/cgroup/memory/y; mkdir /sys/fs/cgroup/z;"
    " echo 1 > /sys/fs/cgroup/pids/pids.max; true"
)


@pytest.mark.usefixtures("_no_leftovers")
@pytest.mark.parametrize("mode", ["private", "host"])
def test_sys_fs_cgroup_is_runcs_v1_layout_read_only(rt, img, mode):
    """What a real dockerd shows here (docs/runner.md, "Cgroup namespace"): a tmpfs with one
    read-only mount per v1 hierarchy (not the unified one); private: each hierarchy mounted
    in the namespace, its root the container's cgroup; host: binds of the container's own
    directories. Every write is EROFS, on the tmpfs too."""
    _need_v1()
    r = rt.run("--rm", "--cgroupns", mode, img.spec, "sh", "-c", MOUNTS_AND_WRITES)
    assert r.returncode == 0, describe(r)
    hostname, info, listing, _ = r.stdout.split("==\n")
    rows = _cgroup_mounts(info)
    top, subs = rows[0], rows[1:]
    assert top.mountpoint == "/sys/fs/cgroup" and top.fstype == "tmpfs"
    assert sorted(row.mountpoint.rsplit("/", 1)[1] for row in subs) == _v1_names()
    assert listing.split() == _v1_names()
    for row in rows:
        assert row.options.split(",")[0] == "ro", row
        assert {"nosuid", "nodev", "noexec"} <= set(row.options.split(",")), row
    for row in subs:
        assert row.fstype == "cgroup", row
        assert row.root == "/" if mode == "private" else row.root.startswith(f"/pyoverlay/{hostname.strip()}"), row
    errors = r.stderr.splitlines()
    assert len(errors) == 4 and all("Read-only file system" in e for e in errors), r.stderr


@pytest.mark.usefixtures("_no_leftovers")
@pytest.mark.parametrize("mode", ["private", "host"])
def test_limits_files_inside_are_the_containers(rt, img, mode):
    _need_v1()
    layout = detect()
    if "memory" not in layout.v1 or "pids" not in layout.v1:
        pytest.skip("needs the v1 memory and pids controllers")
    out = _run(
        rt,
        img,
        "--cgroupns",
        mode,
        "-m",
        "64m",
        "--pids-limit",
        "50",
        script="cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/pids/pids.max",
    )
    assert out.split() == ["67108864", "50"]


@pytest.mark.usefixtures("_no_leftovers")
def test_every_v1_hierarchy_gets_the_containers_cgroup_and_loses_it(rt, img):
    _need_v1()
    cid = rt.detach(img.spec, "sleep", "300")
    try:
        have = {os.path.dirname(os.path.dirname(p)) for p in containers.cgroups_of(cid)}
        assert {mp for mp, _ in detect().v1_hierarchies} <= have
        cpuset = [p for p in containers.cgroups_of(cid) if "/cpuset/" in p]
        for p in cpuset:  # a process could not join it without cpus and mems
            assert Path(p, "cpuset.cpus").read_text().strip()
    finally:
        rt.ok("rm", "-f", cid)
    assert containers.cgroups_of(cid) == []


V2_SCRIPT = (
    "readlink /proc/self/ns/cgroup; echo ==; cat /proc/self/cgroup; echo ==;"
    " grep ' /sys/fs/cgroup' /proc/self/mountinfo; echo ==; ls /sys/fs/cgroup;"
    " mkdir /sys/fs/cgroup/x; echo 1 > /sys/fs/cgroup/cgroup.procs; true"
)


@pytest.mark.usefixtures("_no_leftovers")
@pytest.mark.parametrize("opts", [(), ("--cgroupns", "host")], ids=["default", "host"])
def test_v2_layout_on_the_hybrid_hosts_cgroup2_tree(rt, img, opts):
    """$PYOVERLAY_CGROUP_LAYOUT=v2: this hybrid host's (empty) cgroup2 tree used as a
    unified host's. The default is then private; /sys/fs/cgroup is one read-only cgroup2
    mount: rooted at the container's cgroup (private), the whole tree (host, as runc)."""
    layout = detect()
    if layout.v2_root is None:
        pytest.skip("no cgroup2 mount here")
    r = rt.run("--rm", *opts, img.spec, "sh", "-c", V2_SCRIPT, env={"PYOVERLAY_CGROUP_LAYOUT": "v2"})
    assert r.returncode == 0, describe(r)
    ns, cgroup, info, listing = r.stdout.split("==\n")
    private = not opts
    assert (ns.strip() != _host_cgroupns()) == private
    unified = _lines(cgroup)[""]
    assert unified == "/" if private else unified.startswith("/pyoverlay/"), cgroup
    (row,) = _cgroup_mounts(info)
    assert row.fstype == "cgroup2" and row.root == "/" and row.options.split(",")[0] == "ro", row
    assert "cgroup.procs" in listing.split()
    assert ("pyoverlay" in listing.split()) == (not private)  # host: the host's tree, its pyoverlay/ too
    errors = r.stderr.splitlines()
    assert len(errors) == 2 and all("Read-only file system" in e for e in errors), r.stderr


# --- exec -----------------------------------------------------------------------------------------


@pytest.mark.usefixtures("_no_leftovers")
@pytest.mark.parametrize("mode", ["private", "host"])
def test_exec_joins_the_containers_cgroup_namespace(rt, img, mode):
    cid = rt.detach("--cgroupns", mode, img.spec, "sleep", "300")
    try:
        pid1 = rt.ok("exec", cid, "readlink", "/proc/1/ns/cgroup").stdout
        mine = rt.ok("exec", cid, "readlink", "/proc/self/ns/cgroup").stdout
        assert mine == pid1
        assert (pid1.strip() == _host_cgroupns()) == (mode == "host")
        if mode == "private":
            assert set(_lines(rt.ok("exec", cid, "cat", "/proc/self/cgroup").stdout).values()) == {"/"}
    finally:
        rt.ok("rm", "-f", cid)


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.usefixtures("_no_leftovers")
@pytest.mark.parametrize("value", ["bogus", "", "Private", "container:x"])
def test_bad_value_is_one_line_and_125(rt, img, value):
    r = rt.run("--rm", "--cgroupns", value, img.spec, "true")
    assert r.returncode == 125, describe(r)
    assert r.stderr == f"pyoverlay: invalid --cgroupns value {value!r}: expected private or host\n"
    assert rt.ps() == []


# --- rootless -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "opts", [(), ("--cgroupns", "private"), ("--cgroupns", "host")], ids=["default", "private", "host"]
)
def test_rootless_runs_with_a_private_namespace_and_read_only_binds(user, opts):
    """No v1 hierarchy can be mounted in a user namespace: the container's /sys/fs/cgroup
    holds read-only binds of the user's own cgroups; a private namespace still works."""
    img = rootless.busybox_image(user, "busybox", owned_by_user=False)
    r = user.pyoverlay(
        "run", "--rm", *opts, img, "sh", "-c",
        "readlink /proc/self/ns/cgroup; cat /proc/self/cgroup; echo ==; ls /sys/fs/cgroup; touch /sys/fs/cgroup/x",
    )  # fmt: skip
    assert r.returncode == 1, (r.stdout, r.stderr)  # only the touch failed
    assert "Read-only file system" in r.stderr
    head, listing = r.stdout.split("==\n")
    ns, cgroup = head.split("\n", 1)
    private = opts == ("--cgroupns", "private")
    assert (ns != _host_cgroupns()) == private
    if private:
        assert set(_lines(cgroup).values()) == {"/"}
    if detect().v1_hierarchies:
        assert listing.split() == _v1_names()


@pytest.mark.parametrize("mode", ["private", "host"])
def test_rootless_exec_joins_the_containers_namespace(user, mode):
    """host: exec is in that namespace already (joining it again would be EPERM: the user has
    no CAP_SYS_ADMIN over the host's)."""
    img = rootless.busybox_image(user, "busybox", owned_by_user=False)
    r = user.pyoverlay("run", "-d", "--name", "cg", "--cgroupns", mode, img, "sleep", "300")
    assert r.returncode == 0, r.stderr
    try:
        pid1 = user.pyoverlay("exec", "cg", "readlink", "/proc/1/ns/cgroup")
        mine = user.pyoverlay("exec", "cg", "readlink", "/proc/self/ns/cgroup")
        assert pid1.returncode == mine.returncode == 0, (pid1.stderr, mine.stderr)
        assert mine.stdout == pid1.stdout
        assert (mine.stdout == _host_cgroupns() + "\n") == (mode == "host")
    finally:
        user.pyoverlay("rm", "-f", "cg")
