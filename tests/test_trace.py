"""Trace events against a real pyoverlay mount: the exact events, in order, for scripted
operations; the process named in them is the one that made the request; live readers
(late, slow, paused) never stall the filesystem and are told what they lost."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time

import pytest

from helpers import mounts

pytestmark = [pytest.mark.fuse, pytest.mark.needs_root]

COMMON = {"v", "seq", "ts", "event", "pid", "comm", "uid", "gid", "container", "cpid"}


class TracedMount(mounts.PyoverlayMount):
    def __init__(self, *a, trace_file, **kw):
        super().__init__(*a, **kw)
        self.trace_file = trace_file

    def finish(self) -> list[dict]:
        """Unmount (the server writes the end record) and load the trace file."""
        if mounts.is_mounted(self.mountpoint):
            self.__exit__(None, None, None)
        self.events = [json.loads(line) for line in self.trace_file.read_text().splitlines()]
        return self.events

    def argv(self):
        argv = super().argv()
        i = argv.index("mount") + 1
        return argv[:i] + ["--trace", str(self.trace_file)] + argv[i:]


@pytest.fixture
def layers(tmp_path):
    l1, l2 = tmp_path / "l1", tmp_path / "l2"
    (l2 / "d" / "sub").mkdir(parents=True)
    (l2 / "d" / "f").write_text("lower file\n")
    (l2 / "d" / "sub" / "g").write_text("g\n")
    (l2 / "top.txt").write_text("top\n")
    (l1 / "e").mkdir(parents=True)
    (l1 / "e" / "h").write_text("h" * 5000)
    (tmp_path / "upper").mkdir()
    return tmp_path


@pytest.fixture
def traced(layers):
    trace = layers / "trace.jsonl"
    m = TracedMount([layers / "l1", layers / "l2"], layers / "mnt", layers / "upper", trace_file=trace)
    with m:
        yield m


def run(*argv, cwd):
    """Run a command and return its pid (it execs in place: the pid is the requester's)."""
    p = subprocess.Popen(list(argv), cwd=cwd)
    assert p.wait(timeout=30) == 0, argv
    return p.pid


def shape(events, pid=None):
    """(event, path, reason/kind/target) of each filesystem event, optionally of one pid."""
    out = []
    for e in events:
        if e["event"] in ("end", "dropped") or (pid is not None and e["pid"] != pid):
            continue
        extra = e.get("reason") or e.get("kind") or e.get("target")
        out.append((e["event"], e.get("path"), extra))
    return out


SCENARIOS = {
    # name: (command, expected events)
    "open_for_write": (
        ["sh", "-c", "echo more >> d/f"],
        [
            ("copy_up_start", "/d", "parent"),
            ("copy_up_done", "/d", "parent"),
            ("copy_up_start", "/d/f", "open-for-write"),
            ("copy_up_done", "/d/f", "open-for-write"),
        ],
    ),
    "truncate": (
        ["sh", "-c", "echo new > top.txt"],
        [("copy_up_start", "/top.txt", "truncate"), ("copy_up_done", "/top.txt", "truncate")],
    ),
    "chmod": (
        ["chmod", "600", "e/h"],
        [
            ("copy_up_start", "/e", "parent"),
            ("copy_up_done", "/e", "parent"),
            ("copy_up_start", "/e/h", "chmod"),
            ("copy_up_done", "/e/h", "chmod"),
        ],
    ),
    "rename": (
        ["mv", "top.txt", "moved.txt"],
        [
            ("copy_up_start", "/top.txt", "rename"),
            ("copy_up_done", "/top.txt", "rename"),
            ("rename", "/top.txt", "/moved.txt"),
            ("whiteout_create", "/top.txt", None),
        ],
    ),
    "rm_r_mkdir": (
        ["sh", "-c", "rm -r d && mkdir d"],
        [
            ("copy_up_start", "/d", "remove"),
            ("copy_up_done", "/d", "remove"),
            ("whiteout_create", "/d/f", None),
            ("copy_up_start", "/d/sub", "remove"),
            ("copy_up_done", "/d/sub", "remove"),
            ("whiteout_create", "/d/sub/g", None),
            ("whiteout_create", "/d/sub", None),
            ("whiteout_create", "/d", None),
            ("opaque_dir", "/d", None),
            ("whiteout_remove", "/d", None),
            ("create", "/d", "dir"),
        ],
    ),
    "link": (
        ["ln", "top.txt", "hard"],
        [("copy_up_start", "/top.txt", "link"), ("copy_up_done", "/top.txt", "link"), ("create", "/hard", "link")],
    ),
    "new_file_in_lower_dir": (
        ["sh", "-c", "echo x > e/new && mkdir e/nd && ln -s h e/sl"],
        [
            ("copy_up_start", "/e", "create"),
            ("copy_up_done", "/e", "create"),
            ("create", "/e/new", "file"),
            ("create", "/e/nd", "dir"),
            ("create", "/e/sl", "symlink"),
        ],
    ),
    "exdev": (["sh", "-c", "mv d d2 || true"], None),  # checked below: mv falls back to copying
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_scenario_events_in_order(layers, traced, name):
    argv, expected = SCENARIOS[name]
    pid = run(*argv, cwd=traced.path)
    traced.finish()
    events = traced.events
    assert events[-1]["event"] == "end" and events[-1]["dropped"] == 0
    assert events[-1]["emitted"] == len(events) - 1
    assert [e["seq"] for e in events[:-1]] == list(range(1, len(events)))
    for e in events[:-1]:
        assert set(e) >= COMMON, e
        assert e["v"] == 1 and e["container"] is None and e["cpid"] is None
    if expected is not None:
        # the first process of the script is the shell or the tool itself
        got = shape(events)
        assert got == expected, "\n".join(map(str, got))
    else:
        assert shape(events)[0] == ("rename_exdev", "/d", "/d2")
    if argv[0] != "sh":  # the tool execs in place: its pid is the requester
        assert {e["pid"] for e in events[:-1]} == {pid}
        assert {e["comm"] for e in events[:-1]} == {os.path.basename(argv[0])}
    for e in events[:-1]:
        assert e["uid"] == 0 and e["gid"] == 0


def test_copy_up_done_carries_size_bytes_and_source_layer(layers, traced):
    run("sh", "-c", "exec 3>>e/h", cwd=traced.path)
    traced.finish()
    done = [e for e in traced.events if e["event"] == "copy_up_done" and e["path"] == "/e/h"][0]
    assert (done["layer"], done["size"], done["bytes"]) == ("lower1", 5000, 5000)
    assert done["duration_ms"] >= 0
    unused = [e for e in traced.events if e["event"] == "copy_up_unused"]
    assert [(e["path"], e["bytes"]) for e in unused] == [("/e/h", 5000)]  # opened, never written


def test_unused_is_not_reported_after_a_write_or_for_o_trunc(layers, traced):
    run("sh", "-c", "echo x >> e/h; echo y > top.txt", cwd=traced.path)
    traced.finish()
    assert not [e for e in traced.events if e["event"] == "copy_up_unused"]


def test_events_name_each_process(layers, traced):
    a = run("chmod", "600", "top.txt", cwd=traced.path)
    b = run("touch", "e/h", cwd=traced.path)
    traced.finish()
    by_path = {e["path"]: e for e in traced.events if e["event"] == "copy_up_done"}
    assert (by_path["/top.txt"]["pid"], by_path["/top.txt"]["comm"]) == (a, "chmod")
    # touch opens the file for writing (copy-up), then sets its times through that fd
    assert (by_path["/e/h"]["pid"], by_path["/e/h"]["comm"], by_path["/e/h"]["reason"]) == (
        b,
        "touch",
        "open-for-write",
    )
    assert not [e for e in traced.events if e["event"] == "copy_up_unused"]  # utimes used it


def test_a_process_that_execs_is_named_by_its_new_command(layers, traced):
    """A container's PID 1 is runc's init until it execs the container's command, and the
    command's first changes come right after: the new name, not the one before the exec."""
    pid = run("sh", "-c", "echo x > new.txt && exec dd if=/dev/null of=e/h conv=notrunc status=none", cwd=traced.path)
    traced.finish()
    by_path = {e["path"]: e for e in traced.events if e["event"] in ("create", "copy_up_done")}
    assert (by_path["/new.txt"]["pid"], by_path["/new.txt"]["comm"]) == (pid, "sh")
    assert (by_path["/e/h"]["pid"], by_path["/e/h"]["comm"]) == (pid, "dd")


def _events_so_far(traced) -> list[dict]:
    """The events the server has written to its trace file by now."""
    return [json.loads(line) for line in traced.trace_file.read_text().splitlines() if line.endswith("}")]


def test_a_process_that_has_exited_keeps_its_name(layers, traced):
    """copy_up_unused comes with the release of the file, which the kernel sends after the
    process has exited: it is named as at its open, not '?'."""
    # sh opens top.txt for writing and exits (reaped by run()); the file is released when
    # its background child, which inherited the descriptor, exits half a second later
    pid = run("sh", "-c", "exec 3>>top.txt; sleep 0.5 &", cwd=traced.path)
    deadline = time.monotonic() + 10
    while not [e for e in _events_so_far(traced) if e["event"] == "copy_up_unused"]:
        assert time.monotonic() < deadline, "no copy_up_unused"
        time.sleep(0.05)
    traced.finish()
    unused = [e for e in traced.events if e["event"] == "copy_up_unused"]
    assert [(e["path"], e["pid"], e["comm"]) for e in unused] == [("/top.txt", pid, "sh")], unused


def test_a_failed_copy_up_is_reported(layers, traced):
    # a lower file the server cannot read (a FIFO cannot be opened for data? use a
    # directory that vanished from the lower layer after lookup)
    os.stat(traced.path / "d" / "f")  # looked up
    os.rename(layers / "l2" / "d" / "f", layers / "gone")  # the lower changes underneath
    with pytest.raises(OSError), open(traced.path / "d" / "f", "a"):
        pass
    traced.finish()
    failed = [e for e in traced.events if e["event"] == "copy_up_failed"]
    assert failed and failed[0]["path"] == "/d/f" and failed[0]["error"]
    assert not (layers / "upper" / "d" / "f").exists()


# --- live readers ------------------------------------------------------------------------------


def _socket_of(mountpoint):
    from overlayfs_py import state

    return state.lookup(os.path.realpath(mountpoint))["trace_socket"]


def _reader(mountpoint, history=False):
    from overlayfs_py.unixsock import connect_unix

    s = connect_unix(_socket_of(mountpoint))
    s.sendall(json.dumps({"history": history}).encode() + b"\n")
    return s


def _read_all(sock, timeout=30):
    sock.settimeout(timeout)
    buf = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    return [json.loads(line) for line in buf.splitlines()]


def test_live_reader_gets_events_and_the_end(layers, traced):
    s = _reader(traced.path)
    time.sleep(0.2)
    run("chmod", "600", "top.txt", cwd=traced.path)
    traced.finish()
    got = _read_all(s)
    assert [e["event"] for e in got] == ["copy_up_start", "copy_up_done", "end"]


def test_a_late_reader_can_ask_for_history(layers, traced):
    run("chmod", "600", "top.txt", cwd=traced.path)
    late = _reader(traced.path, history=True)
    fresh = _reader(traced.path, history=False)
    time.sleep(0.2)
    run("chmod", "600", "e/h", cwd=traced.path)
    traced.finish()
    paths_late = [e.get("path") for e in _read_all(late) if e["event"] == "copy_up_done"]
    paths_fresh = [e.get("path") for e in _read_all(fresh) if e["event"] == "copy_up_done"]
    assert paths_late == ["/top.txt", "/e", "/e/h"]
    assert paths_fresh == ["/e", "/e/h"]


N_FILES = 12000


#: a reader that keeps up, in a process of its own (a thread of the test would share the
#: GIL with the writer and could fall behind a fast server): prints "ready" once connected
_ACTIVE_READER = """
import json, sys
from overlayfs_py.unixsock import connect_unix
s = connect_unix(sys.argv[1])
s.sendall(json.dumps({"history": True}).encode() + b"\\n")
print("ready", flush=True)
with open(sys.argv[2], "wb") as out:
    while chunk := s.recv(1 << 20):
        out.write(chunk)
"""


def test_a_paused_reader_never_stalls_the_filesystem(layers, traced, tmp_path):
    """A reader that stops reading: the writer must still finish (a stall would hang it:
    the join below fails); once it reads again it learns how many events it lost; the
    trace file and a reader that keeps up miss nothing."""
    # both ask for the history: the server registers a reader a little after it connects,
    # and the events of that moment come to it as history instead of being missed
    paused = _reader(traced.path, history=True)
    got = tmp_path / "active.jsonl"
    active = subprocess.Popen(
        [sys.executable, "-c", _ACTIVE_READER, _socket_of(traced.path), str(got)],
        env=mounts.pyoverlay_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert active.stdout is not None and active.stdout.readline().strip() == "ready"
    d = traced.path / "many"
    d.mkdir()

    def write_many():
        for i in range(N_FILES):
            os.close(os.open(d / f"f{i}", os.O_CREAT | os.O_WRONLY, 0o644))

    writer = threading.Thread(target=write_many)
    writer.start()
    writer.join(120)
    assert not writer.is_alive(), "the filesystem stalled behind a paused trace reader"
    paused_events = []
    t_paused = threading.Thread(target=lambda: paused_events.extend(_read_all(paused, 120)))
    t_paused.start()  # the paused reader resumes
    time.sleep(1)
    run("chmod", "600", "top.txt", cwd=traced.path)  # one more event after the gap
    traced.finish()
    assert active.wait(60) == 0
    active_events = [json.loads(line) for line in got.read_bytes().splitlines()]
    t_paused.join(60)
    total = len(traced.events) - 1
    assert traced.events[-1]["event"] == "end" and traced.events[-1]["dropped"] == 0
    assert len([e for e in traced.events if e["event"] == "create"]) == N_FILES + 1
    assert len(active_events) == total + 1  # the reader that kept up: everything
    lost = sum(e["count"] for e in paused_events if e["event"] == "dropped")
    seen = len([e for e in paused_events if e["event"] not in ("dropped", "end")])
    assert lost > 0, f"the paused reader should have lost events (saw {seen} of {total})"
    assert seen + lost == total and paused_events[-1]["event"] == "end"
    assert paused_events[-2]["event"] == "copy_up_done"  # and got what came after the gap


# --- the trace command ------------------------------------------------------------------------


def _cli(*args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "pyoverlay_cli", *args],
        cwd=mounts.REPO_ROOT,
        env=mounts.pyoverlay_env(),
        capture_output=True,
        text=True,
        timeout=60,
        **kw,
    )


def test_trace_command_follows_a_mount(layers, traced):
    p = subprocess.Popen(
        [sys.executable, "-m", "pyoverlay_cli", "trace", "--json", str(traced.path)],
        cwd=mounts.REPO_ROOT,
        env=mounts.pyoverlay_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    q = subprocess.Popen(
        [sys.executable, "-m", "pyoverlay_cli", "trace", "--summary", "--path", "/e", str(traced.path)],
        cwd=mounts.REPO_ROOT,
        env=mounts.pyoverlay_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.5)
    pid = run("chmod", "600", "e/h", cwd=traced.path)
    run("sh", "-c", "exec 3>>top.txt", cwd=traced.path)
    traced.finish()
    out, _ = p.communicate(timeout=30)
    events = [json.loads(line) for line in out.splitlines()]
    assert [e["event"] for e in events][-1] == "end"
    assert shape(events, pid) == [
        ("copy_up_start", "/e", "parent"),
        ("copy_up_done", "/e", "parent"),
        ("copy_up_start", "/e/h", "chmod"),
        ("copy_up_done", "/e/h", "chmod"),
    ]
    summary, _ = q.communicate(timeout=30)
    assert "copy-ups: 2 (4.9 KiB)" in summary  # only /e and /e/h pass --path /e
    assert f"chmod({pid})" in summary
    assert "unnecessary" not in summary  # /top.txt is outside /e


def test_trace_file_summary(layers, traced):
    sh = run("sh", "-c", "exec 3>>top.txt; chmod 600 e/h", cwd=traced.path)
    traced.finish()
    r = _cli("trace", "--file", str(traced.trace_file), "--summary")
    assert r.returncode == 0, r.stderr
    assert "unnecessary copy-ups" in r.stdout and "/top.txt" in r.stdout
    r = _cli("trace", "--file", str(traced.trace_file), "--summary", "--json")
    data = json.loads(r.stdout)
    assert data["counts"]["copy_up_done"] == 3 and data["copy_up_bytes"] == 5004
    assert [u["path"] for u in data["unnecessary"]] == ["/top.txt"]
    r = _cli("trace", "--file", str(traced.trace_file), "--event", "copy_up_unused")
    assert r.returncode == 0 and r.stdout.count("copy_up_unused") == 1
    # --pid: only the shell's own events (its chmod child has another pid)
    r = _cli("trace", "--file", str(traced.trace_file), "--json", "--pid", str(sh))
    mine = [json.loads(line) for line in r.stdout.splitlines()]
    assert {e["path"] for e in mine if e["event"] != "end"} == {"/top.txt"}
    assert {e["pid"] for e in mine if e["event"] != "end"} == {sh}
    r = _cli("trace", "--file", str(traced.trace_file), "--event", "copyup")
    assert r.returncode != 0 and "unknown event 'copyup'" in r.stderr


def test_trace_errors_are_one_line(tmp_path):
    r = _cli("trace", str(tmp_path))
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
    r = _cli("trace")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1


def test_trace_of_a_mount_whose_server_was_killed_is_one_line(layers, traced):
    """A server killed with SIGKILL leaves its record and its trace socket behind: trace
    says the server has exited (one line), neither a traceback from connect() nor silence."""
    from overlayfs_py import state

    mp = os.path.realpath(traced.path)
    rec = state.lookup(mp)
    assert rec is not None and os.path.exists(rec["trace_socket"])
    os.kill(rec["pid"], 9)
    traced.proc.wait(timeout=30)
    mounts.abort_fuse_connection(traced.path)
    mounts.force_unmount(traced.path)
    try:
        assert state.lookup(mp) is not None  # what the server left
        r = _cli("trace", str(traced.path))
        assert r.returncode == 1, r.stdout + r.stderr
        assert r.stderr.strip() == (
            f"pyoverlay: the server of {mp} (pid {rec['pid']}) has exited: it is not a live pyoverlay mount"
        ), r.stderr
    finally:
        state.forget(mp, rec["pid"])


def test_trace_file_must_not_be_inside_the_mount(layers):
    (layers / "mnt").mkdir()
    r = _cli(
        "mount",
        "--trace",
        str(layers / "mnt" / "t.jsonl"),
        f"{layers}/l1:{layers}/l2",
        str(layers / "upper"),
        str(layers / "mnt"),
    )
    assert r.returncode == 2 and "inside the mountpoint" in r.stderr
    assert not mounts.is_mounted(layers / "mnt")


def test_trace_file_that_is_a_symlink_is_refused_not_followed(layers):
    """A symlink planted at the trace file's name (in /tmp, say) must not make a root
    server truncate and write the file it points at: f323dfb resolved the name and wrote
    through it."""
    (layers / "mnt").mkdir()
    victim = layers / "victim"
    victim.write_text("precious\n")
    (layers / "t.jsonl").symlink_to(victim)
    r = _cli(
        "mount",
        "--trace",
        str(layers / "t.jsonl"),
        f"{layers}/l1:{layers}/l2",
        str(layers / "upper"),
        str(layers / "mnt"),
    )
    assert r.returncode == 2 and "symbolic link" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert victim.read_text() == "precious\n"
    assert not mounts.is_mounted(layers / "mnt")


def test_trace_sink_never_writes_through_a_symlink(tmp_path):
    """The server's own open (after validation, a name swapped for a symlink) is O_NOFOLLOW."""
    import trio

    from overlayfs_py.trace import Tracer
    from overlayfs_py.tracesink import TraceSink

    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / "t.jsonl").symlink_to(victim)
    tracer = Tracer()
    tracer.close()  # no events: a sink that opens the file writes the end record and returns
    sink = TraceSink(tracer, str(tmp_path / "t.jsonl"), None)
    with pytest.raises(OSError):
        trio.run(sink.run)
    assert victim.read_text() == "precious\n"


def test_whiteout_file_on_disk_matches_the_events(layers, traced):
    run("sh", "-c", "rm d/f; mv top.txt t2; mkdir -p new/deep", cwd=traced.path)
    traced.finish()
    created = {e["path"] for e in traced.events if e["event"] == "whiteout_create"}
    on_disk = set()
    for dirpath, dirs, files in os.walk(layers / "upper"):
        for n in files + dirs:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                on_disk.add("/" + os.path.relpath(p, layers / "upper"))
    assert created == on_disk == {"/d/f", "/top.txt"}


def test_redirect_rename_event(layers):
    """redirect_dir=on: renaming a lower directory is a `rename` carrying the redirect
    written (relative in the same parent, absolute elsewhere); without it, rename_exdev."""
    trace = layers / "trace.jsonl"
    m = TracedMount(
        [layers / "l1", layers / "l2"], layers / "mnt", layers / "upper", trace_file=trace, options=["redirect_dir=on"]
    )
    with m:
        os.rename(m.path / "d", m.path / "d2")
        os.rename(m.path / "d2", m.path / "e" / "d3")
        events = m.finish()
    renames = [(e["path"], e["target"], e["redirect"]) for e in events if e["event"] == "rename"]
    assert renames == [("/d", "/d2", "d"), ("/d2", "/e/d3", "/d")]
    assert not [e for e in events if e["event"] in ("rename_exdev", "opaque_dir")]
