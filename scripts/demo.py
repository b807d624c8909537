"""pyoverlay demo, in six parts.  Run it through ``scripts/demo`` (which installs everything first).

Part 1, a mount: two built-in lower layers plus an empty upper layer are mounted
with ``pyoverlay mount``; the demo shows where each merged entry comes from, how
whiteouts and opaque directories hide lower entries, and how writes are copied up.

Part 2, a container on a two-layer image (root only): a busybox ``base`` layer and
an ``app`` layer on top (one file of base whited out) run as a container with
``pyoverlay run``: its own PID 1, hostname, process list, network (only lo) and
capabilities; it changes its root, and the demo shows that every change landed in
the upper layer while both image layers stay byte-for-byte the same.  Then a
detached container is inspected and stopped with ``run -d``, ``ps``, ``exec``, ``top``,
``stop`` and ``rm``; while ``exec`` changes its files, ``pyoverlay trace`` shows each
copy-up, whiteout and opaque directory live, with the process that caused it, and
after ``stop`` the demo summarises the trace file and shows ``pyoverlay diff`` and
``pyoverlay explain``.

Part 3, the same image run by an ordinary user (scripts/demo_rootless.py): root inside,
the user's files in the upper layer, and the kernel's overlay reading that upper.

Part 4, a podman container traced through pyoverlay (scripts/demo_podman.py, root only):
podman with a private configuration whose ``mount_program`` is ``mount.fuse.pyoverlay``
runs a container; ``pyoverlay trace --history`` on its merged dir shows its copy-ups and
whiteouts with the processes that made them, and ``podman diff`` is compared with
``pyoverlay diff``.  Then the same with rootless podman as ``pyoverlay-test``, whose
``pyoverlay trace`` runs on the host while the mount is in podman's mount namespace.

Part 5, the docker CLI through ``pyoverlay serve`` (scripts/demo_api.py, root only): the
service answers the Docker Engine API on a private socket; ``docker import``, then
``docker run -d`` and ``docker run -it ... sh`` side by side, ``ps -aef --forest`` showing
both under the service, then ``docker ps``, ``exec`` and ``diff``.

Part 6, a container that serves (scripts/demo_serve.py, root only): a busybox httpd on
pyoverlay's bridge with ``-p 127.0.0.1:PORT:80``; curl on the host visits it while the
live trace shows the copy-up its CGI causes; ``ps`` shows the port, ``exec`` its eth0,
seccomp filter and cgroup namespace; after ``stop`` the port is closed.

``--part NAME`` (repeatable) runs only some parts: mount, container, rootless, podman, api,
serve.

Everything happens under a temporary directory (container records and data
included) that is unmounted and removed at the end, whatever happens.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

from overlayfs_py import mountinfo
from overlayfs_py.whiteout import is_char_whiteout, prefix_for

REPO = Path(__file__).resolve().parent.parent
PYOVERLAY = REPO / ".venv" / "bin" / "pyoverlay"
LAYERS = ("upper", "lower1", "lower2")  # top to bottom

# As root the overlay-private xattrs are trusted.overlay.*; otherwise the
# demo mounts with -o userxattr and uses user.overlay.*.
ROOT = os.geteuid() == 0
XATTR_PREFIX = prefix_for(userxattr=not ROOT)
NOT_YET = (errno.EROFS, errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP)
CMD_TIMEOUT = 30  # seconds for pyoverlay mount / umount
DEMO_TIMEOUT = 90  # seconds before a hung mount is aborted


_SAY = threading.Lock()  # the live trace reader prints from its own thread


def say(text: str = "") -> None:
    with _SAY:
        print(text, flush=True)


def heading(text: str) -> None:
    say()
    say(f"== {text}")


def write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def build_layers(base: Path) -> None:
    lower1, lower2 = base / "lower1", base / "lower2"
    # lower2: the bottom layer.
    write(lower2 / "etc/hostname", "demo-host\n")
    write(lower2 / "etc/os-release", 'NAME="bottom layer (hidden by lower1)"\n')
    write(lower2 / "bin/tool", "#!/bin/sh\necho 'tool from lower2'\n", 0o755)
    write(lower2 / "secret", "the password is swordfish\n")
    write(lower2 / "old/legacy.conf", "legacy=yes\n")
    # lower1: the top lower layer.
    write(lower1 / "etc/os-release", 'NAME="pyoverlay demo"\n')
    write(lower1 / "app/config", "color=blue\n")
    os.mknod(lower1 / "secret", stat.S_IFCHR | 0o000, os.makedev(0, 0))  # whiteout
    write(lower1 / "old/notes.txt", "lower1 replaced old/ entirely\n")
    os.setxattr(lower1 / "old", XATTR_PREFIX + "opaque", b"y")  # opaque directory
    (base / "upper").mkdir()
    (base / "merged").mkdir()


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=CMD_TIMEOUT)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(args, 124, "", f"timed out after {CMD_TIMEOUT}s")


def mount_entry(path: Path) -> mountinfo.Mount | None:
    """The mount at *path*, from /proc/self/mountinfo.

    Never stats the mountpoint, so a hung FUSE server cannot hang the demo here.
    """
    return mountinfo.mount_at(os.path.realpath(path.parent) + "/" + path.name)


def mounts_under(path: Path) -> list[str]:
    """Mountpoints at or below *path* (already resolved), deepest first."""
    return sorted(mountinfo.mounts_under(str(path)), key=len, reverse=True)


def is_mounted(path: Path) -> bool:
    return mount_entry(path) is not None


def abort_fuse(path: Path) -> None:
    """Abort the FUSE connection behind *path* (unblocks anything waiting on it), then detach it."""
    entry = mount_entry(path)
    if entry is not None:
        minor = entry.devno.split(":")[1]
        # fusectl not mounted or not allowed: the lazy unmount below still detaches it
        with contextlib.suppress(OSError):
            Path(f"/sys/fs/fuse/connections/{minor}/abort").write_text("1")
    from overlayfs_py.unmount import try_unmount

    try_unmount(str(path), lazy=True, timeout=CMD_TIMEOUT)


def pyoverlay(*args: str) -> list[str]:
    if PYOVERLAY.exists():
        return [str(PYOVERLAY), *args]
    return [sys.executable, "-m", "pyoverlay_cli", *args]


def is_opaque(path: Path) -> bool:
    try:
        return os.getxattr(path, XATTR_PREFIX + "opaque", follow_symlinks=False) == b"y"
    except OSError:
        return False


def source_of(base: Path, rel: str) -> str:
    """Which layer(s) a merged entry comes from."""
    merged = os.lstat(base / "merged" / rel)
    if stat.S_ISDIR(merged.st_mode):
        # Directories merge: every layer down to (and including) an opaque one.
        found = []
        for layer in LAYERS:
            p = base / layer / rel
            if p.is_dir() and not p.is_symlink():
                found.append(layer)
                if is_opaque(p):
                    return " + ".join(found) + " (opaque: lower entries hidden)"
        return " + ".join(found) if found else "?"
    candidates = [layer for layer in LAYERS if os.path.lexists(base / layer / rel)]
    for layer in candidates:  # pyoverlay reports the real st_ino, like the kernel
        if os.lstat(base / layer / rel).st_ino == merged.st_ino:
            return layer
    if stat.S_ISREG(merged.st_mode):  # fall back to comparing contents
        data = (base / "merged" / rel).read_bytes()
        for layer in candidates:
            p = base / layer / rel
            if p.is_file() and p.read_bytes() == data:
                return f"{layer} (same content)"
    return "?"


def show_merged(base: Path) -> None:
    merged = base / "merged"
    rows = []
    for dirpath, dirnames, filenames in os.walk(merged):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            rel = os.path.relpath(os.path.join(dirpath, name), merged)
            kind = "dir" if name in dirnames else "file"
            rows.append((rel + ("/" if kind == "dir" else ""), source_of(base, rel)))
    rows.sort(key=lambda r: r[0].rstrip("/").split("/"))
    width = max(len(r[0]) for r in rows) if rows else 10
    say(f"  {'path':<{width}}  comes from")
    say(f"  {'-' * width}  ----------")
    for rel, src in rows:
        say(f"  {rel:<{width}}  {src}")


def show_tree(root: Path) -> None:
    paths = [Path(d, n) for d, dirs, files in os.walk(root) for n in dirs + files]
    if not paths:
        say("  (empty)")
    for p in sorted(paths, key=lambda q: q.relative_to(root).parts):
        st = os.lstat(p)
        rel = p.relative_to(root)
        if is_char_whiteout(st):
            say(f"  {rel}  (whiteout: char 0/0)")
        elif stat.S_ISDIR(st.st_mode):
            say(f"  {rel}/" + ("  (opaque)" if is_opaque(p) else ""))
        elif stat.S_ISLNK(st.st_mode):
            say(f"  {rel} -> {os.readlink(p)}")
        else:
            say(f"  {rel}  ({st.st_size} bytes)")


def try_write(what: str, action: Callable[[], object]) -> bool:
    try:
        action()
    except OSError as e:
        if e.errno in NOT_YET:
            say(f"  {what}: write path not available yet ({os.strerror(e.errno)})")
            return False
        raise
    return True


def unmount(base: Path) -> bool:
    merged = base / "merged"
    if not is_mounted(merged):
        return True
    r = run(*pyoverlay("umount", "merged"), cwd=base)
    if r.returncode != 0:
        say(f"  pyoverlay umount failed: {r.stderr.strip()}; aborting the connection")
        abort_fuse(merged)
    return not is_mounted(merged)


def demo(base: Path) -> int:
    heading(f"Building sample layers in {base}")
    build_layers(base)
    for layer in ("lower1", "lower2"):
        say(f"{layer}:")
        show_tree(base / layer)

    heading("Mounting: pyoverlay mount lower1:lower2 upper merged")
    mount_args = ["mount", "lower1:lower2", "upper", "merged"]
    if not ROOT:
        mount_args[1:1] = ["-o", "userxattr"]
    r = run(*pyoverlay(*mount_args), cwd=base)
    if r.returncode != 0:
        say(f"  mount failed (exit {r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
        return 1
    entry = mount_entry(base / "merged")
    if entry is None:
        say("  pyoverlay returned but merged/ is not a mount point")
        return 1
    say(f"  mounted ({entry.fstype}).")

    heading("What the merged view shows")
    show_merged(base)

    heading("Whiteouts and opaque directories")
    secret_hidden = not os.path.lexists(base / "merged/secret")
    say("  lower2/secret exists; lower1/secret is a whiteout (char device 0/0)")
    say(f"  merged/secret -> {'hidden (ENOENT)' if secret_hidden else 'VISIBLE (unexpected)'}")
    say(f"  lower2/old/ has {sorted(os.listdir(base / 'lower2/old'))}; lower1/old/ is opaque ({XATTR_PREFIX}opaque=y)")
    say(f"  merged/old/ -> {sorted(os.listdir(base / 'merged/old'))}")

    heading("Writing through the mount (copy-on-write)")
    new = base / "merged/new.txt"
    if try_write("echo hello > merged/new.txt", lambda: new.write_text("hello\n")):
        say("  echo hello > merged/new.txt: ok")
    cfg = base / "merged/app/config"

    def append() -> None:
        with open(cfg, "a") as f:
            f.write("size=large\n")

    if try_write("echo size=large >> merged/app/config", append):
        say("  echo size=large >> merged/app/config: ok (copied up from lower1)")
        say(f"  lower1/app/config still reads: {(base / 'lower1/app/config').read_text()!r}")
        say(f"  merged/app/config now reads:  {cfg.read_text()!r}")

    heading("The upper layer now holds")
    show_tree(base / "upper")
    return 0


def mount_part(base: Path) -> int:
    """Part 1, with a watchdog that aborts a hung mount; merged/ is unmounted on the way out."""
    rc = 1

    def watchdog() -> None:
        say(f"\n!! the demo did not finish within {DEMO_TIMEOUT}s: aborting the mount")
        abort_fuse(base / "merged")

    timer = threading.Timer(DEMO_TIMEOUT, watchdog)
    timer.daemon = True
    timer.start()
    try:
        rc = demo(base)
    finally:
        timer.cancel()
        if is_mounted(base / "merged"):
            heading("Unmounting: pyoverlay umount merged")
            if unmount(base):
                say("  unmounted.")
    return rc


# --------------------------------------------------------------------------------------
# Part 2: a container on a two-layer image
# --------------------------------------------------------------------------------------

BUSYBOX = Path("/bin/busybox")  # static, from the busybox-static package (scripts/setup)
RUN_TIMEOUT = 60  # seconds for a whole `pyoverlay run`
MOTD = "Welcome to the pyoverlay demo image.\n"
#: Supplied by the runner's init layer: none of them may appear in the upper layer.
NOT_IN_UPPER = ("proc", "dev", "sys", "etc/hostname", "etc/hosts", "etc/resolv.conf")
#: What the first container writes, as found in its upper layer (None: a whiteout).
EXPECTED_UPPER = {"bin/ls": None, "app/new.txt": "new\n", "etc/motd": MOTD + "more\n", "var/log/app.log": "x\n"}
#: Run by the first container's sh -c.  stderr is shown together with stdout.
CONTAINER_SCRIPT = """\
echo "my pid: $$"
echo "hostname: $(hostname)"
ps -o pid,ppid,user,comm
echo "network interfaces: $(ip -o link | awk -F': ' '{print $2}' | xargs)"
grep CapBnd /proc/self/status
echo "cgroup: $(grep -m1 -o '/pyoverlay/.*' /proc/self/cgroup || echo none)"
echo "/etc/motd: $(cat /etc/motd)"
echo "/app/hello.txt: $(cat /app/hello.txt)"
ls /bin/vi || true
while read -r change; do
    echo "# $change"
    eval "$change" || exit 1
