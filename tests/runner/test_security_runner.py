"""Issue 13, items 3, 4 and 7: what root in a container can reach of the host.

* item 3: root in a container made a host block device node (``mknod /lp b 7 0``) and
  opened it. The container's cgroup now carries docker's device rules (v1 ``devices``
  controller, or a BPF device program on cgroup v2): mknod is allowed (as docker), any
  open of a node outside the allow list is EPERM. /dev is nosuid,noexec.
* item 4: ``pyoverlay exec`` passed the caller's open descriptors on (``exec 5</etc;
  pyoverlay exec c1 cat /proc/self/fd/5/shadow``).
* item 7: an inheritable (and ambient) capability set handed to pyoverlay reached the
  container (root's execve adds the inheritable set to the permitted one).

Block devices are only ever opened (``: < node``), never read or written: the major 7
(loop) nodes are made inside the container and refused before the driver is reached.
"""

from __future__ import annotations

import ctypes
import os
import signal
import stat
import subprocess

import pytest

from helpers import containers, mounts
from helpers.containers import DOCKER_CAPBND, describe, status_map
from overlayfs_py.mountinfo import parse as parse_mountinfo

pytestmark = [pytest.mark.fuse, pytest.mark.needs_root, pytest.mark.usefixtures("_no_leftovers")]

EPERM_TEXT = "Operation not permitted"
CAP_SYS_ADMIN = 21


def sh(rt, img, script, *opts):
    return rt.run("--rm", *opts, img.spec, "sh", "-c", script)


def lines(text: str) -> list[str]:
    return [line for line in text.replace("\r", "").splitlines() if line.strip()]


@pytest.fixture
def c1(rt, img):
    cid = rt.detach("--name", "c1", img.spec, "sleep", "1000")
    rt.wait_status(cid, ("running",), 30)
    yield cid
    r = rt.cli("rm", "-f", cid)
    assert r.returncode == 0 or rt.find(cid) is None, describe(r)


# --------------------------------------------------------------------------
# item 3: devices
# --------------------------------------------------------------------------

OPEN_LOOP = (
    "mknod /lp b 7 0 && echo mknod-ok; "
    "(: < /lp) 2>&1 && echo read-open-ok; "
    "(: <> /lp) 2>&1 && echo rw-open-ok; "
    "mknod /dev/lp1 b 7 1 && (: < /dev/lp1) 2>&1 && echo dev-open-ok; "
    "rm -f /lp /dev/lp1; true"
)


def test_root_container_cannot_open_a_block_device_it_made(rt, img):
    r = sh(rt, img, OPEN_LOOP)
    assert r.returncode == 0, describe(r)
    out = lines(r.stdout)
    # docker (runc's "b *:* m") lets mknod through and answers EPERM on the open
    assert "mknod-ok" in out, describe(r)
    assert not {"read-open-ok", "rw-open-ok", "dev-open-ok"} & set(out), describe(r)
    assert sum(EPERM_TEXT in line for line in out) == 3, describe(r)


def test_allowed_device_nodes_still_work(rt, img):
    script = (
        "mknod /tmp/n c 1 3 && echo x > /tmp/n && echo null-ok; "
        "head -c 4 /dev/zero | wc -c; head -c 4 /dev/urandom | wc -c; "
        "echo x > /dev/null && echo devnull-ok; (echo x > /dev/full) 2>&1; "
        "test -c /dev/pts/ptmx && echo ptmx-ok; true"
    )
    r = sh(rt, img, script)
    assert r.returncode == 0, describe(r)
    out = lines(r.stdout)
    assert out[:4] == ["null-ok", "4", "4", "devnull-ok"], describe(r)
    assert any("No space left on device" in line for line in out), describe(r)  # /dev/full opened
    assert "ptmx-ok" in out, describe(r)
    assert EPERM_TEXT not in r.stdout + r.stderr, describe(r)


