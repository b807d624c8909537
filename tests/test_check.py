"""``pyoverlay check``: an fsck for an upper layer and its workdir (overlayfs_py/check.py).

Each broken state is built on purpose with real xattrs (``trusted.*`` as root, and a
``userxattr`` upper with ``user.overlay.*``), the report is checked, the repair is run,
the upper then checks clean, and the kernel overlay (the oracle) mounts the repaired
layers: for the problems the kernel ignores, it shows exactly what it showed before the
repair; for the ones it fails on (EINVAL, ESTALE), it no longer fails. Uppers written
through the kernel and through pyoverlay in normal use check clean. The command line:
exit statuses (fsck's), --json, the refusal while mounted, and symlinks never followed.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import mounts
from helpers.snapshot import diff_snapshots, format_diff, snapshot
from helpers.stacks import OPQ, WH, D, F, L, build_layer
from overlayfs_py import _sys
from overlayfs_py.check import check, redirect_problem
from overlayfs_py.whiteout import encode_origin

REPO = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.needs_root]

# what a repair may change without changing what the mount shows: times, inode numbers
# (a new whiteout); the override records (user.* xattrs the kernel shows as they are) are
# left out of the snapshots
VIEW_IGNORE = ("ctime_ns", "mtime_ns", "ino", "d_ino", "blocks")


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch):
    d = tmp_path / "state"
    monkeypatch.setenv("PYOVERLAY_STATE_DIR", str(d))
    return d


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "pyoverlay_cli", "check", *map(str, args)],
        cwd=REPO,
        env=mounts.pyoverlay_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _origin(path: Path) -> bytes:
    """The kernel's origin record of *path* (as ovl_encode_real_fh writes it)."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW)
    try:
        fh = _sys.name_to_handle(fd)
        assert fh is not None
        return encode_origin(fh[0], fh[1], _sys.fs_uuid(fd))
    finally:
        os.close(fd)


def _kinds(report) -> set[tuple[str, str]]:
    return {(p.kind, p.path) for p in report.problems}


def _view(lowers, upper, work, mnt, options=()):
    with mounts.KernelOverlay(lowers, mnt, upper=upper, workdir=work, options=options) as m:
        return snapshot(m.path, ignore_xattr_prefixes=("security.", "user.containers."))


def _same_view(a, b):
    # d_ino: the first kernel mount marks a directory impure, which changes the d_ino the
    # next one lists (not the repair's doing)
    a, b = {**a, "problems": []}, {**b, "problems": []}
    d = diff_snapshots(a, b, a_name="before", b_name="after", ignore_keys=VIEW_IGNORE)
    assert not d, format_diff(d, "the repair changed what the kernel shows")


# --- the pure rules ------------------------------------------------------------------------


def test_redirect_values_the_kernel_rejects():
    for ok in (b"a", b"/a", b"/a/b", b"a b", b"/" + b"x" * 255, b"a\0junk"):
        assert redirect_problem(ok) is None, ok
    for bad in (b"", b"a/b", b"/", b"//a", b"/a//b", b"/a/", b"..", b"/a/./b", b"/a/../b", b"x" * 256, b"\0a"):
        assert redirect_problem(bad) is not None, bad


# --- problems the kernel ignores: repaired, and the view stays the same ---------------------


