"""Stress (issue 17): many processes creating, renaming and removing in the same directories
at once, under a small node budget (``-o max_nodes=1000``, the least it takes), compared at
the end with the same workload's result on the kernel overlay, and nothing leaked in the
server.

The workload is built so that its final tree does not depend on how the processes
interleave: each process owns its names (``p<i>_...``) but all of them work in the same
shared directories (merged ones, with lower content, and one made in upper), so their
lookups, copy-ups of those directories, listings and renames race; where names are shared,
the final state is one of a known set: renames of each process's file onto one target (the
target holds one of their contents; every source is gone), renames of each process's empty
directory over one target directory (one of their modes), and RENAME_NOREPLACE onto one
name (exactly one process wins, and the target holds the winner's content).

Three times: with the server's descriptors unlimited, and with RLIMIT_NOFILE at 1,024 and
at 300 (no CAP_SYS_RESOURCE to raise it), where the node fds held are fewer than the nodes
the budget keeps, so node fds are given up and reopened throughout (at 300 the node fds
once took every descriptor the server had: ``budget.node_fd_cap``).

Leaks: the server logs what it holds on SIGUSR1 (``stats: nodes=... fds=...``,
docs/architecture.md). The kernel FORGETs an unlinked inode as soon as its last reference
goes, so once the test has removed the whole tree through the mount (no machine setting
like drop_caches), the server must be back at what it held right after mounting: one node
(the root) and the same descriptors.
"""

from __future__ import annotations

import contextlib
import errno
import multiprocessing
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest

from helpers import mounts
from helpers.snapshot import snapshot
from helpers.writeops import RENAME_EXCHANGE, renameat2, workdir_problems

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]

PROCS = int(os.environ.get("PYOVERLAY_STRESS_PROCS", "12"))
FILES = 100  # per process: 1,200 new names, beyond the budget
LOWER_FILES = 12  # per process, in the lower layer
DIRS = [f"d{k}" for k in range(4)]  # merged directories (a lower holds them)
RACES = 4
DEEP = "deep/a/b/c/d/e"
MOVES = 60  # per process: a rename storm through the shared directories
BUDGET = 1000
WORKER_TIMEOUT = 120.0


def _build_lower(lower: Path) -> None:
    for d in DIRS:
        (lower / d).mkdir(parents=True)
        for k in range(20):  # content of nobody's: only listed and looked up
            (lower / d / f"common{k}").write_text(f"{d} common {k}\n")
    for i in range(PROCS):
        for j in range(LOWER_FILES):
            (lower / DIRS[j % len(DIRS)] / f"p{i}_l{j}").write_text(f"lower {i} {j}\n")
    (lower / "race").mkdir()
    (lower / "race" / "log").write_text("lower line\n")  # every process appends to it
    (lower / DEEP).mkdir(parents=True)  # every process creates in it first: one chain copy-up
    for r in range(RACES):
        if r % 2 == 0:  # half of the targets exist in the lower layer
            (lower / "race" / f"t{r}").write_text(f"lower target {r}\n")
            (lower / "race" / f"dt{r}").mkdir()
            (lower / "race" / f"ea{r}").write_text(f"exchange a {r}\n")


def _prepare(root: Path) -> None:
    """Before the workers: a shared directory of upper's own, and the race sources."""
    (root / "n").mkdir()
    for r in range(RACES):
        if r % 2:
            (root / "race" / f"ea{r}").write_text(f"exchange a {r}\n")
        (root / "race" / f"eb{r}").write_text(f"exchange b {r}\n")
    for i in range(PROCS):
        for r in range(RACES):
            (root / "race" / f"p{i}_src{r}").write_text(f"race {r} from {i}\n")
            (root / "race" / f"p{i}_xsrc{r}").write_text(f"noreplace {r} from {i}\n")
            os.mkdir(root / "race" / f"p{i}_dsrc{r}")
            os.chmod(root / "race" / f"p{i}_dsrc{r}", 0o700 | i)