done <<'EOF'
rm /bin/ls
echo new > /app/new.txt
echo more >> /etc/motd
mkdir -p /var/log && echo x > /var/log/app.log
EOF
"""

FAILURES: list[str] = []


def failed(what: str) -> None:
    say(f"  FAILED: {what}")
    FAILURES.append(what)


def indent(text: str, prefix: str = "    ") -> None:
    for line in text.rstrip("\n").splitlines():
        say(prefix + line)


def build_image(work: Path) -> bool:
    """Layer base: a busybox rootfs; layer app on top: files of its own and a whiteout."""
    if not BUSYBOX.is_file():
        failed(f"{BUSYBOX} is missing (the busybox-static package; scripts/setup installs it)")
        return False
    base = work / "base"
    for d in ("bin", "usr/bin", "sbin", "usr/sbin", "etc", "root", "tmp"):
        (base / d).mkdir(parents=True)
    (base / "tmp").chmod(0o1777)
    shutil.copy2(BUSYBOX, base / "bin/busybox")
    r = subprocess.run(
        ["chroot", str(base), "/bin/busybox", "--install", "-s"], capture_output=True, text=True, timeout=CMD_TIMEOUT
    )
    if r.returncode != 0:
        failed(f"chroot base /bin/busybox --install -s: {r.stderr.strip() or r.returncode}")
        return False
    write(base / "etc/passwd", "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n")
    write(base / "etc/group", "root:x:0:\napp:x:1000:\n")

    app = work / "app"
    write(app / "app/hello.txt", "hello from the app layer\n")
    write(app / "etc/motd", MOTD)
    (app / "bin").mkdir()
    os.mknod(app / "bin/vi", stat.S_IFCHR | 0o000, os.makedev(0, 0))  # whiteout: hides base's bin/vi
    (work / "upper").mkdir()
    return True


def snapshot(layer: Path) -> tuple[int, str]:
    """(entries, sha256) over everything in *layer*: paths, types and modes, owners, sizes,
    device numbers, mtimes, contents, symlink targets and xattrs."""
    h = hashlib.sha256()
    paths = [layer] + [Path(d, n) for d, dirs, files in os.walk(layer) for n in dirs + files]
    for p in sorted(paths, key=lambda q: q.relative_to(layer).parts):
        st = os.lstat(p)
        h.update(
            f"{p.relative_to(layer)}\0{st.st_mode:o} {st.st_uid}:{st.st_gid} {st.st_size} "
            f"{st.st_rdev} {st.st_mtime_ns}\0".encode()
        )
        if stat.S_ISREG(st.st_mode):
            h.update(hashlib.sha256(p.read_bytes()).digest())
        elif stat.S_ISLNK(st.st_mode):
            h.update(os.fsencode(os.readlink(p)))
        for name in sorted(os.listxattr(p, follow_symlinks=False)):
            h.update(f"\0{name}=".encode() + os.getxattr(p, name, follow_symlinks=False))
    return len(paths), h.hexdigest()


def runner_env(work: Path) -> dict[str, str]:
    """The environment of every pyoverlay command of part 2: records and data in *work*."""
    return {**os.environ, "PYOVERLAY_STATE_DIR": str(work / "state"), "PYOVERLAY_DATA_DIR": str(work / "data")}


def runner(work: Path, *args: str, timeout: float = CMD_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """``pyoverlay ARGS`` in *work*, with the container records and data kept in *work*.

    stderr is merged into stdout.  On a timeout the command gets SIGTERM (a monitor
    forwards it to its container and cleans up), then SIGKILL.
    """
    proc = subprocess.Popen(
        pyoverlay(*args),
        cwd=work,
        env=runner_env(work),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out)
    except subprocess.TimeoutExpired:
        out = ""
        for stop, grace in ((proc.terminate, 15), (proc.kill, 5)):
            stop()
            try:
                out, _ = proc.communicate(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                pass
        return subprocess.CompletedProcess(proc.args, 124, out + f"(timed out after {timeout:g}s)\n")


def show_cmd(work: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``pyoverlay ARGS``, print the command and its output; a non-zero exit status fails."""
    say(f"  $ pyoverlay {shlex.join(args)}")
    r = runner(work, *args)
    indent(r.stdout or "(no output)")
    if r.returncode != 0:
        failed(f"pyoverlay {args[0]} exited with {r.returncode}")
    return r


