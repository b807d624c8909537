"""The benchmark harness itself (scripts/bench.py): a --smoke run (tiny layers, one
repetition) mounts every implementation, runs every workload, passes its own sanity
checks, writes a complete JSON result and leaves nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from overlayfs_py import mountinfo

pytestmark = [pytest.mark.fuse, pytest.mark.needs_root]

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from benchlib.workloads import ALL as WORKLOADS  # noqa: E402


def test_smoke_run_gives_every_impl_and_workload(tmp_path):
    work, result = tmp_path / "work", tmp_path / "result.json"
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), "--smoke", "--workdir", str(work), "--json", str(result)],
        capture_output=True,
        text=True,
        timeout=170,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(result.read_text())
    assert d["error"] is None
    want = {"native", "kernel", "pyoverlay"} | ({"fuse-overlayfs"} if shutil.which("fuse-overlayfs") else set())
    assert want <= set(d["impls"])
    names = [w.name for w in WORKLOADS]
    assert [w["name"] for w in d["workloads"]] == names
    for w in names:
        for impl in d["impls"]:
            skipped = d["skipped"][w].get(impl)
            if skipped:
                assert (impl == "native" and (w.startswith("copyup") or w in ("rename_lower_dir", "chown_r"))) or (
                    w == "randread_4k" and shutil.which("fio") is None
                ), (w, impl, skipped)
                continue
            samples = d["samples"][w][impl]
            assert len(samples) == 1 and samples[0] > 0, (w, impl, samples)
            assert d["medians"][w][impl] == samples[0]
    # ratios are taken inside the run, against both references
    assert d["ratios"]["kernel"]["walk_cold"]["kernel"] == pytest.approx(1.0)
    assert d["geomeans"]["fuse-overlayfs"]["pyoverlay"]["all"] > 0
    assert any(t["what"].startswith("geomean") for t in d["targets"])
    # the server's memory, from its mount record
    assert d["rss_kib"]["pyoverlay"]["after_walks"]["VmHWM"] > 0
    assert d["machine"]["cpus"] >= 1 and d["versions"]["python"]
    # the tables went to stdout
    assert "| walk_cold |" in r.stdout and "slowdown vs fuse-overlayfs" in r.stdout
    # nothing left: no mounts, no layers, no run dir
    assert not mountinfo.mounts_under(os.path.realpath(work))
    assert not work.exists() or not any(work.iterdir())


def test_bad_arguments_are_refused():
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), "--only", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "unknown workload" in r.stderr
    assert os.path.exists(REPO / "scripts" / "bench")


@pytest.mark.skipif(
    not (REPO / ".venv" / "bin" / "py-spy").exists() and shutil.which("py-spy") is None,
    reason="needs py-spy (scripts/bench --profile installs it into .venv)",
)
def test_profile_samples_the_server_and_splits_own_code(tmp_path):
    """--profile: py-spy attached to pyoverlay's server during its samples gives, per
    workload, collapsed stacks and the share in pyoverlay's own code."""
    work, result, prof = tmp_path / "work", tmp_path / "result.json", tmp_path / "prof"
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "bench.py"),
            "--smoke",
            "--impl",
            "pyoverlay",
            "--only",
            "walk_warm,untar",
            "--workdir",
            str(work),
            "--json",
            str(result),
            "--profile",
            str(prof),
        ],
        capture_output=True,
        text=True,
        timeout=170,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(result.read_text())
    assert set(d["profile"]) == {"walk_warm", "untar"}
    untar = d["profile"]["untar"]
    assert untar["samples"] > 0 and 0 < untar["own_code_pct"] < 100
    # creating files shows up in pyoverlay's write path
    stacks = Path(untar["stacks_file"]).read_text()
    assert "overlayfs_py/write.py" in stacks and "trio/_core" in stacks
    assert "| untar |" in r.stdout and "in pyoverlay's code" in r.stdout
    assert not list(prof.glob(".*.raw"))  # per-sample files merged and removed


