"""index=on: the kernel's inodes index (docs/semantics.md, "Index"), against the kernel
overlay mounted with the same option: a copy-up of a hard-linked lower file goes to
``<workdir>/index/<hex of its origin handle>`` and is linked at its name, the names stay
one inode (st_ino, nlink, data), ``overlay.nlink`` is kept, the last unlink removes the
entry; the mount's checks (``overlay.origin`` on the upper root, ``overlay.upper`` on the
index dir) and its cleanup; each side mounts the other's upper; a SIGKILL during an
indexed copy-up.

Both engines: run with PYOVERLAY_ENGINE=direct and =pyfuse3.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import mounts
from helpers.snapshot import diff_snapshots, format_diff
from helpers.stacks import T1, D, F, H
from helpers.writeops import RENAME_EXCHANGE, renameat2, run_pair
from overlayfs_py import features
from overlayfs_py.config import ConfigError, build_config, parse_options

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="index=on needs root (file handles), as the kernel's")

NL = "trusted.overlay.nlink"
OR = "trusted.overlay.origin"


def _layers():
    l1 = {
        "d": D(mtime_ns=T1),
        "w1": F(b"written\n"),  # W: written through w1, read through the others
        "d/w2": H("w1"),
        "d/w3": H("w1"),
        "c1": F(b"chmod\n"),  # C: chmod through its first name looked up
        "d/c2": H("c1"),
        "r1": F(b"renamed\n"),  # R: one name renamed (that name is copied up)
        "r2": H("r1"),
        "r3": H("r1"),
        "u1": F(b"unlinked\n"),  # U: every name unlinked, one by one
        "u2": H("u1"),
        "d/u3": H("u1"),
        "k1": F(b"linked\n"),  # K: a new link made to it
        "k2": H("k1"),
        "m1": F(b"write then unlink\n"),  # M: written, then that name unlinked
        "m2": H("m1"),
        "o1": F(b"over\n"),  # O: a name renamed over by another file
        "o2": H("o1"),
        "x": F(b"another\n"),
        "e1": F(b"exchanged\n"),  # E: one name exchanged with a single file
        "e2": H("e1"),
        "y": F(b"single too\n"),
        "s": F(b"single\n"),  # one link: a plain copy-up (origin, no index)
    }
    l2 = {"low": F(b"second layer\n"), "low2": H("low")}  # a hard link in a deeper layer
    return [l1, l2]


def _read(p):
    with open(p, "rb") as f:
        return f.read()


def _write(p, data):
    with open(p, "ab") as f:
        f.write(data)


def _st(p):
    """nlink, mode, size (st_ino: the views compare it, as the lower file's token)."""
    st = os.lstat(p)
    return (st.st_nlink, oct(st.st_mode), st.st_size)


def _sts(m, *names):
    """_st of each name, and whether they are one st_ino."""
    sts = [os.lstat(m / n) for n in names]
    return [_st(m / n) for n in names] + [len({st.st_ino for st in sts}) == 1]


def _ops(m, rec):
    rec.do("write w1", _write, m / "w1", b"more\n")
    rec.do("read d/w2", _read, m / "d/w2")
    rec.do("stat w", _sts, m, "w1", "d/w2", "d/w3")
    rec.do("chmod d/c2", os.chmod, m / "d/c2", 0o600)
    rec.do("stat c", _sts, m, "c1", "d/c2")
    rec.do("stat r1 first", _st, m / "r1")  # r1 is the node's first name, r2 is renamed
    rec.do("rename r2", os.rename, m / "r2", m / "d/r2new")
    rec.do("stat r", _sts, m, "r1", "d/r2new", "r3")
    rec.do("unlink u1", os.unlink, m / "u1")
    rec.do("stat u after 1", _sts, m, "u2", "d/u3")
    rec.do("unlink d/u3", os.unlink, m / "d/u3")
    rec.do("stat u after 2", _st, m / "u2")
    rec.do("unlink u2", os.unlink, m / "u2")
    rec.do("link k1", os.link, m / "k1", m / "d/knew")
    rec.do("stat k", _sts, m, "k1", "k2", "d/knew")
    rec.do("write m1", _write, m / "m1", b"x\n")
    rec.do("unlink m1", os.unlink, m / "m1")
    rec.do("stat m2", _st, m / "m2")
    rec.do("read m2", _read, m / "m2")
    rec.do("rename x over o1", os.rename, m / "x", m / "o1")
    rec.do("stat o2", _st, m / "o2")
    rec.do("stat e1 first", _st, m / "e1")  # e1 is the node's first name, e2 is exchanged
    rec.do("exchange e2", renameat2, m / "y", m / "e2", RENAME_EXCHANGE)
    rec.do("stat e", _sts, m, "e1", "y")
    rec.do("chmod s", os.chmod, m / "s", 0o640)
    rec.do("write low", _write, m / "low", b"up\n")
    rec.do("read low2", _read, m / "low2")
    rec.do("stat low", _sts, m, "low", "low2")


def _index_view(workdir: Path) -> dict:
    """The index dir: entry name -> (type, nlink, its overlay xattrs)."""
    out = {}
    idx = workdir / "index"
    for n in sorted(os.listdir(idx)):
        p = idx / n
        st = os.lstat(p)
        xs = {x: os.getxattr(p, x, follow_symlinks=False) for x in os.listxattr(p, follow_symlinks=False)}
        out[n] = (oct(st.st_mode), st.st_nlink, {k: v for k, v in xs.items() if k.startswith("trusted.overlay.")})
    return out


def _after(m, sr):
    sr.extra["index_live"] = _index_view(sr.side.workdir)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return run_pair(tmp_path_factory.mktemp("index"), _layers(), _ops, remount=True, options=["index=on"], after=_after)


def test_results_match_the_kernel(run):
    k = run.k.results
    w = k["stat w"]
    assert w[-1] is True and all(t[0] == 3 for t in w[:-1])  # one inode, 3 links
    assert k["read d/w2"] == b"written\nmore\n" and k["stat u after 2"][0] == 1
    assert k["stat m2"][0] == 1 and k["stat k"][0][0] == 3
    run.assert_results()


def test_view_matches_the_kernel(run):
    run.assert_view()
    run.assert_workdirs()


def test_upper_matches_the_kernel(run):
    """The same upper: names linked to the index inode, overlay.nlink, origins, whiteouts;
    the upper root's overlay.origin (the lower root's handle)."""
    assert run.kupper(".")["xattrs"][OR]
    run.assert_upper()


def test_index_dir_matches_the_kernel(run):
    """<workdir>/index: the same entries (names are the origin handles: the two sides' lowers
    are different inodes, so the names are compared by the file each entry serves), the same
    nlink xattrs, and the index dir's overlay.upper."""
    run._need(run.s, "the index")

    def norm(view):
        return sorted((v[0], v[1], v[2].get(NL)) for v in view.values())

    # ("#..." names: temporaries, and the kernel's shared whiteout, which pyoverlay does not
    # make; the next mount removes them either way)
    k = {n: v for n, v in run.k.extra["index_live"].items() if not n.startswith("#")}
    s = run.s.extra["index_live"]
    assert k and norm(k) == norm(s)
    for side in (run.k, run.s):
        for name, (_mode, _nl, xs) in _index_view(side.side.workdir).items():
            assert name.startswith("#") or xs[OR].hex() == name  # the entry's name is its origin record
        up = os.getxattr(side.side.workdir / "index", "trusted.overlay.upper")
        assert up[3] == 4  # an upper handle (OVL_FH_FLAG_PATH_UPPER)


def test_remount_stable(run):
    run.assert_remount_stable()


def _cross(run, src, impl, options=("index=on",)):
    side = src.side
    saved = side.options
    side.options = list(options)
    try:
        with side.mount(impl, workdir=side.workdir if "index=on" in options else side.fresh_workdir()) as m:
            return side.view(m)
    finally:
        side.options = saved


def test_each_mounts_the_others_upper(run):
    """pyoverlay mounts the kernel's upper+work with index=on, the kernel pyoverlay's: the
    same view (the index serves the names not linked up)."""
    run._need(run.k, "the remount")
    run._need(run.s, "the remount")
    kv = _cross(run, run.k, "subject")
    d = diff_snapshots(run.k.remount_view, kv, a_name="kernel", b_name="pyoverlay on the kernel's upper")
    assert not d, format_diff(d, "pyoverlay on the kernel's upper:")
    sv = _cross(run, run.s, "kernel")
    d = diff_snapshots(run.k.remount_view, sv, a_name="kernel", b_name="kernel on pyoverlay's upper")
    assert not d, format_diff(d, "the kernel on pyoverlay's upper:")


def test_index_off_mount_of_an_indexed_upper(run):
    """index=off over an upper written with index=on: the kernel ignores the index (names not
    linked up show the lower file again, copied-up ones report the upper inode); so does
    pyoverlay."""
    kv = _cross(run, run.k, "kernel", ("index=off",))
    sv = _cross(run, run.k, "subject", ("index=off",))
    d = diff_snapshots(kv, sv, a_name="kernel", b_name="pyoverlay")
    assert not d, format_diff(d, "index=off views differ:")


def test_read_only_mount_reads_the_index(run):
    """``ro,index=on`` over an indexed upper: the kernel's read-only mount still serves the
    names not linked up from the index; so does pyoverlay's."""
    kv = _cross(run, run.k, "kernel", ("index=on", "ro"))
    sv = _cross(run, run.k, "subject", ("index=on", "ro"))
    d = diff_snapshots(kv, sv, a_name="kernel", b_name="pyoverlay")
    assert not d, format_diff(d, "ro,index=on views differ:")
    d = diff_snapshots(run.k.remount_view, kv, a_name="kernel rw", b_name="kernel ro")
    assert not d, format_diff(d, "the kernel's ro view is not its rw one:")


def test_index_with_userxattr(tmp_path):
    """index=on with userxattr (as root: the kernel keeps the index, its records under
    user.overlay.*): the same results, view, upper and index as the kernel's."""
    run = run_pair(tmp_path, _layers(), _ops, remount=True, options=["userxattr", "index=on"], after=_after)
    run.assert_all()
    run.assert_remount_stable()
    assert os.getxattr(run.k.side.upper, "user.overlay.origin")
    assert os.getxattr(run.s.side.upper, "user.overlay.origin")


def test_index_with_redirect_dir(tmp_path):
    """index=on,redirect_dir=on together: a renamed lower dir holding hard links."""
    layers = [{"dir/a": F(b"a\n"), "dir/b": H("dir/a"), "other": F(b"o\n"), "dir/c": H("other")}]

    def ops(m, rec):
        rec.do("rename dir", os.rename, m / "dir", m / "dir2")
        rec.do("write dir2/a", _write, m / "dir2/a", b"more\n")
        rec.do("read dir2/b", _read, m / "dir2/b")
        rec.do("stat", _sts, m, "dir2/a", "dir2/b", "other", "dir2/c")
        rec.do("unlink dir2/c", os.unlink, m / "dir2/c")
        rec.do("stat other", _st, m / "other")

    run = run_pair(tmp_path, layers, ops, remount=True, options=["index=on", "redirect_dir=on"])
    run.assert_all()
    run.assert_remount_stable()


# --- the mount's checks -------------------------------------------------------------------------


def _mount_cmd(opts, mnt):
    env = dict(os.environ)
    return subprocess.run(
        [sys.executable, "-m", "overlayfs_py", "mount", "-o", opts, str(mnt)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def _kernel_mount(opts, mnt):
    return subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)], capture_output=True, text=True)


