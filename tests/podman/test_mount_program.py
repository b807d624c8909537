"""pyoverlay as containers/storage's ``mount_program``: real podman (Debian's 4.3, runc),
as root and as the rootless test user, beside fuse-overlayfs (the baseline) with the
same steps.

* ``podman run --rm IMAGE sh -c ...`` writes, deletes and renames files; the container sees
  its root on the mount program's filesystem and its changes; nothing is left mounted or
  running afterwards;
* a run without ``--rm``: ``podman diff`` lists the changes, and ``pyoverlay diff`` on the
  container's upper layer (``podman inspect``: ``GraphDriver.Data.UpperDir``) says the same
  as podman says with the kernel's overlay (with a mount program podman compares two mounts
  instead, and reports a directory removed and made again as C, not D).

The arguments podman 4.3 passes a mount program: ``-o lowerdir=L,upperdir=U,workdir=W,,volatile
MERGED`` for ``run --rm``, ``...,workdir=W, MERGED`` (an empty last item) otherwise, and
``-o lowerdir=DIFF:EMPTY MERGED`` (no upper: read-only) for the image side of ``podman diff``.

Each environment is private (tests/helpers/podman.py): its own storage.conf,
containers.conf, registries.conf, policy.json, store and runtime dirs; the image is a
busybox rootfs imported from a tarball (no registry).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from helpers import mounts
from helpers.rootless import VENV_BIN

PROGRAMS = ["fuse-overlayfs", "pyoverlay"]
FSTYPES = {"fuse-overlayfs": "fuse.fuse-overlayfs", "pyoverlay": "fuse.pyoverlay"}

#: the container's changes: a new file, a deleted file (a whiteout), a renamed file, a
#: directory removed and made again (opaque), a file changed in place (a copy-up)
CHANGES = (
    "echo hello > /new.txt"
    " && rm /etc/motd"
    " && mv /etc/group /etc/group.moved"
    " && rm -r /home/app && mkdir /home/app && echo x > /home/app/f"
    " && echo more >> /etc/passwd"
)
#: then what the container sees
LOOK = (
    "cat /new.txt; ls /etc; ls /home/app; tail -n 1 /etc/passwd;"
    " test -e /etc/motd && echo motd-still-there;"
    " awk '$5 == \"/\" {print $0}' /proc/self/mountinfo | sed 's/.* - //' | cut -d' ' -f1"
)

#: what ``podman diff`` says about CHANGES with a mount program (fuse-overlayfs and pyoverlay
#: alike): containers/storage then compares a mount of the image with a mount of the
#: container ("naive diff"), so the directory removed and made again is C, not D
MOUNT_PROGRAM_DIFF = {
    "A /new.txt",
    "C /etc",
    "D /etc/motd",
    "D /etc/group",
    "A /etc/group.moved",
    "C /etc/passwd",
    "C /home",
    "C /home/app",
    "A /home/app/f",
}
#: ... and with the kernel's overlay (no mount program): it reads the upper layer itself
#: (moby's overlay rules, as ``pyoverlay diff`` does), so the opaque directory is D
KERNEL_DIFF = (MOUNT_PROGRAM_DIFF - {"C /home/app"}) | {"D /home/app"}
#: what podman leaves out of its diff: the files it puts into every container
#: (libpod/diff.go, initInodes)
PODMAN_OWN = {
    "/dev",
    "/etc/hostname",
    "/etc/hosts",
    "/etc/resolv.conf",
    "/etc/mtab",
    "/proc",
    "/run",
    "/run/notify",
    "/run/.containerenv",
    "/run/secrets",
    "/sys",
}


def _run(p, image: str, extra=()) -> subprocess.CompletedProcess:
    return p.podman("run", *extra, image, "sh", "-c", f"{CHANGES} && {{ {LOOK}; }}")


def _check_seen(out: str, program: str | None) -> None:
    """What the container printed (LOOK): its changes, and its root's filesystem type."""
    *listing, fstype = out.strip("\n").split("\n")
    want = FSTYPES[program] if program else "overlay"
    assert fstype == want, f"the container's root is {fstype!r}, not {want}: {out}"
    assert "motd-still-there" not in listing, out
    assert listing[0] == "hello" and "group.moved" in listing and "group" not in listing, out
    assert listing[-1] == "more" and "f" in listing, out


