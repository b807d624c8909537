"""Running containers through the API with the real docker CLI and docker-py: create,
start, attach, wait, logs, restart, run -it under a pty, and containers that outlive a
restart of the service (docs/api.md, "Containers: create, start, attach, logs, exec" and
"Processes")."""

from __future__ import annotations

import json
import os
import time

import pytest

from helpers import api, containers
from helpers.apipty import Pty as _Pty
from helpers.apipty import until as _until
from helpers.apipty import wait_for as _wait_for
from overlayfs_py import procfs


def _ps_all(rt) -> list[dict]:
    return json.loads(rt.ok("ps", "-a", "--json").stdout)


def _zombie_children(pid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = containers.proc_stat(int(name))
            if st is not None and st.ppid == pid and st.state == "Z":
                out.append(int(name))
    return out


def test_run_rm_prints_pid_1_and_leaves_nothing(service, image, rt):
    r = service.docker_ok("run", "--rm", image, "sh", "-c", "echo $$")
    assert r.stdout == "1\n"
    assert _ps_all(rt) == []
    # the service reaps the monitors it started: no zombie child stays
    _wait_for(lambda: not _zombie_children(service.proc.pid), what="the monitor to be reaped")


def test_network_default_follows_the_service_and_host_is_the_hosts(service, image, rt):
    """The default network is $PYOVERLAY_NETWORK's when the service has it (the tests set
    none: the bridge is tested in a private network namespace, tests/api/test_api_network.py)."""
    import socket

    for mode in ("default", "none"):
        r = service.docker_ok("run", "--rm", "--network", mode, image, "sh", "-c", "grep -c : /proc/net/dev")
        assert r.stdout == "1\n", mode  # only lo
    r = service.docker_ok("run", "--rm", "--network", "host", image, "hostname")
    assert r.stdout == socket.gethostname() + "\n"
    r = service.docker("run", "--rm", "--network", "container:x", image, "true")
    assert r.returncode != 0 and "not implemented" in r.stderr


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
    taken = service.docker("create", "--name", "later", image, "true")
    assert taken.returncode != 0
    assert f'The container name "/later" is already in use by container "{cid}"' in taken.stderr
    service.docker_ok("start", "later")
    assert service.docker("wait", "later").stdout.strip() == "4"
    assert service.docker_ok("logs", "later").stdout == "hello\n"
    assert rt.ok("logs", "later").stdout == "hello\n"  # the CLI reads the same log
    rt.ok("rm", "later")


def test_create_refuses_what_it_cannot_do(service, image, rt):
    r = service.docker("create", "--dns-search", "example.org", image, "true")
    assert r.returncode != 0
    assert "not implemented" in r.stderr and "--dns-search" in r.stderr
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
    _wait_for(lambda: service.docker("logs", "talk").stderr == "e\n", what="the first lines")
    r = service.docker_ok("logs", "talk")
    assert r.stdout.startswith("line1\nline2\nline3\n")
    assert "e\n" in r.stderr and "e" not in r.stdout.split()
    last = service.docker_ok("logs", "--tail", "1", "talk")
    assert last.stdout + last.stderr in ("e\n", "late\n")  # the last line, whichever stream
    stamped = service.docker_ok("logs", "-t", "talk").stdout.splitlines()[0]
    stamp, _, text = stamped.partition(" ")
    assert text == "line1" and stamp.endswith("Z") and stamp[:4].isdigit()
    future, past = str(int(time.time()) + 3600), "1"
    assert service.docker_ok("logs", "--since", future, "talk").stdout == ""
    assert service.docker_ok("logs", "--until", past, "talk").stdout == ""
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
    return procfs.stat(pid).ppid


def test_monitor_is_the_services_child_and_survives_its_restart(service, image, rt, tmp_path):
    service.docker_ok("run", "-d", "--name", "web", image, "sh", "-c", "echo ready; exec httpd -f -p 8080")
    _wait_for(lambda: service.docker("logs", "web").stdout == "ready\n", what="web's first line")
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
        assert svc2.docker_ok("logs", "web").stdout == "ready\n"
        svc2.docker_ok("exec", "web", "sh", "-c", "echo from-exec >/proc/1/fd/1")  # into web's log
        _wait_for(lambda: svc2.docker("logs", "web").stdout == "ready\nfrom-exec\n", what="the new line")
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


def _rm_all(rt) -> None:
    for r in _ps_all(rt):
        rt.cli("rm", "-f", r["id"])


def test_run_it_under_a_pty_with_resize(service, image, rt):
    t = _Pty(service, "run", "-it", "--rm", image, "sh")
    try:
        t.expect("# ")  # the shell's prompt: it runs on the container's terminal
        t.send("echo h''i; stty size\n")
        t.expect("hi\r\n")
        _until(t, "stty size\n", "\n24 80\r\n")
        t.resize(30, 100)  # the CLI sees SIGWINCH and resizes the container's terminal
        _until(t, "stty size\n", "\n30 100\r\n")
        t.send("exit 5\n")
    finally:
        code = t.close()
        if code != 5:
            _rm_all(rt)
    assert code == 5, t.text()
    assert _ps_all(rt) == []


def test_attach_to_a_running_it_container(service, image, rt):
    service.docker_ok("run", "-dit", "--name", "box", image, "sh")
    t = _Pty(service, "attach", "box")
    try:
        t.send("echo at''tached\n")
        t.expect("attached")
        t.send("exit 7\n")
    finally:
        code = t.close()
        if code != 7:
            _rm_all(rt)
    assert code == 7, t.text()
    assert service.docker_ok("wait", "box").stdout.strip() == "7"
    rt.ok("rm", "box")


def test_run_i_passes_stdin_and_closes_it(service, image, rt):
    r = service.docker("run", "-i", "--rm", image, "sh", "-c", "cat; echo done", input="from stdin\n")
    assert r.returncode == 0, r
    assert r.stdout == "from stdin\ndone\n"


def test_create_options_reach_the_container(service, image, rt, tmp_path):
    vol = tmp_path / "vol"
    vol.mkdir()
    (vol / "f").write_text("from the host\n")
    vol.chmod(0o777)  # -u 1:1 writes there
    script = (
        "echo $$; hostname; cat /data/f; echo w > /data/g; touch /x 2>/dev/null || echo read-only; "
        "echo $ENV_A; pwd; id -u; grep -c : /proc/net/dev"
    )
    r = service.docker_ok(
        *("run", "--name", "opts", "--hostname", "hh", "--read-only", "-v", f"{vol}:/data", "-m", "64m"),
        *("--pids-limit", "50", "--cpus", "0.5", "--init", "-e", "ENV_A=a", "-w", "/tmp", "-u", "1:1"),
        *("--cap-drop", "CHOWN", "--entrypoint", "sh", image, "-c", script),
    )
    # --init: the command is PID 2 under the init; network "default" runs as none: only lo
    assert r.stdout.split() == ["2", "hh", "from", "the", "host", "read-only", "a", "/tmp", "1", "1"]
    assert (vol / "g").read_text() == "w\n"
    rec = next(x for x in _ps_all(rt) if x["name"] == "opts")
    saved = json.loads((rt.state / "containers" / rec["id"] / "state.json").read_text())
    assert saved["spec"]["limits"] == {"memory": 64 * 1024 * 1024, "pids": 50, "cpus": 0.5}
    assert saved["spec"]["read_only"] and saved["spec"]["init"]
    assert 0 not in saved["spec"]["caps"]  # CAP_CHOWN dropped
    assert saved["api"]["HostConfig"]["PidsLimit"] == 50  # the config as given, for inspect
    assert saved["api"]["Config"]["Hostname"] == "hh"
    rt.ok("rm", "opts")


def test_start_a_attaches_to_a_created_container(service, image, rt):
    service.docker_ok("create", "--name", "sa", image, "sh", "-c", "echo first; exit 9")
    r = service.docker("start", "-a", "sa")
    assert r.returncode == 9, r
    assert r.stdout == "first\n"
    rt.ok("rm", "sa")


def test_attach_with_stdin_to_a_detached_container(service, image, rt):
    service.docker_ok(
        *("run", "-di", "--name", "quiet", image, "sh", "-c"),
        "read line; echo got $line; echo to-err >&2; exit 4",
    )
    r = service.docker("attach", "quiet", input="hello\n")
    assert (r.returncode, r.stdout, r.stderr) == (4, "got hello\n", "to-err\n")
    rt.ok("rm", "quiet")


def test_run_i_streams_a_large_stdin_through_cat(service, image, rt):
    data = "".join(f"{i:07d}\n" for i in range(256 * 1024))  # 2 MiB: more than any pipe holds
    r = service.docker("run", "-i", "--rm", image, "cat", input=data, timeout=180)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout) == len(data) and r.stdout == data


