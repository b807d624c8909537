"""metacopy=on: chmod, chown, utimes, xattrs, renames and links of a lower regular file copy
up its metadata only (``overlay.metacopy``, the data still read from the lower file), and
the first open for writing or truncation copies the data, compared with the kernel overlay
mounted with the same option (docs/semantics.md, "metacopy"): results, merged view (sizes,
st_blocks from the data file, contents) and upper (the sparse metacopy files, their
xattrs: metacopy, origin, redirect); each side's upper remounted by the other, with
metacopy=on and off (EPERM, entries dropped from listings, as the kernel); a lower stack
holding a metacopy middle layer the kernel made; a SIGKILL during a data copy-up.

Both engines: run with PYOVERLAY_ENGINE=direct and =pyfuse3.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from helpers.snapshot import diff_snapshots, format_diff
from helpers.stacks import T0, T1, T2, WH, D, F, H
from helpers.writeops import run_pair
from overlayfs_py import features
from overlayfs_py.config import ConfigError, build_config, parse_options

MC = "trusted.overlay.metacopy"
RX = "trusted.overlay.redirect"
ORIGIN = "trusted.overlay.origin"
BIG = 3 << 20  # past copyup.THREAD_THRESHOLD: the data copy-up runs in a worker thread


def _big():
    return bytes(range(256)) * (BIG // 256)


def _layers():
    l1 = {
        "q": D(mtime_ns=T0),
        "m/top": F(b"top of a merged dir\n", mtime_ns=T1),
    }
    l2 = {
        "chmod": F(b"chmod me\n" * 100, mtime_ns=T1),
        "chown": F(b"chown me\n", mtime_ns=T1),
        "utime": F(b"utime me\n", mtime_ns=T1),
        "sx": F(b"setxattr\n", mtime_ns=T1),
        "rx": F(b"removexattr\n", mtime_ns=T1, xattrs={"user.k": b"v", "user.j": b"w"}),
        "mv": F(b"renamed in its dir\n", mtime_ns=T1),
        "d/mvd": F(b"renamed to another dir\n", mtime_ns=T1),
        "d/mc2": F(b"chmod, then renamed\n", mtime_ns=T1),
        "ln": F(b"linked\n", mtime_ns=T1),
        "wr": F(b"written after chmod\n", mtime_ns=T1),
        "tr": F(b"truncated after chown\n", mtime_ns=T1),
        "otr": F(b"opened O_TRUNC after chmod\n", mtime_ns=T1),
        "rd": F(b"open for reading across the data copy-up\n", mtime_ns=T1),
        "big": F(_big(), mtime_ns=T2),
        "m/f": F(b"in a merged dir\n", mtime_ns=T1),
        "empty": F(b"", mtime_ns=T1),
        "sgid": F(b"set-id bits kept\n", mode=0o2755, mtime_ns=T1),
        "hl": F(b"hard-linked in the lower\n", mtime_ns=T1),
        "hl2": H("hl"),
    }
    return [l1, l2]


def _read(p):
    with open(p, "rb") as f:
        return f.read()


def _append(p, data):
    with open(p, "ab") as f:
        f.write(data)


def _blocks(p):
    st = os.lstat(p)
    return st.st_size, st.st_blocks


def _read_across(m):
    """A file open for reading while its data is copied up by a write through another fd:
    the reader sees the new data (the kernel's page cache is the upper's by then)."""
    r = os.open(m / "rd", os.O_RDONLY)
    try:
        first = os.pread(r, 8, 0)
        _append(m / "rd", b"appended\n")
        return first, os.pread(r, 100, 0)
    finally:
        os.close(r)


def _open_trunc(p):
    fd = os.open(p, os.O_WRONLY | os.O_TRUNC)
    os.close(fd)


def _ops(m, rec):
    rec.do("chmod", os.chmod, m / "chmod", 0o600)
    rec.do("stat chmod", _blocks, m / "chmod")
    rec.do("read chmod", _read, m / "chmod")
    rec.do("chown", os.chown, m / "chown", 1234, 5678)
    rec.do("utime", os.utime, m / "utime", ns=(T0, T0))
    rec.do("setxattr", os.setxattr, m / "sx", "user.new", b"x")
    rec.do("removexattr", os.removexattr, m / "rx", "user.k")
    rec.do("listxattr rx", lambda: sorted(os.listxattr(m / "rx")))
    rec.do("rename same dir", os.rename, m / "mv", m / "mv2")
    rec.do("read mv2", _read, m / "mv2")
    rec.do("stat mv", os.lstat, m / "mv")
    rec.do("rename other dir", os.rename, m / "d/mvd", m / "q/mvd2")
    rec.do("read q/mvd2", _read, m / "q/mvd2")
    rec.do("chmod mc2", os.chmod, m / "d/mc2", 0o640)
    rec.do("rename mc2", os.rename, m / "d/mc2", m / "q/mc3")
    rec.do("rename mc3 again", os.rename, m / "q/mc3", m / "q/mc4")
    rec.do("read q/mc4", _read, m / "q/mc4")
    rec.do("link", os.link, m / "ln", m / "q/ln2")
    rec.do("read q/ln2", _read, m / "q/ln2")
    rec.do("stat ln nlink", lambda: os.lstat(m / "ln").st_nlink)
    rec.do("chmod wr", os.chmod, m / "wr", 0o604)
    rec.do("write wr", _append, m / "wr", b"more\n")
    rec.do("read wr", _read, m / "wr")
    rec.do("chown tr", os.chown, m / "tr", 42, 42)
    rec.do("truncate tr", os.truncate, m / "tr", 5)
    rec.do("read tr", _read, m / "tr")
    rec.do("chmod otr", os.chmod, m / "otr", 0o600)
    rec.do("open otr O_TRUNC", _open_trunc, m / "otr")
    rec.do("stat otr", _blocks, m / "otr")
    rec.do("chmod rd", os.chmod, m / "rd", 0o600)
    rec.do("read across the data copy-up", _read_across, m)
    rec.do("chmod big", os.chmod, m / "big", 0o600)
    rec.do("stat big", _blocks, m / "big")
    rec.do("read big", lambda: _read(m / "big") == _big())
    rec.do("append big", _append, m / "big", b"tail\n")
    rec.do("read big after", lambda: _read(m / "big") == _big() + b"tail\n")
    rec.do("chmod m/f", os.chmod, m / "m/f", 0o600)
    rec.do("chmod empty", os.chmod, m / "empty", 0o600)
    rec.do("chown sgid", os.chown, m / "sgid", 7, 7)
    rec.do("chmod sgid", os.chmod, m / "sgid", 0o2750)
    rec.do("write sgid", _append, m / "sgid", b"x\n")
    rec.do("stat sgid", lambda: oct(os.lstat(m / "sgid").st_mode))
    rec.do("chmod hl", os.chmod, m / "hl", 0o600)  # breaks the lower link (no index): no origin
    rec.do("read hl", _read, m / "hl")
    rec.do("hl and hl2 differ now", lambda: os.lstat(m / "hl").st_ino != os.lstat(m / "hl2").st_ino)
    rec.do("write hl2", _append, m / "hl2", b"+\n")
    rec.do("read hl after", _read, m / "hl")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return run_pair(tmp_path_factory.mktemp("metacopy"), _layers(), _ops, remount=True, options=["metacopy=on"])


def _x(run, p, name):
    return (run.kupper(p) or {}).get("xattrs", {}).get(name)


def test_results_match_the_kernel(run):
    run.assert_results()


def test_metadata_only_copy_ups(run):
    """The kernel's upper: sparse files of the lower size with an empty overlay.metacopy
    (and an origin), redirects on renamed ones; written or truncated ones lost it."""
    for p in ("chmod", "chown", "utime", "sx", "rx", "mv2", "q/mvd2", "q/mc4", "ln", "m/f", "empty", "hl"):
        assert _x(run, p, MC) == b"", p
    assert _x(run, "hl", ORIGIN) is None
    assert _x(run, "chmod", ORIGIN) is not None
    assert _x(run, "mv2", RX) == b"mv" and _x(run, "q/mvd2", RX) == b"/d/mvd" and _x(run, "q/mc4", RX) == b"/d/mc2"
    assert _x(run, "ln", RX) == b"/ln"
    for p in ("wr", "tr", "otr", "rd", "big", "sgid"):
        assert _x(run, p, MC) is None, p
    run.assert_upper()


def test_view_matches_the_kernel(run):
    """Sizes, contents and st_blocks (a metacopy file reports its data file's)."""
    assert run.k.results["stat chmod"][1] > 0
    run.assert_view()
    run.assert_workdirs()


def test_remount_stable(run):
    run.assert_remount_stable()


def _cross(run, src, impl, options=("metacopy=on",)):
    side = src.side
    saved = side.options
    side.options = list(options)
    try:
        with side.mount(impl, workdir=side.fresh_workdir()) as m:
            return side.view(m), _stat_errors(m.path)
    finally:
        side.options = saved


def _stat_errors(root):
    out = {}
    for p in ("chmod", "mv2", "q/mc4", "wr"):
        try:
            os.lstat(os.path.join(root, p))
            out[p] = "OK"
        except OSError as e:
            out[p] = errno.errorcode[e.errno]
    return out


def test_each_mounts_the_others_upper(run):
    run._need(run.k, "the remount")
    run._need(run.s, "the remount")
    for src, impl in ((run.k, "subject"), (run.s, "kernel")):
        view, _ = _cross(run, src, impl)
        d = diff_snapshots(run.k.remount_view, view, a_name="kernel", b_name=f"{impl} on {src.impl}'s upper")
        assert not d, format_diff(d, f"{impl} on the {src.impl}'s upper:")


def test_metacopy_off_on_a_metacopy_upper(run):
    """metacopy=off: a metacopy file is EPERM ("refusing to follow metacopy origin") and
    drops out of listings, as the kernel's; a data-copied one reads normally."""
    kv, kerr = _cross(run, run.k, "kernel", ("metacopy=off",))
    sv, serr = _cross(run, run.s, "subject", ("metacopy=off",))
    assert kerr == {"chmod": "EPERM", "mv2": "EPERM", "q/mc4": "EPERM", "wr": "OK"}
    assert serr == kerr
    d = diff_snapshots(kv, sv, a_name="kernel", b_name="pyoverlay")
    assert not d, format_diff(d, "metacopy=off views differ:")


# --- a kernel-made metacopy middle layer ---------------------------------------------------------


def _middle_ops(m, rec):
    rec.do("read a", _read, m / "a")
    rec.do("read b2", _read, m / "b2")
    rec.do("read d2/c", _read, m / "d2/c")
    rec.do("read x/abs", _read, m / "x/abs")
    rec.do("ls", lambda: sorted(os.listdir(m)))
    for name in ("nodata", "bad", "wh"):
        rec.do(f"stat broken/{name}", os.lstat, m / "broken" / name)
    rec.do("stat a", _blocks, m / "a")
    rec.do("chmod a", os.chmod, m / "a", 0o640)
    rec.do("write b2", _append, m / "b2", b"+\n")
    rec.do("read b2 after", _read, m / "b2")
    rec.do("rename d2/c", os.rename, m / "d2/c", m / "c3")
    rec.do("read c3", _read, m / "c3")
    rec.do("write c3", _append, m / "c3", b"+\n")
    rec.do("read c3 after", _read, m / "c3")
    rec.do("rename d2/e", os.rename, m / "d2/e", m / "e3")
    rec.do("read e3", _read, m / "e3")


def _middle_layers():
    """What a kernel metacopy=on upper over the bottom layer holds after ``chmod a``,
    ``mv b b2``, ``mv d d2``, ``chmod d2/c`` and a file renamed out of its dir (absolute
    redirect): sparse metacopy files, redirects, whiteouts (checked against the kernel's
    own upper in test_metadata_only_copy_ups)."""
    mid = {
        "a": F(bytes(7000), mode=0o600, mtime_ns=T1, xattrs={MC: b""}),
        "b": WH(),
        "b2": F(bytes(7), mtime_ns=T1, xattrs={MC: b"", RX: b"b"}),
        "d": WH(),
        "d2": D(mtime_ns=T1, xattrs={RX: b"d"}),
        "d2/c": F(bytes(7), mode=0o604, mtime_ns=T1, xattrs={MC: b""}),
        "d2/e": F(bytes(7), mode=0o604, mtime_ns=T1, xattrs={MC: b""}),
        "x/abs": F(bytes(5), mtime_ns=T1, xattrs={MC: b"", RX: b"/orig"}),
        "orig": WH(),
        "broken/nodata": F(bytes(3), mtime_ns=T1, xattrs={MC: b""}),  # no data file below
        "broken/bad": F(bytes(3), mtime_ns=T1, xattrs={MC: b"\x01"}),  # a malformed record
        "broken/wh": F(bytes(3), mtime_ns=T1, xattrs={MC: b""}),
    }
    low = {
        "a": F(b"a data\n" * 1000, mtime_ns=T0),
        "b": F(b"b data\n", mtime_ns=T0),
        "d/c": F(b"c data\n", mtime_ns=T0),
        "d/e": F(b"e data\n", mtime_ns=T0),
        "orig": F(b"orig\n", mtime_ns=T0),
        "broken/bad": F(b"bad\n", mtime_ns=T0),
        "broken/wh": WH(),
    }
    return [mid, low]


def test_kernel_metacopy_middle_layer(tmp_path):
    """A metacopy file in a middle lower layer (relative, absolute and directory
    redirects): read through it, copied up from its data file, as the kernel."""
    run = run_pair(tmp_path, _middle_layers(), _middle_ops, remount=True, options=["metacopy=on"])
    assert run.k.results["read b2"] == b"b data\n" and run.k.results["read d2/c"] == b"c data\n"
    assert run.k.results["read x/abs"] == b"orig\n"
    assert run.k.results["stat broken/nodata"] == "ERR:EIO" and run.k.results["stat broken/bad"] == "ERR:EIO"
    run.assert_results()
    run.assert_view()
    run.assert_upper()
    run.assert_remount_stable()  # c3's absolute redirect passes d2's redirect in the middle layer


# --- crash during a data copy-up -------------------------------------------------------------------


def test_sigkill_during_data_copy_up(tmp_path):
    """SIGKILL of the server while a large metacopy file's data is copied in place (its
    upper file's blocks seen growing): the upper still holds the metacopy file (its xattr
    goes last), and the kernel mounts it and shows the lower data."""
    from helpers import mounts

    low, up, work = (tmp_path / n for n in ("low", "up", "work"))
    for p in (low, up, work):
        p.mkdir()
    data = os.urandom(1 << 20) * 256  # 256 MiB: the copy takes a while
    (low / "f").write_bytes(data)
    seen = None
    with mounts.subject_mount([low], tmp_path / "mnt", upper=up, workdir=work, options=["metacopy=on"],
                              log_path=tmp_path / "log") as m:  # fmt: skip
        os.chmod(m.path / "f", 0o600)
        assert os.getxattr(up / "f", MC) == b""
        empty = os.stat(up / "f").st_blocks

        def opener():
            with contextlib.suppress(OSError):
                os.close(os.open(m.path / "f", os.O_WRONLY))

        th = threading.Thread(target=opener, daemon=True)
        th.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and th.is_alive():
            blocks = os.stat(up / "f").st_blocks
            if blocks > empty:
                seen = blocks
                break
            time.sleep(0.001)
        os.kill(m.proc.pid, signal.SIGKILL)
        m.proc.wait(10)
        mounts.force_unmount(m.path)
        th.join(30)
    assert seen, "the data copy-up was never seen in progress"
    assert os.getxattr(up / "f", MC) == b"", "the metacopy xattr went before the data was in"
    kmnt = tmp_path / "kmnt"
    kmnt.mkdir()
    (tmp_path / "work2").mkdir()
    with mounts.KernelOverlay([low], kmnt, upper=up, workdir=tmp_path / "work2", options=["metacopy=on"]):
        assert (kmnt / "f").read_bytes() == data
        assert oct(os.stat(kmnt / "f").st_mode) == oct(0o100600)
    with mounts.subject_mount([low], tmp_path / "mnt2", upper=up, workdir=work, options=["metacopy=on"],
                              log_path=tmp_path / "log2") as m:  # fmt: skip
        assert (m.path / "f").read_bytes() == data  # the next pyoverlay mount: the same
        _append(m.path / "f", b"x")
    assert MC not in os.listxattr(up / "f") and os.stat(up / "f").st_size == len(data) + 1


# --- the options ------------------------------------------------------------------------------


def _stack(tmp_path):
    for d in ("l", "u", "m"):
        (tmp_path / d).mkdir()
    return str(tmp_path / "l"), str(tmp_path / "u"), str(tmp_path / "m")


def test_parse_and_rules(tmp_path):
    """metacopy=on turns redirect_dir on; with an explicit other redirect_dir it is off
    (metacopy=on given too: refused); userxattr refuses metacopy=on; the module default."""
    assert parse_options(["metacopy=on"])["metacopy"] == "on"
    with pytest.raises(ConfigError, match="expected off|on"):
        parse_options(["metacopy=yes"])
    low, up, mnt = _stack(tmp_path)
    cfg = build_config(low, up, mnt, options=["nouserxattr,metacopy=on"])
    assert cfg.metacopy == "on" and cfg.redirect_dir == "on" and features.metacopy(cfg)
    with pytest.raises(ConfigError, match="conflicting options: metacopy=on,redirect_dir=follow"):
        build_config(low, up, mnt, options=["nouserxattr,metacopy=on,redirect_dir=follow"])
    cfg = build_config(low, up, mnt, options=["nouserxattr,redirect_dir=on"])
    assert cfg.metacopy == features.metacopy_default()
    with pytest.raises(ConfigError, match="conflicting options: userxattr,metacopy=on"):
        build_config(low, up, mnt, options=["userxattr,metacopy=on"])
    cfg = build_config(low, up, mnt, options=["nouserxattr"])
    assert cfg.metacopy == features.metacopy_default()
    if features.metacopy_default() == "off":
        assert not features.metacopy(cfg)


def test_mounts_shows_metacopy(tmp_path):
    low, up, mnt = _stack(tmp_path)
    env = dict(os.environ, PYOVERLAY_STATE_DIR=str(tmp_path / "state"), XDG_RUNTIME_DIR=str(tmp_path / "state"))
    py = [sys.executable, "-m", "overlayfs_py"]
    subprocess.run([*py, "mount", "-o", "metacopy=on", low, up, mnt], check=True, env=env, capture_output=True)
    try:
        text = subprocess.run([*py, "mounts"], check=True, env=env, capture_output=True, text=True).stdout
    finally:
        subprocess.run([*py, "umount", mnt], check=True, env=env, capture_output=True)
    assert "metacopy=on" in text and "redirect_dir=on" in text


# --- tracing, explain, diff and the layer tar ------------------------------------------------------


def test_trace_events(tmp_path):
    """A metadata copy-up is one copy-up of 0 bytes with ``metadata``; the data copy-up
    later is its own, with ``data_only`` and the layer the data comes from."""
    import json

    from helpers import mounts

    low, up = tmp_path / "low", tmp_path / "up"
    low.mkdir()
    up.mkdir()
    (low / "f").write_bytes(b"x" * 5000)
    trace = tmp_path / "trace.jsonl"

    class Traced(mounts.PyoverlayMount):
        def argv(self):
            argv = super().argv()
            i = argv.index("mount") + 1
            return argv[:i] + ["--trace", str(trace)] + argv[i:]

    with Traced([low], tmp_path / "mnt", up, options=["metacopy=on"]) as m:
        os.chmod(m.path / "f", 0o600)
        _append(m.path / "f", b"y")
    events = [json.loads(line) for line in trace.read_text().splitlines()]
    done = [e for e in events if e["event"] == "copy_up_done"]
    assert [(e["reason"], e["bytes"], e.get("metadata"), e.get("data_only"), e["layer"]) for e in done] == [
        ("chmod", 0, True, None, "lower1"),
        ("open-for-write", 5000, None, True, "lower1"),
    ]
    from overlayfs_py.tracesummary import Summary, row

    summary = Summary()
    for e in events:
        summary.add(e)
    assert summary.as_dict()["metadata_only_copy_ups"] == 1
    assert "copy-ups: 2 (4.9 KiB, 1 metadata only)" in summary.text(), summary.text()
    assert "metadata only" in row(done[0]) and "data of a metacopy file" in row(done[1])


def test_explain_names_the_data_layer(run):
    from overlayfs_py.explain import explain, format_text

    for sr in (run.k, run.s):
        run._need(sr, "the upper")
        lowers = [str(p) for p in sr.side.lowers]
        ex = explain(str(sr.side.upper), lowers, "/q/mc4")
        assert ex.served is not None and ex.served.label == "upper" and ex.served.metacopy
        assert ex.data_from == "lower2" and ex.data_path == os.path.join(lowers[1], "d/mc2")
        assert "data from lower2" in format_text(ex)
        ex = explain(str(sr.side.upper), lowers, "/wr")
        assert ex.data_from is None and not ex.served.metacopy


@pytest.mark.parametrize("side", ["k", "s"])
def test_layer_tar_writes_metacopy_files_with_their_data(run, tmp_path, side):
    """The upper as a layer tar, with its lowers: extracted and stacked on the lowers (no
    metacopy anywhere), the same tree as a kernel metacopy=on mount of the upper."""
    from helpers.mounts import KernelOverlay
    from overlayfs_py.whiteout import XattrNames
    from runner.images.core import ImageError
    from runner.images.extract import extract
    from runner.images.layertar import write_layer

    sr = getattr(run, side)
    run._need(sr, "the upper")
    lowers = [str(p) for p in sr.side.lowers]
    tar = tmp_path / "layer.tar"
    with open(tar, "wb") as f:
        write_layer(str(sr.side.upper), f, lowers=lowers)
    with open(tmp_path / "refused.tar", "wb") as f, pytest.raises(ImageError, match="lower layers"):
        write_layer(str(sr.side.upper), f)
    layer = tmp_path / "layer"
    layer.mkdir()
    with open(tar, "rb") as f:
        extract(f, str(layer), XattrNames())
    with KernelOverlay([layer, *lowers], tmp_path / "flat") as m:
        flat = _tree(m.path)
    with KernelOverlay(
        lowers, tmp_path / "orig", upper=sr.side.upper, workdir=sr.side.fresh_workdir(), options=["metacopy=on"]
    ) as m:
        orig = _tree(m.path)
    assert orig["chmod"][3] == b"chmod me\n" * 100 and orig["q/mc4"][0] & 0o777 == 0o640
    assert flat == orig


def _tree(root):
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            body = _read(p) if os.path.isfile(p) and not os.path.islink(p) else None
            out[os.path.relpath(p, root)] = (st.st_mode, st.st_uid, st.st_gid, body)
    return out


@pytest.mark.parametrize("side", ["k", "s"])
def test_diff(run, side):
    """Metacopy files are changes (C; a renamed one A, its old path D); with
    ignore_identical a chown'ed or chmod'ed one stays, a utime'd one with the same data
    and mode goes."""
    from overlayfs_py.diff import diff

    sr = getattr(run, side)
    run._need(sr, "the upper")
    lowers = [str(p) for p in sr.side.lowers]
    got = {str(c) for c in diff(str(sr.side.upper), lowers)}
    for line in ("C /chmod", "C /chown", "C /utime", "A /mv2", "D /mv", "A /q/mc4", "D /d/mc2", "A /q/ln2"):
        assert line in got, (line, sorted(got))
    same = {str(c) for c in diff(str(sr.side.upper), lowers, ignore_identical=True)}
    assert "C /chmod" in same and "C /chown" in same and "C /utime" not in same and "C /sx" not in same


@pytest.mark.parametrize("side", ["k", "s"])
def test_check_keeps_metacopy_redirects(run, side):
    """`pyoverlay check` of a metacopy upper: the redirect of a renamed metacopy file leads
    to its data (not an ignored redirect to remove)."""
    from overlayfs_py.check import check

    sr = getattr(run, side)
    run._need(sr, "the upper")
    report = check(str(sr.side.upper), str(sr.side.fresh_workdir()), [str(p) for p in sr.side.lowers], userxattr=False)
    assert not [p for p in report.problems if p.kind == "redirect-ignored"], report.problems


def test_metadata_copy_up_under_an_open_file(tmp_path):
    """A file open for reading (through FUSE passthrough, with the direct engine as root)
    while its metadata is copied up: later opens for reading and writing work (the node
    bound to the lower file is replaced: ESTALE and a new lookup), and read the data."""
    from helpers import mounts

    low, up, work = (tmp_path / n for n in ("low", "up", "work"))
    for p in (low, up, work):
        p.mkdir()
    (low / "f").write_bytes(b"hello world\n")
    with mounts.subject_mount([low], tmp_path / "mnt", upper=up, workdir=work, options=["metacopy=on"],
                              log_path=tmp_path / "log") as m:  # fmt: skip
        r1 = os.open(m.path / "f", os.O_RDONLY)
        try:
            assert os.pread(r1, 5, 0) == b"hello"
            os.chmod(m.path / "f", 0o600)
            r2 = os.open(m.path / "f", os.O_RDONLY)
            try:
                assert os.pread(r2, 5, 0) == b"hello"
                w = os.open(m.path / "f", os.O_WRONLY)
                os.pwrite(w, b"J", 0)
                os.close(w)
                assert os.pread(r2, 5, 0) == b"Jello"
            finally:
                os.close(r2)
        finally:
            os.close(r1)
        assert (m.path / "f").read_bytes() == b"Jello world\n"
    assert os.getxattr(up / "f", ORIGIN) and MC not in os.listxattr(up / "f")


@pytest.mark.parametrize("option", ["metacopy=on", "metacopy=off"])
def test_lowers_only_mount_of_a_metacopy_layer(tmp_path, option):
    """A read-only stack (no upper) whose top layer holds the kernel's metacopy files: the
    same view as the kernel's with the same option (off: EPERM, listings as the kernel's)."""
    from helpers import mounts
    from helpers.snapshot import snapshot
    from helpers.stacks import build_layer

    layers = []
    for i, spec in enumerate(_middle_layers()):
        spec = {k: v for k, v in spec.items() if not k.startswith("broken")}
        layers.append(build_layer(tmp_path / f"l{i + 1}", spec))
    views = {}
    for impl in ("kernel", "subject"):
        mnt = tmp_path / f"m-{impl}"
        if impl == "kernel":
            cm = mounts.KernelOverlay(layers, mnt, options=[option])
        else:
            cm = mounts.subject_mount(layers, mnt, options=[option], log_path=tmp_path / "log")
        with cm as m:
            views[impl] = snapshot(m.path)
    if option == "metacopy=on":
        assert views["kernel"]["entries"]["b2"]["size"] == 7
    d = diff_snapshots(views["kernel"], views["subject"], a_name="kernel", b_name="pyoverlay", ignore_keys=("ino",))
    assert not d, format_diff(d, f"{option}, no upper:")
