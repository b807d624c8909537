"""Image archives for the import/commit tests, built from layers defined in Python.

A layer is a list of entries (``D`` dir, ``F`` file, ``L`` symlink, ``H`` hard link,
``C`` char device, ``P`` FIFO, ``W`` whiteout, ``O`` opaque marker). From one
definition this module writes:

* ``layer_tar(entries)``: the layer as an OCI/Docker layer tar (``.wh.NAME``,
  ``DIR/.wh..wh..opq``, PAX xattrs and nanosecond mtimes);
* ``build_layer_dir(entries, dest)``: the SAME layer built directly in the kernel's
  overlay format (char 0/0 whiteouts, ``trusted.overlay.opaque=y``), the expected result
  of an import;
* ``write_docker_save(path, ...)``: a legacy ``docker save`` tar (``<v1id>/layer.tar``,
  ``<id>.json``, ``manifest.json``, ``repositories``);
* ``write_oci_layout(dir, ..., compression)``: an OCI image layout directory with gzip or
  zstd (or uncompressed) layer blobs; ``tar_tree(dir, out)`` makes a tar of it.

``DEMO`` is the 3-layer image of the tests: base (dirs, files, a symlink, a hard link,
a setuid file, xattrs, a device and a FIFO), middle (a whiteout of a base file, an opaque
directory replacing a base directory), top (files). ``evil_layer(kind)`` builds the
malicious layers.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

T0 = 1_600_000_000 * 10**9  # mtimes in ns

#: snapshot keys that differ between two copies of the same tree
IGNORE = ("ino", "ctime_ns", "d_ino", "dot_d_ino", "dotdot_d_ino", "blocks", "blksize", "dev_is_root_dev")


def store_cli(store, *args, timeout=120) -> subprocess.CompletedProcess:
    """``pyoverlay ARGS...`` with the local image store at *store*."""
    from .containers import pyoverlay_cmd
    from .mounts import pyoverlay_env

    env = pyoverlay_env()
    env["PYOVERLAY_IMAGES_DIR"] = str(store)
    return subprocess.run(
        pyoverlay_cmd() + [str(a) for a in args], env=env, capture_output=True, text=True, timeout=timeout
    )


def store_ok(store, *args) -> subprocess.CompletedProcess:
    from .containers import describe

    r = store_cli(store, *args)
    assert r.returncode == 0, describe(r)
    return r


@dataclass
class E:
    kind: str  # D F L H C P W O
    path: str
    data: bytes = b""
    target: str = ""  # L: symlink target, H: hard link target
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime_ns: int = T0
    xattrs: dict = field(default_factory=dict)
    rdev: tuple = (0, 0)


def D(path, mode=0o755, **kw):
    return E("D", path, mode=mode, **kw)


def F(path, data=b"", mode=0o644, **kw):
    return E("F", path, data=data, mode=mode, **kw)


def L(path, target, **kw):
    return E("L", path, target=target, mode=0o777, **kw)


def H(path, target):
    return E("H", path, target=target)


def C(path, major, minor, mode=0o666):
    return E("C", path, mode=mode, rdev=(major, minor))


def P(path, mode=0o600):
    return E("P", path, mode=mode)


def W(path):
    return E("W", path, mode=0o000)


def O(path):  # noqa: E743 - the opaque marker of a directory
    return E("O", path)


CAP_NET_RAW = (0x02000001).to_bytes(4, "little") + (1 << 13).to_bytes(4, "little") + bytes(12)

BASE = [
    D(".", mtime_ns=T0 + 1),
    D("bin"),
    F("bin/tool", b"#!/bin/sh\necho tool\n", 0o755),
    F("bin/su", b"setuid binary\n", 0o4755, xattrs={"security.capability": CAP_NET_RAW}),
    H("bin/tool-again", "bin/tool"),
    L("usr", "."),
    D("etc", mtime_ns=T0 + 123456789),
    F("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
    F("etc/motd", b"base motd\n", mtime_ns=T0 + 5),
    F("etc/secret", b"secret\n", 0o600, uid=1000, gid=1000),
    L("etc/localtime", "/usr/share/zoneinfo/UTC"),
    D("data", 0o2775, gid=100, xattrs={"user.dir": b"base"}),
    F("data/a.txt", b"a\n"),
    D("data/sub"),
    F("data/sub/b.txt", b"b\n", xattrs={"user.note": b"\x00\xffbinary", "trusted.overlay.mine": b"escaped"}),
    D("dev"),
    C("dev/null", 1, 3),
    P("dev/fifo"),
    D("tmp", 0o1777),
]

MIDDLE = [
    D("etc", mtime_ns=T0 + 10),
    W("etc/motd"),
    D("data", 0o2775, gid=100, mtime_ns=T0 + 11),
    D("data/sub", 0o750, mtime_ns=T0 + 12),
    O("data/sub"),
    F("data/sub/c.txt", b"c\n"),
]

TOP = [
    D("app", mtime_ns=T0 + 20),
    F("app/hello.txt", b"hello\n" * 1000, mtime_ns=T0 + 21),
    D("etc", mtime_ns=T0 + 22),
    F("etc/hostname", b"demo\n"),
]

DEMO = [BASE, MIDDLE, TOP]  # bottom first
DEMO_TAG = "demo:1"


# ---------------------------------------------------------------------------
# the layer tar
# ---------------------------------------------------------------------------


def _info(e: E, name: str, kind) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = e.mode
    ti.uid, ti.gid = e.uid, e.gid
    sec, frac = divmod(e.mtime_ns, 10**9)
    ti.mtime = sec
    if frac:
        ti.pax_headers["mtime"] = f"{sec}.{frac:09d}"
    for k, v in sorted(e.xattrs.items()):
        ti.pax_headers["SCHILY.xattr." + k] = v.decode("utf-8", "surrogateescape")
    return ti


def layer_tar(entries: list[E]) -> bytes:
    bio = io.BytesIO()
    with tarfile.open(fileobj=bio, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            d, _, base = e.path.rpartition("/")
            pre = d + "/" if d else ""
            if e.kind == "W":
                tf.addfile(_info(e, pre + ".wh." + base, tarfile.REGTYPE), io.BytesIO())
            elif e.kind == "O":
                tf.addfile(_info(e, e.path + "/.wh..wh..opq", tarfile.REGTYPE), io.BytesIO())
            elif e.kind == "F":
                ti = _info(e, e.path, tarfile.REGTYPE)
                ti.size = len(e.data)
                tf.addfile(ti, io.BytesIO(e.data))
            else:
                kind = {
                    "D": tarfile.DIRTYPE,
                    "L": tarfile.SYMTYPE,
                    "H": tarfile.LNKTYPE,
                    "C": tarfile.CHRTYPE,
                    "P": tarfile.FIFOTYPE,
                }[e.kind]
                ti = _info(e, e.path, kind)
                ti.linkname = e.target
                ti.devmajor, ti.devminor = e.rdev
                tf.addfile(ti)
    return bio.getvalue()


def build_layer_dir(entries: list[E], dest) -> Path:
    """The layer in the kernel's format, as an import must produce it."""
    dest = Path(dest)
    dest.mkdir(parents=True)
    os.chmod(dest, 0o755)
    dirs = []
    for e in entries:
        p = dest / e.path
        if e.kind == "D":
            p.mkdir(exist_ok=True)
            dirs.append(e)
        elif e.kind == "F":
            p.write_bytes(e.data)
        elif e.kind == "L":
            os.symlink(e.target, p)
        elif e.kind == "H":
            os.link(dest / e.target, p)
            continue
        elif e.kind in ("C", "W"):
            os.mknod(p, stat.S_IFCHR | e.mode, os.makedev(*e.rdev))
        elif e.kind == "P":
            os.mkfifo(p, e.mode)
        elif e.kind == "O":
            os.setxattr(p, "trusted.overlay.opaque", b"y")
            continue
        os.chown(p, e.uid, e.gid, follow_symlinks=False)
        if e.kind not in ("L", "D"):
            os.chmod(p, e.mode)
        for k, v in e.xattrs.items():
            k = "trusted.overlay.overlay." + k[16:] if k.startswith("trusted.overlay.") else k
            os.setxattr(p, k, v, follow_symlinks=False)
        if e.kind != "D":
            os.utime(p, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)
    for e in sorted(dirs, key=lambda e: -len(Path(e.path).parts) if e.path != "." else 1):
        os.chmod(dest / e.path, e.mode)
        os.utime(dest / e.path, ns=(e.mtime_ns, e.mtime_ns))
    return dest


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def config_for(tars: list[bytes], cmd=("/bin/sh",)) -> bytes:
    cfg = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": list(cmd), "Env": ["PATH=/bin", "DEMO=1"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [sha256(t) for t in tars]},
        "history": [{"created_by": f"layer {i}"} for i in range(len(tars))],
    }
    return json.dumps(cfg, sort_keys=True).encode()