def _diff_set(text: str) -> set[str]:
    return {line.strip() for line in text.splitlines() if line.strip()}


def _pyoverlay_diff(p, container: str) -> set[str]:
    """``pyoverlay diff`` of the container's upper over its image layers (as root: it only
    reads the layers), without the files podman adds to every container."""
    upper, lowers = p.upper_of(container), p.lowers_of(container)
    r = subprocess.run(
        [VENV_BIN / "pyoverlay", "diff", upper, "--lower", ":".join(map(str, lowers))],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYOVERLAY_STATE_DIR": str(p.short / "root-state")},
    )
    assert r.returncode == 0, r.stderr
    return {line for line in _diff_set(r.stdout) if line.split(" ", 1)[1] not in PODMAN_OWN}


@pytest.mark.parametrize("program", PROGRAMS)
def test_root_run_rm_writes_deletes_renames(make_podman, program):
    p = make_podman(program)
    image = p.import_busybox()
    r = _run(p, image, ("--rm",))
    _check_seen(r.stdout, program)
    assert p.podman("ps", "-aq").stdout.strip() == ""
    # podman unmounted it; the server has exited (make_podman's cleanup fails the test if not)


@pytest.mark.parametrize("program", [None, *PROGRAMS], ids=["kernel", *PROGRAMS])
def test_root_podman_diff_and_pyoverlay_diff_agree(make_podman, program):
    p = make_podman(program)
    image = p.import_busybox()
    r = _run(p, image, ("--name", "c1"))
    _check_seen(r.stdout, program)
    p.settle()  # conmon's cleanup has unmounted the container
    diff = _diff_set(p.podman("diff", "c1").stdout)
    assert diff == (MOUNT_PROGRAM_DIFF if program else KERNEL_DIFF), sorted(diff)
    if program != "fuse-overlayfs":  # its upper has its own opaque markers (docs/podman.md)
        assert _pyoverlay_diff(p, "c1") == KERNEL_DIFF


@pytest.mark.parametrize("program", PROGRAMS)
def test_rootless_run_rm_writes_deletes_renames(podman_user, make_podman, program):
    p = make_podman(program, podman_user)
    image = p.import_busybox()
    r = _run(p, image, ("--rm",))
    _check_seen(r.stdout, program)
    if program == "pyoverlay":
        # podman ran it as root of its user namespace: the record went to the user's
        # $XDG_RUNTIME_DIR (no PYOVERLAY_STATE_DIR is set); FUSE was mounted with mount(2)
        # inside that namespace (fusermount3 is not setuid there)
        st = (p.runtime_dir / "pyoverlay").stat()
        assert st.st_uid == podman_user.uid and st.st_mode & 0o777 == 0o700
        if mounts.engine_name() == "direct" and "mount-program.args" in p.mount_log():
            assert "with mount(2)" in p.mount_log()  # the wrapper's server log says so


@pytest.mark.parametrize("program", PROGRAMS)
def test_rootless_podman_diff_and_pyoverlay_diff_agree(podman_user, make_podman, program):
    p = make_podman(program, podman_user)
    image = p.import_busybox()
    r = _run(p, image, ("--name", "c1"))
    _check_seen(r.stdout, program)
    p.settle()  # conmon's cleanup has unmounted the container
    diff = _diff_set(p.podman("diff", "c1").stdout)
    assert diff == MOUNT_PROGRAM_DIFF, sorted(diff)
    if program == "pyoverlay":
        upper = p.upper_of("c1")
        assert os.getxattr(upper / "home" / "app", "user.overlay.opaque") == b"y"  # userxattr
        assert os.stat(upper / "new.txt").st_uid == podman_user.uid  # root there is the user here
        assert _pyoverlay_diff(p, "c1") == KERNEL_DIFF


