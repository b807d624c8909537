"""``pyoverlay serve``: start the API service (docs/api.md).

Where it listens (dockerd's ``-H`` spellings, repeatable):

* ``unix:///PATH``: a unix socket. Without ``-H``: ``/run/pyoverlay/docker.sock`` as root,
  ``$XDG_RUNTIME_DIR/pyoverlay/docker.sock`` for an ordinary user (whose containers are
  then rootless, as ``pyoverlay run`` is for that user). The default socket's directory is
  the state dir (0700, the user's own); as root, when the group ``pyoverlay`` exists, the
  directory is given to it with mode 0710 (search only) and the socket to it with mode
  0660: the group is root's equal, as docker's ``docker`` group is. Root's sockets are
  0660 (group ``pyoverlay``, else root's), an ordinary user's 0600. A socket another live
  service answers on is refused; a stale one (nobody answers) is replaced.
* ``tcp://HOST:PORT``: a loopback address starts with a warning (anyone on the machine can
  use it); any other address only with TLS and client certificates (``--tlsverify
  --tlscacert --tlscert --tlskey``, dockerd's spelling), else it refuses to start.

SIGTERM and SIGINT end it cleanly: its sockets are removed.
"""

from __future__ import annotations

import contextlib
import grp
import ipaddress
import os
import signal
import socket
import stat
import sys
import threading
from dataclasses import dataclass

import click

from overlayfs_py.errors import fail

from ..errors import RunnerError

#: the group whose members may use root's socket (dockerd's ``docker`` group)
SOCKET_GROUP = "pyoverlay"


class ServeError(RunnerError):
    pass


def default_socket() -> str:
    """``/run/pyoverlay/docker.sock`` as root, ``$XDG_RUNTIME_DIR/pyoverlay/docker.sock``
    for an ordinary user."""
    from overlayfs_py.privilege import host_root

    if host_root():
        return "/run/pyoverlay/docker.sock"
    base = os.environ.get("XDG_RUNTIME_DIR")
    if not base or not os.path.isabs(base):
        raise ServeError("XDG_RUNTIME_DIR is not set (or not absolute): give the socket with -H unix:///PATH")
    return os.path.join(base, "pyoverlay", "docker.sock")


def build_router():
    from . import containers, ctl, images, networks, system
    from . import exec as exec_
    from .server import Router

    router = Router()
    router.include(images.router)
    router.include(containers.router)  # create, start, attach, wait, logs, restart
    router.include(exec_.router)
    router.include(ctl.router)  # ps, inspect, stop, rm, diff, commit, cp, export, events
    router.include(networks.router)  # network ls / inspect (create, rm...: system's 501)
    router.include(system.router)  # last: its catch-alls answer what no module serves
    return router


@dataclass
class Listen:
    kind: str  # "unix" | "tcp"
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix://{self.path}"
        return f"tcp://[{self.host}]:{self.port}" if ":" in self.host else f"tcp://{self.host}:{self.port}"


def parse_host(spec: str, tls: bool) -> Listen:
    """dockerd's ``-H``: ``unix:///PATH`` (``unix://`` alone: the default socket),
    ``tcp://HOST:PORT`` (``tcp://`` alone: 127.0.0.1; no port: 2375, 2376 with TLS;
    ``tcp://:PORT``: every address), a bare ``/PATH``: a unix socket."""
    if spec.startswith("unix://") or spec.startswith("/"):
        path = spec[len("unix://") :] if spec.startswith("unix://") else spec
        if not path:
            path = default_socket()
        if not path.startswith("/"):
            raise ServeError(f"invalid -H {spec!r}: the socket path must be absolute (unix:///PATH)")
        return Listen("unix", path=os.path.normpath(path))
    if spec.startswith("tcp://"):
        rest = spec[len("tcp://") :].rstrip("/")
        if "/" in rest or "?" in rest or "@" in rest:
            raise ServeError(f"invalid -H {spec!r}: expected tcp://HOST:PORT")
        default_port = 2376 if tls else 2375
        if rest.startswith("["):  # [v6]:port
            host, sep, tail = rest[1:].partition("]")
            if not sep or (tail and not tail.startswith(":")):
                raise ServeError(f"invalid -H {spec!r}: expected tcp://[ADDRESS]:PORT")
            port_s = tail[1:]
        elif rest.count(":") > 1:
            raise ServeError(f"invalid -H {spec!r}: an IPv6 address goes in brackets (tcp://[::1]:2375)")
        else:
            host, _, port_s = rest.partition(":")
        if not rest:
            host = "127.0.0.1"
        elif not host:
            host = "0.0.0.0"  # noqa: S104 - dockerd's tcp://:PORT; refused below without TLS
        try:
            port = int(port_s) if port_s else default_port
        except ValueError:
            raise ServeError(f"invalid -H {spec!r}: the port {port_s!r} is not a number") from None
        if not 0 < port < 65536:
            raise ServeError(f"invalid -H {spec!r}: the port must be 1-65535")
        return Listen("tcp", host=host, port=port)
    scheme = spec.split("://", 1)[0] if "://" in spec else spec
    raise ServeError(f"invalid -H {spec!r}: {scheme!r} is not supported (unix:///PATH or tcp://HOST:PORT)")


