"""A Docker overlay2 image store built by hand, in dockerd's on-disk format.

``StoreBuilder(root)`` writes what dockerd 20.10 writes (docs/images.md,
/work/shared/reference/runner.md section 4.2)::

    image/overlay2/repositories.json                 {"Repositories": {repo: {"repo:tag": id, "repo@sha256:..": id}}}
    image/overlay2/imagedb/content/sha256/<id>        the config; sha256(bytes) == id
    image/overlay2/imagedb/metadata/sha256/<id>/      parent (built-on image), lastUpdated (tagged)
    image/overlay2/layerdb/sha256/<chain>/            diff, cache-id, size, parent (not for the base)
    overlay2/<cache-id>/diff/                         the layer (char 0/0 whiteouts, opaque xattr)
    overlay2/<cache-id>/{link,lower,work/,committed}  link = 26-char short name; lower =
                                                      "l/<parent>:l/<grandparent>" (not for the base);
                                                      committed once a child layer exists
    overlay2/l/<link> -> ../<cache-id>/diff

Diff ids are real: the sha256 of the layer as a tar in Docker's format (``.wh.`` names
for whiteouts, ``.wh..wh..opq`` in opaque directories). Not written: ``tar-split.json.gz``
(only ``docker save``/``push`` use it), ``layerdb/mounts``, ``containers/``.

``build_test_store(root)`` makes the store the image tests use (:class:`TestStore`).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import secrets
import stat
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import rootfs

PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
OPAQUE = "trusted.overlay.opaque"


# --------------------------------------------------------------------------
# digests
# --------------------------------------------------------------------------


def chain_ids(diff_ids: list[str]) -> list[str]:
    """Docker's algorithm, written independently of runner.images.docker."""
    out = []
    for i, d in enumerate(diff_ids):
        out.append(d if i == 0 else "sha256:" + hashlib.sha256((out[-1] + " " + d).encode()).hexdigest())
    return out


class _HashWriter(io.RawIOBase):
    def __init__(self):
        self.h = hashlib.sha256()
        self.n = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.h.update(b)
        self.n += len(b)
        return len(b)


def layer_tar_digest(diff: Path) -> str:
    """sha256 of the layer as an (uncompressed) tar in Docker's layer format."""
    out = _HashWriter()
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(diff):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, diff)
            if rel_dir != "." and _opaque(dirpath):
                tar.addfile(_empty(os.path.join(rel_dir, ".wh..wh..opq")))
            for name in sorted(filenames + dirnames):
                path = os.path.join(dirpath, name)
                rel = os.path.normpath(os.path.join(rel_dir, name))
                st = os.lstat(path)
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                    tar.addfile(_empty(os.path.join(os.path.dirname(rel), ".wh." + name)))
                    continue
                info = tar.gettarinfo(path, rel)
                info.mtime = int(st.st_mtime)
                if info.isreg():
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)
    return "sha256:" + out.h.hexdigest()


def _opaque(path: str) -> bool:
    try:
        return os.getxattr(path, OPAQUE, follow_symlinks=False) == b"y"
    except OSError:
        return False