#: a detached container that makes two changes, then waits to be removed
_TRACED = "echo x >> /etc/motd && rm /etc/group && touch /done && sleep 600"


def _traced_events(r: subprocess.CompletedProcess) -> list[tuple[str, str, str]]:
    """(event, path, comm) of ``pyoverlay trace --history --json`` lines (run until ``timeout``)."""
    assert r.returncode in (0, 124, 130), r.stderr  # stopped by timeout -s INT: it was following
    events = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    return [(e["event"], e.get("path"), e.get("comm")) for e in events if "path" in e]


def _start_traced(p) -> str:
    image = p.import_busybox()
    p.podman("run", "-d", "--name", "web", image, "sh", "-c", _TRACED)
    deadline = time.monotonic() + 30
    while p.podman("exec", "web", "test", "-e", "/done", check=False).returncode != 0:
        assert time.monotonic() < deadline, "the container did not make its changes"
        time.sleep(0.1)
    return p.podman("inspect", "--format", "{{.GraphDriver.Data.MergedDir}}", "web").stdout.strip()


EXPECTED_TRACE = [("copy_up_start", "/etc/motd"), ("copy_up_done", "/etc/motd"), ("whiteout_create", "/etc/group")]


def test_root_trace_a_podman_container(make_podman):
    """The mount of a podman container is found by its merged dir (``podman inspect``) and
    traced: every copy-up and whiteout, with the process that made it."""
    p = make_podman("pyoverlay")
    merged = _start_traced(p)
    r = subprocess.run(
        ["timeout", "-s", "INT", "3", VENV_BIN / "pyoverlay", "trace", "--history", "--json", merged],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYOVERLAY_STATE_DIR": str(p.state)},
    )
    events = _traced_events(r)
    assert [(e, path) for e, path, _ in events if path in ("/etc/motd", "/etc/group")] == EXPECTED_TRACE, events
    assert ("whiteout_create", "/etc/group", "rm") in events


