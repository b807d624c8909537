"""pyoverlay's benchmark: pyoverlay against the kernel's overlayfs, fuse-overlayfs and no
overlay at all, all mounted at once, workload by workload, round robin.

    scripts/bench [--quick|--full] [--reps N] [--json FILE] [--only W1,W2]
                  [--impl pyoverlay,kernel,fuse-overlayfs,native] [--workdir DIR] [--tmpfs] [--keep]
    scripts/bench --memwalk N        # server peak RSS while walking N entries
    scripts/bench --transport        # microseconds per FUSE request, and where they go
    scripts/bench --mount-times      # mount/umount wall times (median of 10), all engines
    scripts/bench --podman           # `podman run --rm` with each mount_program (median of 10)

Method and results: docs/performance.md. Needs root (kernel overlay mounts).
Everything it mounts is unmounted and everything it built is deleted (unless --keep)
whatever happens, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import impls as impls_mod  # noqa: E402
from benchlib import mounttime as mounttime_mod  # noqa: E402
from benchlib import report  # noqa: E402
from benchlib.layers import PRESETS, prepare_layers  # noqa: E402
from benchlib.machine import machine, versions  # noqa: E402
from benchlib.memwalk import run_memwalk  # noqa: E402
from benchlib.memwalk import table as memwalk_table
from benchlib.runner import Results, run_all  # noqa: E402
from benchlib.util import BenchError, SanityError, fmt_value, force_unmount, rmtree  # noqa: E402
from benchlib.workloads import ALL as WORKLOADS  # noqa: E402
from benchlib.workloads import Ctx  # noqa: E402
from overlayfs_py.mountinfo import mounts_under  # noqa: E402

T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick",
        action="store_const",
        dest="mode",
        const="quick",
        help="small layers (4k small files, 64 MiB big files): about 2 minutes",
    )
    mode.add_argument(
        "--full",
        action="store_const",
        dest="mode",
        const="full",
        help="default sizes (20k small files, 512 MiB sequential file): about 7 minutes",
    )
    mode.add_argument(
        "--smoke",
        action="store_const",
        dest="mode",
        const="smoke",
        help="tiny sizes, one repetition: checks the harness itself",
    )
    p.add_argument("--reps", type=int, help="repetitions per workload (default 3; 1 for --smoke)")
    p.add_argument(
        "--json", metavar="FILE", help="where to write the JSON result (default /tmp/pyoverlay-bench-MODE-TIME.json)"
    )
    p.add_argument("--only", metavar="W1,W2", help="run only these workloads: " + ", ".join(w.name for w in WORKLOADS))
    p.add_argument(
        "--impl",
        metavar="I1,I2",
        help="implementations (default: "
        + ",".join(impls_mod.ALL)
        + "; also "
        + ",".join(impls_mod.ENGINES)
        + ": pyoverlay on a named engine)",
    )
    p.add_argument(
        "--workdir",
        metavar="DIR",
        default="/tmp/pyoverlay-bench",
        help="where layers and mounts go (default %(default)s)",
    )
    p.add_argument(
        "--tmpfs",
        action="store_true",
        help="put layers and uppers on a tmpfs mounted under --workdir (no disk, no ext4 allocator effects)",
    )
    p.add_argument(
        "--keep", action="store_true", help="keep the layers for the next run (reused while their spec matches)"
    )
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="py-spy the pyoverlay server during its samples: collapsed stacks per "
        "workload into DIR and a summary (timings are then perturbed)",
    )
    p.add_argument(
        "--pyoverlay-options",
        metavar="OPTS",
        help="extra -o options for pyoverlay's mounts, e.g. volatile (results are then "
        "not those of a default mount: say so when quoting them)",
    )
    p.add_argument(
        "--kernel-options",
        metavar="OPTS",
        help="extra -o options for the kernel overlay's mounts, e.g. redirect_dir=on",
    )
    p.add_argument(
        "--transport",
        action="store_true",
        help="separate mode: microseconds per FUSE request (getxattr, open+close) on "
        "the kernel, fuse-overlayfs, pyoverlay on each engine and a do-nothing pyfuse3 server",
    )
    p.add_argument(
        "--as-user",
        metavar="USER",
        help="rootless run: the whole bench (mounts, servers, workloads) as this ordinary user, "
        "started by root with setpriv; the kernel overlay cannot take part, FUSE servers mount "
        "with fusermount3 and pyoverlay cannot use passthrough",
    )
    p.add_argument(
        "--mount-times",
        action="store_true",
        help="separate mode: mount and umount times (median of --reps, default 10) of the "
        "kernel, fuse-overlayfs and pyoverlay's two engines (also part of a normal run)",
    )
    p.add_argument(
        "--podman",
        action="store_true",
        help="separate mode: `podman run --rm --network none IMAGE true` with containers/storage's "
        "mount_program set to fuse-overlayfs and to mount.fuse.pyoverlay (median of --reps, default 10)",
    )
    p.add_argument(
        "--memwalk",
        type=int,
        metavar="N",
        help="separate mode: walk N entries through pyoverlay (and fuse-overlayfs "
        "if given with --impl), report the server's peak RSS",
    )
    a = p.parse_args(argv)
    a.mode = a.mode or "full"
    names = {w.name for w in WORKLOADS}
    a.only = [s for s in (a.only or "").split(",") if s] or None
    bad = [w for w in a.only or [] if w not in names]
    if bad:
        p.error(f"unknown workload(s): {', '.join(bad)}")
    a.impl = [s for s in (a.impl or "").split(",") if s] or None
    known = impls_mod.KNOWN + (["pyfuse3-null"] if a.transport else []) + (mounttime_mod.ALL if a.mount_times else [])
    bad = [i for i in a.impl or [] if i not in known]
    if bad:
        p.error(f"unknown implementation(s): {', '.join(bad)}")
    if a.reps is not None and a.reps < 1:
        p.error("--reps must be at least 1")
    if a.memwalk is not None and a.memwalk < 1:
        p.error("--memwalk needs a positive number of entries")
    if a.transport and a.memwalk is not None:
        p.error("--transport and --memwalk are separate runs")
    return a


class Session:
    """Owns everything the run creates, and takes it all down again."""

    def __init__(self, args):
        self.args = args
        self.root = os.path.abspath(args.workdir)
        self.tmpfs = None
        self.impls: list = []
        self.layers = None
        self.run_dir = None

    def setup_base(self) -> str:
        os.makedirs(self.root, exist_ok=True)
        if not self.args.tmpfs:
            return self.root
        self.tmpfs = os.path.join(self.root, f"tmpfs-{os.getpid()}")
        os.makedirs(self.tmpfs)
        mem_kib = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 1024
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={mem_kib * 7 // 10}k,mode=0755", "bench", self.tmpfs], check=True
        )
        return self.tmpfs

    def cleanup(self) -> None:
        for impl in reversed(self.impls):
            try:
                impl.unmount()
            except Exception as exc:  # keep going: everything else must go too
                log(f"cleanup: {impl.name}: {exc}")
        if self.run_dir:
            for mp in sorted(mounts_under(self.run_dir), key=len, reverse=True):
                log(f"cleanup: forcing unmount of {mp}")
                force_unmount(mp)
            if not mounts_under(self.run_dir):
                rmtree(self.run_dir)
        if self.layers is not None and not self.args.keep:
            rmtree(self.layers.root)
        if self.tmpfs:
            force_unmount(self.tmpfs)
            if not mounts_under(self.tmpfs):
                os.rmdir(self.tmpfs)
        try:
            os.rmdir(self.root)  # only if empty
        except OSError:
            pass


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


#: set by --as-user for the unprivileged run it starts
ROOTLESS_ENV = "PYOVERLAY_BENCH_ROOTLESS"


def as_user(args, argv: list[str]) -> int:
    """Run this bench again as *args.as_user* (root starts it; the user owns its workdir)."""
    import pwd

    if os.geteuid() != 0:
        print("scripts/bench: --as-user needs root (it starts the run as that user)", file=sys.stderr)
        return 2
    try:
        pw = pwd.getpwnam(args.as_user)
    except KeyError:
        print(f"scripts/bench: no user {args.as_user!r}", file=sys.stderr)
        return 2
    if pw.pw_uid == 0:
        print("scripts/bench: --as-user wants an ordinary user", file=sys.stderr)
        return 2
    if args.tmpfs:
        print("scripts/bench: --tmpfs needs root; not with --as-user", file=sys.stderr)
        return 2
    given = any(a == "--workdir" or a.startswith("--workdir=") for a in argv)
    workdir = args.workdir if given else f"/tmp/pyoverlay-bench-{pw.pw_name}"
    os.makedirs(workdir, exist_ok=True)
    os.chown(workdir, pw.pw_uid, pw.pw_gid)
    rest, skip = [], False
    for a in argv:  # the same arguments, without --as-user and --workdir (given again below)
        if skip:
            skip = False
        elif a in ("--as-user", "--workdir"):
            skip = True
        elif not a.startswith(("--as-user=", "--workdir=")):
            rest.append(a)
    env = {
        "HOME": workdir,
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        ROOTLESS_ENV: "1",
        "XDG_RUNTIME_DIR": workdir,
    }
    for key in ("PYOVERLAY_ENGINE",):
        if key in os.environ:
            env[key] = os.environ[key]
    exe = [sys.executable, os.path.abspath(__file__)]
    cmd = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups", "--"]
    return subprocess.run(cmd + exe + rest + ["--workdir", workdir], env=env, cwd="/").returncode


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.as_user:
        return as_user(args, sys.argv[1:] if argv is None else argv)
    if os.geteuid() != 0 and not os.environ.get(ROOTLESS_ENV):
        print("scripts/bench: needs root (kernel overlay mounts; --as-user USER for a rootless run)", file=sys.stderr)
        return 2
    sizes = dataclasses.replace(PRESETS[args.mode])
    if args.reps:
        sizes.reps = args.reps
    # SIGINT too: a shell's background job starts with it ignored
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)
    os.chdir("/")  # never hold a mount busy
    sess = Session(args)
    started = datetime.datetime.now().astimezone()
    out = {
        "tool": "pyoverlay scripts/bench",
        "command": ["scripts/bench"] + (argv or sys.argv[1:]),
        "mode": "memwalk"
        if args.memwalk
        else "transport"
        if args.transport
        else "mount-times"
        if args.mount_times
        else "podman"
        if args.podman
        else args.mode,
        "started": started.isoformat(),
        "tmpfs": args.tmpfs,
        "rootless": os.geteuid() != 0,
        "error": None,
    }
    res = None
    rc = 0
    try:
        base = sess.setup_base()
        out["machine"], out["versions"] = machine(base), versions()
        sess.run_dir = os.path.join(base, f"run-{os.getpid()}")
        os.makedirs(sess.run_dir)
        if args.memwalk:
            names = [i for i in (args.impl or ["pyoverlay"]) if impls_mod.is_pyoverlay(i) or i == "fuse-overlayfs"]
            out["memwalk"] = run_memwalk(base, sess.run_dir, args.memwalk, names, args.keep, log, sess.impls.append)
        elif args.transport:
            from benchlib.transport import run_transport

            names = [
                i
                for i in (
                    args.impl or ["kernel", "fuse-overlayfs", "pyoverlay-direct", "pyoverlay-pyfuse3", "pyfuse3-null"]
                )
                if i != "native" and not impls_mod.available(i)
            ]
            out["transport"] = run_transport(sess.run_dir, names, args.reps or 5, log, sess.impls.append)
        elif args.podman:
            from benchlib.podman import run_podman

            out["podman"] = run_podman(sess.run_dir, args.reps or 10, log)
        elif args.mount_times:
            names = mounttime_mod.main_names(args.impl, log)
            out["mount_times"] = mounttime_mod.run_mounttimes(sess.run_dir, names, args.reps or mounttime_mod.REPS, log)
        else:
            res = bench(args, sizes, sess, out)
            if not args.only:  # the Startup figures, on their own small layers
                reps = 2 if args.mode == "smoke" else mounttime_mod.REPS
                names = mounttime_mod.main_names(None, log)
                out["mount_times"] = mounttime_mod.run_mounttimes(sess.run_dir, names, reps, log)
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        out["error"], rc = "interrupted", 130
    except (BenchError, OSError, subprocess.SubprocessError) as exc:
        kind = "WRONG RESULT" if isinstance(exc, SanityError) else "failed"
        log(f"{kind}: {exc}")
        out["error"], rc = f"{kind}: {exc}", 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # nothing stops the cleanup
            signal.signal(sig, signal.SIG_IGN)
        sess.cleanup()
    out["duration_s"] = round(time.monotonic() - T0, 1)
    res = res or out.get("_results")  # partial results of a failed or interrupted run
    if res is not None:
        finish(res, out)
    if out.get("memwalk"):
        print(memwalk_table(out["memwalk"]), flush=True)
    if out.get("mount_times"):
        print(mounttime_mod.table(out["mount_times"]), flush=True)
    if out.get("podman"):
        from benchlib.podman import table as podman_table

        print(podman_table(out["podman"]), flush=True)
    if out.get("transport"):
        from benchlib.transport import table as transport_table

        print(transport_table(out["transport"]), flush=True)
    path = args.json or f"/tmp/pyoverlay-bench-{out['mode']}-{started:%Y%m%d-%H%M%S}.json"
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    log(f"done in {out['duration_s']:.0f} s; JSON result: {path}")
    return rc


def bench(args, sizes, sess: Session, out: dict) -> Results:
    names = args.impl or impls_mod.ALL
    for n in list(names):
        why = impls_mod.available(n)
        if why:
            log(f"skipping {n}: {why}")
            out.setdefault("notes_setup", []).append(f"{n} not run: {why}")
            names = [x for x in names if x != n]
    workloads = [w for w in WORKLOADS if not args.only or w.name in args.only]
    out["sizes"] = dataclasses.asdict(sizes)
    log(f"mode {args.mode}: building/reusing layers under {os.path.dirname(sess.run_dir)}")
    sess.layers = prepare_layers(os.path.dirname(sess.run_dir), sizes, keep=args.keep, log=log)
    out["layers"] = {k: v for k, v in sess.layers.meta.items() if k != "spec"}
    ctx = Ctx(sess.layers, log)
    if args.kernel_options:
        impls_mod.Kernel.options = [o for o in args.kernel_options.split(",") if o]
        out["kernel_options"] = impls_mod.Kernel.options
    if args.pyoverlay_options:
        impls_mod.Pyoverlay.options = [o for o in args.pyoverlay_options.split(",") if o]
        out["pyoverlay_options"] = impls_mod.Pyoverlay.options
    if args.profile:
        from benchlib.profile import Profiler

        ctx.profiler = Profiler(os.path.abspath(args.profile), log)
        out["profile_dir"] = os.path.abspath(args.profile)
    if not ctx.fio:
        out.setdefault("notes_setup", []).append("fio is not installed: randread_4k skipped")
    res = Results(names, workloads)
    out["_results"] = res
    for impl in impls_mod.make(names, sess.layers, sess.run_dir, log):
        sess.impls.append(impl)
        impl.mount()
    out["engines"] = {i.name: i.served_engine for i in sess.impls if getattr(i, "served_engine", None)}
    log(f"mounted: {', '.join(names)}; {len(workloads)} workloads x {sizes.reps} reps")
    try:
        run_all(ctx, sess.impls, workloads, res, log, fmt_value)
    except BaseException as exc:
        res.error = str(exc)
        raise
    finally:
        if ctx.profiler is not None:
            out["profile"] = ctx.profiler.summary()
        for impl in sess.impls:
            impl.unmount()
        for impl in sess.impls:
            if impl.rss_peaks_kib:
                res.rss.setdefault(impl.name, {})["peak_over_all_mounts_kib"] = max(impl.rss_peaks_kib)
    return res


def finish(res: Results, out: dict) -> None:
    """Medians, ratios, geomeans, targets into *out*; the tables to stdout."""
    out.pop("_results", None)
    med = report.medians(res)
    rat = {ref: report.ratios(res, med, ref) for ref in report.REFS}
    geo = {ref: report.geomeans(res, rat[ref]) for ref in report.REFS}
    tg = [t for name in res.impls if impls_mod.is_pyoverlay(name) for t in report.targets(res, med, rat, geo, name)]
    out.update(
        impls=res.impls,
        workloads=[{"name": w.name, "unit": w.unit, "group": w.group} for w in res.workloads],
        samples=res.samples,
        sample_seconds=res.seconds,
        medians=med,
        ratios=rat,
        geomeans=geo,
        skipped=res.skipped,
        rss_kib=res.rss,
        targets=tg,
        notes=out.pop("notes_setup", []) + res.notes,
    )
    if res.error:
        out["error"] = out.get("error") or res.error
    if out.get("profile"):
        from benchlib.profile import table as profile_table

        text_profile = [
            "",
            "**profile of the pyoverlay server (py-spy, busy time only; timings of this run are perturbed)**",
            "",
            profile_table(out["profile"]),
        ]
    else:
        text_profile = []
    text = [report.tables(res, med, rat, geo)]
    if out.get("error"):
        text.insert(0, f"**INCOMPLETE RUN ({out['error']}): partial results**\n")
    text += ["", *report.rss_lines(res)]
    if tg:
        text += ["", report.targets_table(tg)]
    text += text_profile
    if out["notes"]:
        text += ["", "Notes:", *(f"* {n}" for n in out["notes"])]
    skipped = sorted({f"{w}: {i} ({why})" for w, d in res.skipped.items() for i, why in d.items()})
    if skipped:
        text += ["", "Skipped: " + "; ".join(skipped)]
    out["tables_md"] = "\n".join(text)
    print(out["tables_md"], flush=True)


if __name__ == "__main__":
    sys.exit(main())
