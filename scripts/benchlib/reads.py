"""The read and metadata workloads: walks, listings, small and big reads, imports."""

from __future__ import annotations

import json
import os
import subprocess
import time

from .base import Workload, _expect, _timed, _walk
from .layers import MIB
from .util import read_file, read_tree, run

IMPORT_MODULES = [
    "abc",
    "argparse",
    "ast",
    "asyncio",
    "base64",
    "bisect",
    "bz2",
    "calendar",
    "cmd",
    "code",
    "codecs",
    "collections",
    "colorsys",
    "concurrent.futures",
    "configparser",
    "contextlib",
    "contextvars",
    "copy",
    "csv",
    "ctypes",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "dis",
    "email",
    "email.mime.text",
    "email.parser",
    "enum",
    "filecmp",
    "fnmatch",
    "fractions",
    "ftplib",
    "functools",
    "getopt",
    "getpass",
    "gettext",
    "glob",
    "graphlib",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html",
    "html.parser",
    "http.client",
    "http.cookies",
    "http.server",
    "imaplib",
    "inspect",
    "io",
    "ipaddress",
    "json",
    "logging",
    "logging.handlers",
    "lzma",
    "mailbox",
    "mimetypes",
    "multiprocessing",
    "numbers",
    "operator",
    "optparse",
    "pathlib",
    "pickle",
    "pkgutil",
    "platform",
    "plistlib",
    "poplib",
    "pprint",
    "pstats",
    "queue",
    "quopri",
    "random",
    "re",
    "sched",
    "secrets",
    "selectors",
    "shelve",
    "shlex",
    "shutil",
    "signal",
    "smtplib",
    "socket",
    "socketserver",
    "sqlite3",
    "ssl",
    "statistics",
    "string",
    "stringprep",
    "struct",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "tokenize",
    "tomllib",
    "trace",
    "traceback",
    "typing",
    "unittest",
    "unittest.mock",
    "urllib.parse",
    "urllib.request",
    "uuid",
    "warnings",
    "wave",
    "weakref",
    "xml.dom.minidom",
    "xml.etree.ElementTree",
    "xml.sax",
    "zipfile",
    "zoneinfo",
]

_IMPORT_CODE = """
import sys
home = sys.argv[1]
for m in sys.argv[2:]:
    __import__(m)
bad = sorted(n for n, m in list(sys.modules.items())
             if isinstance(getattr(m, '__file__', None), str) and not m.__file__.startswith(home))
print(len(sys.modules), len(bad), ' '.join(bad[:5]))
"""


class Walk(Workload):
    warm_key = "walk"

    def prime(self, ctx):
        for lower in ctx.layers.lowers:
            _walk(lower)

    def run(self, ctx, impl, rep):
        n, secs = _timed(_walk, impl.merged)
        _expect(n == ctx.meta["entries"], impl, f"walk saw {n} entries, expected {ctx.meta['entries']}")
        return secs, secs


class WalkCold(Walk):
    name, cold = "walk_cold", True


class WalkWarm(Walk):
    name = "walk_warm"


class ReaddirBig(Workload):
    name = "readdir_big"
    stat = False

    def run(self, ctx, impl, rep):
        d = os.path.join(impl.merged, "bigdir")
        t0 = time.perf_counter()
        names = os.listdir(d)
        if self.stat:
            for n in names:
                os.lstat(os.path.join(d, n))
        secs = time.perf_counter() - t0
        n = ctx.sizes.bigdir
        _expect(
            len(names) == n and len(set(names)) == n,
            impl,
            f"bigdir listed {len(names)} names ({len(set(names))} distinct), expected {n}",
        )
        return secs, secs


class ReaddirBigStat(ReaddirBig):
    name, stat = "readdir_big_stat", True


def _smallread(paths: list[str]) -> int:
    total = 0
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        total += len(os.read(fd, 65536))
        os.close(fd)
    return total


