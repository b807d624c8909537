"""``pyoverlay diff``: what an upper layer changed, in ``docker diff`` form.

Uppers are produced by real operations on a kernel overlay (the oracle of what an
upper looks like) and on a pyoverlay mount; the expected lists are written by hand
from moby's ``changes()`` rules (see overlayfs_py/diff.py). Also hand-made uppers for
the corners (xattr whiteouts, whiteouts in lowers, symlinks in lowers), and the CLI:
``--lower``, ``--json``, the error without lowers, a live mount's record, a container.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import mounts
from helpers.stacks import OPQ, T0, WH, XWH, D, F, L, build_layer
from overlayfs_py.diff import Change, detect_userxattr, diff

REPO = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.needs_root]


def _lowers(base: Path) -> tuple[Path, Path]:
    l1, l2 = base / "l1", base / "l2"
    dirs = {
        p: D(mtime_ns=T0) for p in ("etc", "usr", "usr/share", "usr/share/doc", "var", "var/log", "srv", "srv/data")
    }
    build_layer(l1, {**dirs, "etc/motd": F(b"hello\n"), "usr/share/doc/c": F(b"c\n")})
    build_layer(
        l2,
        {
            **dirs,
            "etc/hosts": F(b"127.0.0.1 localhost\n"),
            "etc/chm": F(b"chmod me\n", mode=0o644),
            "etc/gone": F(b"to be removed\n"),
            "usr/share/doc/a": F(b"a\n"),
            "usr/share/doc/b": F(b"b\n"),
            "var/log/same": F(b"touched\n"),
            "var/log/rewrite": F(b"rewritten with the same bytes\n"),
            "srv/data/old": F(b"old\n"),
        },
    )
    return l1, l2


def _ops(m: Path) -> None:
    """The container's work, through the mount."""
    (m / "etc/new").write_bytes(b"new\n")  # add a file
    with open(m / "etc/motd", "ab") as f:  # modify a lower file
        f.write(b"more\n")
    os.chmod(m / "etc/chm", 0o600)  # chmod one
    os.unlink(m / "etc/gone")  # rm a lower file
    shutil.rmtree(m / "usr/share/doc")  # rm -r a lower dir, mkdir it again
    os.mkdir(m / "usr/share/doc")
    (m / "usr/share/doc/a").write_bytes(b"a, again\n")  # ... a name the lower had
    (m / "usr/share/doc/z").write_bytes(b"z\n")  # ... and a new one
    os.makedirs(m / "opt/app")  # a new dir with files
    (m / "opt/app/f").write_bytes(b"f\n")
    (m / "opt/app/g").write_bytes(b"g\n")
    os.utime(m / "var/log/same")  # touch: copy-up, content unchanged
    (m / "var/log/rewrite").write_bytes(b"rewritten with the same bytes\n")
    (m / "srv/data/new").write_bytes(b"n\n")  # a new file in a dir whose
    os.utime(m / "srv/data", ns=(T0, T0))  # times are then put back


# By moby's rules: /usr, /var, /var/log, /srv keep the lower dirs' size, mode and mtime
# (a copy-up keeps the upper parent's times) -> skipped; /srv/data too, but its added
# child reports it; /usr/share/doc is opaque over a lower dir -> D, its "a" exists in
# the lower view -> C, "z" does not -> A; /opt is new -> A (its parent is the root).
EXPECTED = [
    ("C", "/etc"),
    ("C", "/etc/chm"),
    ("D", "/etc/gone"),
    ("C", "/etc/motd"),
    ("A", "/etc/new"),
    ("A", "/opt"),
    ("A", "/opt/app"),
    ("A", "/opt/app/f"),
    ("A", "/opt/app/g"),
    ("C", "/srv/data"),
    ("A", "/srv/data/new"),
    ("C", "/usr/share"),
    ("D", "/usr/share/doc"),
    ("C", "/usr/share/doc/a"),
    ("A", "/usr/share/doc/z"),
    ("C", "/var/log/rewrite"),
    ("C", "/var/log/same"),
]
COPIED_UNCHANGED = {("C", "/var/log/rewrite"), ("C", "/var/log/same")}

MOUNTERS = [
    pytest.param(mounts.KernelOverlay, marks=pytest.mark.kernel, id="kernel"),
    pytest.param(mounts.PyoverlayMount, marks=pytest.mark.fuse, id="pyoverlay"),
]


def _written_upper(tmp_path: Path, mounter, options=()) -> tuple[Path, Path, Path]:
    l1, l2 = _lowers(tmp_path)
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    with mounter([l1, l2], tmp_path / "mnt", upper=upper, workdir=work, options=options) as m:
        _ops(m.path)
    return upper, l1, l2


