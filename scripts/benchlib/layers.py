"""The benchmark's layers: sizes per mode, building them (once per spec), the native copy.

Two lower layers, LOWER1 on top of LOWER2 (``lowerdir=LOWER1:LOWER2``):

* ``tree/dNN/sNN/fNNN``: leaf dirs of 100 small files (256 B - 4 KiB); LOWER2 holds
  f000-f059, LOWER1 f040-f099, so f040-f059 are shadowed and every dir is merged;
* ``bigdir/``: N entries, LOWER2 the first 60 %, LOWER1 the last 60 % (20 % shadowed);
* ``big/seq.bin``, ``big/rand.bin`` (LOWER1), ``big/cuN.bin`` (LOWER2, one per copy-up rep);
* ``pyhome/lib/python3.11``: the running interpreter's stdlib (no site-packages, tests,
  config dir or optimised .pyc), top-level entries alternating between the lowers;
  plus ``data/stdlib.tar`` (outside the layers) of the same files for untar.

No whiteouts or opaque dirs in the lowers: their on-disk format differs between
the implementations.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import sys
import tarfile

from .util import BenchError, rmtree

LAYOUT_VERSION = 3
MIB = 1 << 20
PER_LEAF = 100


@dataclasses.dataclass
class Sizes:
    tops: int  # tree/dNN
    subs: int  # tree/dNN/sNN
    bigdir: int  # merged entries of bigdir/
    seq_mib: int
    rand_mib: int
    cu_mib: int
    create_n: int  # create_10k / unlink_10k
    whiteout_n: int  # whiteout_1k
    copyup_n: int  # copyup_small_1k
    seqwrite_mib: int
    reps: int
    cap_s: float  # a workload stops repeating after this many seconds on one impl
    tar_limit: int = 0  # untar: only the first N stdlib files (0: all)

    @property
    def small_files(self) -> int:
        return self.tops * self.subs * PER_LEAF

    @property
    def n_cu(self) -> int:
        return max(3, self.reps)

    def layer_spec(self) -> dict:
        keys = ("tops", "subs", "bigdir", "seq_mib", "rand_mib", "cu_mib", "tar_limit")
        spec = {k: getattr(self, k) for k in keys}
        spec.update(n_cu=self.n_cu, layout=LAYOUT_VERSION, stdlib=stdlib_source())
        return spec


PRESETS = {
    "full": Sizes(
        tops=20,
        subs=10,
        bigdir=10_000,
        seq_mib=512,
        rand_mib=256,
        cu_mib=256,
        create_n=10_000,
        whiteout_n=1_000,
        copyup_n=1_000,
        seqwrite_mib=1024,
        reps=3,
        cap_s=40,
    ),
    "quick": Sizes(
        tops=8,
        subs=5,
        bigdir=10_000,
        seq_mib=64,
        rand_mib=64,
        cu_mib=64,
        create_n=1_000,
        whiteout_n=200,
        copyup_n=200,
        seqwrite_mib=128,
        reps=3,
        cap_s=5,
        tar_limit=400,
    ),
    "smoke": Sizes(
        tops=2,
        subs=2,
        bigdir=500,
        seq_mib=4,
        rand_mib=4,
        cu_mib=4,
        create_n=100,
        whiteout_n=50,
        copyup_n=50,
        seqwrite_mib=4,
        reps=1,
        cap_s=5,
        tar_limit=150,
    ),
}


def stdlib_source() -> str:
    base = getattr(sys, "_base_executable", sys.executable)
    prefix = sys.base_prefix
    ver = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return (
        os.path.join(prefix, "lib", ver)
        if os.path.isdir(os.path.join(prefix, "lib", ver))
        else os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(base))), "lib", ver)
    )


def base_python() -> str:
    """The real interpreter (not the venv's): the import workload runs it with PYTHONHOME."""
    return os.path.realpath(getattr(sys, "_base_executable", sys.executable))


_SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "__phello__"}


def _stdlib_files(src: str):
    """(relpath, abspath) of the stdlib files to copy, sorted."""
    out = []
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("config-"))
        for name in sorted(files):
            if ".opt-1." in name or ".opt-2." in name:
                continue
            p = os.path.join(root, name)
            if os.path.isfile(p) and not os.path.islink(p):
                out.append((os.path.relpath(p, src), p))
    return out


def leaf_dirs(sz: Sizes) -> list[str]:
    return [f"tree/d{t:02d}/s{s:02d}" for t in range(sz.tops) for s in range(sz.subs)]


def leaf_files(leaf: str) -> list[str]:
    return [f"{leaf}/f{i:03d}" for i in range(PER_LEAF)]


class Layers:
    """Built layers on disk: ``root/{lower1,lower2,data}`` and ``root/meta.json``."""

    def __init__(self, root: str, sizes: Sizes, meta: dict):
        self.root, self.sizes, self.meta = root, sizes, meta
        self.lower1 = os.path.join(root, "lower1")
        self.lower2 = os.path.join(root, "lower2")
        self.lowers = [self.lower1, self.lower2]  # top first
        self.tarball = os.path.join(root, "data", "stdlib.tar")

    def lower_paths(self, rel: str) -> list[str]:
        """The lower files for merged path *rel*, top first (those that exist)."""
        return [p for p in (os.path.join(lower, rel) for lower in self.lowers) if os.path.lexists(p)]


def _block(seed: int) -> bytes:
    return random.Random(seed).randbytes(4 * MIB)