def is_loopback(host: str, port: int) -> bool:
    """Every address *host* resolves to is a loopback one."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ServeError(f"cannot resolve {host!r}: {e.strerror}") from None
    addrs = {str(info[4][0]) for info in infos}
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def check_socket_free(path: str) -> None:
    """Refuse a socket another live service answers on, or a path that is not a socket
    (checked again, under a lock, when the socket is made: ApiServer.listen_unix)."""
    from .server import _answers

    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ServeError(f"{path} exists and is not a socket; refusing to replace it")
    if _answers(path):
        raise ServeError(f"another service is already listening on {path}; stop it first")


def socket_dir(path: str, default: bool, gid: int | None) -> None:
    """Make the socket's directory: the default one is the state dir (private; root's is
    given to the group ``pyoverlay`` for search, 0710); another is made 0755 if missing."""
    d = os.path.dirname(path)
    if default:
        from overlayfs_py.state import StateDirError, private_dir

        try:
            private_dir(d, "socket dir")
        except StateDirError as e:
            raise ServeError(str(e)) from None
        if gid is not None and os.geteuid() == 0:
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.fchown(fd, -1, gid)
                os.fchmod(fd, 0o710)
            finally:
                os.close(fd)
    else:
        try:
            os.makedirs(d, mode=0o755, exist_ok=True)
        except OSError as e:
            raise ServeError(f"cannot create the socket dir {d}: {e.strerror}") from None


def socket_group(name: str | None) -> int | None:
    """The gid for root's sockets (*name*, default ``pyoverlay``, if that group exists);
    None: the user's own group."""
    if os.geteuid() != 0:
        if name:
            raise ServeError("--group: only root gives its socket to a group")
        return None
    try:
        return grp.getgrnam(name or SOCKET_GROUP).gr_gid
    except KeyError:
        if name:
            raise ServeError(f"--group {name}: no such group") from None
        return None


def tls_context(cacert: str | None, cert: str | None, key: str | None):
    """A server TLS context requiring client certificates signed by *cacert*."""
    import ssl

    missing = [n for n, v in (("--tlscacert", cacert), ("--tlscert", cert), ("--tlskey", key)) if not v]
    if missing:
        raise ServeError(f"--tlsverify needs {', '.join(missing)}")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_verify_locations(cafile=cacert)
        ctx.load_cert_chain(certfile=str(cert), keyfile=key)
    except (OSError, ssl.SSLError) as e:
        raise ServeError(f"TLS: cannot load the certificates: {e}") from None
    return ctx


@click.command("serve", context_settings={"help_option_names": ["--help"]})
@click.option(
    "-H",
    "--host",
    "hosts",
    multiple=True,
    metavar="unix:///PATH|tcp://HOST:PORT",
    help="Where to listen (repeatable). Default: /run/pyoverlay/docker.sock as root, "
    "$XDG_RUNTIME_DIR/pyoverlay/docker.sock for an ordinary user.",
)
@click.option("-G", "--group", default=None, metavar="GROUP", help="Group of root's unix sockets (default: pyoverlay).")
@click.option("--tlsverify", is_flag=True, help="TLS with client certificates on TCP listeners.")
@click.option("--tlscacert", metavar="FILE", help="CA that signs the clients' certificates.")
@click.option("--tlscert", metavar="FILE", help="The server's certificate.")
@click.option("--tlskey", metavar="FILE", help="The server's key.")
def serve_cmd(hosts, group, tlsverify, tlscacert, tlscert, tlskey) -> None:
    """Serve the Docker Engine API, so that the docker CLI and docker-py drive pyoverlay."""
    try:
        server, listens = _prepare(hosts, group, tlsverify, tlscacert, tlscert, tlskey)
    except (RunnerError, OSError) as e:
        fail(e, 1)

    def stop(_sig, _frame):
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print("pyoverlay serve: listening on " + ", ".join(map(str, listens)), file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        server.remove_sockets()
    print("pyoverlay serve: stopped", file=sys.stderr, flush=True)


def _prepare(hosts, group, tlsverify, tlscacert, tlscert, tlskey):
    from .server import ApiServer

    tls_given = any((tlscacert, tlscert, tlskey))
    if tls_given and not tlsverify:
        raise ServeError("--tlscacert/--tlscert/--tlskey need --tlsverify (clients must show a certificate)")
    ctx = tls_context(tlscacert, tlscert, tlskey) if tlsverify else None
    default = not hosts
    listens = [parse_host(h, ctx is not None) for h in hosts or (f"unix://{default_socket()}",)]
    gid = socket_group(group)
    warnings = []
    for ls in listens:
        if ls.kind != "tcp":
            continue
        if is_loopback(ls.host, ls.port):
            if ctx is None:
                warnings.append(f"WARNING: API is accessible on {ls} without encryption.")
                print(
                    f"pyoverlay serve: warning: {ls} has no TLS: anyone on this machine can use it "
                    f"to run containers as {'root' if os.geteuid() == 0 else 'you'}",
                    file=sys.stderr,
                    flush=True,
                )
        elif ctx is None:
            raise ServeError(
                f"refusing to listen on {ls} without TLS: anyone who reaches it could run containers "
                f"as {'root' if os.geteuid() == 0 else 'you'}; give --tlsverify --tlscacert --tlscert --tlskey"
            )
    server = ApiServer(build_router())
    server.warnings = warnings
    try:
        for ls in listens:
            if ls.kind == "unix":
                check_socket_free(ls.path)
                socket_dir(ls.path, default or ls.path == _default_or_none(), gid)
                mode = 0o660 if os.geteuid() == 0 else 0o600
                server.listen_unix(ls.path, mode=mode, gid=gid)
            else:
                try:
                    server.listen_tcp(ls.host, ls.port, ssl_context=ctx)
                except OSError as e:
                    raise ServeError(f"cannot listen on {ls}: {e.strerror}") from None
    except BaseException:
        server.remove_sockets()
        raise
    return server, listens


def _default_or_none() -> str | None:
    with contextlib.suppress(ServeError):
        return default_socket()
    return None


def register(main: click.Group) -> None:
    main.add_command(serve_cmd)
