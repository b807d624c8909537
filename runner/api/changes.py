"""``--change`` lines of ``docker import`` and ``docker commit``: the Dockerfile
instructions dockerd accepts there (CMD, ENTRYPOINT, ENV, EXPOSE, LABEL, ONBUILD,
STOPSIGNAL, USER, VOLUME, WORKDIR), applied to an image config, with dockerd's 400 for
anything else."""

from __future__ import annotations

import contextlib
import json
import shlex
from typing import Any

from .server import ApiError

_CHANGES = ("CMD", "ENTRYPOINT", "ENV", "EXPOSE", "LABEL", "ONBUILD", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR")


def apply(cfg: dict[str, Any], changes: list[str]) -> dict[str, Any]:
    """Apply the ``--change`` lines *changes* (each may hold several lines) to the image
    config *cfg* (changed in place, and returned): ``docker import --change`` starts from
    an empty config, ``docker commit --change`` from the container's."""
    for raw in changes:
        for line in raw.splitlines():
            line = line.strip()
            if not line:
                continue
            word, _, rest = line.partition(" ")
            word, rest = word.upper(), rest.strip()
            if word not in _CHANGES:
                raise ApiError(400, f"{word} is not a valid change command")
            if word in ("CMD", "ENTRYPOINT"):
                cfg["Cmd" if word == "CMD" else "Entrypoint"] = _exec_form(rest, word)
            elif word == "ENV":
                env = cfg.setdefault("Env", [])
                for k, v in _pairs(rest, word):
                    env[:] = [e for e in env if e.split("=", 1)[0] != k] + [f"{k}={v}"]
            elif word == "LABEL":
                cfg.setdefault("Labels", {}).update(dict(_pairs(rest, word)))
            elif word == "EXPOSE":
                for p in rest.split():
                    cfg.setdefault("ExposedPorts", {})[p if "/" in p else f"{p}/tcp"] = {}
            elif word == "VOLUME":
                vols = _json_list(rest) if rest.startswith("[") else rest.split()
                for v in vols:
                    cfg.setdefault("Volumes", {})[v] = {}
            elif word == "ONBUILD":
                cfg.setdefault("OnBuild", []).append(rest)
            elif word == "STOPSIGNAL":
                cfg["StopSignal"] = rest
            elif word == "USER":
                cfg["User"] = rest
            elif word == "WORKDIR":
                cfg["WorkingDir"] = rest if rest.startswith("/") else "/" + rest
    return cfg


def _json_list(s: str) -> list[str]:
    try:
        v = json.loads(s)
    except ValueError:
        raise ApiError(400, f"invalid JSON in change {s!r}") from None
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ApiError(400, f"invalid change {s!r}: expected a JSON list of strings")
    return v


def _exec_form(rest: str, word: str) -> list[str]:
    if rest.startswith("["):
        with contextlib.suppress(ApiError):
            return _json_list(rest)
    if not rest:
        raise ApiError(400, f"{word} requires at least one argument")
    return ["/bin/sh", "-c", rest]


def _pairs(rest: str, word: str) -> list[tuple[str, str]]:
    try:
        words = shlex.split(rest)
    except ValueError as e:
        raise ApiError(400, f"{word}: {e}") from None
    if not words:
        raise ApiError(400, f"{word} requires at least one argument")
    if "=" not in words[0]:  # ENV KEY VALUE...
        return [(words[0], " ".join(words[1:]))]
    out = []
    for w in words:
        k, eq, v = w.partition("=")
        if not eq or not k:
            raise ApiError(400, f"{word}: {w!r} is not KEY=VALUE")
        out.append((k, v))
    return out
