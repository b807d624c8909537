"""``pyoverlay serve`` under test: a service on a private socket, with the runtime's
private state and data dirs, and the real docker CLI (Debian's docker.io, API 1.41) and
docker-py talking to it.

``Service(rt, sock)`` starts ``pyoverlay serve -H unix://SOCK`` with *rt*'s environment
(the same containers and images as ``rt.cli``: the CLI and the service share them) and
waits for ``/_ping``. ``svc.docker(*args)`` runs the docker CLI against it with a private
``DOCKER_CONFIG``; ``svc.client()`` is a docker-py client. ``svc.stop()`` ends the service
(SIGTERM, SIGKILL after a timeout) and reports what it printed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import time
from pathlib import Path

from helpers import mounts
from helpers.containers import Runtime

#: Debian's docker.io CLI (20.10, API 1.41), the one the issue names; another docker on
#: PATH (a newer one in /usr/local/bin) is not used
DOCKER = "/usr/bin/docker"


def docker_missing() -> str | None:
    """Why the docker CLI tests cannot run (None: they can)."""
    if not os.access(DOCKER, os.X_OK):
        return f"{DOCKER} (Debian's docker.io) is not installed: run scripts/setup"
    return None


class Service:
    def __init__(self, rt: Runtime, sock: Path, extra_args: tuple[str, ...] = (), env: dict | None = None):
        self.rt = rt
        self.sock = Path(sock)
        self.host = f"unix://{self.sock}"
        self.config_dir = self.sock.parent / "docker-config"
        self.config_dir.mkdir(parents=True, exist_ok=True)
        self.log = self.sock.parent / "serve.log"
        e = dict(rt.env)
        e.update(env or {})
        self._logf = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            rt.argv("serve", "-H", self.host, *extra_args),  # a NetnsRuntime's: in its namespace
            env=e,
            cwd=mounts.REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self._logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"pyoverlay serve exited with {self.proc.returncode}:\n{self.output()}")
            with contextlib.suppress(OSError):
                s = socket.socket(socket.AF_UNIX)
                try:
                    s.settimeout(5)
                    s.connect(str(self.sock))
                    s.sendall(b"GET /_ping HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n")
                    if s.recv(64).startswith(b"HTTP/1.1 200"):
                        return
                finally:
                    s.close()
            time.sleep(0.1)
        raise AssertionError(f"pyoverlay serve did not answer /_ping within {timeout}s:\n{self.output()}")

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def env(self) -> dict:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.config_dir),
            "DOCKER_HOST": self.host,
            "DOCKER_CONFIG": str(self.config_dir),
            "DOCKER_CLI_HINTS": "false",
            "LANG": "C.UTF-8",
        }

    def docker(self, *args, input=None, timeout: float = 60, text: bool = True) -> subprocess.CompletedProcess:
        """The docker CLI against the service (stdin /dev/null unless *input*)."""
        return subprocess.run(
            [DOCKER, *[os.fspath(a) for a in args]],
            input=input,
            stdin=subprocess.DEVNULL if input is None else None,
            capture_output=True,
            text=text,
            env=self.env(),
            timeout=timeout,
        )

    def docker_ok(self, *args, **kw) -> subprocess.CompletedProcess:
        r = self.docker(*args, **kw)
        assert r.returncode == 0, (
            f"$ docker {' '.join(map(str, args))}\nexit {r.returncode}\n--- stdout ---\n{r.stdout}\n"
            f"--- stderr ---\n{r.stderr}\n--- service ---\n{self.output()[-4000:]}"
        )
        return r

    def client(self):
        """A docker-py client on the service's socket."""
        import docker  # the PyPI package, in the test extras

        return docker.DockerClient(base_url=self.host, version="auto", timeout=60)

    def stop(self, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._logf.close()
        return self.proc.returncode


def busybox_tarball(rootfs: Path, dest: Path) -> Path:
    """A tarball of a busybox rootfs dir (what ``docker import`` takes)."""
    with tarfile.open(dest, "w") as tf:
        for entry in sorted(os.listdir(rootfs)):
            tf.add(rootfs / entry, arcname=entry)
    return dest


def store_image(rt: Runtime, rootfs: Path, ref: str = "busybox:latest") -> str:
    """Put *rootfs* in the runtime's image store as image *ref* (``pyoverlay commit DIR
    --image REF``: one layer, no parent), without the API; returns the commit's output."""
    return rt.ok("commit", rootfs, "--image", ref).stdout


def which_docker_py() -> str | None:
    """Why docker-py cannot be used (None: it can)."""
    try:
        import docker  # noqa: F401
    except ImportError:
        return "the docker package (PyPI) is not installed: run scripts/setup"
    return None


__all__ = ["DOCKER", "Service", "busybox_tarball", "docker_missing", "shutil", "store_image", "which_docker_py"]


@contextlib.contextmanager
def running(rt: Runtime, sock: Path):
    """A :class:`Service` on *sock* for the block, with the runner's leftover check (no
    container, mount, cgroup or process of *rt*'s left); the docker CLI must be there
    (setup installs it: a missing CLI is a broken machine, not a skip)."""
    import pytest

    from helpers import containers

    why = docker_missing()
    if why:
        pytest.fail(why)
    with containers.leftover_check(rt):
        svc = Service(rt, sock)
        try:
            yield svc
        finally:
            svc.stop()


class UserService:
    """``pyoverlay serve`` run by the ordinary test user (a ``helpers.rootless.User``) on
    its default socket, ``$XDG_RUNTIME_DIR/pyoverlay/docker.sock`` (a private runtime dir
    under the user's test dir): its containers are rootless. ``with UserService(user) as
    us: us.docker(...)``; ``us.tar(rootfs)`` is a busybox tarball the user may read. The
    service is stopped (SIGTERM to its session) when the block ends."""

    def __init__(self, user, output=subprocess.DEVNULL):
        from helpers import rootless

        self.user = user
        self.runtime = user.dir / "xdg"
        self.runtime.mkdir(mode=0o700)
        os.chown(self.runtime, user.uid, user.gid)
        self.sock = self.runtime / "pyoverlay" / "docker.sock"
        self.env = {"XDG_RUNTIME_DIR": str(self.runtime), "DOCKER_CONFIG": str(user.dir / "docker-config")}
        self.proc = subprocess.Popen(
            user.argv([rootless.VENV_BIN / "pyoverlay", "serve"]),
            env=user.env(self.env),
            cwd=user.dir,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def __enter__(self) -> UserService:
        deadline = time.monotonic() + 60
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                out = self.proc.stdout.read().decode() if self.proc.stdout else ""
                self.stop()
                raise AssertionError(f"the user's pyoverlay serve did not start: {out}")
            time.sleep(0.1)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(30)

    def tar(self, rootfs: Path) -> Path:
        tar = busybox_tarball(rootfs, self.user.dir / "busybox.tar")
        os.chown(tar, self.user.uid, self.user.gid)
        return tar

    def docker(self, *args, **kw) -> subprocess.CompletedProcess:
        """The docker CLI as the user, against the user's service."""
        return self.user.run([DOCKER, *map(str, args)], env={**self.env, "DOCKER_HOST": f"unix://{self.sock}"}, **kw)

    def docker_ok(self, *args, **kw) -> subprocess.CompletedProcess:
        r = self.docker(*args, **kw)
        assert r.returncode == 0, f"docker {args}: exit {r.returncode}\n{r.stdout}{r.stderr}"
        return r
