"""``pyoverlay run | ps | exec | stop | kill | top | rm | logs``: docker's spellings.

Options become a :class:`runner.spec.RunSpec` here; the work is in
:mod:`runner.monitor` (run), :mod:`runner.nsexec` (exec) and :mod:`runner.control`
(ps, stop, kill, top, rm). :func:`resolvers` is how the filesystem's commands (diff,
explain, trace, mount --image) find containers and images: the top-level command
(:mod:`pyoverlay_cli`) passes it to them.
"""

from __future__ import annotations

import json
import os
import sys
import time

import click

from overlayfs_py.errors import fail
from overlayfs_py.resolvers import ContainerView, Resolvers

from . import control, state
from .cgroups import Limits, parse_size
from .errors import EXIT_RUNNER, RunnerError
from .net.ports import parse_add_host, parse_dns, parse_publishes
from .spec import (
    RunSpec,
    SpecError,
    apply_image,
    check_name,
    check_workdir,
    default_network,
    parse_caps,
    parse_cgroupns,
    parse_env,
    parse_network,
    parse_volume,
)

#: usage errors of these exit with 125, the runner's own error, as docker's do
USAGE_125 = frozenset({"run", "exec"})


# --- what the filesystem's commands may ask of the runner ---------------------------------


def container_view(rec: dict) -> ContainerView:
    """A container record as the filesystem's commands see it."""
    return ContainerView(
        id=rec["id"],
        name=rec.get("name"),
        upper=rec.get("upper"),
        lowers=tuple(rec.get("layers", [])),
        init_layer=rec.get("init_layer"),
        merged=rec.get("merged"),
        running=state.status(rec) == "running",
    )


def _find_container(ref: str) -> ContainerView | None:
    try:
        return container_view(state.resolve(ref))
    except state.StateError:
        return None


def _all_containers() -> list[ContainerView]:
    return [container_view(r) for r in state.all_records()]


def _image_layers(ref: str, docker_root: str | None) -> list[str]:
    from .images.cli import find_image

    return list(find_image(ref, docker_root).layers)


def resolvers() -> Resolvers:
    """The container and image look-ups of this runner, for the filesystem's commands."""
    return Resolvers(find_container=_find_container, all_containers=_all_containers, find_image=_image_layers)


def _layers(spec: str) -> tuple[str, ...]:
    from overlayfs_py.config import ConfigError, split_positional_lowers

    try:
        parts = split_positional_lowers(spec)
    except ConfigError as e:
        raise SpecError(str(e)) from None
    out = []
    for p in parts:
        real = os.path.realpath(p)
        if not os.path.isdir(real):
            what = "does not exist" if not os.path.exists(real) else "is not a directory"
            raise SpecError(f"lower layer {p!r} {what}")
        out.append(real)
    return tuple(out)


def _trace_file(path: str | None) -> str | None:
    if path is None:
        return None
    real = os.path.realpath(path)
    if not os.path.isdir(os.path.dirname(real)) or os.path.isdir(real):
        raise SpecError(f"trace file {path!r}: not a file in an existing directory")
    return real


def _command(argv: tuple[str, ...]) -> list[str]:
    """CMD [ARGS...]; a ``--`` before it is ours (click keeps it once positionals began)."""
    args = list(argv)
    if args and args[0] == "--":
        args = args[1:]
    if not args:
        raise SpecError("no command given: ... [--] CMD [ARGS...]")
    return args


def _from_image(ref, docker_root, args, env, workdir, user):
    """``run --image``: the image's layers, and its config merged with CMD/-e/-w/-u."""
    from .images import ImageError
    from .images.cli import find_image

    try:
        img = find_image(ref, docker_root)
    except ImageError as e:
        raise SpecError(str(e)) from None
    if not img.layers:
        raise SpecError(f"image {ref} has no layers")
    cmd = list(args[1:] if args and args[0] == "--" else args)
    argv, env_list, wd, user = apply_image(img.run_config(), cmd, parse_env(list(env)), workdir, user)
    record = {"ref": ref, "id": img.id, "source": img.source}
    return tuple(img.layers), argv, env_list, wd, user, record