def _harmless(tmp_path: Path, ns: str = "trusted"):
    l1, l2, up, wk = (tmp_path / n for n in ("l1", "l2", "up", "wk"))
    build_layer(l2, {"etc/hosts": F(b"h\n"), "e/y": F(b"y\n"), "d/x": F(b"x\n"), "gone-later": F(b"g\n")})
    build_layer(l1, {"etc/motd": F(b"m\n"), "opq/a": F(b"a\n")})
    p = f"{ns}.overlay."
    build_layer(
        up,
        {
            "etc": D(xattrs={p + "opaque": b"n"}),  # a bad opaque value: ignored, etc merges
            "etc/hosts": WH(),  # a real whiteout: fine
            "etc/nothere": WH(),  # an orphan whiteout in a merged dir
            "nothere": WH(),  # an orphan whiteout in the merged root
            "e": D(xattrs={p + "redirect": b"nosuch"}),  # dangling: e shows alone
            "f1": F(b"f", xattrs={p + "opaque": b"y"}),  # opaque on a file
            "w": F(b"not empty", xattrs={p + "whiteout": b""}),  # a whiteout xattr on a non-empty file
            "rf": F(b"r", xattrs={p + "redirect": b"etc"}),  # a redirect on a file
            "om": F(b"o", xattrs={p + "origin": b"garbage"}),
            "ov": F(b"v", xattrs={"user.containers.override_stat": b"nonsense"}),
            "ok": F(b"k", xattrs={"user.containers.override_stat": b"0:0:0644"}),
        },
    )
    (up / "od").write_bytes(b"d")
    os.setxattr(up / "od", p + "origin", _origin(l2 / "gone-later"))
    os.unlink(l2 / "gone-later")  # its handle now decodes to nothing (ESTALE)
    (up / "ow").write_bytes(b"w")
    os.setxattr(up / "ow", p + "origin", _origin(l2 / "d"))  # a file whose origin is a directory
    os.setxattr(up, "user.containers.override_stat", b"0:0")  # the root's, unparsable
    wk.mkdir()
    expected = {
        ("opaque-bad", "/etc"),
        ("whiteout-orphan", "/etc/nothere"),
        ("whiteout-orphan", "/nothere"),
        ("redirect-dangling", "/e"),
        ("opaque-bad", "/f1"),
        ("whiteout-xattr-bad", "/w"),
        ("redirect-ignored", "/rf"),
        ("origin-malformed", "/om"),
        ("override-bad", "/ov"),
        ("override-bad", "/"),
        ("origin-dangling", "/od"),
        ("origin-wrong-type", "/ow"),
    }
    return [l1, l2], up, wk, expected


@pytest.mark.kernel
def test_harmless_problems_are_repaired_and_the_kernel_shows_the_same(tmp_path):
    lowers, up, wk, expected = _harmless(tmp_path)
    before = _view(lowers, up, wk, tmp_path / "m1")
    assert sorted(os.listdir(tmp_path / "m1")) == []  # unmounted
    assert "e/y" not in before["entries"] and "e" in before["entries"]  # the dangling redirect hides y
    report = check(str(up), str(wk), [str(x) for x in lowers], userxattr=False)
    assert _kinds(report) == expected
    assert report.exit_status() == 4 and not any(p.repaired for p in report.problems)

    r = _cli("--workdir", wk, "--lower", ":".join(map(str, lowers)), "--repair", up)
    assert r.returncode == 1, r.stdout + r.stderr
    assert len(r.stdout.splitlines()) == len(expected) + 1
    assert all("[repaired: " in line for line in r.stdout.splitlines()[:-1]), r.stdout
    assert r.stdout.splitlines()[-1] == f"{up}: {len(expected)} problem(s), {len(expected)} repaired, 0 left"

    r = _cli("--workdir", wk, "--lower", ":".join(map(str, lowers)), up)
    assert (r.returncode, r.stdout) == (0, f"{up}: clean\n"), r.stdout + r.stderr
    assert not (up / "nothere").exists() and not (up / "etc/nothere").exists()
    assert (up / "etc/hosts").exists()  # the real whiteout stays
    assert os.getxattr(up / "e", "trusted.overlay.opaque") == b"y"  # lower e would merge in: opaque
    assert os.getxattr(up, "user.containers.override_stat") == b"%d:%d:0755" % (os.getuid(), os.getgid())
    assert os.getxattr(up / "ok", "user.containers.override_stat") == b"0:0:0644"  # a good one stays
    after = _view(lowers, up, wk, tmp_path / "m2")
    _same_view(before, after)


@pytest.mark.kernel
@pytest.mark.fuse
def test_pyoverlay_shows_a_repaired_upper_as_the_kernel_does(tmp_path):
    lowers, up, wk, _expected = _harmless(tmp_path)
    assert check(str(up), str(wk), [str(x) for x in lowers], userxattr=False, repair=True).exit_status() == 1
    kernel = _view(lowers, up, wk, tmp_path / "m1")
    with mounts.PyoverlayMount(lowers, tmp_path / "m2", upper=up, workdir=wk) as m:
        ours = snapshot(m.path, ignore_xattr_prefixes=("security.", "user.containers."))
    ignore = (*VIEW_IGNORE, "dot_d_ino", "dotdot_d_ino")
    d = diff_snapshots({**kernel, "problems": []}, {**ours, "problems": []}, a_name="kernel", ignore_keys=ignore)
    assert not d, format_diff(d, "pyoverlay shows the repaired upper otherwise")


