"""Seccomp (docs/runner.md, "Seccomp"): docker's default profile, ``--security-opt
seccomp=unconfined|FILE``, ``--privileged``, exec and ``--init`` under the filter.

Real containers run a small static C probe (built here with gcc, in a layer of its own on
busybox) that makes one syscall per name in a child of its own and prints ``NAME=ERRNO``
(0: the call succeeded): keyctl, unshare(CLONE_NEWUSER), personality, clone with a
namespace flag, clone3, socket(AF_VSOCK)... -- the calls docker's default profile refuses,
with the errno docker gives (EPERM; ENOSYS for clone3)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import containers, dockerd

EPERM, EACCES, ENOSYS, EINVAL, EXDEV = 1, 13, 38, 22, 18

PROBE_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/personality.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static long forked(unsigned long flags) {
    long pid = syscall(SYS_clone, flags | SIGCHLD, 0, 0, 0, 0);
    if (pid == 0) _exit(0);
    if (pid > 0) waitpid(pid, 0, 0);
    return pid < 0 ? -1 : 0;
}

static long probe(const char *name) {
    if (!strcmp(name, "keyctl")) return syscall(SYS_keyctl, 0 /* GET_KEYRING_ID */, -3 /* session */, 0);
    if (!strcmp(name, "unshare_user")) return unshare(CLONE_NEWUSER);
    if (!strcmp(name, "unshare_uts")) return unshare(CLONE_NEWUTS);
    if (!strcmp(name, "personality_query")) return personality(0xffffffff) == -1 ? -1 : 0;
    if (!strcmp(name, "personality_linux32")) return personality(PER_LINUX32) == -1 ? -1 : 0;
    if (!strcmp(name, "personality_norandom")) return personality(ADDR_NO_RANDOMIZE) == -1 ? -1 : 0;
    if (!strcmp(name, "clone_newuts")) return forked(CLONE_NEWUTS);
    if (!strcmp(name, "clone_plain")) return forked(0);
    if (!strcmp(name, "clone3")) return syscall(435 /* clone3 */, 0, 0);
    if (!strcmp(name, "socket_vsock")) { int fd = socket(40, SOCK_STREAM, 0); if (fd >= 0) close(fd); return fd; }
    if (!strcmp(name, "socket_unix")) { int fd = socket(AF_UNIX, SOCK_STREAM, 0); if (fd >= 0) close(fd); return fd; }
    if (!strcmp(name, "mkdir")) { long r = mkdir("/tmp/probe-dir", 0700); if (!r) rmdir("/tmp/probe-dir"); return r; }
    if (!strcmp(name, "rmdir_missing")) return rmdir("/tmp/no-such-dir");
    if (!strcmp(name, "getpid")) return getpid() > 0 ? 0 : -1;
    return -2;
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        int fds[2];
        if (pipe(fds)) return 2;
        pid_t pid = fork();
        if (pid == 0) {  /* one child per probe: a namespace or personality stays there */
            errno = 0;
            long r = probe(argv[i]);
            int e = r == -2 ? -1 : (r < 0 ? errno : 0);
            if (write(fds[1], &e, sizeof e) != sizeof e) _exit(3);
            _exit(0);
        }
        int e = -1;
        close(fds[1]);
        if (read(fds[0], &e, sizeof e) != sizeof e) e = -1;
        close(fds[0]);
        waitpid(pid, 0, 0);
        printf("%s=%d\n", argv[i], e);
    }
    return 0;
}
"""

#: what docker's default profile refuses (and the errno), for a container with docker's
#: default capabilities; "unconfined" the same calls without a filter
DENIED = {
    "keyctl": EPERM,
    "unshare_user": EPERM,
    "personality_norandom": EPERM,
    "clone_newuts": EPERM,
    "clone3": ENOSYS,
}
ALLOWED = ("personality_query", "personality_linux32", "clone_plain", "socket_unix", "mkdir", "getpid")
PROBES = (*DENIED, *ALLOWED)


