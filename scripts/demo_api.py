"""Part 5 of the demo: the docker CLI drives pyoverlay through ``pyoverlay serve``.

The seed's scene: ``pyoverlay serve`` answers the Docker Engine API on a private socket
(records, images and data in the demo's work dir), and Debian's docker CLI talks to it
with ``-H unix://...``. A busybox rootfs tarball is ``docker import``'ed; ``docker run -d``
starts a web server and ``docker run -it ... sh`` an interactive shell on a terminal the
demo drives, side by side; while both run, ``ps -aef --forest`` on the host shows them
under the service: the service, one monitor per container (as dockerd's shims), each
monitor's FUSE server (never in the container's namespaces) and the container's PID 1.
Then ``docker ps``, ``exec``, ``logs`` and ``diff``, and everything is removed.

Called by scripts/demo.py as root. The docker CLI gets a private DOCKER_CONFIG; no dockerd
runs, and the machine's docker configuration is not read or written.
"""

from __future__ import annotations

import os
import re
import select
import shlex
import signal
import subprocess
import tarfile
import time
from pathlib import Path

from overlayfs_py import procfs

DOCKER = "/usr/bin/docker"  # Debian's docker.io CLI (API 1.41)
IMAGE = "busybox:demo"
SHELL_INPUT = (
    "echo hello from $(hostname), I am pid $$",
    "echo from the shell > /etc/motd",  # a new file: the image's etc has no motd
)
READY_WAIT = 30


class Service:
    """``pyoverlay serve`` on *sock*, its output in a log file."""

    def __init__(self, demo, work: Path) -> None:
        self.sock = work / "docker.sock"
        self.host = f"unix://{self.sock}"
        self.log = work / "serve.log"
        self.config = work / "docker-config"
        self.config.mkdir()
        self._logf = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            demo.pyoverlay("serve", "-H", self.host),
            cwd=work,
            env=demo.runner_env(work),
            stdin=subprocess.DEVNULL,
            stdout=self._logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + READY_WAIT
        while self.docker("version", "--format", "{{.Server.APIVersion}}").returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"pyoverlay serve did not start: {self.log.read_text(errors='replace')[-400:]}")
            time.sleep(0.2)

    def env(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.config),
            "DOCKER_CONFIG": str(self.config),
            "LANG": "C.UTF-8",
        }

    def argv(self, *args: str) -> list[str]:
        return [DOCKER, "-H", self.host, *args]

    def docker(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*args), env=self.env(), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
        )

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._logf.close()
        return self.proc.returncode


def _cmd(demo, svc: Service, *args: str, show_output: bool = True) -> subprocess.CompletedProcess[str]:
    demo.say("  $ docker -H unix://.../docker.sock " + shlex.join(args))
    r = svc.docker(*args)
    if show_output and (r.stdout.strip() or r.stderr.strip()):
        demo.indent((r.stdout + r.stderr).rstrip())
    if r.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def _tarball(base: Path, dest: Path) -> Path:
    with tarfile.open(dest, "w") as tf:
        for entry in sorted(os.listdir(base)):
            tf.add(base / entry, arcname=entry)
    return dest


_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _printable(raw: bytes) -> str:
    """Terminal output without its escape sequences (the shell asks for the cursor
    position) and carriage returns."""
    return _ESCAPES.sub("", raw.decode(errors="replace")).replace("\r", "").strip()