def test_dev_is_nosuid_noexec(rt, img):
    r = sh(rt, img, "cat /proc/self/mountinfo")
    assert r.returncode == 0, describe(r)
    dev = [m for m in parse_mountinfo(r.stdout) if m.mountpoint == "/dev"]
    assert dev, r.stdout
    opts = set(dev[-1].options.split(","))
    assert {"nosuid", "noexec"} <= opts, dev[-1]
    assert "nodev" not in opts, dev[-1]  # the allowed nodes must work


def test_privileged_keeps_every_device(rt, img):
    r = sh(rt, img, "mknod /lp b 7 0 && (: < /lp) 2>&1; rm -f /lp; true", "--privileged")
    assert r.returncode == 0, describe(r)
    assert EPERM_TEXT not in r.stdout, describe(r)


def test_device_rules_in_the_cgroup_and_removed_with_it(rt, img, c1):
    from runner.cgroups import detect

    if "devices" not in detect().v1:
        pytest.skip("no cgroup v1 devices controller here (the BPF path is tested below)")
    listing = containers.read_cgroup_file(c1, "devices", "devices.list")
    assert listing is not None, f"no devices cgroup for {c1}: {containers.cgroups_of(c1)}"
    want = {
        "c *:* m",
        "b *:* m",
        "c 1:3 rwm",
        "c 1:5 rwm",
        "c 1:7 rwm",
        "c 1:8 rwm",
        "c 1:9 rwm",
        "c 5:0 rwm",
        "c 5:1 rwm",
        "c 5:2 rwm",
        "c 136:* rwm",
        "c 10:200 rwm",
    }
    assert set(lines(listing)) == want, listing
    pid = rt.find(c1)["pid"]
    assert str(pid) in containers.read_cgroup_file(c1, "devices", "cgroup.procs").split()
    # an exec'd process is in it too
    r = rt.cli("exec", c1, "sh", "-c", "mknod /lp b 7 0; (: < /lp) 2>&1; rm -f /lp")
    assert EPERM_TEXT in r.stdout, describe(r)
    dirs = containers.cgroups_of(c1)
    assert any("/devices/" in d for d in dirs), dirs
    rt.ok("rm", "-f", c1)
    assert containers.cgroups_of(c1) == []


def test_device_cgroup_gone_after_monitor_sigkill(rt, img):
    cid = rt.detach(img.spec, "sleep", "1000")
    c = rt.wait_status(cid, ("running",), 30)
    assert containers.cgroups_of(cid), "no cgroup for a root container"
    monitor = containers.proc_stat(c["pid"]).ppid
    os.kill(monitor, signal.SIGKILL)
    os.kill(c["pid"], signal.SIGKILL)
    assert containers.wait_gone(monitor) and containers.wait_gone(c["pid"])
    rt.wait_status(cid, ("dead",), timeout=10)
    rt.ok("rm", "-f", cid)
    assert containers.cgroups_of(cid) == []


def test_bpf_device_program_on_cgroup_v2(tmp_path):
    """The cgroup v2 path (no v1 devices controller): a real cgroup on this machine's
    cgroup2 hierarchy with the BPF program attached, a process moved into it."""
    from runner.cgroups import Cgroup, CgroupError, Layout, Limits, detect

    real = detect()
    if real.v2_root is None:
        pytest.skip("no cgroup2 mount")
    layout = Layout(real.mode, {k: v for k, v in real.v1.items() if k != "devices"}, real.v2_root, real.v2_controllers)
    name = f"sectest-{os.getpid()}"
    try:
        cg = Cgroup.create(name, Limits(), layout, devices=True)
    except CgroupError as e:
        pytest.skip(f"cannot attach a BPF device program here: {e}")
    try:
        assert "devices" not in cg.paths and "unified" in cg.paths
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            out = []
            try:
                cg.add(os.getpid())
                for name_, kind, dev in (
                    ("lp", stat.S_IFBLK, (7, 0)),
                    ("null", stat.S_IFCHR, (1, 3)),
                    ("fuse", stat.S_IFCHR, (10, 229)),
                    ("zero", stat.S_IFCHR, (1, 5)),
                ):
                    p = str(tmp_path / name_)
                    os.mknod(p, kind | 0o600, os.makedev(*dev))
                    out.append(f"{name_} mknod-ok")
                    try:
                        os.close(os.open(p, os.O_RDONLY))
                        out.append(f"{name_} open-ok")
                    except OSError as e:
                        out.append(f"{name_} open-errno-{e.errno}")
            except BaseException as e:  # noqa: BLE001
                out.append(f"error {e!r}")
            os.write(w, "\n".join(out).encode())
            os._exit(0)
        os.close(w)
        got = os.read(r, 4096).decode().splitlines()
        os.close(r)
        os.waitpid(pid, 0)
        assert got == [
            "lp mknod-ok",
            "lp open-errno-1",
            "null mknod-ok",
            "null open-ok",
            "fuse mknod-ok",
            "fuse open-errno-1",
            "zero mknod-ok",
            "zero open-ok",
        ], got
    finally:
        cg.remove()
    assert not os.path.exists(cg.paths["unified"])