def _empty(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = 0o644
    return info


def tree_size(diff: Path) -> int:
    """Docker's layer ``size``: bytes of every non-directory, hard links once."""
    seen, total = set(), 0
    for dirpath, _dirs, files in os.walk(diff):
        for n in files:
            st = os.lstat(os.path.join(dirpath, n))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


# --------------------------------------------------------------------------
# the store
# --------------------------------------------------------------------------


@dataclass
class Layer:
    chain_id: str
    diff_id: str
    cache_id: str
    link: str
    diff: Path  # overlay2/<cache-id>/diff
    parent: Layer | None = None


@dataclass
class StoredImage:
    id: str  # "sha256:<hex>"
    config: dict
    layers: list[Layer]  # bottom first
    names: list[str] = field(default_factory=list)

    @property
    def hex(self) -> str:
        return self.id.removeprefix("sha256:")

    @property
    def diff_dirs_top_first(self) -> list[str]:
        return [str(layer.diff) for layer in reversed(self.layers)]


class StoreBuilder:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.img = self.root / "image" / "overlay2"
        self.ovl = self.root / "overlay2"
        self.layers: dict[str, Layer] = {}
        self.repos: dict[str, dict[str, str]] = {}
        for d in (
            self.img / "imagedb" / "content" / "sha256",
            self.img / "imagedb" / "metadata" / "sha256",
            self.img / "layerdb" / "sha256",
            self.img / "layerdb" / "tmp",
            self.img / "distribution",
            self.ovl / "l",
        ):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(self.ovl, 0o710)
        os.chmod(self.ovl / "l", 0o700)

    def layer(self, parent: Layer | None, fill: Callable[[Path], None]) -> Layer:
        """A new layer on *parent*: ``fill(diff_dir)`` writes its files."""
        cache_id = secrets.token_hex(32)
        top = self.ovl / cache_id
        top.mkdir(mode=0o710)
        diff = top / "diff"
        diff.mkdir(mode=0o755)
        fill(diff)
        diff_id = layer_tar_digest(diff)
        chain = diff_id if parent is None else chain_ids([parent.chain_id, diff_id])[1]
        link = base64.b32encode(secrets.token_bytes(16)).decode()[:26]
        (top / "link").write_text(link)
        os.symlink(f"../{cache_id}/diff", self.ovl / "l" / link)
        if parent is not None:
            lowers, p = [], parent
            while p is not None:
                lowers.append(f"l/{p.link}")
                p = p.parent
            (top / "lower").write_text(":".join(lowers))
            (top / "work").mkdir(mode=0o700)
            committed = self.ovl / parent.cache_id / "committed"
            committed.touch()
            os.chmod(committed, 0o600)
        ldb = self.img / "layerdb" / "sha256" / chain.removeprefix("sha256:")
        ldb.mkdir()
        (ldb / "diff").write_text(diff_id)
        (ldb / "cache-id").write_text(cache_id)
        (ldb / "size").write_text(str(tree_size(diff)))
        if parent is not None:
            (ldb / "parent").write_text(parent.chain_id)
        layer = Layer(chain, diff_id, cache_id, link, diff, parent)
        self.layers[chain] = layer
        return layer

    def image(
        self, top: Layer, config: dict, parent: StoredImage | None = None, prefix: str | None = None
    ) -> StoredImage:
        """An image whose layers are *top* and its parents. With *prefix*, a label
        is varied until the image id starts with it (to make ambiguous prefixes)."""
        stack, layer = [], top
        while layer is not None:
            stack.append(layer)
            layer = layer.parent
        stack.reverse()
        config = dict(config, rootfs={"type": "layers", "diff_ids": [lay.diff_id for lay in stack]})
        n = 0
        while True:
            data = json.dumps(config, separators=(",", ":")).encode()
            hexid = hashlib.sha256(data).hexdigest()
            if prefix is None or hexid.startswith(prefix):
                break
            n += 1
            config["config"] = dict(config["config"], Labels={"nonce": str(n)})
        (self.img / "imagedb" / "content" / "sha256" / hexid).write_bytes(data)
        meta = self.img / "imagedb" / "metadata" / "sha256" / hexid
        meta.mkdir()
        if parent is not None:
            (meta / "parent").write_text(parent.id)
        return StoredImage(f"sha256:{hexid}", json.loads(data), stack)

    def tag(self, image: StoredImage, *refs: str) -> None:
        """``name:tag`` or ``name@sha256:...`` keys in repositories.json."""
        for ref in refs:
            repo = ref.split("@", 1)[0] if "@" in ref else ref.rsplit(":", 1)[0]
            self.repos.setdefault(repo, {})[ref] = image.id
            image.names.append(ref)
        (self.img / "imagedb" / "metadata" / "sha256" / image.hex / "lastUpdated").write_text(
            "2024-01-01T00:00:00.000000000Z"
        )
        (self.img / "repositories.json").write_text(json.dumps({"Repositories": self.repos}, separators=(",", ":")))


def config_of(env=(), cmd=None, entrypoint=None, workdir="", user="", history=()) -> dict:
    return {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": [PATH_ENV, *env],
            "Cmd": cmd,
            "Entrypoint": entrypoint,
            "WorkingDir": workdir,
            "User": user,
            "Labels": None,
        },
        "history": [{"created_by": h} for h in history],
    }


# --------------------------------------------------------------------------
# the test store
# --------------------------------------------------------------------------

