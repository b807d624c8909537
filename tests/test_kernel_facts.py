"""Facts about the KERNEL overlay (6.18, all layers on one fs, index/xino/
redirect_dir/metacopy off) that pyoverlay has to reproduce.

These tests only mount the kernel: they pin the oracle's behaviour (so a
kernel change is noticed) and check that the stack builders produce what
the read-view tests assume.  They pass without pyoverlay.
"""

from __future__ import annotations

import os

import pytest

from helpers.oracle import UPPER_ROOT_INO

pytestmark = [pytest.mark.kernel]


def ksnap(lab, name, mode):
    stack = lab.stack(name)
    with lab.view(stack, mode, "kernel") as v:
        return v.snapshot(), stack


def real_ino(path) -> int:
    return os.lstat(path).st_ino


@pytest.mark.parametrize("mode", ["ro", "rw"])
def test_dir_nlink_and_ino(lab, mode):
    s, st = ksnap(lab, "precedence", mode)
    e = s["entries"]
    l1, l2, l3 = st.lowers
    # merged dir: nlink 1, st_ino = the topmost real dir's inode
    assert e["d"]["nlink"] == 1 and e["d"]["ino"] == real_ino(l1 / "d")
    assert e["d/deep"]["nlink"] == 2 and e["d/deep"]["ino"] == real_ino(l3 / "d/deep")
    # single-layer (pure lower) dir: its real nlink and inode
    assert e["e"]["nlink"] == 2 and e["e"]["ino"] == real_ino(l3 / "e")
    # the root is merged (nlink 1); its inode is the upper root's (rw) or the top lower's
    assert e["."]["nlink"] == 1
    assert e["."]["ino"] == (UPPER_ROOT_INO if mode == "rw" else real_ino(l1))
    # files: the real inode and nlink of the file in its layer
    assert e["same"]["ino"] == real_ino(l1 / "same")
    assert e["onlybot"]["ino"] == real_ino(l3 / "onlybot")
    assert all(r["dev_is_root_dev"] for r in e.values())


@pytest.mark.parametrize("mode", ["ro", "rw"])
def test_whiteouts_listed_only_in_non_merged_dirs(lab, mode):
    s, _ = ksnap(lab, "char_whiteouts", mode)
    e = s["entries"]
    # merged dirs: whiteouts are hidden (and hide what is below)
    for p in ("wh_file", "wh_dir", "wh_nothing_below", "mid_wh", "d/wh_in_merged", "d/mid_dir_wh", "d2/x", "wh_of_wh"):
        assert p not in e, p
    # a dir only one layer contributes to: whiteouts are LISTED but lstat ENOENT
    assert e["pure1/wh_in_pure"] == {
        "type": "listed-but-missing",
        "d_ino": e["pure1/wh_in_pure"]["d_ino"],
        "d_type": "chr",
    }
    assert e["pure2/wh_alone"]["type"] == "listed-but-missing"
    # a whiteout in a middle layer cuts the dir merge below it
    assert "revive/new" in e and "revive/old" not in e and e["revive"]["nlink"] == 2
    assert e["resurrect"]["type"] == "file"


@pytest.mark.parametrize("mode", ["ro", "rw"])
def test_opaque_dirs(lab, mode):
    s, _ = ksnap(lab, "opaque_dirs", mode)
    e = s["entries"]
    assert {"od/top", "od/mid", "od/sub/t"} <= set(e) and "od/hidden" not in e
    assert "od/sub/hidden_sub" not in e
    assert e["od"]["nlink"] == 1  # l1 + l2 merged
    assert e["od2"]["nlink"] == 2  # only the opaque l2 dir
    assert e["od3/x"]["type"] == "listed-but-missing"  # whiteout in an opaque dir
    assert "od_top/b" not in e and "od_bottom/v" in e
    assert e["opq_file"]["sha256"] and e["opq_file"]["xattrs"] == {}
    # only "y" makes a dir opaque
    assert {"opq_bad/l1", "opq_bad/l2", "opq_empty/e1", "opq_empty/e2"} <= set(e)


@pytest.mark.parametrize("name", ["xattr_whiteouts", "xattr_whiteouts_userxattr"])
def test_xattr_whiteouts(lab, name):
    s, _ = ksnap(lab, name, "ro")
    e = s["entries"]
    # opaque=x merged dir: the xattr whiteout is filtered and hides below
    assert "xd/gone" not in e and "xd/gone_dir" not in e and "xd/keep" in e
    assert "xd/bottom" in e  # opaque=x is not opaque
    # a whiteout xattr on a NON-empty file: an ordinary file, xattr hidden
    assert e["xd/not_a_whiteout"]["type"] == "file"
    assert e["xd/not_a_whiteout"]["xattrs"] == {}
    # parent without opaque=x: listed, but lookup treats it as a whiteout
    assert e["nx/gone"]["type"] == "listed-but-missing" and e["nx/gone"]["d_type"] == "file"
    assert e["nx"]["nlink"] == 1
    # opaque=x dir of a single layer: listed-but-missing too
    assert e["xonly/gone"]["type"] == "listed-but-missing"
    assert e["rootgone"]["type"] == "listed-but-missing"
    # opaque=x in the middle layer
    assert "mx/gone" not in e and {"mx/top", "mx/mid", "mx/bottom"} <= set(e)
    assert "yd/hidden" not in e
    if name.endswith("userxattr"):
        # trusted.overlay.* means nothing with userxattr, and is not hidden
        assert "tyd/b" in e and e["tyd"]["xattrs"] == {"trusted.overlay.opaque": b"y"}
        assert e["twh"]["type"] == "file"
        assert e["esc"]["xattrs"] == {
            "trusted.overlay.overlay.t": b"not escaped here",
            "user.overlay.esc": b"v",
            "user.plain": b"p",
        }


