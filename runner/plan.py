"""Planning a container: every decision of ``pyoverlay run`` made before anything is done.

:func:`build` turns a :class:`runner.spec.RunSpec` into a frozen :class:`RunPlan`: the
container's id and name, its hostname, every path (data dir, upper, workdir, init layer,
mountpoint, logs), the ``/etc`` files and their text, what the init layer must create
(read from the image), the volumes in mount order, the overlay's
:class:`~overlayfs_py.config.MountConfig`, the user namespace's id maps (rootless) and
the cgroup's directories, limits and device rules. It only reads (the image layers, the
records, /proc/self/mountinfo, /etc/subuid): an error found here leaves nothing behind,
and every user error that can be known before acting is found here (exit status 125).

:class:`runner.monitor.Monitor` then executes the plan as named steps on its undo stack
(docs/runner.md, "The ordered setup steps"); PID 1 (:mod:`runner.container`) mounts what
the plan lists. What can only be known by trying (a lock held by another container, a
read-only cgroupfs, a mount the kernel refuses) fails in the step, whose error names the
step and, for a mount, the path inside the container.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import socket
import stat
import time
from dataclasses import dataclass

from overlayfs_py.config import MountConfig, default_workdir

from . import _linux as L
from . import initlayer, seccomp, state, userns
from .cgroups import Cgroup, CgroupError, CgroupPlan, check_rootless, default_cgroupns
from .errors import RunnerError
from .net import bridge as netbridge
from .net import files as netfiles
from .net import slirp
from .spec import RunSpec, new_id, resolve_user

#: sethostname(2) refuses longer names (HOST_NAME_MAX)
HOST_NAME_MAX = 64


class PlanError(RunnerError):
    """A run that cannot be planned (one line; exit status 125)."""


@dataclass(frozen=True)
class EtcFile:
    target: str  # inside the container: "/etc/hosts"
    source: str  # the host file bound there, in the container's data dir
    text: str


@dataclass(frozen=True)
class VolumeMount:
    source: str  # host path (resolved)
    target: str  # inside the container, absolute and normalised
    read_only: bool
    is_dir: bool  # what the source was when planned (the mount point made to match)

    @property
    def on_dev(self) -> bool:
        """On the container's /dev tmpfs: its mount point is made there, not in a layer."""
        return self.target.startswith("/dev/")


@dataclass(frozen=True)
class Paths:
    data: str  # <data root>/containers/<id>
    upper: str
    workdir: str
    upper_given: bool  # --upper: the user's directory (kept, locked while in use)
    merged: str  # the overlay's mountpoint: the container's root
    init: str  # the init layer
    server_log: str
    output_log: str | None  # run -d: stdout and stderr of the monitor and the container
    trace_file: str | None


@dataclass(frozen=True)
class UsernsPlan:
    """Rootless: the container's user namespace."""

    maps: userns.Plan
    note: str | None  # auto fell back to a single-id map: said on stderr
    users_image: bool  # the top layer is the user's own (built or imported by the user)

    @property
    def new_owner(self) -> tuple[int, int]:
        """The stored owner of what the container's root creates in the init/upper layer."""
        return (self.maps.uid, self.maps.gid) if self.users_image else (0, 0)

    def with_maps(self, maps: userns.Plan, note: str | None) -> UsernsPlan:
        return UsernsPlan(maps, note, self.users_image)


