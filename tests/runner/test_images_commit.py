"""``pyoverlay commit``: an upper layer as an OCI layer tar and as a new image.

Real operations on a mount (the KERNEL's overlay, and pyoverlay) over the layers of the
imported 3-layer demo image -- add, modify, delete, ``rm -r`` + ``mkdir`` (an opaque
directory), hard link, symlink, FIFO, xattrs -- then ``commit -o`` must give exactly the
expected tar entries, and ``commit --image`` + a kernel overlay of the new image's layers
must show the same tree as the original mount did. Then the same with real containers.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path

import pytest

from helpers import archives as A
from helpers import snapshot as S
from helpers.containers import describe
from helpers.mounts import KernelOverlay, PyoverlayMount
from runner.images.local import LocalStore

IGNORE = A.IGNORE
cli, ok = A.store_cli, A.store_ok

pytestmark = [pytest.mark.needs_root]


@pytest.fixture
def store(tmp_path) -> Path:
    """A store holding the demo image as demo:1."""
    tars = [A.layer_tar(layer) for layer in A.DEMO]
    store = tmp_path / "store"
    ok(store, "import", A.write_docker_save(tmp_path / "demo.tar", [(tars, [A.DEMO_TAG])]))
    return store


def change(root: Path) -> None:
    """The container's work, through the mount."""
    (root / "new.txt").write_text("new\n")
    os.chmod(root / "new.txt", 0o640)
    os.setxattr(root / "new.txt", "user.x", b"1")
    os.setxattr(root / "new.txt", "trusted.overlay.mine2", b"escaped")  # the user's own
    os.link(root / "new.txt", root / "hl")
    os.symlink("new.txt", root / "sl")
    os.mkfifo(root / "fifo", 0o600)
    (root / "newdir").mkdir()
    (root / "newdir" / "f").write_bytes(b"f" * 10000)
    with open(root / "etc" / "passwd", "a") as f:
        f.write("app:x:1000:1000::/:/bin/sh\n")
    os.chmod(root / "etc" / "secret", 0o640)
    os.unlink(root / "data" / "a.txt")
    os.unlink(root / "bin" / "tool-again")
    shutil.rmtree(root / "data" / "sub")
    (root / "data" / "sub").mkdir()
    (root / "data" / "sub" / "fresh.txt").write_text("fresh\n")


R, LNK, SYM, DIR, FIFO = tarfile.REGTYPE, tarfile.LNKTYPE, tarfile.SYMTYPE, tarfile.DIRTYPE, tarfile.FIFOTYPE

#: (name, type, permission bits, uid, gid, size, link target, xattr names)
EXPECTED = [
    ("./", DIR, 0o755, 0, 0, 0, "", []),
    ("bin/", DIR, 0o755, 0, 0, 0, "", []),
    ("bin/.wh.tool-again", R, 0o600, 0, 0, 0, "", []),
    ("data/", DIR, 0o2775, 0, 100, 0, "", []),  # copied up from the middle layer
    ("data/.wh.a.txt", R, 0o600, 0, 0, 0, "", []),
    ("data/sub/", DIR, 0o2755, 0, 100, 0, "", []),  # setgid inherited from data/
    ("data/sub/.wh..wh..opq", R, 0o755, 0, 100, 0, "", []),
    ("data/sub/fresh.txt", R, 0o644, 0, 100, 6, "", []),
    ("etc/", DIR, 0o755, 0, 0, 0, "", []),
    ("etc/passwd", R, 0o644, 0, 0, 57, "", []),
    ("etc/secret", R, 0o640, 1000, 1000, 7, "", []),
    ("fifo", FIFO, 0o600, 0, 0, 0, "", []),
    ("hl", R, 0o640, 0, 0, 4, "", ["trusted.overlay.mine2", "user.x"]),
    ("new.txt", LNK, 0o640, 0, 0, 0, "hl", []),
    ("newdir/", DIR, 0o755, 0, 0, 0, "", []),
    ("newdir/f", R, 0o644, 0, 0, 10000, "", []),
    ("sl", SYM, 0o777, 0, 0, 0, "new.txt", []),
]


