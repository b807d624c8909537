"""The edge of root bridge networking: every command that changes links, addresses,
routes, firewall rules and sysctls, and the two namespace syscalls.

Links, addresses and routes are made with iproute2's ``ip`` (a Debian essential of any
machine that runs containers): one well-known tool, its errors already one line, and
``ip -batch`` configures a whole namespace in one process. A command runs in the
container's network namespace through ``nsenter --net=/proc/self/fd/N`` with the
namespace's fd passed down (no helper process has to stay in the namespace). The NAT
and forward rules go into pyoverlay's own nftables table (``nft -f -``), or, where nft
is missing, into pyoverlay's own iptables chains (the one jump into POSTROUTING and
FORWARD is the only rule outside them, as docker adds its own).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence

from .. import _linux as L
from ..errors import RunnerError


class NetError(RunnerError):
    """A network step failed (one line; exit status 125)."""


def _run(argv: Sequence[str], *, input: str | None = None, fds: Sequence[int] = (), check: bool = True) -> str:
    try:
        r = subprocess.run(
            list(argv),
            input=input,
            capture_output=True,
            text=True,
            pass_fds=tuple(fds),
            timeout=60,
            errors="replace",
        )
    except FileNotFoundError:
        raise NetError(f"{argv[0]} is not installed (scripts/setup installs it)") from None
    except subprocess.TimeoutExpired:
        raise NetError(f"{' '.join(argv)}: did not finish within 60s") from None
    if check and r.returncode != 0:
        msg = (r.stderr.strip() or r.stdout.strip() or f"exit status {r.returncode}").splitlines()[0]
        raise NetError(f"{' '.join(argv[:4])}: {msg}")
    return r.stdout


def ip(*args: str, check: bool = True) -> str:
    """``ip ARGS`` in our own (the host's) network namespace."""
    return _run(["ip", *args], check=check)


def ip_batch_in(ns_fd: int, commands: Sequence[str]) -> None:
    """``ip -batch -`` inside the network namespace *ns_fd*."""
    _run(
        ["nsenter", f"--net=/proc/self/fd/{ns_fd}", "--", "ip", "-batch", "-"],
        input="".join(c + "\n" for c in commands),
        fds=[ns_fd],
    )


def link_exists(name: str) -> bool:
    """In our network namespace (not /sys/class/net: sysfs shows the namespace of whoever
    mounted it)."""
    return bool(_run(["ip", "-o", "link", "show", "dev", name], check=False).strip())


def delete_link(name: str) -> None:
    """``ip link del NAME`` if it exists (a veth's peer goes with it)."""
    if link_exists(name):
        ip("link", "del", name, check=False)


def new_netns() -> int:
    """An fd of a new, empty network namespace (only ``lo``, down). The caller must be
    single-threaded: it unshares one and goes back to its own, as the monitor does for
    the pid namespace."""
    own = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        L.unshare(L.CLONE_NEWNET)
        try:
            return os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        finally:
            L.setns(own, L.CLONE_NEWNET)
    finally:
        os.close(own)


def enable_ip_forward() -> None:
    """net.ipv4.ip_forward=1 in our network namespace, as docker sets it (left set)."""
    path = "/proc/sys/net/ipv4/ip_forward"
    with open(path) as f:
        if f.read().strip() == "1":
            return
    with open(path, "w") as f:
        f.write("1\n")


# --- NAT: pyoverlay's own nftables table (iptables chains where nft is missing) ----------


def have_nft() -> bool:
    return shutil.which("nft") is not None and not os.environ.get("PYOVERLAY_NO_NFT")


def nat_table(bridge: str) -> str:
    """The nftables table (``ip`` family) of *bridge*: ``pyoverlay`` for the default
    bridge, ``pyoverlay_<name>`` for another one."""
    return "pyoverlay" if bridge == "pyoverlay0" else "pyoverlay_" + bridge.replace("-", "_").replace(".", "_")


def _ipt_chain(bridge: str) -> str:
    return ("PYOVERLAY-" + bridge)[:28]


def nat_up(bridge: str, subnet: str) -> None:
    """Masquerade for *subnet* leaving by another interface than *bridge*, and accept
    forwarding from the bridge and the replies to it. Idempotent."""
    if have_nft():
        table = nat_table(bridge)
        if _run(["nft", "list", "table", "ip", table], check=False).strip():
            return
        _run(
            ["nft", "-f", "-"],
            input=f"""table ip {table} {{
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {subnet} oifname != "{bridge}" masquerade
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    iifname "{bridge}" accept
    oifname "{bridge}" ct state established,related accept
  }}
}}
""",
        )
        return
    chain = _ipt_chain(bridge)
    for table, hook, rules in (
        ("nat", "POSTROUTING", [["-s", subnet, "!", "-o", bridge, "-j", "MASQUERADE"]]),
        (
            "filter",
            "FORWARD",
            [
                ["-i", bridge, "-j", "ACCEPT"],
                ["-o", bridge, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT"],
            ],
        ),
    ):
        if _run(["iptables", "-w", "-t", table, "-nL", chain], check=False).strip():
            continue
        _run(["iptables", "-w", "-t", table, "-N", chain])
        for rule in rules:
            _run(["iptables", "-w", "-t", table, "-A", chain, *rule])
        _run(["iptables", "-w", "-t", table, "-I", hook, "-j", chain])


def nat_down(bridge: str) -> None:
    """Remove what :func:`nat_up` made (nothing else)."""
    if have_nft():
        table = nat_table(bridge)
        if _run(["nft", "list", "table", "ip", table], check=False).strip():
            _run(["nft", "delete", "table", "ip", table], check=False)
        return
    chain = _ipt_chain(bridge)
    for table, hook in (("nat", "POSTROUTING"), ("filter", "FORWARD")):
        for _ in range(10):  # every jump we added (one, unless a crash added two)
            if not _chain_jump_exists(table, hook, chain):
                break
            _run(["iptables", "-w", "-t", table, "-D", hook, "-j", chain], check=False)
        _run(["iptables", "-w", "-t", table, "-F", chain], check=False)
        _run(["iptables", "-w", "-t", table, "-X", chain], check=False)


def _chain_jump_exists(table: str, hook: str, chain: str) -> bool:
    r = subprocess.run(["iptables", "-w", "-t", table, "-C", hook, "-j", chain], capture_output=True)
    return r.returncode == 0
