"""Seccomp: docker's profiles (its default, ``unconfined``, a JSON file) compiled to BPF.

``--security-opt seccomp=...`` is parsed here (:func:`parse_security_opts`), the profile
is checked when parsed (a one-line :class:`SeccompError`, exit status 125) and compiled
by :func:`compile` while the container is planned, as the user on the host, into the raw
BPF program the kernel takes (:class:`Filter`). PID 1 (and ``exec``'s child, and the
``--init`` reaper) loads it with :func:`install` as the last thing before ``execve``:
after the capabilities, no_new_privs and the ids (docs/runner.md, "Seccomp").

The compiler is libseccomp, through Debian's binding (python3-seccomp, its module
``seccomp``; scripts/setup links it into the venv): it resolves the names for each
architecture (x86_64 with its x86 and x32 sub-architectures, as docker adds them),
rewrites the multiplexed 32-bit calls (socketcall, ipc) and builds the program. What
the profile means (which rules apply to this container) is docker's logic, done here:
``includes``/``excludes`` by capability (the container's own set: ``--cap-add SYS_ADMIN``
allows mount, unshare, setns...), by architecture (Go's names: amd64, x32, arm64...) and
by kernel version; the rule for a name libseccomp does not know is skipped, as runc does.

Docker's default profile is read from Debian's golang-github-docker-docker-dev (moby's
source at the version of Debian's docker.io; scripts/setup installs it):
:data:`DOCKER_DEFAULT_PROFILE`, or the file ``$PYOVERLAY_SECCOMP_DEFAULT`` names.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import platform
import re
import tempfile
from dataclasses import dataclass
from typing import Any

from ..spec import CAPS, SpecError

DEFAULT = "default"
UNCONFINED = "unconfined"

#: moby's profiles/seccomp/default.json as Debian ships it (golang-github-docker-docker-dev)
DOCKER_DEFAULT_PROFILE = "/usr/share/gocode/src/github.com/docker/docker/profiles/seccomp/default.json"
PROFILE_ENV = "PYOVERLAY_SECCOMP_DEFAULT"


def default_profile_path() -> str:
    return os.environ.get(PROFILE_ENV) or DOCKER_DEFAULT_PROFILE


#: docker's action names (runtime-spec's LinuxSeccompAction)
ACTIONS = (
    "SCMP_ACT_KILL",
    "SCMP_ACT_KILL_THREAD",
    "SCMP_ACT_KILL_PROCESS",
    "SCMP_ACT_TRAP",
    "SCMP_ACT_ERRNO",
    "SCMP_ACT_TRACE",
    "SCMP_ACT_ALLOW",
    "SCMP_ACT_LOG",
)
_NOTIFY = "SCMP_ACT_NOTIFY"
OPS = (
    "SCMP_CMP_NE",
    "SCMP_CMP_LT",
    "SCMP_CMP_LE",
    "SCMP_CMP_EQ",
    "SCMP_CMP_GE",
    "SCMP_CMP_GT",
    "SCMP_CMP_MASKED_EQ",
)
#: the filter flags seccomp(2) takes with a plain filter (no listener)
FLAGS = {
    "SECCOMP_FILTER_FLAG_TSYNC": 1,
    "SECCOMP_FILTER_FLAG_LOG": 2,
    "SECCOMP_FILTER_FLAG_SPEC_ALLOW": 4,
}

#: uname's machine -> (libseccomp's arch, Go's GOARCH: what includes/excludes name)
_MACHINES = {
    "x86_64": ("x86_64", "amd64"),
    "aarch64": ("aarch64", "arm64"),
    "armv7l": ("arm", "arm"),
    "ppc64le": ("ppc64le", "ppc64le"),
    "s390x": ("s390x", "s390x"),
    "riscv64": ("riscv64", "riscv64"),
    "i686": ("x86", "386"),
}


class SeccompError(SpecError):
    """A --security-opt or a profile that cannot be used (one line; exit status 125)."""


@dataclass(frozen=True)
class SecurityOpts:
    seccomp: str = DEFAULT  # "default", "unconfined" or a profile's JSON text
    no_new_privileges: bool = False


@dataclass(frozen=True)
class Filter:
    """A compiled program: ``struct sock_filter`` entries (8 bytes each) and the flags
    for seccomp(2)."""

    bpf: bytes
    flags: int = 0
    profile: str = DEFAULT  # what it came from: "default" or "custom" (for ps/inspect)

    def to_record(self) -> dict:
        return {"bpf": base64.b64encode(self.bpf).decode(), "flags": self.flags, "profile": self.profile}

    @classmethod
    def from_record(cls, d: Any) -> Filter | None:
        if not isinstance(d, dict) or not isinstance(d.get("bpf"), str):
            return None
        return cls(base64.b64decode(d["bpf"]), int(d.get("flags") or 0), str(d.get("profile") or DEFAULT))


# --- --security-opt ---------------------------------------------------------------------------


def parse_security_opts(opts: list[str] | tuple[str, ...], *, inline_only: bool = False) -> SecurityOpts:
    """docker's ``--security-opt`` values: ``seccomp=unconfined|FILE`` (the API's
    ``seccomp=<JSON>``: the docker CLI reads the file and sends its text), ``no-new-privileges
    [=|:true|false]``; ``apparmor=unconfined`` and ``label=disable`` ask for what pyoverlay
    does anyway (no AppArmor profile, no SELinux label) and are accepted; any other is
    refused. With *inline_only* (the API) a ``seccomp=`` value that is not JSON is
    refused: the client must send the profile's text, the server reads no file."""
    seccomp = DEFAULT
    nnp = False
    for opt in opts:
        key, sep, value = opt.partition("=")
        if not sep and key != "no-new-privileges":
            key, sep, value = opt.partition(":")  # docker's old spelling, seccomp:unconfined
        if key == "no-new-privileges":
            if not sep or value == "true":
                nnp = True
            elif value == "false":
                nnp = False
            else:
                raise SeccompError(f"invalid --security-opt {opt!r}: no-new-privileges takes true or false")
        elif key == "seccomp" and sep:
            if value == UNCONFINED:
                seccomp = UNCONFINED
            elif value.lstrip().startswith("{"):
                check_profile(value, "the seccomp profile")
                seccomp = value
            elif inline_only:
                raise SeccompError(
                    f"invalid --security-opt seccomp={value[:40]}: expected unconfined or a JSON profile's text"
                )
            elif value in ("", DEFAULT):
                raise SeccompError(f"invalid --security-opt {opt!r}: expected seccomp=unconfined or seccomp=FILE")
            else:
                seccomp = read_profile_file(value)
        elif (key, value) in (("apparmor", "unconfined"), ("label", "disable")) and sep:
            continue
        elif key in ("apparmor", "label", "systempaths", "proc-opts", "mask", "unmask") and sep:
            raise SeccompError(
                f"--security-opt {opt} is not supported: pyoverlay applies no AppArmor profile or SELinux "
                "label (apparmor=unconfined and label=disable are accepted)"
            )
        else:
            raise SeccompError(f"invalid --security-opt {opt!r}")
    return SecurityOpts(seccomp, nnp)


