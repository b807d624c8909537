"""``pyoverlay import``: docker save archives and OCI layouts into the local image store.

The 3-layer image of tests/helpers/archives.py is written as (a) a legacy ``docker save``
tar, (b) an OCI layout directory with gzip layers, (c) the same layout as a tar with zstd
layers (and (d) as a gzip'd tar). Every import must give layers in the kernel's format
equal to the layers built directly in that format, and the kernel's overlay of them
must show the expected tree.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from helpers import archives as A
from helpers import snapshot as S
from helpers.containers import describe, pyoverlay_cmd
from helpers.mounts import KernelOverlay, pyoverlay_env
from runner.images import ImageError, NotFound
from runner.images.local import LocalStore
from runner.images.unpack import unpack

pytestmark = [pytest.mark.needs_root]

IGNORE = A.IGNORE
cli, ok = A.store_cli, A.store_ok


def same_tree(a, b, root_times: bool = True) -> list[str]:
    sa, sb = S.snapshot(a), S.snapshot(b)
    if not root_times:
        for s in (sa, sb):
            s["entries"]["."].pop("mtime_ns")
    return S.diff_snapshots(sa, sb, ignore_keys=IGNORE)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The archives, and the expected layer dirs (bottom first)."""
    base = tmp_path_factory.mktemp("demo")
    tars = [A.layer_tar(layer) for layer in A.DEMO]
    forms = {
        "docker-save": A.write_docker_save(base / "legacy.tar", [(tars, [A.DEMO_TAG])]),
        "oci-gzip-dir": A.write_oci_layout(base / "oci-gz", tars, "gzip"),
    }
    A.write_oci_layout(base / "oci-zst", tars, "zstd")
    forms["oci-zstd-tar"] = A.tar_tree(base / "oci-zst", base / "oci-zst.tar")
    forms["oci-zstd-tar.gz"] = A.tar_tree(base / "oci-zst", base / "oci-zst.tar.gz", gzipped=True)
    expected = [A.build_layer_dir(layer, base / f"expected{i}") for i, layer in enumerate(A.DEMO)]
    return {
        "tars": tars,
        "forms": forms,
        "expected": expected,
        "diff_ids": [A.sha256(t) for t in tars],
        "id": A.sha256(A.config_for(tars)),
    }


@pytest.mark.kernel
@pytest.mark.parametrize("form", ["docker-save", "oci-gzip-dir", "oci-zstd-tar", "oci-zstd-tar.gz"])
def test_import_gives_kernel_format_layers(demo, form, tmp_path):
    store = tmp_path / "store"
    r = ok(store, "import", demo["forms"][form])
    assert r.stdout.split() == [demo["id"], A.DEMO_TAG]
    img = LocalStore(str(store)).resolve(A.DEMO_TAG)
    assert img.id == demo["id"] and img.names == [A.DEMO_TAG] and img.source == "local"
    assert img.diff_ids == demo["diff_ids"]
    assert img.layers == [str(store / "layers" / d[7:]) for d in reversed(demo["diff_ids"])]
    assert img.run_config()["Cmd"] == ["/bin/sh"]
    # the kernel's format, spot checks
    base, middle = Path(img.layers[2]), Path(img.layers[1])
    st = os.lstat(middle / "etc" / "motd")
    assert (st.st_mode & 0o170000, st.st_rdev) == (0o020000, 0), "whiteout = char 0/0"
    assert os.getxattr(middle / "data" / "sub", "trusted.overlay.opaque") == b"y"
    assert not any(n.startswith(".wh.") for n in os.listdir(middle / "etc"))
    assert os.stat(base / "bin" / "su").st_mode & 0o7777 == 0o4755
    assert os.getxattr(base / "data" / "sub" / "b.txt", "trusted.overlay.overlay.mine") == b"escaped"
    # every layer equals the one built directly in the kernel's format
    for i, (exp, got) in enumerate(zip(demo["expected"], reversed(img.layers), strict=True)):
        diff = same_tree(exp, got, root_times=(i == 0))
        assert not diff, S.format_diff(diff, f"layer {i} of {form}")
    # and the kernel's overlay of them shows the expected tree
    with (
        KernelOverlay(list(reversed(demo["expected"])), tmp_path / "want") as want,
        KernelOverlay(img.layers, tmp_path / "got") as got,
    ):
        diff = same_tree(want.path, got.path, root_times=False)
        assert not diff, S.format_diff(diff, f"merged view of {form}")
        assert (got.path / "app" / "hello.txt").read_bytes() == b"hello\n" * 1000
        assert not (got.path / "etc" / "motd").exists()
        assert sorted(os.listdir(got.path / "data" / "sub")) == ["c.txt"]