# ---------------------------------------------------------------------------
# archives
# ---------------------------------------------------------------------------


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mtime = T0 // 10**9
    tf.addfile(ti, io.BytesIO(data))


def write_docker_save(path, images: list[tuple[list[bytes], list[str]]], configs=None, layer_path=None) -> Path:
    """A legacy ``docker save`` tar of *images* = [(layer tars bottom first, tags)]. A layer
    already written for an earlier image becomes a symlink to it (as Docker does)."""
    path = Path(path)
    manifest, repos, seen = [], {}, {}
    with tarfile.open(path, "w") as tf:
        for n, (tars, tags) in enumerate(images):
            config = configs[n] if configs else config_for(tars)
            layers = []
            for i, t in enumerate(tars):
                v1 = hashlib.sha256(f"{n}/{i}".encode() + sha256(t).encode()).hexdigest()
                if sha256(t) in seen:
                    ti = tarfile.TarInfo(f"{v1}/layer.tar")
                    ti.type = tarfile.SYMTYPE
                    ti.linkname = f"../{seen[sha256(t)]}/layer.tar"
                    tf.addfile(ti)
                else:
                    seen[sha256(t)] = v1
                    _add(tf, f"{v1}/VERSION", b"1.0")
                    _add(tf, f"{v1}/json", json.dumps({"id": v1}).encode())
                    _add(tf, f"{v1}/layer.tar", t)
                layers.append(layer_path(v1) if layer_path else f"{v1}/layer.tar")
            cid = sha256(config)[7:]
            _add(tf, f"{cid}.json", config)
            manifest.append({"Config": f"{cid}.json", "RepoTags": tags, "Layers": layers})
            for t in tags:
                name, tag = t.rsplit(":", 1)
                repos.setdefault(name, {})[tag] = layers[-1].split("/")[0]
        _add(tf, "manifest.json", json.dumps(manifest).encode())
        _add(tf, "repositories", json.dumps(repos).encode())
    return path