def security_opt_of(seccomp: str, no_new_privileges: bool) -> list[str] | None:
    """HostConfig.SecurityOpt as docker's inspect shows it (a profile as its compact text,
    which is what the docker CLI sends), None when nothing was asked."""
    out = []
    if seccomp == UNCONFINED:
        out.append("seccomp=unconfined")
    elif seccomp != DEFAULT:
        out.append("seccomp=" + json.dumps(json.loads(seccomp), separators=(",", ":")))
    if no_new_privileges:
        out.append("no-new-privileges")
    return out or None


def read_profile_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise SeccompError(f"opening seccomp profile ({path}) failed: {e.strerror}") from None
    except UnicodeDecodeError:
        raise SeccompError(f"seccomp profile {path}: not UTF-8 text") from None
    check_profile(text, f"seccomp profile {path}")
    return text


# --- the profile ------------------------------------------------------------------------------


def default_profile_text() -> str:
    path = default_profile_path()
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise SeccompError(
            f"docker's default seccomp profile {path}: {e.strerror} (the Debian package "
            "golang-github-docker-docker-dev; scripts/setup installs it)"
        ) from None


def check_profile(text: str, what: str) -> dict:
    """*text* parsed and checked: every field docker reads has its type, every action, op,
    architecture and flag is known. SeccompError names *what* and the field."""
    try:
        prof = json.loads(text)
    except ValueError as e:
        raise SeccompError(f"{what}: invalid JSON: {e}") from None
    try:
        _check(prof)
    except _Bad as e:
        raise SeccompError(f"{what}: {e}") from None
    return prof


class _Bad(SeccompError):
    """What is wrong with a profile, before the message names the profile."""


def _want(cond: bool, msg: str) -> None:
    if not cond:
        raise _Bad(msg)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _str_list(v: Any, where: str) -> list[str]:
    if v is None:
        return []
    _want(isinstance(v, list) and all(isinstance(x, str) for x in v), f"{where}: expected a list of strings")
    return v


