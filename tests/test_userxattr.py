"""The private xattr form (trusted.overlay.* or user.overlay.*): the pure choice, its record
in the workdir, and the privilege facts it depends on. No FUSE; the rootless mounts that use
all this are in tests/rootless/test_mount_rootless.py."""

from __future__ import annotations

import json
import os

import pytest

from overlayfs_py import privilege, userxattr
from overlayfs_py.config import ConfigError, MountConfig, build_config, parse_options


def _planned(*args, **kw):
    """Parse (pure) then plan: the configuration with its private xattr namespace decided."""
    return userxattr.plan(build_config(*args, **kw))


def test_choose_fresh_upper():
    assert userxattr.choose(None, None, privileged=True) is False
    assert userxattr.choose(None, None, privileged=False) is True
    assert userxattr.choose(True, None, privileged=True) is True
    assert userxattr.choose(False, None, privileged=True) is False
    with pytest.raises(ConfigError, match=r"^-o nouserxattr .* needs root"):
        userxattr.choose(False, None, privileged=False)


def test_choose_recorded_form_wins_and_conflicts_are_errors():
    assert userxattr.choose(None, True, privileged=True) is True  # root reads a user upper
    assert userxattr.choose(True, True, privileged=False) is True
    with pytest.raises(
        ConfigError,
        match=r"has user.overlay.\* private xattrs \(recorded in 'w'\):"
        r" -o nouserxattr conflicts",
    ):
        userxattr.choose(False, True, privileged=True, upper="u", where="recorded in 'w'")
    with pytest.raises(ConfigError, match=r"-o userxattr conflicts"):
        userxattr.choose(True, False, privileged=True)
    with pytest.raises(ConfigError, match=r"trusted.overlay.\* private xattrs .* mount it as root"):
        userxattr.choose(None, False, privileged=False)


def test_parse_nouserxattr_last_one_wins():
    assert parse_options(["userxattr,nouserxattr"]) == {"userxattr": False}
    assert parse_options(["nouserxattr", "userxattr"]) == {"userxattr": True}
    with pytest.raises(ConfigError, match="'nouserxattr' takes no value"):
        parse_options(["nouserxattr=1"])


def _layout(tmp_path):
    for d in ("lo", "up", "wk", "mnt"):
        (tmp_path / d).mkdir()
    return [str(tmp_path / d) for d in ("lo", "up", "wk", "mnt")]


def test_record_round_trip_and_other_keys_kept(tmp_path):
    lo, up, wk, mnt = _layout(tmp_path)
    rec = tmp_path / "wk" / userxattr.RECORD
    rec.write_text(json.dumps({"other": 1}))
    cfg = MountConfig(lowerdirs=(lo,), upperdir=up, workdir=wk, mountpoint=mnt, userxattr=True)
    userxattr.record(cfg)
    assert json.loads(rec.read_text()) == {"other": 1, "userxattr": True}
    assert userxattr.recorded(cfg) == (True, f"recorded in '{rec}'")
    # as root, without options, the recorded form is used
    assert _planned(lo, up, mnt, workdir=wk).userxattr is True
    with pytest.raises(ConfigError, match="conflicts with it"):
        _planned(lo, up, mnt, workdir=wk, options=["nouserxattr"])


def test_bad_record_is_a_one_line_error(tmp_path):
    lo, up, wk, mnt = _layout(tmp_path)
    (tmp_path / "wk" / userxattr.RECORD).write_text('{"userxattr": "yes"}')
    with pytest.raises(ConfigError, match=r"has a bad userxattr record \(want true or false\): remove it"):
        _planned(lo, up, mnt, workdir=wk)
    (tmp_path / "wk" / userxattr.RECORD).write_text('{"other": 1}')  # no record of the form
    assert _planned(lo, up, mnt, workdir=wk).userxattr is (os.geteuid() != 0)


@pytest.mark.needs_root
def test_without_record_the_upper_xattrs_decide(tmp_path):
    lo, up, wk, mnt = _layout(tmp_path)
    os.mkdir(os.path.join(up, "d"))
    os.setxattr(os.path.join(up, "d"), "user.overlay.opaque", b"y")
    assert _planned(lo, up, mnt, workdir=wk).userxattr is True
    os.removexattr(os.path.join(up, "d"), "user.overlay.opaque")
    os.setxattr(os.path.join(up, "d"), "trusted.overlay.opaque", b"y")
    assert _planned(lo, up, mnt, workdir=wk).userxattr is False
    with pytest.raises(ConfigError, match=r"has trusted.overlay.\* private xattrs \(found on its files\)"):
        _planned(lo, up, mnt, workdir=wk, options=["userxattr"])


def test_privilege_facts():
    status = "Name:\tx\nCapEff:\t000001ffffffffff\n"
    assert privilege.effective_caps(status) >> privilege.CAP_SYS_ADMIN & 1
    assert privilege.effective_caps("CapEff:\t0000000000000000\n") == 0
    assert privilege.initial_userns("         0          0 4294967295\n")
    assert not privilege.initial_userns("         0       1001          1\n")
    assert not privilege.initial_userns("0 0 4294967295\n1 1 1\n")


def test_user_namespace_root_is_not_host_root():
    """uid 0 of a namespace that is an ordinary user outside (podman's rootless mount
    program, ``unshare -Ur``) keeps its state in that user's dirs (state.py)."""
    podman_like = "         0       1001          1\n         1     100000      65536\n"
    assert privilege.userns_root(podman_like, euid=0)
    assert privilege.userns_root("0 1001 1\n", euid=0)
    assert not privilege.userns_root(podman_like, euid=1000)  # not root there
    assert not privilege.userns_root("0 0 4294967295\n", euid=0)  # the host's root
    assert not privilege.userns_root("0 0 1\n", euid=0)  # root's own namespace (unshare -Ur as root)
    assert privilege.outer_uid(0, podman_like) == 1001
    assert privilege.outer_uid(1000, podman_like) == 100999
    assert privilege.outer_uid(70000, podman_like) is None


def test_user_allow_other(tmp_path):
    conf = tmp_path / "fuse.conf"
    conf.write_text("# user_allow_other\n#user_allow_other\nmount_max = 1000\n")
    assert not privilege.user_allow_other(str(conf))
    conf.write_text("mount_max = 1000\n  user_allow_other\n")
    assert not privilege.user_allow_other(str(conf))  # fusermount3 does not strip leading blanks
    conf.write_text("mount_max = 1000\nuser_allow_other  # yes\n")
    assert privilege.user_allow_other(str(conf))
    assert not privilege.user_allow_other(str(tmp_path / "missing"))
