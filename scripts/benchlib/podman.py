"""``scripts/bench --podman``: what a mount program costs podman (issue 16's latency target).

``podman run --rm --network none IMAGE true``, as root (or rootless: ``scripts/bench --podman
--as-user pyoverlay-test``, podman in the user's namespace), with containers/storage's overlay
driver and its ``mount_program`` set to fuse-overlayfs and to pyoverlay's
``mount.fuse.pyoverlay`` (this checkout's ``.venv``), round robin (the order rotates each
repetition), medians of ``--reps`` (default 10). Each mount program has its own private
storage (``--root``/``--runroot`` under the bench's run directory) holding the same image,
imported from a busybox rootfs (``busybox-static``); podman's configuration is private too
(``CONTAINERS_CONF``: runc, cgroupfs, no default ulimits, as this machine needs;
``CONTAINERS_REGISTRIES_CONF``: no registries). ``--network none`` on both sides keeps
network setup out of the comparison. One untimed run first per side. Nothing of the
machine's own configuration is read or changed; the storages are reset and removed after
(rootless, the pause process podman leaves is ended too).
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import tarfile
import tempfile
import time

from .util import REPO, BenchError

IMAGE = "localhost/pyoverlay-bench:busybox"
REPS = 10
PROGRAMS = {
    "fuse-overlayfs": "/usr/bin/fuse-overlayfs",
    "pyoverlay": os.path.join(REPO, ".venv", "bin", "mount.fuse.pyoverlay"),
}
CONTAINERS_CONF = """[containers]
default_ulimits = []
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""


