"""The runner's syscall edge: namespaces, mounts, pivot_root, prctl, capabilities.

Syscall numbers come from ``overlayfs_py._syscalls`` (the one table); ``prctl`` and the
/proc/PID/stat reader are the filesystem's (``_sys``, ``procfs``), used here by name.

Python 3.11 has no ``os.unshare``/``os.setns`` and no Python has ``mount`` or
``pivot_root``; these are thin ctypes wrappers that raise ``OSError`` with errno.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from typing import TypeGuard

from overlayfs_py import _syscalls
from overlayfs_py._sys import PR_SET_PDEATHSIG as PR_SET_PDEATHSIG  # the filesystem's, used here by name
from overlayfs_py._sys import prctl as prctl
from overlayfs_py.procfs import process_start_time as process_start_time

_libc = ctypes.CDLL(None, use_errno=True)

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_STRICTATIME = 1 << 24
MNT_DETACH = 2

PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_SET_NAME = 15
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

#: Namespaces a container gets, in the order ``exec`` joins them (mnt last: after
#: it, paths resolve inside the container).
NAMESPACES = (
    ("ipc", CLONE_NEWIPC),
    ("uts", CLONE_NEWUTS),
    ("net", CLONE_NEWNET),
    ("pid", CLONE_NEWPID),
    ("mnt", CLONE_NEWNS),
)


def _check(res: int, what: str, path: str | None = None) -> int:
    if res < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}", path)
    return res


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def setns(fd: int, nstype: int = 0) -> None:
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), "setns")


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    def b(s):
        return None if s is None else os.fsencode(s)

    res = _libc.mount(b(source), b(target), b(fstype), ctypes.c_ulong(flags), b(data))
    _check(res, f"mount {fstype or 'bind' if flags & MS_BIND else fstype}", target)


def umount2(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(os.fsencode(target), ctypes.c_int(flags)), "umount", target)


def pivot_root(new_root: str, put_old: str) -> None:
    _check(
        _libc.syscall(ctypes.c_long(_syscalls.number("pivot_root")), os.fsencode(new_root), os.fsencode(put_old)),
        "pivot_root",
        new_root,
    )


def set_comm(name: str) -> None:
    _libc.prctl(ctypes.c_int(PR_SET_NAME), ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


def last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return 40


def drop_bounding_caps(keep: set[int]) -> None:
    """Drop every capability not in *keep* from the bounding set, and clear the
    ambient set. For uid 0 the permitted and effective sets after ``execve`` are the
    bounding set, so this is all a root container needs."""
    for cap in range(last_cap() + 1):
        if cap not in keep and _libc.prctl(PR_CAPBSET_READ, ctypes.c_ulong(cap), 0, 0, 0) == 1:
            prctl(PR_CAPBSET_DROP, cap)
    _libc.prctl(PR_CAP_AMBIENT, ctypes.c_ulong(PR_CAP_AMBIENT_CLEAR_ALL), 0, 0, 0)


def set_no_new_privs() -> None:
    prctl(PR_SET_NO_NEW_PRIVS, 1)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_SET_MODE_FILTER = 1


def seccomp_set_filter(program: bytes, flags: int = 0) -> None:
    """Load a classic BPF seccomp program (``struct sock_filter`` entries, 8 bytes each)
    into the calling thread: prctl(PR_SET_SECCOMP), or seccomp(2) when *flags* are given."""
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    if flags:
        nr = _syscalls.number("seccomp")
        res = _libc.syscall(
            ctypes.c_long(nr), ctypes.c_uint(SECCOMP_SET_MODE_FILTER), ctypes.c_uint(flags), ctypes.byref(prog)
        )
    else:
        res = _libc.prctl(ctypes.c_int(PR_SET_SECCOMP), ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(prog), 0, 0)
    _check(res, "seccomp")


def alive(pid: int | None, start_time: int | None) -> TypeGuard[int]:
    """*pid* is the process that started at *start_time* (not a recycled pid) and runs."""
    return bool(pid and start_time is not None and process_start_time(pid) == start_time)


def ns_inode(pid: int | str, ns: str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/{ns}").st_ino
    except OSError:
        return None


def nspid(pid: int) -> list[int]:
    """``NSpid`` of /proc/PID/status: the pid in each pid namespace, outermost first."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return [int(x) for x in line.split()[1:]]
    except OSError:
        pass
    return []


