"""One home each: mountinfo parsing (overlayfs_py/mountinfo.py), /proc/PID/stat
(overlayfs_py/procfs.py), syscall numbers (overlayfs_py/_syscalls.py) and the private
xattr prefix (overlayfs_py/whiteout.py).

Each home is checked against the kernel (a real mount, a real process, real syscalls),
and a scan of the source tree keeps a second copy from coming back.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from overlayfs_py import _sys, _syscalls, mountinfo, procfs
from overlayfs_py.whiteout import TRUSTED_PREFIX, USER_PREFIX, XattrNames, prefix_for

REPO = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------
# mountinfo
# --------------------------------------------------------------------------

SAMPLE = (
    "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard\n"
    "40 22 0:35 / /tmp/a\\040b\\011c\\012d\\134e rw,nosuid master:3 shared:7 - tmpfs my\\040src rw,size=10k\n"
    "41 22 0:36 / /mnt/nosuper rw - fusectl fusectl\n"
    "garbage line without the separator\n"
    "\n"
)


def test_mountinfo_parse_unescapes_and_finds_the_separator_after_optional_fields():
    rows = mountinfo.parse(SAMPLE)
    assert [r.mountpoint for r in rows] == ["/", "/tmp/a b\tc\nd\\e", "/mnt/nosuper"]
    tmp = rows[1]
    assert (tmp.devno, tmp.options, tmp.fstype, tmp.source, tmp.super_options) == (
        "0:35",
        "rw,nosuid",
        "tmpfs",
        "my src",
        "rw,size=10k",
    )
    assert rows[2].super_options == "" and rows[2].fstype == "fusectl"


@pytest.mark.needs_root
def test_mountinfo_sees_a_real_mount_with_awkward_characters(tmp_path):
    """A tmpfs mounted on a path with a space, a tab and a backslash: mount_at,
    is_mounted and mounts_under find it by its real path (never stat'ing it)."""
    mp = tmp_path / "a b\tc\\d"
    mp.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "one home", str(mp)], check=True)
    try:
        m = mountinfo.mount_at(str(mp))
        assert m is not None and m.fstype == "tmpfs" and m.source == "one home"
        assert m.devno == f"{os.major(os.stat(mp).st_dev)}:{os.minor(os.stat(mp).st_dev)}"
        assert mountinfo.is_mounted(str(mp))
        assert mountinfo.mounts_under(str(tmp_path)) == [str(mp)]
        assert mountinfo.mounts_under(str(tmp_path) + "/a") == []  # a prefix of a name is not a parent
    finally:
        subprocess.run(["umount", str(mp)], check=True)
    assert not mountinfo.is_mounted(str(mp))


# --------------------------------------------------------------------------
# /proc/PID/stat
# --------------------------------------------------------------------------

AWKWARD_COMM = "a) b (c) d"  # 10 bytes: within the kernel's 15


