"""Container images for the runner tests, built from the host's static busybox.

* ``build_busybox_rootfs(dir, mountpoints=False)``: ``bin/busybox`` (a copy of
  /bin/busybox) plus every applet as a symlink (``chroot DIR /bin/busybox
  --install -s``), ``etc/passwd`` (root, ``app`` = 1000:1000, nobody),
  ``etc/group``, ``etc/motd``, ``tmp`` (1777), ``root``, ``home/app``.  With
  ``mountpoints=True`` also the empty ``proc``, ``dev`` and ``sys``
  directories; without them the runner's "init" layer has to supply them.
* ``build_app_layer(dir)``: a layer for on top of the busybox rootfs:
  ``app/hello.txt``, ``app/run.sh``, an ``etc/motd`` that hides the base's,
  and ``bin/vi`` removed by a real char 0/0 whiteout.

``images(tmp_path_factory)`` builds every image once per test session (cached
module-wide, so each test module's own session fixture shares the build).
A layer spec lists the TOP layer first, like the kernel's ``lowerdir=``.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

BUSYBOX = Path("/bin/busybox")

PASSWD = """\
root:x:0:0:root:/root:/bin/sh
app:x:1000:1000:app user:/home/app:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
"""

GROUP = """\
root:x:0:
app:x:1000:
nogroup:x:65534:
"""

BASE_MOTD = b"motd of the base layer\n"
APP_MOTD = b"motd of the app layer\n"
HELLO = b"hello from the app layer\n"

#: what every busybox image must provide (the tests rely on these applets)
APPLETS = (
    "sh",
    "ps",
    "cat",
    "ls",
    "id",
    "env",
    "hostname",
    "sleep",
    "kill",
    "tty",
    "stty",
    "touch",
    "rm",
    "echo",
    "dd",
    "xargs",
    "readlink",
    "stat",
    "seq",
    "grep",
    "ip",
    "head",
    "tr",
    "wc",
    "vi",
    "pwd",
    "true",
    "false",
    "mkdir",
)


def _busybox_available() -> str | None:
    """None if a static busybox is usable, else why not."""
    if not BUSYBOX.exists():
        return f"{BUSYBOX} missing (apt-get install busybox-static)"
    if _has_interpreter(BUSYBOX):
        return f"{BUSYBOX} is dynamically linked (install busybox-static)"
    return None


def _has_interpreter(path: Path) -> bool:
    """True if the (64-bit little-endian) ELF file has a PT_INTERP header."""
    data = Path(path).read_bytes()[: 1 << 16]
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return False  # not ELF64 LE: let the chroot step decide
    phoff = int.from_bytes(data[32:40], "little")
    phentsize = int.from_bytes(data[54:56], "little")
    phnum = int.from_bytes(data[56:58], "little")
    for i in range(phnum):
        off = phoff + i * phentsize
        if int.from_bytes(data[off : off + 4], "little") == 3:  # PT_INTERP
            return True
    return False


def build_busybox_rootfs(root: Path, mountpoints: bool = False) -> Path:
    root = Path(root)
    why = _busybox_available()
    if why:
        raise RuntimeError(why)
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "root", "home/app", "tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    os.chmod(root / "bin" / "busybox", 0o755)
    subprocess.run(["chroot", str(root), "/bin/busybox", "--install", "-s"], check=True, capture_output=True)
    for applet in APPLETS:
        found = [d for d in ("bin", "sbin", "usr/bin", "usr/sbin") if os.path.lexists(root / d / applet)]
        if not found:
            os.symlink("/bin/busybox", root / "bin" / applet)
    if not os.path.lexists(root / "bin" / "vi"):  # the app layer whites out bin/vi
        os.symlink("/bin/busybox", root / "bin" / "vi")
    (root / "etc" / "passwd").write_text(PASSWD)
    (root / "etc" / "group").write_text(GROUP)
    (root / "etc" / "motd").write_bytes(BASE_MOTD)
    os.chmod(root / "tmp", 0o1777)
    os.chmod(root / "root", 0o700)
    os.chown(root / "home" / "app", 1000, 1000)
    if mountpoints:
        for d in ("proc", "dev", "sys"):
            (root / d).mkdir(mode=0o755)
    else:
        for d in ("proc", "dev", "sys"):
            assert not (root / d).exists()
    return root


def build_app_layer(root: Path) -> Path:
    root = Path(root)
    (root / "app").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "bin").mkdir()
    (root / "app" / "hello.txt").write_bytes(HELLO)
    os.chmod(root / "app" / "hello.txt", 0o644)  # NOT executable (exit 126)
    (root / "app" / "run.sh").write_text("#!/bin/sh\necho run.sh says $1\n")
    os.chmod(root / "app" / "run.sh", 0o755)
    (root / "etc" / "motd").write_bytes(APP_MOTD)
    os.mknod(root / "bin" / "vi", stat.S_IFCHR | 0o000, os.makedev(0, 0))  # whiteout
    return root


@dataclass
class Image:
    """Layers of an image, TOP layer first."""

    name: str
    layers: list[Path] = field(default_factory=list)

    @property
    def spec(self) -> str:
        """The LOWER1[:LOWER2...] argument of ``pyoverlay run``."""
        for layer in self.layers:
            if ":" in str(layer) or "," in str(layer):
                raise ValueError(f"layer path {layer} contains ':' or ','")
        return ":".join(str(layer) for layer in self.layers)


@dataclass
class Images:
    bare: Image  # busybox, NO proc/dev/sys directories
    full: Image  # busybox with empty proc/dev/sys directories
    two_layer: Image  # app layer on top of bare busybox (with a whiteout)

    def by_name(self, name: str) -> Image:
        return getattr(self, name)


_CACHE: dict[str, Images] = {}


def images(tmp_path_factory) -> Images:
    """All test images, built once per session under the session's tmp base."""
    key = str(tmp_path_factory.getbasetemp())
    if key not in _CACHE:
        base = tmp_path_factory.mktemp("images")
        bare = build_busybox_rootfs(base / "busybox")
        full = build_busybox_rootfs(base / "busybox-mountpoints", mountpoints=True)
        app = build_app_layer(base / "app")
        _CACHE[key] = Images(
            bare=Image("bare", [bare]), full=Image("full", [full]), two_layer=Image("two_layer", [app, bare])
        )
    return _CACHE[key]


def tree_listing(root: Path) -> list[str]:
    """Every path under ``root`` (relative, sorted), with a type suffix
    (``/`` dir, ``@`` symlink, ``%c M:m`` char device)."""
    out = []
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            if stat.S_ISDIR(st.st_mode):
                rel += "/"
            elif stat.S_ISLNK(st.st_mode):
                rel += "@"
            elif stat.S_ISCHR(st.st_mode):
                rel += f"%c {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
            out.append(rel)
    return sorted(out)