@pytest.fixture(scope="module")
def probe_layer(tmp_path_factory) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is missing (scripts/setup installs it)")
    base = tmp_path_factory.mktemp("seccomp-probe")
    (base / "probe.c").write_text(PROBE_C)
    layer = base / "layer"
    (layer / "bin").mkdir(parents=True)
    r = subprocess.run(
        [gcc, "-static", "-O2", "-o", str(layer / "bin" / "probe"), str(base / "probe.c")],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0 and "cannot find -lc" in r.stderr:
        pytest.skip("no static libc (libc6-dev) for the probe")
    assert r.returncode == 0, r.stderr
    return layer


@pytest.fixture
def layers(probe_layer, img) -> str:
    return f"{probe_layer}:{img.spec}"


def probe(rt, layers: str, *opts: str, names=PROBES) -> dict[str, int]:
    r = rt.ok("run", "--rm", *opts, layers, "probe", *names)
    return parse(r.stdout)


def parse(out: str) -> dict[str, int]:
    got = {}
    for line in out.splitlines():
        k, _, v = line.partition("=")
        got[k] = int(v)
    return got


def seccomp_mode(rt, *args) -> str:
    r = rt.ok(*args, "grep", "^Seccomp:", "/proc/self/status")
    return r.stdout.split()[-1]


pytestmark = pytest.mark.usefixtures("_no_leftovers")


# --- the filter is there, or not ----------------------------------------------------------


def test_default_filter_is_loaded(rt, img):
    assert seccomp_mode(rt, "run", "--rm", img.spec) == "2"


@pytest.mark.parametrize("opts", [["--security-opt", "seccomp=unconfined"], ["--privileged"]])
def test_unconfined_and_privileged_have_no_filter(rt, img, opts):
    assert seccomp_mode(rt, "run", "--rm", *opts, img.spec) == "0"


def test_privileged_ignores_a_profile(rt, img, tmp_path):
    """docker: --privileged runs unconfined whatever the profile."""
    prof = tmp_path / "p.json"
    prof.write_text(json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": []}))
    assert seccomp_mode(rt, "run", "--rm", "--privileged", "--security-opt", f"seccomp={prof}", img.spec) == "0"


# --- docker's default profile ----------------------------------------------------------------


def test_default_profile_denies_with_dockers_errnos(rt, layers):
    got = probe(rt, layers)
    assert {k: got[k] for k in DENIED} == DENIED, got
    assert {k: got[k] for k in ALLOWED} == dict.fromkeys(ALLOWED, 0), got


def test_unconfined_lifts_the_filter(rt, layers):
    got = probe(rt, layers, "--security-opt", "seccomp=unconfined")
    for name in ("keyctl", "unshare_user", "personality_norandom"):
        assert got[name] == 0, got
    assert got["clone3"] == EINVAL, got  # the kernel's own answer to clone3(NULL, 0)
    # no CAP_SYS_ADMIN: the kernel, not the filter, refuses a new uts namespace
    assert got["clone_newuts"] == EPERM, got


def test_cap_add_sys_admin_allows_what_docker_allows(rt, layers):
    """The profile's includes/excludes follow the container's capabilities."""
    got = probe(rt, layers, "--cap-add", "SYS_ADMIN", names=(*PROBES, "unshare_uts"))
    assert got["clone_newuts"] == 0, got
    assert got["unshare_uts"] == 0, got
    assert got["clone3"] == EINVAL, got  # allowed: the kernel's answer
    assert got["keyctl"] == EPERM, got  # still not in the profile
    assert got["personality_norandom"] == EPERM, got


def test_no_new_privileges_with_privileged(rt, img):
    r = rt.ok("run", "--rm", "--privileged", img.spec, "grep", "^NoNewPrivs:", "/proc/self/status")
    assert r.stdout.split()[-1] == "0"
    r = rt.ok(
        "run",
        "--rm",
        "--privileged",
        "--security-opt",
        "no-new-privileges",
        img.spec,
        "grep",
        "^NoNewPrivs:",
        "/proc/self/status",
    )
    assert r.stdout.split()[-1] == "1"


# --- a profile of one's own -------------------------------------------------------------------


def test_custom_profile_denies_mkdir_with_its_errno(rt, layers, tmp_path):
    prof = tmp_path / "deny-mkdir.json"
    prof.write_text(
        json.dumps(
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [
                    {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": EACCES},
                    {"name": "rmdir", "action": "SCMP_ACT_ERRNO", "errnoRet": EXDEV},  # the old spelling
                    {
                        "names": ["personality"],
                        "action": "SCMP_ACT_ERRNO",
                        "args": [{"index": 0, "value": 0x0040000, "op": "SCMP_CMP_EQ"}],
                    },
                ],
            }
        )
    )
    got = probe(
        rt,
        layers,
        "--security-opt",
        f"seccomp={prof}",
        names=("mkdir", "rmdir_missing", "personality_norandom", "personality_linux32", "keyctl", "unshare_user"),
    )
    assert got == {
        "mkdir": EACCES,
        "rmdir_missing": EXDEV,
        "personality_norandom": EPERM,  # errnoRet unset: EPERM, as docker
        "personality_linux32": 0,  # another argument: allowed
        "keyctl": 0,  # the profile's default is allow
        "unshare_user": 0,
    }
    r = rt.cli("run", "--rm", "--security-opt", f"seccomp={prof}", layers, "mkdir", "/tmp/x")
    assert r.returncode == 1 and "Permission denied" in r.stderr, containers.describe(r)


def test_custom_default_errno(rt, layers, tmp_path):
    """defaultErrnoRet: what no rule allows fails with the profile's errno."""
    prof = tmp_path / "p.json"
    from runner import seccomp

    text = json.loads(Path(seccomp.default_profile_path()).read_text())
    text["defaultErrnoRet"] = EXDEV
    prof.write_text(json.dumps(text))
    got = probe(rt, layers, "--security-opt", f"seccomp={prof}", names=("keyctl", "clone3", "getpid"))
    assert got == {"keyctl": EXDEV, "clone3": ENOSYS, "getpid": 0}


def test_profile_flags_load_through_seccomp_2(rt, img, tmp_path):
    """A profile with flags is loaded with seccomp(2) (prctl takes none)."""
    prof = tmp_path / "p.json"
    prof.write_text(
        json.dumps(
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "flags": ["SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_SPEC_ALLOW"],
                "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 28}],
            }
        )
    )
    r = rt.cli("run", "--rm", "--security-opt", f"seccomp={prof}", img.spec, "mkdir", "/tmp/x")
    assert r.returncode == 1 and "No space left on device" in r.stderr, containers.describe(r)


BAD_PROFILES = {
    "not-json": ("{", "invalid JSON"),
    "no-action": (json.dumps({"syscalls": []}), "defaultAction"),
    "bad-action": (json.dumps({"defaultAction": "SCMP_ACT_NOPE"}), "unknown action 'SCMP_ACT_NOPE'"),
    "bad-op": (
        json.dumps(
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [
                    {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "args": [{"index": 0, "value": 1, "op": "SCMP_X"}]}
                ],
            }
        ),
        "unknown operator 'SCMP_X'",
    ),
    "bad-arch": (
        json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_VAX"]}),
        "unknown architecture 'SCMP_ARCH_VAX'",
    ),
    "name-and-names": (
        json.dumps(
            {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"name": "a", "names": ["b"], "action": "SCMP_ACT_ALLOW"}]}
        ),
        "use either 'name' or 'names'",
    ),
    "bad-index": (
        json.dumps(
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [
                    {
                        "names": ["mkdir"],
                        "action": "SCMP_ACT_LOG",
                        "args": [{"index": 7, "value": 1, "op": "SCMP_CMP_EQ"}],
                    }
                ],
            }
        ),
        "index: expected 0 to 5",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_PROFILES))
