"""The harness's leftover check: it finds and removes what its own runtime left (a running
container, its cgroup), and leaves another runtime's containers alone — a second test run on
the same machine (a helper's, a developer's) is not killed by this one."""

from __future__ import annotations

import pytest

from helpers import containers


def test_finds_and_removes_its_own_running_container(rt, img):
    with pytest.raises(AssertionError, match="left things behind") as e, containers.leftover_check(rt, grace=0.5):
        cid = rt.detach(img.spec, "sleep", "1000")
    assert "container process left" in str(e.value)
    assert containers.cgroups_of(cid) == []
    assert rt.state_entries() == []


def test_leaves_another_runtimes_container_alone(rt, img, tmp_path):
    """The other runtime's container starts while this test's check is open, as when two
    runs overlap: it is not reported, killed or stripped of its cgroup."""
    other = containers.Runtime(tmp_path / "other")
    with containers.leftover_check(other):
        cid = None
        try:
            with containers.leftover_check(rt, grace=0.5):
                cid = other.detach(img.spec, "sleep", "1000")
                rt.ok("run", "--rm", img.spec, "true")
            ps = other.ok("ps", "--json").stdout
            assert cid in ps and '"running"' in ps, ps
            assert containers.cgroups_of(cid), "the other runtime's cgroup was removed"
        finally:
            if cid:
                other.ok("rm", "-f", cid)