def _child_with_comm(comm: str) -> subprocess.Popen:
    code = (
        "import ctypes, sys, time; ctypes.CDLL(None).prctl(15, sys.argv[1].encode(), 0, 0, 0); "
        "print('ready', flush=True); time.sleep(60)"
    )
    p = subprocess.Popen([sys.executable, "-c", code, comm], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "ready\n"
    return p


def test_procfs_reads_fields_after_a_comm_with_parentheses_and_spaces():
    p = _child_with_comm(AWKWARD_COMM)
    try:
        st = procfs.stat(p.pid)
        assert st.comm == AWKWARD_COMM
        assert st.ppid == os.getpid() and st.state in ("S", "R") and st.running
        assert st.start_time >= procfs.stat(os.getpid()).start_time
        assert procfs.process_start_time(p.pid) == st.start_time and procfs.alive(p.pid)
    finally:
        p.kill()
    # killed but not reaped yet: a zombie, not alive, and no start time
    deadline = time.monotonic() + 10
    while procfs.stat(p.pid).state != "Z":
        assert time.monotonic() < deadline, "the child never became a zombie"
        time.sleep(0.01)
    assert not procfs.alive(p.pid) and procfs.process_start_time(p.pid) is None
    p.wait()
    p.stdout.close()
    with pytest.raises(OSError):
        procfs.stat(p.pid)
    assert procfs.process_start_time(p.pid) is None and not procfs.alive(p.pid)


def test_runner_uses_the_same_reader():
    from runner import _linux as L

    assert L.process_start_time is procfs.process_start_time
    assert L.alive(os.getpid(), procfs.process_start_time(os.getpid()))


# --------------------------------------------------------------------------
# syscall numbers
# --------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _raw(name: str, *args) -> int:
    """errno of syscall *name* with *args* (0 on success)."""
    ctypes.set_errno(0)
    r = _libc.syscall(ctypes.c_long(_syscalls.number(name)), *args)
    return 0 if r >= 0 else ctypes.get_errno()


def test_the_table_numbers_are_this_kernels(tmp_path):
    """Each number reaches the call it names: a wrong number gives ENOSYS or another
    call's error, so each call is made with arguments only it answers this way."""
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").write_text("b")
    # renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_NOREPLACE): EEXIST, and nothing renamed
    at = ctypes.c_int(-100)
    assert (
        _raw("renameat2", at, bytes(tmp_path / "a"), at, bytes(tmp_path / "b"), ctypes.c_uint(_sys.RENAME_NOREPLACE))
        == errno.EEXIST
    )
    assert (tmp_path / "a").read_text() == "a"
    # close_range on a range with no open fd: success
    assert _raw("close_range", ctypes.c_uint(1 << 20), ctypes.c_uint((1 << 20) + 1), ctypes.c_uint(0)) == 0
    # openat2 with a too-small struct open_how: EINVAL (open_how is at least 24 bytes)
    how = ctypes.create_string_buffer(24)
    assert _raw("openat2", ctypes.c_int(-100), bytes(tmp_path), how, ctypes.c_size_t(8)) == errno.EINVAL
    fd = _sys.openat2(os.open(tmp_path, os.O_PATH | os.O_DIRECTORY), b"a", os.O_RDONLY)
    assert os.read(fd, 1) == b"a"
    os.close(fd)
    # pivot_root on paths that do not exist: ENOENT (EPERM without CAP_SYS_ADMIN)
    assert _raw("pivot_root", bytes(tmp_path / "no"), bytes(tmp_path / "no")) in (errno.ENOENT, errno.EPERM)
    # bpf with an unknown command: EINVAL (EPERM where unprivileged bpf is off)
    attr = ctypes.create_string_buffer(8)
    assert _raw("bpf", ctypes.c_int(9999), attr, ctypes.c_uint(8)) in (errno.EINVAL, errno.EPERM)


def test_an_unknown_machine_gets_enosys_from_the_kernel():
    assert _syscalls.number("renameat2", machine="pdp11") == -1
    assert _syscalls.number("openat2", machine="pdp11") == 437  # the unified table
    ctypes.set_errno(0)
    assert _libc.syscall(ctypes.c_long(-1)) == -1 and ctypes.get_errno() == errno.ENOSYS


def test_prctl_is_the_filesystems():
    """_sys.prctl reports errors; set_parent_death_signal takes effect (PR_GET_PDEATHSIG)."""
    with pytest.raises(OSError) as e:
        _sys.prctl(-1)
    assert e.value.errno == errno.EINVAL
    code = (
        "import ctypes, signal; from overlayfs_py import _sys; "
        "_sys.set_parent_death_signal(signal.SIGUSR1); v = ctypes.c_int(); "
        "ctypes.CDLL(None).prctl(2, ctypes.byref(v), 0, 0, 0); print(v.value)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(out) == signal.SIGUSR1


# --------------------------------------------------------------------------
# the private xattr prefix
# --------------------------------------------------------------------------


def test_prefix_for():
    assert prefix_for(False) == TRUSTED_PREFIX == "trusted.overlay."
    assert prefix_for(True) == USER_PREFIX == "user.overlay."
    assert XattrNames.for_userxattr(True).opaque == "user.overlay.opaque"
    assert XattrNames.for_userxattr(False).whiteout == "trusted.overlay.whiteout"


# --------------------------------------------------------------------------
# no second copy
# --------------------------------------------------------------------------


def _sources():
    for top in ("overlayfs_py", "runner", "scripts", "tests"):
        for p in sorted((REPO / top).rglob("*.py")):
            if p.name != "test_one_home.py":
                yield p
    for name in ("bench", "demo"):
        yield REPO / "scripts" / name


#: (what, pattern, the one file allowed to have it, where to look). The tests spell the
#: xattr names out themselves: they state the on-disk format independently of the code.
SECOND_COPIES = [
    ("mountinfo reading", re.compile(r"open\([^)\n]*mountinfo"), "overlayfs_py/mountinfo.py", ""),
    ("mountinfo field splitting", re.compile(r"index\(\"-\"\)|partition\(\" - \"\)"), "overlayfs_py/mountinfo.py", ""),
    (
        "/proc/PID/stat reading",
        re.compile(r"/proc/\{[^}]*\}/stat[\"']|/proc/self/stat[\"']"),
        "overlayfs_py/procfs.py",
        "",
    ),
    ("a syscall number", re.compile(r"\b_?SYS_\w+\s*=\s*\d|\{\"x86_64\":\s*\d"), "overlayfs_py/_syscalls.py", ""),
    (
        "the whiteout test",
        re.compile(r"\bst_rdev\s*==\s*0|S_ISCHR\([^)]*\)\s*and\s*\w*\s*==\s*0|\.whiteout\b\)? is not None"),
        "overlayfs_py/whiteout.py",
        "tests/",
    ),
    ("the AUFS marker names", re.compile(r"b[\"']\.wh\."), "overlayfs_py/whiteout.py", "tests/"),
    (
        "the private xattr prefix",
        re.compile(r"[\"'](trusted|user)\.overlay\.[\"']"),
        "overlayfs_py/whiteout.py",
        "tests/",
    ),
]


@pytest.mark.parametrize("what,pattern,home,exempt", SECOND_COPIES, ids=[s[0] for s in SECOND_COPIES])
def test_no_second_copy(what, pattern, home, exempt):
    found = []
    for p in _sources():
        rel = p.relative_to(REPO).as_posix()
        if rel == home or not p.is_file() or (exempt and rel.startswith(exempt)):
            continue
        for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
            if pattern.search(line):
                found.append(f"{rel}:{n}: {line.strip()}")
    assert not found, f"{what} belongs in {home}, found elsewhere:\n" + "\n".join(found)