def _umount(mnt):
    subprocess.run(["umount", str(mnt)], capture_output=True)
    for _ in range(100):
        if not os.path.ismount(mnt):
            return
        time.sleep(0.05)


def _stack(base: Path):
    for d in ("lower", "lower2", "upper", "work", "m"):
        (base / d).mkdir()
    (base / "lower/f").write_bytes(b"f\n")
    os.link(base / "lower/f", base / "lower/g")
    (base / "lower2/f").write_bytes(b"other\n")


@pytest.mark.parametrize("first", ["kernel", "subject"])
def test_refused_over_another_lower(tmp_path, first):
    """An upper first mounted with index=on over one lower, then over another: the kernel
    refuses (failed to verify upper root origin: ESTALE); so does pyoverlay, with one line,
    whoever wrote the upper; index=off mounts it."""
    _stack(tmp_path)
    t = tmp_path
    opts = f"lowerdir={t}/lower,upperdir={t}/upper,workdir={t}/work,index=on"
    other = f"lowerdir={t}/lower2,upperdir={t}/upper,workdir={t}/work,index=on"
    m = t / "m"
    if first == "kernel":
        assert _kernel_mount(opts, m).returncode == 0
    else:
        r = _mount_cmd(opts, m)
        assert r.returncode == 0, r.stderr
    _umount(m)
    assert os.getxattr(t / "upper", OR)  # the lower root's handle
    k = _kernel_mount(other, m)
    if k.returncode == 0:
        _umount(m)
    assert k.returncode != 0 and "Stale file handle" in k.stderr
    r = _mount_cmd(other, m)
    if r.returncode == 0:
        _umount(m)
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "Stale file handle" in err[0] and "index=off" in err[0], r.stderr
    assert "Traceback" not in r.stderr and not os.path.ismount(m)
    r = _mount_cmd(other.replace("index=on", "index=off"), m)
    assert r.returncode == 0, r.stderr
    _umount(m)


