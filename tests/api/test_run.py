"""Running containers through the API with the real docker CLI and docker-py: create,
start, attach, wait, logs, restart, run -it under a pty, and containers that outlive a
restart of the service (docs/api.md, "Containers: create, start, attach, logs, exec" and
"Processes")."""

from __future__ import annotations

import json
import os
import time

import pytest

from helpers import api


def _wait_for(pred, timeout: float = 60, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _ps_all(rt) -> list[dict]:
    return json.loads(rt.ok("ps", "-a", "--json").stdout)


def test_run_rm_prints_pid_1_and_leaves_nothing(service, image, rt):
    r = service.docker_ok("run", "--rm", image, "sh", "-c", "echo $$")
    assert r.stdout == "1\n"
    assert _ps_all(rt) == []


def test_run_exit_status_and_stderr_are_the_containers(service, image, rt):
    r = service.docker("run", "--name", "three", image, "sh", "-c", "echo out; echo err >&2; exit 3")
    assert r.returncode == 3, r
    assert r.stdout == "out\n"
    assert r.stderr == "err\n"
    rows = _ps_all(rt)
    assert [(row["name"], row["status"], row["exit_code"]) for row in rows] == [("three", "exited", 3)]
    rt.ok("rm", "three")


def test_missing_command_is_127_with_dockerds_message(service, image, rt):
    r = service.docker("run", "--rm", image, "nosuchcommand")
    assert r.returncode == 127, r
    assert "executable file not found in $PATH" in r.stderr
    assert _ps_all(rt) == []


def test_create_is_a_created_record_then_start_and_wait(service, image, rt):
    cid = service.docker_ok("create", "--name", "later", image, "sh", "-c", "echo hello; exit 4").stdout.strip()
    rows = _ps_all(rt)
    assert [(row["id"], row["status"]) for row in rows] == [(cid, "created")]
    assert "Created" in rt.ok("ps", "-a").stdout
    service.docker_ok("start", "later")
    assert service.docker("wait", "later").stdout.strip() == "4"
    assert service.docker_ok("logs", "later").stdout == "hello\n"
    rt.ok("rm", "later")


def test_create_refuses_port_publishing(service, image, rt):
    r = service.docker("create", "-p", "8080:80", image, "true")
    assert r.returncode != 0
    assert "not implemented" in r.stderr and "port publishing" in r.stderr
    assert _ps_all(rt) == []


def test_detached_logs_tail_timestamps_follow(service, image, rt):
    service.docker_ok(
        "run",
        "-d",
        "--name",
        "talk",
        image,
        "sh",
        "-c",
        "for i in 1 2 3; do echo line$i; done; echo e >&2; sleep 2; echo late",
    )
    _wait_for(lambda: "line3" in service.docker("logs", "talk").stdout, what="the first lines")
    r = service.docker_ok("logs", "talk")
    assert r.stdout.startswith("line1\nline2\nline3\n")
    assert "e\n" in r.stderr and "e" not in r.stdout.split()
    last = service.docker_ok("logs", "--tail", "1", "talk")
    assert last.stdout + last.stderr in ("e\n", "late\n")  # the last line, whichever stream
    stamped = service.docker_ok("logs", "-t", "talk").stdout.splitlines()[0]
    stamp, _, text = stamped.partition(" ")
    assert text == "line1" and stamp.endswith("Z") and stamp[:4].isdigit()
    followed = service.docker_ok("logs", "-f", "talk", timeout=120).stdout
    assert followed.endswith("late\n")  # -f returns once the container has exited
    assert service.docker_ok("wait", "talk").stdout.strip() == "0"
    rt.ok("rm", "talk")


def test_restart_runs_the_command_again_on_the_same_upper(service, image, rt):
    service.docker_ok("run", "-d", "--name", "again", image, "sh", "-c", "echo run >> /count; cat /count; sleep 300")
    _wait_for(lambda: service.docker("logs", "again").stdout == "run\n", what="the first run")
    service.docker_ok("restart", "-t", "1", "again")
    _wait_for(lambda: service.docker("logs", "again").stdout.endswith("run\nrun\n"), what="the second run")
    rows = _ps_all(rt)
    assert [(r["name"], r["status"]) for r in rows] == [("again", "running")]
    rt.ok("rm", "-f", "again")


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rpartition(")")[2].split()[1])


def test_monitor_is_the_services_child_and_survives_its_restart(service, image, rt, tmp_path):
    service.docker_ok("run", "-d", "--name", "web", image, "httpd", "-f", "-p", "8080")
    rec = next(r for r in _ps_all(rt) if r["name"] == "web")
    state = json.loads((rt.state / "containers" / rec["id"] / "state.json").read_text())
    monitor, pid1 = state["monitor_pid"], state["pid"]
    assert _ppid(monitor) == service.proc.pid  # service -> monitor -> (unshare) PID 1
    assert _ppid(pid1) == monitor
    assert os.getsid(monitor) != os.getsid(service.proc.pid)  # its own session
    service.stop()
    assert os.path.exists(f"/proc/{pid1}")  # the container runs on without the service
    svc2 = api.Service(rt, tmp_path / "svc2" / "docker.sock")
    try:
        ps = svc2.docker_ok("exec", "web", "ps").stdout
        first = [line.split() for line in ps.splitlines()[1:]][0]
        assert first[0] == "1" and "httpd" in " ".join(first)
        svc2.docker_ok("stop", "-t", "1", "web")
        assert svc2.docker_ok("wait", "web").stdout.strip() in ("137", "143", "0")
        svc2.docker_ok("rm", "web")
    finally:
        svc2.stop()
        for r in _ps_all(rt):
            rt.cli("rm", "-f", r["id"])


def test_docker_py_run_remove_detach_logs_wait(service, image, rt):
    why = api.which_docker_py()
    if why:
        pytest.fail(why)
    client = service.client()
    try:
        out = client.containers.run(image, ["sh", "-c", "echo $$; echo hi"], remove=True)
        assert out == b"1\nhi\n"
        c = client.containers.run(image, ["sh", "-c", "echo started; sleep 300"], detach=True, name="pyd")
        _wait_for(lambda: c.logs() == b"started\n", what="docker-py logs")
        code, output = c.exec_run(["sh", "-c", "echo $$ inside; exit 2"])
        assert code == 2 and output.endswith(b"inside\n")
        c.stop(timeout=1)
        assert c.wait()["StatusCode"] in (137, 143)
        c.remove()
    finally:
        client.close()
    assert _ps_all(rt) == []