def test_escaped_xattrs(lab):
    s, _ = ksnap(lab, "xattrs", "ro")
    x = s["entries"]["f"]["xattrs"]
    assert x["trusted.overlay.esc"] == b"escaped"
    assert x["trusted.overlay.overlay.x"] == b"double"
    assert "trusted.overlay.overlay.esc" not in x
    assert x["user.overlay.opaque"] == b"y"  # not private without userxattr
    assert x["trusted.overlayfoo"] == b"not private"
    assert "user.lower" not in x
    assert s["entries"]["s"]["xattrs"] == {"trusted.overlay.s": b"esc-s", "trusted.sym": b"on a symlink"}
    assert s["entries"]["d"]["xattrs"] == {"trusted.d": b"td", "trusted.overlay.d": b"esc-d", "user.d": b"top"}


def test_dotdot_quirk_in_merged_dirs(lab):
    """'..' of a merged dir = the parent's inode in the topmost layer holding
    the dir, NOT the merged parent's st_ino."""
    s, st = ksnap(lab, "kernel_upper_as_lower", "ro")
    e = s["entries"]
    top, ku = st.lowers[0], st.lowers[1]
    assert e["cd"]["nlink"] == 1  # merged (ku + b1 + b2)
    assert e["cd"]["dotdot_d_ino"] == real_ino(ku)  # ku root, not top root
    assert e["."]["ino"] == real_ino(top)
    # pure lower dirs read straight from a layer: '..' is the merged parent
    s2, st2 = ksnap(lab, "precedence", "ro")
    assert s2["entries"]["e"]["dotdot_d_ino"] == s2["entries"]["."]["ino"]
    assert s2["entries"]["."]["dotdot_d_ino"] == real_ino(st2.lowers[0].parent)


def test_kernel_upper_used_as_lower(lab):
    """origin xattrs in a LOWER layer are not used for st_ino: objects report
    their own inode in the layer holding them."""
    s, st = ksnap(lab, "kernel_upper_as_lower", "ro")
    e = s["entries"]
    ku = st.lowers[1]
    for p in ("d", "d/g", "mv2", "cd", "h1", "slink"):
        assert e[p]["ino"] == real_ino(ku / p), p
    assert "f" not in e and "both" not in e and "rmdir_me" not in e
    assert sorted(n for n in e if n.startswith("rmr")) == ["rmr", "rmr/new", "rmr/top"]
    assert ("d/sub/s", "slink") in s["hardlinks"]
    assert e["emptyme"]["type"] == "dir" and not [p for p in e if p.startswith("emptyme/")]


def test_single_layer_dir_with_origin_hides_its_whiteouts(lab):
    """In a dir that only one layer contributes to, whiteouts are listed --
    unless that dir carries an overlay.origin xattr (kernel-written upper used
    as the bottom lower): then it is read like a merged dir and whiteouts are
    hidden.  Its nlink stays the real one."""
    s, st = ksnap(lab, "kernel_upper_alone", "ro")
    e = s["entries"]
    ku = st.lowers[1]
    assert os.getxattr(ku / "emptyme", "trusted.overlay.origin")
    assert sorted(os.listdir(ku / "emptyme")) == ["a", "b"]  # two whiteouts on disk
    assert not [p for p in e if p.startswith("emptyme/")]
    assert e["emptyme"]["nlink"] == 2
    # an opaque dir without origin (rm -r + mkdir) is read straight
    assert e["rmr"]["type"] == "dir"


