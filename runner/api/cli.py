"""``pyoverlay serve``: start the API service (docs/api.md)."""

from __future__ import annotations

import os
import signal
import sys
import threading

import click


def default_socket() -> str:
    """``/run/pyoverlay/docker.sock`` as root, ``$XDG_RUNTIME_DIR/pyoverlay/docker.sock``
    for an ordinary user."""
    if os.geteuid() == 0:
        return "/run/pyoverlay/docker.sock"
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
    return os.path.join(base, "pyoverlay", "docker.sock")


def build_router():
    from . import containers, system
    from . import exec as exec_
    from .server import Router

    router = Router()
    router.include(system.router)
    router.include(containers.router)
    router.include(exec_.router)
    router.include(containers.fallback_router)  # last: inspect/stop/rm until their own module
    return router


@click.command("serve", context_settings={"help_option_names": ["--help"]})
@click.option(
    "-H",
    "--host",
    "hosts",
    multiple=True,
    metavar="unix:///PATH|tcp://HOST:PORT",
    help="Where to listen (repeatable). Default: unix:// + the default socket.",
)
def serve_cmd(hosts: tuple[str, ...]) -> None:
    """Serve the Docker Engine API, so that the docker CLI and docker-py drive pyoverlay."""
    from .server import ApiServer

    server = ApiServer(build_router())
    for h in hosts or (f"unix://{default_socket()}",):
        if h.startswith("unix://"):
            path = h[len("unix://") :]
            os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
            server.listen_unix(path)
        elif h.startswith("tcp://"):
            hostport = h[len("tcp://") :]
            host, _, port = hostport.rpartition(":")
            server.listen_tcp(host.strip("[]"), int(port))
        else:
            raise click.UsageError(f"invalid -H {h!r}: expected unix:///PATH or tcp://HOST:PORT")

    def stop(_sig, _frame):
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print("pyoverlay serve: listening on " + ", ".join(hosts or (default_socket(),)), file=sys.stderr, flush=True)
    server.serve_forever()


def register(main: click.Group) -> None:
    main.add_command(serve_cmd)