def pids_in_pid_ns(ns_ino: int) -> list[int]:
    """Host pids of every process in the pid namespace with inode *ns_ino*."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit() and ns_inode(name, "pid") == ns_ino:
            out.append(int(name))
    return sorted(out)


# --- capabilities: the inheritable and ambient sets ------------------------------------

_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def clear_inheritable_caps() -> None:
    """Empty the inheritable and ambient sets, keeping effective and permitted.

    For uid 0, ``execve`` gives permitted = bounding | inheritable: an inheritable set
    handed down by whoever started pyoverlay (``capsh --inh=cap_sys_admin``) would
    survive the bounding-set drop and reach the container. runc and docker (since
    CVE-2022-24769) start every container process with both sets empty."""
    _libc.prctl(PR_CAP_AMBIENT, ctypes.c_ulong(PR_CAP_AMBIENT_CLEAR_ALL), 0, 0, 0)
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capget(ctypes.byref(hdr), data), "capget")
    for d in data:
        d.inheritable = 0
    _check(_libc.capset(ctypes.byref(hdr), data), "capset")


# --- closing inherited file descriptors ----------------------------------------------------


def close_fds_from(first: int, keep=()) -> None:
    """Close every fd >= *first* except those in *keep* (close_range(2) between them,
    a /proc/self/fd walk where the kernel lacks it)."""
    keep = sorted({fd for fd in keep if fd is not None and fd >= first})
    lo = first
    for k in keep + [None]:
        hi = (k - 1) if k is not None else 0xFFFFFFFF
        if lo <= hi:
            res = _libc.syscall(
                ctypes.c_long(_syscalls.number("close_range")), ctypes.c_uint(lo), ctypes.c_uint(hi), ctypes.c_uint(0)
            )
            if res < 0:
                for name in os.listdir("/proc/self/fd"):
                    fd = int(name)
                    if lo <= fd <= hi:
                        with contextlib.suppress(OSError):
                            os.close(fd)
        if k is not None:
            lo = k + 1


# --- device cgroup (v2): a BPF_PROG_TYPE_CGROUP_DEVICE program --------------------------

_BPF_PROG_LOAD = 5
_BPF_PROG_ATTACH = 8
_BPF_PROG_TYPE_CGROUP_DEVICE = 15
_BPF_CGROUP_DEVICE = 6
_BPF_F_ALLOW_MULTI = 2
_DEV_TYPE = {"b": 1, "c": 2}  # BPF_DEVCG_DEV_BLOCK / _CHAR
_DEV_ACCESS = {"m": 1, "r": 2, "w": 4}  # BPF_DEVCG_ACC_MKNOD / _READ / _WRITE


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    import struct
    import sys

    regs = (src << 4 | dst) if sys.byteorder == "little" else (dst << 4 | src)
    return struct.pack("=BBhi", code, regs, off, imm)


def device_filter_program(rules) -> bytes:
    """An eBPF program allowing exactly the *rules* (``(type, major, minor, access)``:
    type "a", "b" or "c", major/minor None for any, access a subset of "rwm") and
    denying everything else, as runc's devicefilter does for an allow list.

    The context is ``struct bpf_cgroup_dev_ctx {u32 access_type; u32 major; u32
    minor;}`` with the device type in the low 16 bits of access_type and the access
    bits in the high 16; the program returns 1 (allow) or 0 (EPERM)."""
    LDXW, MOV_REG, MOV_IMM, AND_IMM, RSH_IMM, JNE_IMM, EXIT = 0x61, 0xBF, 0xB7, 0x57, 0x77, 0x55, 0x95
    out = [
        _insn(LDXW, 2, 1, 0),
        _insn(MOV_REG, 3, 2),
        _insn(AND_IMM, 3, imm=0xFFFF),
        _insn(MOV_REG, 4, 2),
        _insn(RSH_IMM, 4, imm=16),
        _insn(LDXW, 5, 1, 4),
        _insn(LDXW, 6, 1, 8),
    ]
    for kind, major, minor, access in rules:
        checks = []
        if kind != "a":
            checks.append((3, _DEV_TYPE[kind]))
        if major is not None:
            checks.append((5, major))
        if minor is not None:
            checks.append((6, minor))
        mask = sum(_DEV_ACCESS[a] for a in access)
        # block: one JNE per check (to the next block), r7 = access & ~mask,
        # JNE r7 0 (next block), r0 = 1, exit; a jump's offset counts from the next insn
        length = len(checks) + 4
        block = []
        for i, (reg, value) in enumerate(checks):
            block.append(_insn(JNE_IMM, reg, off=length - i, imm=value))
        block += [
            _insn(MOV_REG, 7, 4),
            _insn(AND_IMM, 7, imm=~mask & 0xFFFF),
            _insn(JNE_IMM, 7, off=2, imm=0),
            _insn(MOV_IMM, 0, imm=1),
            _insn(EXIT),
        ]
        assert len(block) == length + 1
        out += block
    out += [_insn(MOV_IMM, 0, imm=0), _insn(EXIT)]
    return b"".join(out)


def _bpf(cmd: int, attr: ctypes.Array) -> int:
    return _check(
        _libc.syscall(
            ctypes.c_long(_syscalls.number("bpf")), ctypes.c_int(cmd), attr, ctypes.c_uint(ctypes.sizeof(attr))
        ),
        "bpf",
    )


def attach_device_filter(cgroup_dir: str, rules) -> None:
    """Load the device program for *rules* and attach it to the cgroup v2 directory
    (the attachment lives as long as the cgroup; no fd is kept)."""
    import struct

    code = device_filter_program(rules)
    insns = ctypes.create_string_buffer(code, len(code))
    license = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(1 << 16)

    def load(log_level: int) -> int:
        attr = ctypes.create_string_buffer(120)
        struct.pack_into(
            "=IIQQIIQII",
            attr,
            0,
            _BPF_PROG_TYPE_CGROUP_DEVICE,
            len(code) // 8,
            ctypes.addressof(insns),
            ctypes.addressof(license),
            log_level,
            len(log) if log_level else 0,
            ctypes.addressof(log) if log_level else 0,
            0,
            0,
        )
        return _bpf(_BPF_PROG_LOAD, attr)

    try:
        prog = load(0)
    except OSError as e:
        with contextlib.suppress(OSError):  # again, for the verifier's reason
            os.close(load(1))
        detail = [
            line
            for line in log.value.decode(errors="replace").strip().splitlines()
            if line and not line.startswith("processed ")
        ]
        err = e.errno or errno.EINVAL  # _check always sets it
        raise OSError(
            err, f"bpf: cannot load the device program: {os.strerror(err)}" + (f" ({detail[-1]})" if detail else "")
        ) from None
    try:
        cg = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            attach = ctypes.create_string_buffer(20)
            struct.pack_into("=IIII", attach, 0, cg, prog, _BPF_CGROUP_DEVICE, _BPF_F_ALLOW_MULTI)
            _bpf(_BPF_PROG_ATTACH, attach)
        finally:
            os.close(cg)
    finally:
        os.close(prog)