def register(main: click.Group) -> None:
    for cmd in (run_cmd, ps_cmd, exec_cmd, stop_cmd, kill_cmd, top_cmd, rm_cmd, logs_cmd):
        if cmd.name in USAGE_125:
            cmd.own_error_code = EXIT_RUNNER  # type: ignore[attr-defined]  # see overlayfs_py.cli
        main.add_command(cmd)


@click.command("run", context_settings={"help_option_names": ["--help"], "allow_interspersed_args": False})
@click.argument("args", nargs=-1, metavar="LOWER1[:LOWER2...] CMD [ARGS]... | --image REF [CMD [ARGS]...]")
@click.option(
    "--image",
    metavar="REF",
    help="Run the image REF (name[:tag], name@sha256:..., id or prefix): its layers "
    "are the lowers and its config gives the default command, env, workdir, user.",
)
@click.option(
    "--docker-root",
    metavar="DIR",
    help="Docker's data root for --image (default $PYOVERLAY_DOCKER_ROOT or /var/lib/docker).",
)
@click.option("--name", help="Container name (unique).")
@click.option("--rm", "remove", is_flag=True, help="Remove the container and its upper layer when it exits.")
@click.option("--upper", metavar="DIR", help="Keep the upper layer in DIR (default: a fresh one).")
@click.option("-d", "--detach", is_flag=True, help="Run in the background and print the container id.")
@click.option("-i", "--interactive", is_flag=True, help="Keep stdin attached.")
@click.option("-t", "--tty", is_flag=True, help="Allocate a terminal inside the container.")
@click.option("--init", is_flag=True, help="Run a small init as PID 1 that reaps zombies and forwards signals.")
@click.option("-e", "--env", multiple=True, metavar="KEY=VAL", help="Set an environment variable.")
@click.option(
    "-w", "--workdir", metavar="DIR", help="Working directory inside (default: the image's WorkingDir, else /)."
)
@click.option("-u", "--user", metavar="UID[:GID]", help="User (name or id) and group inside.")
@click.option("-h", "--hostname", help="Hostname (default: the short container id).")
@click.option(
    "--net",
    "--network",
    "network",
    default=None,
    help="bridge (the default: as root the pyoverlay0 bridge with NAT and -p; for an ordinary user "
    "slirp4netns), none (only lo), host, or slirp4netns[:allow_host_loopback=true] (rootless)."
    " Default: $PYOVERLAY_NETWORK, else bridge.",
)
@click.option(
    "-p",
    "--publish",
    multiple=True,
    metavar="[IP:][HOST:]CTR[/tcp|udp]",
    help="Publish a container's port on the host.",
)
@click.option("--dns", multiple=True, metavar="IP", help="A name server for the container's /etc/resolv.conf.")
@click.option(
    "--add-host", "add_hosts", multiple=True, metavar="NAME:IP", help="A line for the container's /etc/hosts."
)
@click.option("-v", "--volume", "volumes", multiple=True, metavar="HOST:CTR[:ro]", help="Bind mount.")
@click.option(
    "--cgroupns",
    metavar="private|host",
    help="Cgroup namespace: private (own, /proc/self/cgroup shows /) or host "
    "(default as dockerd: private on cgroup v2, host on v1/hybrid).",
)
@click.option("--read-only", is_flag=True, help="Mount the container's root read-only.")
@click.option("-m", "--memory", metavar="SIZE", help="Memory limit (e.g. 64m, 1g).")
@click.option("--pids-limit", type=int, metavar="N", help="Maximum number of processes.")
@click.option("--cpus", type=float, metavar="N", help="CPU quota in CPUs (e.g. 0.5).")
@click.option("--privileged", is_flag=True, help="Keep all capabilities and skip no_new_privs and masking.")
@click.option("--cap-add", multiple=True, metavar="CAP", help="Keep a capability beyond docker's default set.")
@click.option("--cap-drop", multiple=True, metavar="CAP", help="Drop a capability (ALL for all).")
@click.option(
    "--security-opt",
    "security_opts",
    multiple=True,
    metavar="OPT",
    help="seccomp=unconfined|FILE (docker's JSON profile; default: docker's), no-new-privileges.",
)
@click.option(
    "--stop-timeout",
    type=float,
    default=10.0,
    show_default=True,
    help="Seconds between SIGTERM and SIGKILL when the runner is stopped.",
)
@click.option(
    "--trace",
    "trace_file",
    metavar="FILE",
    help="Write every copy-up, whiteout and opaque-dir event to FILE (JSON lines).",
)
@click.option(
    "--trace-summary", is_flag=True, help="When the container exits, print what it copied up and who did (stderr)."
)
@click.option(
    "--userns-map",
    type=click.Choice(["auto", "subid", "single"]),
    default=None,
    help="Rootless runs: map /etc/subuid ranges with newuidmap (subid), only the "
    "user as root (single), or subid when possible (auto; default "
    "$PYOVERLAY_USERNS_MAP or auto).",
)
def run_cmd(
    args,
    image,
    docker_root,
    name,
    remove,
    upper,
    detach,
    interactive,
    tty,
    init,
    env,
    workdir,
    user,
    hostname,
    network,
    publish,
    dns,
    add_hosts,
    volumes,
    cgroupns,
    read_only,
    memory,
    pids_limit,
    cpus,
    privileged,
    cap_add,
    cap_drop,
    security_opts,
    stop_timeout,
    trace_file,
    trace_summary,
    userns_map,
):
    """Run CMD in new namespaces on LOWER1[:LOWER2...] (LOWER1 on top) plus an upper layer.

    \b
    pyoverlay run [OPTIONS] LOWER1[:LOWER2...] [--] CMD [ARGS...]
    pyoverlay run [OPTIONS] --image REF [[--] CMD [ARGS...]]
    Exit status: CMD's; 128+N if a signal N killed it; 125 for pyoverlay's own
    errors, 126 if CMD cannot be executed, 127 if it is not found.
    """
    try:
        if image is not None:
            layers, argv, env_list, wd, user, img = _from_image(image, docker_root, args, env, workdir, user)
        else:
            if docker_root is not None:
                raise SpecError("--docker-root needs --image")
            if not args:
                raise SpecError(
                    "no layers given: run [OPTIONS] LOWER1[:LOWER2...] [--] CMD "
                    "[ARGS...] or run [OPTIONS] --image REF [CMD [ARGS...]]"
                )
            layers, argv, img = _layers(args[0]), _command(args[1:]), None
            env_list, wd = parse_env(list(env)), check_workdir(workdir or "/")
        spec = RunSpec(
            layers=layers,
            argv=argv,
            name=check_name(name) if name else None,
            upper=os.path.realpath(upper) if upper else None,
            remove=remove,
            detach=detach,
            interactive=interactive,
            tty=tty,
            init=init,
            env=env_list,
            workdir=wd,
            user=user,
            hostname=hostname,
            image=img,
            network=parse_network(network or default_network()),
            publish=parse_publishes(publish),
            dns=tuple(parse_dns(d) for d in dns),
            add_hosts=tuple(parse_add_host(h) for h in add_hosts),
            volumes=[parse_volume(v) for v in volumes],
            read_only=read_only,
            limits=Limits(memory=parse_size(memory) if memory else None, pids=pids_limit, cpus=cpus),
            privileged=privileged,
            cap_add=parse_caps(list(cap_add)),
            cap_drop=parse_caps(list(cap_drop)),
            stop_timeout=stop_timeout,
            trace_file=_trace_file(trace_file),
            trace_summary=trace_summary,
            userns_map=userns_map or _userns_map_default(),
            **_security(security_opts),
            cgroupns=parse_cgroupns(cgroupns) if cgroupns is not None else None,
        )
    except (SpecError, ValueError) as e:
        fail(e, EXIT_RUNNER)
    _check_dirs()
    if os.geteuid() != 0:
        _pin_dirs()
    from .monitor import Monitor

    if detach:
        sys.exit(_run_detached(spec))
    sys.exit(Monitor(spec).run())


