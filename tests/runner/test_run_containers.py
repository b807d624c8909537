"""Container lifecycle: ``run -d``, ``ps [--json]``, ``exec``, ``top``, ``stop``,
``kill``, ``rm``, ``logs``; cgroup limits on disk; a container whose monitor
was SIGKILLed ("dead"); SIGTERM/SIGHUP to a foreground runner.

Each test uses private PYOVERLAY_STATE_DIR/PYOVERLAY_DATA_DIR under its tmp dir
and fails if a mount, cgroup or process is left (``leftover_check``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import containers, mounts
from helpers.containers import DEFAULT_PATH, DOCKER_CAPBND, alive, describe, status_map

pytestmark = [pytest.mark.fuse, pytest.mark.needs_root, pytest.mark.usefixtures("_no_leftovers")]

PS_KEYS = {"id", "name", "command", "status", "exit_code", "pid", "layers", "upper", "merged", "created"}


@pytest.fixture
def web(rt, img):
    """A detached ``sleep 1000`` named "web" (removed with rm -f afterwards)."""
    cid = rt.detach("--name", "web", img.spec, "sleep", "1000")
    yield cid
    r = rt.cli("rm", "-f", cid)
    assert r.returncode == 0 or rt.find(cid) is None, describe(r)


def lines(text: str) -> list[str]:
    return [line for line in text.replace("\r", "").splitlines() if line.strip()]


def wait_running(rt, ref, timeout=30) -> dict:
    c = rt.wait_status(ref, ("running",), timeout)
    assert isinstance(c["pid"], int) and c["pid"] > 0, c
    return c


# --------------------------------------------------------------------------
# run -d and ps
# --------------------------------------------------------------------------


def test_detach_and_ps_json(rt, images, web):
    c = wait_running(rt, web)
    assert set(c) >= PS_KEYS, f"ps --json keys: {sorted(c)}"
    assert c["id"] == web and c["name"] == "web"
    assert c["command"] == ["sleep", "1000"]
    assert c["exit_code"] is None, c
    real = [os.path.realpath(layer) for layer in images.bare.layers]
    assert [os.path.realpath(layer) for layer in c["layers"]] == real
    pid = c["pid"]
    assert alive(pid)
    nspid = containers.status_field(pid, "NSpid").split()
    assert len(nspid) == 2 and nspid[0] == str(pid) and nspid[-1] == "1", nspid
    assert containers.cmdline(pid) == ["sleep", "1000"]
    assert mounts.is_mounted(c["merged"]), c["merged"]
    assert Path(c["merged"]).resolve().is_relative_to(rt.base.resolve()), c["merged"]
    assert Path(c["upper"]).is_dir()
    assert Path(c["upper"]).resolve().is_relative_to((rt.data / "containers" / web).resolve()), (
        "the generated upper belongs in $PYOVERLAY_DATA_DIR/containers/<id>/"
    )
    assert (rt.state / "containers" / web).is_dir()
    assert c["created"], c
    # without -a: running containers only
    assert [x["id"] for x in rt.ps(all=False)] == [web]


def test_ps_plain_and_quiet(rt, img, web):
    r = rt.ok("ps")
    assert "web" in r.stdout and web[:12] in r.stdout, r.stdout
    q = lines(rt.ok("ps", "-q").stdout)
    assert len(q) == 1 and len(q[0]) >= 12 and web.startswith(q[0]), q
    r = rt.run("--name", "done", img.spec, "true")
    assert r.returncode == 0, describe(r)
    assert len(lines(rt.ok("ps", "-q").stdout)) == 1
    assert len(lines(rt.ok("ps", "-a", "-q").stdout)) == 2
    rt.ok("rm", "done")


def test_detach_rm_removes_itself(rt, img):
    cid = rt.detach("--rm", img.spec, "sleep", "0.5")
    deadline = time.monotonic() + 20
    while rt.find(cid) is not None:
        assert time.monotonic() < deadline, rt.find(cid)
        time.sleep(0.1)
    assert rt.state_entries() == [] and rt.data_entries() == []


def test_duplicate_name_is_125(rt, img, web):
    r = rt.run("--name", "web", img.spec, "true")
    assert r.returncode == 125, describe(r)
    assert lines(r.stderr)[0].startswith("pyoverlay: "), describe(r)
    assert [c["id"] for c in rt.ps()] == [web]
    assert rt.find("web")["status"] == "running"


# --------------------------------------------------------------------------
# exec
# --------------------------------------------------------------------------


def test_exec_sees_the_containers_pid_namespace(rt, web):
    r = rt.ok("exec", "web", "ps", "-o", "pid,comm")
    rows = containers.ps_table(r.stdout)
    pids = {int(x["PID"]): x["COMMAND"] for x in rows}
    assert pids.get(1) == "sleep", r.stdout
    assert "ps" in pids.values(), r.stdout
    st = status_map(rt.ok("exec", web, "cat", "/proc/self/status").stdout)
    assert len(st["NSpid"].split()) == 1 and st["NSpid"] != "1", st["NSpid"]


def test_exec_relays_the_exit_code(rt, web):
    assert rt.cli("exec", "web", "sh", "-c", "exit 3").returncode == 3
    assert rt.cli("exec", web[:10], "true").returncode == 0  # a unique id prefix
    assert rt.cli("exec", web, "--", "sh", "-c", "exit 0").returncode == 0
    r = rt.cli("exec", "web", "/nonexistent")
    assert r.returncode == 127, describe(r)


def test_exec_options(rt, web):
    env = dict(line.split("=", 1) for line in lines(rt.ok("exec", "-e", "FOO=bar", "web", "env").stdout))
    assert env["FOO"] == "bar" and env["PATH"] == DEFAULT_PATH, env
    assert env["HOSTNAME"] == web[:12], env
    assert rt.ok("exec", "-w", "/tmp", "web", "pwd").stdout == "/tmp\n"
    assert lines(rt.ok("exec", "-u", "1000:1000", "web", "sh", "-c", "id -u; id -g").stdout) == ["1000", "1000"]
    assert rt.ok("exec", "-u", "app", "web", "id", "-un").stdout == "app\n"
    r = rt.cli("exec", "-i", "web", "cat", input="via stdin\n")
    assert r.returncode == 0 and r.stdout == "via stdin\n", describe(r)
    r = rt.cli("exec", "web", "cat", input="must not arrive\n")
    assert r.returncode == 0 and r.stdout == "", describe(r)


def test_exec_joins_the_containers_namespaces_cgroup_and_confinement(rt, web):
    c = wait_running(rt, web)
    rt.ok("exec", "web", "sh", "-c", "echo written-by-exec > /tmp/marker")
    assert rt.ok("exec", "web", "cat", "/tmp/marker").stdout == "written-by-exec\n"
    assert (Path(c["upper"]) / "tmp" / "marker").read_text() == "written-by-exec\n"
    assert rt.ok("exec", "web", "hostname").stdout.strip() == web[:12]
    assert containers.interfaces(rt.ok("exec", "web", "cat", "/proc/net/dev").stdout) == ["lo"]
    st = status_map(rt.ok("exec", "web", "cat", "/proc/self/status").stdout)
    assert int(st["CapBnd"], 16) == DOCKER_CAPBND and st["NoNewPrivs"] == "1", st
    cg = rt.ok("exec", "web", "cat", "/proc/self/cgroup").stdout
    assert f"pyoverlay/{web}" in cg, f"the exec'd process is not in the container's cgroup:\n{cg}"


def test_exec_into_missing_or_stopped_container_is_125(rt, img):
    r = rt.cli("exec", "no-such-container", "true")
    assert r.returncode == 125, describe(r)
    r = rt.run("--name", "finished", img.spec, "true")
    assert r.returncode == 0, describe(r)
    r = rt.cli("exec", "finished", "true")
    assert r.returncode == 125, describe(r)
    rt.ok("rm", "finished")


# --------------------------------------------------------------------------
# top, stop, kill, rm, logs
# --------------------------------------------------------------------------


def test_top(rt, web):
    c = wait_running(rt, web)
    r = rt.ok("top", "web")
    header = lines(r.stdout)[0].split()
    assert "PID" in header and "CPID" in header, r.stdout
    rows = containers.ps_table(r.stdout)
    me = [x for x in rows if x.get("PID") == str(c["pid"])]
    assert len(me) == 1, r.stdout
    assert me[0]["CPID"] == "1" and "sleep" in " ".join(me[0].values()), r.stdout


def test_stop_sigkills_after_the_timeout(rt, web):
    c = wait_running(rt, web)
    t0 = time.monotonic()
    rt.ok("stop", "-t", "2", "web")
    elapsed = time.monotonic() - t0
    # sleep as PID 1 has no SIGTERM handler: the kernel drops SIGTERM
    assert 1.5 <= elapsed < 20, f"stop took {elapsed:.1f}s"
    assert not alive(c["pid"])
    after = rt.find(web)
    assert after["status"] == "exited" and after["exit_code"] == 137, after
    assert not mounts.is_mounted(c["merged"]), "stop returned before unmounting"
    assert containers.cgroups_of(web) == [], "stop returned before removing the cgroup"
    assert rt.ps(all=False) == []
    rt.ok("rm", "web")
    assert rt.find(web) is None
    assert rt.state_entries() == [] and rt.data_entries() == []
    assert not Path(c["upper"]).exists()


def test_stop_graceful_with_init(rt, img):
    cid = rt.detach("--init", img.spec, "sleep", "1000")
    wait_running(rt, cid)
    t0 = time.monotonic()
    rt.ok("stop", cid)  # default timeout 10 s: the init forwards SIGTERM to sleep
    assert time.monotonic() - t0 < 8
    after = rt.find(cid)
    assert after["status"] == "exited" and after["exit_code"] == 143, after
    rt.ok("rm", cid)


def test_stop_several(rt, img):
    a = rt.detach("--name", "a", img.spec, "sleep", "1000")
    b = rt.detach("--name", "b", "--init", img.spec, "sleep", "1000")
    rt.ok("stop", "-t", "1", "a", b[:12])
    assert {c["id"]: c["status"] for c in rt.ps()} == {a: "exited", b: "exited"}
    rt.ok("rm", "a", "b")
    assert rt.ps() == []


@pytest.mark.parametrize(
    "sig, init, code",
    [
        ("KILL", False, 137),
        ("SIGKILL", False, 137),
        ("9", False, 137),
        ("TERM", True, 143),
        ("SIGHUP", True, 129),
    ],
)
def test_kill(rt, img, sig, init, code):
    cid = rt.detach(*(["--init"] if init else []), img.spec, "sleep", "1000")
    c = wait_running(rt, cid)
    rt.ok("kill", "-s", sig, cid)
    after = rt.wait_status(cid, ("exited",), timeout=20)
    assert after["exit_code"] == code, after
    assert not alive(c["pid"])
    rt.ok("rm", cid)


def test_rm_refuses_a_running_container_unless_forced(rt, web):
    r = rt.cli("rm", "web")
    assert r.returncode != 0, describe(r)
    assert rt.find("web")["status"] == "running"
    c = rt.find("web")
    rt.ok("rm", "-f", "web")
    assert rt.find(web) is None and not alive(c["pid"])
    assert rt.state_entries() == [] and rt.data_entries() == []
    assert containers.cgroups_of(web) == []


def test_rm_missing_container_fails(rt):
    r = rt.cli("rm", "no-such-container")
    assert r.returncode != 0, describe(r)


def test_logs(rt, img):
    cid = rt.detach(img.spec, "sh", "-c", "echo out-line; echo err-line >&2; exit 5")
    c = rt.wait_status(cid, ("exited",))
    assert c["exit_code"] == 5, c
    r = rt.ok("logs", cid)
    both = r.stdout + r.stderr
    assert "out-line" in both and "err-line" in both, describe(r)
    rt.ok("rm", cid)


def test_upper_of_a_detached_container(rt, web):
    c = wait_running(rt, web)
    rt.ok("exec", web, "sh", "-c", "echo data > /kept")
    rt.ok("stop", "-t", "1", web)
    assert (Path(c["upper"]) / "kept").read_text() == "data\n"
    rt.ok("rm", web)
    assert not Path(c["upper"]).exists()


# --------------------------------------------------------------------------
# cgroups
# --------------------------------------------------------------------------


def test_cgroup_limits(rt, img):
    cid = rt.detach("-m", "64m", "--pids-limit", "20", "--cpus", "0.5", img.spec, "sleep", "1000")
    c = wait_running(rt, cid)
    dirs = containers.cgroups_of(cid)
    assert dirs, "no cgroup dir under /sys/fs/cgroup/*/pyoverlay/<id>"
    mem = containers.read_cgroup_file(cid, "memory", "memory.limit_in_bytes") or containers.read_cgroup_file(
        cid, "memory", "memory.max"
    )
    assert mem == str(64 << 20), mem
    assert containers.read_cgroup_file(cid, "pids", "pids.max") == "20"
    quota = containers.read_cgroup_file(cid, "cpu", "cpu.cfs_quota_us")
    if quota is not None:
        period = containers.read_cgroup_file(cid, "cpu", "cpu.cfs_period_us")
        assert int(quota) / int(period) == pytest.approx(0.5), (quota, period)
    else:
        q, p = containers.read_cgroup_file(cid, "cpu", "cpu.max").split()
        assert int(q) / int(p) == pytest.approx(0.5), (q, p)
    for ctl in ("memory", "pids", "cpu"):
        procs = containers.read_cgroup_file(cid, ctl, "cgroup.procs")
        assert procs is not None and str(c["pid"]) in procs.split(), (ctl, procs)
    rt.ok("stop", "-t", "1", cid)
    assert containers.cgroups_of(cid) == []
    rt.ok("rm", cid)


# --------------------------------------------------------------------------
# a monitor killed by SIGKILL: the container is "dead"
# --------------------------------------------------------------------------


def test_dead_container_is_detected_and_removed(rt, img):
    cid = rt.detach("--name", "victim", img.spec, "sleep", "1000")
    c = wait_running(rt, cid)
    pid = c["pid"]
    monitor = containers.proc_stat(pid).ppid
    assert monitor in containers.procs_with_env(rt.env_marker), (
        f"the parent of the container's PID 1 is not a runner process: {containers.describe_pid(monitor)}"
    )
    os.kill(monitor, signal.SIGKILL)
    os.kill(pid, signal.SIGKILL)
    assert containers.wait_gone(monitor) and containers.wait_gone(pid)
    dead = rt.wait_status(cid, ("dead",), timeout=10)
    assert dead["id"] == cid
    assert [x["id"] for x in rt.ps(all=False)] == [], "a dead container is not running"
    r = rt.cli("rm", "-f", "victim")
    assert r.returncode == 0, describe(r)
    assert rt.find(cid) is None
    assert rt.mounts() == [], rt.mounts()
    assert containers.cgroups_of(cid) == []
    assert rt.state_entries() == [] and rt.data_entries() == []
    left = [containers.describe_pid(p) for p in containers.procs_with_env(rt.env_marker) if alive(p)]
    assert not left, f"runner processes survive rm -f: {left}"


# --------------------------------------------------------------------------
# SIGTERM / SIGHUP to a foreground runner
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sig, init, codes",
    [
        (signal.SIGTERM, False, (137,)),
        (signal.SIGTERM, True, (143,)),
        (signal.SIGHUP, False, (137,)),
    ],
)
def test_signal_to_foreground_runner(rt, img, tmp_path, sig, init, codes):
    with open(tmp_path / "runner.err", "w+") as err:
        p = rt.popen(
            "run",
            "--rm",
            "--name",
            "fg",
            "--stop-timeout",
            "2",
            *(["--init"] if init else []),
            img.spec,
            "sleep",
            "1000",
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                c = rt.find("fg")
                if c is not None and c["status"] == "running" and c.get("pid"):
                    break
                assert p.poll() is None, f"runner exited early: {p.returncode}"
                assert time.monotonic() < deadline, f"container never ran: {c}"
                time.sleep(0.1)
            t0 = time.monotonic()
            p.send_signal(sig)
            try:
                rc = p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the runner ignored {sig.name} for 20 s")
            elapsed = time.monotonic() - t0
            err.seek(0)
            assert rc in codes, f"exit status {rc}, stderr: {err.read()}"
            assert elapsed < 12, f"took {elapsed:.1f}s"
            if not init:
                assert elapsed >= 1.5, "SIGKILL came before --stop-timeout"
            assert not alive(c["pid"])
            assert rt.mounts() == [], rt.mounts()
            assert not any(r.mountpoint == os.path.realpath(c["merged"]) for r in mounts.mount_table())
            assert containers.procs_rooted_under(c["merged"]) == []
            assert containers.cgroups_of(c["id"]) == []
            assert rt.state_entries() == [] and rt.data_entries() == []
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_ps_json_is_valid_with_no_containers(rt):
    r = rt.ok("ps", "-a", "--json")
    assert json.loads(r.stdout) == []
