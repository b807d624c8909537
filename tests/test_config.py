"""Tests for overlayfs_py.config: parsing, defaults and every validation rule.

No FUSE needed.  Layouts are real directories under tmp_path; the few rules
that need a second filesystem or an existing mount (tmpfs, bind mounts) mount
one as root and always unmount it, and are skipped with a reason otherwise.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from overlayfs_py.config import (
    MAX_LAYERS,
    ConfigError,
    MountConfig,
    build_config,
    default_workdir,
    parse_options,
    split_lowerdir,
    validate,
)
from overlayfs_py.userxattr import plan

# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _default_engine(monkeypatch):
    """These tests check the parser against MountConfig's defaults: the engine chosen by the
    environment (scripts/test's pyfuse3 pass) is not one of them."""
    monkeypatch.delenv("PYOVERLAY_ENGINE", raising=False)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """tmp_path with symlinks resolved, so expected messages match realpaths."""
    return Path(os.path.realpath(tmp_path))


def mkdirs(base: Path, *names: str) -> list[str]:
    out = []
    for n in names:
        p = base / n
        p.mkdir(parents=True, exist_ok=True)
        out.append(str(p))
    return out


@pytest.fixture
def layout(root: Path) -> dict[str, str]:
    """A valid layout: l1 l2 u w m (all empty directories)."""
    l1, l2, u, w, m = mkdirs(root, "l1", "l2", "u", "w", "m")
    return {"l1": l1, "l2": l2, "u": u, "w": w, "m": m}


def cfg_of(lay: dict[str, str], **kw: object) -> MountConfig:
    fields: dict[str, object] = {
        "lowerdirs": (lay["l1"], lay["l2"]),
        "upperdir": lay["u"],
        "workdir": lay["w"],
        "mountpoint": lay["m"],
    }
    fields.update(kw)
    return MountConfig(**fields)  # type: ignore[arg-type]


def rejected(cfg: MountConfig, **kw: bool) -> ConfigError:
    with pytest.raises(ConfigError) as ei:
        validate(cfg, **kw)
    e = ei.value
    assert str(e) == e.problems[0]
    for msg in e.problems:
        assert "\n" not in msg
    return e


MountFn = Callable[..., None]


@pytest.fixture
def mount() -> Iterator[MountFn]:
    """mount(*args, target=DIR): run mount(8) as root; unmounted at teardown."""
    mounted: list[str] = []

    def do_mount(*args: str, target: str) -> None:
        if os.geteuid() != 0:
            pytest.skip("needs root: the test mounts a tmpfs / bind mount")
        if shutil.which("mount") is None:
            pytest.skip("needs mount(8)")
        r = subprocess.run(["mount", *args, target], capture_output=True, text=True)
        if r.returncode != 0:
            why = " ".join(r.stderr.split())
            pytest.skip(f"mount {' '.join(args)} failed (needs CAP_SYS_ADMIN): {why}")
        mounted.append(target)

    try:
        yield do_mount
    finally:
        for t in reversed(mounted):
            r = subprocess.run(["umount", t], capture_output=True)
            if r.returncode != 0:
                subprocess.run(["umount", "-l", t], capture_output=True)


# --------------------------------------------------------------------------
# split_lowerdir
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("a", ["a"]),
        ("/x/a:/x/b:c", ["/x/a", "/x/b", "c"]),
        (r"a\:b:c", ["a:b", "c"]),
        (r"a\\:b", ["a\\", "b"]),  # escaped backslash, then a real separator
        (r"a\\\:b", ["a\\:b"]),  # escaped backslash + escaped colon
        (r"we\ird", ["weird"]),  # like the kernel: backslash makes any char literal
        ("a,b:c", ["a,b", "c"]),
    ],
)
def test_split_lowerdir(spec: str, expected: list[str]) -> None:
    assert split_lowerdir(spec) == expected


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("a::b", "data-only '::' layers are not supported"),
        ("a:b::c", "data-only '::' layers are not supported"),
        (":a", "leading or trailing ':'"),
        ("a:", "leading or trailing ':'"),
        (":", "leading or trailing ':'"),
        ("", "empty lowerdir"),
        ("a\\", "lone backslash"),
    ],
)
def test_split_lowerdir_rejects(spec: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as ei:
        split_lowerdir(spec)
    assert fragment in str(ei.value)


def test_split_lowerdir_escaped_colon_is_not_empty_component() -> None:
    assert split_lowerdir(r"\:") == [":"]
    assert split_lowerdir(r"a:\::b") == ["a", ":", "b"]


# --------------------------------------------------------------------------
# parse_options
# --------------------------------------------------------------------------


def test_parse_options_known_keys() -> None:
    got = parse_options(
        [
            r"lowerdir=/l1\:x:/l2,upperdir=/u,workdir=/w",
            "ro,userxattr,allow_other,default_permissions,fsname=demo",
        ]
    )
    assert got == {
        "lowerdir": r"/l1\:x:/l2",  # kept escaped: split_lowerdir unescapes
        "upperdir": "/u",
        "workdir": "/w",
        "ro": True,
        "userxattr": True,
        "allow_other": True,
        "default_permissions": True,
        "fsname": "demo",
    }


def test_parse_options_escaped_comma_and_unescaping() -> None:
    got = parse_options([r"upperdir=/a\,b,workdir=/w\\x,lowerdir=/l\,1:/l2"])
    assert got["upperdir"] == "/a,b"
    assert got["workdir"] == "/w\\x"
    assert got["lowerdir"] == r"/l\,1:/l2"
    assert split_lowerdir(str(got["lowerdir"])) == ["/l,1", "/l2"]


def test_parse_options_last_wins_and_empty_items() -> None:
    assert parse_options(["ro,rw"]) == {"ro": False}
    assert parse_options(["rw", "ro"]) == {"ro": True}
    assert parse_options(["upperdir=/a,,upperdir=/b,"]) == {"upperdir": "/b"}
    assert parse_options([]) == {}
    assert parse_options([""]) == {}


@pytest.mark.parametrize(
    "opt",
    [
        "nfs_export=off",
        "verity=off",
    ],
)
def test_parse_options_accepted_and_ignored(opt: str) -> None:
    assert parse_options([opt]) == {}


@pytest.mark.parametrize("value", ["on", "off", "null", "auto"])
def test_parse_options_uuid(value: str) -> None:
    """The kernel's four uuid modes (uuidmode.py; tests/test_uuid.py): refused before but
    auto, which was accepted and ignored."""
    assert parse_options([f"uuid={value}"]) == {"uuid": value}


@pytest.mark.parametrize("value", ["on", "off"])
def test_parse_options_metacopy(value: str) -> None:
    """Kept for features.resolve (tests/test_metacopy.py)."""
    assert parse_options([f"metacopy={value}"]) == {"metacopy": value}


@pytest.mark.parametrize("value", ["on", "follow", "nofollow", "off"])
def test_parse_options_redirect_dir(value: str) -> None:
    """The kernel's four modes, kept for features.resolve (tests/test_redirect_dir.py)."""
    assert parse_options([f"redirect_dir={value}"]) == {"redirect_dir": value}


@pytest.mark.parametrize(
    ("opts", "flags"),
    [
        (["nosuid,nodev"], ("nosuid", "nodev")),
        (["noexec", "noatime"], ("noexec", "noatime")),
        (["nosuid,suid"], ()),  # the last word wins
        (["suid,nosuid"], ("nosuid",)),
        (["noatime,relatime"], ()),
        (["noatime,strictatime,noatime"], ("noatime",)),
        (["dev,exec,atime"], ()),
        (["nodev,nodev"], ("nodev",)),
    ],
)
def test_parse_options_mount_flags(opts: list[str], flags: tuple[str, ...]) -> None:
    """The generic flags the FUSE mount carries (``MountConfig.mount_flags``): before, pyoverlay
    mount accepted and silently ignored them (only mount.fuse.pyoverlay applied them)."""
    assert parse_options(opts).get("mount_flags", ()) == flags


def test_build_config_mount_flags(tmp_path) -> None:
    for d in ("l", "m"):
        (tmp_path / d).mkdir()
    cfg = build_config([str(tmp_path / "l")], None, str(tmp_path / "m"), options=["nosuid,noexec,exec"])
    assert cfg.mount_flags == ("nosuid",)


@pytest.mark.parametrize("opt", ["nosuid=1", "noatime=yes"])
def test_parse_options_mount_flag_takes_no_value(opt: str) -> None:
    with pytest.raises(ConfigError, match="takes no value"):
        parse_options([opt])


def test_parse_options_nfs_export_refused_with_the_reason() -> None:
    """nfs_export=on, the one kernel feature value left refused besides verity: a FUSE
    mount is not exportable through the kernel's nfsd."""
    with pytest.raises(ConfigError) as ei:
        parse_options(["lowerdir=/a,nfs_export=on"])
    assert str(ei.value).startswith("option 'nfs_export=on' is not supported: a FUSE mount cannot be exported")


@pytest.mark.parametrize("value", ["on", "require"])
def test_parse_options_verity_refused_with_the_reason(value: str) -> None:
    """verity=on|require: the kernel's fs-verity digests of metacopy files, which pyoverlay
    neither records nor checks: a one-line refusal that says so."""
    with pytest.raises(ConfigError) as ei:
        parse_options([f"lowerdir=/a,verity={value}"])
    assert str(ei.value) == (
        f"option 'verity={value}' is not supported: pyoverlay neither records nor checks the fs-verity"
        " digests of metacopy files (verity=off only)"
    )


def test_parse_options_volatile() -> None:
    assert parse_options(["upperdir=/u,volatile"])["volatile"] is True
    with pytest.raises(ConfigError):
        parse_options(["volatile=1"])


@pytest.mark.parametrize("opt", ["bogus", "bogus=1", "lowerdir+=/x", "LOWERDIR=/x"])
def test_parse_options_unknown(opt: str) -> None:
    key = opt.partition("=")[0]
    with pytest.raises(ConfigError) as ei:
        parse_options([opt])
    assert str(ei.value) == f"unknown mount option '{key}'"


@pytest.mark.parametrize(
    ("opt", "fragment"),
    [
        ("index=maybe", "invalid value 'maybe' for mount option 'index'"),
        ("index", "mount option 'index' needs a value"),
        ("lowerdir", "mount option 'lowerdir' needs a value"),
        ("upperdir=", "mount option 'upperdir' needs a value"),
        ("ro=1", "mount option 'ro' takes no value"),
        ("userxattr=yes", "mount option 'userxattr' takes no value"),
        ("nodev=1", "mount option 'nodev' takes no value"),
        ("upperdir=/x\\", "ends with a lone backslash"),
    ],
)
def test_parse_options_bad_values(opt: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_options([opt])
    assert fragment in str(ei.value)


# --------------------------------------------------------------------------
# default workdir
# --------------------------------------------------------------------------


def test_default_workdir_is_a_hidden_sibling() -> None:
    assert default_workdir("/data/upper") == "/data/.upper.pyoverlay-work"
    assert default_workdir("/data/upper/") == "/data/.upper.pyoverlay-work"
    wd = default_workdir("/data/upper")
    assert os.path.dirname(wd) == os.path.dirname("/data/upper")
    assert os.path.commonpath([wd, "/data/upper"]) != "/data/upper"  # never inside


def test_build_config_uses_default_workdir_without_creating_it(layout: dict[str, str]) -> None:
    cfg = build_config(f"{layout['l1']}:{layout['l2']}", layout["u"], layout["m"])
    expected = os.path.join(os.path.dirname(layout["u"]), ".u.pyoverlay-work")
    assert cfg.workdir == expected
    assert not os.path.exists(expected)  # only the path; the mounter creates it


def test_default_workdir_missing_is_fine_only_when_defaulted(layout: dict[str, str]) -> None:
    cfg = cfg_of(layout, workdir=default_workdir(layout["u"]))
    validate(cfg, workdir_may_be_missing=True)
    e = rejected(cfg)
    assert str(e) == f"workdir '{default_workdir(layout['u'])}' does not exist"


def test_default_workdir_parent_must_exist(root: Path, layout: dict[str, str]) -> None:
    missing_parent = str(root / "nope" / ".u.pyoverlay-work")
    e = rejected(cfg_of(layout, workdir=missing_parent), workdir_may_be_missing=True)
    assert str(e) == (
        f"workdir '{missing_parent}' cannot be created: parent '{root / 'nope'}': No such file or directory"
    )


def test_default_workdir_beside_an_upper_mount_point(root: Path, layout: dict[str, str], mount: MountFn) -> None:
    # upper is itself a mount point, so its sibling is on another filesystem.
    mount("-t", "tmpfs", "tmpfs", target=layout["u"])
    with pytest.raises(ConfigError) as ei:
        build_config(f"{layout['l1']}:{layout['l2']}", layout["u"], layout["m"])
    assert str(ei.value) == (
        f"workdir '{default_workdir(layout['u'])}' would not be on the same filesystem as "
        f"upper layer '{layout['u']}' (is the upper layer a mount point? pass --workdir)"
    )


# --------------------------------------------------------------------------
# build_config
# --------------------------------------------------------------------------


def test_build_config_positional(layout: dict[str, str]) -> None:
    cfg = build_config(f"{layout['l1']}:{layout['l2']}", layout["u"], layout["m"], workdir=layout["w"], debug=True)
    assert cfg == MountConfig(
        lowerdirs=(layout["l1"], layout["l2"]),
        upperdir=layout["u"],
        workdir=layout["w"],
        mountpoint=layout["m"],
        debug=True,
        userxattr=None,  # parsing is pure: the namespace is not asked for, not decided yet
    )
    assert cfg.read_only is False
    cfg = plan(cfg)  # the planning step decides it: root, fresh upper -> trusted.overlay.*
    assert cfg.userxattr is False
    assert cfg.xattr_prefix == "trusted.overlay."


def test_build_config_o_form(layout: dict[str, str]) -> None:
    cfg = build_config(
        None,
        None,
        layout["m"],
        options=[
            f"lowerdir={layout['l1']}:{layout['l2']},upperdir={layout['u']},workdir={layout['w']}",
            "userxattr,allow_other,fsname=myfs",
        ],
    )
    assert cfg.lowerdirs == (layout["l1"], layout["l2"])
    assert (cfg.upperdir, cfg.workdir) == (layout["u"], layout["w"])
    assert cfg.userxattr and cfg.allow_other and cfg.fsname == "myfs"
    assert cfg.xattr_prefix == "user.overlay."


def test_build_config_resolves_relative_paths_and_symlinks(
    root: Path, layout: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    os.symlink(layout["l1"], root / "link1")
    monkeypatch.chdir(root)
    cfg = build_config("link1:./l2", "u", "m/")
    assert cfg.lowerdirs == (layout["l1"], layout["l2"])
    assert cfg.upperdir == layout["u"] and cfg.mountpoint == layout["m"]


def test_build_config_escaped_colon_layer(root: Path) -> None:
    (colon,) = mkdirs(root, "a:b")
    (m,) = mkdirs(root, "m")
    cfg = build_config(str(root / "a\\:b"), None, m)
    assert cfg.lowerdirs == (colon,)


def test_build_config_read_only_without_upper(layout: dict[str, str]) -> None:
    cfg = build_config(layout["l1"], None, layout["m"])  # one lower: allowed (differs from kernel)
    assert cfg.upperdir is None and cfg.workdir is None and cfg.read_only is True


def test_build_config_ro_keeps_upper(layout: dict[str, str]) -> None:
    cfg = build_config(layout["l1"], layout["u"], layout["m"], options=["ro"])
    assert cfg.upperdir == layout["u"]
    assert cfg.read_only is True
    assert cfg.workdir == default_workdir(layout["u"])


def test_build_config_lower_given_twice(layout: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as ei:
        build_config(layout["l1"], None, layout["m"], options=[f"lowerdir={layout['l2']}"])
    assert str(ei.value) == "lower layers given twice: as an argument and as -o lowerdir"


def test_build_config_upper_given_twice(layout: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as ei:
        build_config(layout["l1"], layout["u"], layout["m"], options=[f"upperdir={layout['u']}"])
    assert str(ei.value) == "upper layer given twice: as an argument and as -o upperdir"


def test_build_config_workdir_given_twice(layout: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as ei:
        build_config(
            layout["l1"],
            layout["u"],
            layout["m"],
            workdir=layout["w"],
            options=[f"workdir={layout['w']}"],
        )
    assert str(ei.value) == "workdir given twice: as --workdir and as -o workdir"


def test_build_config_mixed_forms(layout: dict[str, str]) -> None:
    # Positional lowers with -o upperdir/workdir do not conflict.
    cfg = build_config(layout["l1"], None, layout["m"], options=[f"upperdir={layout['u']},workdir={layout['w']}"])
    assert (cfg.upperdir, cfg.workdir) == (layout["u"], layout["w"])


def test_build_config_needs_lowers(layout: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as ei:
        build_config(None, None, layout["m"], options=[f"upperdir={layout['u']}"])
    assert str(ei.value) == "no lower layer given (use LOWER1[:LOWER2...] or -o lowerdir=...)"


def test_build_config_empty_paths(layout: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="^upper layer path is empty$"):
        build_config(layout["l1"], "", layout["m"])
    with pytest.raises(ConfigError, match="^mountpoint path is empty$"):
        build_config(layout["l1"], None, "")


def test_build_config_workdir_without_upper(layout: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as ei:
        build_config(layout["l1"], None, layout["m"], workdir=layout["w"])
    assert str(ei.value) == f"workdir '{layout['w']}' given without an upper layer"


def test_build_config_validates(layout: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as ei:
        build_config(layout["l1"] + "/missing", None, layout["m"])
    assert str(ei.value) == f"lower layer '{layout['l1']}/missing' does not exist"


# --------------------------------------------------------------------------
# MountConfig
# --------------------------------------------------------------------------


def test_mountconfig_normalises(layout: dict[str, str]) -> None:
    cfg = MountConfig(
        lowerdirs=[layout["l1"]],  # type: ignore[arg-type]
        upperdir=None,
        workdir=None,
        mountpoint=layout["m"],
    )
    assert cfg.lowerdirs == (layout["l1"],)
    assert cfg.read_only is True  # no upper => read-only
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.debug = True  # type: ignore[misc]
    validate(cfg)


# --------------------------------------------------------------------------
# validate: one test per rule
# --------------------------------------------------------------------------


def test_validate_ok(layout: dict[str, str]) -> None:
    validate(cfg_of(layout))


def test_lower_missing(layout: dict[str, str]) -> None:
    bad = layout["l2"] + "x"
    e = rejected(cfg_of(layout, lowerdirs=(layout["l1"], bad)))
    assert str(e) == f"lower layer '{bad}' does not exist"


def test_lower_not_a_directory(root: Path, layout: dict[str, str]) -> None:
    f = root / "file"
    f.write_text("x")
    e = rejected(cfg_of(layout, lowerdirs=(layout["l1"], str(f))))
    assert str(e) == f"lower layer '{f}' is not a directory"


def test_upper_missing(root: Path, layout: dict[str, str]) -> None:
    e = rejected(cfg_of(layout, upperdir=str(root / "nou")))
    assert str(e) == f"upper layer '{root / 'nou'}' does not exist"


def test_upper_not_a_directory(root: Path, layout: dict[str, str]) -> None:
    f = root / "ufile"
    f.write_text("x")
    e = rejected(cfg_of(layout, upperdir=str(f)))
    assert str(e) == f"upper layer '{f}' is not a directory"


def test_explicit_workdir_missing(root: Path, layout: dict[str, str]) -> None:
    e = rejected(cfg_of(layout, workdir=str(root / "now")))
    assert str(e) == f"workdir '{root / 'now'}' does not exist"


def test_workdir_not_a_directory(root: Path, layout: dict[str, str]) -> None:
    f = root / "wfile"
    f.write_text("x")
    e = rejected(cfg_of(layout, workdir=str(f)), workdir_may_be_missing=True)
    assert str(e) == f"workdir '{f}' is not a directory"


def test_upper_needs_workdir_and_workdir_needs_upper(layout: dict[str, str]) -> None:
    e = rejected(cfg_of(layout, workdir=None))
    assert str(e) == f"upper layer '{layout['u']}' needs a workdir"
    e = rejected(cfg_of(layout, upperdir=None))
    assert str(e) == f"workdir '{layout['w']}' given without an upper layer"


def test_same_lower_twice(layout: dict[str, str]) -> None:
    e = rejected(cfg_of(layout, lowerdirs=(layout["l1"], layout["l2"], layout["l1"])))
    assert str(e) == f"lower layer '{layout['l1']}' is given twice"


def test_same_directory_by_identity(root: Path, layout: dict[str, str], mount: MountFn) -> None:
    # A bind mount: another path, same (st_dev, st_ino).
    (alias,) = mkdirs(root, "alias")
    mount("--bind", layout["l1"], target=alias)
    e = rejected(cfg_of(layout, lowerdirs=(layout["l1"], alias)))
    assert str(e) == f"lower layer '{alias}' is the same directory as lower layer '{layout['l1']}'"


def test_upper_same_as_lower(layout: dict[str, str]) -> None:
    e = rejected(cfg_of(layout, upperdir=layout["l2"]))
    assert str(e) == f"upper layer '{layout['l2']}' is the same directory as lower layer '{layout['l2']}'"


def test_workdir_same_as_upper(layout: dict[str, str]) -> None:
    e = rejected(cfg_of(layout, workdir=layout["u"]))
    assert str(e) == f"workdir '{layout['u']}' is the same directory as upper layer '{layout['u']}'"


def test_upper_inside_lower(layout: dict[str, str]) -> None:
    (u,) = mkdirs(Path(layout["l1"]), "sub/u")
    e = rejected(cfg_of(layout, upperdir=u))
    assert str(e) == f"upper layer '{u}' is inside lower layer '{layout['l1']}'"


def test_workdir_inside_lower(layout: dict[str, str]) -> None:
    (w,) = mkdirs(Path(layout["l2"]), "w")
    e = rejected(cfg_of(layout, workdir=w))
    assert str(e) == f"workdir '{w}' is inside lower layer '{layout['l2']}'"


def test_lower_inside_upper(layout: dict[str, str]) -> None:
    (low,) = mkdirs(Path(layout["u"]), "low")
    e = rejected(cfg_of(layout, lowerdirs=(layout["l1"], low)))
    assert str(e) == f"lower layer '{low}' is inside upper layer '{layout['u']}'"


def test_lower_inside_workdir(layout: dict[str, str]) -> None:
    (low,) = mkdirs(Path(layout["w"]), "low")
    e = rejected(cfg_of(layout, lowerdirs=(low,)))
    assert str(e) == f"lower layer '{low}' is inside workdir '{layout['w']}'"


def test_nested_lowers_are_allowed(layout: dict[str, str]) -> None:
    (inner,) = mkdirs(Path(layout["l1"]), "inner")
    validate(cfg_of(layout, lowerdirs=(layout["l1"], inner)))


def test_upper_inside_lower_through_a_bind_mount(root: Path, layout: dict[str, str], mount: MountFn) -> None:
    (alias,) = mkdirs(root, "alias")
    mount("--bind", layout["l1"], target=alias)
    (u,) = mkdirs(Path(alias), "u")
    e = rejected(cfg_of(layout, upperdir=u))
    assert str(e) == f"upper layer '{u}' is inside lower layer '{layout['l1']}'"


def test_containment_is_not_a_string_prefix(root: Path, layout: dict[str, str]) -> None:
    # /t/l1 and /t/l1x share a string prefix but neither contains the other.
    u, w = mkdirs(root, "l1x", "l1xw")
    validate(cfg_of(layout, upperdir=u, workdir=w))


def test_workdir_inside_upper(layout: dict[str, str]) -> None:
    (w,) = mkdirs(Path(layout["u"]), "work")
    e = rejected(cfg_of(layout, workdir=w))
    assert str(e) == f"workdir '{w}' is inside upper layer '{layout['u']}'"


def test_upper_inside_workdir(layout: dict[str, str]) -> None:
    (u,) = mkdirs(Path(layout["w"]), "up")
    e = rejected(cfg_of(layout, upperdir=u))
    assert str(e) == f"upper layer '{u}' is inside workdir '{layout['w']}'"


def test_workdir_on_another_filesystem(layout: dict[str, str], mount: MountFn) -> None:
    mount("-t", "tmpfs", "tmpfs", target=layout["w"])
    assert os.stat(layout["w"]).st_dev != os.stat(layout["u"]).st_dev
    e = rejected(cfg_of(layout))
    assert str(e) == (f"workdir '{layout['w']}' is not on the same filesystem as upper layer '{layout['u']}'")


def test_mountpoint_missing(root: Path, layout: dict[str, str]) -> None:
    e = rejected(cfg_of(layout, mountpoint=str(root / "nom")))
    assert str(e) == f"mountpoint '{root / 'nom'}' does not exist"


def test_mountpoint_not_a_directory(root: Path, layout: dict[str, str]) -> None:
    f = root / "mfile"
    f.write_text("")
    e = rejected(cfg_of(layout, mountpoint=str(f)))
    assert str(e) == f"mountpoint '{f}' is not a directory"


def test_mountpoint_is_a_lower(layout: dict[str, str]) -> None:
    e = rejected(cfg_of(layout, mountpoint=layout["l2"]))
    assert str(e) == (f"mountpoint '{layout['l2']}' is the same directory as lower layer '{layout['l2']}'")


def test_mountpoint_is_the_upper(layout: dict[str, str]) -> None:
    e = rejected(cfg_of(layout, mountpoint=layout["u"]))
    assert str(e) == (f"mountpoint '{layout['u']}' is the same directory as upper layer '{layout['u']}'")


def test_mountpoint_inside_lower(layout: dict[str, str]) -> None:
    (m,) = mkdirs(Path(layout["l1"]), "m")
    e = rejected(cfg_of(layout, mountpoint=m))
    assert str(e) == f"mountpoint '{m}' is inside lower layer '{layout['l1']}'"


def test_mountpoint_inside_workdir(layout: dict[str, str]) -> None:
    (m,) = mkdirs(Path(layout["w"]), "m")
    e = rejected(cfg_of(layout, mountpoint=m))
    assert str(e) == f"mountpoint '{m}' is inside workdir '{layout['w']}'"


def test_layer_inside_mountpoint(root: Path, layout: dict[str, str]) -> None:
    (big,) = mkdirs(root, "big")
    (low,) = mkdirs(root, "big/low")
    e = rejected(cfg_of(layout, lowerdirs=(low,), mountpoint=big))
    assert e.problems[0] == f"lower layer '{low}' is inside mountpoint '{big}'"
    # big is of course not empty either; both are reported.
    assert e.problems == [
        f"lower layer '{low}' is inside mountpoint '{big}'",
        f"mountpoint '{big}' is not empty",
    ]


def test_mountpoint_already_mounted(layout: dict[str, str], mount: MountFn) -> None:
    mount("-t", "tmpfs", "tmpfs", target=layout["m"])
    e = rejected(cfg_of(layout))
    assert str(e) == f"mountpoint '{layout['m']}' is already a mount point"


def test_mountpoint_not_empty(layout: dict[str, str]) -> None:
    Path(layout["m"], ".hidden").write_text("")
    e = rejected(cfg_of(layout))
    assert str(e) == f"mountpoint '{layout['m']}' is not empty"


def test_too_many_lower_layers(root: Path, layout: dict[str, str]) -> None:
    lowers = tuple(mkdirs(root / "many", *(f"{i:03d}" for i in range(MAX_LAYERS + 1))))
    validate(cfg_of(layout, lowerdirs=lowers[:MAX_LAYERS]))  # exactly the limit is fine
    e = rejected(cfg_of(layout, lowerdirs=lowers))
    assert str(e) == "too many lower layers: 501 (the kernel allows 500)"


def test_read_only_needs_a_lower(layout: dict[str, str]) -> None:
    e = rejected(cfg_of(layout, lowerdirs=(), upperdir=None, workdir=None))
    assert str(e) == "a read-only mount needs at least one lower layer"


def test_upper_mount_needs_a_lower_too(layout: dict[str, str]) -> None:
    e = rejected(cfg_of(layout, lowerdirs=()))
    assert str(e) == "no lower layer given: the kernel needs at least one lowerdir"


def test_single_lower_read_only_is_accepted(layout: dict[str, str]) -> None:
    # Documented difference: the kernel wants two lowers without an upper.
    validate(cfg_of(layout, lowerdirs=(layout["l1"],), upperdir=None, workdir=None))


@pytest.mark.parametrize("fsname", ["", "a,b", "a b", "a\nb"])
def test_bad_fsname(layout: dict[str, str], fsname: str) -> None:
    e = rejected(cfg_of(layout, fsname=fsname))
    assert "must be a non-empty word without commas or whitespace" in str(e)


def test_all_problems_collected_first_raised(root: Path, layout: dict[str, str]) -> None:
    missing = str(root / "missing")
    Path(layout["m"], "x").write_text("")
    e = rejected(cfg_of(layout, lowerdirs=(missing, layout["l1"]), upperdir=layout["l1"]))
    assert e.problems == [
        f"lower layer '{missing}' does not exist",
        f"upper layer '{layout['l1']}' is the same directory as lower layer '{layout['l1']}'",
        f"mountpoint '{layout['m']}' is not empty",
    ]
    assert str(e) == e.problems[0]


def test_messages_stay_on_one_line(root: Path, layout: dict[str, str]) -> None:
    weird = str(root / "new\nline")
    e = rejected(cfg_of(layout, lowerdirs=(weird,)))
    assert str(e) == f"lower layer {weird!r} does not exist"
    assert "\n" not in str(e)


def test_validate_has_no_side_effects(root: Path, layout: dict[str, str]) -> None:
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    validate(cfg_of(layout, workdir=default_workdir(layout["u"])), workdir_may_be_missing=True)
    with pytest.raises(ConfigError):
        validate(cfg_of(layout, workdir=str(root / "nowork")))
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