@pytest.mark.kernel
def test_userxattr_upper_is_checked_in_its_namespace(tmp_path):
    """An upper written with ``-o userxattr`` (recorded in the workdir): user.overlay.* are
    its private xattrs; trusted.overlay.* there are only noted."""
    lowers, up, wk, expected = _harmless(tmp_path, ns="user")
    (wk / "pyoverlay.json").write_text('{"userxattr": true}\n')
    os.setxattr(up / "ok", "trusted.overlay.opaque", b"y")  # private to no mount of this upper
    before = _view(lowers, up, wk, tmp_path / "m1", options=("userxattr",))
    # with userxattr the kernel follows no redirect at all (no redirect_dir): EPERM
    assert before["entries"].pop("e")["type"] == "error:EPERM"
    r = _cli("--workdir", wk, "--lower", ":".join(map(str, lowers)), "--json", up)
    assert r.returncode == 4, r.stderr
    got = json.loads(r.stdout)
    assert got["userxattr"] is True and got["status"] == 4
    assert {(p["kind"], p["path"]) for p in got["problems"]} == expected
    assert any("trusted.overlay.opaque" in n for n in got["notes"])
    r = _cli("--workdir", wk, "--lower", ":".join(map(str, lowers)), "--repair", "--json", up)
    assert r.returncode == 1, r.stderr
    got = json.loads(r.stdout)
    assert all(p["repaired"] for p in got["problems"]) and got["left"] == []
    assert _cli("--workdir", wk, "--lower", ":".join(map(str, lowers)), up).returncode == 0
    assert os.getxattr(up / "e", "user.overlay.opaque") == b"y"
    after = _view(lowers, up, wk, tmp_path / "m2", options=("userxattr",))
    assert after["entries"].pop("e")["type"] == "dir"  # opaque now: readable, and alone as before
    assert "e/y" not in after["entries"]
    _same_view(before, after)
    # the record and the option disagree: one line, fsck's operational error
    r = _cli("--workdir", wk, "--lower", ":".join(map(str, lowers)), "--nouserxattr", up)
    assert r.returncode == 8 and r.stderr.startswith("pyoverlay: ") and len(r.stderr.splitlines()) == 1