def _descendants(pid: int) -> list[int]:
    """*pid* and every process below it (by /proc's ppid)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            ppid = procfs.stat(d).ppid
        except OSError:
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def _with_roles(forest: str, service: int) -> str:
    """The ``ps --forest`` lines with each process's part: the service, a monitor (its
    child), a FUSE server (a monitor's child on the host) or a container's PID 1 (a
    monitor's child in a pid namespace of its own)."""
    host_ns = os.readlink("/proc/self/ns/pid")
    out = []
    for line in forest.splitlines():
        fields = line.split(None, 2)
        role = ""
        if len(fields) >= 2 and fields[0].isdigit():
            pid, ppid = int(fields[0]), int(fields[1])
            try:
                ns = os.readlink(f"/proc/{pid}/ns/pid")
            except OSError:
                ns = host_ns
            if pid == service:
                role = "the service"
            elif ppid == service:
                role = "a monitor"
            elif ns != host_ns:
                role = "the container's PID 1"
            else:
                role = "its FUSE server"
        out.append(f"{line}    <- {role}" if role else line)
    return "\n".join(out)


class Terminal:
    """``docker run -it ...`` on a pseudo-terminal the demo types into."""

    def __init__(self, svc: Service, *args: str) -> None:
        self.master, slave = os.openpty()
        self.proc = subprocess.Popen(
            svc.argv(*args), env=svc.env(), stdin=slave, stdout=slave, stderr=slave, start_new_session=True
        )
        os.close(slave)
        self.output = b""

    def _until(self, done, timeout: float) -> bool:
        """Read the terminal until ``done(output)`` holds (True), or *timeout* or the end of
        the output (whether it holds then)."""
        deadline = time.monotonic() + timeout
        while not done(self.output):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            r, _, _ = select.select([self.master], [], [], left)
            if r:
                try:
                    data = os.read(self.master, 4096)
                except OSError:
                    data = b""
                if not data:
                    return done(self.output)
                self.output += data
        return True

    def expect(self, what: bytes, timeout: float = READY_WAIT) -> bool:
        return self._until(lambda out: what in out, timeout)

    def expect_count(self, what: bytes, n: int, timeout: float = READY_WAIT) -> bool:
        """Wait until *what* has appeared *n* times (a prompt after a command)."""
        return self._until(lambda out: out.count(what) >= n, timeout)

    def type(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\r")

    def close(self) -> int | None:
        try:
            return self.proc.wait(READY_WAIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)
        finally:
            os.close(self.master)


def part(demo, base: Path) -> int:
    """*demo*: the scripts/demo.py module (say, heading, failed, indent, pyoverlay...)."""
    demo.say()
    if not demo.ROOT:
        demo.say("#### Part 5, the docker CLI through pyoverlay serve, needs root: skipped.")
        return 0
    if not os.access(DOCKER, os.X_OK):
        demo.say(
            f"#### Part 5, the docker CLI through pyoverlay serve: skipped (no {DOCKER}; scripts/setup installs it)."
        )
        return 0
    failures = len(demo.FAILURES)
    demo.say("#### Part 5: the docker CLI drives pyoverlay: pyoverlay serve")
    work = base / "api"
    work.mkdir()
    if not demo.build_image(work):
        return 1
    svc = None
    try:
        demo.heading("The service: pyoverlay serve on a private socket")
        demo.say(f"  $ pyoverlay serve -H unix://{work}/docker.sock &")
        svc = Service(demo, work)
        demo.say("  the docker CLI (Debian's docker.io, no dockerd) talks to it with -H:")
        _cmd(demo, svc, "version", "--format", "server: {{.Server.Platform.Name}}, API {{.Server.APIVersion}}")
        _show(demo, svc, work)
    except (AssertionError, subprocess.TimeoutExpired, OSError) as e:
        demo.failed(str(e).splitlines()[0] if str(e) else repr(e))
    finally:
        if svc is not None:
            demo.heading("Removing the containers, then stopping the service")
            r = svc.docker("rm", "-f", "web", "shell")
            demo.say("  $ docker -H ... rm -f web shell")
            demo.indent((r.stdout + r.stderr).rstrip() or "(no output)")
            rc = svc.stop()
            demo.say(f"  the service exited ({rc}) and removed its socket: {not svc.sock.exists()}")
    return 1 if len(demo.FAILURES) > failures else 0


def _show(demo, svc: Service, work: Path) -> None:
    demo.heading("An image: docker import of a busybox rootfs tarball")
    tar = _tarball(work / "base", work / "busybox.tar")
    demo.say(f"  $ docker -H ... import {tar.name} {IMAGE}")
    r = svc.docker("import", str(tar), IMAGE)
    if r.returncode != 0:
        raise AssertionError(f"docker import failed: {r.stderr.strip()}")
    demo.indent(r.stdout.strip())
    _cmd(demo, svc, "images")

    demo.heading("Side by side: docker run -d (a web server) and docker run -it (a shell)")
    _cmd(demo, svc, "run", "-d", "--name", "web", IMAGE, "httpd", "-f", "-p", "8080", "-h", "/etc")
    demo.say(f"  $ docker -H ... run -it --name shell {IMAGE} sh      (on a terminal the demo types into)")
    term = Terminal(svc, "run", "-it", "--name", "shell", IMAGE, "sh")
    try:
        if not term.expect(b"# "):
            raise AssertionError("the interactive shell showed no prompt")
        term.type(SHELL_INPUT[0])
        if not term.expect(b"I am pid 1"):
            raise AssertionError("the shell did not answer (it should be pid 1 in its container)")
        term.type(SHELL_INPUT[1])
        if not term.expect_count(b"# ", 3):
            raise AssertionError("the shell did not come back to its prompt")
        demo.indent(_printable(term.output), "    | ")

        demo.heading("On the host: ps -aef --forest, from the service down")
        pids = _descendants(svc.proc.pid)
        r = subprocess.run(
            ["ps", "--forest", "-o", "pid,ppid,user,args", "-p", ",".join(map(str, pids))],
            capture_output=True,
            text=True,
            timeout=30,
        )
        demo.indent(_with_roles(r.stdout.rstrip(), svc.proc.pid))
        demo.say("  The service is the parent of one monitor per container (as dockerd's shims); each")
        demo.say("  monitor has its FUSE server (on the host, outside the container) and the container's")
        demo.say("  PID 1: httpd in one, sh in the other.")
        tree = r.stdout
        for what in ("httpd -f", " sh"):
            if what not in tree:
                demo.failed(f"{what.strip()!r} is not under the service in ps --forest")

        term.type("exit 7")
        code = term.close()
        demo.say(f"  the shell exited; docker run -it returned {code}")
        if code != 7:
            demo.failed(f"docker run -it returned {code}, not the shell's 7")
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
            term.close()

    demo.heading("Then as with dockerd: ps, exec, logs, diff")
    _cmd(demo, svc, "ps", "-a", "--format", "table {{.Names}}\t{{.Image}}\t{{.Command}}\t{{.Status}}")
    _cmd(demo, svc, "exec", "web", "ps")
    _cmd(demo, svc, "diff", "shell")
    diff = svc.docker("diff", "shell").stdout.split("\n")
    if "A /etc/motd" not in diff:
        demo.failed("docker diff shell does not show A /etc/motd")
