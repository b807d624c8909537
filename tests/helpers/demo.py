"""``scripts/demo.py --part NAME`` as the tests run it: its directory under the test's tmp
dir (TMPDIR), no runtime of the caller's (the demo makes its own state and data dirs), and
with *private_net* in a network namespace of its own with only ``lo`` up, so that what its
containers do to the network (the bridge, its firewall table, ip_forward) stays there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers import mounts

DEMO = mounts.REPO_ROOT / "scripts" / "demo.py"


def run_part(
    part: str, tmp_path: Path, *, private_net: bool = False, timeout: float = 300
) -> subprocess.CompletedProcess:
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # the demo makes its directory there
    env.pop("PYOVERLAY_STATE_DIR", None)
    env.pop("PYOVERLAY_DATA_DIR", None)
    argv = [sys.executable, str(DEMO), "--part", part]
    if private_net:
        argv = ["unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