def test_bad_profile_is_one_line_125_and_nothing_left(rt, img, tmp_path, case):
    text, want = BAD_PROFILES[case]
    prof = tmp_path / "bad.json"
    prof.write_text(text)
    for detach in ([], ["-d"]):
        r = rt.cli("run", *detach, "--security-opt", f"seccomp={prof}", img.spec, "true")
        assert r.returncode == 125, containers.describe(r)
        assert r.stderr.count("\n") == 1 and want in r.stderr and str(prof) in r.stderr, containers.describe(r)
        assert rt.state_entries() == [] and rt.data_entries() == [] and rt.mounts() == []


@pytest.mark.parametrize(
    "opt,want",
    [
        ("seccomp=/no/such/profile.json", "opening seccomp profile (/no/such/profile.json) failed"),
        ("apparmor=docker-default", "not supported"),
        ("nonsense", "invalid --security-opt 'nonsense'"),
        ("no-new-privileges=maybe", "takes true or false"),
    ],
)
def test_bad_security_opt(rt, img, opt, want):
    r = rt.cli("run", "--rm", "--security-opt", opt, img.spec, "true")
    assert r.returncode == 125, containers.describe(r)
    assert r.stderr.count("\n") == 1 and want in r.stderr, containers.describe(r)
    assert rt.state_entries() == [] and rt.data_entries() == [] and rt.mounts() == []