@dataclass(frozen=True)
class RunPlan:
    spec: RunSpec
    cid: str
    name: str
    hostname: str
    rootless: bool
    paths: Paths
    etc_files: tuple[EtcFile, ...]  # those the image can take (not under a symlinked /etc)
    init_layer: initlayer.InitPlan
    volumes: tuple[VolumeMount, ...]  # parents before children
    mount: MountConfig  # the overlay (rootless: fuse_fd added when mounted)
    userns: UsernsPlan | None
    cgroup: CgroupPlan | None  # root: what Cgroup.plan decided (rootless: None)
    cgroup_optional: bool  # no limits and no device rules to hold: none is fine
    seccomp: seccomp.Filter | None = None  # the compiled program PID 1 loads (None: unconfined)
    rootless_net: slirp.SlirpPlan | None = None  # rootless bridge: slirp4netns (runner/net/slirp.py)
    cgroupns: str = "host"  # "private": PID 1 unshares its cgroup namespace (docs/runner.md)
    bridge: netbridge.BridgeConfig | None = None  # --network bridge: the bridge to attach to
    warnings: tuple[str, ...] = ()  # said on stderr before the container starts

    @property
    def hosts_file(self) -> EtcFile | None:
        return next((f for f in self.etc_files if f.target == "/etc/hosts"), None)

    def hosts_text(self, address: str) -> str:
        """/etc/hosts once the bridge has given the container *address*."""
        return netfiles.hosts_text(
            self.hostname,
            self.spec.network,
            self.spec.add_hosts,
            address=address,
            gateway=self.bridge.gateway if self.bridge else None,
        )

    def record(self) -> state.Record:
        """The container's record as first saved (status "created")."""
        spec = self.spec
        caps = spec.caps()
        return state.Record(
            id=self.cid,
            name=self.name,
            command=list(spec.argv),
            layers=list(spec.layers),
            created=time.time(),
            status="created",
            data_dir=self.paths.data,
            monitor_pid=os.getpid(),
            monitor_start=L.process_start_time(os.getpid()),
            image=spec.image,
            spec=state.ExecDefaults(
                env=list(spec.env),
                workdir=spec.workdir,
                user=spec.user,
                tty=spec.tty,
                caps=sorted(caps) if caps is not None else None,
                no_new_privs=spec.no_new_privs(),
                network=spec.network,
                read_only=spec.read_only,
                init=spec.init,
                upper_given=self.paths.upper_given,
                volumes=[f"{v.source}:{v.target}:{'ro' if v.read_only else 'rw'}" for v in self.volumes],
                limits={"memory": spec.limits.memory, "pids": spec.limits.pids, "cpus": spec.limits.cpus},
                remove=spec.remove,
                stop_timeout=spec.stop_timeout,
                seccomp=self.seccomp.to_record() if self.seccomp is not None else None,
                security_opt=seccomp.security_opt_of(spec.seccomp, spec.no_new_privileges),
                cgroupns=self.cgroupns,
            ),
        )


def build(spec: RunSpec, *, detach: bool = False, cid: str | None = None, rootless: bool | None = None) -> RunPlan:
    """Plan a run of *spec*. Reads only; PlanError, SpecError, CgroupError,
    InitLayerError or UsernsError (all one line, exit status 125) for what cannot be
    done."""
    rootless = os.geteuid() != 0 if rootless is None else rootless
    cid = cid or new_id()
    if not spec.layers:
        raise PlanError("no lower layer given")
    for layer in spec.layers:
        if not os.path.isdir(layer):
            raise PlanError(f"lower layer {layer!r} is not a directory")

    bridge, warnings = _network(spec, rootless)
    name = spec.name
    if name and state.name_taken(name) not in (None, cid):  # a created container starting keeps its name
        raise PlanError(f"the container name {name!r} is already in use")
    name = name or generate_name()
    hostname = spec.hostname or (socket.gethostname() if spec.network == "host" else cid[:12])
    if not hostname or "\0" in hostname or len(hostname.encode()) > HOST_NAME_MAX:
        raise PlanError(f"invalid hostname {hostname!r}: 1 to {HOST_NAME_MAX} bytes")

    paths = _paths(spec, cid, detach)
    volumes = _volumes(spec)
    net = _rootless_net(spec, paths.data) if rootless else None

    users = None
    if rootless:
        userns.check_machine()
        maps, note = userns.plan(spec.userns_map)
        users = UsernsPlan(maps, note, os.stat(spec.layers[0]).st_uid == os.getuid())

    # the init layer: every mount point the image lacks (read from the image: its
    # whiteouts and opaque dirs count, no symlink is followed); blocked ones are errors
    needed = [initlayer.Needed(p, k, k == "dir") for p, k in initlayer.BASE_MOUNTPOINTS]
    needed += [
        initlayer.Needed(v.target.lstrip("/"), "dir" if v.is_dir else "file", True) for v in volumes if not v.on_dev
    ]  # /dev is a tmpfs
    upper_now = paths.upper if paths.upper_given and os.path.isdir(paths.upper) else None
    init = initlayer.plan(spec.layers, upper_now, rootless, needed)
    texts = _etc_texts(hostname, spec, bridge, net is not None)
    etc = tuple(
        EtcFile("/" + rel, os.path.join(paths.data, os.path.basename(rel)), text)
        for rel, text in texts.items()
        if rel in init.usable
    )

    if spec.user is not None:
        _check_user(spec, upper_now, rootless, volumes, users)

    cfg = MountConfig(
        lowerdirs=(paths.init, *spec.layers),
        upperdir=paths.upper,
        workdir=paths.workdir,
        mountpoint=paths.merged,
        fsname=f"pyoverlay-{cid[:12]}",
        trace_file=paths.trace_file,
        container=cid,
    )
    if users is not None:
        cfg = with_storage_maps(cfg, users)

    cg, optional = _cgroup(spec, cid, rootless)
    filt = seccomp.compile_filter(spec.seccomp_profile(), spec.caps())  # SeccompError: exit 125
    return RunPlan(
        spec=spec,
        cid=cid,
        name=name,
        hostname=hostname,
        rootless=rootless,
        paths=paths,
        etc_files=etc,
        init_layer=init,
        volumes=volumes,
        mount=cfg,
        userns=users,
        cgroup=cg,
        cgroup_optional=optional,
        seccomp=filt,
        rootless_net=net,
        cgroupns=spec.cgroupns or default_cgroupns(),
        bridge=bridge,
        warnings=warnings,
    )


