"""Acting on containers through the API with the real docker CLI and docker-py: ``ps``,
``inspect``, ``top``, ``stop``, ``kill``, ``rm``, ``container prune``, ``diff``, ``commit``,
``export``. The containers are started with ``pyoverlay run -d --image`` on the same
runtime: the CLI and the service share their records."""

from __future__ import annotations

import io
import json
import tarfile
import time

import pytest

from helpers.api import which_docker_py
from helpers.containers import cmdline


def start(rt, name: str, *cmd: str) -> str:
    return rt.detach("--name", name, "--image", "busybox:latest", *(cmd or ("httpd", "-f")))


@pytest.fixture
def web(service, image, rt):
    cid = start(rt, "web")
    yield cid
    rt.cli("rm", "-f", cid)


def test_ps_lists_the_cli_containers(service, rt, web):
    done = rt.detach("--name", "done", "--image", "busybox:latest", "true")
    rt.wait_status("done")
    r = service.docker_ok("ps", "--format", "{{.ID}} {{.Names}} {{.Image}} {{.Status}}")
    lines = r.stdout.splitlines()
    assert len(lines) == 1, r.stdout
    short, names, img, status = lines[0].split(" ", 3)
    assert (short, names, img) == (web[:12], "web", "busybox:latest")
    assert status.startswith("Up ")
    assert service.docker_ok("ps", "-q").stdout.split() == [web[:12]]
    everything = service.docker_ok("ps", "-a", "--no-trunc", "--format", "{{.ID}} {{.Status}}").stdout
    rows = dict(line.split(" ", 1) for line in everything.splitlines())
    assert set(rows) == {web, done}
    assert rows[done].startswith("Exited (0) ")
    assert service.docker_ok("ps", "-aq", "--filter", "status=exited").stdout.split() == [done[:12]]
    assert service.docker_ok("ps", "-aq", "--filter", "name=web").stdout.split() == [web[:12]]
    assert service.docker_ok("ps", "-aq", "--filter", "ancestor=busybox").stdout.split() == [done[:12], web[:12]]
    assert service.docker_ok("ps", "-aq", "--filter", "exited=0").stdout.split() == [done[:12]]
    assert service.docker_ok("ps", "-q", "--filter", "before=done").stdout.split() == [web[:12]]
    sized = service.docker_ok("ps", "-s", "--filter", "name=web", "--format", "{{.Size}}").stdout
    assert "virtual" in sized, sized
    rt.ok("rm", done)


def test_inspect_shows_the_host_pid_and_the_layers(service, rt, web):
    r = service.docker_ok("inspect", "--type", "container", "web")
    [info] = json.loads(r.stdout)
    rec = rt.find("web")
    assert info["Id"] == web and info["Name"] == "/web"
    assert info["State"]["Running"] is True and info["State"]["Status"] == "running"
    assert info["State"]["Pid"] == rec["pid"] > 1
    assert cmdline(info["State"]["Pid"])[:2] == ["httpd", "-f"]  # the host pid of PID 1
    assert info["Path"] == "httpd" and info["Args"] == ["-f"]
    gd = info["GraphDriver"]
    assert gd["Name"] == "pyoverlay"
    assert gd["Data"]["UpperDir"] == rec["upper"] and gd["Data"]["MergedDir"] == rec["merged"]
    assert gd["Data"]["LowerDir"].split(":")[-len(rec["layers"]) :] == rec["layers"]
    # a unique id prefix and the name with its "/" work too; an unknown one is dockerd's 404
    short = service.docker_ok("inspect", "-f", "{{.Id}}", web[:6]).stdout.strip()
    assert short == web
    bad = service.docker("container", "inspect", "nope")
    assert bad.returncode == 1 and "No such container: nope" in bad.stderr


