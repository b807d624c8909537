"""Syscall numbers for the calls libc does not wrap (or wraps too late), per machine.

The one table for the filesystem (``_sys``), the runner (``runner/_linux``) and the tests.
Numbers are from the kernel's tables: ``arch/x86/entry/syscalls/syscall_64.tbl``,
``include/uapi/asm-generic/unistd.h`` (aarch64, riscv64), ``arch/powerpc/kernel/syscalls/
syscall.tbl`` and ``arch/s390/kernel/syscalls/syscall.tbl``. Calls added since 5.1 have the
same number everywhere (the unified table), so they have one entry.
"""

from __future__ import annotations

import os

#: the machine this process runs on (``uname -m``)
MACHINE = os.uname().machine

_TABLE: dict[str, dict[str, int]] = {
    "pivot_root": {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217},
    "renameat2": {"x86_64": 316, "aarch64": 276, "riscv64": 276, "ppc64le": 357, "s390x": 347},
    "getdents64": {"x86_64": 217, "aarch64": 61, "riscv64": 61, "ppc64le": 202, "s390x": 220},
    "bpf": {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351},
    "seccomp": {"x86_64": 317, "aarch64": 277, "riscv64": 277, "ppc64le": 358, "s390x": 348},
}

#: the unified table (Linux 5.1+, asm-generic numbering on every architecture)
_UNIFIED = {"open_tree": 428, "close_range": 436, "openat2": 437, "mount_setattr": 442}


def number(name: str, machine: str = MACHINE) -> int:
    """The syscall number of *name* on *machine*, or -1 where it is not known: the kernel
    answers an unknown number with ENOSYS, so the call fails cleanly at run time and
    importing never fails on another machine."""
    if name in _UNIFIED:
        return _UNIFIED[name]
    return _TABLE[name].get(machine, -1)