@pytest.mark.parametrize("options", [(), ("userxattr",)], ids=["trusted", "userxattr"])
@pytest.mark.parametrize("mounter", MOUNTERS)
def test_docker_diff_of_a_written_upper(tmp_path, mounter, options):
    upper, l1, l2 = _written_upper(tmp_path, mounter, options)
    assert detect_userxattr(str(upper)) is bool(options)
    got = diff(str(upper), [str(l1), str(l2)])
    assert got == EXPECTED
    assert all(isinstance(c, Change) for c in got)
    assert str(got[0]) == "C /etc"
    ident = diff(str(upper), [str(l1), str(l2)], ignore_identical=True)
    assert ident == [c for c in EXPECTED if c not in COPIED_UNCHANGED]


def test_no_lowers_everything_is_added(tmp_path):
    build_layer(tmp_path / "u", {"a/b": F(b"x"), "c": WH()})
    assert diff(str(tmp_path / "u"), []) == [("A", "/a"), ("A", "/a/b"), ("D", "/c")]


def test_lower_view_corners(tmp_path):
    """Whiteouts and opaque dirs in the lowers count; symlinks in lowers are not followed;
    xattr whiteouts count only in an opaque=x dir; an opaque dir over nothing is an add."""
    l1, l2, u = tmp_path / "l1", tmp_path / "l2", tmp_path / "u"
    build_layer(
        l2,
        {
            "etc": D(mtime_ns=T0),
            "etc/hosts": F(b"h\n"),
            "hid": D(mtime_ns=T0),
            "hid/x": F(b"x\n"),
            "real": D(mtime_ns=T0),
            "real/r": F(b"r\n"),
            "xw": D(mtime_ns=T0),
            "xw/gone": F(b"g\n"),
            "xw/kept": F(b"k\n"),
        },
    )
    build_layer(
        l1,
        {
            "etc": D(mtime_ns=T0),
            "etc/hosts": WH(),  # lower1 removed /etc/hosts
            "hid": OPQ(mtime_ns=T0),  # lower1 emptied /hid
            "sl": L("real"),  # a symlink to a dir
        },
    )
    build_layer(
        u,
        {
            "etc": D(mtime_ns=T0),
            "etc/hosts": F(b"again\n"),  # not in the lower view: A
            "hid": D(mtime_ns=T0),
            "hid/x": F(b"x\n"),  # /hid/x is whited out below: A
            "sl": D(mtime_ns=T0),
            "sl/r": F(b"r\n"),  # moby would stat through the link
            "newopq": OPQ(mtime_ns=T0),
            "newopq/f": F(b"f\n"),  # opaque, nothing below: A
            "xw": OPQ(value=b"x", mtime_ns=T0),
            "xw/gone": XWH(),  # xattr whiteout: D
            "stray": XWH(),  # not in an opaque=x dir: a file
        },
    )
    got = diff(str(u), [str(l1), str(l2)])
    assert got == [
        ("C", "/etc"),
        ("A", "/etc/hosts"),
        ("C", "/hid"),
        ("A", "/hid/x"),
        ("A", "/newopq"),
        ("A", "/newopq/f"),
        ("C", "/sl"),
        ("A", "/sl/r"),
        ("A", "/stray"),
        ("C", "/xw"),
        ("D", "/xw/gone"),
    ]


def test_a_file_recreated_in_an_opaque_dir_is_never_identical(tmp_path):
    """rm -r /app; mkdir /app; re-create /app/f with the old bytes: moby says C (it
    stats the lower path), but it is a new file, so --ignore-identical keeps it."""
    l1, u = tmp_path / "l1", tmp_path / "u"
    build_layer(l1, {"app": D(mtime_ns=T0), "app/f": F(b"same\n"), "k": F(b"k\n")})
    build_layer(u, {"app": OPQ(mtime_ns=T0), "app/f": F(b"same\n"), "k": F(b"k\n")})
    assert diff(str(u), [str(l1)]) == [("D", "/app"), ("C", "/app/f"), ("C", "/k")]
    assert diff(str(u), [str(l1)], ignore_identical=True) == [("D", "/app"), ("C", "/app/f")]


def test_unchanged_dir_reported_once_for_several_children(tmp_path):
    l1, u = tmp_path / "l1", tmp_path / "u"
    build_layer(l1, {"d": D(mtime_ns=T0), "d/x": F(b"x"), "d/y": F(b"y")})
    build_layer(u, {"d": D(mtime_ns=T0), "d/x": WH(), "d/y": WH(), "d/n": F(b"")})
    assert diff(str(u), [str(l1)]) == [("C", "/d"), ("A", "/d/n"), ("D", "/d/x"), ("D", "/d/y")]