def host_interfaces() -> list[str]:
    with open("/proc/net/dev") as f:
        return [line.split(":")[0].strip() for line in f.readlines()[2:]]


def host_process_count() -> int:
    return sum(name.isdigit() for name in os.listdir("/proc"))


def describe_caps(mask: int) -> str:
    try:
        from runner.spec import CAPS  # capability numbers of linux/capability.h
    except ImportError:
        return f"{bin(mask).count('1')} capabilities"
    names = sorted(n.lower() for n, bit in CAPS.items() if mask >> bit & 1)
    return f"{len(names)} capabilities: {', '.join(names)}"


def first_run(work: Path, cids: list[str]) -> bool:
    """Run the demo script in a container; True if it succeeded.  Its id (read from its
    cgroup) goes to *cids*."""
    args = ["run", "--rm", "--upper", "upper", "--hostname", "demo", "--network", "none", "app:base", "sh", "-c"]
    heading(f"Running a container: pyoverlay {shlex.join(args)} SCRIPT")
    say("  SCRIPT:")
    indent(CONTAINER_SCRIPT, "    > ")
    started = time.monotonic()
    r = runner(work, *args, CONTAINER_SCRIPT, timeout=RUN_TIMEOUT)
    say(f"  output (in {time.monotonic() - started:.1f}s):")
    indent(r.stdout or "(no output)")
    say(f"  exit code: {r.returncode}")
    if m := re.search(r"^cgroup: /pyoverlay/(\w+)$", r.stdout, re.M):
        cids.append(m[1])
    if r.returncode != 0:
        failed(f"the container exited with {r.returncode}")
        return False
    if not re.search(r"^my pid: 1$", r.stdout, re.M):
        failed("the container's shell is not PID 1")
    if not re.search(r"^hostname: demo$", r.stdout, re.M):
        failed("the container's hostname is not 'demo'")
    say(
        f"  for comparison, the host has {host_process_count()} processes and network "
        f"interfaces {' '.join(host_interfaces())}"
    )
    if m := re.search(r"^CapBnd:\s*([0-9a-f]+)$", r.stdout, re.M):
        say(f"  CapBnd {m[1]} = {describe_caps(int(m[1], 16))}")
    return True


