"""A private containerd + dockerd for the reference test (skipped when unavailable).

``with LiveDocker(base) as d:`` starts containerd (own root, state, socket, config:
no CRI plugin, opt dir under *base*) and dockerd (``--data-root base/docker``, own
exec root, pidfile and socket, no iptables, no bridge, overlay2), and ``d.docker(...)``
runs the docker client against it (``DOCKER_HOST``, a private ``DOCKER_CONFIG``).
``d.stop()`` (also on exit, whatever happened) stops dockerd, then containerd (SIGTERM,
SIGKILL after a timeout), kills shims that belonged to them, lazily unmounts what is
left under *base*, and removes what the daemons leave outside *base* when they did not
exist before: the ``docker`` cgroups, ``/run/containerd/s``, ``/run/docker/plugins``,
``/etc/docker/key.json`` (dockerd 20.10 always writes its trust key there).

:class:`Unavailable` means "skip": a binary is missing or a daemon did not come up.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from . import containers, mounts

#: created by the daemons outside their private dirs; removed if new (and empty)
OUTSIDE = ("/etc/docker/key.json", "/run/containerd/s", "/run/containerd", "/run/docker/plugins", "/run/docker")


class Unavailable(Exception):
    """Docker cannot run here (the reason is the message)."""


def docker_client() -> str | None:
    """The client that matches the distribution's dockerd if present, else PATH's."""
    return "/usr/bin/docker" if os.access("/usr/bin/docker", os.X_OK) else shutil.which("docker")


def missing_binaries() -> list[str]:
    out = [b for b in ("dockerd", "containerd", "runc", "containerd-shim-runc-v2") if shutil.which(b) is None]
    if docker_client() is None:
        out.append("docker")
    return out


class LiveDocker(contextlib.AbstractContextManager):
    def __init__(self, base: Path, start_timeout: float = 20.0):
        self.base = Path(base)
        self.data_root = self.base / "docker"
        self.sock = self.base / "docker.sock"
        self.csock = self.base / "containerd.sock"
        self.start_timeout = start_timeout
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = dict(
            os.environ, DOCKER_HOST=f"unix://{self.sock}", DOCKER_CONFIG=str(self.base / "client"), DOCKER_BUILDKIT="0"
        )
        self._existed = {p: os.path.lexists(p) for p in OUTSIDE}
        self._cgroups_before = set(glob.glob("/sys/fs/cgroup/*/docker") + glob.glob("/sys/fs/cgroup/docker"))

    # --- start --------------------------------------------------------------------------

    def __enter__(self):
        missing = missing_binaries()
        if missing:
            raise Unavailable(
                f"docker is not installed here (missing: {', '.join(missing)}; apt-get install docker.io)"
            )
        try:
            self._start_containerd()
            self._start_dockerd()
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, argv: list[str]) -> None:
        with open(self.base / f"{name}.log", "wb") as log:
            self.procs[name] = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def _wait(self, name: str, ready) -> None:
        deadline = time.monotonic() + self.start_timeout
        while not ready():
            if self.procs[name].poll() is not None or time.monotonic() > deadline:
                why = (
                    f"exited with status {self.procs[name].returncode}"
                    if self.procs[name].poll() is not None
                    else f"not ready after {self.start_timeout:g}s"
                )
                raise Unavailable(f"{name} did not start ({why}); log tail:\n{self.log_tail(name)}")
            time.sleep(0.05)

    def _start_containerd(self) -> None:
        c = self.base / "containerd"
        cfg = self.base / "containerd.toml"
        cfg.write_text(
            f'version = 2\nroot = "{c}/root"\nstate = "{c}/state"\n'
            f'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{self.csock}"\n'
            f'[plugins."io.containerd.internal.v1.opt"]\n  path = "{c}/opt"\n'
        )
        self._spawn(
            "containerd",
            [
                "containerd",
                "--config",
                str(cfg),
                "--root",
                f"{c}/root",
                "--state",
                f"{c}/state",
                "--address",
                str(self.csock),
            ],
        )
        self._wait("containerd", self.csock.is_socket)

    def _start_dockerd(self) -> None:
        (self.base / "daemon.json").write_text("{}\n")
        self._spawn(
            "dockerd",
            [
                "dockerd",
                "--config-file",
                str(self.base / "daemon.json"),
                "--data-root",
                str(self.data_root),
                "--exec-root",
                str(self.base / "exec"),
                "--pidfile",
                str(self.base / "dockerd.pid"),
                "-H",
                f"unix://{self.sock}",
                "--containerd",
                str(self.csock),
                "--iptables=false",
                "--ip-masq=false",
                "--bridge=none",
                "--storage-driver=overlay2",
            ],
        )
        self._wait(
            "dockerd", lambda: self.sock.is_socket() and self.docker("info", check=False, timeout=10).returncode == 0
        )

    def log_tail(self, name: str, n: int = 15) -> str:
        try:
            lines = (self.base / f"{name}.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    # --- use ------------------------------------------------------------------------------

    def docker(self, *args, input=None, check=True, timeout=60) -> subprocess.CompletedProcess:
        r = subprocess.run(
            [docker_client(), *map(str, args)], input=input, capture_output=True, env=self.env, timeout=timeout
        )
        if check and r.returncode != 0:
            raise AssertionError(
                f"docker {' '.join(map(str, args))} failed ({r.returncode}):\n"
                f"{r.stderr.decode(errors='replace')}\n--- dockerd log ---\n"
                f"{self.log_tail('dockerd')}"
            )
        return r

    # --- stop -----------------------------------------------------------------------------

    def stop(self) -> list[str]:
        """Stop both daemons and clean up; returns notes on what had to be forced."""
        notes = []
        for name in ("dockerd", "containerd"):
            p = self.procs.pop(name, None)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                notes.append(f"{name} ignored SIGTERM for 20s: SIGKILL")
                p.kill()
                p.wait(10)
        for pid in containers.all_pids():  # shims of our containerd (normally none left)
            if str(self.csock) in " ".join(containers.cmdline(pid)):
                notes.append(f"left process killed: {containers.describe_pid(pid)}")
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        for m in sorted(mounts.mounts_under(self.base), key=len, reverse=True):
            notes.append(f"left mount detached: {m}")
            mounts.force_unmount(m)
        self._remove_outside()
        return notes

    def _remove_outside(self) -> None:
        new = set(glob.glob("/sys/fs/cgroup/*/docker") + glob.glob("/sys/fs/cgroup/docker"))
        for cg in new - self._cgroups_before:
            with contextlib.suppress(OSError):
                os.rmdir(cg)
        for p in OUTSIDE:
            if self._existed[p] or not os.path.lexists(p):
                continue
            with contextlib.suppress(OSError):
                os.rmdir(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)

    def __exit__(self, *exc):
        self.stop()
        return False
