"""Where running mounts are recorded: one JSON file per mount, keyed by the mountpoint.

``pyoverlay umount`` uses it to find the server to wait for; later tools (trace,
ps) will use it to find a mount's server. Directory: ``$PYOVERLAY_STATE_DIR``, else
``/run/pyoverlay`` for root, else ``$XDG_RUNTIME_DIR/pyoverlay`` or ``/tmp/pyoverlay-$UID``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict


def state_dir() -> str:
    d = os.environ.get("PYOVERLAY_STATE_DIR")
    if not d:
        if os.geteuid() == 0:
            d = "/run/pyoverlay"
        elif os.environ.get("XDG_RUNTIME_DIR"):
            d = os.path.join(os.environ["XDG_RUNTIME_DIR"], "pyoverlay")
        else:
            d = f"/tmp/pyoverlay-{os.geteuid()}"
    os.makedirs(d, mode=0o700, exist_ok=True)
    return d


def _path(mountpoint: str) -> str:
    # *mountpoint* must already be absolute and resolved: never stat a live mountpoint
    # from the server itself (the request would come back to us and deadlock).
    h = hashlib.sha256(os.fsencode(mountpoint)).hexdigest()[:24]
    return os.path.join(state_dir(), f"mount-{h}.json")


def trace_socket(mountpoint: str) -> str:
    """Where the server of *mountpoint* serves its live trace (see tracesink.py)."""
    return _path(mountpoint)[: -len(".json")] + ".trace.sock"


def record(mountpoint: str, pid: int, cfg) -> None:
    data = {"mountpoint": mountpoint, "pid": pid, "config": asdict(cfg),
            "trace_socket": trace_socket(mountpoint)}
    tmp = _path(mountpoint) + f".{pid}.tmp"
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600), "w") as f:
        json.dump(data, f)
    os.replace(tmp, _path(mountpoint))


def lookup(mountpoint: str) -> dict | None:
    try:
        with open(_path(mountpoint)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def forget(mountpoint: str, pid: int) -> None:
    data = lookup(mountpoint)
    if data is not None and data.get("pid") == pid:
        try:
            os.unlink(_path(mountpoint))
        except FileNotFoundError:
            pass