def _rootfs_tar(path: str) -> None:
    busybox = shutil.which("busybox") or "/bin/busybox"
    if not os.path.exists(busybox):
        raise BenchError("--podman needs busybox (the busybox-static package: scripts/setup)")
    with tarfile.open(path, "w") as tar:
        for d in ("bin", "tmp", "etc"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        tar.add(busybox, "bin/busybox")
        for name in ("sh", "true", "ls"):
            info = tarfile.TarInfo(f"bin/{name}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(info)


class Side:
    """One mount program: its private storage, and podman's command line for it."""

    def __init__(self, name: str, program: str, base: str, short: str, env: dict[str, str]) -> None:
        self.name = name
        self.root = os.path.join(base, name, "root")
        self.runroot = os.path.join(short, name)  # containers/storage: at most 50 characters
        os.makedirs(self.root, exist_ok=True)
        os.makedirs(self.runroot, exist_ok=True)
        self.env = env
        self.podman = [
            "podman",
            "--root",
            self.root,
            "--runroot",
            self.runroot,
            "--storage-driver",
            "overlay",
            "--storage-opt",
            f"overlay.mount_program={program}",
            "--tmpdir",
            os.path.join(base, name, "tmp"),
        ]

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        p = subprocess.run(
            [*self.podman, *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if p.returncode != 0:
            raise BenchError(f"podman ({self.name}) {' '.join(args)}: {(p.stderr or p.stdout).strip()[-300:]}")
        return p

    def timed_run(self) -> float:
        t0 = time.perf_counter()
        self.run("run", "--rm", "--network", "none", IMAGE, "true")
        return time.perf_counter() - t0

    def reset(self) -> None:
        subprocess.run([*self.podman, "rm", "-af"], env=self.env, capture_output=True, timeout=120, check=False)
        subprocess.run(
            [*self.podman, "system", "reset", "--force"], env=self.env, capture_output=True, timeout=120, check=False
        )
        _end_pause_process(self.env)


def _end_pause_process(env: dict[str, str]) -> None:
    """Rootless podman keeps a pause process holding its user namespace (its pid in the
    run dir); a run of the bench leaves nothing behind."""
    if os.geteuid() == 0 or "XDG_RUNTIME_DIR" not in env:
        return
    try:
        with open(os.path.join(env["XDG_RUNTIME_DIR"], "libpod", "tmp", "pause.pid")) as f:
            pid = int(f.read().strip())
        os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError):
        pass


def why_not() -> str | None:
    if os.geteuid() != 0:
        import pwd

        name = pwd.getpwuid(os.geteuid()).pw_name
        try:
            with open("/etc/subuid") as f:
                ranges = [ln.split(":")[0] for ln in f]
        except OSError:
            ranges = []
        if name not in ranges and str(os.geteuid()) not in ranges:
            return f"rootless podman needs subordinate ids for {name} in /etc/subuid (scripts/setup)"
        if "XDG_RUNTIME_DIR" not in os.environ:
            return "rootless --podman runs under --as-user (it sets XDG_RUNTIME_DIR)"
    for tool in ("podman", "runc", "conmon"):
        if shutil.which(tool) is None:
            return f"--podman needs {tool} (scripts/setup installs podman)"
    for name, prog in PROGRAMS.items():
        if not os.access(prog, os.X_OK):
            return f"--podman needs {prog} ({name})"
    return None


def run_podman(run_dir: str, reps: int, log) -> dict:
    why = why_not()
    if why:
        raise BenchError(why)
    base = os.path.join(run_dir, "podman")
    os.makedirs(base, exist_ok=True)
    conf = os.path.join(base, "containers.conf")
    with open(conf, "w") as f:
        f.write(CONTAINERS_CONF)
    regs = os.path.join(base, "registries.conf")
    with open(regs, "w") as f:
        f.write("unqualified-search-registries = []\n")
    env = dict(os.environ)
    env.update(
        CONTAINERS_CONF=conf,
        CONTAINERS_REGISTRIES_CONF=regs,
        PYOVERLAY_STATE_DIR=os.path.join(base, "pyoverlay-state"),
        TMPDIR=os.path.join(base, "tmp"),
    )
    os.makedirs(env["TMPDIR"], exist_ok=True)
    tar = os.path.join(base, "rootfs.tar")
    _rootfs_tar(tar)
    short = tempfile.mkdtemp(prefix="pyo-pm-", dir="/tmp")
    sides = [Side(name, prog, base, short, env) for name, prog in PROGRAMS.items()]
    samples: dict[str, list[float]] = {s.name: [] for s in sides}
    try:
        for s in sides:
            s.run("import", tar, IMAGE)
            s.timed_run()  # untimed: caches, first container
        log(f"podman: {reps} runs of `podman run --rm --network none IMAGE true` per mount program")
        for rep in range(reps):
            order = sides[rep % len(sides) :] + sides[: rep % len(sides)]
            for s in order:
                samples[s.name].append(s.timed_run())
            log(f"podman rep {rep + 1}/{reps}: " + "  ".join(f"{n} {v[-1] * 1000:.0f} ms" for n, v in samples.items()))
    finally:
        for s in sides:
            s.reset()
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(short, ignore_errors=True)
    medians = {n: statistics.median(v) * 1000 for n, v in samples.items()}
    return {
        "rootless": os.geteuid() != 0,
        "reps": reps,
        "median_ms": medians,
        "samples_ms": {n: [round(x * 1000, 1) for x in v] for n, v in samples.items()},
        "ratio": medians["pyoverlay"] / medians["fuse-overlayfs"],
    }


def table(res: dict) -> str:
    m = res["median_ms"]
    lines = [
        f"**podman run --rm --network none IMAGE true{' (rootless)' if res.get('rootless') else ''}: "
        f"milliseconds, median of {res['reps']} (interleaved)**",
        "",
        "| mount_program | median | ratio to fuse-overlayfs |",
        "|---|---:|---:|",
        f"| fuse-overlayfs | {m['fuse-overlayfs']:.0f} | 1.00x |",
        f"| pyoverlay (mount.fuse.pyoverlay) | {m['pyoverlay']:.0f} | {res['ratio']:.2f}x |",
    ]
    return "\n".join(lines)
