"""What the JSON result says about the machine and the versions measured."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys

from .util import REPO, tool_version


def machine(workroot: str) -> dict:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) // 1024
    fs = subprocess.run(
        ["findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", workroot], capture_output=True, text=True
    ).stdout.strip()
    virt = tool_version(["systemd-detect-virt"]) if shutil.which("systemd-detect-virt") else None
    return {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "mem_mib": mem,
        "virt": virt,
        "work_root": workroot,
        "work_fs": " ".join(fs.split()),
    }


def versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for mod in ("pyfuse3", "trio"):
        try:
            from importlib.metadata import version

            out[mod] = version(mod)
        except Exception:
            out[mod] = None
    out["fuse-overlayfs"] = tool_version(["fuse-overlayfs", "--version"])
    out["fusermount3"] = tool_version(["fusermount3", "--version"])
    out["fio"] = tool_version(["fio", "--version"]) if shutil.which("fio") else None
    out["tar"] = (tool_version(["tar", "--version"]) or "").split(" / ")[0] or None
    git = subprocess.run(["git", "-C", REPO, "describe", "--always", "--dirty"], capture_output=True, text=True)
    out["pyoverlay"] = git.stdout.strip() or None
    return out
