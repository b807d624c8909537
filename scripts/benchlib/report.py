"""Medians, slowdown ratios (only ever inside one run), geometric means, the markdown
tables and pyoverlay's targets."""

from __future__ import annotations

import math
import os
import statistics

from .util import fmt_ratio, fmt_value

REFS = ("kernel", "fuse-overlayfs")

# pyoverlay's goals (issue 15, the direct engine): (reference, max slowdown, how it is said)
DEFAULT_TARGET = ("fuse-overlayfs", 1.5, "<= 1.5x fuse-overlayfs")
TARGETS = {
    "walk_warm": ("fuse-overlayfs", 1.0, "<= 1.0x fuse-overlayfs"),
    "readdir_big": ("fuse-overlayfs", 1.0, "<= 1.0x fuse-overlayfs"),
    # with FUSE passthrough (as root); the kernel overlay is the reference
    "seqread_first": ("kernel", 1.3, "<= 1.3x kernel (passthrough)"),
    "seqread_again": ("kernel", 1.3, "<= 1.3x kernel (passthrough)"),
    "randread_4k": ("kernel", 1.3, "<= 1.3x kernel (passthrough)"),
    "seqwrite": ("kernel", 1.3, "<= 1.3x kernel (passthrough)"),
}
#: geometric mean vs fuse-overlayfs: as root (passthrough), and rootless (--as-user)
GEOMEAN_TARGET = 0.8
GEOMEAN_TARGET_ROOTLESS = 1.2
RSS_TARGET_MIB = 150


def medians(res) -> dict:
    return {w.name: {i: statistics.median(v) for i, v in res.samples[w.name].items() if v} for w in res.workloads}


def slowdown(unit: str, value: float, ref: float) -> float | None:
    """>1 = slower than *ref*: time ratio, or the inverse for MiB/s and IOPS."""
    if not value or not ref:
        return None
    return value / ref if unit == "s" else ref / value


def ratios(res, med: dict, ref: str) -> dict:
    out = {}
    for w in res.workloads:
        m = med[w.name]
        if ref in m:
            out[w.name] = {i: slowdown(w.unit, v, m[ref]) for i, v in m.items()}
    return out


def _geo(xs: list[float]) -> float | None:
    xs = [x for x in xs if x]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None


def geomeans(res, rat: dict) -> dict:
    out = {}
    for impl in res.impls:
        by = {"read": [], "write": []}
        for w in res.workloads:
            r = rat.get(w.name, {}).get(impl)
            if r:
                by[w.group].append(r)
        out[impl] = {
            "all": _geo(by["read"] + by["write"]),
            "reads": _geo(by["read"]),
            "writes": _geo(by["write"]),
            "n": len(by["read"]) + len(by["write"]),
        }
    return out


def _table(header: list[str], rows: list[list[str]], align: str = "") -> str:
    align = align or "l" + "r" * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "|" + "".join("---:|" if a == "r" else "---|" for a in align)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def tables(res, med: dict, rat: dict, geo: dict) -> str:
    impls = res.impls
    out = [
        "**median (time: lower is better; MiB/s, IOPS: higher is better)**",
        "",
        _table(
            ["workload"] + impls,
            [[w.name] + [fmt_value(med[w.name].get(i), w.unit) for i in impls] for w in res.workloads],
        ),
    ]
    for ref in REFS:
        if not any(rat.get(ref, {}).values()):
            continue
        out += [
            "",
            f"**slowdown vs {ref} (impl time / {ref} time; >1 = slower)**",
            "",
            _table(
                ["workload"] + impls,
                [[w.name] + [fmt_ratio(rat[ref].get(w.name, {}).get(i)) for i in impls] for w in res.workloads],
            ),
        ]
    rows = []
    for ref in REFS:
        if not any(rat.get(ref, {}).values()):
            continue
        g = geo[ref]
        rows.append(
            [f"vs {ref}: reads / writes / **all**"]
            + [
                f"{fmt_ratio(g[i]['reads'])} / {fmt_ratio(g[i]['writes'])} / **{fmt_ratio(g[i]['all'])}** ({g[i]['n']})"
                for i in impls
            ]
        )
    if rows:
        out += [
            "",
            "**geometric mean of the slowdowns over the workloads each one runs (number of workloads in brackets)**",
            "",
            _table(["geomean"] + impls, rows),
        ]
    return "\n".join(out)


def targets(res, med: dict, rat: dict, geo: dict, impl: str = "pyoverlay") -> list[dict]:
    """pyoverlay's goals, each with the measured value and whether it is met."""
    out = []
    if impl not in res.impls:
        return out
    g = geo.get("fuse-overlayfs", {}).get(impl, {}).get("all")
    if g is not None:
        limit = GEOMEAN_TARGET if os.geteuid() == 0 else GEOMEAN_TARGET_ROOTLESS
        out.append(
            {
                "impl": impl,
                "what": "geomean vs fuse-overlayfs, all workloads" + ("" if os.geteuid() == 0 else " (rootless)"),
                "target": f"<= {limit}x",
                "measured": g,
                "ok": g <= limit,
            }
        )
    for w in res.workloads:
        ref, limit, text = TARGETS.get(w.name, DEFAULT_TARGET)
        r = rat.get(ref, {}).get(w.name, {}).get(impl)
        if r is None:
            continue
        ok = r <= limit
        out.append({"impl": impl, "what": w.name, "target": text, "measured": r, "vs": ref, "ok": ok})
    return out


def targets_table(tg: list[dict]) -> str:
    several = len({t.get("impl") for t in tg}) > 1
    rows = [
        [
            (f"{t['impl']}: " if several else "") + t["what"],
            t["target"],
            fmt_ratio(t["measured"]) + (f" vs {t['vs']}" if "vs" in t else ""),
            "ok" if t["ok"] else "**MISSED**",
        ]
        for t in tg
    ]
    return _table(["pyoverlay goal", "target", "measured", ""], rows, "llrl")


def rss_lines(res) -> list[str]:
    out = []
    for impl, d in res.rss.items():
        parts = []
        for key in ("after_walks", "end"):
            if key in d and d[key].get("VmHWM"):
                parts.append(
                    f"{key.replace('_', ' ')}: peak {d[key]['VmHWM'] / 1024:.1f} MiB, "
                    f"now {(d[key].get('VmRSS') or 0) / 1024:.1f} MiB"
                )
        if d.get("peak_over_all_mounts_kib"):
            parts.append(f"highest peak of all its mounts {d['peak_over_all_mounts_kib'] / 1024:.1f} MiB")
        if parts:
            out.append(f"* {impl} server RSS: " + "; ".join(parts))
    return out
