"""chown through the mount against the kernel overlay: a chown to the owner a file
already has is still a change (ctime moves, set-id bits of a non-directory go), a chown to
another owner drops them too, and -1 keeps a field."""

from __future__ import annotations

import os
import time

import pytest

from helpers import mounts

pytestmark = [pytest.mark.fuse, pytest.mark.kernel]

CASES = [  # (name, initial mode, initial owner, chown args)
    ("plain_same", 0o755, (0, 0), (0, 0)),
    ("same", 0o4755, (0, 0), (0, 0)),
    ("same_setgid", 0o2755, (5, 6), (5, 6)),
    ("other", 0o6755, (0, 0), (7, 8)),
    ("keep_uid", 0o4755, (5, 6), (-1, 9)),
]


def _results(root) -> dict:
    out = {}
    before = {name: os.stat(root / name).st_ctime_ns for name, *_ in CASES}
    time.sleep(0.05)  # ctime granularity
    for name, _, _, (uid, gid) in CASES:
        os.chown(root / name, uid, gid)
        st = os.stat(root / name)
        out[name] = (oct(st.st_mode & 0o7777), st.st_uid, st.st_gid, st.st_ctime_ns > before[name])
    return out


def test_chown_matches_the_kernel(tmp_path):
    lower = tmp_path / "lower"
    lower.mkdir()
    for name, mode, (uid, gid), _ in CASES:
        (lower / name).write_bytes(b"#!/bin/sh\n")
        os.chown(lower / name, uid, gid)
        os.chmod(lower / name, mode)
    got = {}
    for kind, cls in (("kernel", mounts.KernelOverlay), ("pyoverlay", mounts.PyoverlayMount)):
        base = tmp_path / kind
        (base / "upper").mkdir(parents=True)
        (base / "work").mkdir()
        with cls([lower], base / "m", base / "upper", base / "work") as m:
            for name, *_ in CASES:  # copy them up first: the chown itself is what is compared
                os.utime(m.path / name)
            got[kind] = _results(m.path)
    assert got["pyoverlay"] == got["kernel"]
    assert all(changed for *_, changed in got["kernel"].values())