def tar_entries(path: Path) -> list[tuple]:
    out = []
    with tarfile.open(path) as tf:
        for m in tf:
            name = m.name + "/" if m.isdir() and not m.name.endswith("/") else m.name
            name = "./" if name in ("./", "/", "") else name
            xattrs = sorted(k[13:] for k in m.pax_headers if k.startswith("SCHILY.xattr."))
            out.append((name, m.type, m.mode, m.uid, m.gid, m.size, m.linkname, xattrs))
    return out


def check_tar(path: Path, loose=frozenset()) -> None:
    got = tar_entries(path)
    assert [g[0] for g in got] == [w[0] for w in EXPECTED]
    for w, g in zip(EXPECTED, got, strict=True):
        w = tuple(g[i] if (w[0], i) in loose else v for i, v in enumerate(w))
        assert g == w, f"entry {g[0]}: got {g}, want {w}"
    # and no overlay-private xattr anywhere
    with tarfile.open(path) as tf:
        for m in tf:
            for k in m.pax_headers:
                assert not k.startswith(
                    ("SCHILY.xattr.trusted.overlay.o", "SCHILY.xattr.trusted.overlay.i", "SCHILY.xattr.user.overlay.")
                ), (m.name, k)


MOUNTS = {"kernel": KernelOverlay, "pyoverlay": PyoverlayMount}


@pytest.mark.kernel
@pytest.mark.parametrize("kind", ["kernel", pytest.param("pyoverlay", marks=pytest.mark.fuse)])
def test_commit_tar_and_image_round_trip(store, tmp_path, kind):
    img = LocalStore(str(store)).resolve(A.DEMO_TAG)
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    with MOUNTS[kind](img.layers, tmp_path / "m", upper=upper, workdir=work) as m:
        change(m.path)
        before = S.snapshot(m.path)
    # the upper as a layer tar
    ok(store, "commit", upper, "-o", tmp_path / "layer.tar")
    # the same entries on both: a dir made over a whiteout in a setgid dir keeps the
    # setgid bit there (and data/sub/fresh.txt its group), as with the kernel
    check_tar(tmp_path / "layer.tar", frozenset())
    ok(store, "commit", upper, "-o", tmp_path / "again.tar")
    assert (tmp_path / "layer.tar").read_bytes() == (tmp_path / "again.tar").read_bytes(), "not deterministic"
    # and as an image: parent + the layer
    r = ok(store, "commit", upper, "--image", "new:1", "--parent", A.DEMO_TAG)
    new = LocalStore(str(store)).resolve("new:1")
    assert r.stdout.split() == [new.id, "new:1"]
    assert new.layers[1:] == img.layers, "the parent's layers are shared"
    assert new.diff_ids[-1] == A.sha256((tmp_path / "layer.tar").read_bytes())
    assert new.config["history"][-1]["created_by"] == "pyoverlay commit"
    assert new.config["config"] == img.config["config"]
    with KernelOverlay(new.layers, tmp_path / "m2") as m2:
        after = S.snapshot(m2.path)
    diff = S.diff_snapshots(before, after, a_name=f"{kind} mount", b_name="new image", ignore_keys=IGNORE)
    assert not diff, S.format_diff(diff, "the new image's view differs from the committed mount's")


def test_commit_plain_upper_without_parent(tmp_path):
    upper = A.build_layer_dir(A.MIDDLE, tmp_path / "upper")
    store = tmp_path / "store"
    ok(store, "commit", upper, "--image", "solo", "-o", tmp_path / "l.tar")
    img = LocalStore(str(store)).resolve("solo:latest")
    assert len(img.layers) == 1 and img.diff_ids == [A.sha256((tmp_path / "l.tar").read_bytes())]
    diff = S.diff_snapshots(S.snapshot(upper), S.snapshot(img.layers[0]), ignore_keys=IGNORE)
    assert not diff, S.format_diff(diff)
    assert [e[0] for e in tar_entries(tmp_path / "l.tar")] == [
        "./",
        "data/",
        "data/sub/",
        "data/sub/.wh..wh..opq",
        "data/sub/c.txt",
        "etc/",
        "etc/.wh.motd",
    ]


