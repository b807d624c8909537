"""Rootless networking: a network namespace of the container's own, connected to the host
by ``slirp4netns`` (user-mode TCP/IP, as rootless podman and docker do).

An ordinary user cannot make a veth pair into the host's network namespace nor touch its
firewall, so a rootless container's traffic goes through a process of the user's on the
host side: slirp4netns holds a tap device (``tap0``) in the container's namespace and
turns its packets into the user's own sockets (outbound connections, DNS at 10.0.2.3),
and forwards published ports (``-p``) with listening sockets of its own on the host.

- the holder (runner/userns.py) unshares ``CLONE_NEWNET`` with the user namespace, so
  the network namespace is owned by the container's user namespace;
- the monitor, still in the host's namespaces, starts slirp4netns on it
  (:meth:`Slirp.start`): ``--configure`` (tap0 10.0.2.100/24, gateway 10.0.2.2, lo up),
  ``--exit-fd`` (the monitor holds the write end of a pipe: its exit -- or its SIGKILL --
  ends slirp4netns), ``--ready-fd``, ``--api-socket`` in the container's data dir;
- ``-p`` goes through the API socket (``add_hostfwd``, JSON) once slirp4netns is ready
  (:meth:`Slirp.publish`): a host port 0 becomes a free port picked here; a port that is
  in use is a one-line error (exit 125);
- PID 1 joins the namespace (``container.Launch.net_fd``).

Pure planning (:func:`plan`) reads only; the process and the socket are in
:class:`Slirp`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass

from ..errors import RunnerError
from ..spec import SpecError, parse_slirp_options
from .ports import PortMapping

BINARY = "slirp4netns"
PACKAGE = "slirp4netns"
ADDRESS = "10.0.2.100"  # --configure: the network address + 100
GATEWAY = "10.0.2.2"  # the host, as the container sees it
DNS = "10.0.2.3"  # slirp's DNS forwarder
PREFIX_LEN = 24
MTU = 65520
TAP = "tap0"
TUN = "/dev/net/tun"  # slirp4netns opens it in the container's namespace, as the user
SOCKET_NAME = "slirp4netns.sock"
LOG_NAME = "slirp4netns.log"


class SlirpError(RunnerError):
    """slirp4netns could not be started, or a port not published (one line, 125)."""


@dataclass(frozen=True)
class SlirpPlan:
    binary: str
    allow_host_loopback: bool
    ports: tuple[PortMapping, ...]
    data_dir: str  # the api socket and the log live there (removed with the container)

    def argv(self, api_socket: str, exit_fd: int, ready_fd: int, userns: str, netns: str) -> list[str]:
        argv = [
            self.binary,
            "--configure",
            f"--mtu={MTU}",
            f"--api-socket={api_socket}",
            f"--exit-fd={exit_fd}",
            f"--ready-fd={ready_fd}",
            f"--userns-path={userns}",
            "--netns-type=path",
        ]
        if not self.allow_host_loopback:
            argv.insert(3, "--disable-host-loopback")
        return [*argv, netns, TAP]


def is_slirp_network(network: str) -> bool:
    return network == "slirp4netns" or network.startswith("slirp4netns:")


def plan(network: str, ports: tuple[PortMapping, ...], data_dir: str) -> SlirpPlan:
    """A rootless run's network (``bridge`` or ``slirp4netns[:OPTS]``). Reads only."""
    opts = parse_slirp_options(network) if is_slirp_network(network) else {"allow_host_loopback": False}
    binary = shutil.which(BINARY)
    if binary is None:
        raise SpecError(
            f"rootless networking needs {BINARY} (install the Debian package {PACKAGE}), or use --network none"
        )
    if not os.access(TUN, os.R_OK | os.W_OK):
        fix = "modprobe tun" if not os.path.exists(TUN) else f"a distribution makes it mode 0666: chmod 0666 {TUN}"
        raise SpecError(f"rootless networking needs {TUN} open to the user ({fix}), or use --network none")
    for p in ports:
        if ":" in p.host_ip:
            raise SpecError(f"-p {p}: a rootless container publishes on IPv4 addresses only ({BINARY})")
    return SlirpPlan(binary, opts["allow_host_loopback"], ports, data_dir)


