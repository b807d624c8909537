"""uid/gid maps and the override xattr without FUSE: overlayfs_py.idmap (pure rules), the
map options of overlayfs_py.config, and overlayfs_py.ownership.Owners on real files
(as a server that can chown, and as one that cannot)."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from overlayfs_py.config import ConfigError, MountConfig, build_config, parse_options, validate
from overlayfs_py.idmap import (
    OVERRIDE_XATTR,
    IdMap,
    IdMapError,
    carries_override,
    check_ranges,
    decode_override,
    encode_override,
    overflow_id,
    parse_ranges,
)
from overlayfs_py.ownership import Owners

# --- parsing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, ranges",
    [
        ("0:1000:1", ((0, 1000, 1),)),
        ("0:1000:1:1:100000:65536", ((0, 1000, 1), (1, 100000, 65536))),
        ("4294967294:0:1", ((4294967294, 0, 1),)),
    ],
)
def test_parse_ranges(spec, ranges):
    assert parse_ranges(spec) == ranges


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("", "expected STORED:PRESENTED:COUNT"),
        ("0:1000", "expected STORED:PRESENTED:COUNT"),
        ("0:1000:1:5", "expected STORED:PRESENTED:COUNT"),
        ("0:x:1", "'x' is not a number"),
        ("-1:0:1", "'-1' is not a number"),
        ("0: 1:1", "' 1' is not a number"),
        ("0:1000:0", "count must be at least 1"),
        ("0:4294967295:1", "goes beyond id 4294967294"),
        ("4294967290:0:10", "goes beyond id 4294967294"),
        ("0:1000:10:5:2000:1", "stored ranges overlap at id 5"),
        ("0:1000:10:20:1005:1", "presented ranges overlap at id 1005"),
    ],
)
def test_parse_ranges_rejects(spec, fragment):
    with pytest.raises(IdMapError) as exc:
        parse_ranges(spec, "uidmapping")
    msg = str(exc.value)
    assert fragment in msg and "\n" not in msg and msg.startswith(f"uidmapping {spec!r}")


def test_adjacent_ranges_do_not_overlap():
    check_ranges([(0, 1000, 10), (10, 1010, 5)])


# --- mapping both ways -------------------------------------------------------------------------


def test_identity():
    m = IdMap()
    assert m.identity and m.present(12345) == 12345 and m.store(7) == 7


def test_present_and_store():
    m = IdMap([(0, 1000, 10), (100, 5000, 2)], overflow=65534)
    assert not m.identity
    assert [m.present(i) for i in (0, 9, 10, 100, 101, 102)] == [1000, 1009, 65534, 5000, 5001, 65534]
    assert [m.store(i) for i in (1000, 1009, 5001)] == [0, 9, 101]
    assert m.store(999) is None and m.store(1010) is None and m.store(65534) is None


def test_overflow_id_is_the_kernels():
    with open("/proc/sys/fs/overflowuid") as f:
        assert overflow_id("uid") == int(f.read())


# --- the override xattr ------------------------------------------------------------------------


def test_override_format():
    # fuse-overlayfs reads "%d:%d:%o"; containers/storage writes "%d:%d:0%o" of mode & 07777
    assert encode_override(0, 0, 0o100644) == b"0:0:0644"
    assert encode_override(1, 2, 0o4755) == b"1:2:04755"
    assert decode_override(b"0:0:0644") == (0, 0, 0o644)
    assert decode_override(b"1000:1000:755") == (1000, 1000, 0o755)  # fuse-overlayfs's own writes
    assert decode_override(b"0:0:0100755") == (0, 0, 0o755)  # a full st_mode: the type is the inode's
    assert decode_override(b"5:6:0600:extra") == (5, 6, 0o600)  # sscanf ignores the rest
    for bad in (None, b"", b"0:0", b"a:0:644", b"0:0:9", b"-1:0:644", b"\xff", b"4294967295:0:644"):
        assert decode_override(bad) is None


def test_carries_override():
    import stat

    assert carries_override(stat.S_IFREG | 0o644) and carries_override(stat.S_IFDIR | 0o755)
    assert not carries_override(stat.S_IFLNK | 0o777) and not carries_override(stat.S_IFIFO | 0o644)


# --- config -----------------------------------------------------------------------------------


@pytest.fixture
def layout(tmp_path: Path):
    for d in ("lower", "upper", "merged"):
        (tmp_path / d).mkdir()
    return tmp_path


def test_config_maps(layout):
    cfg = build_config(
        str(layout / "lower"),
        str(layout / "upper"),
        str(layout / "merged"),
        options=["uidmapping=0:1000:1:1:100000:65536"],
        uidmap=["65537:200000:1"],
        gidmap=["0:1000:1", "1:100000:65536"],
    )
    assert cfg.uidmap == ((0, 1000, 1), (1, 100000, 65536), (65537, 200000, 1))
    assert cfg.gidmap == ((0, 1000, 1), (1, 100000, 65536))
    plain = build_config(str(layout / "lower"), None, str(layout / "merged"))
    assert plain.uidmap == () and plain.gidmap == ()


@pytest.mark.parametrize(
    "kw, fragment",
    [
        ({"uidmap": ["0:1000"]}, "--uidmap '0:1000': expected"),
        ({"gidmap": ["0:1000:0"]}, "--gidmap '0:1000:0': count must be at least 1"),
        ({"options": ["gidmapping=0:x:1"]}, "gidmapping '0:x:1': 'x' is not a number"),
        ({"options": ["uidmapping=0:1000:10"], "uidmap": ["5:2000:1"]}, "uid map: stored ranges overlap at id 5"),
        ({"options": ["uidmapping"]}, "mount option 'uidmapping' needs a value"),
    ],
)
def test_config_rejects_bad_maps(layout, kw, fragment):
    with pytest.raises(ConfigError) as exc:
        build_config(str(layout / "lower"), str(layout / "upper"), str(layout / "merged"), **kw)
    assert fragment in str(exc.value) and "\n" not in str(exc.value)


def test_parse_options_keeps_mapping_spec():
    assert parse_options(["uidmapping=0:1:2,gidmapping=3:4:5"]) == {"uidmapping": "0:1:2", "gidmapping": "3:4:5"}


def test_mountconfig_by_field_and_validate(layout):
    cfg = MountConfig(
        lowerdirs=[str(layout / "lower")],
        upperdir=None,
        workdir=None,
        mountpoint=str(layout / "merged"),
        uidmap=[[0, 1000, 1]],
        gidmap=[(0, 1000, 1)],
    )
    assert cfg.uidmap == ((0, 1000, 1),) and cfg.gidmap == ((0, 1000, 1),)
    validate(cfg)
    bad = MountConfig(
        lowerdirs=[str(layout / "lower")],
        upperdir=None,
        workdir=None,
        mountpoint=str(layout / "merged"),
        gidmap=((0, 1000, 1), (0, 2000, 1)),
    )
    with pytest.raises(ConfigError, match="gid map: stored ranges overlap at id 0"):
        validate(bad)


# --- Owners on real files ----------------------------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chowns files to other users")


def _layer(path: Path, index: int):
    return SimpleNamespace(index=index, fd=os.open(path, os.O_PATH | os.O_DIRECTORY), is_upper=index == 0)


@pytest.fixture
def upper(tmp_path: Path):
    up = tmp_path / "upper"
    up.mkdir(mode=0o755)
    os.chown(up, 1001, 1001)
    layer = _layer(up, 0)
    yield up, layer
    os.close(layer.fd)


def _xattr(p: Path):
    try:
        return os.getxattr(p, OVERRIDE_XATTR, follow_symlinks=False)
    except OSError as exc:
        assert exc.errno == errno.ENODATA
        return None


@needs_root
def test_owners_root_chowns_and_drops_override(upper):
    up, layer = upper
    f = up / "f"
    f.write_bytes(b"x")
    os.chmod(f, 0o4755)
    own = Owners(layers=[layer], upper=layer)
    assert not own.presenting
    own.set_owner(os.fsencode(f), False, 5, 6, fresh=True)
    st = f.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (5, 6, 0o4755)  # set-id bits kept
    assert _xattr(f) is None and _xattr(up) is None and not own.presenting


@needs_root
def test_owners_without_chown_records_the_override(upper):
    up, layer = upper
    f, link = up / "f", up / "l"
    f.write_bytes(b"x")
    os.chown(f, 1001, 1001)
    os.symlink("f", link)
    os.lchown(link, 1001, 1001)
    own = Owners(uidmap=[(0, 1001, 1)], gidmap=[(0, 1001, 1)], layers=[layer], upper=layer)
    own.euid, own.egid, own.groups = 1001, 1001, {1001}  # a server that cannot chown
    switched = []
    own.on_presenting = lambda: switched.append(True)
    own.set_owner(os.fsencode(f), False, 0, 0, fresh=True)
    assert (f.stat().st_uid, f.stat().st_gid) == (1001, 1001)
    assert _xattr(f) == b"0:0:0644"
    assert _xattr(up) == b"1001:1001:0755"  # the upper root marks the layer
    assert own.honours(layer) and switched == []  # presenting already (a map is set)
    st = f.stat()
    assert own.stored(os.fsencode(f), False, st, layer) == (0, 0, st.st_mode)
    assert own.presented(os.fsencode(f), False, st, layer) == (1001, 1001, st.st_mode)
    assert own.presented(os.fsencode(up), True, up.stat(), layer)[:2] == (65534, 65534)
    # chmod keeps the override's mode in step; chown back to the server's ids drops it
    os.chmod(f, 0o600)
    own.after_chmod(os.fsencode(f), False, 0o600)
    assert _xattr(f) == b"0:0:0600"
    own.set_owner(os.fsencode(f), False, 1001, None)  # the group stays stored 0
    assert _xattr(f) == b"1001:0:0600"
    own.set_owner(os.fsencode(f), False, None, 1001)
    assert _xattr(f) is None and (f.stat().st_uid, f.stat().st_gid) == (1001, 1001)
    # a symlink cannot carry a user.* xattr: it keeps its disk owner
    own.set_owner(os.fsencode(link), False, 0, 0, fresh=True)
    assert os.lstat(link).st_uid == 1001


@needs_root
def test_owners_switch_to_presenting_when_the_upper_is_marked(upper):
    up, layer = upper
    f = up / "f"
    f.write_bytes(b"x")
    own = Owners(layers=[layer], upper=layer)
    own.euid, own.egid, own.groups = 1001, 1001, {1001}
    switched = []
    own.on_presenting = lambda: switched.append(True)
    assert not own.presenting
    own.set_owner(os.fsencode(f), False, 7, 8, fresh=True)
    assert own.presenting and switched == [True]
    assert own.stored(os.fsencode(f), False, f.stat(), layer)[:2] == (7, 8)
    # a later mount (by the same user) sees the marked root
    again = Owners(layers=[layer], upper=layer, euid=1001)
    assert again.presenting and again.honours(layer)


def test_store_ids_einval():
    own = Owners(uidmap=[(0, 1000, 1)], gidmap=[(0, 1000, 1)])
    assert own.store_ids(1000, None) == (0, None)
    with pytest.raises(OSError) as exc:
        own.store_ids(1000, 5)
    assert exc.value.errno == errno.EINVAL


def test_cli_bad_map_is_one_line_exit_2(layout):
    import subprocess
    import sys

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pyoverlay_cli",
            "mount",
            "--uidmap",
            "0:1000:1",
            "--gidmap",
            "0:1",
            str(layout / "lower"),
            str(layout / "upper"),
            str(layout / "merged"),
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert r.returncode == 2
    assert r.stderr == ("pyoverlay: --gidmap '0:1': expected STORED:PRESENTED:COUNT[:STORED:PRESENTED:COUNT...]\n")


def test_a_users_layer_is_not_believed_by_root(upper):
    """Overrides are believed only in a layer whose root is root's or the server's own."""
    up, layer = upper
    os.setxattr(up, OVERRIDE_XATTR, b"1001:1001:0755")
    assert Owners(layers=[layer], upper=layer, euid=1001).honours(layer)
    root = Owners(layers=[layer], upper=layer, euid=0)
    assert not root.honours(layer) and not root.presenting
    with pytest.raises(OSError) as exc:  # no override root's own later mounts would ignore
        root.mark_upper()
    assert exc.value.errno == errno.EPERM