def test_refused_index_of_another_upper(tmp_path):
    """A workdir whose index belongs to another upper: refused (the index dir's
    overlay.upper), as the kernel does."""
    _stack(tmp_path)
    t = tmp_path
    (t / "upper2").mkdir()
    m = t / "m"
    r = _mount_cmd(f"lowerdir={t}/lower,upperdir={t}/upper,workdir={t}/work,index=on", m)
    assert r.returncode == 0, r.stderr
    _umount(m)
    other = f"lowerdir={t}/lower,upperdir={t}/upper2,workdir={t}/work,index=on"
    k = _kernel_mount(other, m)
    if k.returncode == 0:
        _umount(m)
    assert k.returncode != 0
    r = _mount_cmd(other, m)
    if r.returncode == 0:
        _umount(m)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "index" in r.stderr


def test_mount_record_shows_index(tmp_path):
    _stack(tmp_path)
    t = tmp_path
    m = t / "m"
    r = _mount_cmd(f"lowerdir={t}/lower,upperdir={t}/upper,workdir={t}/work,index=on", m)
    assert r.returncode == 0, r.stderr
    try:
        out = subprocess.run(
            [sys.executable, "-m", "overlayfs_py", "mounts", "--json"], capture_output=True, text=True, timeout=60
        )
        import json

        mine = [x for x in json.loads(out.stdout) if x["mountpoint"] == str(m)]
        assert mine and mine[0]["index"] is True
    finally:
        _umount(m)


