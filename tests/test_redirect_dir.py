"""redirect_dir=on: a directory with lower content (lower-only or merged) is renamed by
writing ``overlay.redirect`` on its copied-up upper dir, compared with the kernel overlay
mounted with the same option (docs/semantics.md, "redirect_dir"): results, merged view
and upper (the redirect xattrs, whiteouts) after each kind of rename; each side's upper
remounted by the other; the option's rules (userxattr, the module's defaults).

Both engines: run with PYOVERLAY_ENGINE=direct and =pyfuse3.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

from helpers.snapshot import diff_snapshots, format_diff
from helpers.stacks import T0, T1, T2, D, F, L
from helpers.writeops import RENAME_EXCHANGE, RENAME_NOREPLACE, Recorder, renameat2, run_pair
from overlayfs_py import features
from overlayfs_py.config import ConfigError, build_config, parse_options

RX = "trusted.overlay.redirect"


def _layers():
    l1 = {
        "md": D(mtime_ns=T1),  # merged dir (l1 + l2)
        "md/top": F(b"top\n"),
        "md/inner": D(mtime_ns=T2),
        "md/inner/t": F(b"inner top\n"),
    }
    l2 = {
        "ld": D(mode=0o750, uid=1234, mtime_ns=T0),  # lower-only
        "ld/f": F(b"in lower dir\n", mtime_ns=T1, xattrs={"user.k": b"v"}),
        "ld/sub/g": F(b"g\n", mtime_ns=T2),
        "ld/sym": L("f", mtime_ns=T1),
        "md/bottom": F(b"bottom\n"),
        "md/inner/b": F(b"inner bottom\n"),
        "a/b/deep/x": F(b"deep x\n"),
        "a/b/deep/y/z": F(b"deep z\n"),
        "q": D(mtime_ns=T0),  # a target parent
        "tw/f": F(b"twice\n"),  # renamed twice
        "back/f": F(b"back\n"),  # renamed and back
        "ov/f": F(b"over an empty dir\n"),  # renamed over an empty lower dir
        "empty": D(mtime_ns=T1),
        "old/f": F(b"old\n"),  # renamed, then its old name reused
        "nest/in/f": F(b"nested\n"),  # contains a renamed dir
        "nest/g": F(b"nest g\n"),
        "anc/child/f": F(b"below a renamed parent\n"),  # moved out of a renamed parent
        "x1/f": F(b"x1\n"),  # exchanged with x2
        "x2/f": F(b"x2\n"),
        "wr/f": F(b"written after the rename\n"),
        "mvd/sub/f": F(b"mv\n"),
        "nr": D(),
        "nr/f": F(b"noreplace\n"),
        # absolute redirects of 257 and 256 bytes: the module's redirect_max is 256
        f"{LONG[0]}/{LONG[1]}/{LONG[2]}x/f": F(b"too long\n"),
        f"{LONG[0]}/{LONG[1]}/{LONG[2]}/f": F(b"just fits\n"),
    }
    return [l1, l2]


LONG = ("L" * 100, "M" * 100, "N" * 53)


def _read(p):
    with open(p, "rb") as f:
        return f.read()


def _ls(p):
    return sorted(os.listdir(p))


def _write(p, data):
    with open(p, "ab") as f:
        f.write(data)


def _ops(m, rec):
    rec.do("lower-only same parent", os.rename, m / "ld", m / "ld2")
    rec.do("ls ld2", _ls, m / "ld2")
    rec.do("ls ld2/sub", _ls, m / "ld2/sub")
    rec.do("read ld2/f", _read, m / "ld2/f")
    rec.do("stat ld2", os.lstat, m / "ld2")
    rec.do("stat ld", os.lstat, m / "ld")
    rec.do("merged other parent", os.rename, m / "md", m / "q/md2")
    rec.do("ls q/md2", _ls, m / "q/md2")
    rec.do("read q/md2/bottom", _read, m / "q/md2/bottom")
    rec.do("ls q/md2/inner", _ls, m / "q/md2/inner")
    rec.do("stat md", os.lstat, m / "md")
    rec.do("deep", os.rename, m / "a/b/deep", m / "q/deep2")
    rec.do("ls q/deep2/y", _ls, m / "q/deep2/y")
    rec.do("ls a/b", _ls, m / "a/b")
    rec.do("twice 1", os.rename, m / "tw", m / "tw2")
    rec.do("twice 2", os.rename, m / "tw2", m / "q/tw3")
    rec.do("read q/tw3/f", _read, m / "q/tw3/f")
    rec.do("back 1", os.rename, m / "back", m / "back2")
    rec.do("back 2", os.rename, m / "back2", m / "back")
    rec.do("read back/f", _read, m / "back/f")
    rec.do("over empty dir", os.rename, m / "ov", m / "empty")
    rec.do("ls empty", _ls, m / "empty")
    rec.do("old rename", os.rename, m / "old", m / "old2")
    rec.do("rmdir old", os.rmdir, m / "old")
    rec.do("mkdir old", os.mkdir, m / "old")
    rec.do("create old/n", _write, m / "old/n", b"new\n")
    rec.do("ls old", _ls, m / "old")
    rec.do("ls old2", _ls, m / "old2")
    rec.do("nest inner", os.rename, m / "nest/in", m / "nest/in2")
    rec.do("nest outer", os.rename, m / "nest", m / "q/nest2")
    rec.do("ls q/nest2", _ls, m / "q/nest2")
    rec.do("read q/nest2/in2/f", _read, m / "q/nest2/in2/f")
    rec.do("anc rename", os.rename, m / "anc", m / "anc2")
    rec.do("child out of anc2", os.rename, m / "anc2/child", m / "q/child2")
    rec.do("read q/child2/f", _read, m / "q/child2/f")
    rec.do("exchange", renameat2, m / "x1", m / "x2", RENAME_EXCHANGE)
    rec.do("read x1/f", _read, m / "x1/f")
    rec.do("read x2/f", _read, m / "x2/f")
    rec.do("read wr/f first", _read, m / "wr/f")  # known to the server before the rename
    rec.do("wr rename", os.rename, m / "wr", m / "q/wr2")
    rec.do("write q/wr2/f", _write, m / "q/wr2/f", b"appended\n")
    rec.do("read q/wr2/f", _read, m / "q/wr2/f")
    rec.do("noreplace", renameat2, m / "nr", m / "q/nr2", RENAME_NOREPLACE)
    rec.do("rmdir renamed non-empty", os.rmdir, m / "q/nr2")
    rec.do("unlink in renamed", os.unlink, m / "q/nr2/f")
    rec.do("rmdir renamed emptied", os.rmdir, m / "q/nr2")
    rec.do("mv", lambda: subprocess.run(["mv", str(m / "mvd"), str(m / "q/mvd2")], capture_output=True).returncode)
    rec.do("ls q/mvd2/sub", _ls, m / "q/mvd2/sub")
    rec.do("mkdir in a merged dir", os.mkdir, m / "q/newdir")
    deep = m / LONG[0] / LONG[1]
    rec.do("redirect longer than redirect_max", os.rename, deep / (LONG[2] + "x"), m / "q/long")
    rec.do("redirect of redirect_max bytes", os.rename, deep / LONG[2], m / "q/fits")
    rec.do("read q/fits/f", _read, m / "q/fits/f")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return run_pair(tmp_path_factory.mktemp("redirect"), _layers(), _ops, remount=True, options=["redirect_dir=on"])


def _rx(run, p):
    return (run.kupper(p) or {}).get("xattrs", {}).get(RX)


def test_results_match_the_kernel(run):
    k = run.k.results
    assert k["redirect longer than redirect_max"] == "ERR:EXDEV" and k["redirect of redirect_max bytes"] == "OK"
    assert k["lower-only same parent"] == "OK" and k["merged other parent"] == "OK"
    assert k["stat ld"] == "ERR:ENOENT" and k["rmdir renamed non-empty"] == "ERR:ENOTEMPTY"
    run.assert_results()


def test_redirects_written_as_the_kernel(run):
    """Relative (same parent), absolute (elsewhere), updated on the second rename, kept on
    a rename back; whiteouts at the old names; the same upper as the kernel's."""
    assert _rx(run, "ld2") == b"ld" and _rx(run, "q/md2") == b"/md" and _rx(run, "q/deep2") == b"/a/b/deep"
    assert _rx(run, "q/tw3") == b"/tw" and _rx(run, "back") == b"back"
    assert _rx(run, "q/nest2") == b"/nest" and _rx(run, "q/nest2/in2") == b"in"
    assert _rx(run, "anc2") == b"anc" and _rx(run, "q/child2") == b"/anc/child"  # via the parent's
    run.assert_upper()