def test_top_lists_httpd(service, web):
    r = service.docker_ok("top", "web")
    head, *rows = r.stdout.splitlines()
    assert "PID" in head.split() and "CMD" in head.split()
    assert any(row.rstrip().endswith("httpd -f") for row in rows), r.stdout
    aux = service.docker_ok("top", "web", "aux").stdout.splitlines()
    assert aux[0].split()[:2] == ["USER", "PID"] and len(aux) == 2 and aux[1].endswith("httpd -f")
    stopped = service.docker("top", "nope")
    assert stopped.returncode == 1 and "No such container: nope" in stopped.stderr


def test_stop_and_kill(service, rt, image):
    web = start(rt, "web")
    trap = start(rt, "trap", "sh", "-c", "trap 'exit 7' USR1; while :; do sleep 0.1; done")
    try:
        assert service.docker_ok("stop", "-t", "1", "web").stdout.strip() == "web"
        code = service.docker_ok("inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}", web).stdout.split()
        assert code[0] == "exited" and code[1] in ("143", "137")
        assert service.docker_ok("stop", "web").stdout.strip() == "web"  # already stopped: 304
        again = service.docker("kill", "web")
        assert again.returncode == 1 and f"Container {web} is not running" in again.stderr
        time.sleep(0.5)  # the trap is set up
        service.docker_ok("kill", "-s", "USR1", "trap")
        rt.wait_status("trap")
        assert rt.find("trap")["exit_code"] == 7
        bad = service.docker("kill", "-s", "NOPE", "trap")
        assert bad.returncode == 1 and "Invalid signal: NOPE" in bad.stderr
    finally:
        rt.cli("rm", "-f", web)
        rt.cli("rm", "-f", trap)


def test_kill_by_number(service, rt, web):
    service.docker_ok("kill", "-s", "9", "web")
    assert rt.wait_status("web")["exit_code"] == 137


def test_rm_refuses_a_running_container_without_force(service, rt, web):
    r = service.docker("rm", "web")
    assert r.returncode == 1
    assert f"You cannot remove a running container {web}" in r.stderr
    assert rt.find("web")["status"] == "running"
    assert service.docker_ok("rm", "-f", "web").stdout.strip() == "web"
    assert rt.find(web) is None and web not in rt.state_entries() and web not in rt.data_entries()
    gone = service.docker("rm", "web")
    assert gone.returncode == 1 and "No such container: web" in gone.stderr


def test_container_prune_removes_only_stopped_ones(service, rt, web):
    done = rt.detach("--name", "done", "--image", "busybox:latest", "sh", "-c", "echo data > /big")
    rt.wait_status("done")
    young = service.docker_ok("container", "prune", "-f", "--filter", "until=1h")  # made before an hour ago
    assert done not in young.stdout and rt.find(done) is not None
    r = service.docker_ok("container", "prune", "-f")
    assert done in r.stdout.split()
    assert "Total reclaimed space:" in r.stdout
    assert rt.find(done) is None
    assert rt.find(web)["status"] == "running"


def test_diff_after_exec(service, rt, web):
    rt.ok("exec", "web", "sh", "-c", "echo x > /etc/motd; echo new > /etc/added; rm /bin/vi")
    r = service.docker_ok("diff", "web")
    lines = set(r.stdout.splitlines())
    assert {"C /etc", "C /etc/motd", "A /etc/added", "C /bin", "D /bin/vi"} <= lines, r.stdout


def test_commit_then_run_the_image(service, rt, web):
    rt.ok("exec", "web", "sh", "-c", "echo committed > /etc/motd; rm /bin/vi")
    r = service.docker_ok("commit", "-c", "ENV MARK=yes", "-m", "a note", "web", "snap:1")
    img_id = r.stdout.strip()
    assert img_id.startswith("sha256:")
    images = rt.ok("images", "--json").stdout
    assert "snap:1" in images
    out = rt.ok(
        "run", "--rm", "--image", "snap:1", "sh", "-c", "cat /etc/motd; echo $MARK; test -e /bin/vi || echo no-vi"
    )
    assert out.stdout.split() == ["committed", "yes", "no-vi"]
    # untagged, with a new default command, from the stopped container
    service.docker_ok("stop", "-t", "0", "web")
    untagged = service.docker_ok("commit", "-c", 'CMD ["cat", "/etc/motd"]', "web").stdout.strip()
    assert untagged.startswith("sha256:") and untagged != img_id
    assert rt.ok("run", "--rm", "--image", untagged).stdout == "committed\n"