def test_crash_during_indexed_copy_up(tmp_path):
    """SIGKILL of the server while it copies a large hard-linked file up through the index:
    the next mount (pyoverlay's, then the kernel's) finds the index as the kernel leaves it
    after the same crash (an entry is either complete or absent; never a half-built one)."""
    _stack(tmp_path)
    t = tmp_path
    big = t / "lower/big"
    with open(big, "wb") as f:
        f.write(os.urandom(1 << 20) * 64)  # 64 MiB
    os.link(big, t / "lower/big2")
    m = t / "m"
    opts = f"lowerdir={t}/lower,upperdir={t}/upper,workdir={t}/work,index=on"
    r = _mount_cmd(opts, m)
    assert r.returncode == 0, r.stderr
    pid = mounts.server_pid(m) if hasattr(mounts, "server_pid") else None
    if pid is None:
        out = subprocess.run(
            [sys.executable, "-m", "overlayfs_py", "mounts", "--json"], capture_output=True, text=True, timeout=60
        )
        import json

        pid = next(x["pid"] for x in json.loads(out.stdout) if x["mountpoint"] == str(m))
    writer = subprocess.Popen(["sh", "-c", f"echo x >> {m}/big"], stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    os.kill(pid, signal.SIGKILL)
    writer.wait(timeout=60)
    subprocess.run(["umount", "-l", str(m)], capture_output=True)
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    entries = os.listdir(t / "work/index") if (t / "work/index").exists() else []
    for n in entries:  # whatever is there is complete: its origin and nlink written
        if n.startswith("#"):  # a temporary (index/ is also the work dir: the next mount removes it)
            continue
        p = t / "work/index" / n
        assert os.getxattr(p, OR).hex() == n
    r = _mount_cmd(opts, m)
    assert r.returncode == 0, r.stderr
    try:
        assert _read(m / "big2")[:16] == _read(big)[:16]
        assert os.lstat(m / "big").st_ino == os.lstat(m / "big2").st_ino
    finally:
        _umount(m)
    assert not [n for n in os.listdir(t / "work/work")]
    assert not [n for n in os.listdir(t / "work/index") if n.startswith("#")]
    k = _kernel_mount(opts, m)
    assert k.returncode == 0, k.stderr
    try:
        assert os.lstat(m / "big").st_ino == os.lstat(m / "big2").st_ino
    finally:
        _umount(m)


def test_cleanup_at_mount_as_the_kernel(tmp_path):
    """Index cleanup at mount (ovl_indexdir_cleanup): a '#' leftover goes, an orphan entry
    (overlay nlink 0) goes, a stale one (its origin is not its name) goes, a whiteout
    stays; the same on the kernel's mount of an identical workdir."""
    result = {}
    for impl in ("kernel", "subject"):
        base = tmp_path / impl
        base.mkdir()
        _stack(base)
        t = base
        m = t / "m"
        opts = f"lowerdir={t}/lower,upperdir={t}/upper,workdir={t}/work,index=on"
        # a first mount writes the records and an entry
        r = _mount_cmd(opts, m) if impl == "subject" else _kernel_mount(opts, m)
        assert r.returncode == 0, r.stderr
        os.chmod(m / "f", 0o600)
        _umount(m)
        idx = t / "work/index"
        (entry,) = os.listdir(idx)
        # orphan: every upper name gone, overlay nlink 0
        os.unlink(t / "upper/f")
        os.setxattr(idx / entry, NL, b"U-1")
        (idx / "#leftover").write_bytes(b"")
        # stale: an entry whose origin record is not its name
        rec = bytearray(os.getxattr(idx / entry, OR))
        rec[-1] ^= 0xFF
        stale = idx / rec.hex()
        stale.write_bytes(b"f\n")
        os.setxattr(stale, OR, os.getxattr(idx / entry, OR))
        os.setxattr(stale, NL, b"U+1")
        rec[-2] ^= 0xFF
        wo = rec.hex()
        os.mknod(idx / wo, 0o600 | 0o020000, 0)  # a whiteout entry (nfs_export's): kept
        names = {entry: "orphan", rec.hex(): "whiteout", stale.name: "stale", "#leftover": "leftover"}
        r = _mount_cmd(opts, m) if impl == "subject" else _kernel_mount(opts, m)
        assert r.returncode == 0, r.stderr
        _umount(m)
        result[impl] = sorted(names.get(n, n) for n in os.listdir(idx))
    assert result["kernel"] == ["whiteout"]
    assert result["subject"] == result["kernel"]


# --- options -------------------------------------------------------------------------------------


def test_index_options():
    assert parse_options(["index=on"])["index"] is True
    assert parse_options(["index=off"])["index"] is False
    with pytest.raises(ConfigError, match="invalid value"):
        parse_options(["index=yes"])


def test_nfs_export_refused_with_a_reason():
    with pytest.raises(ConfigError, match="nfs_export=on.*nfsd"):
        parse_options(["nfs_export=on"])


def test_index_default_and_fallbacks(tmp_path):
    """Default: the module's ``index`` parameter; off without an upper (the kernel ignores
    it there); a read-only mount with an upper keeps it (its index serves names)."""
    low, up, mnt = tmp_path / "l", tmp_path / "u", tmp_path / "m"
    for d in (low, up, mnt):
        d.mkdir()
    from overlayfs_py import userxattr

    cfg = userxattr.plan(build_config(str(low), str(up), str(mnt)))
    assert bool(cfg.index) == features.defaults().index
    cfg = userxattr.plan(build_config(str(low), str(up), str(mnt), options=["index=on"]))
    assert cfg.index is True and features.indexes(cfg)
    cfg = userxattr.plan(build_config(str(low), str(up), str(mnt), options=["index=on,ro"]))
    assert features.indexes(cfg)
    cfg = userxattr.plan(build_config(f"{low}:{up}", None, str(mnt), options=["index=on"]))
    assert not features.indexes(cfg)


# --- tracing and explain -------------------------------------------------------------------------


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "overlayfs_py", *map(str, args)], capture_output=True, text=True, timeout=60
    )


