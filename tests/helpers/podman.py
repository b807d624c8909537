"""A private podman/buildah environment for one test: pyoverlay as containers/storage's
``mount_program``, as root or as the rootless test user, without touching the machine.

:class:`Podman` writes its own configuration under a directory of the test's
(``base``) and points the tools at it through the environment:

* ``storage.conf`` (``CONTAINERS_STORAGE_CONF``): driver ``overlay``, ``graphroot`` (and
  ``rootless_storage_path``) under ``base``, ``runroot`` and ``XDG_RUNTIME_DIR`` in a short
  ``/tmp/pyo-podman-*`` (conmon's socket paths must fit; removed by the cleanup), ``mount_program`` = the path
  the test gives (pyoverlay, or fuse-overlayfs for the baseline; None: the kernel's overlay);
* ``containers.conf`` (``CONTAINERS_CONF``): ``runtime = "runc"`` and ``cgroup_manager =
  "cgroupfs"`` (crun refuses this machine's hybrid cgroups), ``default_ulimits = []`` (the
  default RLIMIT_NOFILE/NPROC exceed the hard limits here), ``events_logger = "file"``, and
  every other directory podman would use (tmp, volumes, networks, image copies) under base;
* ``registries.conf`` (``CONTAINERS_REGISTRIES_CONF``): no search registries, and
  ``policy.json`` (``$HOME/.config/containers``, ``--signature-policy`` for buildah):
  ``insecureAcceptAnything``; no registry is reachable and none is asked;
* ``HOME``, ``XDG_CONFIG_HOME``, ``XDG_DATA_HOME`` and ``TMPDIR`` under base,
  ``XDG_RUNTIME_DIR`` (0700, the user's) beside runroot. As root ``PYOVERLAY_STATE_DIR`` too (pyoverlay's records would
  go to /run/pyoverlay); rootless pyoverlay, run by podman as root of its user namespace,
  finds ``$XDG_RUNTIME_DIR/pyoverlay`` itself.

Images come from a local rootfs tarball (busybox-static: tests/helpers/rootfs.py) with
``podman import``. :meth:`Podman.cleanup` removes every container (``podman rm -af``,
``buildah rm --all``), ends the rootless pause process, then reports and removes what is
left: processes started for ``base`` (mount programs, conmon), mounts under ``base`` (but
the private bind mount containers/storage keeps of its own ``overlay`` directory), and the
files. Rootless, everything runs as ``pyoverlay-test`` through :class:`rootless.User`.

:func:`pyoverlay_mount_program` gives the program to put in ``mount_program``:
``.venv/bin/mount.fuse.pyoverlay`` when it exists, else a small wrapper around ``pyoverlay
mount`` (logging the arguments containers/storage passed to ``base/mount-program.args``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

from overlayfs_py import procfs

from . import mounts, rootfs
from .rootless import VENV_BIN, User

FUSE_OVERLAYFS = "/usr/bin/fuse-overlayfs"
MOUNT_HELPER = VENV_BIN / "mount.fuse.pyoverlay"
IMAGE = "localhost/busybox:test"
TOOLS = ("podman", "buildah")


def skip_reason(rootless: bool = False) -> str | None:
    """Why the podman tests cannot run here (as root, or *rootless*), or None."""
    if os.geteuid() != 0:
        return "needs root (podman tests run podman as root, or as the test user through setpriv)"
    for tool in (*TOOLS, "runc", "conmon"):
        if shutil.which(tool) is None:
            return f"needs {tool} (scripts/setup installs podman, buildah, runc, conmon)"
    if not os.path.exists("/dev/fuse"):
        return "needs /dev/fuse"
    why = rootfs._busybox_available()
    if why:
        return why
    if rootless:
        from . import rootless as rl

        why = rl.skip_reason()
        if why:
            return why
        for tool in ("newuidmap", "newgidmap"):
            if shutil.which(tool) is None:
                return f"needs {tool} (package uidmap) for rootless podman"
        ranges = []
        with contextlib.suppress(OSError), open("/etc/subuid") as f:
            ranges = [line for line in f if line.split(":")[0] == rl.USER]
        if not ranges:
            return f"{rl.USER} has no /etc/subuid range (scripts/setup adds one)"
    return None


_WRAPPER = """#!/bin/sh
# mount_program for containers/storage: pyoverlay's mount with its command line.
# Logs what it was given, then runs pyoverlay (its server logs to the log dir).
printf '%s\\n' "$*" >> {args_log}
exec {pyoverlay} mount --log {log_dir}/server-$$.log "$@"
"""


def pyoverlay_mount_program(base: Path) -> Path:
    """The program for ``mount_program``: mount.fuse.pyoverlay if installed in .venv, else a
    wrapper script in *base* (arguments logged to ``base/mount-program.args``)."""
    if MOUNT_HELPER.exists():
        return MOUNT_HELPER
    base.mkdir(parents=True, exist_ok=True)
    logs = base / "mount-logs"
    logs.mkdir(exist_ok=True)
    script = base / "mount-program"
    script.write_text(
        _WRAPPER.format(args_log=base / "mount-program.args", pyoverlay=VENV_BIN / "pyoverlay", log_dir=logs)
    )
    os.chmod(script, 0o755)
    return script


def _toml_str(s) -> str:
    return json.dumps(str(s))


class Podman:
    """podman and buildah with private configuration under *base* (see the module doc).
    *mount_program*: the overlay driver's mount program: a path, ``"pyoverlay"``
    (:func:`pyoverlay_mount_program`), ``"fuse-overlayfs"``, or None (the kernel's overlay).
    *user*: run as that rootless user (``rootless.User``), else as root."""

    def __init__(self, base: Path, mount_program: str | os.PathLike | None, user: User | None = None) -> None:
        self.base = Path(base)
        self.user = user
        if mount_program == "pyoverlay":
            mount_program = pyoverlay_mount_program(self.base)
        elif mount_program == "fuse-overlayfs":
            mount_program = FUSE_OVERLAYFS
        self.mount_program = None if mount_program is None else str(mount_program)
        self.graph = self.base / "graph"
        # the run dirs hold conmon's attach socket: a unix socket path must fit in 108 bytes,
        # and podman waits 20 s for a container's exit when it does not (a pytest tmp dir is
        # long). Rootless podman keeps them under $XDG_RUNTIME_DIR.
        self.short = Path(tempfile.mkdtemp(prefix="pyo-podman-", dir="/tmp"))
        self.runroot = self.short / "run"
        self.home = self.base / "home"
        self.runtime_dir = self.short / "xdg"
        self.tmp = self.base / "tmp"
        self.state = self.base / "pyoverlay-state"
        self.events = self.base / "events.log"
        for d in (
            self.base,
            self.graph,
            self.runroot,
            self.home,
            self.home / ".config" / "containers",
            self.base / "xdg-data",
            self.runtime_dir,
            self.tmp,
            self.base / "image-copy-tmp",
            self.base / "volumes",
            self.base / "networks",
            self.state,
        ):
            d.mkdir(parents=True, exist_ok=True)
        self._write_configs()
        if user is not None:
            user.chown_tree(self.base)
            user.chown_tree(self.short)
        os.chmod(self.runtime_dir, 0o700)
        os.chmod(self.state, 0o700)

    # -- configuration ------------------------------------------------------------------------
    def _write_configs(self) -> None:
        b = self.base
        lines = [
            "[storage]",
            'driver = "overlay"',
            f"graphroot = {_toml_str(self.graph)}",
            f"runroot = {_toml_str(self.runroot)}",
            f"rootless_storage_path = {_toml_str(self.graph)}",
            "",
            "[storage.options.overlay]",
        ]
        if self.mount_program:
            lines.append(f"mount_program = {_toml_str(self.mount_program)}")
        (b / "storage.conf").write_text("\n".join(lines) + "\n")
        (b / "containers.conf").write_text(
            "\n".join(
                [
                    "[containers]",
                    "default_ulimits = []",
                    'netns = "none"',
                    "",
                    "[network]",
                    f"network_config_dir = {_toml_str(b / 'networks')}",
                    "",
                    "[engine]",
                    'runtime = "runc"',
                    'cgroup_manager = "cgroupfs"',
                    'events_logger = "file"',
                    f"events_logfile_path = {_toml_str(self.events)}",
                    f"tmp_dir = {_toml_str(self.tmp)}",
                    f"volume_path = {_toml_str(b / 'volumes')}",
                    f"image_copy_tmp_dir = {_toml_str(b / 'image-copy-tmp')}",
                    "",
                ]
            )
        )
        (b / "registries.conf").write_text('unqualified-search-registries = []\nshort-name-mode = "permissive"\n')
        policy = json.dumps({"default": [{"type": "insecureAcceptAnything"}]})
        (b / "policy.json").write_text(policy + "\n")
        (self.home / ".config" / "containers" / "policy.json").write_text(policy + "\n")

    def env(self) -> dict:
        b = self.base
        env = {
            "CONTAINERS_CONF": str(b / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(b / "storage.conf"),
            "CONTAINERS_REGISTRIES_CONF": str(b / "registries.conf"),
            "HOME": str(self.home),
            "XDG_CONFIG_HOME": str(self.home / ".config"),
            "XDG_DATA_HOME": str(b / "xdg-data"),
            "XDG_RUNTIME_DIR": str(self.runtime_dir),
            "TMPDIR": str(self.tmp),
        }
        if self.user is None:
            env["PYOVERLAY_STATE_DIR"] = str(self.state)
        if os.environ.get(mounts.ENGINE_ENV):  # the engine under test (scripts/test), through podman
            env[mounts.ENGINE_ENV] = os.environ[mounts.ENGINE_ENV]
        return env

    # -- running the tools -------------------------------------------------------------------
    def run(self, tool: str, *args, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        """*tool* (podman, buildah, skopeo) with *args*, as root or as the user; text captured.
        With *check* a failure raises AssertionError with the tool's stderr."""
        argv = [tool, *map(str, args)]
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        if self.user is not None:
            env = self.user.env(self.env())
            env.pop("PYOVERLAY_STATE_DIR", None)  # the default (XDG_RUNTIME_DIR) is under test
            res = subprocess.run(self.user.argv(argv), env=env, cwd=self.base, timeout=timeout, **kw)
        else:
            env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LANG": "C.UTF-8", **self.env()}
            res = subprocess.run(argv, env=env, cwd=self.base, timeout=timeout, **kw)
        if check and res.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed ({res.returncode}):\n{res.stderr}{self.mount_log()}")
        return res

    def podman(self, *args, **kw) -> subprocess.CompletedProcess:
        return self.run("podman", *args, **kw)

    def buildah(self, *args, **kw) -> subprocess.CompletedProcess:
        return self.run("buildah", *args, **kw)

    def mount_log(self) -> str:
        """The mount program's arguments and its servers' logs (for failure messages)."""
        out = []
        args = self.base / "mount-program.args"
        if args.exists():
            out.append("mount program arguments:\n" + args.read_text()[-2000:])
        for log in sorted((self.base / "mount-logs").glob("*.log")) if (self.base / "mount-logs").exists() else []:
            with contextlib.suppress(OSError):
                out.append(f"{log.name}:\n" + log.read_text(errors="replace")[-3000:])
        return ("\n" + "\n".join(out)) if out else ""

    # -- images ------------------------------------------------------------------------------
    def import_busybox(self, name: str = IMAGE) -> str:
        """Build a busybox rootfs (with proc/dev/sys mountpoints), tar it and ``podman import``
        it as *name*; the image name."""
        root = rootfs.build_busybox_rootfs(self.base / "rootfs", mountpoints=True)
        tar = self.base / "rootfs.tar"
        with tarfile.open(tar, "w") as t:
            for entry in sorted(os.listdir(root)):
                t.add(root / entry, arcname=entry)
        shutil.rmtree(root)
        os.chmod(tar, 0o644)
        if self.user is not None:
            os.chown(tar, self.user.uid, self.user.gid)
        self.podman("import", "--change", 'CMD ["/bin/sh"]', tar, name)
        return name

    def settle(self, timeout: float = 10) -> None:
        """Wait until no mount program's mount is left under the store: after ``podman run``
        returns, conmon's ``podman container cleanup`` unmounts the container's layer in a
        process of its own. (Root only: rootless mounts are in podman's namespace.)"""
        if self.user is not None:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not any(
                (m := mounts.mount_entry(mp)) is not None and m.fstype.startswith("fuse")
                for mp in mounts.mounts_under(self.graph)
            ):
                return
            time.sleep(0.05)

    # -- where a container's layers are --------------------------------------------------------
    def upper_of(self, container: str) -> Path:
        """The upper directory (containers/storage's ``diff``) of *container*'s layer."""
        out = self.podman("inspect", "--format", "{{.GraphDriver.Data.UpperDir}}", container).stdout.strip()
        return Path(out)

    def lowers_of(self, container: str) -> list[Path]:
        out = self.podman("inspect", "--format", "{{.GraphDriver.Data.LowerDir}}", container).stdout.strip()
        return [Path(p) for p in out.split(":") if p]

    # -- cleanup -----------------------------------------------------------------------------
    def processes(self) -> list[int]:
        """Live processes started for this environment: their command line or environment
        names ``base`` (mount programs and their servers, conmon, the pause process)."""
        keys = (os.fsencode(str(self.base)), os.fsencode(str(self.short)))
        me = os.getpid()
        out = []
        for d in os.listdir("/proc"):
            if not d.isdigit() or int(d) == me:
                continue
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    cmd = f.read()
                with open(f"/proc/{d}/environ", "rb") as f:
                    env = f.read()
                running = procfs.alive(d)
            except OSError:
                continue
            if running and any(k in cmd or k in env for k in keys):
                out.append(int(d))
        return out

    def _pause_pid(self) -> int | None:
        for p in (self.runtime_dir / "libpod" / "tmp" / "pause.pid", self.tmp / "pause.pid"):
            with contextlib.suppress(OSError, ValueError):
                return int(p.read_text().strip())
        return None

    def cleanup(self) -> list[str]:
        """Remove every container and working container, end the pause process, then
        remove (and return a description of) what was left: processes, mounts; then the
        files."""
        left: list[str] = []
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            self.podman("rm", "-af", "-t", "0", check=False, timeout=120)
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            self.buildah("rm", "--all", check=False, timeout=120)
        pause = self._pause_pid()
        if pause is not None and pause in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pause, signal.SIGKILL)
        # what podman leaves by design: its pause process (just killed); a mount program's
        # server exits when podman unmounts; give them a moment
        deadline = time.monotonic() + 10
        while self.processes() and time.monotonic() < deadline:
            time.sleep(0.1)
        procs = self.processes()
        if procs:
            left.append("processes " + ", ".join(f"{p} ({_cmd(p)})" for p in procs))
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
        own = str(self.graph / "overlay")
        found = mounts.mounts_under(self.base) + mounts.mounts_under(self.short)
        for mp in sorted(found, key=len, reverse=True):
            if mp != own:  # containers/storage's private bind mount of its overlay dir
                left.append(f"mount {mp}")
            mounts.abort_fuse_connection(mp)
            subprocess.run(["umount", "-l", mp], capture_output=True)
        for d in (self.base, self.short):
            with contextlib.suppress(OSError):
                shutil.rmtree(d, onerror=_force)
        return left


def _cmd(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:200]
    except OSError:
        return "?"


def _force(func, path, exc) -> None:
    with contextlib.suppress(OSError):
        parent = os.path.dirname(path)
        os.chmod(parent, 0o700)
        if os.path.isdir(path) and not os.path.islink(path):
            os.chmod(path, 0o700)
        func(path)
