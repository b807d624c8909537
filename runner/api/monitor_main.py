"""The monitor of a container started through the API (runner/api/containers.py):
``python -m runner.api.monitor_main CID NOTIFY_FD GO_FD [--stdin-once]``.

The service runs this as its child, in a session of its own and with no parent-death
signal, so that the container outlives the service. It reads the container's spec from
its record (``api.runspec``, written by ``create``) and runs :class:`runner.monitor.Monitor`
in its API mode (stdio through the attach socket and the log: runner/attach.py). Its
exit status is the container's (or 125/126/127 when the start failed: then the notify
pipe says ``err CODE MESSAGE``).
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> int:
    from .. import state
    from ..monitor import ApiStart, Monitor
    from .containers import spec_from_dict

    cid, notify_fd, go_fd = argv[0], int(argv[1]), int(argv[2])
    stdin_once = "--stdin-once" in argv[3:]
    os.set_inheritable(notify_fd, False)
    os.set_inheritable(go_fd, False)
    rec = state.load_record(cid)
    if rec is None or not isinstance(rec.extra.get("api"), dict):
        os.write(notify_fd, f"err 125 no such container: {cid}\n".encode())
        return 125
    try:
        spec = spec_from_dict(rec.extra["api"]["runspec"])
    except (KeyError, TypeError, ValueError) as e:
        os.write(notify_fd, f"err 125 the container's record is not usable: {e}\n".encode())
        return 125
    return Monitor(spec, notify_fd=notify_fd, api=ApiStart(cid, go_fd, stdin_once)).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