def test_transport_mode_times_requests_and_leaves_nothing(tmp_path):
    """--transport: microseconds per getxattr and open+close on each implementation,
    including the do-nothing pyfuse3 server, and how pyoverlay's time splits."""
    work, result = tmp_path / "work", tmp_path / "result.json"
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "bench.py"),
            "--transport",
            "--reps",
            "1",
            "--impl",
            "kernel,pyoverlay,pyfuse3-null",
            "--workdir",
            str(work),
            "--json",
            str(result),
        ],
        capture_output=True,
        text=True,
        timeout=170,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(result.read_text())
    med = d["transport"]["median_us"]
    assert set(med) == {"kernel", "pyoverlay", "pyfuse3-null"}
    for name, ops in med.items():
        assert set(ops) == {"getxattr", "open+close"} and all(v > 0 for v in ops.values()), name
    # a FUSE round trip costs more than the kernel overlay's in-kernel call
    assert med["pyfuse3-null"]["getxattr"] > med["kernel"]["getxattr"]
    assert "| pyfuse3-null |" in r.stdout and "pyoverlay's handlers" in r.stdout
    assert not mountinfo.mounts_under(os.path.realpath(work))
    assert not work.exists() or not any(work.iterdir())


def test_mount_times_mode_times_every_engine_and_leaves_nothing(tmp_path):
    """--mount-times: mount and umount of the kernel overlay, fuse-overlayfs and both of
    pyoverlay's engines, interleaved; medians in the JSON and a table on stdout."""
    work, result = tmp_path / "work", tmp_path / "result.json"
    impls = ["kernel", "pyoverlay-direct", "pyoverlay-pyfuse3"] + (
        ["fuse-overlayfs"] if shutil.which("fuse-overlayfs") else []
    )
    argv = [sys.executable, str(REPO / "scripts" / "bench.py"), "--mount-times", "--reps", "2"]
    argv += ["--impl", ",".join(impls), "--workdir", str(work), "--json", str(result)]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=170, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(result.read_text())
    assert d["mode"] == "mount-times"
    med = d["mount_times"]["median_ms"]
    assert set(med) == set(impls)
    for name, cols in med.items():
        assert cols["mount"] > 0 and cols["umount"] > 0, name
        assert len(d["mount_times"]["samples_ms"][name]["mount"]) == 2
    assert "| pyoverlay-direct |" in r.stdout and "server exit after umount" in r.stdout
    assert not mountinfo.mounts_under(os.path.realpath(work))
    assert not work.exists() or not any(work.iterdir())


def test_transport_runs_pyoverlay_on_both_engines_side_by_side(tmp_path):
    """--impl pyoverlay-direct,pyoverlay-pyfuse3: one run times pyoverlay on each engine,
    and each server's mount record says it ran the engine its name asks for."""
    work, result = tmp_path / "work", tmp_path / "result.json"
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "bench.py"),
            "--transport",
            "--reps",
            "1",
            "--impl",
            "pyoverlay-direct,pyoverlay-pyfuse3,pyfuse3-null",
            "--workdir",
            str(work),
            "--json",
            str(result),
        ],
        capture_output=True,
        text=True,
        timeout=170,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    tr = json.loads(result.read_text())["transport"]
    assert set(tr["median_us"]) == {"pyoverlay-direct", "pyoverlay-pyfuse3", "pyfuse3-null"}
    assert all(v > 0 for ops in tr["median_us"].values() for v in ops.values())
    assert tr["engines"] == {"pyoverlay-direct": "direct", "pyoverlay-pyfuse3": "pyfuse3"}
    assert "| pyoverlay-direct |" in r.stdout and "pyoverlay's handlers (pyoverlay-pyfuse3)" in r.stdout
    assert not mountinfo.mounts_under(os.path.realpath(work))
