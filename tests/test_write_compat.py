"""Cross-compatibility of upper layers (semantics.md row 73):

* an upper written through the subject, unmounted, then mounted by the
  KERNEL (same lowers + upper, fresh workdir) must show exactly the view
  the subject showed before unmount;
* the reverse: an upper written through the kernel, mounted by the subject,
  must show the kernel's view.

Both directions also require the writes themselves to behave like the
kernel's (op results compared), so a subject that refuses writes cannot
pass by leaving the upper empty.
"""

from __future__ import annotations

import os
import shutil

import pytest

from helpers.snapshot import diff_snapshots, format_diff
from helpers.stacks import FIFO, OPQ, T0, T1, WH, D, F, H, L
from helpers.writeops import Recorder, Side, run_start, subject_label, workdir_problems

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]


def _layers():
    l1 = {
        "md": D(mtime_ns=T1),
        "md/top": F(b"top\n"),
        "gone": WH(),
        "od": OPQ(),
        "od/t": F(b"t\n"),
        "cd/c1": F(b"c1\n"),
    }
    l2 = {
        "f": F(b"f\n", mtime_ns=T0),
        "gone": F(b"hidden\n"),
        "md/bottom": F(b"b\n"),
        "od/hidden": F(b"h\n"),
        "rmr/x/y": F(b"y\n"),
        "rmr/z": F(b"z\n"),
        "d/sub/g": F(b"g\n", uid=1234, gid=5678, mtime_ns=T0, xattrs={"user.g": b"1"}),
        "cd/c2": F(b"c2\n"),
        "h1": F(b"linked\n", mtime_ns=T0),
        "h2": H("h1"),
        "mv": F(b"renamed\n", mtime_ns=T0),
        "emptyme/a": F(b"a\n"),
        "xa": F(b"xattr\n", mtime_ns=T0),
        "trunc": F(b"truncate me\n", mtime_ns=T0),
        "ld/a": F(b"a\n"),
        "sym": L("f", mtime_ns=T0),
        "p": FIFO(mtime_ns=T0),
        "ln": F(b"link me\n", mtime_ns=T0),
    }
    return [l1, l2]


def _append(path, data: bytes) -> int:
    with open(path, "ab") as f:
        return f.write(data)


def _ops(m, rec: Recorder):
    rec.do("unlink f", os.unlink, m / "f")
    rec.do("rm -r rmr", shutil.rmtree, m / "rmr")
    rec.do("mkdir rmr", os.mkdir, m / "rmr")
    rec.do("create rmr/new", lambda: (m / "rmr/new").write_bytes(b"new\n"))
    rec.do("rm -r md", shutil.rmtree, m / "md")
    rec.do("chmod d/sub/g", os.chmod, m / "d/sub/g", 0o600)
    rec.do("chmod cd", os.chmod, m / "cd", 0o700)
    rec.do("append h1", _append, m / "h1", b"more\n")
    rec.do("rename mv", os.rename, m / "mv", m / "mv2")
    rec.do("mkdir newd", os.mkdir, m / "newd", 0o750)
    rec.do("create newd/n", lambda: (m / "newd/n").write_bytes(b"n\n"))
    rec.do("unlink emptyme/a", os.unlink, m / "emptyme/a")
    rec.do("mkfifo", os.mkfifo, m / "fifo")
    rec.do("symlink", os.symlink, "d/sub/g", m / "newlink")
    rec.do("link", os.link, m / "ln", m / "ln2")
    rec.do("setxattr", os.setxattr, m / "xa", "user.added", b"via overlay")
    rec.do("set escaped opaque", os.setxattr, m / "ld", "trusted.overlay.opaque", b"y")
    rec.do("truncate", os.truncate, m / "trunc", 3)
    rec.do("lchown sym", os.chown, m / "sym", 1, 2, follow_symlinks=False)
    rec.do("chmod fifo", os.chmod, m / "p", 0o600)
    rec.do("mkdir ud", os.mkdir, m / "ud")
    rec.do("rename ud into merged od", os.rename, m / "ud", m / "od/ud")
    rec.do("utime cd/c2", os.utime, m / "cd/c2", ns=(T1, T1))
    rec.do("unlink od/t", os.unlink, m / "od/t")


def _write(side: Side, impl: str):
    rec = Recorder(side.t_start)
    with side.mount(impl) as m:
        _ops(m.path, rec)
        view = side.view(m)
    return rec.results, view


def _read(side: Side, impl: str):
    with side.mount(impl, workdir=side.fresh_workdir()) as m:
        return side.view(m)


def _result_diff(kres, sres, sname):
    return [f"op {k!r}: kernel={kres[k]!r} {sname}={sres.get(k)!r}" for k in kres if kres[k] != sres.get(k)]


@pytest.fixture(scope="module")
def sides(tmp_path_factory):
    base = tmp_path_factory.mktemp("compat")
    t0 = run_start()
    return Side(base / "kernel", _layers(), t0), Side(base / "subject", _layers(), t0)


def test_subject_written_upper_mounted_by_kernel(sides):
    """Write through the subject, unmount, mount the same upper with the
    kernel (fresh workdir): the kernel shows what the subject showed."""
    ks, ss = sides
    sname = subject_label()
    kres, kview = _write(ks, "kernel")
    sres, sview = _write(ss, "subject")
    d = _result_diff(kres, sres, sname)
    assert not d, format_diff(d, "writes through the subject differ from the kernel's:")
    assert not workdir_problems(ss.workdir), workdir_problems(ss.workdir)
    k_of_s = _read(ss, "kernel")
    d = diff_snapshots(sview, k_of_s, a_name=f"{sname}-before-unmount", b_name="kernel-mounting-its-upper")
    assert not d, format_diff(d, f"the kernel reads the {sname}-written upper differently:")
    d = diff_snapshots(kview, k_of_s, a_name="kernel-written", b_name=f"{sname}-written")
    assert not d, format_diff(d, "kernel views of the two uppers differ:")


def test_kernel_written_upper_mounted_by_subject(tmp_path_factory):
    """Write through the kernel, unmount, mount the same upper with the
    subject (fresh workdir): the subject shows the kernel's view, and a
    later kernel mount still does."""
    base = tmp_path_factory.mktemp("compat_rev")
    t0 = run_start()
    side = Side(base / "k", _layers(), t0)
    sname = subject_label()
    _, kview = _write(side, "kernel")
    s_of_k = _read(side, "subject")
    d = diff_snapshots(kview, s_of_k, a_name="kernel-before-unmount", b_name=f"{sname}-mounting-it")
    assert not d, format_diff(d, f"{sname} reads the kernel-written upper differently:")
    again = _read(side, "kernel")
    d = diff_snapshots(kview, again, a_name="kernel-before", b_name=f"kernel-after-{sname}")
    assert not d, format_diff(d, f"the upper changed meaning after {sname} mounted it:")