def compress(data: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(data, mtime=0)
    if how == "zstd":
        import zstandard

        return zstandard.ZstdCompressor().compress(data)
    return data


MEDIA = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "": "application/vnd.oci.image.layer.v1.tar",
}


def write_oci_layout(
    dest,
    tars: list[bytes],
    compression: str = "gzip",
    tag: str = DEMO_TAG,
    config: bytes | None = None,
    corrupt_blob: int | None = None,
) -> Path:
    """An OCI image layout directory with one image (annotated ``ref.name`` = *tag*)."""
    dest = Path(dest)
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> dict:
        (blobs / sha256(data)[7:]).write_bytes(data)
        return {"digest": sha256(data), "size": len(data)}

    config = config or config_for(tars)
    layers = []
    for i, t in enumerate(tars):
        blob = compress(t, compression)
        desc = {"mediaType": MEDIA[compression], **put(blob)}
        if corrupt_blob == i:  # the blob on disk differs from its digest
            (blobs / desc["digest"][7:]).write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
        layers.append(desc)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **put(config)},
            "layers": layers,
        }
    ).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                **put(manifest),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (dest / "index.json").write_text(json.dumps(index))
    (dest / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return dest


def tar_tree(src, out, gzipped: bool = False) -> Path:
    """A plain (or gzip'd) tar of the directory *src* (member names relative to it)."""
    out = Path(out)
    with tarfile.open(out, "w:gz" if gzipped else "w") as tf:
        for p in sorted(Path(src).rglob("*")):
            tf.add(p, arcname=str(p.relative_to(src)), recursive=False)
    return out


# ---------------------------------------------------------------------------
# malicious layers
# ---------------------------------------------------------------------------

EVIL_KINDS = (
    "dotdot",
    "absolute",
    "symlink_parent",
    "hardlink_out",
    "hardlink_symlink",
    "whiteout_dotdot",
    "hardlink_missing",
    "hardlink_dir_symlink",
)


def evil_layer(kind: str, outside: str) -> bytes:
    """A layer tar that must be refused; *outside* is a directory outside the store that
    an unsafe extraction would write into."""
    entries = {
        "dotdot": [D("a"), F("a/../../x", b"pwned\n")],
        "absolute": [F(outside + "/x", b"pwned\n")],
        "symlink_parent": [L("evil", outside), F("evil/file", b"pwned\n")],
        "hardlink_out": [D("a"), H("a/passwd", "../../etc/passwd")],
        "hardlink_symlink": [L("evil", outside + "/x"), H("h", "evil")],
        "whiteout_dotdot": [D("d"), E("W", "d/..")],
        "hardlink_missing": [H("h", "not/there")],
        "hardlink_dir_symlink": [L("evil", outside), H("h", "evil/x")],
    }[kind]
    return layer_tar(entries)


def dir_tar(src) -> bytes:
    """A layer tar of the directory *src* as it is (tarfile's own walk: symlinks as
    symlinks, hard links, devices; no xattrs)."""
    bio = io.BytesIO()
    with tarfile.open(fileobj=bio, mode="w", format=tarfile.PAX_FORMAT) as tf:
        tf.add(src, arcname=".")
    return bio.getvalue()
