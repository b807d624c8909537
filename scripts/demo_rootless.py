"""Part 3 of the demo: the same container, run by an ordinary user.

The user ``pyoverlay-test`` (added by scripts/setup, with /etc/subuid ranges) runs the
two-layer busybox image with ``pyoverlay run``: inside it is root, PID 1 is its shell,
it writes, deletes and chowns; outside, the demo shows what that left in the upper layer
(the user's files, ``user.overlay.*`` metadata, the owners the user could not give kept
in ``user.containers.override_stat``) and mounts the kernel's overlay with ``-o userxattr``
over the same layers to show the kernel reads that upper the same way.

Called by scripts/demo.py (as root; the demo acts as the user with ``setpriv``).
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

from overlayfs_py.procfs import process_start_time
from overlayfs_py.whiteout import is_char_whiteout

USER = "pyoverlay-test"
SCRIPT = """\
id
echo "my pid: $$"
ps -o pid,user,comm
echo hello > /root/hello.txt
rm /etc/motd
mkdir -p /srv/data && touch /srv/data/owned-by-1 && chown 1:1 /srv/data/owned-by-1
ls -ln /srv/data
"""
OVERRIDE = "user.containers.override_stat"


def part(demo, base: Path) -> int:
    """*demo*: the scripts/demo.py module (say, heading, failed, build_image, indent...)."""
    demo.say()
    why = _cannot(demo)
    if why:
        demo.say(f"#### Part 3, a container without root: skipped ({why}).")
        return 0
    demo.say(f"#### Part 3: the same image, run by the ordinary user {USER}")
    pw = pwd.getpwnam(USER)
    work = Path(tempfile.mkdtemp(prefix="rootless-", dir=base))
    os.chmod(base, 0o755)  # the user must reach its directory
    os.chmod(work, 0o755)
    try:
        if not demo.build_image(work):  # root's image: root-owned layers app:base
            return 1
        home = work / "home"  # the user's: its upper (and workdir beside it), records, data
        home.mkdir()
        os.chown(home, pw.pw_uid, pw.pw_gid)
        args = ["run", "--rm", "--upper", "upper", f"{work}/app:{work}/base", "sh", "-c", SCRIPT]
        demo.heading(f"As {USER} (uid {pw.pw_uid}): pyoverlay {shlex.join(args[:-1])} SCRIPT")
        demo.indent(SCRIPT, "    > ")
        r = _as_user(pw, home, [str(demo.PYOVERLAY), *args])
        demo.say(f"  output (exit code {r.returncode}):")
        demo.indent(r.stdout or "(no output)")
        if r.returncode != 0:
            demo.failed(f"the rootless container exited with {r.returncode}")
            return 1
        if "uid=0(root) gid=0(root)" not in r.stdout or "my pid: 1" not in r.stdout:
            demo.failed("inside the rootless container the shell is not root, PID 1")
        _show_upper(demo, home / "upper", pw.pw_uid)
        _kernel_reads_it(demo, work, home / "upper")
        left = _processes(pw.pw_uid)
        if left:
            demo.failed(f"processes of {USER} left behind: {left}")
        else:
            demo.say(f"  no process of {USER} is left")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _cannot(demo) -> str | None:
    if not demo.ROOT:
        return "the demo acts as the user pyoverlay-test through root"
    try:
        pwd.getpwnam(USER)
    except KeyError:
        return f"no user {USER}; scripts/setup adds it"
    if shutil.which("setpriv") is None:
        return "no setpriv"
    if os.stat("/dev/fuse").st_mode & 0o006 != 0o006:
        return "/dev/fuse is not open to ordinary users; scripts/setup makes it 0666"
    return None


def _as_user(pw, home: Path, argv: list[str]) -> subprocess.CompletedProcess[str]:
    env = {
        "HOME": str(home),
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "PYOVERLAY_STATE_DIR": str(home / "state"),
        "PYOVERLAY_DATA_DIR": str(home / "data"),
    }
    return subprocess.run(
        ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups", "--", *argv],
        cwd=home,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=120,
    )


def _override(p: Path) -> str:
    try:
        return os.getxattr(p, OVERRIDE, follow_symlinks=False).decode()
    except OSError:
        return "-"


def _show_upper(demo, upper: Path, uid: int) -> None:
    demo.heading("What the container left in the upper layer (seen from the host)")
    demo.say(f"  {'path':26s} {'type':9s} {'owner on disk':14s} {OVERRIDE}")
    for dirpath, dirs, files in os.walk(upper):
        dirs.sort()
        for name in sorted(dirs + files):
            p = Path(dirpath, name)
            st = os.lstat(p)
            kind = "whiteout" if is_char_whiteout(st) else "dir" if stat.S_ISDIR(st.st_mode) else "file"
            demo.say(f"  {str(p.relative_to(upper)):26s} {kind:9s} {f'{st.st_uid}:{st.st_gid}':14s} {_override(p)}")
    hello = upper / "root/hello.txt"
    if not hello.is_file() or os.stat(hello).st_uid != uid or _override(hello) != "0:0:0644":
        demo.failed("root/hello.txt is not the user's file recorded as root's (0:0:0644)")
    motd = upper / "etc/motd"
    if not (os.path.lexists(motd) and is_char_whiteout(os.lstat(motd))):
        demo.failed("etc/motd is not a whiteout")
    mine = upper / "srv/data/owned-by-1"
    if os.path.lexists(mine) and not _override(mine).startswith(("100000:100000:", "1:1:")):
        demo.say("  (srv/data/owned-by-1: the chown was refused: no /etc/subuid range)")
    private = {
        n for p in [upper, *upper.rglob("*")] for n in os.listxattr(p, follow_symlinks=False) if ".overlay." in n
    }
    demo.say(
        f"  overlay-private xattrs in this upper: {', '.join(sorted(private)) or 'none'}"
        " (an ordinary user cannot set trusted.*)"
    )
    demo.say("  every file is the user's on disk; the owners the container gave and the user")
    demo.say(f"  could not are kept in {OVERRIDE} (fuse-overlayfs's format)")


def _kernel_reads_it(demo, work: Path, upper: Path) -> None:
    demo.heading("The kernel's overlay reads the same upper (mount -t overlay -o userxattr, as root)")
    merged, kwork = work / "kernel-merged", work / "kernel-work"
    merged.mkdir()
    kwork.mkdir()
    opts = f"userxattr,lowerdir={work / 'app'}:{work / 'base'},upperdir={upper},workdir={kwork}"
    r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(merged)], capture_output=True, text=True)
    if r.returncode != 0:
        demo.failed(f"kernel overlay mount: {r.stderr.strip()}")
        return
    try:
        hello = (merged / "root/hello.txt").read_text()
        motd = os.path.lexists(merged / "etc/motd")
        demo.say(f"  root/hello.txt: {hello!r}; etc/motd: {'VISIBLE' if motd else 'hidden (whiteout)'}")
        if hello != "hello\n" or motd:
            demo.failed("the kernel does not read the rootless upper like pyoverlay")
    finally:
        subprocess.run(["umount", str(merged)], capture_output=True)


def _processes(uid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.stat(f"/proc/{d}").st_uid == uid and process_start_time(int(d)) is not None:
                    out.append(int(d))  # alive, not a zombie
            except OSError:
                pass
    return out
