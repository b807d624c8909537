"""Shared fixtures and skip rules for the pyoverlay test suite.

Markers (applied by test modules, turned into skips here):

* ``kernel``    -- mounts the kernel's overlayfs (the oracle): needs root;
* ``fuse``      -- mounts pyoverlay: needs /dev/fuse and fusermount3;
* ``slow``      -- long-running (e.g. the 100k-entry directory); still run by
                   default, deselect with ``-m "not slow"``.

``PYOVERLAY_TEST_SUBJECT=kernel|fuse-overlayfs`` swaps pyoverlay for another
implementation to self-test the harness (default and real runs: pyoverlay).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import mounts  # noqa: E402
from helpers.oracle import Lab  # noqa: E402

NEEDS_ROOT = "needs root (mounts the kernel's overlayfs, mknod, trusted.* xattrs)"
NEEDS_DEV_FUSE = "needs /dev/fuse (pyoverlay is a FUSE filesystem)"
NEEDS_FUSERMOUNT = "needs fusermount3 (to unmount pyoverlay)"


def pytest_configure(config):
    # trees thousands of levels deep (deep_paths stack) must not break
    # recursive walkers (snapshot, pytest's own tmp dir cleanup)
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 20000))
    config.addinivalue_line("markers", "fuse: mounts pyoverlay (needs /dev/fuse, fusermount3)")
    config.addinivalue_line("markers", "slow: long-running test (still part of the suite)")
    config.addinivalue_line("markers", "needs_root: needs root (kernel overlay, mknod, trusted.*)")


def _skip_reasons(item) -> list[str]:
    reasons = []
    wants_root = item.get_closest_marker("kernel") or item.get_closest_marker("needs_root")
    if wants_root and os.geteuid() != 0:
        reasons.append(NEEDS_ROOT)
    if item.get_closest_marker("fuse") and mounts.subject_name() != "kernel":
        if not os.path.exists("/dev/fuse"):
            reasons.append(NEEDS_DEV_FUSE)
        if shutil.which(mounts.FUSERMOUNT) is None:
            reasons.append(NEEDS_FUSERMOUNT)
        if os.geteuid() != 0:
            # the stacks need root to build (mknod whiteouts, trusted.* xattrs)
            reasons.append(NEEDS_ROOT)
    return reasons


def pytest_collection_modifyitems(config, items):
    for item in items:
        for reason in _skip_reasons(item):
            item.add_marker(pytest.mark.skip(reason=reason))
            break


def pytest_report_header(config):
    return f"pyoverlay harness: subject = {mounts.subject_name()} (PYOVERLAY_TEST_SUBJECT), repo = {mounts.REPO_ROOT}"


# --------------------------------------------------------------------------
# leftover-mount checks
# --------------------------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def _no_leftover_mounts_session(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    yield
    left = mounts.mounts_under(base)
    if left:
        for m in sorted(left, key=len, reverse=True):
            mounts.abort_fuse_connection(m)
            mounts.force_unmount(m)
        pytest.fail(
            f"TEST HARNESS BUG: mounts were left behind under the test tmp dir (lazily unmounted now): {left}",
            pytrace=False,
        )


@pytest.fixture(autouse=True)
def _no_leftover_mounts_test(request, tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    before = set(mounts.mounts_under(base))
    n_logs = len(mounts.SERVER_LOGS)
    request.node._pyoverlay_log_start = n_logs
    yield
    left = set(mounts.mounts_under(base)) - before
    if left:
        for m in sorted(left, key=len, reverse=True):
            mounts.abort_fuse_connection(m)
            mounts.force_unmount(m)
        pytest.fail(f"test left mounts behind (lazily unmounted now): {sorted(left)}", pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and call.when in ("call", "setup"):
        start = getattr(item, "_pyoverlay_log_start", None)
        if start is not None:
            for log in mounts.SERVER_LOGS[start:][-3:]:
                try:
                    text = Path(log).read_text(errors="replace").splitlines()[-40:]
                except OSError:
                    continue
                rep.sections.append((f"server log tail: {log}", "\n".join(text)))


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def lab(tmp_path_factory) -> Lab:
    """Session-wide builder/cache of named stacks and their snapshots."""
    lab = Lab(tmp_path_factory.mktemp("lab"))
    yield lab
    # the ~2000-level deep tree and the 100k-entry dir are expensive for
    # pytest's later cleanup of old tmp dirs: remove them now
    for name in ("deep_paths", "big_dir"):
        d = lab.base / "stacks" / name
        if d.exists() and not mounts.mounts_under(d):
            subprocess.run(["rm", "-rf", "--one-file-system", str(d)])


@pytest.fixture
def user():
    """The ordinary user ``pyoverlay-test`` with a fresh directory of its own
    (tests/helpers/rootless.py); the test fails if it leaves one of the user's mounts or
    processes behind (they are removed either way)."""
    from helpers import rootless

    reason = rootless.skip_reason()
    if reason:
        pytest.skip(reason)
    u = rootless.User()
    yield u
    left = u.cleanup()
    if left:
        pytest.fail(f"the test left behind: {', '.join(left)}")


@pytest.fixture
def ns():
    """A private network namespace with only ``lo`` (tests/helpers/netns.py): what a test
    does to bridges, firewall tables and ip_forward there leaves the machine untouched."""
    from helpers import netns

    n = netns.NetNS()
    try:
        yield n
    finally:
        n.close()
