"""pyoverlay demo, in two parts.  Run it through ``scripts/demo`` (which installs everything first).

Part 1, a mount: two built-in lower layers plus an empty upper layer are mounted
with ``pyoverlay mount``; the demo shows where each merged entry comes from, how
whiteouts and opaque directories hide lower entries, and how writes are copied up.

Part 2, a container on a two-layer image (root only): a busybox ``base`` layer and
an ``app`` layer on top (one file of base whited out) run as a container with
``pyoverlay run``: its own PID 1, hostname, process list, network (only lo) and
capabilities; it changes its root, and the demo shows that every change landed in
the upper layer while both image layers stay byte-for-byte the same.  Then a
detached container is inspected and stopped with ``run -d``, ``ps``, ``exec``, ``top``,
``stop`` and ``rm``.

Everything happens under a temporary directory (container records and data
included) that is unmounted and removed at the end, whatever happens.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYOVERLAY = REPO / ".venv" / "bin" / "pyoverlay"
LAYERS = ("upper", "lower1", "lower2")  # top to bottom

# As root the overlay-private xattrs are trusted.overlay.*; otherwise the
# demo mounts with -o userxattr and uses user.overlay.*.
ROOT = os.geteuid() == 0
XATTR_PREFIX = "trusted.overlay." if ROOT else "user.overlay."
NOT_YET = (errno.EROFS, errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP)
CMD_TIMEOUT = 30  # seconds for pyoverlay mount / umount
DEMO_TIMEOUT = 90  # seconds before a hung mount is aborted
_OCTAL = re.compile(r"\\([0-7]{3})")  # mountinfo escapes space, tab, newline, backslash


def say(text: str = "") -> None:
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


def mountinfo() -> Iterator[tuple[str, str, str]]:
    """(mountpoint, major:minor, fstype) of every mount, from /proc/self/mountinfo."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            mp = _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), fields[4])  # \040 -> " "
            yield mp, fields[2], fields[fields.index("-") + 1]


def mount_entry(path: Path) -> tuple[str, str] | None:
    """(major:minor, fstype) of the mount at *path*, from /proc/self/mountinfo.

    Never stats the mountpoint, so a hung FUSE server cannot hang the demo here.
    """
    target = os.path.realpath(path.parent) + "/" + path.name
    for mp, dev, fstype in mountinfo():
        if mp == target:
            return dev, fstype
    return None


def mounts_under(path: Path) -> list[str]:
    """Mountpoints at or below *path* (already resolved), deepest first."""
    found = [mp for mp, _, _ in mountinfo() if mp == str(path) or mp.startswith(f"{path}/")]
    return sorted(found, key=len, reverse=True)


def is_mounted(path: Path) -> bool:
    return mount_entry(path) is not None


def abort_fuse(path: Path) -> None:
    """Abort the FUSE connection behind *path* (unblocks anything waiting on it), then detach it."""
    entry = mount_entry(path)
    if entry is not None:
        minor = entry[0].split(":")[1]
        try:
            Path(f"/sys/fs/fuse/connections/{minor}/abort").write_text("1")
        except OSError:
            pass  # fusectl not mounted or not allowed: the lazy unmount below still detaches it
    subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True, timeout=CMD_TIMEOUT)


def pyoverlay(*args: str) -> list[str]:
    if PYOVERLAY.exists():
        return [str(PYOVERLAY), *args]
    return [sys.executable, "-m", "overlayfs_py", *args]


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
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
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
    say(f"  mounted ({entry[1]}).")

    heading("What the merged view shows")
    show_merged(base)

    heading("Whiteouts and opaque directories")
    secret_hidden = not os.path.lexists(base / "merged/secret")
    say("  lower2/secret exists; lower1/secret is a whiteout (char device 0/0)")
    say(f"  merged/secret -> {'hidden (ENOENT)' if secret_hidden else 'VISIBLE (unexpected)'}")
    say(f"  lower2/old/ has {sorted(os.listdir(base / 'lower2/old'))};"
        f" lower1/old/ is opaque ({XATTR_PREFIX}opaque=y)")
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


if __name__ == "__main__":
    sys.exit(main())
