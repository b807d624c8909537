"""``pyoverlay run`` in the foreground: what a container sees (pid ns, /proc,
/dev, /sys, hostname, network, environment, user, capabilities), its exit
codes, limits, volumes, and what it leaves in the upper layer.

Images (``tests/helpers/rootfs.py``): ``bare`` = static busybox without
proc/dev/sys directories (the runner's init layer supplies them), ``full`` =
the same with them, ``two_layer`` = an app layer (with a char 0/0 whiteout
of bin/vi) on top of ``bare``.  Every test runs with private
PYOVERLAY_STATE_DIR/PYOVERLAY_DATA_DIR under its tmp dir and fails if a mount,
cgroup or process is left behind (``helpers.containers.leftover_check``).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from helpers import containers, mounts, rootfs
from helpers.containers import DEFAULT_PATH, DOCKER_CAPBND, describe, status_map
from helpers.snapshot import diff_snapshots, format_diff, snapshot
from overlayfs_py.mountinfo import parse as parse_mountinfo

pytestmark = [pytest.mark.fuse, pytest.mark.needs_root, pytest.mark.usefixtures("_no_leftovers")]


def sh(rt, image, script, *opts, **kw):
    """``pyoverlay run --rm OPTS... IMAGE sh -c SCRIPT``"""
    return rt.run("--rm", *opts, image.spec, "sh", "-c", script, **kw)


def ok_sh(rt, image, script, *opts, **kw) -> str:
    r = sh(rt, image, script, *opts, **kw)
    assert r.returncode == 0, describe(r)
    return r.stdout


def lines(text: str) -> list[str]:
    return [line for line in text.replace("\r", "").splitlines() if line.strip()]


# --------------------------------------------------------------------------
# pid namespace and /proc
# --------------------------------------------------------------------------


def test_command_is_pid_1(rt, img):
    assert ok_sh(rt, img, "echo $$").strip() == "1"


def test_ps_lists_only_the_containers_processes(rt, img):
    # "; true" keeps sh from exec'ing ps: PID 1 is sh, ps is its child
    out = ok_sh(rt, img, "ps -o pid,comm; true")
    rows = containers.ps_table(out)
    assert sorted((int(r["PID"]), r["COMMAND"]) for r in rows)[0] == (1, "sh"), out
    assert [r["COMMAND"] for r in rows].count("ps") == 1, out
    assert len(rows) == 2, f"only sh (PID 1) and ps should be visible:\n{out}"


def test_proc_is_the_new_pid_namespace(rt, img):
    r = rt.run("--rm", img.spec, "cat", "/proc/self/status")
    assert r.returncode == 0, describe(r)
    st = status_map(r.stdout)
    # /proc belongs to the container's pid ns: one level, PID 1
    assert st["NSpid"] == "1", r.stdout
    assert st["PPid"] == "0", r.stdout


def test_init_makes_the_command_pid_2(rt, img):
    out = ok_sh(rt, img, "echo $$; echo $PPID", "--init")
    assert lines(out) == ["2", "1"], out


# --------------------------------------------------------------------------
# images and layers
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bare", "full", "two_layer"])
def test_every_image_variant_runs(rt, images, name):
    out = ok_sh(rt, images.by_name(name), "test -d /proc/1 && test -c /dev/null && test -d /sys/class && echo ok")
    assert out.strip() == "ok"


def test_two_layer_image_top_layer_first_with_whiteout(rt, images):
    out = ok_sh(
        rt,
        images.two_layer,
        "cat /etc/motd /app/hello.txt; "
        "if [ -e /bin/vi ] || [ -L /bin/vi ]; then echo vi-present; else echo vi-gone; fi; "
        "/app/run.sh arg",
    )
    assert out == (rootfs.APP_MOTD + rootfs.HELLO).decode() + "vi-gone\nrun.sh says arg\n"


@pytest.mark.parametrize("name", ["bare", "full"])
def test_a_run_of_true_leaves_the_upper_empty(rt, images, tmp_path, name):
    image = images.by_name(name)
    upper = tmp_path / "upper"
    before = snapshot(image.layers[0])
    r = rt.run("--rm", "--upper", upper, image.spec, "true")
    assert r.returncode == 0, describe(r)
    assert upper.is_dir(), "--upper DIR must be created if missing"
    assert rootfs.tree_listing(upper) == [], "the runner wrote into the upper layer"
    diff = diff_snapshots(before, snapshot(image.layers[0]), a_name="before", b_name="after")
    assert not diff, format_diff(diff, "the lower layer changed")


def test_seed_exercise_whiteout_and_new_file(rt, img, tmp_path):
    lower = img.layers[0]
    upper = tmp_path / "upper"
    before = snapshot(lower)
    r = rt.run("--rm", "--upper", upper, img.spec, "sh", "-c", "rm /bin/vi; echo hi > /newfile")
    assert r.returncode == 0, describe(r)
    vi = os.lstat(upper / "bin" / "vi")
    assert stat.S_ISCHR(vi.st_mode) and vi.st_rdev == os.makedev(0, 0), (
        f"UPPER/bin/vi must be a char 0/0 whiteout: {vi}"
    )
    assert (upper / "newfile").read_bytes() == b"hi\n"
    assert rootfs.tree_listing(upper) == ["bin/", "bin/vi%c 0:0", "newfile"], (
        "the runner wrote something else into the upper (proc/dev/sys, etc/hosts ...?)"
    )
    diff = diff_snapshots(before, snapshot(lower), a_name="before", b_name="after")
    assert not diff, format_diff(diff, "the lower layer changed")
    # the kept upper is used again by the next run
    out = ok_sh(rt, img, "cat /newfile; [ -e /bin/vi ] || [ -L /bin/vi ] || echo vi-gone", "--upper", upper)
    assert out == "hi\nvi-gone\n"


def test_host_root_is_unreachable(rt, img):
    # /work/main (this checkout) exists on the host, not in the image
    assert Path(mounts.REPO_ROOT, "pyproject.toml").exists()
    probe = os.path.join(mounts.REPO_ROOT, "pyproject.toml")
    out = ok_sh(rt, img, f"test -e {probe} && echo host-visible; ls -a /; echo ==; cat /proc/self/mountinfo")
    assert "host-visible" not in out
    listing, _, mountinfo = out.partition("==\n")
    image_top = set(os.listdir(img.layers[0])) | {".", "..", "proc", "dev", "sys"}
    host_only = set(os.listdir("/")) - image_top
    assert not set(listing.split()) & host_only, (
        f"host root entries visible in the container's /: {set(listing.split()) & host_only}"
    )
    mps = [m.mountpoint for m in parse_mountinfo(mountinfo)]
    assert "/" in mps, mountinfo
    bad = [m for m in mps if not (m == "/" or m.split("/")[1] in ("proc", "dev", "sys", "etc"))]
    assert not bad, f"mounts outside the container's own tree (old root?): {bad}\n{mountinfo}"


# --------------------------------------------------------------------------
# /dev and /sys
# --------------------------------------------------------------------------

DEVICES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9), "tty": (5, 0)}


def test_dev_contents(rt, img):
    script = (
        "for d in null zero full random urandom tty; do "
        "  stat -c '%n %F %t %T' /dev/$d; done; "
        "echo ==; for l in fd stdin stdout stderr; do echo $l $(readlink /dev/$l); done; "
        "echo ==; test -d /dev/pts && echo pts-dir; test -d /dev/shm && echo shm-dir; "
        "test -c /dev/pts/ptmx && echo pts-ptmx; "
        "test -c /dev/ptmx -o -L /dev/ptmx && echo ptmx; "
        "echo x > /dev/shm/t && echo shm-writable; echo x > /dev/null && echo null-writable; "
        "echo ==; find /dev -type b; test -e /dev/mem && echo has-mem; "
        "test -e /dev/fuse && echo has-fuse; true"
    )
    devs, links, flags, extra = ok_sh(rt, img, script).split("==\n")
    seen = {}
    for line in lines(devs):
        name, rest = line.split(" ", 1)
        kind, major, minor = rest.rsplit(" ", 2)
        seen[name.removeprefix("/dev/")] = (kind, int(major, 16), int(minor, 16))
    for d, (ma, mi) in DEVICES.items():
        assert seen.get(d) == ("character special file", ma, mi), f"/dev/{d}: {seen.get(d)}"
    assert lines(links) == [
        "fd /proc/self/fd",
        "stdin /proc/self/fd/0",
        "stdout /proc/self/fd/1",
        "stderr /proc/self/fd/2",
    ]
    assert set(lines(flags)) >= {"pts-dir", "shm-dir", "pts-ptmx", "ptmx", "shm-writable", "null-writable"}, flags
    assert lines(extra) == [], f"host devices in the container's /dev: {extra}"


def test_sys_is_read_only(rt, img):
    out = ok_sh(rt, img, "grep ' /sys ' /proc/mounts; echo 1 > /sys/kernel/mm/ksm/run 2>/dev/null && echo WROTE; true")
    sys_lines = [line for line in lines(out) if " /sys " in line]
    assert sys_lines, out
    opts = sys_lines[-1].split()[3].split(",")
    assert "ro" in opts, out
    assert "WROTE" not in out


# --------------------------------------------------------------------------
# hostname and network
# --------------------------------------------------------------------------


def test_default_hostname_is_the_short_id(rt, img):
    r = rt.run("--name", "hn", img.spec, "sh", "-c", "hostname; echo $HOSTNAME")
    assert r.returncode == 0, describe(r)
    c = rt.find("hn")
    assert c is not None, rt.ps()
    assert containers.ID_RE.match(c["id"]), c
    assert lines(r.stdout) == [c["id"][:12]] * 2
    rt.ok("rm", "hn")


@pytest.mark.parametrize("flag", ["--hostname", "-h"])
def test_hostname_option(rt, img, flag):
    out = ok_sh(rt, img, "hostname; echo $HOSTNAME; cat /proc/sys/kernel/hostname", flag, "box1")
    assert lines(out) == ["box1"] * 3


def test_hostname_does_not_change_the_hosts(rt, img):
    before = os.uname().nodename
    ok_sh(rt, img, "hostname", "--hostname", "other-name")
    assert os.uname().nodename == before


@pytest.mark.parametrize("opts", [(), ("--net", "none"), ("--network", "none")])
def test_network_none_has_only_lo_up(rt, img, opts):
    out = ok_sh(rt, img, "cat /proc/net/dev; echo ==; ip link show lo", *opts)
    dev, _, link = out.partition("==\n")
    assert containers.interfaces(dev) == ["lo"], dev
    assert "UP" in link.split(">")[0], f"lo is not up: {link}"


def test_network_host_sees_the_hosts_interfaces(rt, img):
    out = ok_sh(rt, img, "cat /proc/net/dev", "--net", "host")
    host = containers.interfaces(Path("/proc/net/dev").read_text())
    assert sorted(containers.interfaces(out)) == sorted(host)


# --------------------------------------------------------------------------
# exit codes
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cmd, code",
    [
        (["true"], 0),
        (["false"], 1),
        (["sh", "-c", "exit 7"], 7),
        (["sh", "-c", "exit 255"], 255),
    ],
)
def test_exit_code_is_the_commands(rt, img, cmd, code):
    r = rt.run("--rm", img.spec, *cmd)
    assert r.returncode == code, describe(r)


@pytest.mark.parametrize("cmd", [["/nonexistent"], ["no-such-command"], ["/bin/nope", "x"]])
def test_missing_command_is_127(rt, img, cmd):
    r = rt.run("--rm", img.spec, *cmd)
    assert r.returncode == 127, describe(r)
    assert rt.state_entries() == [] and rt.data_entries() == []


@pytest.mark.parametrize("image_name, cmd", [("bare", "/etc/motd"), ("two_layer", "/app/hello.txt"), ("bare", "/tmp")])
def test_not_executable_is_126(rt, images, image_name, cmd):
    r = rt.run("--rm", images.by_name(image_name).spec, cmd)
    assert r.returncode == 126, describe(r)


def _assert_runner_error(rt, r):
    assert r.returncode == 125, describe(r)
    err = lines(r.stderr)
    assert len(err) == 1 and err[0].startswith("pyoverlay: "), (
        f"want one 'pyoverlay: ...' line on stderr:\n{describe(r)}"
    )
    assert rt.state_entries() == [], f"state left: {rt.state_entries()}"
    assert rt.data_entries() == [], f"data left: {rt.data_entries()}"
    assert rt.mounts() == []
    assert rt.ps() == []


@pytest.mark.parametrize("layers", ["{tmp}/no-such-layer", "{img}:{tmp}/no-such-layer"])
def test_missing_layer_is_125_and_leaves_nothing(rt, img, tmp_path, layers):
    spec = layers.format(tmp=tmp_path, img=img.spec)
    _assert_runner_error(rt, rt.run("--rm", spec, "true"))
    _assert_runner_error(rt, rt.run(spec, "true"))  # also without --rm


@pytest.mark.parametrize(
    "opts",
    [
        ["--bogus-option"],
        ["--net", "nosuchnet"],
        ["-m", "lots"],
        ["--pids-limit", "x"],
        ["--cpus", "many"],
        ["--cap-add", "NOT_A_CAP"],
        ["-v", "/nonexistent-host-dir:/data"],
        ["-v", "/tmp:relative"],
        ["-u", "nosuchuser"],
        ["--name", "bad/name"],
    ],
)
def test_bad_option_is_125_and_leaves_nothing(rt, img, opts):
    _assert_runner_error(rt, rt.run(*opts, img.spec, "true"))


def test_no_command_is_125(rt, img):
    _assert_runner_error(rt, rt.run("--rm", img.spec))


def test_memory_limit_oom_kill_is_137(rt, img):
    # dd's 100 MiB buffer is filled from /dev/zero: it really holds the memory
    hog = ["dd", "if=/dev/zero", "of=/dev/null", "bs=100M", "count=1"]
    r = rt.run("--rm", img.spec, *hog)
    assert r.returncode == 0, "the hog must work without a limit\n" + describe(r)
    r = rt.run("--rm", "-m", "32m", img.spec, *hog)
    assert r.returncode == 137, describe(r)


def test_killed_by_sigterm_under_init_is_143(rt, img):
    r = sh(rt, img, "kill -TERM $$; sleep 5; echo survived", "--init")
    assert r.returncode == 143, describe(r)
    assert "survived" not in r.stdout


def test_pid_1_without_handler_ignores_sigterm(rt, img):
    # the kernel protects a pid-ns init from signals it has no handler for:
    # this is why --init exists (docker behaves the same)
    r = sh(rt, img, "kill -TERM $$; echo survived")
    assert r.returncode == 0 and r.stdout == "survived\n", describe(r)


# --------------------------------------------------------------------------
# pids limit, zombies
# --------------------------------------------------------------------------

FORK_40 = "n=0; for i in $(seq 40); do sleep 10 & n=$((n+1)); echo started $n; done; echo loop-done"


def test_pids_limit_makes_fork_fail(rt, img):
    r = sh(rt, img, FORK_40, "--pids-limit", "20")
    started = len([line for line in lines(r.stdout) if line.startswith("started")])
    assert "loop-done" not in r.stdout and started < 20, describe(r)
    assert "fork" in r.stderr or "Resource temporarily unavailable" in r.stderr, describe(r)


def test_without_pids_limit_40_children_fit(rt, img):
    r = sh(rt, img, FORK_40)
    assert r.returncode == 0 and "loop-done" in r.stdout, describe(r)


# The orphan "sleep 0.1" is reparented to PID 1.  PID 1 is exec'd into xargs,
# which waits for its own child only (ash as PID 1 would reap everything).
ZOMBIE = "(sleep 0.1 &); exec xargs sh -c 'sleep 1; ps -o pid,stat,comm' </dev/null"


def test_zombies_stay_without_init(rt, img):
    """What docker does without --init: nobody reaps orphans, they stay Z."""
    out = ok_sh(rt, img, ZOMBIE)
    rows = containers.ps_table(out)
    assert any(r["STAT"].startswith("Z") and r["COMMAND"] == "sleep" for r in rows), out


def test_init_reaps_zombies(rt, img):
    """docker --init (tini): the small PID 1 reaps orphans."""
    out = ok_sh(rt, img, ZOMBIE, "--init")
    rows = containers.ps_table(out)
    assert rows and not any(r["STAT"].startswith("Z") for r in rows), out


# --------------------------------------------------------------------------
# volumes and read-only root
# --------------------------------------------------------------------------


@pytest.fixture
def hostdir(tmp_path) -> Path:
    d = tmp_path / "hostdir"
    d.mkdir()
    (d / "in.txt").write_text("from the host\n")
    return d


@pytest.mark.parametrize("suffix", ["", ":rw"])
def test_volume_rw(rt, img, hostdir, tmp_path, suffix):
    upper = tmp_path / "upper"
    out = ok_sh(
        rt,
        img,
        "cat /data/in.txt; echo from-container > /data/out.txt",
        "--upper",
        upper,
        "-v",
        f"{hostdir}:/data{suffix}",
    )
    assert out == "from the host\n"
    assert (hostdir / "out.txt").read_text() == "from-container\n"
    # /data is missing in the image: the init layer supplied it, not the upper
    assert rootfs.tree_listing(upper) == []


def test_volume_ro(rt, img, hostdir):
    r = sh(rt, img, "cat /data/in.txt; echo x > /data/x", "-v", f"{hostdir}:/data:ro")
    assert r.returncode != 0, describe(r)
    assert r.stdout == "from the host\n"
    assert sorted(os.listdir(hostdir)) == ["in.txt"]


def test_file_volume(rt, img, tmp_path):
    conf = tmp_path / "app.conf"
    conf.write_text("key=value\n")
    upper = tmp_path / "upper"
    out = ok_sh(
        rt,
        img,
        "cat /etc/app.conf; echo key=new > /etc/app.conf; cat /etc/app.conf",
        "--upper",
        upper,
        "-v",
        f"{conf}:/etc/app.conf",
    )
    assert out == "key=value\nkey=new\n"
    assert conf.read_text() == "key=new\n"
    assert rootfs.tree_listing(upper) == []
    r = sh(rt, img, "cat /etc/app.conf; echo x > /etc/app.conf", "-v", f"{conf}:/etc/app.conf:ro")
    assert r.returncode != 0 and r.stdout == "key=new\n", describe(r)
    assert conf.read_text() == "key=new\n"


def test_read_only_root(rt, img, hostdir, tmp_path):
    upper = tmp_path / "upper"
    r = sh(rt, img, "touch /x", "--read-only", "--upper", upper)
    assert r.returncode != 0, describe(r)
    r = sh(rt, img, "rm /bin/vi", "--read-only", "--upper", upper)
    assert r.returncode != 0, describe(r)
    assert rootfs.tree_listing(upper) == []
    # volumes stay writable
    ok_sh(rt, img, "echo y > /data/y", "--read-only", "-v", f"{hostdir}:/data")
    assert (hostdir / "y").read_text() == "y\n"


# --------------------------------------------------------------------------
# capabilities
# --------------------------------------------------------------------------


def _caps(rt, img, *opts) -> dict[str, str]:
    return status_map(ok_sh(rt, img, "cat /proc/self/status", *opts))


def test_default_capabilities_and_no_new_privs(rt, img):
    st = _caps(rt, img)
    assert int(st["CapBnd"], 16) == DOCKER_CAPBND, st["CapBnd"]
    assert int(st["CapEff"], 16) == DOCKER_CAPBND, st["CapEff"]
    assert st["NoNewPrivs"] == "1"


def test_privileged_keeps_the_hosts_capabilities(rt, img):
    host = status_map(Path("/proc/self/status").read_text())
    st = _caps(rt, img, "--privileged")
    assert st["CapBnd"] == host["CapBnd"]
    assert st["NoNewPrivs"] == "0"


@pytest.mark.parametrize(
    "opts, mask",
    [
        (["--cap-drop", "NET_RAW"], DOCKER_CAPBND & ~(1 << 13)),
        (["--cap-add", "SYS_ADMIN"], DOCKER_CAPBND | (1 << 21)),
        (["--cap-add", "CAP_NET_ADMIN"], DOCKER_CAPBND | (1 << 12)),
        (["--cap-drop", "CHOWN", "--cap-drop", "KILL"], DOCKER_CAPBND & ~1 & ~(1 << 5)),
    ],
)
def test_cap_add_and_drop(rt, img, opts, mask):
    st = _caps(rt, img, *opts)
    assert int(st["CapBnd"], 16) == mask, (st["CapBnd"], hex(mask))


def test_non_root_user_has_no_effective_caps(rt, img):
    st = _caps(rt, img, "-u", "1000")
    assert int(st["CapEff"], 16) == 0 and st["NoNewPrivs"] == "1", st


# --------------------------------------------------------------------------
# environment, workdir, user, stdin
# --------------------------------------------------------------------------


def test_default_environment(rt, img):
    out = ok_sh(rt, img, "env", "--hostname", "envbox")
    env = dict(line.split("=", 1) for line in lines(out))
    assert env["PATH"] == DEFAULT_PATH
    assert env["HOSTNAME"] == "envbox"
    assert env["HOME"] == "/root"
    leaked = {k for k in env if k.startswith("PYOVERLAY") or k == "PYTHONPATH"}
    assert not leaked, f"the runner's environment leaked in: {leaked}"


def test_env_options(rt, img):
    out = ok_sh(
        rt,
        img,
        "env",
        "-e",
        "FOO=bar",
        "--env",
        "SPACED=a b c",
        "-e",
        "EMPTY=",
        "-e",
        "FROM_HOST",
        "-e",
        "UNSET_ON_HOST",
        "-e",
        "HOME=/elsewhere",
        env={"FROM_HOST": "host-value"},
    )
    env = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert env["FOO"] == "bar"
    assert env["SPACED"] == "a b c"
    assert env["EMPTY"] == ""
    assert env["FROM_HOST"] == "host-value"
    assert "UNSET_ON_HOST" not in env
    assert env["HOME"] == "/elsewhere"


def test_workdir(rt, images):
    assert ok_sh(rt, images.bare, "pwd", "-w", "/tmp") == "/tmp\n"
    assert ok_sh(rt, images.two_layer, "pwd; cat hello.txt", "--workdir", "/app") == "/app\n" + rootfs.HELLO.decode()
    assert ok_sh(rt, images.bare, "pwd") == "/\n"


@pytest.mark.parametrize(
    "user, want",
    [
        ("1000:1000", ["1000", "1000", "app"]),
        ("app", ["1000", "1000", "app"]),
        ("1000", ["1000", "1000", "app"]),
        ("app:root", ["1000", "0", "app"]),
        ("0:0", ["0", "0", "root"]),
    ],
)
def test_user(rt, img, user, want):
    out = ok_sh(rt, img, "id -u; id -g; id -un", "-u", user)
    assert lines(out) == want


def test_user_option_spellings_and_home(rt, img):
    out = ok_sh(rt, img, "id -u; echo $HOME; touch /etc/x 2>/dev/null || echo denied", "--user", "app")
    assert lines(out) == ["1000", "/home/app", "denied"]


def test_stdin_is_dev_null_without_i(rt, img):
    r = rt.run("--rm", img.spec, "sh", "-c", "readlink /proc/self/fd/0; cat", input="should not arrive\n")
    assert r.returncode == 0, describe(r)
    assert r.stdout == "/dev/null\n"


def test_interactive_attaches_stdin(rt, img):
    r = rt.run("--rm", "-i", img.spec, "sh", "-c", "cat; echo done", input="line one\nline two\n")
    assert r.returncode == 0, describe(r)
    assert r.stdout == "line one\nline two\ndone\n"


def test_stdout_and_stderr_stay_apart(rt, img):
    r = sh(rt, img, "echo to-out; echo to-err >&2")
    assert r.returncode == 0, describe(r)
    assert r.stdout == "to-out\n" and "to-err" in r.stderr and "to-err" not in r.stdout


# --------------------------------------------------------------------------
# command line parsing, --rm
# --------------------------------------------------------------------------


def test_options_after_the_image_belong_to_the_command(rt, img):
    r = rt.run("--rm", img.spec, "echo", "--name", "x", "-e", "y", "-d")
    assert r.returncode == 0 and r.stdout == "--name x -e y -d\n", describe(r)
    r = rt.run("--rm", img.spec, "--", "echo", "-v", "a")
    assert r.returncode == 0 and r.stdout == "-v a\n", describe(r)


def test_rm_removes_everything(rt, img):
    r = rt.run("--rm", "--name", "gone", img.spec, "sh", "-c", "echo x > /f")
    assert r.returncode == 0, describe(r)
    assert rt.find("gone") is None
    assert rt.state_entries() == [] and rt.data_entries() == []


def test_without_rm_the_container_stays_exited(rt, img):
    r = rt.run("--name", "kept", img.spec, "sh", "-c", "echo x > /f; exit 3")
    assert r.returncode == 3, describe(r)
    c = rt.find("kept")
    assert c is not None and c["status"] == "exited" and c["exit_code"] == 3, c
    assert not mounts.is_mounted(c["merged"]), "an exited container must be unmounted"
    assert containers.cgroups_of(c["id"]) == []
    assert (Path(c["upper"]) / "f").read_text() == "x\n"
    rt.ok("rm", "kept")
    assert rt.find("kept") is None
    assert rt.state_entries() == [] and rt.data_entries() == []
    assert not Path(c["upper"]).exists(), "rm must remove the generated upper"


def test_rm_keeps_a_user_given_upper(rt, img, tmp_path):
    upper = tmp_path / "upper"
    ok_sh(rt, img, "echo kept > /f", "--upper", upper)
    assert (upper / "f").read_text() == "kept\n"