def test_trace_and_explain(tmp_path):
    """The copy-up of a hard-linked file says ``index`` (its entry), a link of another name
    to the entry is ``index_link``, the last unlink ``index_remove``; explain notes an
    indexed upper copy and a lower name served by the index."""
    import json

    _stack(tmp_path)
    t = tmp_path
    os.link(t / "lower/f", t / "lower/h")
    m, trace = t / "m", t / "trace.jsonl"
    r = _cli("mount", "--trace", trace, "-o", f"lowerdir={t}/lower,upperdir={t}/upper,workdir={t}/work,index=on", m)
    assert r.returncode == 0, r.stderr
    try:
        os.chmod(m / "f", 0o600)  # copy-up to the index, linked at f
        ex = json.loads(_cli("explain", "--json", m, "/f").stdout)
        assert any("indexed copy" in n for n in ex["notes"]), ex
        ex = json.loads(_cli("explain", "--json", m, "/g").stdout)
        assert ex["served"]["label"] == "lower1" and any("served by index/" in n for n in ex["notes"]), ex
        os.rename(m / "g", m / "g2")  # g linked to the entry, then renamed
        for n in ("f", "g2", "h"):
            os.unlink(m / n)
    finally:
        _umount(m)
    events = [json.loads(line) for line in trace.read_text().splitlines()]
    entry = os.listdir(t / "work/index") if (t / "work/index").exists() else []
    assert entry == []  # the last name took the entry with it
    done = [e for e in events if e["event"] == "copy_up_done"]
    assert len(done) == 1 and done[0]["path"] == "/f" and len(done[0]["index"]) > 40
    links = [(e["path"], e["nlink"]) for e in events if e["event"] == "index_link"]
    assert links == [("/f", 3), ("/g", 3), ("/h", 1)], links
    assert [e["path"] for e in events if e["event"] == "index_remove"] == ["/h"]


# --- xino ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("writer", ["kernel", "subject"])
def test_index_with_xino_keeps_st_ino(tmp_path, writer):
    """index=on,xino=on, lowers on two tmpfs and the upper's ext4: a hard-linked lower file
    copied up keeps its lower st_ino (with the xino fsid bits) through every name, as the
    kernel's; every st_ino and d_ino as the kernel's before and after either side wrote."""
    import contextlib

    from test_xino import Layout, _diff, _fill, _snapshot

    engine = os.environ.get("PYOVERLAY_ENGINE", "direct")
    with contextlib.ExitStack() as stack:
        lay = Layout(tmp_path, stack, ["t1", "ext4", "t2"], "ext4")
        _fill(lay)
        opts = ["xino=on", "index=on"]
        before = lay.compare(opts, engine)
        with lay.mount("kernel" if writer == "kernel" else "pyoverlay", opts, engine) as m:
            os.chmod(m.path / "hl1", 0o600)
            with open(m.path / "hl2", "a") as f:
                f.write("more\n")
            live = _snapshot(m.path)
        # both read the writer's upper with the writer's workdir (its index: a copy of it
        # would not be linked to the upper files)
        if writer == "kernel":
            lay.work_p = lay.work_k
        else:
            lay.work_k = lay.work_p
        after = lay.compare(opts, engine)
        assert after["ino hl1"] == after["ino hl2"] == before["ino hl1"]
        assert after["ino hl1"] >> 61 == 0b010  # t1's fsid: the lower inode's number
        assert not _diff(after, live), "\n".join(_diff(after, live))


# --- diff and commit -------------------------------------------------------------------------------


def test_diff_and_layer_tar_of_an_indexed_upper(tmp_path):
    """The index is in the workdir, never in a layer; the upper's hard links stay hard links
    in the layer tar; lower names that show an indexed copy without being linked up (the
    index serves them) are changes in ``diff`` and hard links to the copy in the layer tar,
    so the layer shows what the mount showed."""
    import io
    import tarfile

    from overlayfs_py.diff import diff
    from runner.images.layertar import write_layer

    _stack(tmp_path)
    t = tmp_path
    os.mkdir(t / "lower/sub")
    os.link(t / "lower/f", t / "lower/sub/h")
    m = t / "m"
    r = _mount_cmd(f"lowerdir={t}/lower,upperdir={t}/upper,workdir={t}/work,index=on", m)
    assert r.returncode == 0, r.stderr
    try:
        _write(m / "f", b"new\n")  # f copied up through the index; g and sub/h are not linked
        os.link(m / "f", m / "f2")  # a hard link within the upper
        seen = {n: _read(m / n) for n in ("f", "g", "sub/h", "f2")}
    finally:
        _umount(m)
    assert set(seen.values()) == {b"f\nnew\n"}
    changes = {str(c) for c in diff(str(t / "upper"), [str(t / "lower")])}
    assert {"C /f", "A /f2", "C /g", "C /sub/h"} <= changes, changes
    buf = io.BytesIO()
    write_layer(str(t / "upper"), buf, lowers=[str(t / "lower")])
    buf.seek(0)
    with tarfile.open(fileobj=buf) as tf:
        members = {mb.name: mb for mb in tf.getmembers()}
    assert not any("index" in n or "work" in n for n in members)
    assert members["f"].isreg() and members["f2"].islnk() and members["f2"].linkname == "f"
    assert members["g"].islnk() and members["g"].linkname == "f"
    assert members["sub/h"].islnk() and members["sub/h"].linkname == "f"


