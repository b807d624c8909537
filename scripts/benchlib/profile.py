"""``--profile``: py-spy samples pyoverlay's server during every timed pyoverlay sample.

Per workload, the collapsed stacks of all its samples are written to
``DIR/WORKLOAD.txt`` (py-spy's raw format: flamegraph.pl / speedscope read it) and summed
up: the share of the server's busy time spent in pyoverlay's own code (any frame in
``overlayfs_py/``: the handlers, the overlay rules, the syscalls they make) against the
rest (pyfuse3's worker loop, trio's scheduling and I/O waits, the interpreter), and the
functions with the most samples of their own.  Idle time (the server blocked in
``epoll``) is not sampled.  Sampling is ``--nonblocking`` (the server is never paused),
but it still costs the server CPU: timings of a ``--profile`` run are not comparable
with those of a plain run.
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
import time

OWN_CODE = "overlayfs_py/"
LOOP = "unrolled_run (trio/"  # frames below it are the server's start-up (cli, mount.serve)
RATE = 997  # Hz; prime, so it does not beat with periodic work


def find_pyspy() -> str | None:
    venv = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", ".venv", "bin", "py-spy")
    return os.path.realpath(venv) if os.access(venv, os.X_OK) else shutil.which("py-spy")


class Profiler:
    def __init__(self, outdir: str, log) -> None:
        self.exe = find_pyspy()
        if self.exe is None:
            raise RuntimeError("--profile needs py-spy (scripts/bench installs it into .venv)")
        self.outdir, self.log = outdir, log
        os.makedirs(outdir, exist_ok=True)
        self.stacks: dict[str, collections.Counter] = {}
        self._proc: subprocess.Popen | None = None
        self._raw: str | None = None

    def start(self, workload: str, pid: int) -> None:
        self._raw = os.path.join(self.outdir, f".{workload}.{time.monotonic_ns()}.raw")
        self._workload = workload
        self._proc = subprocess.Popen(
            [
                self.exe,
                "record",
                "--pid",
                str(pid),
                "--rate",
                str(RATE),
                "--nonblocking",
                "--format",
                "raw",
                "--output",
                self._raw,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)  # attached (py-spy has no readiness signal)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        counter = self.stacks.setdefault(self._workload, collections.Counter())
        try:
            with open(self._raw) as f:
                for line in f:
                    stack, _, n = line.rstrip("\n").rpartition(" ")
                    if stack and n.isdigit():
                        counter[stack] += int(n)
            os.unlink(self._raw)
        except OSError as exc:
            self.log(f"profile of {self._workload}: no output from py-spy ({exc})")

    def summary(self, top: int = 8) -> dict:
        """Per workload: samples, own-code share, top self functions; raw stacks written."""
        out = {}
        for w, counter in self.stacks.items():
            with open(os.path.join(self.outdir, f"{w}.txt"), "w") as f:
                for stack, n in counter.most_common():
                    f.write(f"{stack} {n}\n")
            total = sum(counter.values())
            own = sum(n for s, n in counter.items() if _in_own_code(s))
            selfs: collections.Counter = collections.Counter()
            for s, n in counter.items():
                selfs[_short(s.rsplit(";", 1)[-1])] += n
            out[w] = {
                "samples": total,
                "own_code_pct": round(100 * own / total, 1) if total else None,
                "top_self": [[f, round(100 * n / total, 1)] for f, n in selfs.most_common(top)],
                "stacks_file": os.path.join(self.outdir, f"{w}.txt"),
            }
        return out


def _in_own_code(stack: str) -> bool:
    """Whether a sample is pyoverlay's own work: a frame of ``overlayfs_py/`` above trio's
    loop (or anywhere in a worker thread's stack)."""
    frames = stack.split(";")
    loop = max((i for i, f in enumerate(frames) if f.startswith(LOOP)), default=-1)
    return any(OWN_CODE in f for f in frames[loop + 1 :])


def _short(frame: str) -> str:
    """``func (/long/path/pkg/mod.py:123)`` -> ``func (pkg/mod.py)``."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = path.split("/")
    return f"{name} ({'/'.join(parts[-2:])})" if path else name


def table(summary: dict) -> str:
    rows = ["| workload | busy samples | in pyoverlay's code | top functions by own samples |", "|---|---:|---:|---|"]
    for w, s in summary.items():
        tops = "; ".join(f"{f} {p}%" for f, p in s["top_self"][:4])
        own = "-" if s["own_code_pct"] is None else f"{s['own_code_pct']}%"
        rows.append(f"| {w} | {s['samples']} | {own} | {tops} |")
    return "\n".join(rows)