def test_new_dir_in_merged_dir_is_opaque(run):
    """ovl_create_upper: with redirect_dir=on (no offline changes to the lowers allowed) a
    new directory in a merged one is made opaque."""
    assert run.kupper("q/newdir")["xattrs"].get("trusted.overlay.opaque") == b"y"
    run.assert_upper("q/newdir")


def test_view_matches_the_kernel(run):
    run.assert_view()
    run.assert_workdirs()


def test_remount_stable(run):
    run.assert_remount_stable()


def _cross(run, src, impl, options=("redirect_dir=on",)):
    """A mount by *impl* of the upper *src* side wrote (fresh workdir): its view."""
    side = src.side
    saved = side.options
    side.options = list(options)
    try:
        with side.mount(impl, workdir=side.fresh_workdir()) as m:
            return side.view(m)
    finally:
        side.options = saved


def test_each_mounts_the_others_upper(run):
    """pyoverlay mounts the kernel's upper and the kernel pyoverlay's: the same view."""
    run._need(run.k, "the remount")
    run._need(run.s, "the remount")
    for src, impl in ((run.k, "subject"), (run.s, "kernel")):
        view = _cross(run, src, impl)
        d = diff_snapshots(run.k.remount_view, view, a_name="kernel", b_name=f"{impl} on {src.impl}'s upper")
        assert not d, format_diff(d, f"{impl} on the {src.impl}'s upper:")