def test_kernel_upper_as_upper(lab):
    """With an upper written by the kernel: copied-up objects report the
    ORIGIN (lower) inode when the lower file had nlink 1; a copy-up of a
    hard-linked lower file reports the upper inode; dirs made by mkdir
    (incl. opaque ones) report the upper inode and their real nlink."""
    s, st = ksnap(lab, "kernel_upper", "upper")
    e = s["entries"]
    ku, b1, b2 = st.upper, st.lowers[0], st.lowers[1]
    assert e["d/g"]["ino"] == real_ino(b2 / "d/g") != real_ino(ku / "d/g")
    assert e["mv2"]["ino"] == real_ino(b2 / "mv")
    assert e["cd"]["ino"] == real_ino(b1 / "cd") and e["cd"]["nlink"] == 1
    assert e["h1"]["ino"] == real_ino(ku / "h1")  # lower had nlink 2
    assert e["h2"]["ino"] == real_ino(b2 / "h2") and e["h2"]["nlink"] == 2
    assert e["rmr"]["ino"] == real_ino(ku / "rmr") and e["rmr"]["nlink"] == 2
    assert e["newd"]["ino"] == real_ino(ku / "newd")
    assert e["fifo"]["ino"] == real_ino(ku / "fifo")
    assert e["slink"]["ino"] == e["d/sub/s"]["ino"] == real_ino(b2 / "d/sub/s")
    assert e["slink"]["nlink"] == 2
    assert e["."]["ino"] == real_ino(ku)
    assert e["xa"]["xattrs"] == {"user.added": b"via overlay"}


def test_handmade_upper(lab):
    s, st = ksnap(lab, "handmade_upper", "upper")
    e = s["entries"]
    up, l1 = st.upper, st.lowers[0]
    assert "d/a" not in e and {"d/b", "d/c", "d/u"} <= set(e)
    assert e["od/wh_inside"]["type"] == "listed-but-missing"  # opaque upper dir: straight
    assert "od/hidden" not in e
    # an xattr whiteout in an UPPER opaque=x dir hides the lower entry on lookup
    # but is still LISTED (readdir filters xattr whiteouts only in lower layers)
    assert e["xd/gone"]["type"] == "listed-but-missing" and "xd/keep" in e
    assert "wd" not in e and e["file_over"]["type"] == "file"
    assert e["pure_upper/wh_nothing"]["type"] == "listed-but-missing"
    assert e["esc"]["xattrs"] == {"trusted.overlay.k": b"v", "user.u": b"u"}
    # after priming, the merge dir d carries an origin and reports the lower inode
    assert os.getxattr(up / "d", "trusted.overlay.origin")
    assert e["d"]["ino"] == real_ino(l1 / "d") and e["d"]["nlink"] == 1
    assert e["od"]["ino"] == real_ino(up / "od") and e["od"]["nlink"] == 2


def test_names_with_odd_bytes_and_long_names(lab):
    s, _ = ksnap(lab, "odd_names", "ro")
    e = s["entries"]
    for n in (b"new\nline", b"\xff\xfenon-utf8", b".wh.foo", b".wh..wh..opq"):
        assert os.fsdecode(n) in e
    assert os.fsdecode(b"wh \xff") not in e
    s, _ = ksnap(lab, "long_names", "ro")
    assert "f" * 255 in s["entries"] and "w" * 255 not in s["entries"]
    assert s["entries"]["s" * 255]["target"] == b"t" * 4095


def test_deep_paths(lab):
    s, st = ksnap(lab, "deep_paths", "ro")
    for p in st.notes["deep_files"]:
        assert len(os.fsencode(p)) == 4095
        assert s["entries"][p]["type"] == "file"
    assert not s["problems"]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_big_dir_kernel(lab):
    s, _ = ksnap(lab, "big_dir", "ro")
    names = [p for p in s["entries"] if p.startswith("big/")]
    assert len(names) == 99_900


def test_upper_xattr_whiteouts_are_listed_and_workdir_extras_kept(tmp_path):
    """Why a rootless mount never falls back to xattr whiteouts in its upper (docs/rootless.md):
    in an UPPER layer the kernel hides an ``overlay.whiteout`` file on lookup but readdir
    still lists it, even in a directory marked ``opaque=x``. And why the xattr form can be
    recorded in the workdir: the kernel leaves entries other than work/ alone."""
    from helpers.mounts import KernelOverlay

    lo, up, wk = tmp_path / "lo", tmp_path / "up", tmp_path / "wk"
    for d in (lo / "d", up / "d", wk):
        d.mkdir(parents=True)
    for p in (lo / "a", lo / "d" / "c"):
        p.write_text("lower\n")
    for p in (up / "a", up / "d" / "c"):
        p.touch()
        os.setxattr(p, "user.overlay.whiteout", b"y")
    os.setxattr(up / "d", "user.overlay.opaque", b"x")
    (wk / "pyoverlay.json").write_text('{"userxattr": true}\n')
    mnt = tmp_path / "mnt"
    with KernelOverlay([lo], mnt, upper=up, workdir=wk, options=["userxattr"]):
        assert sorted(os.listdir(mnt)) == ["a", "d"]  # readdir: listed
        assert os.listdir(mnt / "d") == ["c"]
        for name in ("a", "d/c"):
            assert not os.path.lexists(mnt / name), name  # lookup: hidden
        # (listed again after the lookups: "a" is then hidden, "d/c" still shown)
        assert sorted(os.listdir(mnt)) == ["d"] and os.listdir(mnt / "d") == ["c"]
    assert sorted(os.listdir(wk)) == ["pyoverlay.json", "work"]
    assert (wk / "pyoverlay.json").read_text() == '{"userxattr": true}\n'
