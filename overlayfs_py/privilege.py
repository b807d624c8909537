"""What this process may do, and what a mount without root needs from the machine.

``privileged()`` decides the private xattr namespace (userxattr.py) and the mode of
``work/``: only CAP_SYS_ADMIN in the *initial* user namespace may use ``trusted.*``
xattrs, so root inside a user namespace counts as unprivileged, as with the kernel,
which needs ``-o userxattr`` there. ``host_root()`` / ``userns_root()`` decide where state
is kept: root of a user namespace whose uid 0 is an ordinary user outside (podman's
rootless mount program, ``unshare -Ur``) keeps it in that user's directories (state.py).

``check_fuse_access(cfg)`` runs before the server is forked: /dev/fuse must be open to
this user and, when mount(2) is not permitted, libfuse mounts through the setuid
``fusermount3``, which allows ``allow_other`` only with ``user_allow_other`` in
/etc/fuse.conf. Each problem is a one-line ConfigError naming the setting to change.
"""

from __future__ import annotations

import os
import stat

from .config import ConfigError, MountConfig

CAP_SYS_ADMIN = 21
DEV_FUSE = "/dev/fuse"
FUSE_CONF = "/etc/fuse.conf"
FUSERMOUNT = "fusermount3"
FUSERMOUNT_DIR = "/usr/bin"  # where libfuse looks first (FUSERMOUNT_DIR), then $PATH
_IDENTITY_MAP = ["0", "0", "4294967295"]


def effective_caps(status: str | None = None) -> int:
    """The CapEff mask of this process (from /proc/self/status, or *status*)."""
    if status is None:
        with open("/proc/self/status") as f:
            status = f.read()
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def initial_userns(uid_map: str | None = None) -> bool:
    """Whether this process is in the initial user namespace (the identity map of all ids)."""
    return _uid_map(uid_map) == [_IDENTITY_MAP]


def _uid_map(uid_map: str | None) -> list[list[str]]:
    if uid_map is None:
        try:
            with open("/proc/self/uid_map") as f:
                uid_map = f.read()
        except FileNotFoundError:  # a kernel without user namespaces
            uid_map = " ".join(_IDENTITY_MAP)
    return [line.split() for line in uid_map.splitlines() if line.strip()]


def outer_uid(uid: int | None = None, uid_map: str | None = None) -> int | None:
    """The uid that *uid* (default: the effective uid) is in the parent user namespace
    (the host's, unless namespaces are nested), per /proc/self/uid_map; None if unmapped."""
    if uid is None:
        uid = os.geteuid()
    for row in _uid_map(uid_map):
        try:
            inside, outside, count = (int(v) for v in row)
        except ValueError:
            continue
        if inside <= uid < inside + count:
            return outside + uid - inside
    return None


def userns_root(uid_map: str | None = None, euid: int | None = None) -> bool:
    """Root of a user namespace that is not the host's root: uid 0 here, another uid outside
    (``unshare -Ur`` or ``podman unshare`` as a user; podman runs a rootless mount program
    so). Such a root may mount FUSE in a mount namespace of its own, but it may not write
    where host root keeps its state (/run), nor use ``trusted.*`` xattrs."""
    if (os.geteuid() if euid is None else euid) != 0:
        return False
    if uid_map is None:
        uid_map = "\n".join(" ".join(row) for row in _uid_map(None))  # read once
    return not initial_userns(uid_map) and outer_uid(0, uid_map) not in (0, None)


def host_root() -> bool:
    """Root whose files are the host root's: uid 0 in the initial user namespace, or in one
    that maps uid 0 to the host's root (``unshare -Ur`` run by root). Its state belongs in
    /run, /var/lib; everyone else's (:func:`userns_root` included) in the user's dirs."""
    return os.geteuid() == 0 and not userns_root()


def privileged() -> bool:
    """CAP_SYS_ADMIN in the initial user namespace: ``trusted.*`` xattrs can be used."""
    return bool(effective_caps() & (1 << CAP_SYS_ADMIN)) and initial_userns()


def process_privileged(pid: int) -> bool | None:
    """Whether process *pid* (as this server's /proc shows it) has CAP_SYS_ADMIN in the
    initial user namespace, as ``ns_capable(&init_user_ns, CAP_SYS_ADMIN)`` asks; None when
    it cannot be told (pid 0: outside this pid namespace; the process is gone)."""
    if pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            status = f.read()
        with open(f"/proc/{pid}/uid_map") as f:
            uid_map = f.read()
    except OSError:
        return None
    return bool(effective_caps(status) & (1 << CAP_SYS_ADMIN)) and initial_userns(uid_map)


def can_mount() -> bool:
    """Whether mount(2) of FUSE may be tried (libfuse, and the direct engine's
    fuse/mounting.py): CAP_SYS_ADMIN in this process's user namespace, so root, or root of
    a user namespace (which needs a mount namespace of its own there). Otherwise, or when
    mount(2) answers EPERM, both run the setuid fusermount3."""
    return bool(effective_caps() & (1 << CAP_SYS_ADMIN))


def check_fuse_access(cfg: MountConfig) -> None:
    """Raise ConfigError when this user cannot mount *cfg* with FUSE (nothing is changed).
    A mount of an already opened /dev/fuse fd (``cfg.fuse_fd``) needs none of it."""
    if getattr(cfg, "fuse_fd", None) is not None:
        return
    uid = os.geteuid()
    try:
        st = os.stat(DEV_FUSE)
    except OSError:
        raise ConfigError(
            f"{DEV_FUSE} is missing: load the fuse module (modprobe fuse)"
            " or, in a container, pass the device (--device /dev/fuse)"
        ) from None
    if not stat.S_ISCHR(st.st_mode):
        raise ConfigError(f"{DEV_FUSE} is not a character device")
    if not os.access(DEV_FUSE, os.R_OK | os.W_OK, effective_ids=os.access in os.supports_effective_ids):
        raise ConfigError(
            f"{DEV_FUSE} is not accessible to uid {uid} (mode {stat.S_IMODE(st.st_mode):04o}):"
            ' distributions ship it 0666 (udev rule KERNEL=="fuse", MODE="0666")'
        )
    if can_mount():
        return
    tool = fusermount_path()
    if tool is None:
        raise ConfigError(f"{FUSERMOUNT} is missing: install fuse3 (mounting without root needs it)")
    tst = os.stat(tool)
    if tst.st_uid != 0 or not tst.st_mode & stat.S_ISUID:
        raise ConfigError(
            f"{tool} is not setuid root (mounting without root needs it):"
            f" chown root {tool} && chmod u+s {tool}, as the fuse3 package installs it"
        )
    if cfg.allow_other and not user_allow_other():
        raise ConfigError(f"allow_other without root needs 'user_allow_other' in {FUSE_CONF} (or drop -o allow_other)")


def fusermount_path() -> str | None:
    """The fusermount3 libfuse would run: FUSERMOUNT_DIR first, then $PATH."""
    first = os.path.join(FUSERMOUNT_DIR, FUSERMOUNT)
    if os.access(first, os.X_OK):
        return first
    import shutil

    return shutil.which(FUSERMOUNT)


def user_allow_other(path: str = FUSE_CONF) -> bool:
    """Whether fuse.conf has ``user_allow_other`` on a line of its own (fusermount's rule:
    comments and trailing blanks are removed, leading ones are not)."""
    try:
        with open(path) as f:
            return any(line.split("#", 1)[0].rstrip() == "user_allow_other" for line in f)
    except OSError:
        return False