def _check(prof: Any) -> None:
    _want(isinstance(prof, dict), "expected a JSON object")
    act = prof.get("defaultAction")
    _want(isinstance(act, str) and act != "", "defaultAction is missing")
    _check_action(act, "defaultAction")
    for key in ("defaultErrnoRet",):
        _want(prof.get(key) is None or _is_int(prof[key]), f"{key}: expected an integer")
    _want(
        not (prof.get("architectures") and prof.get("archMap")),
        "'architectures' and 'archMap' were specified in the seccomp profile, use either 'architectures' or 'archMap'",
    )
    for a in _str_list(prof.get("architectures"), "architectures"):
        _arch(a)
    amap = prof.get("archMap")
    _want(amap is None or isinstance(amap, list), "archMap: expected a list")
    for m in amap or []:
        _want(isinstance(m, dict) and isinstance(m.get("architecture"), str), "archMap: expected {architecture, ...}")
        _arch(m["architecture"])
        for a in _str_list(m.get("subArchitectures"), "archMap subArchitectures"):
            _arch(a)
    for flag in _str_list(prof.get("flags"), "flags"):
        _want(flag in FLAGS, f"unknown flag {flag!r} (known: {', '.join(FLAGS)})")
    _want(not prof.get("listenerPath"), "listenerPath: seccomp notification is not supported")
    calls = prof.get("syscalls")
    _want(calls is None or isinstance(calls, list), "syscalls: expected a list")
    for i, call in enumerate(calls or []):
        where = f"syscalls[{i}]"
        _want(isinstance(call, dict), f"{where}: expected an object")
        name, names = call.get("name"), call.get("names")
        _want(
            not (name and names),
            "'name' and 'names' were specified in the seccomp profile, use either 'name' or 'names'",
        )
        _want(name is None or isinstance(name, str), f"{where}.name: expected a string")
        _str_list(names, f"{where}.names")
        _want(isinstance(call.get("action"), str), f"{where}.action is missing")
        _check_action(call["action"], f"{where}.action")
        _want(call.get("errnoRet") is None or _is_int(call["errnoRet"]), f"{where}.errnoRet: expected an integer")
        args = call.get("args")
        _want(args is None or isinstance(args, list), f"{where}.args: expected a list")
        for j, arg in enumerate(args or []):
            w = f"{where}.args[{j}]"
            _want(isinstance(arg, dict), f"{w}: expected an object")
            _want(_is_int(arg.get("index")) and 0 <= arg["index"] < 6, f"{w}.index: expected 0 to 5")
            for k in ("value", "valueTwo"):
                v = arg.get(k, 0)
                _want(_is_int(v) and 0 <= v < 1 << 64, f"{w}.{k}: expected an unsigned 64-bit integer")
            _want(arg.get("op") in OPS, f"{w}.op: unknown operator {arg.get('op')!r} (known: {', '.join(OPS)})")
        for part in ("includes", "excludes"):
            f = call.get(part)
            if f is None:
                continue
            _want(isinstance(f, dict), f"{where}.{part}: expected an object")
            _str_list(f.get("caps"), f"{where}.{part}.caps")
            _str_list(f.get("arches"), f"{where}.{part}.arches")
            mk = f.get("minKernel")
            _want(mk is None or (isinstance(mk, str) and _kernel(mk) is not None), f"{where}.{part}.minKernel: {mk!r}")


def _check_action(act: str, where: str) -> None:
    if act == _NOTIFY:
        raise _Bad(f"{where}: SCMP_ACT_NOTIFY is not supported (no seccomp agent)")
    _want(act in ACTIONS, f"{where}: unknown action {act!r}")


def _arch(name: str) -> str:
    """docker's SCMP_ARCH_X86_64 -> libseccomp's x86_64 (checked against libseccomp)."""
    _want(isinstance(name, str) and name.startswith("SCMP_ARCH_"), f"unknown architecture {name!r}")
    short = name.removeprefix("SCMP_ARCH_").lower()
    sc = _binding()
    try:
        sc.Arch(short)
    except (ValueError, RuntimeError):
        raise _Bad(f"unknown architecture {name!r}") from None
    return short


def _kernel(v: str) -> tuple[int, int] | None:
    m = re.match(r"^(\d+)\.(\d+)", v)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _binding():
    try:
        import seccomp  # type: ignore[import-not-found]  # Debian's python3-seccomp (libseccomp's binding)
    except ImportError:
        raise SeccompError(
            "seccomp: the libseccomp binding (Debian's python3-seccomp) is missing: run scripts/setup"
        ) from None
    return seccomp


# --- compiling --------------------------------------------------------------------------------


