"""Who is shown ``trusted.*`` names by listxattr, compared with the kernel overlay
(docs/semantics.md, "Private xattrs"): the kernel's ``ovl_can_list`` shows them to a caller
with CAP_SYS_ADMIN in the initial user namespace, not by uid. Root with the capability
dropped sees none; an ordinary user holding it sees them. (getxattr and setxattr of
``trusted.*`` are refused by the VFS before the filesystem is asked, for both.)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from helpers.stacks import F
from helpers.writeops import run_pair

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]

SETPRIV = shutil.which("setpriv")

LIST = "import json, os, sys; print(json.dumps(sorted(os.listxattr(sys.argv[1]))))"


def _layers():
    return [{"keep": F(b"k\n")}, {"f": F(b"f\n", xattrs={"trusted.t": b"1", "user.u": b"2"})}]


def _list_as(path, *setpriv_args):
    r = subprocess.run(
        [SETPRIV, *setpriv_args, sys.executable, "-c", LIST, str(path)], capture_output=True, text=True, timeout=60
    )
    if r.returncode != 0:
        return "FAILED: " + r.stderr.strip().splitlines()[-1]
    return json.loads(r.stdout)


def _ops(m, rec):
    rec.do("root", _list_as, m / "f")
    rec.do(
        "root without CAP_SYS_ADMIN",
        _list_as,
        m / "f",
        "--inh-caps=-sys_admin",
        "--bounding-set=-sys_admin",
    )
    rec.do(
        "uid 1000 with CAP_SYS_ADMIN",
        _list_as,
        m / "f",
        "--reuid=1000",
        "--regid=1000",
        "--clear-groups",
        "--inh-caps=+sys_admin,+dac_read_search",
        "--ambient-caps=+sys_admin,+dac_read_search",
    )
    rec.do(
        "uid 1000",
        _list_as,
        m / "f",
        "--reuid=1000",
        "--regid=1000",
        "--clear-groups",
        "--inh-caps=+dac_read_search",
        "--ambient-caps=+dac_read_search",
    )


@pytest.mark.skipif(SETPRIV is None, reason="needs setpriv(1) (util-linux)")
def test_trusted_names_listed_by_capability(tmp_path):
    run = run_pair(tmp_path, _layers(), _ops)
    k = run.k.results
    assert k["root"] == ["trusted.t", "user.u"]
    assert k["root without CAP_SYS_ADMIN"] == ["user.u"]
    assert k["uid 1000 with CAP_SYS_ADMIN"] == ["trusted.t", "user.u"]
    assert k["uid 1000"] == ["user.u"]
    run.assert_results()