@pytest.mark.parametrize("mode", ["follow", "off"])
def test_follow_mount_reads_redirects(run, mode):
    """redirect_dir=follow (the module default here), and off (follow, as the module's
    redirect_always_follow is Y here), on an upper with redirects: the same view as the
    kernel's mount with that option."""
    kv = _cross(run, run.k, "kernel", (f"redirect_dir={mode}",))
    sv = _cross(run, run.s, "subject", (f"redirect_dir={mode}",))
    d = diff_snapshots(kv, sv, a_name="kernel", b_name="pyoverlay")
    assert not d, format_diff(d, "redirect_dir=follow views differ:")


@pytest.mark.parametrize("mode", ["follow", "off"])
def test_follow_mount_reads_the_others_redirects(run, mode):
    """redirect_dir=follow and off across: the kernel on pyoverlay's upper and pyoverlay on
    the kernel's, each the view of the kernel's mount of its own upper with that option."""
    kv = _cross(run, run.k, "kernel", (f"redirect_dir={mode}",))
    for src, impl in ((run.s, "kernel"), (run.k, "subject")):
        view = _cross(run, src, impl, (f"redirect_dir={mode}",))
        d = diff_snapshots(kv, view, a_name="kernel", b_name=f"{impl} on {src.impl}'s upper")
        assert not d, format_diff(d, f"redirect_dir={mode}: {impl} on the {src.impl}'s upper:")


