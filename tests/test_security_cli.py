"""Issue 13, the "Low" items of the command line: JSON of the wrong shape in an archive,
``umount`` of a mount that is not pyoverlay's, a compressed archive streamed (not copied
into the store's tmp/), a positional lower whose name has a backslash.

Real archives, real imports into a store, real mounts (a tmpfs, a kernel overlay, a
pyoverlay mount); each test failed on f323dfb.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from helpers import archives as A
from helpers.containers import describe, pyoverlay_cmd
from helpers.mounts import mounts_under, pyoverlay_env
from overlayfs_py.unmount import unmount

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount, import as root)")


def cli(*args, env=None, timeout=120) -> subprocess.CompletedProcess:
    e = pyoverlay_env()
    e.update(env or {})
    return subprocess.run(
        pyoverlay_cmd() + [str(a) for a in args], env=e, capture_output=True, text=True, timeout=timeout
    )


def assert_one_line_error(r, code=1, *words):
    assert r.returncode == code, describe(r)
    assert "Traceback" not in r.stderr, describe(r)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyoverlay: "), describe(r)
    for w in words:
        assert w in lines[0], describe(r)


# --------------------------------------------------------------------------
# JSON of the wrong shape in an archive
# --------------------------------------------------------------------------


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


LAYER = A.layer_tar([A.F("hello", b"hi\n")])
CONFIG = A.config_for([LAYER])
CFG_NAME = _digest(CONFIG)[7:] + ".json"


def _legacy(manifest) -> dict[str, bytes]:
    return {"manifest.json": json.dumps(manifest).encode(), CFG_NAME: CONFIG, "l1/layer.tar": LAYER}


def _oci(index=None, manifest=None, config=CONFIG) -> dict[str, bytes]:
    files = {"oci-layout": b'{"imageLayoutVersion": "1.0.0"}'}

    def put(data: bytes) -> str:
        files["blobs/sha256/" + _digest(data)[7:]] = data
        return _digest(data)

    layer = put(LAYER)
    cfg = put(config)
    if manifest is None:
        manifest = {
            "schemaVersion": 2,
            "config": {"digest": cfg, "size": len(config)},
            "layers": [{"digest": layer, "size": len(LAYER), "mediaType": "application/vnd.oci.image.layer.v1.tar"}],
        }
    m = json.dumps(manifest).encode()
    md = put(m)
    if index is None:
        index = {"schemaVersion": 2, "manifests": [{"digest": md, "size": len(m)}]}
    elif callable(index):
        index = index(md, len(m))
    files["index.json"] = json.dumps(index).encode()
    return files


BAD_ARCHIVES = {
    "manifest-list-of-string": _legacy(["a"]),
    "manifest-list-of-null": _legacy([None]),
    "manifest-object": _legacy({"Config": 5}),
    "manifest-config-int": _legacy([{"Config": 5}]),
    "manifest-layers-int": _legacy([{"Config": CFG_NAME, "Layers": 5}]),
    "manifest-layer-path-int": _legacy([{"Config": CFG_NAME, "Layers": [5]}]),
    "manifest-repotags-int": _legacy([{"Config": CFG_NAME, "RepoTags": [5], "Layers": ["l1/layer.tar"]}]),
    "index-list": _oci(index=[]),
    "index-manifests-int": _oci(index={"manifests": 5}),
    "index-manifests-of-int": _oci(index={"manifests": [5]}),
    "index-annotations-int": _oci(index=lambda d, n: {"manifests": [{"digest": d, "size": n, "annotations": 5}]}),
    "index-digest-int": _oci(index={"manifests": [{"digest": 5}]}),
    "blob-config-int": _oci(manifest={"config": 5, "layers": []}),
    "blob-layers-of-int": _oci(manifest={"config": {"digest": _digest(CONFIG)}, "layers": [5]}),
    "blob-nested-index-int": _oci(manifest={"manifests": 5}),
    "config-list": _oci(config=b"[1, 2]"),
}


def _write(files: dict[str, bytes], dest: Path, form: str) -> Path:
    if form == "dir":
        for name, data in files.items():
            p = dest / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        return dest
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    data = gzip.compress(buf.getvalue()) if form == "tar.gz" else buf.getvalue()
    out = dest.with_suffix("." + form)
    out.write_bytes(data)
    return out


@pytest.mark.parametrize("form", ["dir", "tar", "tar.gz"])
@pytest.mark.parametrize("case", sorted(BAD_ARCHIVES))
def test_wrong_json_shape_is_one_line_error(case, form, tmp_path):
    arch = _write(BAD_ARCHIVES[case], tmp_path / "arch", form)
    store = tmp_path / "store"
    r = cli("import", arch, env={"PYOVERLAY_IMAGES_DIR": str(store)})
    assert_one_line_error(r, 1)
    assert not (store / "index.json").exists()


def test_wrong_json_shape_in_the_store_is_one_line_error(tmp_path):
    """The store's own index.json of the wrong shape: `images` says so in one line."""
    store = tmp_path / "store"
    store.mkdir(mode=0o700)
    for doc in ([], {"manifests": 5}):
        (store / "index.json").write_text(json.dumps(doc))
        r = cli("images", env={"PYOVERLAY_IMAGES_DIR": str(store)})
        assert_one_line_error(r, 1, "index.json")