def _layer_ids(store: Path) -> dict[str, tuple]:
    """(inode, mtime) of every layer dir and of one file in it."""
    out = {}
    for d in sorted((store / "layers").iterdir()):
        st = d.stat()
        first = sorted(d.iterdir())[0].lstat()
        out[d.name] = (st.st_ino, st.st_mtime_ns, first.st_ino, first.st_mtime_ns)
    return out


def test_all_forms_share_layers_and_unpack_once(demo, tmp_path):
    store = tmp_path / "store"
    ok(store, "import", demo["forms"]["docker-save"])
    before = _layer_ids(store)
    assert len(before) == 3
    for form in ("docker-save", "oci-gzip-dir", "oci-zstd-tar"):
        r = ok(store, "import", demo["forms"][form])
        assert r.stderr.count("already present") == 3, describe(r)
        assert "unpacked" not in r.stderr
        assert r.stdout.split() == [demo["id"], A.DEMO_TAG]
    assert _layer_ids(store) == before
    s = LocalStore(str(store))
    assert [i.id for i in s.list()] == [demo["id"]]
    # the store is an OCI layout: index -> manifests -> blobs, all present
    index = json.loads((store / "index.json").read_text())
    named = [m for m in index["manifests"] if m.get("annotations")]
    assert [m["annotations"]["org.opencontainers.image.ref.name"] for m in named] == [A.DEMO_TAG]
    for m in index["manifests"]:
        manifest = json.loads((store / "blobs/sha256" / m["digest"][7:]).read_bytes())
        for blob in [manifest["config"], *manifest["layers"]]:
            assert (store / "blobs/sha256" / blob["digest"][7:]).stat().st_size == blob["size"]
    assert json.loads((store / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    assert not list((store / "tmp").iterdir()) if (store / "tmp").exists() else True


def test_tags_and_references(demo, tmp_path):
    store = tmp_path / "store"
    r = ok(store, "import", "--tag", "other/name:2", demo["forms"]["oci-gzip-dir"])
    assert r.stdout.split() == [demo["id"], "other/name:2"]
    s = LocalStore(str(store))
    for ref in ("other/name:2", demo["id"], demo["id"][7:19], demo["id"][7:11]):
        assert s.resolve(ref).id == demo["id"]
    with pytest.raises(NotFound):
        s.resolve(A.DEMO_TAG)
    # re-tagging moves nothing else; the image keeps both names
    ok(store, "import", demo["forms"]["docker-save"])
    assert sorted(s.resolve(demo["id"]).names) == sorted([A.DEMO_TAG, "other/name:2"])
    r = cli(store, "import", "--tag", "BAD NAME", demo["forms"]["docker-save"])
    assert r.returncode == 1 and r.stderr.startswith("pyoverlay: ")


def test_multi_image_archive_symlinked_layer(demo, tmp_path):
    tars = demo["tars"]
    arch = A.write_docker_save(tmp_path / "two.tar", [(tars, [A.DEMO_TAG]), (tars[:1], ["base:1"])])
    store = tmp_path / "store"
    r = ok(store, "import", arch)
    lines = [line.split() for line in r.stdout.splitlines()]
    assert [row[1:] for row in lines] == [[A.DEMO_TAG], ["base:1"]]
    assert r.stderr.count("unpacked") == 3 and r.stderr.count("already present") == 1
    s = LocalStore(str(store))
    assert s.resolve("base:1").layers == s.resolve(A.DEMO_TAG).layers[2:]
    r = cli(store, "import", "--tag", "x:1", arch)
    assert r.returncode == 1 and "exactly one" in r.stderr


def _assert_store_clean(store: Path) -> None:
    """No image, no layer, no leftovers."""
    assert not (store / "index.json").exists()
    assert not list((store / "layers").iterdir()) if (store / "layers").exists() else True
    assert not list((store / "tmp").iterdir()) if (store / "tmp").exists() else True


def test_digest_mismatch_refused(demo, tmp_path):
    tars = demo["tars"]
    # a config whose diff id does not match the layer tar (legacy: checked while unpacking)
    cfg = json.loads(A.config_for(tars))
    cfg["rootfs"]["diff_ids"][1] = A.sha256(b"something else")
    bad = A.write_docker_save(tmp_path / "bad.tar", [(tars, ["bad:1"])], configs=[json.dumps(cfg).encode()])
    store = tmp_path / "store"
    r = cli(store, "import", bad)
    assert r.returncode == 1 and "digest mismatch" in r.stderr, describe(r)
    assert len(r.stderr.strip().splitlines()[-1:]) == 1
    assert not (store / "index.json").exists()
    assert [p.name for p in (store / "layers").iterdir()] == [demo["diff_ids"][0][7:]]  # the good one before
    assert not list((store / "tmp").iterdir())
    # a blob that differs from its digest (OCI)
    store2 = tmp_path / "store2"
    oci = A.write_oci_layout(tmp_path / "oci-bad", tars, "gzip", corrupt_blob=0)
    r = cli(store2, "import", oci)
    assert r.returncode == 1 and ("digest mismatch" in r.stderr or "cannot read" in r.stderr), describe(r)
    _assert_store_clean(store2)
    # a config blob that differs from its digest
    oci = A.write_oci_layout(tmp_path / "oci-bad-cfg", tars, "gzip")
    index = json.loads((oci / "index.json").read_text())
    manifest = json.loads((oci / "blobs/sha256" / index["manifests"][0]["digest"][7:]).read_text())
    (oci / "blobs/sha256" / manifest["config"]["digest"][7:]).write_bytes(b"{}")
    r = cli(tmp_path / "store3", "import", oci)
    assert r.returncode == 1 and "digest mismatch" in r.stderr, describe(r)


@pytest.mark.parametrize("kind", A.EVIL_KINDS)
def test_malicious_layer_refused(kind, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    tar = A.evil_layer(kind, str(outside))
    arch = A.write_docker_save(tmp_path / "evil.tar", [([tar], ["evil:1"])])
    store = tmp_path / "deep" / "er" / "store"
    r = cli(store, "import", arch)
    assert r.returncode == 1, describe(r)
    msg = r.stderr.strip().splitlines()
    assert msg[-1].startswith("pyoverlay: ") and "Traceback" not in r.stderr, describe(r)
    assert any(w in msg[-1] for w in ("refused", "not in the layer", "symlink")), describe(r)
    assert not list(outside.iterdir()), f"{kind}: wrote outside the store"
    _assert_store_clean(store)
    for p in tmp_path.rglob("*"):
        if p.is_file() and not p.is_symlink() and p.name != "evil.tar":
            assert b"pwned" not in p.read_bytes(), f"{kind}: {p} was written"


def test_unpack_rules(tmp_path):
    """Same-layer whiteout + directory, later entries replacing earlier ones, implicit
    parent directories, hard links to earlier entries."""
    entries = [
        A.W("d"),
        A.D("d"),
        A.F("d/x", b"1"),  # .wh.d then d/: d opaque
        A.D("e"),
        A.F("e/y", b"1"),
        A.W("e"),  # e/ then .wh.e: e opaque, kept
        A.F("f", b"old"),
        A.F("f", b"new"),  # replaced
        A.D("g"),
        A.F("g", b"file over dir"),  # a dir replaced by a file
        A.F("deep/er/z", b"implicit parents"),
        A.H("z2", "deep/er/z"),
    ]
    tar = A.layer_tar(entries)
    u = unpack(io.BytesIO(tar), str(tmp_path / "l"), diff_id=A.sha256(tar))
    ldir = tmp_path / "l"
    assert u.diff_id == u.digest == A.sha256(tar) and u.compression == ""
    assert os.getxattr(ldir / "d", "trusted.overlay.opaque") == b"y" and (ldir / "d/x").read_bytes() == b"1"
    assert os.getxattr(ldir / "e", "trusted.overlay.opaque") == b"y" and (ldir / "e/y").exists()
    assert (ldir / "f").read_bytes() == b"new" and (ldir / "g").read_bytes() == b"file over dir"
    assert os.stat(ldir / "deep/er").st_mode & 0o777 == 0o755
    assert os.stat(ldir / "z2").st_ino == os.stat(ldir / "deep/er/z").st_ino
    with pytest.raises(ImageError, match="diff id"):
        unpack(io.BytesIO(tar), str(tmp_path / "m"), diff_id=A.sha256(b"x"))
    assert not (tmp_path / "m").exists()


@pytest.fixture(scope="module")
def big_archive(tmp_path_factory) -> Path:
    """A docker save tar with one 384 MiB layer (384 files of 1 MiB)."""
    base = tmp_path_factory.mktemp("big")
    chunk, layer = os.urandom(1 << 20), base / "layer.tar"
    with tarfile.open(layer, "w") as tf:
        for i in range(384):
            ti = tarfile.TarInfo(f"f{i:03d}")
            ti.size = len(chunk)
            tf.addfile(ti, io.BytesIO(chunk))
    h = hashlib.sha256()
    with open(layer, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    cfg = json.dumps({"rootfs": {"type": "layers", "diff_ids": ["sha256:" + h.hexdigest()]}}).encode()
    cid = A.sha256(cfg)[7:]
    with tarfile.open(base / "big.tar", "w") as tf:
        tf.add(layer, "l1/layer.tar")
        A._add(tf, f"{cid}.json", cfg)
        A._add(
            tf,
            "manifest.json",
            json.dumps([{"Config": f"{cid}.json", "RepoTags": ["big:1"], "Layers": ["l1/layer.tar"]}]).encode(),
        )
    layer.unlink()
    return base / "big.tar"


def _interrupt_import(store: Path, archive: Path, sig: int) -> subprocess.CompletedProcess:
    """Start an import, send *sig* once the layer is partly unpacked."""
    env = pyoverlay_env()
    env["PYOVERLAY_IMAGES_DIR"] = str(store)
    p = subprocess.Popen(
        pyoverlay_cmd() + ["import", str(archive)], env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and p.poll() is None:
        if len(list((store / "tmp").glob("layer-*/f*")) if (store / "tmp").exists() else []) >= 20:
            break
        time.sleep(0.01)
    assert p.poll() is None, "the import finished before it could be interrupted (make the layer bigger)"
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_interrupted_large_import(big_archive, tmp_path, sig):
    """SIGKILL (or Ctrl-C) while a 384 MiB layer is being unpacked: nothing half-done is
    visible, and the next import cleans up and succeeds."""
    store = tmp_path / "store"
    r = _interrupt_import(store, big_archive, sig)
    assert not (store / "index.json").exists()
    assert not list((store / "layers").iterdir())
    with pytest.raises(NotFound):
        LocalStore(str(store)).resolve("big:1")
    if sig == signal.SIGKILL:
        assert list((store / "tmp").iterdir()), "a killed import leaves its work in tmp/ (expected)"
    else:
        assert r.returncode == 130 and "interrupted" in r.stderr, describe(r)
        assert not list((store / "tmp").iterdir()), "Ctrl-C cleans up at once"
    t = time.monotonic()
    ok(store, "import", big_archive)
    print(f"import of 384 MiB: {time.monotonic() - t:.1f}s")
    img = LocalStore(str(store)).resolve("big:1")
    assert len(os.listdir(img.layers[0])) == 384
    assert not list((store / "tmp").iterdir())


def test_concurrent_imports_serialize(demo, tmp_path):
    store = tmp_path / "store"
    env = pyoverlay_env()
    env["PYOVERLAY_IMAGES_DIR"] = str(store)
    procs = [
        subprocess.Popen(
            pyoverlay_cmd() + ["import", str(demo["forms"][f])],
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for f in ("docker-save", "oci-gzip-dir", "oci-zstd-tar", "docker-save")
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sum(err.count("unpacked") for _, err in outs) == 3, outs
    assert LocalStore(str(store)).resolve(A.DEMO_TAG).id == demo["id"]


def test_oci_index_platforms_and_docker_save_names(demo, tmp_path):
    """A nested image index (this host's platform is taken; another platform's blobs may be
    absent), and names from a docker save >= 25 manifest.json next to index.json."""
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    other = "s390x" if arch != "s390x" else "amd64"
    lay = A.write_oci_layout(tmp_path / "oci", demo["tars"], "gzip")
    index = json.loads((lay / "index.json").read_text())
    mdesc = index["manifests"][0]
    mdesc.pop("annotations")
    nested = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {**mdesc, "digest": A.sha256(b"missing"), "platform": {"os": "linux", "architecture": other}},
                {**mdesc, "platform": {"os": "linux", "architecture": arch}},
            ],
        }
    ).encode()
    (lay / "blobs/sha256" / A.sha256(nested)[7:]).write_bytes(nested)
    index["manifests"] = [
        {
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": A.sha256(nested),
            "size": len(nested),
            "annotations": {
                "io.containerd.image.name": "docker.io/library/multi:3",
                "org.opencontainers.image.ref.name": "3",
            },
        }
    ]
    (lay / "index.json").write_text(json.dumps(index))
    store = tmp_path / "store"
    r = ok(store, "import", lay)
    assert r.stdout.split() == [demo["id"], "multi:3"]
    manifest = json.loads((lay / "blobs/sha256" / mdesc["digest"][7:]).read_text())
    (lay / "manifest.json").write_text(
        json.dumps(
            [
                {
                    "Config": "blobs/sha256/" + manifest["config"]["digest"][7:],
                    "RepoTags": ["saved:25"],
                    "Layers": ["blobs/sha256/" + desc["digest"][7:] for desc in manifest["layers"]],
                }
            ]
        )
    )
    r = ok(store, "import", lay)
    assert r.stdout.split() == [demo["id"], "saved:25"]
    assert sorted(LocalStore(str(store)).resolve("saved:25").names) == ["multi:3", "saved:25"]