def _ops_without_redirects(m, rec):
    """Writes by a mount that does not create redirects, on an upper that holds them."""
    rec.do("rename a redirected dir", os.rename, m / "q/md2", m / "q/md3")
    rec.do("rename a renamed lower-only dir", os.rename, m / "ld2", m / "ld3")
    rec.do("rename a dir below a redirected one", os.rename, m / "q/nest2/in2", m / "q/nest2/in3")
    rec.do("rename a new dir", os.rename, m / "q/newdir", m / "q/newdir2")
    rec.do("append to a lower file below a redirect", _write, m / "q/md2/bottom", b"more\n")
    rec.do("read it", _read, m / "q/md2/bottom")
    rec.do("create in a redirected dir", _write, m / "q/md2/n", b"n\n")
    rec.do("unlink below a redirect", os.unlink, m / "q/deep2/x")
    rec.do("rmdir a redirected non-empty dir", os.rmdir, m / "q/tw3")
    rec.do("rename a file out of a redirected dir", os.rename, m / "q/tw3/f", m / "tw3f")
    rec.do("rmdir it emptied", os.rmdir, m / "q/tw3")
    rec.do("mkdir where it was", os.mkdir, m / "q/tw3")
    rec.do("ls q/tw3", _ls, m / "q/tw3")
    rec.do("ls q/md2", _ls, m / "q/md2")
    rec.do("ls q", _ls, m / "q")
    rec.do("ls /", _ls, m)


@pytest.mark.parametrize("mode", ["follow", "off", "nofollow"])
def test_writes_without_redirects_on_the_others_upper(run, tmp_path, mode):
    """A mount with redirect_dir=follow, off or nofollow writing on an upper with
    redirects, each side on a copy of the other's upper and of its own: the same results
    (EXDEV for a directory that would need a redirect, EPERM where nofollow refuses to
    follow one) and the same tree as the kernel's on a copy of the same upper."""
    outcomes = {}
    for src in (run.k, run.s):
        run._need(src, "the upper")
        for impl in ("kernel", "subject"):
            copy = tmp_path / f"{src.impl}-upper-by-{impl}"
            subprocess.run(["cp", "-a", str(src.side.upper), str(copy)], check=True)
            side = src.side
            saved = side.upper, side.options
            side.upper, side.options = copy, [f"redirect_dir={mode}"]
            rec = Recorder(side.t_start)
            try:
                with side.mount(impl, workdir=side.fresh_workdir()) as m:
                    _ops_without_redirects(m.path, rec)
                    tree = _try(lambda: _tree(m.path))
            finally:
                side.upper, side.options = saved
            outcomes[(src.impl, impl)] = (rec.results, tree)
    k_results, k_tree = outcomes[("kernel", "kernel")]
    if mode != "nofollow":
        assert k_results["rename a redirected dir"] == "ERR:EXDEV"
        assert k_results["rename a new dir"] == "OK"
    else:
        assert k_results["rename a redirected dir"] == "ERR:EPERM"
    for (src, impl), (results, tree) in outcomes.items():
        what = f"redirect_dir={mode}: {impl} on a copy of the {src}'s upper"
        diff = [
            f"{k}: kernel {k_results[k]!r}, {impl} {results.get(k)!r}"
            for k in k_results
            if results.get(k) != k_results[k]
        ]
        assert not diff, format_diff(diff, f"{what}: results differ from the kernel on its own upper:")
        assert tree == k_tree, f"{what}: the tree differs from the kernel's"


# --- without redirect_dir=on: EXDEV, as before ------------------------------------------------


def _exdev_ops(m, rec):
    rec.do("lower dir", os.rename, m / "ld", m / "ld2")
    rec.do("merged dir", os.rename, m / "md", m / "q/md2")


@pytest.mark.parametrize("mode", ["follow", "nofollow", "off"])
def test_other_modes_refuse_with_exdev(tmp_path, mode):
    run = run_pair(tmp_path, _layers(), _exdev_ops, options=[f"redirect_dir={mode}"])
    assert run.k.results["lower dir"] == "ERR:EXDEV"
    run.assert_results()
    run.assert_upper()


# --- the options ------------------------------------------------------------------------------