def _cli_in_userns(*args):
    """The check run as root of a new user namespace (``unshare -Ur``): no CAP_SYS_ADMIN in
    the initial one, as podman's rootless mount program; the layers stay readable (root's
    uid is mapped onto itself)."""
    return subprocess.run(
        ["unshare", "--user", "--map-root-user", sys.executable, "-m", "pyoverlay_cli", "check", *map(str, args)],
        cwd=REPO,
        env=mounts.pyoverlay_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_without_privilege_a_userxattr_upper_is_checked_and_a_trusted_one_refused(tmp_path):
    lowers, up, wk, expected = _harmless(tmp_path, ns="user")
    spec = ":".join(map(str, lowers))
    r = _cli_in_userns("--workdir", wk, "--lower", spec, "--repair", "--json", up)
    assert r.returncode == 1, r.stdout + r.stderr
    got = json.loads(r.stdout)
    assert got["userxattr"] is True  # no record, no private xattr found first: the mount's choice
    # decoding a file handle needs CAP_DAC_READ_SEARCH in the initial namespace: not judged
    want = expected - {("origin-dangling", "/od"), ("origin-wrong-type", "/ow")}
    assert {(p["kind"], p["path"]) for p in got["problems"]} == want
    assert any("origins not decoded" in n for n in got["notes"])
    assert os.getxattr(up / "e", "user.overlay.opaque") == b"y"
    trusted = tmp_path / "t"
    t_lowers, t_up, t_wk, _ = _harmless(trusted)
    # recorded as a mount records it (without a record neither the mount nor the check could
    # see trusted.* there, and both would take the upper for a fresh userxattr one)
    (t_wk / "pyoverlay.json").write_text('{"userxattr": false}\n')
    r = _cli_in_userns("--workdir", t_wk, "--lower", ":".join(map(str, t_lowers)), t_up)
    assert r.returncode == 8 and r.stderr.startswith("pyoverlay: ") and len(r.stderr.splitlines()) == 1
    assert "run the check as root" in r.stderr, r.stderr


# --- problems the kernel fails on: repaired, and then it reads the tree ----------------------


@pytest.mark.kernel
def test_broken_redirects_fail_in_the_kernel_until_repaired(tmp_path):
    l1, up, wk = tmp_path / "l1", tmp_path / "up", tmp_path / "wk"
    build_layer(l1, {"d/x": F(b"x\n"), "s/t/u": F(b"u\n"), "k/v": F(b"v\n")})
    build_layer(
        up,
        {
            "r1": D(xattrs={"trusted.overlay.redirect": b"a/b"}),  # malformed: EINVAL
            "k": D(xattrs={"trusted.overlay.redirect": b"/../k"}),  # malformed; lower k would merge
            "r3": D(xattrs={"trusted.overlay.redirect": b"d"}),  # renamed from d, d not covered
            "s": D(),
            "s/w": D(xattrs={"trusted.overlay.redirect": b"/s/t"}),  # absolute, /s/t not covered
        },
    )
    wk.mkdir()
    with mounts.KernelOverlay([l1], tmp_path / "m1", upper=up, workdir=wk) as m:
        for name, err in (("r1", errno.EINVAL), ("k", errno.EACCES)):  # (the '..' component)
            with pytest.raises(OSError) as e:
                os.lstat(m.path / name)
            assert e.value.errno == err, name
        sorted(os.listdir(m.path / "d"))  # the lower d, cached as d ...
        with pytest.raises(OSError) as e:  # ... so r3 (the same lower dir) is stale
            os.listdir(m.path / "r3")
        assert e.value.errno == errno.ESTALE
    report = check(str(up), str(wk), [str(l1)], userxattr=False)
    assert _kinds(report) == {
        ("redirect-malformed", "/r1"),
        ("redirect-malformed", "/k"),
        ("redirect-uncovered", "/r3"),
        ("redirect-uncovered", "/s/w"),
    }
    report = check(str(up), str(wk), [str(l1)], userxattr=False, repair=True)
    assert report.exit_status() == 1 and report.left == []
    assert all(p.repaired for p in report.problems)
    assert check(str(up), str(wk), [str(l1)], userxattr=False).exit_status() == 0
    with mounts.KernelOverlay([l1], tmp_path / "m2", upper=up, workdir=wk) as m:
        assert sorted(os.listdir(m.path)) == ["k", "r1", "r3", "s"]  # d is whited out now
        assert os.listdir(m.path / "r1") == [] and os.listdir(m.path / "k") == []  # opaque: no lower k/v
        assert os.listdir(m.path / "r3") == ["x"]
        assert os.listdir(m.path / "s") == ["w"] and os.listdir(m.path / "s/w") == ["u"]
    assert os.getxattr(up / "k", "trusted.overlay.opaque") == b"y"
    assert "trusted.overlay.opaque" not in os.listxattr(up / "r1")  # no lower r1 to hide


@pytest.mark.kernel
def test_duplicate_redirects_are_reported_and_left(tmp_path):
    l1, up, wk = tmp_path / "l1", tmp_path / "up", tmp_path / "wk"
    build_layer(l1, {"d/x": F(b"x\n"), "m/y": F(b"y\n")})
    build_layer(
        up,
        {
            "d": WH(),
            "a": D(xattrs={"trusted.overlay.redirect": b"d"}),
            "b": D(xattrs={"trusted.overlay.redirect": b"d"}),  # the same lower directory
            "m": D(),  # merges with lower m ...
            "n": D(xattrs={"trusted.overlay.redirect": b"m"}),  # ... which n reaches as well
        },
    )
    wk.mkdir()
    r = _cli("--workdir", wk, "--lower", l1, "--repair", up)
    assert r.returncode == 4, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("redirect-duplicate /b: /a is redirected to the same lower directory too")
    assert lines[1].startswith("redirect-duplicate /n: /m in the upper merges with the same lower directory")
    assert all(line.endswith("[cannot be repaired safely]") for line in lines[:2])
    assert lines[-1] == f"{up}: 2 problem(s), 0 repaired, 2 left"
    assert os.getxattr(up / "b", "trusted.overlay.redirect") == b"d"  # untouched


def test_an_origin_on_a_directory_stays_while_it_holds_whiteouts(tmp_path):
    """The kernel hides the whiteouts of a directory of the upper alone only if it has an
    origin: such an origin is left; once the orphan whiteouts in another directory are
    removed (the first round), its bad origin goes too (a later round)."""
    l1, up, wk = tmp_path / "l1", tmp_path / "up", tmp_path / "wk"
    build_layer(l1, {"keep/x": F(b"x\n")})
    build_layer(
        up,
        {
            "keep": D(xattrs={"trusted.overlay.origin": b"garbage"}),
            "keep/x": WH(),
            "drop": D(xattrs={"trusted.overlay.origin": b"garbage"}),
            "drop/nothere": WH(),
        },
    )
    wk.mkdir()
    report = check(str(up), str(wk), [str(l1)], userxattr=False, repair=True)
    assert [(p.kind, p.path, p.repaired) for p in report.problems] == [
        ("origin-malformed", "/drop", True),  # kept in the first round (a whiteout), removed in the second
        ("origin-malformed", "/keep", False),
        ("whiteout-orphan", "/drop/nothere", True),
    ]
    assert "kept while the directory holds whiteouts" in report.problems[1].detail
    assert [(p.kind, p.path) for p in report.left] == [("origin-malformed", "/keep")]
    assert report.exit_status() == 4
    assert os.getxattr(up / "keep", "trusted.overlay.origin") == b"garbage"
    assert "trusted.overlay.origin" not in os.listxattr(up / "drop")


def test_a_tree_deeper_than_path_max(tmp_path):
    """Every upper directory is opened relative to its parent: a tree whose paths pass
    PATH_MAX is walked; a whiteout at the bottom over a lower file is never called an
    orphan (and never removed), and an orphan near the top still is."""
    l1, up, wk = tmp_path / "l1", tmp_path / "up", tmp_path / "wk"
    deep = "/".join(["d" * 200] * 25)  # about 5 KB
    build_layer(l1, {f"{deep}/f": F(b"f\n")})
    build_layer(up, {f"{deep}/f": WH(), f"{deep}/nothere": F(b"", xattrs={"trusted.overlay.opaque": b"y"}), "o": WH()})
    wk.mkdir()
    report = check(str(up), str(wk), [str(l1)], userxattr=False, repair=True)
    assert ("whiteout-orphan", "/o") in _kinds(report)
    assert ("opaque-bad", "/" + deep + "/nothere") in _kinds(report)
    assert not any(p.path.endswith("/f") for p in report.problems)
    assert report.left == [] and report.exit_status() == 1
    fd = os.open(up, os.O_PATH)
    for part in deep.split("/"):
        fd2 = os.open(part, os.O_PATH, dir_fd=fd)
        os.close(fd)
        fd = fd2
    try:
        assert os.stat("f", dir_fd=fd, follow_symlinks=False).st_rdev == 0  # the whiteout is still there
    finally:
        os.close(fd)


# --- the workdir ----------------------------------------------------------------------------


@pytest.mark.kernel
def test_workdir_leftovers_are_removed_without_following_symlinks(tmp_path):
    l1, up, wk, outside = (tmp_path / n for n in ("l1", "up", "wk", "outside"))
    build_layer(l1, {"a": F(b"a\n")})
    build_layer(outside, {"keep": F(b"keep\n"), "zz": WH()})
    build_layer(
        up,
        {"a": F(b"changed\n"), "ln": L(str(outside))},  # a symlink in the upper is data
    )
    build_layer(
        wk,
        {
            "work/#1": F(b"half a copy-up"),
            "work/#2/deep/er": F(b"x"),
            "work/#3": WH(),  # the kernel's shared whiteout (whiteouts link to it): fine
            "work/evil": L(str(outside)),  # removed as a symlink, never followed
            "index/00fb1d": F(b"no upper file links it"),
            "index/00fb1e": WH(),
            "index/#4": F(b"half an indexed copy-up"),  # index=on: index/ is also the work dir
            "index/#5/deep": F(b"x"),
            "index/#6": WH(),  # the kernel's shared whiteout there: fine
        },
    )
    os.link(up / "a", wk / "index/00fbaa")  # an index entry still linked from the upper: fine
    (wk / "pyoverlay.json").write_text("{not json")
    report = check(str(up), str(wk), [str(l1)], userxattr=False)
    assert _kinds(report) == {
        ("work-orphan", "work/#1"),
        ("work-orphan", "work/#2"),
        ("work-orphan", "work/evil"),
        ("index-orphan", "index/00fb1d"),
        ("index-orphan", "index/00fb1e"),
        ("work-orphan", "index/#4"),
        ("work-orphan", "index/#5"),
        ("record-bad", "pyoverlay.json"),
    }
    r = _cli("--workdir", wk, "--lower", l1, "--repair", up)
    assert r.returncode == 1, r.stdout + r.stderr
    assert os.listdir(wk / "work") == ["#3"] and sorted(os.listdir(wk / "index")) == ["#6", "00fbaa"]
    assert not (wk / "pyoverlay.json").exists()
    assert sorted(os.listdir(outside)) == ["keep", "zz"]  # nothing outside touched
    assert _cli("--workdir", wk, "--lower", l1, up).returncode == 0
    with mounts.KernelOverlay([l1], tmp_path / "m", upper=up, workdir=wk) as m:
        assert (m.path / "a").read_bytes() == b"changed\n"


def test_volatile_marker_is_reported_and_left(tmp_path):
    l1, up, wk = tmp_path / "l1", tmp_path / "up", tmp_path / "wk"
    build_layer(l1, {"a": F(b"a\n")})
    build_layer(up, {"b": F(b"b\n")})
    build_layer(wk, {"work/incompat/volatile/dirty": F(b"")})
    r = _cli("--workdir", wk, "--lower", l1, "--repair", up)
    assert r.returncode == 4, r.stdout + r.stderr
    assert r.stdout.splitlines()[0].startswith("volatile work/incompat: a volatile mount's marker")
    assert (wk / "work/incompat/volatile/dirty").exists()


def test_symlinked_layers_are_refused_and_nothing_is_followed(tmp_path):
    l1, up, wk = tmp_path / "l1", tmp_path / "up", tmp_path / "wk"
    build_layer(l1, {"a": F(b"a\n")})
    build_layer(up, {"b": F(b"b\n")})
    wk.mkdir()
    os.symlink(up, tmp_path / "uplink")
    r = _cli("--workdir", wk, "--lower", l1, tmp_path / "uplink")
    assert r.returncode == 8 and r.stderr.startswith("pyoverlay: ") and len(r.stderr.splitlines()) == 1
    assert "symlink" in r.stderr
    os.symlink(l1, tmp_path / "lowlink")
    r = _cli("--workdir", wk, "--lower", tmp_path / "lowlink", up)
    assert r.returncode == 8 and "lower layer" in r.stderr and "symlink" in r.stderr, r.stderr
    os.symlink(tmp_path / "elsewhere", wk / "work")  # work/ a symlink: refused, not followed
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere/victim").write_bytes(b"v")
    r = _cli("--workdir", wk, "--lower", l1, "--repair", up)
    assert r.returncode == 8 and r.stderr.startswith("pyoverlay: "), r.stdout + r.stderr
    assert (tmp_path / "elsewhere/victim").exists()


# --- uppers written in normal use check clean ----------------------------------------------


def _use(m: Path) -> None:
    (m / "etc/motd").write_bytes(b"changed\n")  # copy-up (origin)
    os.unlink(m / "etc/hosts")  # whiteout
    # directory renames: a redirect and a whiteout where the kernel has redirect_dir, else
    # EXDEV, and mv copies (as pyoverlay asks, and the kernel with userxattr)
    shutil.move(m / "usr/lib", m / "usr/lib2")
    shutil.move(m / "usr/share", m / "srv/share")
    for name in os.listdir(m / "var"):
        os.unlink(m / "var" / name)
    os.rmdir(m / "var")
    os.mkdir(m / "var")  # opaque
    (m / "var/new").write_bytes(b"n\n")
    os.makedirs(m / "opt/a/b")
    os.link(m / "etc/motd", m / "opt/motd-link")


MOUNTERS = [
    pytest.param(mounts.KernelOverlay, (), marks=pytest.mark.kernel, id="kernel"),
    pytest.param(mounts.KernelOverlay, ("userxattr",), marks=pytest.mark.kernel, id="kernel-userxattr"),
    pytest.param(mounts.PyoverlayMount, (), marks=pytest.mark.fuse, id="pyoverlay"),
]


@pytest.mark.parametrize("mounter,options", MOUNTERS)
def test_an_upper_written_in_normal_use_checks_clean(tmp_path, mounter, options):
    l1, l2, up, wk = (tmp_path / n for n in ("l1", "l2", "up", "wk"))
    build_layer(l2, {"etc/hosts": F(b"h\n"), "usr/lib/x": F(b"x\n"), "var/log": F(b"l\n"), "srv": D()})
    build_layer(l1, {"etc/motd": F(b"m\n"), "usr/share/doc": F(b"d\n"), "var/run": F(b"r\n")})
    up.mkdir()
    wk.mkdir()
    with mounter([l1, l2], tmp_path / "mnt", upper=up, workdir=wk, options=options) as m:
        _use(m.path)
    r = _cli("--workdir", wk, "--lower", l1, "--lower", l2, up)
    assert (r.returncode, r.stdout) == (0, f"{up}: clean\n"), r.stdout + r.stderr


# --- refusing while mounted; the command line -----------------------------------------------


@pytest.mark.kernel
def test_refuses_while_the_kernel_has_it_mounted(tmp_path):
    l1, up, wk = tmp_path / "l1", tmp_path / "up", tmp_path / "wk"
    build_layer(l1, {"a": F(b"a\n")})
    build_layer(up, {"nothere": WH()})
    wk.mkdir()
    with mounts.KernelOverlay([l1], tmp_path / "m", upper=up, workdir=wk):
        r = _cli("--workdir", wk, "--lower", l1, "--repair", up)
        assert r.returncode == 8 and r.stderr.startswith("pyoverlay: ") and len(r.stderr.splitlines()) == 1
        assert "kernel overlay at " + str(tmp_path / "m") in r.stderr
        assert (up / "nothere").exists()
        r = _cli("--workdir", wk, "--lower", l1, "--force", up)
        assert r.returncode == 4 and "whiteout-orphan /nothere" in r.stdout


@pytest.mark.fuse
def test_refuses_while_pyoverlay_has_it_mounted(tmp_path):
    l1, up, wk = tmp_path / "l1", tmp_path / "up", tmp_path / "wk"
    build_layer(l1, {"a": F(b"a\n")})
    up.mkdir()
    wk.mkdir()
    with mounts.PyoverlayMount([l1], tmp_path / "m", upper=up, workdir=wk):
        r = _cli("--workdir", wk, "--lower", l1, up)
        assert r.returncode == 8 and "pyoverlay mount at " + str(tmp_path / "m") in r.stderr, r.stderr


def test_cli_usage_and_unknown_lowers(tmp_path):
    l1, up, wk = tmp_path / "l1", tmp_path / "up", tmp_path / "wk"
    build_layer(l1, {"a": F(b"a\n")})
    build_layer(up, {"nothere": WH(), "o": OPQ(value=b"bad")})
    wk.mkdir()
    r = _cli(up)  # no --workdir
    assert r.returncode == 16 and r.stderr.startswith("pyoverlay: ") and len(r.stderr.splitlines()) == 1
    r = _cli("--workdir", wk, "--lower", tmp_path / "missing", up)
    assert r.returncode == 16 and r.stderr.startswith("pyoverlay: ") and len(r.stderr.splitlines()) == 1
    r = _cli("--workdir", wk, tmp_path / "no-such-upper")
    assert r.returncode == 8 and r.stderr.startswith("pyoverlay: ") and len(r.stderr.splitlines()) == 1
    # a name that is not UTF-8 is printed as the bytes it is, in text and in JSON
    os.mknod(os.path.join(os.fsencode(up), b"caf\xe9"), 0o020000, 0)
    r = subprocess.run(
        [sys.executable, "-m", "pyoverlay_cli", "check", "--workdir", str(wk), "--lower", str(l1), str(up)],
        cwd=REPO,
        env=mounts.pyoverlay_env(),
        capture_output=True,
        timeout=120,
    )
    assert r.returncode == 4 and b"whiteout-orphan /caf\xe9: " in r.stdout, r.stdout + r.stderr
    r = _cli("--workdir", wk, "--lower", l1, "--json", up)
    assert r.returncode == 4 and "/caf\udce9" in {p["path"] for p in json.loads(r.stdout)["problems"]}
    os.unlink(os.path.join(os.fsencode(up), b"caf\xe9"))
    # without lowers (none given, no container uses it): what needs them is not judged
    r = _cli("--workdir", wk, up)
    assert r.returncode == 4, r.stdout + r.stderr
    assert r.stdout.splitlines()[0].startswith("opaque-bad /o: ")
    assert "whiteout-orphan" not in r.stdout and "lower layers not known" in r.stderr