class SmallRead(Workload):
    warm_key = "small"

    def prime(self, ctx):
        for lower in ctx.layers.lowers:
            read_tree(os.path.join(lower, "tree"))

    def run(self, ctx, impl, rep):
        paths = [os.path.join(impl.merged, f) for f in ctx.small]
        total, secs = _timed(_smallread, paths)
        _expect(
            total == ctx.meta["small_bytes"],
            impl,
            f"small files gave {total} bytes, expected {ctx.meta['small_bytes']}",
        )
        return secs, secs

    def check(self, ctx, impl, rep, result):
        for leaf in ctx.leaves[:3]:
            for i in (40, 50, 59):  # shadowed: LOWER1's content wins
                rel = f"{leaf}/f{i:03d}"
                with (
                    open(os.path.join(impl.merged, rel), "rb") as a,
                    open(os.path.join(ctx.layers.lower1, rel), "rb") as b,
                ):
                    _expect(a.read() == b.read(), impl, f"{rel} does not show LOWER1's content")


class SmallReadCold(SmallRead):
    name, cold = "smallread_cold", True


class SmallReadWarm(SmallRead):
    name = "smallread_warm"


class SeqRead(Workload):
    unit, warm_key = "MiB/s", "seq"

    def prime(self, ctx):
        read_file(os.path.join(ctx.layers.lower1, "big", "seq.bin"))

    def run(self, ctx, impl, rep):
        n, secs = _timed(read_file, os.path.join(impl.merged, "big", "seq.bin"))
        _expect(n == ctx.sizes.seq_mib * MIB, impl, f"seq.bin read {n} bytes")
        return n / MIB / secs, secs

    def check(self, ctx, impl, rep, result):
        with (
            open(os.path.join(impl.merged, "big", "seq.bin"), "rb") as a,
            open(os.path.join(ctx.layers.lower1, "big", "seq.bin"), "rb") as b,
        ):
            for off in (0, (ctx.sizes.seq_mib - 1) * MIB):
                a.seek(off)
                b.seek(off)
                _expect(a.read(MIB) == b.read(MIB), impl, f"seq.bin differs at {off}")


class SeqReadFirst(SeqRead):
    name, cold = "seqread_first", True


class SeqReadAgain(SeqRead):
    name = "seqread_again"


class RandRead(Workload):
    name, unit = "randread_4k", "IOPS"

    def skip(self, ctx, impl):
        return None if ctx.fio else "fio is not installed"

    def prepare(self, ctx, impl, rep):
        ctx.prime_once(("rand",), lambda: read_file(os.path.join(ctx.layers.lower1, "big", "rand.bin")))

    def run(self, ctx, impl, rep):
        # each 4k block of one part of the file once; each rep reads another part, so
        # the FUSE page cache of the merged file does not serve it
        parts = max(3, ctx.sizes.reps)
        part = ctx.sizes.rand_mib * MIB // parts // 4096 * 4096
        argv = [
            ctx.fio,
            "--name=randread",
            "--filename=" + os.path.join(impl.merged, "big", "rand.bin"),
            "--rw=randread",
            "--bs=4k",
            "--ioengine=psync",
            "--invalidate=0",
            f"--offset={rep % parts * part}",
            f"--size={part}",
            "--output-format=json",
        ]
        r, secs = _timed(run, argv)
        doc, _ = json.JSONDecoder().raw_decode(r.stdout[r.stdout.index("{") :])
        job = doc["jobs"][0]["read"]
        _expect(job["io_bytes"] == part, impl, f"fio read {job['io_bytes']} bytes, wanted {part}")
        return job["iops"], secs


class Import(Workload):
    warm_key = "import"

    def prime(self, ctx):
        for lower in ctx.layers.lowers:
            read_tree(os.path.join(lower, "pyhome"))

    def run(self, ctx, impl, rep):
        home = os.path.join(impl.merged, "pyhome")
        env = {"PYTHONHOME": home, "PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"}
        argv = [ctx.meta["python"], "-S", "-B", "-P", "-c", _IMPORT_CODE, home + "/", *IMPORT_MODULES]
        t0 = time.perf_counter()
        r = subprocess.run(argv, env=env, cwd="/", capture_output=True, text=True, timeout=300)
        secs = time.perf_counter() - t0
        _expect(r.returncode == 0, impl, f"import run failed: {r.stderr.strip()[-300:]}")
        loaded, nbad, bad = (r.stdout.split(maxsplit=2) + [""])[:3]
        _expect(int(nbad) == 0, impl, f"modules loaded from outside the merged tree: {bad}")
        _expect(int(loaded) >= len(IMPORT_MODULES), impl, f"only {loaded} modules loaded")
        return secs, secs


class ImportCold(Import):
    name, cold = "import_cold", True


class ImportWarm(Import):
    name = "import_warm"