def _security(opts) -> dict:
    """--security-opt as RunSpec fields (a profile FILE is read now, as docker's CLI does)."""
    from .seccomp import parse_security_opts

    sec = parse_security_opts(list(opts))
    return {"seccomp": sec.seccomp, "no_new_privileges": sec.no_new_privileges}


def _userns_map_default() -> str:
    from .userns import MAP_ENV, MAP_MODES, default_mode

    mode = default_mode()
    if mode not in MAP_MODES:
        raise SpecError(f"invalid ${MAP_ENV} {mode!r}: expected one of {', '.join(MAP_MODES)}")
    return mode


def _check_dirs() -> None:
    """The state and data dirs are the user's own (0700) before a monitor is started."""
    from overlayfs_py.state import StateDirError

    try:
        state.records_dir()
        state.data_dir()
    except StateDirError as e:
        fail(e, EXIT_RUNNER)


def _pin_dirs() -> None:
    """Rootless: the monitor becomes root of the container's user namespace (its euid reads
    0 there), so the user's state and data dirs are fixed now, while it still is the user."""
    from overlayfs_py.state import state_dir

    os.environ["PYOVERLAY_STATE_DIR"] = state_dir()
    os.environ["PYOVERLAY_DATA_DIR"] = state.data_root()


def _run_detached(spec: RunSpec) -> int:
    from .monitor import Monitor

    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.setsid()
        code = EXIT_RUNNER
        try:
            code = Monitor(spec, notify_fd=w).run()
        finally:
            os._exit(code)
    os.close(w)
    msg = b""  # one line: other processes of the monitor may hold the pipe open
    while b"\n" not in msg and (chunk := os.read(r, 4096)):
        msg += chunk
    text = msg.decode(errors="replace").strip()
    if text.startswith("ok "):
        click.echo(text[3:])
        return 0
    if text.startswith("err "):
        _, status, detail = text.split(" ", 2)
        click.echo(f"pyoverlay: {detail}", err=True)
        return int(status)
    click.echo("pyoverlay: the container monitor exited before starting the container", err=True)
    return EXIT_RUNNER