@pytest.mark.parametrize("bad", ["whiteout", "symlink"])
def test_bad_index_entry(tmp_path, bad):
    """A lower hard link whose index entry is a whiteout: the mount keeps it and the lookup
    fails with EIO (ovl_lookup_index: "bad index found"); another type with one link: the
    mount removes it ("invalid origin": stale) and the name shows its lower file."""
    result = {}
    for impl in ("kernel", "subject"):
        base = tmp_path / impl
        base.mkdir()
        _stack(base)
        t = base
        m = t / "m"
        opts = f"lowerdir={t}/lower,upperdir={t}/upper,workdir={t}/work,index=on"
        r = _mount_cmd(opts, m) if impl == "subject" else _kernel_mount(opts, m)
        assert r.returncode == 0, r.stderr
        _umount(m)
        fd = os.open(t / "lower/f", os.O_RDONLY)
        try:
            from overlayfs_py.index import encode_fh, index_name

            name = index_name(encode_fh(fd, None) or b"").decode()
        finally:
            os.close(fd)
        p = t / "work/index" / name
        if bad == "whiteout":
            os.mknod(p, 0o600 | 0o020000, 0)
        else:
            os.symlink("x", p)  # with its records, so the cleanup at mount keeps it
            os.setxattr(p, OR, bytes.fromhex(name), follow_symlinks=False)
            os.setxattr(p, NL, b"U+1", follow_symlinks=False)
        r = _mount_cmd(opts, m) if impl == "subject" else _kernel_mount(opts, m)
        assert r.returncode == 0, r.stderr
        out = []
        try:
            for n in ("f", "g", "lower-only-file"):
                try:
                    os.lstat(m / n)
                    out.append("OK")
                except OSError as e:
                    out.append(os.strerror(e.errno))
        finally:
            _umount(m)
        result[impl] = out
    assert result["kernel"][0] == (os.strerror(5) if bad == "whiteout" else "OK")  # EIO
    assert result["subject"] == result["kernel"]


def test_concurrent_copy_up_through_two_names(tmp_path):
    """A large hard-linked file opened for writing through one name (its data copied in a
    worker thread) while another name is unlinked (which copies it up through the index at
    once): whichever builds the index entry first, the names stay one inode with the right
    data and count, and the index holds one entry."""
    import threading

    _stack(tmp_path)
    t = tmp_path
    big = t / "lower/big"
    data = os.urandom(1 << 20) * 32  # 32 MiB
    big.write_bytes(data)
    os.link(big, t / "lower/big2")
    os.link(big, t / "lower/big3")
    m = t / "m"
    r = _mount_cmd(f"lowerdir={t}/lower,upperdir={t}/upper,workdir={t}/work,index=on", m)
    assert r.returncode == 0, r.stderr
    errors = []

    def write():
        try:
            _write(m / "big", b"tail\n")
        except OSError as e:
            errors.append(e)

    try:
        os.lstat(m / "big2")  # (another name known to the kernel first)
        th = threading.Thread(target=write)
        th.start()
        os.unlink(m / "big2")
        th.join(timeout=120)
        assert not errors and not th.is_alive()
        st, st3 = os.lstat(m / "big"), os.lstat(m / "big3")
        assert st.st_ino == st3.st_ino and st.st_nlink == 2
        assert _read(m / "big3") == data + b"tail\n"
    finally:
        _umount(m)
    assert len(os.listdir(t / "work/index")) == 1
    assert os.listdir(t / "work/work") == []


def _index_norm(view: dict) -> list:
    """An index dir's entries compared across the two sides (their names are the origin
    handles of different lower inodes): type, links, ``overlay.nlink`` and whether it is a
    metacopy file (``overlay.metacopy``)."""
    return sorted((v[0], v[1], v[2].get(NL), MC in v[2]) for n, v in view.items() if not n.startswith("#"))


MC = "trusted.overlay.metacopy"


def test_index_with_metacopy(tmp_path):
    """index=on,metacopy=on together: the same results, views, uppers and index dirs as the
    kernel's, and each side mounts the other's upper+work with the same view. The indexed
    copy-up of a chmod, a link, a rename, an exchange or an unlink of a hard-linked lower
    file is a metacopy file in index/ (sparse, ``overlay.metacopy``, origin, nlink), the
    names renamed or linked get the kernel's absolute redirects; a write copies the data in
    place. Reading the kernel's upper takes the data of a metacopy index entry from the
    lower file it serves, and a write through a name not linked up yet copies it."""
    opts = ("index=on", "metacopy=on")
    run = run_pair(tmp_path, _layers(), _ops, remount=True, options=list(opts), after=_after)
    run.assert_results()
    run.assert_view()
    run.assert_remount_stable()
    run.assert_upper()
    kl, sl = _index_norm(run.k.extra["index_live"]), _index_norm(run.s.extra["index_live"])
    assert kl == sl
    assert any(mc for *_x, mc in kl), "the kernel made no metacopy index entry: the test covers none"
    ke, se = _index_norm(_index_view(run.k.side.workdir)), _index_norm(_index_view(run.s.side.workdir))
    assert ke == se
    kidx = run.k.side.workdir / "index"
    assert any("trusted.overlay.metacopy" in os.listxattr(kidx / n) for n in os.listdir(kidx)), (
        "the kernel made no metacopy index entry: the test no longer covers reading one"
    )
    kv = _cross(run, run.k, "subject", opts)
    d = diff_snapshots(run.k.remount_view, kv, a_name="kernel", b_name="pyoverlay on the kernel's upper")
    assert not d, format_diff(d, "pyoverlay on the kernel's upper:")
    sv = _cross(run, run.s, "kernel", opts)
    d = diff_snapshots(run.k.remount_view, sv, a_name="kernel", b_name="kernel on pyoverlay's upper")
    assert not d, format_diff(d, "the kernel on pyoverlay's upper:")