def compile_filter(seccomp: str, caps: frozenset[int] | None, *, kernel: str | None = None) -> Filter | None:
    """The program for the profile *seccomp* ("default", "unconfined", or JSON text) in a
    container keeping the capabilities *caps* (None: all). None for unconfined."""
    if seccomp == UNCONFINED:
        return None
    custom = seccomp != DEFAULT
    text = seccomp if custom else default_profile_text()
    prof = check_profile(text, "the seccomp profile" if custom else "docker's default seccomp profile")
    try:
        return _compile(prof, caps, kernel or os.uname().release, "custom" if custom else DEFAULT)
    except _Bad as e:
        raise SeccompError(f"the seccomp profile: {e}") from None


def _compile(prof: dict, caps: frozenset[int] | None, release: str, label: str) -> Filter:
    sc = _binding()
    machine = platform.machine()
    if machine not in _MACHINES:
        raise _Bad(f"architecture {machine} is not supported")
    native, goarch = _MACHINES[machine]
    cap_names = {f"CAP_{n}" for n, v in CAPS.items() if caps is None or v in caps}
    kver = _kernel(release) or (0, 0)
    default_errno = prof.get("defaultErrnoRet")
    default = _action(sc, prof["defaultAction"], default_errno)

    f = sc.SyscallFilter(default)
    arches: list[str] = [_arch(a) for a in prof.get("architectures") or []]
    for m in prof.get("archMap") or []:
        if _arch(m["architecture"]) == native:
            arches += [native] + [_arch(a) for a in m.get("subArchitectures") or []]
    for a in arches:
        arch = sc.Arch(a)
        if not f.exist_arch(arch):
            f.add_arch(arch)

    def applies(call: dict) -> bool:
        exc, inc = call.get("excludes") or {}, call.get("includes") or {}
        if goarch in (exc.get("arches") or []):
            return False
        if any(c in cap_names for c in exc.get("caps") or []):
            return False
        if exc.get("minKernel") and kver >= (_kernel(exc["minKernel"]) or (0, 0)):
            return False
        if inc.get("arches") and goarch not in inc["arches"]:
            return False
        if any(c not in cap_names for c in inc.get("caps") or []):
            return False
        return not (inc.get("minKernel") and kver < (_kernel(inc["minKernel"]) or (0, 0)))

    for call in prof.get("syscalls") or []:
        if not applies(call):
            continue
        action = _action(sc, call["action"], call.get("errnoRet"))
        if action == default:  # libseccomp refuses a rule that does what the default does
            continue
        conds = [
            sc.Arg(a["index"], getattr(sc, a["op"].removeprefix("SCMP_CMP_")), a.get("value", 0), a.get("valueTwo", 0))
            for a in call.get("args") or []
        ]
        # several conditions on one argument: one rule each (they are or-ed), as runc does
        indexes = [a["index"] for a in call.get("args") or []]
        groups = [[c] for c in conds] if len(set(indexes)) < len(indexes) else [conds]
        for name in call.get("names") or ([call["name"]] if call.get("name") else []):
            nr = sc.resolve_syscall(sc.Arch.NATIVE, name)
            if nr == -1:  # a name libseccomp does not know: skipped, as runc does
                continue
            for group in groups:
                try:
                    f.add_rule(action, nr, *group)
                except (OSError, RuntimeError, ValueError) as e:
                    raise _Bad(f"cannot add the rule for {name}: {e}") from None
    flags = 0
    for flag in prof.get("flags") or []:
        flags |= FLAGS[flag]
    with tempfile.TemporaryFile() as out:
        f.export_bpf(out)
        out.seek(0)
        bpf = out.read()
    if not bpf or len(bpf) % 8 or len(bpf) // 8 > 4096:
        raise _Bad(f"the compiled program has {len(bpf) // 8} instructions (the kernel takes 1 to 4096)")
    return Filter(bpf, flags, label)


def _action(sc, name: str, errno_ret: int | None) -> int:
    if name == "SCMP_ACT_ERRNO":
        return sc.ERRNO(errno.EPERM if errno_ret is None else errno_ret)
    if name == "SCMP_ACT_TRACE":
        return sc.TRACE(errno.EPERM if errno_ret is None else errno_ret)
    return {
        "SCMP_ACT_KILL": sc.KILL,
        "SCMP_ACT_KILL_THREAD": sc.KILL,
        "SCMP_ACT_KILL_PROCESS": sc.KILL_PROCESS,
        "SCMP_ACT_TRAP": sc.TRAP,
        "SCMP_ACT_ALLOW": sc.ALLOW,
        "SCMP_ACT_LOG": sc.LOG,
    }[name]


# --- loading ----------------------------------------------------------------------------------


def install(f: Filter | None) -> None:
    """Load *f* into this thread (PID 1 and exec's child are single-threaded): the last
    step before ``execve``. Needs no_new_privs or CAP_SYS_ADMIN."""
    if f is None:
        return
    from .. import _linux as L

    L.seccomp_set_filter(f.bpf, f.flags)