class Slirp:
    """slirp4netns attached to a container's network namespace (a child of the monitor)."""

    def __init__(self, plan: SlirpPlan):
        self.plan = plan
        self.proc: subprocess.Popen | None = None
        self.exit_w: int | None = None  # closing it ends slirp4netns
        self.dir_fd: int | None = None  # the data dir (the socket's path is /proc/self/fd/N/...)
        self.ports: list[PortMapping] = []

    # --- start and stop ---------------------------------------------------------------

    def start(self, userns_path: str, netns_path: str, timeout: float = 60.0) -> None:
        """Start slirp4netns on the namespace at *netns_path* (owned by *userns_path*) and
        wait until it is ready. SlirpError, with its last line of output, if it is not."""
        self.dir_fd = os.open(self.plan.data_dir, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(SOCKET_NAME, dir_fd=self.dir_fd)
        exit_r, self.exit_w = os.pipe()
        ready_r, ready_w = os.pipe()
        log = os.open(
            os.path.join(self.plan.data_dir, LOG_NAME), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600
        )
        sock = f"/proc/self/fd/{self.dir_fd}/{SOCKET_NAME}"  # in slirp4netns: its inherited copy
        try:
            self.proc = subprocess.Popen(
                self.plan.argv(sock, exit_r, ready_w, userns_path, netns_path),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                pass_fds=(exit_r, ready_w, self.dir_fd),
                start_new_session=True,  # not in the terminal's process group (^C)
            )
        except OSError as e:
            os.close(ready_r)
            raise SlirpError(f"cannot start {BINARY}: {e.strerror or e}") from None
        finally:
            os.close(exit_r)
            os.close(ready_w)
            os.close(log)
        try:
            ready = _read_ready(ready_r, self.proc, timeout)
        finally:
            os.close(ready_r)
        if not ready:
            self.stop()
            raise SlirpError(f"{BINARY} did not start: {self._last_log_line()}")

    def stop(self, timeout: float = 10.0) -> None:
        """End slirp4netns (its exit fd closed; SIGKILL if it lingers), remove its socket."""
        if self.exit_w is not None:
            with contextlib.suppress(OSError):
                os.close(self.exit_w)
            self.exit_w = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(signal.SIGKILL)
                self.proc.wait()
            self.proc = None
        if self.dir_fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(SOCKET_NAME, dir_fd=self.dir_fd)
            os.close(self.dir_fd)
            self.dir_fd = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def _last_log_line(self) -> str:
        try:
            with open(os.path.join(self.plan.data_dir, LOG_NAME), errors="replace") as f:
                lines = [line.strip() for line in f if line.strip()]
        except OSError:
            lines = []
        code = self.proc.poll() if self.proc is not None else None
        return lines[-1] if lines else (f"exit status {code}" if code is not None else "no answer")

    # --- the API ------------------------------------------------------------------------

    def request(self, execute: str, arguments: dict | None = None, timeout: float = 30.0) -> dict:
        """One request on the API socket (one per connection, SHUT_WR after it)."""
        if self.dir_fd is None:
            raise SlirpError(f"{BINARY} is not running")
        body: dict = {"execute": execute}
        if arguments is not None:
            body["arguments"] = arguments
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.settimeout(timeout)
        try:
            s.connect(f"/proc/self/fd/{self.dir_fd}/{SOCKET_NAME}")
            s.sendall(json.dumps(body).encode())
            s.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := s.recv(4096):
                chunks.append(chunk)
        except OSError as e:
            raise SlirpError(f"{BINARY} api ({execute}): {e.strerror or e}") from None
        finally:
            s.close()
        try:
            answer = json.loads(b"".join(chunks) or b"{}")
        except ValueError:
            raise SlirpError(f"{BINARY} api ({execute}): not JSON: {b''.join(chunks)[:200]!r}") from None
        if not isinstance(answer, dict):
            raise SlirpError(f"{BINARY} api ({execute}): unexpected answer {answer!r}")
        return answer

    def publish(self) -> list[PortMapping]:
        """Forward every planned port (``add_hostfwd``); the mappings with the host port
        actually bound. SlirpError for a port that cannot be bound (nothing is undone
        here: :meth:`stop` ends every forward with the process)."""
        for p in self.plan.ports:
            host_ip = p.host_ip or "0.0.0.0"
            port = p.host_port or free_port(host_ip, p.proto)
            answer = self.request(
                "add_hostfwd",
                {"proto": p.proto, "host_addr": host_ip, "host_port": port, "guest_port": p.container_port},
            )
            if "return" not in answer:
                err = answer.get("error")
                desc = err.get("desc", "") if isinstance(err, dict) else ""
                why = bind_problem(host_ip, port, p.proto) or desc or json.dumps(answer)
                raise SlirpError(f"cannot publish {host_ip}:{port}->{p.container_port}/{p.proto}: {why}")
            self.ports.append(PortMapping(p.host_ip, port, p.container_port, p.proto))
        return list(self.ports)

    def record(self) -> dict:
        """What :attr:`runner.state.Record.net` keeps of this network."""
        return {
            "mode": BINARY,
            "address": ADDRESS,
            "prefix_len": PREFIX_LEN,
            "gateway": GATEWAY,
            "dns": DNS,
            "allow_host_loopback": self.plan.allow_host_loopback,
            "pid": self.pid,
            "ports": [p.to_dict() for p in self.ports],
        }


def _read_ready(fd: int, proc: subprocess.Popen, timeout: float) -> bool:
    """slirp4netns writes "1" on its ready fd; EOF (it exited) or nothing in *timeout*: False."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        r, _, _ = select.select([fd], [], [], min(left, 1.0))
        if r:
            return os.read(fd, 16).startswith(b"1")
        if proc.poll() is not None:
            return False


def _sock_type(proto: str) -> int:
    return socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM


def free_port(host_ip: str, proto: str) -> int:
    """A port free on *host_ip* now (``-p CTR``: docker picks one)."""
    with socket.socket(socket.AF_INET, _sock_type(proto)) as s:
        s.bind((host_ip, 0))
        return int(s.getsockname()[1])


def bind_problem(host_ip: str, port: int, proto: str) -> str:
    """Why *host_ip*:*port* cannot be bound ("address already in use"), or ""."""
    with socket.socket(socket.AF_INET, _sock_type(proto)) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as slirp binds
        try:
            s.bind((host_ip, port))
        except OSError as e:
            return (e.strerror or str(e)).lower() if e.errno != errno.EADDRINUSE else "address already in use"
    return ""
