"""Fixtures of the rootless tests: ``user``, the ordinary user ``pyoverlay-test`` with a
fresh directory of its own; the test fails if it leaves one of the user's mounts or
processes behind (they are removed either way)."""

from __future__ import annotations

import pytest

from helpers import rootless


@pytest.fixture
def user():
    reason = rootless.skip_reason()
    if reason:
        pytest.skip(reason)
    u = rootless.User()
    yield u
    left = u.cleanup()
    if left:
        pytest.fail(f"the test left behind: {', '.join(left)}")