def test_accepted_no_op_security_opts(rt, img):
    """What docker's other options ask is already so: no AppArmor profile, no label."""
    for opt in ("apparmor=unconfined", "label=disable", "seccomp:unconfined"):
        r = rt.ok("run", "--rm", "--security-opt", opt, img.spec, "true")
        assert r.returncode == 0


# --- exec and --init --------------------------------------------------------------------------


def test_exec_runs_under_the_containers_filter(rt, layers):
    cid = rt.detach(layers, "sleep", "300")
    try:
        r = rt.ok("exec", cid, "grep", "^Seccomp:", "/proc/self/status")
        assert r.stdout.split()[-1] == "2"
        got = parse(rt.ok("exec", cid, "probe", *DENIED).stdout)
        assert got == DENIED
    finally:
        rt.ok("rm", "-f", cid)


def test_exec_in_an_unconfined_container_is_unconfined(rt, layers):
    cid = rt.detach("--security-opt", "seccomp=unconfined", layers, "sleep", "300")
    try:
        r = rt.ok("exec", cid, "grep", "^Seccomp:", "/proc/self/status")
        assert r.stdout.split()[-1] == "0"
        assert parse(rt.ok("exec", cid, "probe", "keyctl").stdout) == {"keyctl": 0}
    finally:
        rt.ok("rm", "-f", cid)


def test_exec_uses_the_containers_custom_profile(rt, img, tmp_path):
    prof = tmp_path / "p.json"
    prof.write_text(
        json.dumps(
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": EACCES}],
            }
        )
    )
    cid = rt.detach("--security-opt", f"seccomp={prof}", img.spec, "sleep", "300")
    try:
        r = rt.cli("exec", cid, "mkdir", "/tmp/x")
        assert r.returncode == 1 and "Permission denied" in r.stderr, containers.describe(r)
    finally:
        rt.ok("rm", "-f", cid)


def test_init_runs_under_the_filter_and_still_works(rt, layers):
    """PID 1 (the reaper) is filtered too, as docker's init is; it still reaps and passes
    the status on."""
    script = "grep ^Seccomp: /proc/1/status; probe keyctl; sleep 0.2 & wait; exit 7"
    r = rt.cli("run", "--rm", "--init", layers, "sh", "-c", script, timeout=120)
    assert r.returncode == 7, containers.describe(r)
    lines = r.stdout.split("\n")
    assert lines[0].split()[-1] == "2", r.stdout
    assert "keyctl=1" in lines


