"""Dev tool: build a named stack, mount it with the kernel overlay and print
what the kernel reports; optionally diff against pyoverlay (or another
subject).

    sudo .venv/bin/python tests/helpers/probe_kernel.py --list
    sudo .venv/bin/python tests/helpers/probe_kernel.py char_whiteouts ro
    sudo .venv/bin/python tests/helpers/probe_kernel.py char_whiteouts rw --compare
    sudo .venv/bin/python tests/helpers/probe_kernel.py kernel_upper upper --keep

Everything is built under a fresh temp dir (kept with --keep) and unmounted
before exit.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers import mounts  # noqa: E402
from helpers.oracle import Lab  # noqa: E402
from helpers.snapshot import diff_snapshots, format_diff  # noqa: E402
from helpers.stacks import STACK_MODES, STACKS  # noqa: E402

SHOW = ("type", "mode", "nlink", "ino", "d_ino", "d_type", "size", "target", "xattrs", "dot_d_ino", "dotdot_d_ino")


def show(snap: dict, limit: int) -> None:
    for i, (p, r) in enumerate(sorted(snap["entries"].items())):
        if i >= limit:
            print(f"... {len(snap['entries']) - limit} more entries")
            break
        fields = []
        for k in SHOW:
            if k in r and r[k] not in (None, {}):
                v = f"{r[k]:#o}" if k == "mode" else repr(r[k]) if k in ("target", "xattrs") else str(r[k])
                fields.append(f"{k}={v}")
        shown = p if len(p) < 100 else p[:40] + f"...<{len(p)}>..." + p[-40:]
        print(f"{shown!r:50} " + " ".join(fields))
    print("hardlinks:", snap["hardlinks"])
    print("problems:", snap["problems"] or "none")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stack", nargs="?")
    ap.add_argument("mode", nargs="?")
    ap.add_argument("--list", action="store_true", help="list stacks and their modes")
    ap.add_argument(
        "--compare",
        action="store_true",
        help="also mount the subject (PYOVERLAY_TEST_SUBJECT, default pyoverlay) and print the differences",
    )
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    ap.add_argument("--limit", type=int, default=200, help="max entries to print")
    a = ap.parse_args()
    if a.list or not a.stack:
        for n in STACKS:
            print(f"{n:35} {' '.join(STACK_MODES[n])}")
        return 0
    mode = a.mode or STACK_MODES[a.stack][0]
    base = Path(tempfile.mkdtemp(prefix="probe-kernel-"))
    try:
        lab = Lab(base)
        stack = lab.stack(a.stack)
        print(f"# {stack.name}: {stack.description}")
        print(
            f"# lowers (top first): {[str(lower) for lower in stack.lowers]}  upper: {stack.upper}  "
            f"options: {stack.options}  mode: {mode}"
        )
        with lab.view(stack, mode, "kernel") as kv:
            ks = kv.snapshot()
        show(ks, a.limit)
        if a.compare:
            with lab.view(stack, mode, "subject") as sv:
                ss = sv.snapshot()
            d = diff_snapshots(ks, ss, a_name="kernel", b_name=mounts.subject_name(), limit=500)
            print(
                format_diff(d, f"# {len(d)} differences kernel vs {mounts.subject_name()}:")
                if d
                else "# no differences"
            )
    finally:
        left = mounts.mounts_under(base)
        for m in left:
            mounts.force_unmount(m)
        if a.keep:
            print(f"# kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
