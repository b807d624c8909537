"""System endpoints: ``/_ping``, ``/version`` (what the docker CLI asks first)."""

from __future__ import annotations

import platform

from .server import API_VERSION, MIN_API_VERSION, Request, Router

router = Router()


@router.route("GET", "/_ping")
def ping(req: Request) -> None:
    req.text("OK")


@router.route("GET", "/version")
def version(req: Request) -> None:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as pkg_version

    try:
        ours = pkg_version("pyoverlay")
    except PackageNotFoundError:
        ours = "dev"
    req.json(
        {
            "Platform": {"Name": "pyoverlay"},
            "Components": [{"Name": "Engine", "Version": ours, "Details": {"ApiVersion": API_VERSION}}],
            "Version": ours,
            "ApiVersion": API_VERSION,
            "MinAPIVersion": MIN_API_VERSION,
            "Os": "linux",
            "Arch": {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine()),
            "KernelVersion": platform.release(),
            "GoVersion": "python" + platform.python_version(),
            "GitCommit": "",
            "BuildTime": "",
        }
    )