def check_upper(work: Path) -> None:
    """Show the first container's upper layer and check what it must and must not hold."""
    upper = work / "upper"
    heading("What the container changed: its upper layer (the image layers are read-only)")
    show_tree(upper)
    for rel, text in EXPECTED_UPPER.items():
        p = upper / rel
        if text is None:
            ok = os.path.lexists(p) and is_char_whiteout(os.lstat(p))
        else:
            ok = p.is_file() and p.read_text() == text
        if not ok:
            failed(f"upper/{rel} is not " + ("a whiteout" if text is None else repr(text)))
    present = [rel for rel in NOT_IN_UPPER if os.path.lexists(upper / rel)]
    if present:
        failed(f"the runner's mount points leaked into the upper layer: {', '.join(present)}")
    else:
        say(f"  none of {', '.join(NOT_IN_UPPER)} is in upper (the runner's init layer supplies them)")


TRACE_FILE = "web-trace.jsonl"  # in part 2's work directory (the commands run there)
LIVE_PREFIX = "  [live trace] "
LIVE_WAIT = 10.0  # seconds for an exec's events to reach the live reader
LIVE_QUIET = 0.3  # then until the live trace has been quiet this long
#: What exec changes in the detached container while the live trace runs: (what to look
#: at, the command, and the event the live trace must show: (process name, event, path)).
CHANGES = (
    (
        "sh appends to /etc/motd, a file of the app layer: copy-up (open-for-write), after its"
        " parent /etc (from the runner's init layer)",
        ("sh", "-c", "echo hello >> /etc/motd"),
        ("sh", "copy_up_done", "/etc/motd"),
    ),
    (
        "chmod on a file of the app layer: copy-up (chmod), after its parent directory",
        ("chmod", "600", "/app/hello.txt"),
        ("chmod", "copy_up_done", "/app/hello.txt"),
    ),
    (
        "rm of a file of the base layer: a whiteout in upper hides it",
        ("rm", "/bin/ls"),
        ("rm", "whiteout_create", "/bin/ls"),
    ),
    (
        "a directory of the image removed by rm, then made again by mkdir: whiteouts, then an"
        " opaque directory that hides the image's /app",
        ("sh", "-c", "rm -r /app && mkdir /app"),
        ("mkdir", "opaque_dir", "/app"),
    ),
    (
        "sh opens /etc/passwd (base layer) for writing and closes it unchanged: a copy-up nobody"
        " needed (copy_up_unused)",
        ("sh", "-c", "exec 3>>/etc/passwd"),
        ("sh", "copy_up_unused", "/etc/passwd"),
    ),
    (
        "rename of a directory of the image: EXDEV, as with the kernel's overlayfs; mv then"
        " copies it and removes the original",
        ("mv", "/root", "/home"),
        ("mv", "rename_exdev", "/root"),
    ),
)
#: In `pyoverlay diff demo-web` after CHANGES (and nothing else the demo does).
EXPECTED_DIFF = ("D /app", "C /bin", "D /bin/ls", "C /etc/motd", "C /etc/passwd", "A /home", "D /root")
UNNEEDED = "C /etc/passwd"  # what --ignore-identical leaves out
_EVENT_ROW = re.compile(r"^\d\d:\d\d:\d\d\.\d{3}  (?!--)")  # a row of `pyoverlay trace`, not a notice


