"""getxattr answers read BEFORE a change, then read again after it, compared with the kernel
overlay. The direct engine keeps the getxattr answers of lower objects (they cannot change
while mounted: any change copies the object up first), hits and misses alike, so every
kind of change that reaches a lower object's xattrs is made after its xattrs were read:
setxattr and removexattr (copy-up of a file), a write (copy-up by data), chmod of a lower
directory (copy-up of a directory), a create inside a lower directory (its copy-up as a
parent), and a rename of a lower file over another one.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers.stacks import D, F
from helpers.writeops import run_pair

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]

NAMES = ("user.k", "user.new", "user.gone")


def _layers():
    return [
        {
            "f": F(b"f\n", xattrs={"user.k": b"v", "user.gone": b"x"}),
            "w": F(b"w\n", xattrs={"user.k": b"w"}),
            "d": D(xattrs={"user.k": b"dir"}),
            "d/in": F(b"in\n"),
            "p": D(xattrs={"user.k": b"parent"}),
            "src": F(b"src\n", xattrs={"user.k": b"src"}),
            "dst": F(b"dst\n", xattrs={"user.k": b"dst", "user.gone": b"dst"}),
        }
    ]


def _xattrs(path: Path) -> dict:
    out = {}
    for name in NAMES:
        try:
            out[name] = os.getxattr(path, name, follow_symlinks=False)
        except OSError as e:
            out[name] = "ERR:" + (os.strerror(e.errno) if e.errno else "?")
    return out


def _append(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"more\n")
    finally:
        os.close(fd)


def _ops(m: Path, rec) -> None:
    def step(label: str, names, fn, *args) -> None:
        for n in names:
            rec.do(f"before {label}: {n}", _xattrs, m / n)  # read (and kept) first
        rec.do(label, fn, *args)
        for n in names:
            rec.do(f"after {label}: {n}", _xattrs, m / n)

    step("setxattr on a lower file", ["f"], os.setxattr, m / "f", "user.new", b"1")
    step("removexattr on it", ["f"], os.removexattr, m / "f", "user.gone")
    step("write to a lower file", ["w"], _append, m / "w")
    step("setxattr after the write", ["w"], os.setxattr, m / "w", "user.new", b"2")
    step("chmod a lower dir", ["d"], os.chmod, m / "d", 0o700)
    step("setxattr on it", ["d"], os.setxattr, m / "d", "user.new", b"3")
    step("create in a lower dir", ["p"], (m / "p/new").write_bytes, b"new\n")
    step("setxattr on that parent", ["p"], os.setxattr, m / "p", "user.new", b"4")
    step("rename a lower file over another", ["src", "dst"], os.rename, m / "src", m / "dst")


def test_getxattr_after_changes_matches_the_kernel(tmp_path):
    run = run_pair(tmp_path, _layers(), _ops)
    run.assert_results()
    run.assert_view()
    # the oracle saw each change (so a kept answer would show up as a difference)
    assert run.k.results["after setxattr on a lower file: f"]["user.new"] == b"1"
    assert run.k.results["after removexattr on it: f"]["user.gone"].startswith("ERR:")
    assert run.k.results["after rename a lower file over another: dst"]["user.k"] == b"src"
