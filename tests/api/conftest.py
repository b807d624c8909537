"""Fixtures of the API tests: a private runtime (state and data dirs under the test's tmp
dir), the busybox rootfs (built once), ``service``: ``pyoverlay serve`` on a private socket
with that runtime, with the runner's leftover check (no container, mount, cgroup or
process left), and ``image``: busybox stored as ``busybox:latest`` in the runtime's store."""

from __future__ import annotations

import pytest

from helpers import api, containers, rootfs


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> rootfs.Images:
    return rootfs.images(tmp_path_factory)


@pytest.fixture
def rt(tmp_path) -> containers.Runtime:
    return containers.Runtime(tmp_path / "rt")


@pytest.fixture
def service(rt, tmp_path):
    with api.running(rt, tmp_path / "svc" / "docker.sock") as svc:
        yield svc


@pytest.fixture
def image(rt, images) -> str:
    api.store_image(rt, images.bare.layers[0], "busybox:latest")
    return "busybox:latest"
