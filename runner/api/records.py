"""What the container endpoints share (ctl.py, archive.py, events_http.py): finding a
container as dockerd does, its state and image as dockerd shows them, event attributes,
and the ``filters``/time parameters of dockerd's requests."""

from __future__ import annotations

import datetime
import json
import os
import time

from .. import state
from .server import ApiError, Request


def find(ref: str) -> dict:
    """The record *ref* names as dockerd looks containers up: full id, then name (with or
    without its leading "/"), then a unique id prefix. 404 "No such container: REF"."""
    try:
        recs = state.all_records()
    except state.StateError as e:
        raise ApiError(500, str(e)) from None
    name = ref[1:] if ref.startswith("/") else ref
    for r in recs:
        if r["id"] == ref:
            return r
    for r in recs:
        if name and r.get("name") == name:
            return r
    hits = [r for r in recs if ref and r["id"].startswith(ref)] if all(c in "0123456789abcdef" for c in ref) else []
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        raise ApiError(400, f"multiple IDs found with provided prefix: {ref}")
    raise ApiError(404, f"No such container: {ref}")


def reload(rec: dict) -> dict:
    return state.load(rec["id"]) or rec


def api_state(rec: dict) -> str:
    """dockerd's State.Status: created | running | exited | dead."""
    return state.status(rec)


def api_of(rec: dict) -> dict:
    v = rec.get("api")
    return v if isinstance(v, dict) else {}


def spec_of(rec: dict) -> dict:
    s = rec.get("spec")
    return s if isinstance(s, dict) else {}


def image_of(rec: dict) -> tuple[str, str]:
    """(Image as given, image id) of a container; ("", "") for one run on bare layers."""
    img = rec.get("image") or {}
    cfg = api_of(rec).get("Config") or {}
    ref = cfg.get("Image") or img.get("ref") or ""
    return ref, img.get("id") or ""


def labels_of(rec: dict) -> dict:
    labels = (api_of(rec).get("Config") or {}).get("Labels")
    return labels if isinstance(labels, dict) else {}


def lowers_of(rec: dict) -> list[str]:
    """The layers under the upper, top first, as the container's mount stacks them."""
    init = rec.get("init_layer")
    return ([init] if init and os.path.isdir(init) else []) + list(rec.get("layers") or [])


def attrs(rec: dict, **more: str) -> dict[str, str]:
    ref, image_id = image_of(rec)
    out = {"name": rec.get("name") or rec["id"][:12], "image": ref or image_id}
    out.update({k: str(v) for k, v in labels_of(rec).items()})
    out.update(more)
    return out


def parse_filters(req: Request, allowed: tuple[str, ...] | set[str] | None = None) -> dict[str, list[str]]:
    """``filters``: ``{"name": {"web": true}}`` (the docker CLI) or ``{"name": ["web"]}``;
    a key not in *allowed* (when given) is dockerd's 400 ``invalid filter 'KEY'``."""
    raw = req.arg("filters")
    if not raw:
        return {}
    try:
        obj = json.loads(raw)
    except ValueError:
        raise ApiError(400, f"invalid filter: {raw!r} is not JSON") from None
    if not isinstance(obj, dict):
        raise ApiError(400, "invalid filter: not a JSON object")
    out: dict[str, list[str]] = {}
    for k, v in obj.items():
        if isinstance(v, dict):
            out[k] = [str(x) for x, on in v.items() if on]
        elif isinstance(v, list):
            out[k] = [str(x) for x in v]
        else:
            raise ApiError(400, f"invalid filter {k!r}")
    if allowed is not None:
        for k in out:
            if k not in allowed:
                raise ApiError(400, f"invalid filter '{k}'")
    return out


def parse_time(value: str, now: float | None = None) -> float:
    """A time as dockerd takes it in filters and ``since``/``until``: unix seconds
    ("1700000000", "1700000000.5"), a duration before now ("10m", "1h30m"), or RFC 3339."""
    import re

    now = time.time() if now is None else now
    v = value.strip()
    if re.fullmatch(r"-?\d+(\.\d+)?", v):
        return float(v)
    m = re.fullmatch(r"((\d+(\.\d+)?)(h|ms|m|s|us|ns))+", v)
    if m:
        total = 0.0
        unit = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
        for num, _frac, u in re.findall(r"(\d+(\.\d+)?)(h|ms|m|s|us|ns)", v):
            total += float(num) * unit[u]
        return now - total
    try:
        dt = datetime.datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(400, f"invalid time {value!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=datetime.UTC)
    return dt.timestamp()