# --- the command line -------------------------------------------------------------------


def _cli(*args, env=None):
    e = mounts.pyoverlay_env()
    e.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "pyoverlay_cli", *map(str, args)],
        cwd=REPO,
        env=e,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    d = tmp_path / "state"
    monkeypatch.setenv("PYOVERLAY_STATE_DIR", str(d))
    return d


@pytest.mark.kernel
def test_cli_lower_json_and_missing_lowers(tmp_path, state_dir):
    upper, l1, l2 = _written_upper(tmp_path, mounts.KernelOverlay)
    r = _cli("diff", "--lower", f"{l1}:{l2}", upper)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"{k} {p}" for k, p in EXPECTED]
    r = _cli("diff", "--json", "--ignore-identical", "--lower", f"{l1}:{l2}", upper)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [{"kind": k, "path": p} for k, p in EXPECTED if (k, p) not in COPIED_UNCHANGED]
    r = _cli("diff", upper)
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.startswith("pyoverlay: ") and len(r.stderr.splitlines()) == 1
    assert "--lower" in r.stderr
    r = _cli("diff", tmp_path / "no-such-thing")
    assert r.returncode != 0 and r.stderr.startswith("pyoverlay: ")
    r = _cli("diff", "--lower", tmp_path / "missing", upper)
    assert r.returncode == 2 and r.stderr.startswith("pyoverlay: ")


def test_cli_lower_splits_like_mount_and_run(tmp_path, state_dir):
    """``--lower L1:L2`` is split as ``mount`` and ``run`` split their layers: a backslash
    is part of a name, ``\\:`` is a colon in one (f323dfb applied the kernel's lowerdir
    escapes: ``we\\ird`` became ``weird``, not a directory)."""
    l1, l2, u = tmp_path / "we\\ird", tmp_path / "c:d", tmp_path / "u"
    build_layer(l2, {"x": F(b"x\n"), "y": F(b"y\n")})
    build_layer(l1, {"z": F(b"z\n")})
    build_layer(u, {"x": WH(), "z": F(b"changed\n"), "n": F(b"")})
    r = _cli("diff", "--lower", f"{l1}:" + str(l2).replace(":", "\\:"), u)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["A /n", "D /x", "C /z"]
    r = _cli("diff", "--lower", f"{l1}::{l2}", u)  # an empty layer: one line, status 2
    assert r.returncode == 2 and r.stderr.startswith("pyoverlay: ") and len(r.stderr.splitlines()) == 1


@pytest.mark.fuse
def test_cli_finds_lowers_of_a_live_mount(tmp_path, state_dir):
    l1, l2 = _lowers(tmp_path)
    upper = tmp_path / "upper"
    upper.mkdir()
    with mounts.PyoverlayMount([l1, l2], tmp_path / "mnt", upper=upper) as m:
        _ops(m.path)
        r = _cli("diff", upper)
        rm = _cli("diff", m.path)  # the mountpoint stands for its upper (never walked)
    for res in (r, rm):
        assert res.returncode == 0, res.stderr
        assert res.stdout.splitlines() == [f"{k} {p}" for k, p in EXPECTED]


def _container_stack(tmp_path: Path) -> dict:
    image, init, upper = tmp_path / "image", tmp_path / "init", tmp_path / "cupper"
    build_layer(image, {"etc": D(mtime_ns=T0), "etc/passwd": F(b"root:x:0:0::/root:/bin/sh\n")})
    build_layer(init, {"etc": D(mtime_ns=T0), "etc/hostname": F(b""), "proc": D(mtime_ns=T0)})
    build_layer(upper, {"etc": D(mtime_ns=T0), "etc/hostname": F(b"box\n"), "etc/new": F(b"n\n")})
    return {
        "id": "4f1e2d3c" + "0" * 56,
        "name": "web",
        "layers": [str(image)],
        "upper": str(upper),
        "init_layer": str(init),
        "created": 1.0,
        "status": "exited",
    }


def test_cli_container_id(tmp_path, state_dir):
    from runner import state as rstate

    rec = _container_stack(tmp_path)
    rstate.save(rec)
    # the init layer is the top lower (docker's <id>-init): /etc/hostname is a change, not an add
    want = ["C /etc", "C /etc/hostname", "A /etc/new"]
    for ref in ("web", rec["id"], "4f1e"):
        r = _cli("diff", ref)
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines() == want
    r = _cli("diff", rec["upper"])  # the directory: its lowers come from the container record
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == want
    r = _cli("diff", "nope")
    assert r.returncode == 1 and r.stderr.strip() == "pyoverlay: nope: no such directory or container"
