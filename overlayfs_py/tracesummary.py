"""Turn trace events into what a person wants to know: who copied what up, how much it
cost, and which copy-ups were for nothing. Pure: events in, text or a dict out."""

from __future__ import annotations

import collections
import fnmatch
import os
import time
from dataclasses import dataclass, field


def human(n: int | None) -> str:
    if n is None:
        return ""
    if n < 1024:
        return f"{n} B"
    size = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024 or unit == "GiB":
            break
    return f"{size:.1f} {unit}"


@dataclass
class Filter:
    pids: frozenset[int] = frozenset()
    path_glob: str | None = None
    events: frozenset[str] = frozenset()

    def __call__(self, ev: dict) -> bool:
        if ev.get("event") in ("end", "dropped"):
            return True
        if self.pids and ev.get("pid") not in self.pids and ev.get("cpid") not in self.pids:
            return False
        if self.events and ev.get("event") not in self.events:
            return False
        if self.path_glob:
            path = ev.get("path") or ""
            if not (
                fnmatch.fnmatchcase(path, self.path_glob)
                or fnmatch.fnmatchcase(path, self.path_glob.rstrip("/") + "/*")
            ):
                return False
        return True


def who(ev: dict) -> str:
    if ev.get("pid") is None:
        return "-"
    ctr = f" [{ev['container'][:12]}:{ev['cpid']}]" if ev.get("container") else ""
    return f"{ev.get('comm') or '?'}({ev['pid']}){ctr}"


def row(ev: dict) -> str:
    """One event as a line of the live table."""
    t = time.strftime("%H:%M:%S", time.localtime(ev.get("ts", 0))) + f".{int(ev.get('ts', 0) * 1000) % 1000:03d}"
    kind = ev.get("event", "?")
    if kind == "end":
        return f"{t}  -- end of trace: {ev.get('emitted', 0)} events, {ev.get('dropped', 0)} dropped by the server"
    if kind == "dropped":
        return f"{t}  -- {ev.get('count', 0)} events dropped (this reader was too slow)"
    extra = ""
    if kind.startswith("copy_up"):
        bits: list[str | None] = [ev.get("reason"), f"from {ev['layer']}" if ev.get("layer") else None]
        if ev.get("metadata"):
            bits.append("metadata only")  # metacopy=on: the data is still read from below
        elif ev.get("data_only"):
            bits.append("data of a metacopy file")
        if ev.get("duration_ms") is not None:
            bits.append(f"{ev['duration_ms']:.1f} ms")
        if ev.get("error"):
            bits.append(ev["error"])
        shown = [b for b in bits if b]
        extra = "  (" + ", ".join(shown) + ")" if shown else ""
    elif kind == "create":
        extra = f"  ({ev.get('kind')})"
    elif kind in ("rename_exdev", "rename"):
        extra = f"  -> {ev.get('target')}"
        if ev.get("redirect"):
            extra += f"  (redirect {ev['redirect']})"
    elif kind == "error":
        extra = f"  {ev.get('op')}: {ev.get('error')}"
    size = human(ev.get("bytes", ev.get("size"))) if kind.startswith("copy_up") else ""
    return f"{t}  {who(ev):<34} {kind:<16} {ev.get('path', ''):<40} {size:>9}{extra}".rstrip()


HEADER = f"{'TIME':<12}  {'PROCESS':<34} {'EVENT':<16} {'PATH':<40} {'BYTES':>9}"


@dataclass
class Summary:
    counts: collections.Counter = field(default_factory=collections.Counter)
    by_process: dict = field(default_factory=lambda: collections.defaultdict(lambda: [0, 0]))
    by_dir: dict = field(default_factory=lambda: collections.defaultdict(lambda: [0, 0]))
    copy_ups: list = field(default_factory=list)  # (bytes, path, who)
    unused: list = field(default_factory=list)  # (path, bytes, who)
    metadata_only: int = 0  # copy_up_done events of metadata-only copy-ups (metacopy=on)
    dropped_server: int = 0
    dropped_reader: int = 0

    def add(self, ev: dict) -> None:
        kind = ev.get("event")
        if kind == "end":
            self.dropped_server = ev.get("dropped", 0)
            return
        if kind == "dropped":
            self.dropped_reader += ev.get("count", 0)
            return
        self.counts[kind] += 1
        if kind == "copy_up_done":
            n = ev.get("bytes", 0)
            for table, key in ((self.by_process, who(ev)), (self.by_dir, os.path.dirname(ev.get("path", "/")) or "/")):
                table[key][0] += 1
                table[key][1] += n
            self.copy_ups.append((n, ev.get("path", ""), who(ev)))
            self.metadata_only += bool(ev.get("metadata"))
        elif kind == "copy_up_unused":
            self.unused.append((ev.get("path", ""), ev.get("bytes", 0), who(ev)))

    def as_dict(self) -> dict:
        return {
            "counts": dict(self.counts),
            "copy_up_bytes": sum(b for b, _, _ in self.copy_ups),
            "metadata_only_copy_ups": self.metadata_only,
            "by_process": {k: {"copy_ups": v[0], "bytes": v[1]} for k, v in self.by_process.items()},
            "by_directory": {k: {"copy_ups": v[0], "bytes": v[1]} for k, v in self.by_dir.items()},
            "largest": [{"path": p, "bytes": b, "process": w} for b, p, w in self.largest()],
            "unnecessary": [{"path": p, "bytes": b, "process": w} for p, b, w in self.unused],
            "dropped": {"server": self.dropped_server, "reader": self.dropped_reader},
        }

    def largest(self, n: int = 10) -> list:
        return sorted(self.copy_ups, key=lambda c: -c[0])[:n]

    def text(self) -> str:
        c = self.counts
        total = sum(b for b, _, _ in self.copy_ups)
        meta = f", {self.metadata_only} metadata only" if self.metadata_only else ""
        out = [
            f"copy-ups: {c['copy_up_done']} ({human(total)}{meta}), failed: {c['copy_up_failed']}; "
            f"whiteouts: {c['whiteout_create']} created, {c['whiteout_remove']} removed; "
            f"opaque dirs: {c['opaque_dir']}; EXDEV renames: {c['rename_exdev']}; "
            f"new objects: {c['create']}; errors: {c['error']}"
        ]
        if self.dropped_server or self.dropped_reader:
            out.append(f"dropped events: {self.dropped_server} by the server, {self.dropped_reader} by this reader")

        def table(title, rows, head):
            if rows:
                out.append("")
                out.append(title)
                out.append("  " + head)
                out.extend("  " + r for r in rows)

        procs = sorted(self.by_process.items(), key=lambda kv: -kv[1][1])
        table(
            "copy-ups by process:",
            [f"{n:>8} {human(b):>10}  {k}" for k, (n, b) in procs],
            f"{'COPY-UPS':>8} {'BYTES':>10}  PROCESS",
        )
        dirs = sorted(self.by_dir.items(), key=lambda kv: -kv[1][1])[:20]
        table(
            "copy-ups by directory:",
            [f"{n:>8} {human(b):>10}  {k}" for k, (n, b) in dirs],
            f"{'COPY-UPS':>8} {'BYTES':>10}  DIRECTORY",
        )
        table(
            "largest copy-ups:", [f"{human(b):>10}  {p}  by {w}" for b, p, w in self.largest()], f"{'BYTES':>10}  PATH"
        )
        table(
            "unnecessary copy-ups (opened for writing, closed unchanged):",
            [f"{human(b):>10}  {p}  by {w}" for p, b, w in self.unused],
            f"{'BYTES':>10}  PATH",
        )
        return "\n".join(out)