# --------------------------------------------------------------------------
# a compressed archive is streamed
# --------------------------------------------------------------------------


@needs_root
def test_compressed_archive_is_not_copied_into_tmp(tmp_path):
    """A 24 MiB layer in a gzip'd docker save archive, imported into a store on a 56 MiB
    tmpfs: the store keeps the blob (24 MiB) and the unpacked layer (24 MiB); a copy of the
    decompressed archive in tmp/ (another 24 MiB, f323dfb) does not fit."""
    big = A.layer_tar([A.F("zeros", bytes(24 << 20))])
    raw = A.write_docker_save(tmp_path / "big.tar", [([big], ["big:1"])])
    gz = tmp_path / "big.tar.gz"
    with open(raw, "rb") as src, gzip.open(gz, "wb", compresslevel=1) as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    raw.unlink()
    store = tmp_path / "store"
    store.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=56m,mode=0700", "none", str(store)], check=True)
    try:
        r = cli("import", gz, env={"PYOVERLAY_IMAGES_DIR": str(store)})
        assert r.returncode == 0, describe(r)
        assert r.stdout.split()[1:] == ["big:1"], describe(r)
        assert not list((store / "tmp").iterdir())
    finally:
        subprocess.run(["umount", str(store)], check=True)


def test_compressed_docker_save_with_shared_layers(tmp_path):
    """Two images sharing a layer (a symlinked layer.tar, as docker save writes it), gzip'd:
    read in one pass, each layer unpacked once."""
    base = A.layer_tar([A.F("base", b"b\n")])
    top = A.layer_tar([A.F("top", b"t\n")])
    raw = A.write_docker_save(tmp_path / "two.tar", [([base], ["one:1"]), ([base, top], ["two:1"])])
    gz = tmp_path / "two.tar.gz"
    gz.write_bytes(gzip.compress(raw.read_bytes()))
    store = tmp_path / "store"
    r = cli("import", gz, env={"PYOVERLAY_IMAGES_DIR": str(store)})
    assert r.returncode == 0, describe(r)
    assert r.stderr.count("(unpacked)") == 2 and r.stderr.count("(already present)") == 1, describe(r)
    assert sorted(line.split()[1] for line in r.stdout.splitlines()) == ["one:1", "two:1"]
    assert len(os.listdir(store / "layers")) == 2


# --------------------------------------------------------------------------
# umount: only pyoverlay's mounts
# --------------------------------------------------------------------------


def _mounted(path: Path) -> bool:
    return str(path) in mounts_under(str(path))