MIDDLE_MOTD = b"motd of the middle layer\n"
TOP_MOTD = b"motd of the top layer\n"
APP_CMD = ["sh", "-c", 'echo "cmd FOO=$FOO GREETING=$GREETING pwd=$(pwd) uid=$(id -u)"']


def _fill_base(d: Path) -> None:
    rootfs.build_busybox_rootfs(d)
    (d / "data" / "sub" / "deep").mkdir(parents=True)
    (d / "data" / "a.txt").write_text("one\n")
    (d / "data" / "keep.txt").write_text("keep\n")
    (d / "data" / "sub" / "b.txt").write_text("two\n")
    (d / "data" / "sub" / "deep" / "x").write_text("deep\n")


def _fill_middle(d: Path) -> None:
    """bin/vi whited out; data/sub opaque with other content; a new etc/motd."""
    for sub in ("bin", "etc", "data"):
        (d / sub).mkdir()
    os.mknod(d / "bin" / "vi", stat.S_IFCHR | 0o000, os.makedev(0, 0))
    (d / "data" / "sub").mkdir()
    os.setxattr(d / "data" / "sub", OPAQUE, b"y")
    (d / "data" / "sub" / "c.txt").write_text("new\n")
    (d / "etc" / "motd").write_bytes(MIDDLE_MOTD)


def _fill_top(d: Path) -> None:
    """A few files and another whiteout (data/a.txt)."""
    for sub in ("app", "etc", "data"):
        (d / sub).mkdir()
    (d / "app" / "hello.txt").write_bytes(rootfs.HELLO)
    (d / "app" / "run.sh").write_text("#!/bin/sh\necho run.sh says $1\n")
    os.chmod(d / "app" / "run.sh", 0o755)
    (d / "etc" / "motd").write_bytes(TOP_MOTD)
    os.mknod(d / "data" / "a.txt", stat.S_IFCHR | 0o000, os.makedev(0, 0))


def _fill_web(d: Path) -> None:
    (d / "srv" / "www").mkdir(parents=True)
    (d / "srv" / "www" / "index.html").write_text("<h1>web</h1>\n")


@dataclass
class TestStore:
    """busybox:latest (base only, no Cmd); app:latest + app@sha256:... (base, middle,
    top; Env, Cmd, WorkingDir, User); mid (base + middle, untagged: app's parent
    image, hidden by ``images``); web:1.0 = web:latest (base + web layer; Entrypoint
    + Cmd), whose id shares its first 4 hex digits with app's."""

    root: Path
    busybox: StoredImage
    mid: StoredImage
    app: StoredImage
    web: StoredImage
    app_digest: str

    __test__ = False  # not a pytest class

    def unique_prefix(self, img: StoredImage) -> str:
        """The shortest prefix (>= 4) of *img*'s id no other image id shares."""
        others = [i.hex for i in (self.busybox, self.mid, self.app, self.web) if i is not img]
        for n in range(4, 65):
            if not any(o.startswith(img.hex[:n]) for o in others):
                return img.hex[:n]
        raise AssertionError("two images with the same id")


def build_test_store(root: Path) -> TestStore:
    b = StoreBuilder(root)
    base = b.layer(None, _fill_base)
    middle = b.layer(base, _fill_middle)
    top = b.layer(middle, _fill_top)
    web_layer = b.layer(base, _fill_web)
    busybox = b.image(base, config_of(history=["imported"]))
    mid = b.image(middle, config_of(history=["imported", "RUN middle"]), parent=busybox)
    app = b.image(
        top,
        config_of(
            env=["FOO=bar", "GREETING=hello"],
            cmd=APP_CMD,
            workdir="/data",
            user="app",
            history=["imported", "RUN middle", "RUN top"],
        ),
        parent=mid,
    )
    web = b.image(
        web_layer,
        config_of(cmd=["default-arg"], entrypoint=["/bin/echo", "entry"], history=["imported", "COPY www"]),
        parent=busybox,
        prefix=app.hex[:4],
    )
    digest = "sha256:" + hashlib.sha256(b"the manifest of app:latest").hexdigest()
    b.tag(busybox, "busybox:latest")
    b.tag(app, "app:latest", f"app@{digest}")
    b.tag(web, "web:1.0", "web:latest")
    return TestStore(Path(root), busybox, mid, app, web, digest)