def test_parse_values():
    for v in ("on", "follow", "nofollow", "off"):
        assert parse_options([f"redirect_dir={v}"])["redirect_dir"] == v
    with pytest.raises(ConfigError, match="expected on|follow|nofollow|off"):
        parse_options(["redirect_dir=yes"])
    with pytest.raises(ConfigError, match="needs a value"):
        parse_options(["redirect_dir"])


def _params(tmp_path, redirect_dir, always_follow):
    d = tmp_path / "params"
    d.mkdir(exist_ok=True)
    (d / "redirect_dir").write_text(redirect_dir + "\n")
    (d / "redirect_always_follow").write_text(always_follow + "\n")
    return str(d)


def test_defaults_from_the_module_parameters(tmp_path):
    """ovl_redirect_mode_def, and off -> follow/nofollow by redirect_always_follow."""
    assert features.redirect_default(_params(tmp_path, "Y", "N")) == "on"
    assert features.redirect_default(_params(tmp_path, "N", "Y")) == "follow"
    assert features.redirect_default(_params(tmp_path, "N", "N")) == "nofollow"
    assert features.effective_redirect("off", False, params_dir=_params(tmp_path, "Y", "Y")) == "follow"
    assert features.effective_redirect("off", False, params_dir=_params(tmp_path, "Y", "N")) == "nofollow"
    assert features.effective_redirect("", True, params_dir=_params(tmp_path, "Y", "Y")) == "nofollow"
    machine = features.redirect_default()  # this machine's module (redirect_dir=N here: not on)
    assert machine == ("on" if features.module_param("redirect_dir", "N") == "Y" else machine)


def _stack(tmp_path):
    for d in ("l", "u", "m"):
        (tmp_path / d).mkdir()
    return str(tmp_path / "l"), str(tmp_path / "u"), str(tmp_path / "m")


@pytest.mark.parametrize("mode", ["on", "follow", "off"])
def test_userxattr_conflicts_as_the_kernel(tmp_path, mode):
    """The kernel refuses userxattr with any redirect_dir but nofollow (EINVAL)."""
    low, up, mnt = _stack(tmp_path)
    with pytest.raises(ConfigError, match=f"conflicting options: userxattr,redirect_dir={mode}"):
        build_config(low, up, mnt, options=[f"userxattr,redirect_dir={mode}"])
    kernel = subprocess.run(
        ["mount", "-t", "overlay", "ov", "-o", f"lowerdir={low},upperdir={up},workdir={tmp_path}/w,userxattr,"
         f"redirect_dir={mode}", mnt],
        capture_output=True,
    )  # fmt: skip
    if kernel.returncode == 0:
        subprocess.run(["umount", mnt], check=True)
    assert kernel.returncode != 0


def test_userxattr_nofollow_accepted(tmp_path):
    low, up, mnt = _stack(tmp_path)
    cfg = build_config(low, up, mnt, options=["userxattr,redirect_dir=nofollow"])
    assert cfg.redirect_dir == "nofollow" and not features.creates_redirects(cfg)
    cfg = build_config(low, up, mnt, options=["userxattr"])
    assert cfg.redirect_dir == "nofollow"
    cfg = build_config(low, up, mnt, options=["nouserxattr,redirect_dir=on"])
    assert cfg.redirect_dir == "on" and features.creates_redirects(cfg)