def test_no_device_restriction_available_is_an_error(tmp_path):
    from runner.cgroups import Cgroup, CgroupError, Layout, Limits

    layout = Layout("v1", {"memory": str(tmp_path / "memory")}, None, frozenset())
    with pytest.raises(CgroupError, match="cannot restrict device access"):
        Cgroup.create("x", Limits(), layout, parent="pyoverlay-test", devices=True)
    assert not (tmp_path / "memory" / "pyoverlay-test" / "x").exists()


# --------------------------------------------------------------------------
# item 4: descriptors of the caller
# --------------------------------------------------------------------------


@pytest.fixture
def leaked_dir(tmp_path):
    """A host directory holding a secret, open (inheritable): its fd."""
    d = tmp_path / "hostdir"
    d.mkdir()
    (d / "secret").write_text("host-secret\n")
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    os.set_inheritable(fd, True)
    yield fd
    os.close(fd)


def cli_with_fd(rt, fd, *args, preexec_fn=None):
    return subprocess.run(
        rt.argv(*args),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=rt.env,
        cwd=mounts.REPO_ROOT,
        pass_fds=(fd,),
        timeout=60,
        preexec_fn=preexec_fn,
    )


def test_exec_does_not_pass_the_callers_fds(rt, c1, leaked_dir):
    r = cli_with_fd(rt, leaked_dir, "exec", c1, "cat", f"/proc/self/fd/{leaked_dir}/secret")
    assert "host-secret" not in r.stdout, "exec leaked a host directory fd:\n" + describe(r)
    assert r.returncode != 0, describe(r)
    r = cli_with_fd(rt, leaked_dir, "exec", c1, "ls", "/proc/self/fd")
    assert r.returncode == 0, describe(r)
    # 0-2, and the directory ls itself is reading
    assert sorted(int(x) for x in r.stdout.split()) == [0, 1, 2, 3], describe(r)


def test_run_does_not_pass_the_callers_fds(rt, img, leaked_dir):
    r = cli_with_fd(
        rt, leaked_dir, "run", "--rm", img.spec, "sh", "-c", f"cat /proc/self/fd/{leaked_dir}/secret; ls /proc/self/fd"
    )
    assert "host-secret" not in r.stdout, "run leaked a host directory fd:\n" + describe(r)
    assert sorted(int(x) for x in r.stdout.split()) == [0, 1, 2, 3], describe(r)


# --------------------------------------------------------------------------
# item 7: inherited capabilities
# --------------------------------------------------------------------------