def test_write_through_a_metacopy_index_entry(tmp_path):
    """A kernel-made metacopy index entry (index=on,metacopy=on, a chmod through one name of
    a lower hard link): pyoverlay reads the other name's data from the lower file, and a
    write through that name copies the data into the shared inode, as the kernel does."""
    _stack(tmp_path)
    base = tmp_path
    opts = f"lowerdir={base / 'lower'},upperdir={base / 'upper'},workdir={base / 'work'},index=on,metacopy=on"
    r = _kernel_mount(opts, base / "m")
    assert r.returncode == 0, r.stderr
    try:
        os.chmod(base / "m/f", 0o600)
    finally:
        _umount(base / "m")
    idx = base / "work/index"
    (entry,) = os.listdir(idx)
    assert "trusted.overlay.metacopy" in os.listxattr(idx / entry)
    r = _mount_cmd(opts, base / "m")
    assert r.returncode == 0, r.stderr
    try:
        assert _read(base / "m/g") == b"f\n"
        assert oct(os.stat(base / "m/g").st_mode & 0o777) == oct(0o600)
        _write(base / "m/g", b"more\n")
        assert _read(base / "m/f") == b"f\nmore\n"
    finally:
        _umount(base / "m")
    assert "trusted.overlay.metacopy" not in os.listxattr(idx / entry)
    assert _read(idx / entry) == b"f\nmore\n"
    r = _kernel_mount(opts, base / "m")
    assert r.returncode == 0, r.stderr
    try:
        assert _read(base / "m/f") == b"f\nmore\n" and _read(base / "m/g") == b"f\nmore\n"
    finally:
        _umount(base / "m")


BIG_MB = int(os.environ.get("PYOVERLAY_CONCURRENCY_MB", "256"))


def _building(workdir: Path, pid: int) -> bool:
    """The server holds a file open in ``index/``: a copy-up's unnamed (``O_TMPFILE``) file,
    which with index=on is built there, as the kernel builds its temporaries in the index
    dir ("index dir will act also as workdir")."""
    return mounts.holds_file_under(pid, str(workdir / "index") + "/#")


@pytest.mark.parametrize("op", ["unlink", "rename", "link"])
def test_indexed_copy_up_does_not_stall_other_requests(tmp_path, op):
    """An unlink, a rename or a link of one name of a large hard-linked lower file copies the file
    up through the index first (ovl_nlink_start); its data is copied in a worker thread,
    as any large copy-up's: while it is in progress (its unnamed file in index/ is open in
    the server: observed before and after), another process's stat, read and readdir of
    other files in the same mount complete (in another directory: the kernel's VFS holds
    the directory of the names an unlink, rename or link changes locked during the request).
    Then the operation is done as the kernel's: the other name keeps the data, the index
    has the one entry."""
    import threading

    t = tmp_path
    for d in ("lower", "lower/d", "lower/h", "upper", "work", "m"):
        (t / d).mkdir()
    chunk = os.urandom(1 << 20)
    with open(t / "lower/h/big", "wb") as f:
        for _ in range(BIG_MB):
            f.write(chunk)
    os.link(t / "lower/h/big", t / "lower/h/big2")
    (t / "lower/d/small").write_bytes(b"small file\n")
    m = t / "m"
    with mounts.PyoverlayMount(
        [t / "lower"], m, t / "upper", t / "work", options=["index=on"], log_path=t / "server.log"
    ) as mnt:
        pid = mnt.proc.pid
        os.lstat(m / "h/big2")  # (looked up before: the operation itself is what waits)
        done = threading.Event()
        errors: list[OSError] = []

        def operate():
            try:
                if op == "unlink":
                    os.unlink(m / "h/big2")
                elif op == "rename":
                    os.rename(m / "h/big2", m / "h/moved")
                else:
                    os.link(m / "h/big2", m / "h/linked")
            except OSError as exc:  # reported below
                errors.append(exc)
            finally:
                done.set()

        th = threading.Thread(target=operate)
        th.start()
        try:
            while not _building(t / "work", pid) and not done.is_set():
                time.sleep(0.001)
            assert not done.is_set(), "the indexed copy-up finished before it could be observed"
            assert os.stat(m / "d/small").st_size == 11
            assert _read(m / "d/small") == b"small file\n"
            assert sorted(os.listdir(m / "d")) == ["small"]
            still_copying = _building(t / "work", pid) and not done.is_set()
        finally:
            th.join(timeout=300)
        assert not errors, errors
        assert still_copying, "the other requests were answered only after the copy-up had finished"
        names = {"unlink": ["h/big"], "rename": ["h/big", "h/moved"], "link": ["h/big", "h/big2", "h/linked"]}[op]
        sts = [os.lstat(m / n) for n in names]
        assert {st.st_ino for st in sts} == {os.lstat(t / "lower/h/big").st_ino}
        assert all(st.st_nlink == len(names) for st in sts)
        assert os.path.lexists(m / "h/big2") == (op == "link")
        with open(m / names[-1], "rb") as f:
            assert f.read(1 << 20) == chunk
    (entry,) = os.listdir(t / "work/index")
    assert os.stat(t / "work/index" / entry).st_size == BIG_MB << 20
    assert os.listdir(t / "work/work") == []