class LiveTrace:
    """``pyoverlay ARGS`` (a ``trace``) in the background: a thread prints each line of
    its output the moment it comes, prefixed with ``[live trace]``.  Its environment is
    part 2's (:func:`runner_env`) unless *env* is given; *argv*, a whole command line,
    replaces ``pyoverlay ARGS``."""

    def __init__(
        self, work: Path, *args: str, env: dict[str, str] | None = None, argv: list[str] | None = None
    ) -> None:
        self.lines: list[str] = []
        self.done = False
        self.last = time.monotonic()
        self.news = threading.Condition()
        self.proc = subprocess.Popen(
            pyoverlay(*args) if argv is None else argv,
            cwd=work,
            env=runner_env(work) if env is None else env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.thread = threading.Thread(target=self._read, name="live-trace", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            for line in iter(self.proc.stdout.readline, ""):
                line = line.rstrip()
                say(LIVE_PREFIX + line)
                with self.news:
                    self.lines.append(line)
                    self.last = time.monotonic()
                    self.news.notify_all()
        finally:
            with self.news:
                self.done = True
                self.news.notify_all()

    def wait_for(self, pattern: re.Pattern[str], seen: int) -> int | None:
        """Wait until a line after the first *seen* matches *pattern*, then until the stream
        has been quiet for LIVE_QUIET (so the next command's events start a new block).
        Returns the number of lines read by then, or None if none matched in LIVE_WAIT."""
        deadline = time.monotonic() + LIVE_WAIT
        with self.news:
            while not any(pattern.search(line) for line in self.lines[seen:]):
                if self.done or time.monotonic() >= deadline:
                    return None
                self.news.wait(deadline - time.monotonic())
            while not self.done and (quiet := time.monotonic() - self.last) < LIVE_QUIET:
                self.news.wait(LIVE_QUIET - quiet)
            return len(self.lines)

    def finish(self, timeout: float) -> int | None:
        """Wait for the reader to exit by itself; its exit status, None if it did not."""
        self.thread.join(timeout)
        if self.thread.is_alive():
            return None
        try:
            return self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        """Kill the reader if it is still running; never leaves a process behind."""
        if self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                say(f"  the live trace reader (pid {self.proc.pid}) did not die")
        self.thread.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def quiet_cmd(work: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Like show_cmd, but says nothing when the command prints nothing."""
    say(f"  $ pyoverlay {shlex.join(args)}")
    r = runner(work, *args)
    if r.stdout.strip():
        indent(r.stdout)
    if r.returncode != 0:
        failed(f"pyoverlay {shlex.join(args)} exited with {r.returncode}")
    return r


def watch_changes(work: Path, cid: str, live: LiveTrace) -> None:
    """exec the CHANGES one at a time; each must show up in the live trace, named."""
    heading("Changing its files with exec, while the live trace runs")
    say("  Watch the [live trace] lines: each copy-up, whiteout and opaque directory appears as")
    say("  it happens, named by the process that caused it: COMMAND(host pid) [container:pid inside].")
    seen = len(live.lines)
    for why, argv, (comm, event, path) in CHANGES:
        say()
        for line in textwrap.wrap(why, 96):
            say(f"  # {line}")
        quiet_cmd(work, "exec", "demo-web", *argv)
        pattern = re.compile(
            rf"\s{re.escape(comm)}\(\d+\) \[{cid[:12]}:\d+\]\s+{event}\s+"
            rf"{re.escape(path)}(\s|$)"
        )
        got = live.wait_for(pattern, seen)
        if got is None:
            failed(f"the live trace did not show {event} {path} by {comm} in the container")
        else:
            seen = got


def trace_summary(work: Path, live: LiveTrace) -> None:
    heading(f"The whole run in sum: pyoverlay trace --file {TRACE_FILE} --summary")
    say(f"  run --trace {TRACE_FILE} kept the same events in a file.  Look at the copy-ups per")
    say("  process and per directory, and at the unnecessary copy-up of /etc/passwd.")
    r = show_cmd(work, "trace", "--file", TRACE_FILE, "--summary")
    if "/etc/passwd" not in r.stdout.partition("unnecessary copy-ups")[2]:
        failed("the summary does not list /etc/passwd as an unnecessary copy-up")
    try:
        with open(work / TRACE_FILE) as f:
            events = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        failed(f"cannot read {TRACE_FILE}: {e}")
        return
    in_file = sum(ev.get("event") not in ("end", "dropped") for ev in events)
    in_live = sum(bool(_EVENT_ROW.match(line)) for line in live.lines)
    if in_file != in_live:
        failed(f"the live trace showed {in_live} events, the trace file has {in_file}")
    elif not events or events[-1].get("event") != "end":
        failed(f"{TRACE_FILE} does not end with an end record")
    else:
        say(f"  the live reader showed all {in_file} events of the file")


def diff_and_explain(work: Path) -> None:
    heading("What it changed: pyoverlay diff demo-web")
    say("  As docker diff shows it: A added, C changed, D deleted (a whiteout, or a directory")
    say("  replaced by an opaque one, like /app).  /etc/passwd is C, though only copied up.")
    r = show_cmd(work, "diff", "demo-web")
    lines = r.stdout.splitlines()
    if missing := [c for c in EXPECTED_DIFF if c not in lines]:
        failed(f"pyoverlay diff does not list {', '.join(missing)}")
    say()
    say("  --ignore-identical leaves out the copy-ups that changed nothing: /etc/passwd is gone.")
    r = show_cmd(work, "diff", "--ignore-identical", "demo-web")
    if r.returncode == 0 and r.stdout.splitlines() != [c for c in lines if c != UNNEEDED]:
        failed(f"diff --ignore-identical is not diff without {UNNEEDED}")

    heading("Why a path looks the way it does: pyoverlay explain")
    say("  Layers, top first: upper, init (the runner's), lower1 = app, lower2 = base.")
    say("  /etc/motd: served by upper, copied up from the app layer, which it now hides.")
    r = show_cmd(work, "explain", "demo-web", "/etc/motd")
    if not re.search(r"served by upper .*copied up from lower1", r.stdout):
        failed("explain /etc/motd: not served by upper, copied up from lower1")
    say()
    say("  /bin/ls: still in the base layer, but hidden by the whiteout rm left in upper.")
    r = show_cmd(work, "explain", "demo-web", "/bin/ls")
    if not re.search(r"does not exist .*whiteout in upper", r.stdout):
        failed("explain /bin/ls: not hidden by a whiteout in upper")


def detached(work: Path, cids: list[str]) -> None:
    """run -d, then ps, a live trace, exec, top, stop, a trace summary, diff, explain, rm.
    The container's id goes to *cids*."""
    heading("A detached container: ps, exec, top, stop, rm")
    say(f"  --trace {TRACE_FILE}: every change to its upper layer is also written to a file.")
    r = show_cmd(work, "run", "-d", "--name", "demo-web", "--trace", TRACE_FILE, "app:base", "sleep", "1000")
    if r.returncode != 0:
        return
    cid = r.stdout.strip().splitlines()[-1]
    cids.append(cid)
    show_cmd(work, "ps")
    say()
    say("  Follow it live, in the background (--history: nothing is missed if it attaches late).")
    say("  Its lines start with [live trace]; it ends by itself when the container stops.")
    say("  $ pyoverlay trace --history demo-web &")
    live = LiveTrace(work, "trace", "--history", "demo-web")
    try:
        if live.wait_for(re.compile(r"^TIME\s+PROCESS\s"), 0) is None:  # its header: it is up
            failed("pyoverlay trace printed no header")
        r = show_cmd(work, "exec", "demo-web", "ps")
        if not re.search(r"^\s*1\s+\S+\s+sleep 1000$", r.stdout, re.M):
            failed("exec: PID 1 in the container is not 'sleep 1000'")
        r = show_cmd(work, "top", "demo-web")
        if m := re.search(r"^\s*(\d+)\s+1\s+\d+\s+\d+\s+sleep 1000$", r.stdout, re.M):
            say(f"  PID is the host's PID, CPID the PID inside the container.  On the host, /proc/{m[1]}/status says")
            with open(f"/proc/{m[1]}/status") as f:
                indent("".join(line for line in f if line.startswith("NSpid:")))
        else:
            failed("top: no 'sleep 1000' with container PID 1")
        watch_changes(work, cid, live)

        heading("Stopping it: the live trace ends")
        say("  Stopping the container unmounts its root: the live trace gets the end record and exits.")
        started = time.monotonic()
        show_cmd(work, "stop", "-t", "1", "demo-web")
        say(
            f"  stopped in {time.monotonic() - started:.1f}s: as PID 1, sleep ignores SIGTERM,"
            " so SIGKILL followed after 1s"
        )
        rc = live.finish(CMD_TIMEOUT)
        if rc is None:
            failed(f"the live trace did not end within {CMD_TIMEOUT}s of the stop")
        elif rc != 0:
            failed(f"pyoverlay trace exited with {rc}")
        elif not any("end of trace" in line for line in live.lines):
            failed("the live trace ended without its end record")
        else:
            say("  the live trace reader exited after the end record")
    finally:
        live.close()
    trace_summary(work, live)
    diff_and_explain(work)

    heading("Removing it")
    show_cmd(work, "ps", "-a")
    show_cmd(work, "rm", "demo-web")
    r = show_cmd(work, "ps", "-a")
    if len(r.stdout.strip().splitlines()) != 1:
        failed("containers are left after rm")


def check_layers(before: dict[str, tuple[int, str]], work: Path) -> None:
    heading("The image layers after both containers")
    for layer, (count, digest) in before.items():
        after = snapshot(work / layer)
        if after == (count, digest):
            say(f"  {layer}: unchanged, byte for byte ({count} entries, sha256 {digest[:16]}...)")
        else:
            failed(f"layer {layer} changed: {count} entries {digest[:16]}... -> {after[0]} entries {after[1][:16]}...")


def remove_containers(work: Path) -> None:
    """pyoverlay rm -f whatever containers are still recorded in *work*."""
    records = work / "state" / "containers"
    ids = [d.name for d in records.iterdir() if d.is_dir()] if records.is_dir() else []
    if ids:
        say(f"  removing containers left behind: {', '.join(i[:12] for i in ids)}")
        r = runner(work, "rm", "-f", *ids)
        if r.returncode != 0:
            failed(f"pyoverlay rm -f: {r.stdout.strip()}")


def cgroups_left(cids: list[str]) -> list[str]:
    return [
        d
        for cid in cids
        for pattern in ("/sys/fs/cgroup/*/pyoverlay/", "/sys/fs/cgroup/pyoverlay/")
        for d in glob.glob(pattern + cid)
    ]


def container_part(base: Path) -> int:
    """Part 2 (root only).  Whatever happens, no container of it is left running."""
    say()
    if not ROOT:
        say("#### Part 2, a container on a two-layer image, needs root: skipped.")
        return 0
    say("#### Part 2: a container on a two-layer image")
    work = base / "container"
    cids: list[str] = []
    try:
        heading(f"Building a two-layer busybox image in {work}")
        if not build_image(work):
            return 1
        applets = sum(
            1 for d in ("bin", "sbin", "usr/bin", "usr/sbin") for p in (work / "base" / d).iterdir() if p.is_symlink()
        )
        say(f"  base: bin/busybox and {applets} applet symlinks, etc/passwd (root, app), etc/group")
        say("  app, on top of base:")
        show_tree(work / "app")
        before = {layer: snapshot(work / layer) for layer in ("base", "app")}
        if first_run(work, cids):
            check_upper(work)
        detached(work, cids)
        check_layers(before, work)
    finally:
        remove_containers(work)
        if left := cgroups_left(cids):
            failed(f"cgroups left behind: {', '.join(left)}")
        elif cids:
            say(f"  no cgroup left for container {' or '.join(c[:12] for c in cids)}")
    return 1 if FAILURES else 0


def release_mounts(base: Path) -> bool:
    """Abort and lazily unmount anything still mounted under *base*; True if nothing is."""
    for mp in mounts_under(base):
        say(f"  {mp} is still mounted: aborting and detaching it")
        abort_fuse(Path(mp))
    return not mounts_under(base)


PARTS = ("mount", "container", "rootless", "podman", "api", "serve")


def run_part(name: str, base: Path) -> int:
    if name == "mount":
        say("#### Part 1: mounting layers")
        return mount_part(base)
    if name == "container":
        return container_part(base)
    if name == "rootless":
        import demo_rootless

        return demo_rootless.part(sys.modules[__name__], base)
    if name == "podman":
        import demo_podman

        return demo_podman.part(sys.modules[__name__], base)
    if name == "serve":
        import demo_serve

        return demo_serve.part(sys.modules[__name__], base)
    import demo_api

    return demo_api.part(sys.modules[__name__], base)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Show pyoverlay at work (see the module doc).")
    ap.add_argument(
        "--part",
        dest="parts",
        action="append",
        choices=PARTS,
        help="run only this part (repeatable): mount (1), container (2), rootless (3), podman (4), api (5), serve (6)",
    )
    parts = ap.parse_args(argv).parts or list(PARTS)
    base = Path(os.path.realpath(tempfile.mkdtemp(prefix="pyoverlay-demo-")))
    rc = 0
    try:
        for name in PARTS:
            if name in parts:
                rc = run_part(name, base) or rc
    finally:
        heading("Cleaning up")
        if release_mounts(base):
            shutil.rmtree(base, ignore_errors=True)
            say(f"  nothing mounted; removed {base}")
        else:
            say(f"  could not unmount everything under {base}; leaving it in place")
            rc = rc or 1
        if FAILURES:
            say(f"  {len(FAILURES)} step(s) failed: {'; '.join(FAILURES)}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
