"""Tracing a container: events name the container and the pid inside it, the live
stream of a running container, ``--trace-summary`` at exit, and ``diff`` of what it
changed compared with what is on disk."""

from __future__ import annotations

import json
import os
import stat
import time

import pytest

from helpers.containers import describe

pytestmark = [pytest.mark.fuse, pytest.mark.needs_root, pytest.mark.usefixtures("_no_leftovers")]


def events_of(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def test_events_name_the_container_and_the_pid_inside(rt, images, tmp_path):
    trace = tmp_path / "t.jsonl"
    r = rt.run(
        "--name",
        "tr",
        "--trace",
        trace,
        images.two_layer.spec,
        "sh",
        "-c",
        "echo more >> /etc/motd; rm /bin/ls; sh -c 'mkdir /newdir; exit 0'",
    )
    assert r.returncode == 0, describe(r)
    cid = rt.find("tr")["id"]
    events = events_of(trace)
    assert events[-1]["event"] == "end" and events[-1]["dropped"] == 0
    fs_events = events[:-1]
    assert {e["container"] for e in fs_events} == {cid}
    motd = [e for e in fs_events if e["event"] == "copy_up_done" and e["path"] == "/etc/motd"][0]
    assert (motd["cpid"], motd["comm"], motd["reason"], motd["layer"]) == (1, "sh", "open-for-write", "lower1")
    rm = [e for e in fs_events if e["event"] == "whiteout_create"][0]
    assert (rm["path"], rm["comm"]) == ("/bin/ls", "rm") and rm["cpid"] > 1
    mk = [e for e in fs_events if e["event"] == "create"][0]
    assert (mk["path"], mk["kind"], mk["comm"]) == ("/newdir", "dir", "mkdir")
    # /etc is merged with the runner's init layer (it holds /etc/hostname's mount point)
    etc = [e for e in fs_events if e["event"] == "copy_up_done" and e["path"] == "/etc"][0]
    assert etc["layer"] == "init" and etc["reason"] == "parent"
    # the host pids are real processes' pids that were in the container's pid namespace
    assert all(isinstance(e["pid"], int) and e["pid"] > 1 for e in fs_events)
    rt.ok("rm", "tr")


def test_trace_summary_at_exit(rt, img):
    r = rt.run("--rm", "--trace-summary", img.spec, "sh", "-c", "echo x >> /etc/passwd; exec 3>>/etc/group; rm /bin/vi")
    assert r.returncode == 0, describe(r)
    assert "pyoverlay trace summary" in r.stderr
    assert "copy-ups:" in r.stderr and "whiteouts: 1 created" in r.stderr
    assert "unnecessary copy-ups" in r.stderr and "/etc/group" in r.stderr
    assert "/etc/passwd" in r.stderr


def test_trace_a_running_container_live(rt, img):
    cid = rt.detach("--name", "live", img.spec, "sleep", "1000")
    reader = rt.popen("trace", "--json", "live", stdout=__import__("subprocess").PIPE, text=True)
    time.sleep(1.5)
    rt.ok("exec", "live", "sh", "-c", "echo hi > /root/new; chmod 700 /bin")
    rt.ok("stop", "-t", "1", "live")
    out, _ = reader.communicate(timeout=60)
    events = [json.loads(line) for line in out.splitlines()]
    assert events[-1]["event"] == "end"
    kinds = [(e["event"], e.get("path")) for e in events[:-1]]
    assert ("create", "/root/new") in kinds and ("copy_up_done", "/bin") in kinds
    assert {e["container"] for e in events[:-1]} == {cid}
    assert reader.returncode == 0
    rt.ok("rm", "live")


def test_trace_of_a_stopped_container_is_an_error(rt, img):
    r = rt.run("--name", "gone", img.spec, "true")
    assert r.returncode == 0, describe(r)
    r = rt.cli("trace", "gone")
    assert r.returncode != 0 and "not running" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    rt.ok("rm", "gone")


def _walk_upper(upper) -> dict[str, str]:
    """path -> 'whiteout' | 'opaque' | 'dir' | 'file' for everything in an upper dir."""
    out = {}
    for dirpath, dirs, files in os.walk(upper):
        for n in dirs + files:
            p = os.path.join(dirpath, n)
            rel = "/" + os.path.relpath(p, upper)
            st = os.lstat(p)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                out[rel] = "whiteout"
            elif stat.S_ISDIR(st.st_mode):
                try:
                    opaque = os.getxattr(p, "trusted.overlay.opaque", follow_symlinks=False) == b"y"
                except OSError:
                    opaque = False
                out[rel] = "opaque" if opaque else "dir"
            else:
                out[rel] = "file"
    return out


def test_diff_of_a_container_matches_its_upper_on_disk(rt, images, tmp_path):
    upper = tmp_path / "upper"
    r = rt.run(
        "--name",
        "changed",
        "--upper",
        upper,
        images.two_layer.spec,
        "sh",
        "-c",
        "echo new > /app/new.txt; echo more >> /etc/motd; rm /bin/ls; "
        "rm -r /app && mkdir /app && echo again > /app/again; mkdir -p /var/log/x",
    )
    assert r.returncode == 0, describe(r)
    d = rt.ok("diff", "changed")
    got = [tuple(line.split(" ", 1)) for line in d.stdout.splitlines()]
    on_disk = _walk_upper(upper)
    # every entry of the upper is in the diff; whiteouts and opaque dirs as deletions
    listed = {p for _, p in got}
    assert set(on_disk) <= listed | {"/etc", "/bin"}, (on_disk, got)
    for path, kind in on_disk.items():
        entry = dict((p, k) for k, p in got).get(path)
        if kind == "whiteout":
            assert entry == "D", (path, got)
        elif kind == "opaque":
            assert entry == "D", (path, got)  # docker: an opaque dir replaced a lower one
    assert ("C", "/etc/motd") in got and ("D", "/bin/ls") in got
    assert ("A", "/app/again") in got and ("A", "/var") in got
    j = json.loads(rt.ok("diff", "--json", "changed").stdout)
    assert [(c["kind"], c["path"]) for c in j] == got
    rt.ok("rm", "changed")