def test_cli_refusal_is_one_line(tmp_path):
    low, up, mnt = _stack(tmp_path)
    r = subprocess.run(
        [sys.executable, "-m", "overlayfs_py", "mount", "-o", "userxattr,redirect_dir=on", low, up, mnt],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2, r
    assert "conflicting options: userxattr,redirect_dir=on" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_mounts_shows_the_mode(tmp_path):
    """`pyoverlay mounts` shows the effective mode (the text form only when it is not the
    module's default, as the kernel's mount options)."""
    low, up, mnt = _stack(tmp_path)
    env = dict(os.environ, PYOVERLAY_STATE_DIR=str(tmp_path / "state"), XDG_RUNTIME_DIR=str(tmp_path / "state"))
    py = [sys.executable, "-m", "overlayfs_py"]
    subprocess.run([*py, "mount", "-o", "redirect_dir=on", low, up, mnt], check=True, env=env, capture_output=True)
    try:
        out = subprocess.run([*py, "mounts", "--json"], check=True, env=env, capture_output=True, text=True).stdout
        text = subprocess.run([*py, "mounts"], check=True, env=env, capture_output=True, text=True).stdout
    finally:
        subprocess.run([*py, "umount", mnt], check=True, env=env, capture_output=True)
    import json

    (m,) = [x for x in json.loads(out) if x["mountpoint"] == mnt]
    assert m["redirect_dir"] == "on"
    if features.redirect_default() != "on":
        assert "redirect_dir=on" in text


def _impure_dirs(upper):
    found = set()
    for dirpath, _dirs, _files in os.walk(upper):
        try:
            os.getxattr(dirpath, "trusted.overlay.impure")
        except OSError:
            continue
        found.add(os.path.relpath(dirpath, upper))
    return found


def test_impure_as_the_kernel(run):
    """overlay.impure on the same upper dirs (the snapshots leave it out): the new parents
    of moved directories with an origin, the parents of copied-up ones."""
    run._need(run.s, "the upper")
    kernel = _impure_dirs(run.k.side.upper)
    assert {"q", "q/nest2"} <= kernel
    assert _impure_dirs(run.s.side.upper) == kernel


# --- diff and commit: an OCI layer has no redirects --------------------------------------------


def _tree(root):
    """{path: (type, mode, uid, gid, content or target)} of a directory tree (no xattrs)."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                body = os.readlink(p)
            elif os.path.isfile(p):
                body = _read(p)
            else:
                body = None
            out[rel] = (st.st_mode, st.st_uid, st.st_gid, body)
    return out


@pytest.mark.parametrize("side", ["k", "s"])
def test_layer_tar_writes_redirected_dirs_in_full(run, tmp_path, side):
    """The upper (the kernel's or pyoverlay's) as a layer tar, with its lowers: extracted
    and stacked on the lowers (a kernel overlay, no redirect anywhere), it shows the same
    tree as a kernel mount of the upper with redirect_dir=on."""
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
    with open(tmp_path / "refused.tar", "wb") as f, pytest.raises(ImageError, match="renamed by redirect"):
        write_layer(str(sr.side.upper), f)
    layer = tmp_path / "layer"
    layer.mkdir()
    with open(tar, "rb") as f:
        extract(f, str(layer), XattrNames())
    with KernelOverlay([layer, *lowers], tmp_path / "flat") as m:
        flat = _tree(m.path)
    with KernelOverlay(
        lowers, tmp_path / "orig", upper=sr.side.upper, workdir=sr.side.fresh_workdir(), options=["redirect_dir=on"]
    ) as m:
        orig = _tree(m.path)
    assert "q/md2/bottom" in orig and "ld2/sub/g" in orig
    assert flat == orig


@pytest.mark.parametrize("side", ["k", "s"])
def test_diff_reports_a_deletion_and_a_full_new_dir(run, side):
    from overlayfs_py.diff import diff

    sr = getattr(run, side)
    run._need(sr, "the upper")
    got = {str(c) for c in diff(str(sr.side.upper), [str(p) for p in sr.side.lowers])}
    for line in ("D /ld", "A /ld2", "A /ld2/f", "A /ld2/sub", "A /ld2/sub/g", "A /ld2/sym"):
        assert line in got, (line, sorted(got))
    for line in ("D /md", "A /q/md2", "A /q/md2/top", "A /q/md2/bottom", "A /q/md2/inner/b", "C /q"):
        assert line in got, (line, sorted(got))
    assert "D /empty" in got and "A /empty/f" in got  # renamed over an empty lower dir
    assert "A /q/nest2/in2/f" in got and "A /q/nest2/g" in got


def test_nofollow_mount_refuses_redirects(run):
    """redirect_dir=nofollow on an upper with redirects: a lookup that would follow one is
    EPERM, as the kernel's ("refusing to follow redirect"), on the kernel's upper and on
    pyoverlay's."""
    from helpers.snapshot import snapshot

    def look(src, impl):
        side = src.side
        saved, side.options = side.options, ["redirect_dir=nofollow"]
        out = {}
        try:
            with side.mount(impl, workdir=side.fresh_workdir()) as m:
                for p in ("ld2", "q/md2", "back", "q/nest2", "x1", "old", "b_missing"):
                    try:
                        st = os.lstat(m.path / p)
                        out[p] = "dir" if os.path.isdir(m.path / p) else st.st_mode
                    except OSError as e:
                        out[p] = e.errno
                out["ls /"] = _try(lambda: _ls(m.path))
                out["ls a/b"] = _try(lambda: _ls(m.path / "a/b"))
                out["snapshot"] = sorted(snapshot(m.path)["entries"]) if out["ls /"] != 1 else None
        finally:
            side.options = saved
        return out

    kernel = look(run.k, "kernel")
    assert kernel["ld2"] == 1 and kernel["old"] == "dir"  # EPERM; a plain dir is fine
    assert look(run.k, "subject") == kernel
    assert look(run.s, "subject") == kernel


def _try(fn):
    try:
        return fn()
    except OSError as e:
        return e.errno


# --- check, and a server killed in the middle of redirect renames ------------------------------


@pytest.mark.parametrize("side", ["k", "s"])
def test_check_finds_the_upper_clean(run, side):
    """`pyoverlay check` judges the redirects either side wrote as consistent."""
    sr = getattr(run, side)
    run._need(sr, "the upper")
    lowers = ":".join(str(p) for p in sr.side.lowers)
    r = subprocess.run(
        [sys.executable, "-m", "overlayfs_py", "check", "--lower", lowers, "--workdir", str(sr.side.workdir),
         str(sr.side.upper)],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert r.returncode == 0 and "clean" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("engine", ["direct", "pyfuse3"])
def test_sigkill_during_redirect_renames(tmp_path, engine):
    """Four threads renaming 600 lower directories by redirect (within their parent, to
    another one) when the server is killed: the next pyoverlay mount and the kernel's (the
    same view, read-write) show each directory, with its lower content, at its old or its
    new name, never at both and never lost."""
    from test_faults import DEAD, Workers, _dead_mount_checks, _kill_when

    from helpers import mounts
    from helpers.faults import remount_and_compare

    lower, upper, workdir = tmp_path / "lower", tmp_path / "upper", tmp_path / "workdir"
    upper.mkdir()
    workdir.mkdir()
    (lower / "b").mkdir(parents=True)
    n = 600
    for i in range(n):
        (lower / "a" / f"d{i}" / "sub").mkdir(parents=True)
        (lower / "a" / f"d{i}" / "sub" / "f").write_bytes(b"dir %d\n" % i)

    def dest(i: int) -> str:
        return f"a/e{i}" if i % 2 else f"b/e{i}"

    opts = [f"engine={engine}", "redirect_dir=on"]
    with mounts.PyoverlayMount(
        [lower], tmp_path / "mnt", upper=upper, workdir=workdir, options=opts, log_path=tmp_path / "srv.log"
    ) as m:
        jobs = [
            [(i, lambda i=i: os.rename(m.path / "a" / f"d{i}", m.path / dest(i))) for i in range(n) if i % 4 == k]
            for k in range(4)
        ]
        w = Workers(jobs)
        w.start()
        _kill_when(m, lambda: w.count >= 150, "redirect renames")
        assert w.join(60), "renames are still blocked 60 s after the server was killed"
        assert w.inflight, "the renames all finished before the kill: nothing was tested"
        assert set(w.errors.values()) <= DEAD, f"renames got {w.errors}"
        _dead_mount_checks(m)
    view = remount_and_compare([lower], upper, workdir, tmp_path, engine)
    done, inflight = set(w.done), set(w.inflight.values())
    for i in range(n):
        data = b"dir %d\n" % i
        want = ("file", len(data), hashlib.sha256(data).hexdigest())
        here = [p for p in (f"a/d{i}", dest(i)) if view.get(f"{p}/sub/f") is not None]
        assert len(here) == 1, f"directory {i}: found at {here}"
        assert view[f"{here[0]}/sub/f"] == want, f"directory {i}: {view[f'{here[0]}/sub/f']}"
        if i in done:
            assert here == [dest(i)], f"rename {i} (done before the kill) is at {here}"
        elif i not in inflight:
            assert here == [f"a/d{i}"], f"directory {i} was never renamed but is at {here}"


# --- the option rules, against the kernel ------------------------------------------------------


def _kernel_shows(tmp_path, opts: list[str], upper: bool = True):
    """Mount a kernel overlay with *opts*: the feature options /proc/mounts shows, or
    "EINVAL" when the mount is refused."""
    import tempfile

    base = tempfile.mkdtemp(dir=tmp_path)
    for d in ("l1", "l2", "u", "w", "m"):
        os.mkdir(os.path.join(base, d))
    spec = f"lowerdir={base}/l1:{base}/l2" + (f",upperdir={base}/u,workdir={base}/w" if upper else "")
    argv = ["mount", "-t", "overlay", "ov", "-o", ",".join([spec, *opts]), f"{base}/m"]
    r = subprocess.run(argv, capture_output=True)
    if r.returncode != 0:
        return "EINVAL"
    try:
        with open("/proc/self/mounts") as f:
            line = next(x for x in f if x.split()[1] == f"{base}/m")
    finally:
        subprocess.run(["umount", f"{base}/m"], check=True)
    keys = ("redirect_dir", "metacopy", "index", "nfs_export")
    return {k: v for k, _, v in (o.partition("=") for o in line.split()[3].split(",")) if k in keys}


def _shown(res: features.Resolved) -> dict:
    """What the kernel's ovl_show_options prints for *res*: the values not the default."""
    d = features.defaults()
    out = {}
    if res.redirect_dir != d.redirect_dir:
        out["redirect_dir"] = res.redirect_dir
    for k in ("index", "nfs_export", "metacopy"):
        if getattr(res, k) != getattr(d, k):
            out[k] = "on" if getattr(res, k) else "off"
    return out


def test_option_rules_match_the_kernel(tmp_path):
    """features.verify (ovl_parse_param + ovl_fs_params_verify) against the kernel: every
    combination of redirect_dir, metacopy, index, nfs_export and userxattr, with an upper
    layer, and the redirect modes without one: the same refusals (EINVAL) and the same
    resulting options."""
    import itertools

    cases = []
    for rd, mc, ix, nf, ux in itertools.product(
        (None, "on", "follow", "nofollow", "off"), (None, True, False), (None, True, False), (None, True, False), (0, 1)
    ):
        cases.append(features.Asked(rd, mc, ix, nf, None, bool(ux), True))
    for rd, mc in itertools.product((None, "on", "follow", "nofollow", "off"), (None, True)):
        cases.append(features.Asked(rd, mc, upper=False))
    bad = []
    for a in cases:
        opts = [f"redirect_dir={a.redirect_dir}"] if a.redirect_dir else []
        for k in ("metacopy", "index", "nfs_export"):
            v = getattr(a, k)
            if v is not None:
                opts.append(f"{k}={'on' if v else 'off'}")
        opts += ["userxattr"] if a.userxattr else []
        try:
            want = _shown(features.verify(a))
        except features.FeatureConflict:
            want = "EINVAL"
        got = _kernel_shows(tmp_path, opts, upper=a.upper)
        if got != want:
            bad.append(f"{','.join(opts) or '(none)'}{'' if a.upper else ' (no upper)'}: kernel {got}, verify {want}")
    assert not bad, "\n".join(bad[:30]) + f"\n({len(bad)} of {len(cases)})"
