"""``GET /events`` (``docker events``): the service's event bus (:mod:`.events`) as a stream
of JSON objects, one per event, dockerd's way: ``since`` replays what the bus still holds
from then on, ``until`` ends the stream at that time (at once when it is past), without
``until`` the stream runs until the client goes. Filters: ``type``, ``container`` (an id,
id prefix or name), ``event`` (the action), ``image``, ``label``."""

from __future__ import annotations

import json
import time

from . import events
from .records import parse_filters, parse_time
from .server import ApiError, Request, Router, peer_closed

router = Router()

_FILTERS = {"type", "container", "event", "image", "label", "scope"}


def _match(ev: dict, f: dict[str, list[str]]) -> bool:
    attrs = ev["Actor"]["Attributes"]
    if "type" in f and ev["Type"] not in f["type"]:
        return False
    if "event" in f and not any(ev["Action"] == e or ev["Action"].startswith(e + ":") for e in f["event"]):
        return False
    if "scope" in f and ev.get("scope") not in f["scope"]:
        return False
    if "container" in f:
        if ev["Type"] != "container":
            return False
        ids = (ev["Actor"]["ID"], attrs.get("name", ""))
        if not any(v and (x == v or (x and v.startswith(x))) for x in f["container"] for v in ids):
            return False
    if "image" in f:
        img = attrs.get("image", "") if ev["Type"] == "container" else ev["Actor"]["ID"]
        names = {img, attrs.get("name", "") if ev["Type"] == "image" else ""}
        if not any(x and (x in names or x + ":latest" in names) for x in f["image"]):
            return False
    if "label" in f:
        for want in f["label"]:
            k, eq, v = want.partition("=")
            if k not in attrs or (eq and attrs[k] != v):
                return False
    return True


def _public(ev: dict) -> bytes:
    return json.dumps({k: v for k, v in ev.items() if not k.startswith("_")}).encode() + b"\n"


@router.route("GET", "/events")
def get_events(req: Request) -> None:
    f = parse_filters(req, _FILTERS)
    now = time.time()
    since = parse_time(req.arg("since") or "", now) if req.arg("since") else None
    until = parse_time(req.arg("until") or "", now) if req.arg("until") else None
    if since is not None and until is not None and since > until:
        raise ApiError(400, "since time is after until time")
    seq, past = events.bus.since(0, 0) if since is not None else (events.bus.seq, [])
    req.stream_start("application/json")
    req.stream_write(b"")
    for ev in past:
        t = ev["timeNano"] / 1e9
        if t >= since and (until is None or t <= until) and _match(ev, f):
            req.stream_write(_public(ev))
    conn = req.connection
    req.flush()
    while until is None or time.time() < until:
        wait = 1.0 if until is None else max(0.0, min(1.0, until - time.time()))
        seq, new = events.bus.since(seq, wait)
        for ev in new:
            if until is not None and ev["timeNano"] / 1e9 > until:
                return
            if _match(ev, f):
                req.stream_write(_public(ev))
        if peer_closed(conn):
            return
