"""Fixtures of the podman/buildah tests: ``make_podman(mount_program, user=None)`` gives a
private environment (tests/helpers/podman.py) and fails the test if it leaves a process or
a mount behind (both are removed either way). Skipped with the reason where podman,
buildah, runc or busybox-static are missing, or (rootless) the test user or its
subordinate ids are."""

from __future__ import annotations

import pytest

from helpers import podman, rootless


@pytest.fixture
def make_podman(tmp_path):
    made: list[podman.Podman] = []

    def make(mount_program, user: rootless.User | None = None, name: str = "podman") -> podman.Podman:
        reason = podman.skip_reason(rootless=user is not None)
        if reason:
            pytest.skip(reason)
        base = (user.dir if user is not None else tmp_path) / name
        p = podman.Podman(base, mount_program, user)
        made.append(p)
        return p

    yield make
    left = []
    for p in reversed(made):
        left += p.cleanup()
    if left:
        pytest.fail(f"the podman test left behind: {'; '.join(left)}", pytrace=False)


@pytest.fixture
def podman_user(request):
    """The rootless test user (tests/conftest.py's ``user``), for podman."""
    reason = podman.skip_reason(rootless=True)
    if reason:
        pytest.skip(reason)
    yield request.getfixturevalue("user")
