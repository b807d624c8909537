"""``docker exec`` through the API: the process runs in the container (PID 1 is the
container's command), with -u, -e, -w, its exit status, stdin, and a TTY."""

from __future__ import annotations

import os
import time

import pytest

from overlayfs_py import procfs


@pytest.fixture
def web(service, image, rt):
    service.docker_ok("run", "-d", "--name", "web", image, "httpd", "-f", "-p", "8080")
    yield "web"
    rt.cli("rm", "-f", "web")


def test_exec_ps_sees_httpd_as_pid_1(service, web):
    out = service.docker_ok("exec", web, "ps").stdout.splitlines()
    assert out[0].split()[0] == "PID"
    assert out[1].split()[0] == "1" and out[1].endswith("httpd -f -p 8080")


def test_exec_user_env_workdir(service, web):
    r = service.docker_ok(
        "exec",
        "-u",
        "65534:65534",
        "-e",
        "GREETING=hello",
        "-w",
        "/tmp",
        web,
        "sh",
        "-c",
        "id -u; id -g; echo $GREETING; pwd",
    )
    assert r.stdout.split() == ["65534", "65534", "hello", "/tmp"]


def test_exec_exit_status_and_stderr(service, web):
    r = service.docker("exec", web, "sh", "-c", "echo out; echo err >&2; exit 6")
    assert r.returncode == 6
    assert r.stdout == "out\n" and r.stderr == "err\n"


def test_exec_i_reads_stdin(service, web):
    r = service.docker("exec", "-i", web, "sh", "-c", "tr a-z A-Z", input="shout\n")
    assert r.returncode == 0, r
    assert r.stdout == "SHOUT\n"


def test_exec_detached_runs_in_the_container(service, web):
    service.docker_ok("exec", "-d", web, "sh", "-c", "echo bg > /tmp/bg")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r = service.docker("exec", web, "cat", "/tmp/bg")
        if r.returncode == 0:
            break
        time.sleep(0.2)
    assert r.stdout == "bg\n"


def test_exec_in_a_stopped_container_is_refused(service, image, rt):
    service.docker_ok("run", "--name", "done", image, "true")
    r = service.docker("exec", "done", "true")
    assert r.returncode != 0 and "is not running" in r.stderr
    rt.ok("rm", "done")


def test_exec_it_under_a_pty(service, web):
    from helpers.apipty import Pty, until

    t = Pty(service, "exec", "-it", web, "sh")
    try:
        t.expect("# ")
        t.send("tty\n")
        t.expect("/dev/pts/")
        until(t, "stty size\n", "\n24 80\r\n")
        t.resize(33, 111)  # POST /exec/{id}/resize
        until(t, "stty size\n", "\n33 111\r\n")
        t.send("exit 3\n")
    finally:
        code = t.close()
    assert code == 3, t.text()


def _ppid(pid: int) -> int:
    return procfs.stat(pid).ppid


def _pids_running(argv: bytes) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if f.read() == argv:
                        out.append(int(name))
            except OSError:
                pass
    return out


def test_exec_process_descends_from_the_service(service, web):
    service.docker_ok("exec", "-d", web, "sleep", "1234")
    deadline = time.monotonic() + 60
    while not (pids := _pids_running(b"sleep\x001234\x00")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(pids) == 1
    helper = _ppid(pids[0])  # the runner's exec path (pyoverlay exec), the service's child
    assert _ppid(helper) == service.proc.pid