def _find(ref: str) -> dict:
    try:
        return state.resolve(ref)
    except state.StateError as e:
        fail(e, EXIT_RUNNER)


@click.command("ps")
@click.option("-a", "--all", "show_all", is_flag=True, help="Also exited and dead containers.")
@click.option("-q", "--quiet", is_flag=True, help="Only ids.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def ps_cmd(show_all, quiet, as_json):
    """List containers."""
    try:
        rows = [control.summary(r) for r in state.all_records()]
    except state.StateError as e:
        fail(e, 1)
    if not show_all:
        rows = [r for r in rows if r["status"] == "running"]
    if as_json:
        click.echo(json.dumps(rows, indent=1))
    elif quiet:
        for r in rows:
            click.echo(r["id"][:12])
    else:
        click.echo(control.ps_table(rows, time.time()))


@click.command("exec", context_settings={"help_option_names": ["--help"], "allow_interspersed_args": False})
@click.argument("ref")
@click.argument("argv", nargs=-1, required=True)
@click.option("-i", "--interactive", is_flag=True)
@click.option("-t", "--tty", is_flag=True)
@click.option("-e", "--env", multiple=True, metavar="KEY=VAL")
@click.option("-u", "--user", metavar="UID[:GID]")
@click.option("-w", "--workdir", metavar="DIR")
def exec_cmd(ref, argv, interactive, tty, env, user, workdir):
    """Run CMD in a running container (ID, unique id prefix or name)."""
    from .nsexec import exec_in

    if os.geteuid() != 0:
        _pin_dirs()  # exec joins the container's user namespace (its euid reads 0 there)
    rec = _find(ref)
    try:
        argv = _command(argv)
        env_list = parse_env(list(env))
        wd = check_workdir(workdir) if workdir else None
        sys.exit(exec_in(rec, list(argv), env=env_list, user=user, workdir=wd, tty=tty, interactive=interactive))
    except RunnerError as e:  # ExecError, SpecError (125), ContainerError (its own status)
        fail(e)


@click.command("stop")
@click.argument("refs", nargs=-1, required=True)
@click.option(
    "-t",
    "--time",
    "timeout",
    type=float,
    default=10.0,
    show_default=True,
    help="Seconds to wait after SIGTERM before SIGKILL.",
)
def stop_cmd(refs, timeout):
    """Stop containers: SIGTERM, then SIGKILL after the timeout; waits for the cleanup."""
    _each(refs, lambda rec: control.stop(rec, timeout))


@click.command("kill")
@click.argument("refs", nargs=-1, required=True)
@click.option("-s", "--signal", "sig", default="KILL", show_default=True, help="Signal name or number.")
def kill_cmd(refs, sig):
    """Send a signal to containers' PID 1."""
    try:
        signum = control.parse_signal(sig)
    except ValueError as e:
        fail(e, EXIT_RUNNER)
    _each(refs, lambda rec: control.kill(rec, signum))


@click.command("top")
@click.argument("ref")
def top_cmd(ref):
    """The processes of a container, with their host and container PIDs."""
    try:
        click.echo(control.top_table(_find(ref)))
    except control.ControlError as e:
        fail(e, EXIT_RUNNER)


@click.command("rm")
@click.argument("refs", nargs=-1, required=True)
@click.option("-f", "--force", is_flag=True, help="Stop a running container first (SIGKILL).")
def rm_cmd(refs, force):
    """Remove containers (their record and generated upper layer)."""
    _each(refs, lambda rec: control.remove(rec, force))


@click.command("logs")
@click.argument("ref")
def logs_cmd(ref):
    """Output of a container started with -d (or through the API: its log's lines, stdout
    and stderr as they were written)."""
    rec = _find(ref)
    if not rec.get("data_dir"):
        return
    if "api" in rec:
        _api_logs(rec["id"])
        return
    path = os.path.join(state.container_dir(rec["id"]), "output.log")
    try:
        with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb") as f:
            while chunk := f.read(65536):
                sys.stdout.buffer.write(chunk)
    except FileNotFoundError:
        pass
    except OSError as e:
        fail(f"cannot read {path}: {e.strerror}", 1)


def _api_logs(cid: str) -> None:
    """The json-file log the monitor of an API-started container writes (runner/attach.py)."""
    from .attach import LOG_NAME

    path = os.path.join(state.container_dir(cid), LOG_NAME)
    try:
        f = open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb")  # noqa: SIM115
    except FileNotFoundError:
        return
    except OSError as e:
        fail(f"cannot read {path}: {e.strerror}", 1)
    with f:
        for line in f:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            out = sys.stdout if entry.get("stream") == "stdout" else sys.stderr
            out.buffer.write(str(entry.get("log", "")).encode("utf-8", "surrogateescape"))
            out.flush()


def _each(refs, action) -> None:
    failed = False
    for ref in refs:
        try:
            action(state.resolve(ref))
            click.echo(ref)
        except RunnerError as e:  # this one failed; go on with the others
            click.echo(f"pyoverlay: {e}", err=True)
            failed = True
    if failed:
        sys.exit(1)