def _rootless_net(spec: RunSpec, data: str) -> slirp.SlirpPlan | None:
    """A rootless run's network: ``bridge`` (the default) and ``slirp4netns[:OPTS]`` are
    slirp4netns; none and host need nothing (and publish nothing)."""
    if spec.network == "bridge" or slirp.is_slirp_network(spec.network):
        return slirp.plan(spec.network, spec.publish, data)
    return None


def _network(spec: RunSpec, rootless: bool) -> tuple[netbridge.BridgeConfig | None, tuple[str, ...]]:
    """The bridge to attach to (root's ``--network bridge``), and docker's warnings.
    An ordinary user's bridge is slirp4netns (:func:`_rootless_net`)."""
    if spec.network == "none" and spec.publish:
        # docker: "conflicting options: port publishing and the container type network mode"
        raise PlanError("conflicting options: port publishing (-p) and --network none")
    if spec.network == "host":
        warn = ("WARNING: Published ports are discarded when using host network mode",) if spec.publish else ()
        return None, warn
    if slirp.is_slirp_network(spec.network) and not rootless:
        raise PlanError("--network slirp4netns is for rootless runs (use bridge, none or host)")
    if spec.network != "bridge" or rootless:
        return None, ()
    try:
        return netbridge.config(), ()
    except netbridge.NetError as e:
        raise PlanError(str(e)) from None


def with_storage_maps(cfg: MountConfig, users: UsernsPlan) -> MountConfig:
    """The server's id maps for the user namespace *users* (runner/userns.py, Plan.storage_map)."""

    return dataclasses.replace(
        cfg,
        uidmap=users.maps.storage_map("uid", users.users_image),
        gidmap=users.maps.storage_map("gid", users.users_image),
    )


_ADJ = (
    "brave",
    "calm",
    "eager",
    "fancy",
    "gentle",
    "happy",
    "jolly",
    "keen",
    "lucid",
    "merry",
    "nimble",
    "quiet",
    "sharp",
    "swift",
    "tidy",
    "vivid",
    "witty",
    "zesty",
)
_NOUN = (
    "badger",
    "bee",
    "crane",
    "dingo",
    "eel",
    "falcon",
    "gecko",
    "heron",
    "ibis",
    "koala",
    "lemur",
    "mole",
    "newt",
    "otter",
    "panda",
    "quail",
    "raven",
    "seal",
    "tern",
    "wren",
)


def generate_name() -> str:
    """docker-like ``adjective_animal_N``, not in use (checked again when reserved)."""
    while True:
        name = f"{secrets.choice(_ADJ)}_{secrets.choice(_NOUN)}_{secrets.randbelow(100)}"
        if state.name_taken(name) is None:
            return name


def _check_user(
    spec: RunSpec, upper: str | None, rootless: bool, volumes: tuple[VolumeMount, ...], users: UsernsPlan | None
) -> None:
    """``-u`` looked up in the image's /etc/passwd and /etc/group now, as PID 1 will (it
    resolves it again in the container): an unknown name, or an id a rootless container's
    user namespace does not map, is refused before anything is created. Skipped when the
    image's files cannot be read without the container (a symlinked /etc/passwd) or a
    volume covers them."""
    if any(v.target in ("/etc", "/etc/passwd", "/etc/group") for v in volumes):
        return
    files = initlayer.read_files(spec.layers, upper, rootless, ["etc/passwd", "etc/group"])
    if files["etc/passwd"] is None or files["etc/group"] is None:
        return
    ids = resolve_user(spec.user, files["etc/passwd"], files["etc/group"])
    if users is None:
        return
    size = users.maps.size
    groups = ids.groups if users.maps.mode != "single" else ()  # single: setgroups denied
    if ids.uid >= size or ids.gid >= size or any(g >= size for g in groups):
        raise PlanError(
            f"cannot run as uid {ids.uid} gid {ids.gid}: not mapped in the container's "
            "user namespace (rootless with a single-id map only has root; see --userns-map)"
            if users.maps.mode == "single"
            else f"cannot run as uid {ids.uid} gid {ids.gid}"
            f"{' groups ' + ','.join(map(str, groups)) if groups else ''}: not mapped in the "
            f"container's user namespace (ids 0..{size - 1})"
        )