# --- against a real dockerd (optional) ----------------------------------------------------


def test_probe_gives_dockers_errnos(rt, layers, probe_layer, tmp_path):
    """The probe under docker's own default profile (a private dockerd, --network none)
    gives the same errnos as under pyoverlay's."""
    missing = dockerd.missing_binaries()
    if missing:
        pytest.skip(f"no {', '.join(missing)}")
    ours = probe(rt, layers)
    image = tmp_path / "image"  # the probe and a /tmp (for its mkdir), nothing else
    (image / "tmp").mkdir(parents=True)
    shutil.copytree(probe_layer / "bin", image / "bin")
    tar = tmp_path / "probe.tar"
    subprocess.run(["tar", "-C", str(image), "-cf", str(tar), "."], check=True)
    (tmp_path / "d").mkdir()
    try:
        with dockerd.LiveDocker(tmp_path / "d") as d:
            d.docker("import", str(tar), "pyoverlay-seccomp-probe:1")
            r = d.docker("run", "--rm", "--network", "none", "pyoverlay-seccomp-probe:1", "/bin/probe", *PROBES)
            theirs = parse(r.stdout.decode())
            d_version = d.docker("version", "--format", "{{.Server.Version}}").stdout.decode()
    except dockerd.Unavailable as e:
        pytest.skip(str(e))
    assert ours == theirs, d_version


# --- the compiler, without a container ----------------------------------------------------


def _insns(bpf: bytes) -> list[tuple[int, int, int, int]]:
    """``struct sock_filter`` entries: (code, jt, jf, k)."""
    import struct

    return [struct.unpack_from("=HBBI", bpf, i) for i in range(0, len(bpf), 8)]


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86_64's sub-architectures")
def test_default_program_checks_x86_and_x32_by_their_own_numbers():
    from runner import seccomp
    from runner.spec import DOCKER_DEFAULT_CAPS

    f = seccomp.compile_filter("default", DOCKER_DEFAULT_CAPS)
    ks = {k for _code, _jt, _jf, k in _insns(f.bpf)}
    assert 0xC000003E in ks  # AUDIT_ARCH_X86_64 (x86_64 and x32)
    assert 0x40000003 in ks  # AUDIT_ARCH_I386: 32-bit x86 syscalls have their own branch
    assert 0x40000000 in ks  # __X32_SYSCALL_BIT: x32 told apart from x86_64
    # an old-style profile with the native architecture only has no i386 branch
    own = json.dumps({"defaultAction": "SCMP_ACT_ERRNO", "architectures": ["SCMP_ARCH_X86_64"], "syscalls": []})
    assert 0x40000003 not in {k for *_, k in _insns(seccomp.compile_filter(own, DOCKER_DEFAULT_CAPS).bpf)}


def test_includes_follow_caps_and_kernel():
    from runner import seccomp
    from runner.spec import CAPS, DOCKER_DEFAULT_CAPS

    def prog(caps, kernel="6.1.0"):
        return seccomp.compile_filter("default", caps, kernel=kernel).bpf

    base = prog(DOCKER_DEFAULT_CAPS)
    assert prog(DOCKER_DEFAULT_CAPS | {CAPS["SYS_ADMIN"]}) != base
    assert prog(DOCKER_DEFAULT_CAPS | {CAPS["SYS_TIME"]}) != base
    # ptrace & co are allowed from 4.8 on (includes.minKernel), else only with SYS_PTRACE
    assert prog(DOCKER_DEFAULT_CAPS, kernel="4.7.0") != prog(DOCKER_DEFAULT_CAPS, kernel="4.8.0")
    assert prog(DOCKER_DEFAULT_CAPS, kernel="4.8.0") == base
    assert seccomp.compile_filter("unconfined", DOCKER_DEFAULT_CAPS) is None