@needs_root
@pytest.mark.parametrize("kind", ["tmpfs", "overlay"])
def test_umount_refuses_a_mount_that_is_not_pyoverlays(kind, tmp_path):
    target = tmp_path / "m"
    target.mkdir()
    if kind == "tmpfs":
        cmd = ["mount", "-t", "tmpfs", "none", str(target)]
    else:
        for d in ("lower", "upper", "work"):
            (tmp_path / d).mkdir()
        cmd = [
            "mount",
            "-t",
            "overlay",
            "overlay",
            "-o",
            f"lowerdir={tmp_path / 'lower'},upperdir={tmp_path / 'upper'},workdir={tmp_path / 'work'}",
            str(target),
        ]
    subprocess.run(cmd, check=True)
    try:
        r = cli("umount", target)
        assert_one_line_error(r, 1, "not a pyoverlay mount")
        assert _mounted(target), "pyoverlay umount unmounted a mount that is not pyoverlay's"
    finally:
        while _mounted(target):
            subprocess.run(["umount", str(target)], check=True)


# --------------------------------------------------------------------------
# a positional lower with a backslash in its name
# --------------------------------------------------------------------------


@pytest.mark.fuse
@pytest.mark.parametrize("how", ["positional", "-o lowerdir"])
def test_lower_with_a_backslash_in_its_name(how, tmp_path):
    lower = tmp_path / "a\\b"  # a directory named  a\b
    lower.mkdir()
    (lower / "marker").write_text("literal\n")
    (tmp_path / "ab").mkdir()  # what an escape would read it as
    (tmp_path / "ab" / "marker").write_text("escaped\n")
    merged = tmp_path / "m"
    merged.mkdir()
    if how == "positional":
        r = cli("mount", lower, merged)
    else:  # the kernel's form keeps the kernel's escapes: \\ is one backslash
        r = cli("mount", "-o", "lowerdir=" + str(lower).replace("\\", "\\\\"), merged)
    assert r.returncode == 0, describe(r)
    try:
        assert (merged / "marker").read_text() == "literal\n"
    finally:
        u = cli("umount", merged)
        assert u.returncode == 0, describe(u)


# --------------------------------------------------------------------------
# an unusable state dir: one line, and nothing left mounted
# --------------------------------------------------------------------------


@pytest.mark.fuse
@pytest.mark.parametrize("kind", ["file", "world-writable"])
def test_mount_with_an_unusable_state_dir(kind, tmp_path):
    """f323dfb mounted first, then failed to record the mount (a traceback in the server)
    and left the mount behind; a world-writable state dir was used as it was."""
    bad = tmp_path / "state"
    if kind == "file":
        bad.write_text("")
    else:
        bad.mkdir()
        os.chmod(bad, 0o777)
    lower, merged = tmp_path / "l", tmp_path / "m"
    lower.mkdir()
    merged.mkdir()
    r = cli("mount", lower, merged, env={"PYOVERLAY_STATE_DIR": str(bad)})
    try:
        assert not _mounted(merged), "a mount was left behind\n" + describe(r)
        assert_one_line_error(r, 1, str(bad))
    finally:
        while _mounted(merged):
            unmount(str(merged))


@pytest.mark.parametrize(
    "spec,want",
    [
        ("a\\b", ["a\\b"]),  # a backslash is literal
        ("a\\b:c", ["a\\b", "c"]),
        ("a\\\\b", ["a\\\\b"]),  # two backslashes stay two
        ("a\\:b:c", ["a:b", "c"]),  # the one escape: a colon in a name
        ("x\\", ["x\\"]),  # a trailing backslash is a name's last character
    ],
)
def test_positional_lowers_split(spec, want):
    from overlayfs_py.config import split_lowerdir, split_positional_lowers

    assert split_positional_lowers(spec) == want
    if spec == "a\\b":
        assert split_lowerdir(spec) == ["ab"], "the -o lowerdir= form keeps the kernel's escapes"