def _paths(spec: RunSpec, cid: str, detach: bool) -> Paths:
    data = state.container_dir(cid)
    if spec.upper:
        upper = spec.upper
        workdir = default_workdir(upper)
        for what, p in (("upper layer", upper), ("its workdir", workdir)):
            if os.path.lexists(p) and not os.path.isdir(p):
                raise PlanError(f"{what} {p} is not a directory")
            # made if missing: never inside a lower layer (it would change the image) and
            # never holding one
            real = os.path.realpath(p)
            for layer in spec.layers:
                lay = os.path.realpath(layer)
                if _within(real, lay) or _within(lay, real):
                    raise PlanError(f"{what} {p} and lower layer {layer} overlap: one may not be inside the other")
    else:
        upper, workdir = os.path.join(data, "upper"), os.path.join(data, "work")
    trace = spec.trace_file or (os.path.join(data, "trace.jsonl") if spec.trace_summary else None)
    return Paths(
        data=data,
        upper=upper,
        workdir=workdir,
        upper_given=spec.upper is not None,
        merged=os.path.join(data, "merged"),
        init=os.path.join(data, "init"),
        server_log=os.path.join(data, "server.log"),
        output_log=os.path.join(data, "output.log") if detach else None,
        trace_file=trace,
    )


def _within(path: str, top: str) -> bool:
    """*path* is *top* or below it (path components, both resolved)."""
    return path == top or path.startswith(top.rstrip("/") + "/")


def _volumes(spec: RunSpec) -> tuple[VolumeMount, ...]:
    seen: set[str] = set()
    out = []
    for v in spec.volumes:
        if v.target in seen:
            raise PlanError(f"duplicate mount point {v.target}")
        seen.add(v.target)
        try:
            st = os.stat(v.host)
        except OSError as e:
            raise PlanError(f"volume source {v.host!r}: {e.strerror}") from None
        out.append(VolumeMount(v.host, v.target, v.read_only, stat.S_ISDIR(st.st_mode)))
    # parents before children (a volume inside another is mounted on top of it)
    return tuple(sorted(out, key=lambda v: v.target.count("/")))


def _etc_texts(hostname: str, spec: RunSpec, bridge: netbridge.BridgeConfig | None, slirp_net: bool) -> dict[str, str]:
    """/etc/hostname, /etc/hosts (on a bridge without the container's own address yet:
    the monitor writes it again once it has one) and /etc/resolv.conf
    (runner/net/files.py). A rootless bridge (slirp4netns) has its address, its gateway
    (the host, for host-gateway) and its DNS forwarder known now."""
    network, address = spec.network, None
    resolvers: tuple[str, ...] = ()
    if slirp_net:
        network, address, resolvers = "bridge", slirp.ADDRESS, (slirp.DNS,)
        gateway = slirp.GATEWAY
    else:  # host-gateway: the bridge's address (the default bridge's with another network)
        gateway = bridge.gateway if bridge else _default_gateway()
    return {
        "etc/hostname": f"{hostname}\n",
        "etc/hosts": netfiles.hosts_text(
            hostname,
            network,
            spec.add_hosts,
            address=address,
            gateway=gateway,
            host_text=_host_file("/etc/hosts") if network == "host" else "",
        ),
        "etc/resolv.conf": netfiles.resolv_text(_host_file("/etc/resolv.conf"), network, spec.dns, resolvers=resolvers),
    }


def _default_gateway() -> str:
    try:
        return netbridge.config().gateway
    except netbridge.NetError:
        return netbridge.BridgeConfig(netbridge.DEFAULT_BRIDGE, netbridge.DEFAULT_SUBNET).gateway


def _host_file(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _cgroup(spec: RunSpec, cid: str, rootless: bool) -> tuple[CgroupPlan | None, bool]:
    """The cgroup to create, and whether failing to create it is acceptable."""
    if rootless:  # made by the step, with limits only (an ordinary user rarely may)
        if spec.limits.any():
            check_rootless(spec.limits)  # CgroupError on cgroup v1
        return None, not spec.limits.any()
    # --privileged without limits: no device rules and nothing to limit, so a cgroup that
    # cannot be made (read-only cgroupfs) is done without
    optional = spec.privileged and not spec.limits.any()
    try:  # docker's device rules, unless --privileged (every device, as docker)
        return Cgroup.plan(cid, spec.limits, devices=not spec.privileged, every_hierarchy=True), optional
    except CgroupError as e:
        if spec.limits.any():
            raise
        if not spec.privileged:
            raise PlanError(device_rules_needed(e)) from None
        return None, True


def device_rules_needed(e: Exception) -> str:
    # root in the container could mknod and open any host device
    return f"{e}; a root container needs device restrictions (--privileged runs without them)"
