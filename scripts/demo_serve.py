"""Part 6 of the demo: a container that serves, on the bridge, with a published port.

A busybox ``httpd`` runs detached on the two-layer image of part 2 plus a ``web`` layer
(its pages and a CGI script that counts visits in a file of that layer), on pyoverlay's
bridge with ``-p 127.0.0.1:PORT:80``. While ``pyoverlay trace`` follows it live, curl on
the host fetches the page, then the counter: the first visit copies the counter file up
from the web layer, and the live trace names the CGI process that did it. ``pyoverlay
ps`` shows the container's address and port; ``exec`` shows its seccomp filter, its
cgroup namespace and its eth0. After ``stop`` the port is closed, and after ``rm``
nothing of its network is left.

Called by scripts/demo.py as root, with part 2's helpers (build_image, runner, LiveTrace).
"""

from __future__ import annotations

import re
import shlex
import shutil
import socket
import subprocess
import time
from pathlib import Path

NAME = "demo-srv"
PAGE = "<h1>hello from a pyoverlay container</h1>\n"
VISIT_CGI = """#!/bin/sh
n=$(cat /www/visits)
n=$((n + 1))
echo $n > /www/visits
printf 'Content-Type: text/plain\\r\\n\\r\\n'
echo "visit number $n, served by $(hostname)"
"""
CURL_TIMEOUT = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def curl(d, url: str) -> subprocess.CompletedProcess[str]:
    argv = ["curl", "-sS", "--max-time", str(CURL_TIMEOUT), url]
    d.say(f"  $ {shlex.join(argv)}")
    r = subprocess.run(argv, capture_output=True, text=True, timeout=CURL_TIMEOUT + 5)
    d.indent(r.stdout or r.stderr or f"(exit status {r.returncode})")
    return r


def wait_served(port: int, timeout: float = 20.0) -> bool:
    """True once something accepts on 127.0.0.1:*port* (httpd starts after run -d returns)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                return True
        except OSError:
            time.sleep(0.2)
    return False


def build_web(d, work: Path) -> None:
    web = work / "web"
    d.write(web / "www/index.html", PAGE)
    d.write(web / "www/visits", "0\n")
    d.write(web / "www/cgi-bin/visit", VISIT_CGI, 0o755)


def part(d, base: Path) -> int:
    d.say()
    if not d.ROOT:
        d.say("#### Part 6, a container that serves on the bridge, needs root: skipped.")
        return 0
    if shutil.which("curl") is None:
        d.failed("curl is missing (scripts/setup installs it)")
        return 1
    d.say("#### Part 6: a container that serves, with a published port, traced")
    work = base / "serve"
    failures = len(d.FAILURES)
    try:
        d.heading(f"The image: part 2's two layers plus a web layer, in {work}")
        if not d.build_image(work):
            return 1
        build_web(d, work)
        d.say("  web, on top of app and base:")
        d.show_tree(work / "web")
        serve(d, work)
    finally:
        d.remove_containers(work)
    return 1 if len(d.FAILURES) > failures else 0


def serve(d, work: Path) -> None:
    port = free_port()
    d.heading("Running httpd on the bridge, its port 80 published on the host's 127.0.0.1")
    r = d.show_cmd(
        work,
        "run", "-d", "--name", NAME, "-p", f"127.0.0.1:{port}:80", "--cgroupns", "private",
        "web:app:base", "httpd", "-f", "-v", "-p", "80", "-h", "/www",
    )  # fmt: skip
    if r.returncode != 0:
        return
    cid = r.stdout.strip().splitlines()[-1]
    r = d.show_cmd(work, "ps")
    if f"127.0.0.1:{port}->80/tcp" not in r.stdout:
        d.failed(f"ps does not show the published port 127.0.0.1:{port}->80/tcp")
    d.say()
    d.say("  Inside: its own eth0 on the bridge, docker's seccomp filter (mode 2), and with")
    d.say("  --cgroupns private its own cgroup namespace (its cgroups are / to it).")
    r = d.show_cmd(
        work,
        "exec",
        NAME,
        "sh",
        "-c",
        "ip -4 -o addr show eth0; ip route; grep Seccomp: /proc/self/status; cat /proc/self/cgroup | head -3",
    )
    if not re.search(r"eth0\s+inet \d+\.\d+\.\d+\.\d+/\d+", r.stdout):
        d.failed("exec: the container has no IPv4 address on eth0")
    if not re.search(r"^Seccomp:\s+2$", r.stdout, re.M):
        d.failed("exec: the container is not under a seccomp filter")
    if not re.search(r"^\d+:[^:]*:/$", r.stdout, re.M):
        d.failed("exec: the container's cgroups are not / in its cgroup namespace")

    d.say()
    d.say("  Follow its copy-ups live while the host visits it:")
    d.say(f"  $ pyoverlay trace --history {NAME} &")
    live = d.LiveTrace(work, "trace", "--history", NAME)
    try:
        if live.wait_for(re.compile(r"^TIME\s+PROCESS\s"), 0) is None:
            d.failed("pyoverlay trace printed no header")
        if not wait_served(port):
            d.failed(f"nothing answers on 127.0.0.1:{port}")
            return
        d.heading("Visiting it from the host")
        d.say("  The page is read from the web layer: reading copies nothing up.")
        seen = len(live.lines)
        r = curl(d, f"http://127.0.0.1:{port}/")
        if r.stdout != PAGE:
            d.failed("curl did not get the container's page")
        d.say()
        d.say("  The counter is a file of the web layer: the CGI's first write copies it up, and the")
        d.say("  live trace names the process that did it (the script, in the container).")
        for n in (1, 2):
            r = curl(d, f"http://127.0.0.1:{port}/cgi-bin/visit")
            if not r.stdout.startswith(f"visit number {n}, served by {cid[:12]}"):
                d.failed(f"visit {n}: unexpected answer {r.stdout.strip()!r}")
            if n == 1:
                got = live.wait_for(re.compile(rf"\[{cid[:12]}:\d+\]\s+copy_up_done\s+/www/visits\s"), seen)
                if got is None:
                    d.failed("the live trace did not show the copy-up of /www/visits")
        d.say("  (the second visit copied nothing: the counter is in the upper layer already)")
        d.heading(f"What the visits changed: pyoverlay diff {NAME}")
        r = d.show_cmd(work, "diff", NAME)
        if "C /www/visits" not in r.stdout.splitlines():
            d.failed("diff does not list C /www/visits")
        d.say()
        d.say("  httpd's own log (-v), through pyoverlay logs: visits come from the bridge's address,")
        d.say("  where the port's proxy connects from.")
        d.show_cmd(work, "logs", NAME)

        d.heading("Stopping it: the published port closes")
        d.show_cmd(work, "stop", "-t", "2", NAME)
        r = curl(d, f"http://127.0.0.1:{port}/")
        if r.returncode == 0:
            d.failed(f"127.0.0.1:{port} still answers after stop")
        else:
            d.say(f"  curl exit status {r.returncode}: nothing listens on 127.0.0.1:{port} any more")
    finally:
        live.close()
    d.show_cmd(work, "rm", NAME)