def _write_big(path: str, mib: int, seed: int) -> None:
    block = _block(seed)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i in range(mib):
            off = (i * 7919 % 3) * MIB
            chunk = i.to_bytes(8, "little") + block[off + 8 : off + MIB]
            os.write(fd, chunk)
    finally:
        os.close(fd)


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _build(root: str, sz: Sizes, log) -> dict:
    rng = random.Random(1234)
    l1, l2 = os.path.join(root, "lower1"), os.path.join(root, "lower2")
    for leaf in leaf_dirs(sz):
        for layer in (l1, l2):
            os.makedirs(os.path.join(layer, leaf))
        for i in range(PER_LEAF):
            if i < 60:
                _write(os.path.join(l2, leaf, f"f{i:03d}"), rng.randbytes(rng.randint(256, 4096)))
            if i >= 40:
                _write(os.path.join(l1, leaf, f"f{i:03d}"), rng.randbytes(rng.randint(256, 4096)))
    log(f"layers: {sz.small_files} small files written")
    n = sz.bigdir
    for layer, rng_ in ((l2, range(0, n * 6 // 10)), (l1, range(n * 4 // 10, n))):
        os.makedirs(os.path.join(layer, "bigdir"))
        for i in rng_:
            _write(os.path.join(layer, "bigdir", f"e{i}"), b"%d\n" % i)
    for layer in (l1, l2):
        os.makedirs(os.path.join(layer, "big"))
    _write_big(os.path.join(l1, "big", "seq.bin"), sz.seq_mib, 1)
    _write_big(os.path.join(l1, "big", "rand.bin"), sz.rand_mib, 2)
    for i in range(sz.n_cu):
        _write_big(os.path.join(l2, "big", f"cu{i}.bin"), sz.cu_mib, 10 + i)
    log("layers: bigdir and big files written")
    # the stdlib, top-level entries alternating between the lowers
    src = stdlib_source()
    ver = os.path.basename(src)
    files = _stdlib_files(src)
    tops = sorted({rel.split("/", 1)[0] for rel, _ in files})
    where = {t: (l1 if i % 2 == 0 else l2) for i, t in enumerate(tops)}
    for rel, p in files:
        dst = os.path.join(where[rel.split("/", 1)[0]], "pyhome", "lib", ver, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        with open(p, "rb") as fi, open(dst, "wb") as fo:
            fo.write(fi.read())
        st = os.stat(p)
        os.chmod(dst, st.st_mode & 0o777)
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))  # keeps the .pyc files valid
    for layer in (l1, l2):
        os.makedirs(os.path.join(layer, "pyhome", "lib", ver), exist_ok=True)
    os.makedirs(os.path.join(root, "data"))
    tar_files = files[: sz.tar_limit] if sz.tar_limit else files
    with tarfile.open(os.path.join(root, "data", "stdlib.tar"), "w") as tf:
        for rel, p in tar_files:
            tf.add(p, arcname=f"{ver}/{rel}", recursive=False)
    log(f"layers: stdlib copy ({len(files)} files) and tarball written")
    # what the merged view must show
    entries = set()
    small_bytes = 0
    for layer in (l2, l1):
        for r, dirs, fs in os.walk(layer):
            rel = os.path.relpath(r, layer)
            for name in dirs + fs:
                entries.add(name if rel == "." else f"{rel}/{name}")
    for leaf in leaf_dirs(sz):
        for i in range(PER_LEAF):
            top = l1 if i >= 40 else l2
            small_bytes += os.stat(os.path.join(top, leaf, f"f{i:03d}")).st_size
    return {
        "entries": len(entries),
        "files": sum(
            1 for e in entries if not os.path.isdir(os.path.join(l1, e)) and not os.path.isdir(os.path.join(l2, e))
        ),
        "small_bytes": small_bytes,
        "stdlib_files": len(files),
        "tar_files": len(tar_files),
        "pyversion": ver,
        "python": base_python(),
    }


def prepare_layers(base: str, sz: Sizes, *, keep: bool, log) -> Layers:
    """Build (or, with ``keep``, reuse while the spec matches) the layers under *base*."""
    spec = sz.layer_spec()
    h = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    root = os.path.join(base, f"layers-{h}")
    meta_path = os.path.join(root, "meta.json")
    if keep and os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("spec") == spec:
            log(f"layers: reusing {root}")
            return Layers(root, sz, meta)
    rmtree(root)
    tmp = root + ".building"
    rmtree(tmp)
    os.makedirs(tmp)
    try:
        meta = _build(tmp, sz, log)
    except BaseException:
        rmtree(tmp)
        raise
    meta["spec"] = spec
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    os.rename(tmp, root)
    os.sync()
    return Layers(root, sz, meta)


def build_native(layers: Layers, dst: str) -> None:
    """The pre-merged copy: LOWER2 then LOWER1, files hard-linked (same filesystem)."""
    if os.stat(layers.root).st_dev != os.stat(os.path.dirname(dst)).st_dev:
        raise BenchError("native copy must be on the layers' filesystem")
    for layer in reversed(layers.lowers):
        for r, _dirs, files in os.walk(layer):
            out = os.path.normpath(os.path.join(dst, os.path.relpath(r, layer)))
            os.makedirs(out, exist_ok=True)
            for name in files:
                target = os.path.join(out, name)
                if os.path.lexists(target):
                    os.unlink(target)
                os.link(os.path.join(r, name), target)
