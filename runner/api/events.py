"""The service's event stream (``GET /events``, ``docker events``): what happened to
containers and images, as dockerd reports it (``Type``, ``Action``, ``Actor``, ``time``).

``publish`` is called by the endpoints that change something (create, start, die, ...);
``EventBus.subscribe`` gives a reader every event from then on (and the recent past, for
``since``)."""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any


class EventBus:
    def __init__(self, keep: int = 1000):
        self._cond = threading.Condition()
        self._events: deque[dict[str, Any]] = deque(maxlen=keep)
        self._seq = 0

    def publish(self, type_: str, action: str, actor_id: str, attributes: dict[str, str] | None = None) -> None:
        now = time.time_ns()
        ev = {
            "Type": type_,
            "Action": action,
            "Actor": {"ID": actor_id, "Attributes": dict(attributes or {})},
            "scope": "local",
            "time": now // 1_000_000_000,
            "timeNano": now,
        }
        if type_ == "container":  # the older fields docker's CLI still reads
            ev.update({"status": action, "id": actor_id, "from": (attributes or {}).get("image", "")})
        with self._cond:
            self._seq += 1
            ev["_seq"] = self._seq
            self._events.append(ev)
            self._cond.notify_all()

    def since(self, seq: int, timeout: float | None) -> tuple[int, list[dict[str, Any]]]:
        """Events after *seq* (waiting up to *timeout* for one); (the last seq, events)."""
        with self._cond:
            if self._seq <= seq:
                self._cond.wait(timeout)
            out = [e for e in self._events if e["_seq"] > seq]
            return self._seq, out

    @property
    def seq(self) -> int:
        return self._seq


#: the service's one bus (a module global: every endpoint module publishes here)
bus = EventBus()


def publish(type_: str, action: str, actor_id: str, attributes: dict[str, str] | None = None) -> None:
    bus.publish(type_, action, actor_id, attributes)
