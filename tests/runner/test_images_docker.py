"""Images from a Docker overlay2 store: resolution, ``pyoverlay images``, ``mount --image``
and ``run --image`` (docs/images.md).

The store is built by ``tests/helpers/dockerstore.py`` in dockerd's format (3 images
sharing a busybox base layer, an untagged parent image, a whiteout and an opaque
directory, two ids with the same 4-digit prefix). Every test checks that the store is
byte-for-byte unchanged afterwards (``ds``). The last test builds an image with a real
dockerd (skipped when docker is not installed) and reads its store the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import dockerd, dockerstore, mounts, rootfs
from helpers.containers import describe
from helpers.snapshot import diff_snapshots, format_diff, snapshot
from runner.images import Image, ImageError, NotFound
from runner.images.docker import DockerStore, chain_ids
from runner.spec import SpecError, apply_image

pytestmark = [pytest.mark.needs_root]

DOT_KEYS = ("dot_d_ino", "dotdot_d_ino")


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dockerstore.TestStore:
    return dockerstore.build_test_store(tmp_path_factory.mktemp("dockerstore") / "docker")


@pytest.fixture
def ds(store):
    """The test store, checked unchanged (names, modes, times, contents, xattrs) after."""
    before = snapshot(store.root)
    yield store
    diff = diff_snapshots(before, snapshot(store.root), a_name="before", b_name="after")
    assert not diff, format_diff(diff, "the Docker store was written to:")


def one_line_error(r, code: int, *words: str) -> str:
    assert r.returncode == code, describe(r)
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("pyoverlay: "), describe(r)
    for w in words:
        assert w in err[0], f"{w!r} not in the message\n{describe(r)}"
    return err[0]


# --------------------------------------------------------------------------
# resolution (in process)
# --------------------------------------------------------------------------


def test_chain_ids_of_a_real_dockerd_build():
    """Diff ids and chain ids as dockerd 20.10 recorded them for a 3-layer build."""
    diffs = [
        "sha256:6601644591dd5f8f287d6a98a0f458f226c2d0d0f777325aeaf7d6d2eeccf26c",
        "sha256:572b073349ca1df21371ef1174099505a7a23294fa4c943e154abf83991ad57b",
        "sha256:06941a73054865f042652063f403c497771ef294698238d11bcdab7362ce474c",
    ]
    assert chain_ids(diffs) == [
        "sha256:6601644591dd5f8f287d6a98a0f458f226c2d0d0f777325aeaf7d6d2eeccf26c",
        "sha256:470c310536fc0695a3f12f9d741207ed34e2d8b27c44ecbcb9016faea55eba6e",
        "sha256:fb8f55c15cb81c972b45876cd06f241c4bb650462c8831b48f5cbd0d5a2d7bf3",
    ]
    assert chain_ids(diffs) == dockerstore.chain_ids(diffs)


def test_apply_image_is_dockers_merge():
    rc = {"Cmd": ["sh", "-c", "x"], "Entrypoint": None, "Env": ["A=1", "B=2"], "WorkingDir": "/srv", "User": "app"}
    assert apply_image(rc, [], [], None, None) == (["sh", "-c", "x"], ["A=1", "B=2"], "/srv", "app")
    assert apply_image(rc, ["ls"], ["B=3"], "/tmp", "0") == (["ls"], ["A=1", "B=2", "B=3"], "/tmp", "0")
    rc.update(Entrypoint=["/init"], Cmd="old-style string", WorkingDir="", User="")
    assert apply_image(rc, [], [], None, None) == (["/init", "old-style string"], ["A=1", "B=2"], "/", None)
    assert apply_image(rc, ["a"], [], None, None)[0] == ["/init", "a"]
    with pytest.raises(SpecError, match="no command specified"):
        apply_image({"Cmd": [], "Entrypoint": None, "Env": [], "WorkingDir": "", "User": ""}, [], [], None, None)


APP_FORMS = [
    "app",
    "app:latest",
    "docker.io/library/app:latest",
    "library/app",
    "index.docker.io/library/app",
    "@DIGEST",
    "sha256:@ID",
    "@ID",
    "@PREFIX",
    "sha256:@PREFIX",
    "@ID12",
]


@pytest.mark.parametrize("form", APP_FORMS)
def test_every_reference_form_resolves(ds, form):
    ref = (
        form.replace("@DIGEST", f"app@{ds.app_digest}")
        .replace("@ID12", ds.app.hex[:12])
        .replace("@ID", ds.app.hex)
        .replace("@PREFIX", ds.unique_prefix(ds.app))
    )
    img = DockerStore(str(ds.root)).resolve(ref)
    assert isinstance(img, Image)
    assert img.id == ds.app.id
    assert img.layers == ds.app.diff_dirs_top_first  # TOP first
    assert img.diff_ids == [layer.diff_id for layer in ds.app.layers]  # bottom first
    assert img.names == ["app:latest"]
    assert img.source == "docker"
    assert img.size == sum(dockerstore.tree_size(layer.diff) for layer in ds.app.layers)
    assert img.run_config() == {
        "Cmd": dockerstore.APP_CMD,
        "Entrypoint": [],
        "Env": [dockerstore.PATH_ENV, "FOO=bar", "GREETING=hello"],
        "WorkingDir": "/data",
        "User": "app",
        "ExposedPorts": {},
    }


def test_tags_of_one_image_and_an_untagged_parent(ds):
    s = DockerStore(str(ds.root))
    a, b = s.resolve("web:1.0"), s.resolve("web")
    assert a.id == b.id == ds.web.id and a.names == ["web:1.0", "web:latest"]
    assert a.layers == ds.web.diff_dirs_top_first and len(a.layers) == 2
    assert a.layers[-1] == s.resolve("busybox").layers[0]  # the shared base layer
    mid = s.resolve(ds.unique_prefix(ds.mid))
    assert mid.id == ds.mid.id and mid.names == [] and len(mid.layers) == 2


@pytest.mark.parametrize(
    "ref",
    ["nope", "app:nope", "busybox:1", "ffff0000", "sha256:ffff0000", "app@sha256:" + "0" * 64, "sha256:" + "f" * 64],
)
def test_unknown_is_not_found(ds, ref):
    with pytest.raises(NotFound) as e:
        DockerStore(str(ds.root)).resolve(ref)
    assert "\n" not in str(e.value) and "no such image" in str(e.value)


def test_ambiguous_prefix(ds):
    with pytest.raises(ImageError) as e:
        DockerStore(str(ds.root)).resolve(ds.app.hex[:4])
    assert not isinstance(e.value, NotFound)
    assert "ambiguous" in str(e.value) and ds.app.hex[:12] in str(e.value)
    assert ds.web.hex[:12] in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("ref", ["Bad Name", "UPPER", "app:", "app@sha256:123", ""])
def test_invalid_reference(ds, ref):
    with pytest.raises(ImageError) as e:
        DockerStore(str(ds.root)).resolve(ref)
    assert not isinstance(e.value, NotFound)


def test_list(ds):
    s = DockerStore(str(ds.root))
    imgs = s.list()
    assert s.problems == []
    by_id = {i.id: i for i in imgs}
    assert set(by_id) == {ds.busybox.id, ds.app.id, ds.web.id}, "the untagged parent is hidden"
    assert by_id[ds.web.id].names == ["web:1.0", "web:latest"]
    assert [len(by_id[i.id].layers) for i in (ds.busybox, ds.app, ds.web)] == [1, 3, 2]


def test_concurrent_readers(ds):
    s = DockerStore(str(ds.root))
    got, errors = [], []

    def work():
        try:
            for _ in range(20):
                got.append(s.resolve("app").layers)
                got.append(s.resolve("web:1.0").layers)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert {tuple(x) for x in got} == {tuple(ds.app.diff_dirs_top_first), tuple(ds.web.diff_dirs_top_first)}


# --------------------------------------------------------------------------
# a damaged store: ImageError naming the file, never NotFound, never a traceback
# --------------------------------------------------------------------------


def _damage(store, root: Path, how: str) -> str:
    """Damage the copy at *root*; returns the path the message must name."""
    app = store.app
    ldb = root / "image/overlay2/layerdb/sha256" / app.layers[1].chain_id.removeprefix("sha256:")
    diff = root / "overlay2" / app.layers[2].cache_id / "diff"
    cfg = root / "image/overlay2/imagedb/content/sha256" / app.hex
    repos = root / "image/overlay2/repositories.json"
    if how == "no-cache-id":
        (ldb / "cache-id").unlink()
        return str(ldb / "cache-id")
    if how == "bad-cache-id":
        (ldb / "cache-id").write_text("../../../etc")
        return str(ldb / "cache-id")
    if how == "config-digest":
        cfg.write_bytes(cfg.read_bytes() + b" ")
        return str(cfg)
    if how == "no-config":
        cfg.unlink()
        return str(cfg)
    if how == "no-diff-dir":
        subprocess.run(["rm", "-rf", str(diff)], check=True)
        return str(diff)
    if how == "diff-symlink":
        subprocess.run(["rm", "-rf", str(diff)], check=True)
        os.symlink("/", diff)
        return str(diff)
    if how == "layerdb-diff":
        (ldb / "diff").write_text("sha256:" + "0" * 64)
        return str(ldb / "diff")
    if how == "repositories-symlink":
        os.rename(repos, root / "elsewhere.json")
        os.symlink(root / "elsewhere.json", repos)
        return str(repos)
    if how == "layerdb-symlink":
        os.rename(ldb, root / "moved-chain")
        os.symlink(root / "moved-chain", ldb)
        return str(root / "image/overlay2/layerdb/sha256")
    raise AssertionError(how)


DAMAGES = [
    "no-cache-id",
    "bad-cache-id",
    "config-digest",
    "no-config",
    "no-diff-dir",
    "diff-symlink",
    "layerdb-diff",
    "repositories-symlink",
    "layerdb-symlink",
]


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_store(ds, tmp_path, how):
    root = tmp_path / "docker"
    subprocess.run(["cp", "-a", str(ds.root), str(root)], check=True)
    named = _damage(ds, root, how)
    with pytest.raises(ImageError) as e:
        DockerStore(str(root)).resolve("app:latest")
    msg = str(e.value)
    assert not isinstance(e.value, NotFound), msg
    assert "\n" not in msg and named in msg, f"{msg!r} should name {named}"
    s = DockerStore(str(root))
    if how == "repositories-symlink":  # nothing can be listed
        with pytest.raises(ImageError, match="symlink"):
            s.list()
        return
    # the other images are still listed; the damaged one is reported
    listed = {i.id for i in s.list()}
    assert ds.web.id in listed and ds.app.id not in listed
    assert any(named in p for p in s.problems), s.problems


# --------------------------------------------------------------------------
# pyoverlay images
# --------------------------------------------------------------------------


def _table(text: str) -> list[list[str]]:
    rows = [line.split() for line in text.splitlines() if line.strip()]
    assert rows[0] == ["REPOSITORY:TAG", "IMAGE", "ID", "LAYERS", "SIZE", "SOURCE"], text
    return rows[1:]


@pytest.mark.parametrize("how", ["option", "env"])
def test_images_command(ds, rt, how):
    args, env = (
        (["--docker-root", str(ds.root)], None) if how == "option" else ([], {"PYOVERLAY_DOCKER_ROOT": str(ds.root)})
    )
    r = rt.ok("images", *args, env=env)
    rows = {row[0]: row[1:] for row in _table(r.stdout)}
    assert set(rows) == {"busybox:latest", "app:latest", "web:1.0", "web:latest"}, r.stdout
    assert rows["app:latest"][:2] == [ds.app.hex[:12], "3"]
    assert rows["web:1.0"][:2] == rows["web:latest"][:2] == [ds.web.hex[:12], "2"]
    assert rows["busybox:latest"][:2] == [ds.busybox.hex[:12], "1"]
    assert all(v[-1] == "docker" and v[2].endswith("MB") for v in rows.values()), r.stdout

    q = rt.ok("images", "-q", *args, env=env).stdout.split()
    assert sorted(q) == sorted({ds.app.hex[:12], ds.web.hex[:12], ds.busybox.hex[:12]})

    data = json.loads(rt.ok("images", "--json", *args, env=env).stdout)
    app = next(d for d in data if d["id"] == ds.app.id)
    assert app["names"] == ["app:latest"] and app["source"] == "docker"
    assert app["layers"] == ds.app.diff_dirs_top_first
    assert app["config"]["WorkingDir"] == "/data"


def test_images_bad_docker_root(ds, rt, tmp_path):
    one_line_error(rt.cli("images", "--docker-root", tmp_path / "nope"), 1, "not a Docker data root")


# --------------------------------------------------------------------------
# pyoverlay mount --image
# --------------------------------------------------------------------------


class ImageMount(mounts.PyoverlayMount):
    """``pyoverlay mount --foreground --image REF --docker-root ROOT [UPPER] MERGED``."""

    def __init__(self, ref: str, docker_root, mountpoint, upper=None, **kw):
        super().__init__([], mountpoint, upper=upper, **kw)
        self.ref, self.docker_root = ref, docker_root

    def argv(self) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "pyoverlay_cli",
            "mount",
            "--foreground",
            "--image",
            self.ref,
            "--docker-root",
            str(self.docker_root),
        ]
        return argv + ([str(self.upper)] if self.upper else []) + [str(self.mountpoint)]


def assert_same_as_kernel(layers: list[str], ref: str, docker_root, tmp_path: Path) -> dict:
    """The merged view of ``mount --image REF`` equals a kernel overlay of *layers*."""
    with mounts.KernelOverlay(layers, tmp_path / "kernel"):
        ks = snapshot(tmp_path / "kernel")
    with ImageMount(ref, docker_root, tmp_path / "pyoverlay") as m:
        ps = snapshot(tmp_path / "pyoverlay")
        m.check_alive()
    diff = diff_snapshots(ks, ps, a_name="kernel", b_name="pyoverlay", ignore_keys=DOT_KEYS)
    assert not diff, format_diff(diff, f"mount --image {ref} differs from the kernel overlay:")
    return ks["entries"]


@pytest.mark.fuse
@pytest.mark.kernel
@pytest.mark.parametrize("name", ["app", "web"])
def test_mount_image_equals_kernel_overlay(ds, tmp_path, name):
    img = getattr(ds, name)
    entries = assert_same_as_kernel(img.diff_dirs_top_first, f"{name}:latest", ds.root, tmp_path)
    if name == "app":
        assert "bin/vi" not in entries and "bin/sh" in entries  # whiteout (middle)
        assert "data/a.txt" not in entries and "data/keep.txt" in entries  # whiteout (top)
        assert sorted(p for p in entries if p.startswith("data/sub/")) == ["data/sub/c.txt"]
        assert "app/run.sh" in entries and "srv" not in entries


@pytest.mark.fuse
def test_mount_image_with_upper(ds, tmp_path):
    upper = tmp_path / "upper"
    upper.mkdir()
    with ImageMount("app", ds.root, tmp_path / "m", upper=upper):
        m = tmp_path / "m"
        assert (m / "etc" / "motd").read_bytes() == dockerstore.TOP_MOTD
        (m / "data" / "new.txt").write_text("x\n")
        os.unlink(m / "etc" / "motd")
        assert sorted(os.listdir(m / "data" / "sub")) == ["c.txt"]
    assert (upper / "data" / "new.txt").read_text() == "x\n"
    assert os.stat(upper / "etc" / "motd").st_rdev == 0  # a whiteout, in OUR upper


@pytest.mark.parametrize(
    "args,words",
    [
        (["--image", "nope", "{m}"], ["no such image", "nope"]),
        (["--image", "@AMBIGUOUS", "{m}"], ["ambiguous"]),
        (["--image", "app", "a", "b", "{m}"], ["usage"]),
        (["--docker-root", "{root}", "{m}"], ["--docker-root needs --image"]),
        (["--image", "app", "-o", "lowerdir=/tmp", "{m}"], ["lowerdir"]),
    ],
)
def test_mount_image_errors(ds, rt, tmp_path, args, words):
    (tmp_path / "m").mkdir()
    fill = {"{m}": str(tmp_path / "m"), "{root}": str(ds.root), "@AMBIGUOUS": ds.app.hex[:4]}
    argv = [fill.get(a, a) for a in args]
    if "--docker-root" not in argv:
        argv = ["--docker-root", str(ds.root)] + argv
    one_line_error(rt.cli("mount", *argv), 2, *words)
    assert not mounts.is_mounted(tmp_path / "m")


# --------------------------------------------------------------------------
# pyoverlay run --image
# --------------------------------------------------------------------------


def run_out(rt, ds, *args) -> str:
    r = rt.run("--rm", "--docker-root", ds.root, *args)
    assert r.returncode == 0, describe(r)
    return r.stdout.strip()


@pytest.mark.usefixtures("_no_leftovers")
@pytest.mark.fuse
def test_run_image_defaults(ds, rt):
    """Cmd, Env, WorkingDir and User from the image config (docker's defaults)."""
    assert run_out(rt, ds, "--image", "app") == "cmd FOO=bar GREETING=hello pwd=/data uid=1000"
    # Entrypoint + Cmd, and Entrypoint + the given CMD
    assert run_out(rt, ds, "--image", "web:1.0") == "entry default-arg"
    assert run_out(rt, ds, "--image", "web", "a", "b") == "entry a b"
    assert run_out(rt, ds, "--image", ds.unique_prefix(ds.web), "--", "-n") == "entry -n"


@pytest.mark.usefixtures("_no_leftovers")
@pytest.mark.fuse
def test_run_image_overrides(ds, rt):
    script = 'echo "$FOO $GREETING $(pwd) $(id -u) $PATH"'
    assert (
        run_out(rt, ds, "-e", "FOO=baz", "-w", "/tmp", "-u", "0", "--image", "app", "sh", "-c", script)
        == f"baz hello /tmp 0 {dockerstore.PATH_ENV[5:]}"
    )
    # a CMD replaces the image's Cmd; Env/WorkingDir/User still come from the image
    assert run_out(rt, ds, "--image", "app", "sh", "-c", script) == f"bar hello /data 1000 {dockerstore.PATH_ENV[5:]}"
    assert run_out(rt, ds, "--image", "busybox", "echo", "hi") == "hi"


@pytest.mark.usefixtures("_no_leftovers")
@pytest.mark.fuse
def test_run_image_is_recorded(ds, rt):
    r = rt.run("--name", "imgrec", "--docker-root", ds.root, "--image", "web")
    assert r.returncode == 0, describe(r)
    c = rt.find("imgrec")
    assert c["image"] == {"ref": "web", "id": ds.web.id, "source": "docker"}, c
    assert c["layers"] == ds.web.diff_dirs_top_first
    rt.ok("rm", "imgrec")


@pytest.mark.usefixtures("_no_leftovers")
@pytest.mark.parametrize(
    "args,words",
    [
        (["--image", "nope"], ["no such image"]),
        (["--image", "@AMBIGUOUS", "true"], ["ambiguous"]),
        (["--image", "busybox"], ["no command specified"]),
        (["--image", "app", "-w", "relative"], ["working directory"]),
    ],
)
def test_run_image_errors_are_125(ds, rt, args, words):
    argv = [ds.app.hex[:4] if a == "@AMBIGUOUS" else a for a in args]
    one_line_error(rt.run("--rm", "--docker-root", ds.root, *argv), 125, *words)
    assert rt.state_entries() == [] and rt.data_entries() == [] and rt.mounts() == []


def test_run_docker_root_without_image_is_125(ds, rt, images):
    one_line_error(rt.run("--docker-root", ds.root, images.bare.spec, "true"), 125, "--docker-root needs --image")
    one_line_error(rt.run("--rm"), 125, "no layers given")


# --------------------------------------------------------------------------
# reference: a store written by a real dockerd
# --------------------------------------------------------------------------

DOCKERFILE = """\
FROM pyo-busybox:test
RUN mkdir -p /data/sub/deep && echo one > /data/a.txt && echo two > /data/sub/b.txt \\
    && echo deep > /data/sub/deep/x && echo keep > /data/keep.txt && rm /bin/vi \\
    && echo hello > /etc/motd
RUN rm -rf /data/sub && mkdir /data/sub && echo new > /data/sub/c.txt && rm /data/a.txt
ENV FOO=bar
WORKDIR /data
USER app
CMD ["sh", "-c", "echo \\"FOO=$FOO pwd=$(pwd) uid=$(id -u)\\""]
"""


@pytest.mark.fuse
@pytest.mark.kernel
@pytest.mark.usefixtures("_no_leftovers")
@pytest.mark.timeout(120)
def test_real_dockerd_store(rt, tmp_path):
    """docker import + docker build (a whiteout, an opaque dir, ENV/WORKDIR/USER/CMD) with a
    private dockerd; then, with the daemons stopped, the image resolved through
    DockerStore mounts like the kernel overlay of its diffs and runs with its config."""
    missing = dockerd.missing_binaries()
    if missing:
        pytest.skip(f"docker is not installed here (missing: {', '.join(missing)}; scripts/setup installs docker.io)")
    t0 = time.monotonic()
    base = tmp_path / "d"
    base.mkdir()
    rootfs.build_busybox_rootfs(base / "rootfs")
    (base / "ctx").mkdir()
    (base / "ctx" / "Dockerfile").write_text(DOCKERFILE)
    timings = {}
    try:
        with dockerd.LiveDocker(base) as d:
            timings["start"] = time.monotonic() - t0
            tar = subprocess.run(["tar", "-C", str(base / "rootfs"), "-c", "."], check=True, capture_output=True).stdout
            d.docker("import", "-c", 'CMD ["/bin/sh"]', "-", "pyo-busybox:test", input=tar)
            d.docker("build", "-q", "--network", "none", "-t", "pyo-layered:test", base / "ctx")
            want_id = d.docker("image", "inspect", "-f", "{{.Id}}", "pyo-layered:test").stdout.decode().strip()
            timings["build"] = time.monotonic() - t0 - timings["start"]
            t1 = time.monotonic()
        timings["stop"] = time.monotonic() - t1
    except dockerd.Unavailable as e:
        pytest.skip(f"no live dockerd: {e}")
    root = base / "docker"
    assert not mounts.mounts_under(base), "dockerd left mounts"

    before = snapshot(root / "overlay2")
    img = DockerStore(str(root)).resolve("pyo-layered:test")
    assert img.id == want_id and len(img.layers) == 3
    with open(root / "image/overlay2/imagedb/content/sha256" / want_id[7:], "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == want_id[7:]
    top, middle, _base = (Path(p) for p in img.layers)
    assert os.stat(middle / "bin" / "vi", follow_symlinks=False).st_rdev == 0  # real whiteout
    assert os.getxattr(top / "data" / "sub", "trusted.overlay.opaque") == b"y"  # real opaque dir

    entries = assert_same_as_kernel(img.layers, "pyo-layered:test", root, tmp_path)
    assert "bin/vi" not in entries and "data/a.txt" not in entries
    assert sorted(p for p in entries if p.startswith("data/sub/")) == ["data/sub/c.txt"]

    r = rt.run("--rm", "--docker-root", root, "--image", "pyo-layered:test")
    assert r.returncode == 0, describe(r)
    assert r.stdout.strip() == "FOO=bar pwd=/data uid=1000"
    diff = diff_snapshots(before, snapshot(root / "overlay2"), a_name="before", b_name="after")
    assert not diff, format_diff(diff, "the real Docker store was written to:")
    timings["total"] = time.monotonic() - t0
    print("dockerd timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    assert timings["total"] < 60, timings