def test_rootless_trace_a_podman_container(podman_user, make_podman):
    """Rootless, the mount lives in podman's namespaces; ``pyoverlay trace MERGED`` run by the
    same user on the host (not through ``podman unshare``) finds its record in the user's
    $XDG_RUNTIME_DIR/pyoverlay and follows it."""
    p = make_podman("pyoverlay", podman_user)
    merged = _start_traced(p)
    assert not mounts.is_mounted(merged)  # not here: in podman's mount namespace
    env = podman_user.env(p.env())
    env.pop("PYOVERLAY_STATE_DIR", None)  # the user's default state dir, as podman's mount program had
    r = subprocess.run(
        podman_user.argv(["timeout", "-s", "INT", "3", VENV_BIN / "pyoverlay", "trace", "--history", "--json", merged]),
        capture_output=True,
        text=True,
        env=env,
    )
    events = _traced_events(r)
    assert [(e, path) for e, path, _ in events if path in ("/etc/motd", "/etc/group")] == EXPECTED_TRACE, events
    assert ("whiteout_create", "/etc/group", "rm") in events
    # the same record gives `pyoverlay mounts` and `explain` there
    r = subprocess.run(
        podman_user.argv([VENV_BIN / "pyoverlay", "mounts", "--json"]), capture_output=True, text=True, env=env
    )
    assert r.returncode == 0, r.stderr
    found = [m for m in json.loads(r.stdout) if m["mountpoint"] == merged]
    assert len(found) == 1 and found[0]["upperdir"] == str(p.upper_of("web")), r.stdout
    r = subprocess.run(
        podman_user.argv([VENV_BIN / "pyoverlay", "explain", merged, "/etc/motd"]),
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 0 and "served by upper" in r.stdout, r.stdout + r.stderr


#: With a mount program, containers/storage writes the layers it stores from a tar (pull,
#: ``podman commit``, ``buildah commit``) with AUFS whiteouts: ``.wh.NAME`` regular files,
#: not char 0/0 devices. fuse-overlayfs honours those in every layer, and so does
#: mount.fuse.pyoverlay (``-o aufs_whiteouts=on`` is its default; docs/podman.md).
_COMMIT_CHANGES = "echo hello > /new.txt && rm /etc/motd && rm -r /home && mkdir /home"
_COMMIT_LOOK = "cat /new.txt; test -e /etc/motd && echo motd-back; ls -A /home; true"


def _commit_then_run(p, program) -> None:
    """``podman commit`` of a container that deleted a file and remade a directory (the
    image's /home holds app/), then a run of the result: the deleted file stays deleted,
    the remade directory stays empty."""
    image = p.import_busybox()
    p.podman("run", "--name", "c1", image, "sh", "-c", _COMMIT_CHANGES)
    p.podman("commit", "c1", "localhost/committed:test")
    top = Path(
        p.podman(
            "image", "inspect", "--format", "{{.GraphDriver.Data.UpperDir}}", "localhost/committed:test"
        ).stdout.strip()
    )
    if program:  # the stored layer's whiteouts are .wh. files
        assert (top / "etc" / ".wh.motd").is_file() and not os.path.lexists(top / "etc" / "motd")
        assert any(n.startswith(".wh.") for n in os.listdir(top / "home")), os.listdir(top / "home")
    r = p.podman("run", "--rm", "localhost/committed:test", "sh", "-c", _COMMIT_LOOK)
    assert r.stdout == "hello\n", r.stdout


@pytest.mark.parametrize("program", [None, *PROGRAMS], ids=["kernel", *PROGRAMS])
def test_root_podman_commit_then_run_the_result(make_podman, program):
    _commit_then_run(make_podman(program), program)


@pytest.mark.parametrize("program", PROGRAMS)
def test_rootless_podman_commit_then_run_the_result(podman_user, make_podman, program):
    _commit_then_run(make_podman(program, podman_user), program)


def _layer_entries(top: Path) -> dict[str, str]:
    """name -> kind of a stored layer's ``diff/`` (whiteouts told apart: ``wh-char`` for a
    char 0/0 device, ``wh-file`` for an AUFS ``.wh.NAME`` file)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, top)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                out[rel] = "wh-char"
            elif name.startswith(".wh.") and stat.S_ISREG(st.st_mode) and st.st_size == 0:
                out[rel] = "wh-file"
            else:
                out[rel] = "dir" if stat.S_ISDIR(st.st_mode) else "file"
    return out


@pytest.mark.parametrize("program", [None, *PROGRAMS], ids=["kernel", *PROGRAMS])
def test_root_buildah_from_run_commit(make_podman, program):
    """``buildah from`` / ``run`` / ``commit``: the committed layer holds the step's changes
    (a new file, a deleted one as a whiteout, a renamed one), nothing of the base's."""
    _buildah_round_trip(make_podman(program), program)


@pytest.mark.parametrize("program", PROGRAMS)
def test_rootless_buildah_from_run_commit(podman_user, make_podman, program):
    _buildah_round_trip(make_podman(program, podman_user), program)


def _buildah_round_trip(p, program) -> None:
    image = p.import_busybox()
    ctr = p.buildah("from", image).stdout.strip()
    p.buildah(
        "run",
        "--network",
        "none",
        ctr,
        "--",
        "sh",
        "-c",
        "echo hello > /new.txt && rm /etc/motd && mv /etc/group /etc/group.moved",
    )
    p.buildah("commit", ctr, "localhost/built:test")
    top = Path(
        p.podman(
            "image", "inspect", "--format", "{{.GraphDriver.Data.UpperDir}}", "localhost/built:test"
        ).stdout.strip()
    )
    entries = _layer_entries(top)
    wh = "wh-file" if program else "wh-char"  # how containers/storage stores a whiteout (above)
    motd, group = ("etc/.wh.motd", "etc/.wh.group") if program else ("etc/motd", "etc/group")
    assert entries.get("new.txt") == "file" and entries.get("etc/group.moved") == "file", entries
    assert entries.get(motd) == wh and entries.get(group) == wh, entries
    assert "bin/busybox" not in entries and "etc/passwd" not in entries, entries  # the base's
    assert (top / "new.txt").read_text() == "hello\n"