class _Hdr(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _raise_inheritable_and_ambient() -> None:
    """preexec_fn: what ``capsh --inh=cap_sys_admin --addamb=cap_sys_admin`` does: every
    permitted capability inheritable, and cap_sys_admin ambient."""
    libc = ctypes.CDLL(None, use_errno=True)
    hdr, data = _Hdr(0x20080522, 0), (_Data * 2)()
    if libc.capget(ctypes.byref(hdr), data) != 0:
        os._exit(90)
    for d in data:
        d.inheritable = d.permitted
    if libc.capset(ctypes.byref(hdr), data) != 0:
        os._exit(91)
    if libc.prctl(47, 2, CAP_SYS_ADMIN, 0, 0) != 0:  # PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE
        os._exit(92)


def _caps(status: str) -> dict:
    st = status_map(status)
    return {k: int(st[k], 16) for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}


def test_preexec_really_hands_down_caps():
    """The test's own premise: a process started this way has the sets raised."""
    r = subprocess.run(
        ["cat", "/proc/self/status"], capture_output=True, text=True, preexec_fn=_raise_inheritable_and_ambient
    )
    assert r.returncode == 0, r.stderr
    caps = _caps(r.stdout)
    assert caps["CapInh"] & (1 << CAP_SYS_ADMIN) and caps["CapAmb"] == 1 << CAP_SYS_ADMIN, caps


def _check_container_caps(r, privileged=False):
    assert r.returncode == 0, describe(r)
    status, _, mount_out = r.stdout.partition("==\n")
    caps = _caps(status)
    assert caps["CapInh"] == 0 and caps["CapAmb"] == 0, {k: hex(v) for k, v in caps.items()}
    if not privileged:
        assert caps["CapEff"] == caps["CapPrm"] == caps["CapBnd"] == DOCKER_CAPBND, {k: hex(v) for k, v in caps.items()}
        assert "mounted" not in mount_out and "permission denied" in mount_out, describe(r)


SCRIPT = "cat /proc/self/status; echo ==; mkdir -p /mnt; mount -t tmpfs none /mnt 2>&1 && echo mounted; true"


def test_run_clears_inherited_caps(rt, img):
    r = subprocess.run(
        rt.argv("run", "--rm", img.spec, "sh", "-c", SCRIPT),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=rt.env,
        cwd=mounts.REPO_ROOT,
        timeout=60,
        preexec_fn=_raise_inheritable_and_ambient,
    )
    _check_container_caps(r)


def test_run_privileged_clears_inherited_caps(rt, img):
    r = subprocess.run(
        rt.argv("run", "--rm", "--privileged", img.spec, "sh", "-c", SCRIPT),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=rt.env,
        cwd=mounts.REPO_ROOT,
        timeout=60,
        preexec_fn=_raise_inheritable_and_ambient,
    )
    _check_container_caps(r, privileged=True)


def test_exec_clears_inherited_caps(rt, c1):
    r = subprocess.run(
        rt.argv("exec", c1, "sh", "-c", SCRIPT),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=rt.env,
        cwd=mounts.REPO_ROOT,
        timeout=60,
        preexec_fn=_raise_inheritable_and_ambient,
    )
    _check_container_caps(r)
    r = subprocess.run(
        rt.argv("exec", "-u", "1000", c1, "cat", "/proc/self/status"),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=rt.env,
        cwd=mounts.REPO_ROOT,
        timeout=60,
        preexec_fn=_raise_inheritable_and_ambient,
    )
    assert r.returncode == 0, describe(r)
    caps = _caps(r.stdout)
    assert caps == {**caps, "CapInh": 0, "CapPrm": 0, "CapEff": 0, "CapAmb": 0}, caps


def test_root_container_refused_without_device_restrictions(rt, img):
    """No writable cgroup (as when pyoverlay itself runs where cgroupfs is read-only):
    a root container must not start without device rules; --privileged may."""
    from runner.cgroups import detect

    layout = detect()
    mps = sorted(set(layout.v1.values()) | ({layout.v2_root} if layout.v2_root else set()))
    ro = "; ".join(f"mount -o remount,bind,ro {m}" for m in mps)

    def run_ro(*args):
        script = f'{ro} && exec "$@"'
        return subprocess.run(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                script,
                "sh",
                *rt.argv("run", "--rm", *args),
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=rt.env,
            cwd=mounts.REPO_ROOT,
            timeout=60,
        )

    r = run_ro(img.spec, "echo", "started")
    assert r.returncode == 125 and "started" not in r.stdout, describe(r)
    err = lines(r.stderr)
    assert len(err) == 1 and "device restrictions" in err[0], describe(r)
    r = run_ro("--privileged", img.spec, "echo", "started")
    assert r.returncode == 0 and r.stdout == "started\n", describe(r)
