"""``scripts/bench --transport``: what one FUSE request costs, and where.

Times the smallest requests a caller can make, on one file, round robin over: the
kernel's overlayfs, fuse-overlayfs, pyoverlay on each engine (``pyoverlay-direct``: its
own /dev/fuse engine; ``pyoverlay-pyfuse3``), and ``pyfuse3-null``, a pyfuse3 + trio
server whose handlers do nothing (``nullfs.py``):

* ``getxattr``: one synchronous request per call (ENODATA; nothing is cached);
* ``open+close``: OPEN, then RELEASE (asynchronous for the caller; FLUSH is off
  everywhere after the first); the read in between is served from the page cache.

pyfuse3-null minus fuse-overlayfs is the cost of pyfuse3's transport (its worker loop on
trio, Python objects per request); pyoverlay-pyfuse3 minus pyfuse3-null is pyoverlay's own
handlers; pyoverlay-direct has no such split (engine and handlers are one loop).
Per implementation: the median over the repetitions of the mean time per call.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
import types

from overlayfs_py.mountinfo import is_mounted
from overlayfs_py.unmount import try_unmount

from .impls import CLASSES, Impl
from .util import BenchError

CALLS = {"getxattr": 20000, "open+close": 5000}
NULLFS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nullfs.py")


class PyfuseNull(Impl):
    name = "pyfuse3-null"
    _proc: subprocess.Popen | None = None

    def _mount(self) -> None:
        r, w = os.pipe()
        self._proc = subprocess.Popen(
            [sys.executable, NULLFS, self.merged, str(w)],
            pass_fds=(w,),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        os.close(w)
        with os.fdopen(r) as f:
            ok = f.read()
        if not ok.startswith("ok") or not is_mounted(self.merged):
            self._proc.kill()
            self._proc.wait()
            raise BenchError("pyfuse3-null did not mount")

    def server_pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _unmount(self) -> None:
        try_unmount(self.merged)
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


def _time_op(path: str, op: str) -> float:
    """Mean seconds per call of *op* on *path*."""
    n = CALLS[op]
    if op == "getxattr":
        t = time.perf_counter()
        for _ in range(n):
            try:
                os.getxattr(path, "user.pyoverlay-bench")
            except OSError:
                pass
        return (time.perf_counter() - t) / n
    t = time.perf_counter()
    for _ in range(n):
        fd = os.open(path, os.O_RDONLY)
        os.read(fd, 64)
        os.close(fd)
    return (time.perf_counter() - t) / n


def run_transport(run_dir: str, names: list[str], reps: int, log, register) -> dict:
    lower = os.path.join(run_dir, "transport-lower")
    os.makedirs(lower)
    with open(os.path.join(lower, "f"), "wb") as f:
        f.write(b"hello\n")
    layers = types.SimpleNamespace(lowers=[lower])
    classes = {**CLASSES, "pyfuse3-null": PyfuseNull}
    impls = []
    for n in names:
        impl = classes[n](layers, run_dir, log)
        register(impl)
        impl.mount()
        impls.append(impl)
    engines = {i.name: i.served_engine for i in impls if getattr(i, "served_engine", None)}
    samples = {i.name: {op: [] for op in CALLS} for i in impls}
    for rep in range(reps):
        order = impls[rep % len(impls) :] + impls[: rep % len(impls)]
        for impl in order:
            path = os.path.join(impl.merged, "f")
            with open(path, "rb") as f:  # lookup, attributes, page cache: warm
                if f.read() != b"hello\n":
                    raise BenchError(f"{impl.name}: wrong content")
            for op in CALLS:
                samples[impl.name][op].append(_time_op(path, op))
        log(
            f"transport rep {rep + 1}/{reps}: "
            + "  ".join(
                f"{i.name} {samples[i.name]['getxattr'][-1] * 1e6:.0f}/{samples[i.name]['open+close'][-1] * 1e6:.0f} us"
                for i in impls
            )
        )
    for impl in impls:
        impl.unmount()
    med = {n: {op: statistics.median(v) * 1e6 for op, v in d.items()} for n, d in samples.items()}
    return {
        "calls": CALLS,
        "reps": reps,
        "engines": engines,  # the engine each pyoverlay server reported in its mount record
        "median_us": med,
        "samples_us": {n: {op: [x * 1e6 for x in v] for op, v in d.items()} for n, d in samples.items()},
    }


def table(tr: dict) -> str:
    med = tr["median_us"]
    ref = med.get("fuse-overlayfs")
    lines = [
        "**transport: microseconds per call (median of "
        f"{tr['reps']} repetitions; ratio to fuse-overlayfs in brackets)**",
        "",
        "| implementation | " + " | ".join(CALLS) + " |",
        "|---|" + "---:|" * len(CALLS),
    ]
    for name, d in med.items():
        cells = []
        for op in CALLS:
            r = f" ({d[op] / ref[op]:.2f}x)" if ref else ""
            cells.append(f"{d[op]:.1f}{r}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    on_pyfuse3 = next((n for n in ("pyoverlay-pyfuse3", "pyoverlay") if n in med), None)
    if on_pyfuse3 and "pyfuse3-null" in med:
        parts = []
        for op in CALLS:
            own = med[on_pyfuse3][op] - med["pyfuse3-null"][op]
            tp = f"; pyfuse3's transport {med['pyfuse3-null'][op] - ref[op]:+.1f} us over C" if ref else ""
            parts.append(f"{op}: pyoverlay's handlers ({on_pyfuse3}) {own:+.1f} us{tp}")
        lines += ["", "* " + "\n* ".join(parts)]
    return "\n".join(lines)