def test_events_of_create_start_exec_die_restart(rt, image, tmp_path, monkeypatch):
    """The service's event bus (what ``GET /events`` serves) sees the run's events. The
    service runs in this process here, so that its bus can be read directly."""
    import subprocess
    import threading

    from helpers import containers
    from runner.api import cli as apicli
    from runner.api import events
    from runner.api.server import ApiServer

    for k, v in rt.env.items():
        monkeypatch.setenv(k, v)
    sock = tmp_path / "ev.sock"
    config = tmp_path / "docker-config"
    config.mkdir()
    denv = {"PATH": os.environ["PATH"], "HOME": str(config), "DOCKER_HOST": f"unix://{sock}"}
    denv["DOCKER_CONFIG"] = str(config)

    def docker(*args):
        r = subprocess.run([api.DOCKER, *args], env=denv, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r
        return r

    seq = events.bus.seq
    with containers.leftover_check(rt):
        server = ApiServer(apicli.build_router())
        server.listen_unix(str(sock))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            cid = docker("run", "-d", "--name", "ev", image, "sleep", "300").stdout.strip()
            assert subprocess.run([api.DOCKER, "exec", "ev", "sh", "-c", "exit 2"], env=denv).returncode == 2
            docker("restart", "-t", "1", "ev")
            docker("stop", "-t", "1", "ev")
            _wait_for(lambda: [e for e in events.bus.since(seq, 0)[1] if e["Action"] == "die"][1:], what="2 dies")
        finally:
            server.shutdown()
            rt.cli("rm", "-f", "ev")
    evs = [e for e in events.bus.since(seq, 0)[1] if e["Actor"]["ID"] == cid]
    actions = [e["Action"] for e in evs]
    assert actions[:2] == ["create", "start"]
    assert "exec_create: sh -c exit 2" in actions and "exec_start: sh -c exit 2" in actions
    assert [e["Actor"]["Attributes"]["exitCode"] for e in evs if e["Action"] == "exec_die"] == ["2"]
    dies = [e["Actor"]["Attributes"]["exitCode"] for e in evs if e["Action"] == "die"]
    assert len(dies) == 2 and set(dies) <= {"137", "143"}
    assert actions.index("restart") > actions.index("die")
    assert actions.count("start") == 2


def test_attach_logs_replays_the_output(service, image, rt):
    service.docker_ok("run", "--name", "said", image, "sh", "-c", "echo one; echo two >&2")
    client = service.client()
    try:
        out = client.api.attach("said", stdout=True, stderr=True, stream=False, logs=True)
        assert out == b"one\ntwo\n"
        out = client.api.attach("said", stdout=False, stderr=True, stream=False, logs=True)
        assert out == b"two\n"
    finally:
        client.close()
    rt.ok("rm", "said")
