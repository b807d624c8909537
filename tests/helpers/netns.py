"""Private network namespaces for the network tests: nothing on the host changes.

``NetNS()`` starts a holder process (``unshare --net sleep``) whose namespace has only
``lo`` (brought up); ``ns.cmd(...)`` is the argv prefix that runs a command in it
(``nsenter --net=/proc/HOLDER/ns/net --``), ``ns.sh(script)`` runs a shell there.
``NetnsRuntime(base, ns)`` is a :class:`helpers.containers.Runtime` whose every
``pyoverlay`` command runs in the namespace: the bridge, its nftables table and
ip_forward are the namespace's own, and they go with it when the holder ends.

``link(a, b, addr_a, addr_b)`` joins two namespaces with a veth pair (the "outside"
of the NAT test).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

from .containers import Runtime


class NetNS:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            ["unshare", "--net", "--", "sleep", "1000000"], stdin=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + 30
        own = os.readlink("/proc/self/ns/net")
        while True:  # until the holder is in its new namespace
            try:
                if os.readlink(f"/proc/{self.proc.pid}/ns/net") != own:
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("unshare --net did not start")
            time.sleep(0.01)
        self.sh("ip link set lo up")

    @property
    def path(self) -> str:
        return f"/proc/{self.proc.pid}/ns/net"

    def cmd(self, *argv: str) -> list[str]:
        return ["nsenter", f"--net={self.path}", "--", *argv]

    def run(self, *argv: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        r = subprocess.run(self.cmd(*argv), capture_output=True, text=True, timeout=timeout, **kw)
        if check and r.returncode != 0:
            raise AssertionError(f"{argv} in the netns: exit {r.returncode}\n{r.stdout}\n{r.stderr}")
        return r

    def sh(self, script: str, check: bool = True, timeout: float = 60) -> str:
        return self.run("sh", "-c", script, check=check, timeout=timeout).stdout

    def popen(self, *argv: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.cmd(*argv), **kw)

    def links(self) -> list[str]:
        """Interface names in the namespace."""
        out = self.sh("ip -o link show")
        return sorted(line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line)

    def addresses(self) -> list[str]:
        out = self.sh("ip -o -4 addr show")
        return sorted(line.split()[3] for line in out.splitlines())

    def nft_tables(self) -> str:
        return self.run("nft", "list", "tables").stdout

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


def link(a: NetNS, b: NetNS, addr_a: str, addr_b: str, name: str = "vout") -> None:
    """A veth pair between *a* (``NAME``, *addr_a*/24) and *b* (``NAME-p``, *addr_b*/24)."""
    a.run("ip", "link", "add", name, "type", "veth", "peer", "name", f"{name}-p", "netns", b.path)
    a.sh(f"ip addr add {addr_a}/24 dev {name} && ip link set {name} up")
    b.sh(f"ip addr add {addr_b}/24 dev {name}-p && ip link set {name}-p up")


def web_root(d: Path, page: str) -> Path:
    """A directory for busybox ``httpd -h``: *page* as its index.html."""
    d.mkdir()
    (d / "index.html").write_text(page)
    return d


def leases(rt: NetnsRuntime, bridge_name: str = "pyoverlay0") -> dict:
    """The bridge's allocator leases in *rt*'s namespace (runner/net/bridge.py)."""
    from runner.net import bridge

    try:
        with open(bridge.leases_path(bridge_name, os.stat(rt.ns.path).st_ino)) as f:
            return json.load(f)["leases"]
    except FileNotFoundError:
        return {}


def assert_nothing_left(rt: NetnsRuntime) -> None:
    """No link but lo, no address, no nft table or iptables chain of pyoverlay's and no
    lease in *rt*'s namespace."""
    ns = rt.ns
    assert ns.links() == ["lo"], f"links left in the namespace: {ns.links()}"
    assert ns.addresses() == ["127.0.0.1/8"], ns.addresses()
    assert "pyoverlay" not in ns.nft_tables(), ns.nft_tables()
    rules = ns.run("iptables-save").stdout
    assert "PYOVERLAY" not in rules, rules
    assert not leases(rt), leases(rt)


class NetnsRuntime(Runtime):
    """A runtime whose ``pyoverlay`` commands all run in *ns* (and default to the bridge)."""

    def __init__(self, base: Path, ns: NetNS):
        super().__init__(base)
        self.ns = ns
        self.env.pop("PYOVERLAY_NETWORK", None)  # root's default: the bridge

    def argv(self, *args) -> list[str]:
        return self.ns.cmd(*super().argv(*args))
