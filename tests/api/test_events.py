"""``docker events`` (``GET /events``) during a stop and an rm, with ``--since/--until``
and filters; and pyoverlay's own endpoints: the live copy-up trace of a container as a
stream of JSON events, and ``explain`` of a path."""

from __future__ import annotations

import json
import queue
import socket
import subprocess
import threading
import time

import pytest

from helpers.api import DOCKER


@pytest.fixture
def web(service, image, rt):
    cid = rt.detach("--name", "web", "--image", "busybox:latest", "httpd", "-f")
    yield cid
    rt.cli("rm", "-f", cid)


def _lines(proc: subprocess.Popen) -> queue.Queue:
    q: queue.Queue = queue.Queue()

    def pump():
        for line in proc.stdout:
            q.put(line.rstrip("\n"))
        q.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return q


def test_events_stream_a_stop_and_an_rm(service, rt, web):
    t0 = time.time()
    proc = subprocess.Popen(
        [DOCKER, "events", "--filter", "container=web", "--format", "{{.Type}} {{.Action}} {{.Actor.ID}}"],
        env=service.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1)  # subscribed
        other = rt.detach("--name", "other", "--image", "busybox:latest", "true")
        rt.wait_status("other")
        service.docker_ok("rm", other)  # filtered out
        service.docker_ok("stop", "-t", "1", "web")
        service.docker_ok("rm", "web")
        q = _lines(proc)
        seen = []
        deadline = time.monotonic() + 30
        while "destroy" not in [s.split()[1] for s in seen] and time.monotonic() < deadline:
            try:
                line = q.get(timeout=1)
            except queue.Empty:
                continue
            assert line is not None, f"docker events ended: {proc.stderr.read()}"
            seen.append(line)
        assert [s.split()[1] for s in seen] == ["kill", "stop", "destroy"], seen
        assert all(s.split()[0] == "container" and s.split()[2] == web for s in seen)
        assert proc.poll() is None  # still streaming until interrupted
    finally:
        proc.terminate()
        proc.wait(10)
    # the same past, replayed with --since/--until (which ends by itself)
    r = service.docker_ok(
        "events",
        "--since",
        str(int(t0)),
        "--until",
        str(int(time.time()) + 1),
        "--filter",
        "event=destroy",
        "--format",
        "{{.Actor.Attributes.name}}",
    )
    assert r.stdout.split() == ["other", "web"]


def _get_stream(sock_path, path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(str(sock_path))
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: docker\r\n\r\n".encode())
    return s


def _read_head(s: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        assert chunk, data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def test_trace_endpoint_streams_a_copy_up(service, rt, web):
    s = _get_stream(service.sock, "/v1.41/pyoverlay/containers/web/trace")
    try:
        head, buf = _read_head(s)
        assert head.startswith(b"HTTP/1.1 200"), head
        rt.ok("exec", "web", "sh", "-c", "echo more >> /etc/passwd")
        events = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(
            e.get("event") == "copy_up_done" and e.get("path") == "/etc/passwd" for e in events
        ):
            chunk = s.recv(65536)
            assert chunk, "the trace stream ended"
            buf += chunk
            for line in buf.split(b"\n"):
                line = line.strip()
                if line.startswith(b"{"):
                    try:
                        events.append(json.loads(line))
                    except ValueError:
                        pass
        done = [e for e in events if e.get("event") == "copy_up_done" and e.get("path") == "/etc/passwd"]
        assert done, events
        assert done[0]["comm"] == "sh"
    finally:
        s.close()
    stopped = service.docker_ok("stop", "-t", "0", "web")
    assert stopped.returncode == 0
    s = _get_stream(service.sock, "/v1.41/pyoverlay/containers/web/trace")
    try:
        head, _ = _read_head(s)
        assert head.startswith(b"HTTP/1.1 409"), head
    finally:
        s.close()


def test_explain_endpoint(service, rt, web):
    rt.ok("exec", "web", "sh", "-c", "echo x > /etc/motd")
    s = _get_stream(service.sock, "/v1.41/pyoverlay/containers/web/explain?path=/etc/motd")
    try:
        head, body = _read_head(s)
        assert head.startswith(b"HTTP/1.1 200"), head
        n = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")).split(b":")[1])
        while len(body) < n:
            body += s.recv(65536)
    finally:
        s.close()
    ex = json.loads(body)
    assert ex["path"] == "/etc/motd"
    assert ex["served"]["label"] == "upper"
    assert [layer["label"] for layer in ex["layers"]][:1] == ["upper"]