def test_commit_errors(store, tmp_path):
    r = cli(store, "commit", tmp_path)
    assert r.returncode == 2 and "nothing to do" in r.stderr
    r = cli(store, "commit", "no-such-container", "-o", tmp_path / "x.tar")
    assert r.returncode == 1 and "no such container" in r.stderr and not (tmp_path / "x.tar").exists()
    r = cli(store, "commit", tmp_path, "--image", "x:1", "--parent", "nothere:1")
    assert r.returncode == 1 and "no such image" in r.stderr
    up = tmp_path / "up"
    up.mkdir()
    os.setxattr(up, "trusted.overlay.redirect", b"/elsewhere")
    r = cli(store, "commit", up, "-o", tmp_path / "y.tar")
    assert r.returncode == 1 and "redirect" in r.stderr and not (tmp_path / "y.tar").exists()


# --------------------------------------------------------------------------
# real containers
# --------------------------------------------------------------------------


def _busybox_archive(images, tmp_path) -> Path:
    tars = [A.dir_tar(layer) for layer in reversed(images.two_layer.layers)]
    return A.write_docker_save(tmp_path / "bb.tar", [(tars, ["bb:1"])])


def _has_image_option(rt) -> bool:
    return "--image" in rt.cli("run", "--help").stdout


@pytest.mark.fuse
@pytest.mark.usefixtures("_no_leftovers")
def test_commit_container_with_parent(rt, images, tmp_path):
    r = rt.ok("import", _busybox_archive(images, tmp_path))
    bb = LocalStore(str(rt.data / "images")).resolve("bb:1")
    assert r.stdout.split() == [bb.id, "bb:1"]
    upper = tmp_path / "upper"
    script = "echo changed > /changed && rm /app/hello.txt && mkdir -p /etc/new && echo x > /etc/new/f"
    with_image = _has_image_option(rt)
    base = ["--image", "bb:1"] if with_image else [":".join(bb.layers)]
    r = rt.run("--name", "c1", "--upper", upper, *base, "sh", "-c", script)
    assert r.returncode == 0, describe(r)
    r = rt.ok("commit", "c1", "--image", "x:1", "--parent", "bb:1")
    x = LocalStore(str(rt.data / "images")).resolve("x:1")
    assert r.stdout.split() == [x.id, "x:1"] and x.layers[1:] == bb.layers
    run = ["--image", "x:1"] if with_image else [":".join(x.layers)]
    r = rt.run("--rm", *run, "sh", "-c", "cat /changed /etc/new/f; ls /app; test -e /bin/vi || echo no-vi")
    assert r.returncode == 0, describe(r)
    assert r.stdout.split() == ["changed", "x", "run.sh", "no-vi"], describe(r)
    if with_image:  # the record names the image: it is the default parent
        rt.ok("commit", "c1", "--image", "y:1")
        y = LocalStore(str(rt.data / "images")).resolve("y:1")
        assert y.diff_ids == x.diff_ids
    rt.ok("rm", "c1")


@pytest.mark.fuse
@pytest.mark.usefixtures("_no_leftovers")
def test_commit_container_on_plain_dirs(rt, images, tmp_path):
    """No image: the container's lower dirs become the image's base layers."""
    upper = tmp_path / "upper"
    r = rt.run(
        "--name",
        "c2",
        "--upper",
        upper,
        images.two_layer.spec,
        "sh",
        "-c",
        "echo changed > /changed && rm -r /app && mkdir /app && echo n > /app/n",
    )
    assert r.returncode == 0, describe(r)
    r = rt.ok("commit", "c2", "--image", "plain:1")
    img = LocalStore(str(rt.data / "images")).resolve("plain:1")
    assert len(img.layers) == 3
    assert img.config["config"]["Cmd"][:2] == ["sh", "-c"]
    for mine, lower in zip(img.layers[1:], images.two_layer.layers, strict=True):
        diff = S.diff_snapshots(S.snapshot(lower), S.snapshot(mine), ignore_keys=IGNORE)
        assert not diff, S.format_diff(diff, f"{lower} as a layer")
    run = ["--image", "plain:1"] if _has_image_option(rt) else [":".join(img.layers)]
    r = rt.run("--rm", *run, "sh", "-c", "cat /changed; ls /app; test -e /bin/vi || echo no-vi")
    assert r.returncode == 0, describe(r)
    assert r.stdout.split() == ["changed", "n", "no-vi"], describe(r)
    rt.ok("rm", "c2")
