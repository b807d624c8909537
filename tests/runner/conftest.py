"""Fixtures of the runner tests: the busybox images (built once), a private runtime
(state and data dirs under the test's tmp dir), and a leftover check that fails a test
leaving a mount, a cgroup, a container process or a runner behind."""

from __future__ import annotations

import pytest

from helpers import containers, rootfs


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> rootfs.Images:
    return rootfs.images(tmp_path_factory)


@pytest.fixture
def img(images) -> rootfs.Image:
    return images.bare


@pytest.fixture
def rt(tmp_path) -> containers.Runtime:
    return containers.Runtime(tmp_path / "rt")


@pytest.fixture
def _no_leftovers(rt):
    with containers.leftover_check(rt):
        yield