def test_export_holds_the_merged_tree(service, rt, web):
    rt.ok("exec", "web", "sh", "-c", "echo exported > /etc/motd; mkdir /newdir; ln -s /etc/motd /newdir/link")
    r = service.docker("export", "web", text=False)
    assert r.returncode == 0, r.stderr
    with tarfile.open(fileobj=io.BytesIO(r.stdout)) as tf:
        names = {m.name.rstrip("/"): m for m in tf.getmembers()}
        assert names["bin/busybox"].isreg() and names["bin/busybox"].size > 100000
        assert tf.extractfile(names["etc/motd"]).read() == b"exported\n"
        assert names["newdir"].isdir()
        assert names["newdir/link"].issym() and names["newdir/link"].linkname == "/etc/motd"
    # a stopped container is exported through a private mount of its layers
    service.docker_ok("stop", "-t", "0", "web")
    r2 = service.docker("export", "web", text=False)
    assert r2.returncode == 0, r2.stderr
    with tarfile.open(fileobj=io.BytesIO(r2.stdout)) as tf:
        assert tf.extractfile("etc/motd").read() == b"exported\n"
    deadline = time.monotonic() + 30  # the private mount goes when the request ends
    while rt.mounts() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert rt.mounts() == []


def test_docker_py(service, rt, web):
    why = which_docker_py()
    if why:
        pytest.fail(why)
    client = service.client()
    try:
        listed = client.containers.list(all=True)
        assert [c.id for c in listed] == [web]
        c = client.containers.get("web")
        assert c.name == "web" and c.status == "running"
        assert c.attrs["State"]["Pid"] == rt.find("web")["pid"]
        assert any(p[-1] == "httpd -f" for p in c.top()["Processes"])
        rt.ok("exec", "web", "sh", "-c", "echo py > /etc/motd")
        assert {"Kind": 0, "Path": "/etc/motd"} in c.diff()
        # Container.commit() then inspects the image (GET /images/ID/json: the image
        # endpoints' work); the API call itself is the commit
        img = client.api.commit(c.id, repository="pysnap", tag="v1")
        assert img["Id"].startswith("sha256:")
        out = rt.ok("run", "--rm", "--image", "pysnap:v1", "cat", "/etc/motd").stdout
        assert out == "py\n"
        c.stop(timeout=1)
        c.reload()
        assert c.status == "exited"
        c.remove()
        assert client.containers.list(all=True) == []
    finally:
        client.close()


def test_an_ambiguous_id_prefix_is_refused(service, rt):
    """Two records whose ids share a prefix (written as a monitor writes them: exited
    containers of no image): the prefix is refused, the names and full ids work."""
    ids = ["abc" + "0" * 60 + "1", "abc" + "0" * 60 + "2"]
    for n, cid in enumerate(ids):
        d = rt.state / "containers" / cid
        d.mkdir(parents=True, mode=0o700)
        rec = {
            "id": cid,
            "name": f"a{n}",
            "command": ["true"],
            "status": "exited",
            "created": time.time(),
            "exit_code": 0,
            "finished": time.time(),
        }
        (d / "state.json").write_text(json.dumps(rec))
    r = service.docker("inspect", "--type", "container", "abc")
    assert r.returncode == 1 and "multiple IDs found with provided prefix: abc" in r.stderr
    assert service.docker_ok("inspect", "-f", "{{.Name}}", ids[1]).stdout.strip() == "/a1"
    assert set(service.docker_ok("ps", "-aq", "--no-trunc").stdout.split()) == set(ids)
    assert service.docker_ok("rm", "a0", ids[1]).stdout.split() == ["a0", ids[1]]
    assert rt.state_entries() == []