def _worker(root: str, i: int, barrier, results) -> None:
    """Process *i*'s operations; every unexpected error is reported, not raised."""
    os.umask(0)
    m = Path(root)
    errors: list[str] = []
    won: list[int] = []

    def do(what, fn, *args):
        try:
            return fn(*args)
        except OSError as exc:
            errors.append(f"p{i} {what}: {errno.errorcode.get(exc.errno, exc.errno)}")
            return False

    def home(j: int) -> Path:
        return m / DIRS[(i + j) % len(DIRS)]

    def cur(j: int) -> Path:  # where new file j is after the renames below
        return home(j + 1) / f"p{i}_r{j}" if j % 3 == 0 else home(j) / f"p{i}_f{j}"

    try:
        barrier.wait(60)
        do("create deep", (m / DEEP / f"p{i}").write_text, f"{i}\n")  # all copy the chain up at once
        do("append log", _append, m / "race" / "log", f"line from {i}\n")  # and the same lower file
        for j in range(FILES):  # new files, spread over the shared directories
            do(f"create f{j}", (home(j) / f"p{i}_f{j}").write_text, f"{i}:{j}\n" * (j % 7 + 1))
            if j % 10 == 0:
                do("list", os.listdir, home(j + 1))
        for r in range(RACES):  # racing renames onto shared targets
            do(f"rename src{r}", os.rename, m / "race" / f"p{i}_src{r}", m / "race" / f"t{r}")
            do(f"rename dsrc{r}", os.rename, m / "race" / f"p{i}_dsrc{r}", m / "race" / f"dt{r}")
            src, dst = m / "race" / f"p{i}_xsrc{r}", m / "race" / f"x{r}"
            try:
                os.link(src, dst)  # link(2) never replaces: a RENAME_NOREPLACE in two steps
                won.append(r)
            except FileExistsError:
                pass
            except OSError as exc:
                errors.append(f"p{i} link xsrc{r}: {errno.errorcode.get(exc.errno, exc.errno)}")
            do(f"unlink xsrc{r}", os.unlink, src)
            for _ in range(i % 3 + 1):  # all swap the same two names
                do(f"exchange {r}", renameat2, m / "race" / f"ea{r}", m / "race" / f"eb{r}", RENAME_EXCHANGE)
        for j in range(0, FILES, 3):  # renames across the shared directories
            do(f"rename f{j}", os.rename, home(j) / f"p{i}_f{j}", home(j + 1) / f"p{i}_r{j}")
        for j in range(1, FILES, 5):
            do(f"unlink f{j}", os.unlink, cur(j))
        for j in range(2, FILES, 10):
            do(f"link f{j}", os.link, cur(j), m / "n" / f"p{i}_h{j}")
            do(f"symlink {j}", os.symlink, f"../{DIRS[0]}/p{i}_f{j}", m / "n" / f"p{i}_s{j}")
        for j in range(LOWER_FILES):  # lower files: whiteouts, copy-ups, renames
            lf = m / DIRS[j % len(DIRS)] / f"p{i}_l{j}"
            if j % 3 == 0:
                do(f"unlink l{j}", os.unlink, lf)
            elif j % 3 == 1:
                do(f"rename l{j}", os.rename, lf, m / "n" / f"p{i}_lr{j}")
            else:
                do(f"append l{j}", _append, lf, f"appended by {i}\n")
        for j in range(3):  # directories of their own: filled, moved, removed
            d = m / "n" / f"p{i}_dir{j}"
            do(f"mkdir dir{j}", os.mkdir, d)
            for k in range(5):
                do(f"create dir{j}/{k}", (d / f"g{k}").write_text, f"{i} {j} {k}\n")
        do("move dir0", os.rename, m / "n" / f"p{i}_dir0", m / DIRS[i % len(DIRS)] / f"p{i}_moved")
        do("rm dir1", shutil.rmtree, m / "n" / f"p{i}_dir1")
        for j in range(4, FILES, 10):  # and some of their new files replaced
            do(f"recreate f{j}", (home(j) / f"p{i}_f{j}").write_text, f"again {i} {j}\n")
        moved = m / DIRS[i % len(DIRS)] / f"p{i}_moved"
        where = [cur(j) for j in range(5, FILES, 10)]  # rename storm: round and round
        for k in range(MOVES):
            j = k % len(where)
            dst = m / (DIRS + ["n"])[(i + j + k // len(where) + 1) % (len(DIRS) + 1)] / f"p{i}_m{j}"
            if do(f"move m{j}", os.rename, where[j], dst) is not False:
                where[j] = dst
            if k % 6 == 0:
                do("list", os.listdir, dst.parent)
            if k % 5 == 0:  # and its directory with its files
                ddst = m / (DIRS + ["n"])[(i + k // 5 + 1) % (len(DIRS) + 1)] / f"p{i}_moved"
                if do("move dir", os.rename, moved, ddst) is not False:
                    moved = ddst
    except Exception as exc:  # a broken barrier, a bug in the workload: reported
        errors.append(f"p{i} {type(exc).__name__}: {exc}")
    results.put((i, errors, won))


def _append(path: Path, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)


def _run_workload(root: Path) -> dict[int, list[int]]:
    """The workers on *root*, at once; returns which NOREPLACE races each one won."""
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(PROCS)
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(os.fspath(root), i, barrier, results)) for i in range(PROCS)]
    for p in procs:
        p.start()
    got = {}
    errors: list[str] = []
    deadline = time.monotonic() + WORKER_TIMEOUT
    try:
        for _ in procs:
            i, errs, won = results.get(timeout=max(1.0, deadline - time.monotonic()))
            got[i] = won
            errors += errs
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
    assert not errors, errors[:20]
    return got


KEYS = ("type", "mode", "uid", "gid", "nlink", "size", "sha256", "target")
RACE = re.compile(r"race/((t|dt|x|ea|eb)\d+|log)$")


def _view(root: Path) -> tuple[dict, dict]:
    """The merged tree (what does not depend on when or where it was made), and the
    race targets apart: their state depends on who came last."""
    snap = snapshot(root, xattrs=False)
    assert not snap["problems"], snap["problems"]
    view, races = {}, {}
    for path, rec in snap["entries"].items():
        rec = {k: rec.get(k) for k in KEYS}
        (races if RACE.search(path) else view)[path] = rec
    return view, races


def _check_races(races: dict, root: Path, won: dict[int, list[int]] | None) -> None:
    """Each race target holds one of the racers' states; a NOREPLACE target the winner's;
    the file all appended to each line once, in any order."""
    lines = (root / "race" / "log").read_text().splitlines(keepends=True)
    assert lines[0] == "lower line\n" and sorted(lines[1:]) == sorted(f"line from {i}\n" for i in range(PROCS))
    for r in range(RACES):
        t = races[f"race/t{r}"]
        assert (root / "race" / f"t{r}").read_text() in {f"race {r} from {i}\n" for i in range(PROCS)}, t
        dt = races[f"race/dt{r}"]
        assert dt["type"] == "dir" and dt["mode"] in {0o40700 | i for i in range(PROCS)}, dt
        assert not os.listdir(root / "race" / f"dt{r}")
        pair = {(root / "race" / f"e{ab}{r}").read_text() for ab in "ab"}
        assert pair == {f"exchange {ab} {r}\n" for ab in "ab"}, pair
        data = (root / "race" / f"x{r}").read_text()
        assert races[f"race/x{r}"]["nlink"] == 1
        if won is not None:
            winners = [i for i, rs in won.items() if r in rs]
            assert winners and len(winners) == 1, f"x{r}: won by {winners}"
            assert data == f"noreplace {r} from {winners[0]}\n"


def _upper_names(upper: Path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(dp, n), upper) for dp, ds, fs in os.walk(upper) for n in ds + fs)


def _stats(m: mounts.PyoverlayMount, timeout: float = 30.0) -> dict[str, int]:
    """What the server holds now: SIGUSR1, then its ``stats:`` log line."""
    assert m.proc is not None
    before = m.log_path.read_text().count("stats: ")
    os.kill(m.proc.pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = [ln for ln in m.log_path.read_text().splitlines() if "stats: " in ln]
        if len(lines) > before:
            return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", lines[-1].split("stats: ", 1)[1])}
        m.check_alive()
        time.sleep(0.05)
    raise AssertionError(f"no stats line within {timeout}s\n{m.log_tail()}")


def _fds(m: mounts.PyoverlayMount) -> dict[int, tuple[str, int]]:
    """The server's descriptors: what each one names, and its inode."""
    assert m.proc is not None
    out = {}
    for fd in os.listdir(f"/proc/{m.proc.pid}/fd"):
        with contextlib.suppress(OSError):
            link = f"/proc/{m.proc.pid}/fd/{fd}"
            out[int(fd)] = (os.readlink(link), os.stat(link).st_ino)
    return out


def _leaked(before: dict, now: dict, stats: dict[str, int], layers: list[Path]) -> list[str]:
    """The server's descriptors beyond those it had right after mounting (*before*) that
    are no cache: the directory fd cache may keep directories of the layers, the direct
    engine one noatime clone of each layer's mount (its root: "/" on a detached mount), the
    trace the comm files of the processes it saw last (``trace.ProcessInfo``), and nothing
    may name a removed object."""
    roots = {os.stat(p).st_ino for p in layers}
    left = sorted(v for v in before.values())
    extra = []
    for v in sorted(now.values()):
        if v in left:
            left.remove(v)
        else:
            extra.append(v)
    cached = [v for v in extra if v[0].startswith(tuple(f"{p}/" for p in layers)) and not v[0].endswith("(deleted)")]
    clones = [v for v in extra if v[0] == "/" and v[1] in roots]
    comms = [v for v in extra if v[0].startswith("/proc/") and v[0].endswith("/comm")]
    out = [f"{target} (inode {ino})" for target, ino in extra if (target, ino) not in cached + clones + comms]
    if len(comms) > stats["comm_fds"]:
        out.append(f"{len(comms)} comm files open, {stats['comm_fds']} held by the trace")
    if len(cached) > stats["dir_fds"]:
        out.append(f"{len(cached)} layer directories open, {stats['dir_fds']} in the directory fd cache")
    if len(clones) > len(layers):
        out.append(f"{len(clones)} layer mount clones for {len(layers)} layers")
    return out


def _back_to(m: mounts.PyoverlayMount, baseline: dict[str, int], timeout: float = 30.0) -> dict[str, int]:
    """Stats until the nodes and descriptors are those of *baseline* (the kernel's FORGETs
    come asynchronously), or the last ones after *timeout*."""
    deadline = time.monotonic() + timeout
    while True:
        now = _stats(m)
        if all(now[k] <= baseline[k] for k in ("nodes", "node_fds", "handles")) or time.monotonic() > deadline:
            return now
        time.sleep(0.2)


def _remove_all(root: Path) -> None:
    for name in os.listdir(root):
        shutil.rmtree(root / name)
    assert os.listdir(root) == []


def _layers_for(base: Path) -> tuple[Path, Path, Path]:
    lower, upper, work = base / "lower", base / "upper", base / "work"
    _build_lower(lower)
    upper.mkdir()
    work.mkdir()
    return lower, upper, work


class LimitedMount(mounts.PyoverlayMount):
    """A server started with RLIMIT_NOFILE at *nofile* and no CAP_SYS_RESOURCE to raise it:
    fewer node fds (``budget.node_fd_cap``: 768 at 1,024) than the nodes the budget keeps."""

    def __init__(self, *args, nofile: int, **kw) -> None:
        super().__init__(*args, **kw)
        self.nofile = nofile

    def argv(self) -> list[str]:
        limit = f"--nofile={self.nofile}:{self.nofile}"
        return ["prlimit", limit, "--", "setpriv", "--bounding-set=-sys_resource", "--", *super().argv()]


def _open_files_limit(pid: int) -> int:
    with open(f"/proc/{pid}/limits") as f:
        line = next(ln for ln in f if ln.startswith("Max open files"))
    return int(line.split()[3])


@pytest.mark.parametrize("nofile", [None, 1024, 300], ids=["fds-unlimited", "fds-1024", "fds-300"])
def test_stress_equals_the_kernel_and_leaks_nothing(tmp_path, nofile):
    # the kernel: the oracle of the final tree
    lower, upper, work = _layers_for(tmp_path / "kernel")
    with mounts.KernelOverlay([lower], tmp_path / "kernel" / "m", upper, work) as k:
        _prepare(k.path)
        _run_workload(k.path)
        want, kraces = _view(k.path)
        _check_races(kraces, k.path, None)
        kernel_upper = _upper_names(upper)
        _remove_all(k.path)
    kernel_upper_after = _upper_names(upper)
    assert not workdir_problems(work)

    lower, upper, work = _layers_for(tmp_path / "pyoverlay")
    log = tmp_path / "server.log"
    opts = {"options": [f"max_nodes={BUDGET}"], "log_path": log}
    if nofile:
        mount = LimitedMount([lower], tmp_path / "p", upper, work, nofile=nofile, **opts)
    else:
        mount = mounts.PyoverlayMount([lower], tmp_path / "p", upper, work, **opts)
    with mount as m:
        baseline, fds_before = _stats(m), _fds(m)
        if nofile:
            assert m.proc is not None and _open_files_limit(m.proc.pid) == nofile
        assert baseline["nodes"] == 1, baseline  # the root
        _prepare(m.path)
        won = _run_workload(m.path)
        got, races = _view(m.path)
        _check_races(races, m.path, won)
        assert "node budget" in log.read_text(), "the workload never reached the node budget"
        # the same tree as the kernel's, entry by entry
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        differ = sorted(p for p in set(want) & set(got) if want[p] != got[p])
        assert not (missing or extra or differ), f"missing {missing[:10]}, extra {extra[:10]}, differ " + "; ".join(
            f"{p}: kernel {want[p]} pyoverlay {got[p]}" for p in differ[:5]
        )
        assert _upper_names(upper) == kernel_upper
        # everything removed through the mount: the kernel forgets every inode it had
        _remove_all(m.path)
        after = _back_to(m, baseline)
        assert after["nodes"] == baseline["nodes"] and after["node_fds"] <= baseline["node_fds"], (baseline, after)
        assert after["handles"] == 0, after
        leaked = _leaked(fds_before, _fds(m), after, [lower, upper, work / "work"])
        assert not leaked, f"{baseline} -> {after}: {leaked}"
        m.check_alive()
    assert _upper_names(upper) == kernel_upper_after
    assert not workdir_problems(work)