def test_concurrent_indexed_copy_ups_of_two_names(tmp_path):
    """Two names of one large hard-linked lower file, in two directories, unlinked and
    renamed at the same time (each copies the file up through the index, its data in a
    worker thread, under the inode's copy-up lock): one index entry, the third name keeps
    the data and the right count, nothing left in work/."""
    import threading

    t = tmp_path
    for d in ("lower", "lower/a", "lower/b", "upper", "work", "m"):
        (t / d).mkdir()
    data = os.urandom(1 << 20) * 32  # 32 MiB
    (t / "lower/big").write_bytes(data)
    os.link(t / "lower/big", t / "lower/a/big2")
    os.link(t / "lower/big", t / "lower/b/big3")
    m = t / "m"
    with mounts.PyoverlayMount(
        [t / "lower"], m, t / "upper", t / "work", options=["index=on"], log_path=t / "server.log"
    ):
        for n in ("big", "a/big2", "b/big3"):
            os.lstat(m / n)
        barrier = threading.Barrier(2)
        errors: list[OSError] = []

        def run(fn, *args):
            try:
                barrier.wait()
                fn(*args)
            except OSError as exc:
                errors.append(exc)

        ths = [
            threading.Thread(target=run, args=(os.unlink, m / "a/big2")),
            threading.Thread(target=run, args=(os.rename, m / "b/big3", m / "b/moved")),
        ]
        for th in ths:
            th.start()
        for th in ths:
            th.join(timeout=300)
        assert not errors, errors
        st, st2 = os.lstat(m / "big"), os.lstat(m / "b/moved")
        assert st.st_ino == st2.st_ino and st.st_nlink == 2 == st2.st_nlink
        assert not os.path.lexists(m / "a/big2") and not os.path.lexists(m / "b/big3")
        assert _read(m / "big") == data
        _write(m / "b/moved", b"tail\n")
        assert _read(m / "big") == data + b"tail\n"
    assert len(os.listdir(t / "work/index")) == 1
    assert os.listdir(t / "work/work") == []


def test_names_of_a_metacopy_entry_stay_one_inode(tmp_path):
    """index=on,metacopy=on: a chmod through one name of a hard-linked lower file links it up
    to a metacopy index entry. After a remount, the name still served by the entry is looked
    up first, then the linked-up one (whose data is the same lower inode under another
    name): they are one inode, and unlinking both removes the entry, as in the kernel."""
    _stack(tmp_path)
    base = tmp_path
    os.link(base / "lower/f", base / "lower/h")
    opts = f"lowerdir={base / 'lower'},upperdir={base / 'upper'},workdir={base / 'work'},index=on,metacopy=on"
    r = _mount_cmd(opts, base / "m")
    assert r.returncode == 0, r.stderr
    try:
        os.chmod(base / "m/g", 0o600)
    finally:
        _umount(base / "m")
    (entry,) = os.listdir(base / "work/index")
    assert MC in os.listxattr(base / "work/index" / entry)
    r = _mount_cmd(opts, base / "m")
    assert r.returncode == 0, r.stderr
    try:
        sf = os.lstat(base / "m/f")  # served by the index entry
        sg = os.lstat(base / "m/g")  # linked up: data below at lower/g
        assert sf.st_ino == sg.st_ino and sf.st_nlink == sg.st_nlink == 3
        os.unlink(base / "m/g")
        os.unlink(base / "m/h")
        assert os.lstat(base / "m/f").st_nlink == 1
        os.unlink(base / "m/f")
        left = os.listdir(base / "work/index")
    finally:
        _umount(base / "m")
    assert left == []


@pytest.mark.parametrize("impl", ["kernel", "subject"])
def test_metacopy_index_entry_then_write_through_another_name(tmp_path, impl):
    """index=on,metacopy=on: a chmod through one name makes a metacopy index entry (no data
    copied); a write through another name, not linked up, copies the data into that inode in
    place: every name reads it, the entry is no metacopy file any more. The same for the
    kernel and pyoverlay (each run on its own stack, compared with what the kernel does)."""
    _stack(tmp_path)
    base = tmp_path
    opts = f"lowerdir={base / 'lower'},upperdir={base / 'upper'},workdir={base / 'work'},index=on,metacopy=on"
    mount = _kernel_mount if impl == "kernel" else _mount_cmd
    r = mount(opts, base / "m")
    assert r.returncode == 0, r.stderr
    idx = base / "work/index"
    try:
        os.chmod(base / "m/f", 0o600)
        (entry,) = [n for n in os.listdir(idx) if not n.startswith("#")]
        assert MC in os.listxattr(idx / entry) and os.stat(idx / entry).st_size == 2
        assert _read(base / "m/g") == b"f\n"
        _write(base / "m/g", b"more\n")
        assert _read(base / "m/f") == b"f\nmore\n" == _read(base / "m/g")
        st_f, st_g = os.lstat(base / "m/f"), os.lstat(base / "m/g")
        assert st_f.st_ino == st_g.st_ino and st_f.st_nlink == 2
        assert oct(st_g.st_mode & 0o777) == oct(0o600)
    finally:
        _umount(base / "m")
    assert MC not in os.listxattr(idx / entry)
    assert _read(idx / entry) == b"f\nmore\n"
    assert _read(base / "lower/g") == b"f\n"
