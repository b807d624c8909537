"""``pyoverlay serve`` itself: where it listens and who may use it, with the real docker
CLI and docker-py. ``docker version`` and ``docker info``; ``/_ping`` (GET and HEAD);
dockerd's endpoints pyoverlay does not implement (501, a clear message); TCP on loopback
(with a warning), any other address refused without TLS and served with it (client
certificates made here with openssl, in a private network namespace: no real network);
a second user cannot use root's socket; an ordinary user's own service (rootless)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from helpers import api, containers
from helpers.containers import pyoverlay_cmd
from helpers.mounts import REPO_ROOT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _raw(sock: Path, request: bytes) -> tuple[bytes, dict[str, str], bytes]:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(str(sock))
    s.sendall(request)
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {}
    for ln in lines[1:]:
        k, _, v = ln.decode().partition(":")
        headers[k.strip().lower()] = v.strip()
    return lines[0], headers, body


def _serve(rt, *args, timeout: float = 30) -> subprocess.CompletedProcess:
    """``pyoverlay serve ARGS`` expected to refuse to start."""
    return subprocess.run(
        [*pyoverlay_cmd(), "serve", *args],
        env=rt.env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


# --- system endpoints ------------------------------------------------------------------------


def test_docker_version_shows_every_server_field(service):
    fmt = "{{json .Server}}"
    srv = json.loads(service.docker_ok("version", "--format", fmt).stdout)
    assert srv["Platform"]["Name"] == "pyoverlay"
    assert srv["ApiVersion"] == "1.41" and srv["MinAPIVersion"] == "1.24"
    assert srv["Os"] == "linux" and srv["Arch"] and srv["KernelVersion"] == os.uname().release
    assert srv["Version"] and srv["GoVersion"].startswith("python3")
    engine = srv["Components"][0]
    assert engine["Name"] == "Engine"
    for k in ("ApiVersion", "Arch", "BuildTime", "Experimental", "GitCommit", "GoVersion", "KernelVersion", "Os"):
        assert k in engine["Details"], k
    out = service.docker_ok("version").stdout
    assert "Server: pyoverlay" in out and "API version:      1.41 (minimum version 1.24)" in out


def test_docker_info_counts_and_facts(service, rt, image):
    r = rt.run("--image", image, "--name", "info-stopped", "true")
    assert r.returncode == 0, r.stderr
    try:
        info = json.loads(service.docker_ok("info", "--format", "{{json .}}").stdout)
        assert (info["Containers"], info["ContainersRunning"], info["ContainersPaused"]) == (1, 0, 0)
        assert info["ContainersStopped"] == 1
        assert info["Images"] == 1
        assert info["Driver"] == "pyoverlay"
        assert info["DockerRootDir"] == str(rt.data)
        assert info["NCPU"] == os.cpu_count()
        assert info["MemTotal"] > 0
        assert info["KernelVersion"] == os.uname().release
        assert info["OSType"] == "linux" and info["OperatingSystem"]
        assert info["CgroupVersion"] in ("1", "2")
        text = service.docker_ok("info").stdout
        assert "Storage Driver: pyoverlay" in text and f"Docker Root Dir: {rt.data}" in text
    finally:
        rt.ok("rm", "info-stopped")


def test_ping_get_and_head_with_dockerds_headers(service):
    for method in (b"GET", b"HEAD"):
        status, headers, body = _raw(
            service.sock, method + b" /_ping HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n"
        )
        assert status.startswith(b"HTTP/1.1 200"), status
        assert headers["api-version"] == "1.41"
        assert headers["ostype"] == "linux"
        assert headers["docker-experimental"] == "false"
        assert headers["cache-control"] == "no-cache, no-store, must-revalidate"
        assert headers["pragma"] == "no-cache"
        assert body == (b"OK" if method == b"GET" else b"")


@pytest.mark.parametrize(
    ("args", "what"),
    [
        (["network", "create", "n1"], "network changes"),
        (["volume", "create", "v1"], "volumes"),
        (["search", "busybox"], "image search"),
        (["plugin", "ls"], "plugins"),
    ],
)
def test_unimplemented_endpoints_answer_501_clearly(service, args, what):
    r = service.docker(*args)
    assert r.returncode == 1
    assert f"pyoverlay serve does not implement {what}" in r.stderr, r.stderr


def test_unimplemented_is_501_and_unknown_is_404(service):
    status, _, body = _raw(service.sock, b"GET /v1.41/volumes HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 501")
    assert json.loads(body)["message"].startswith("pyoverlay serve does not implement volumes")
    status, _, body = _raw(service.sock, b"GET /v1.41/no/such/thing HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 404") and json.loads(body) == {"message": "page not found"}


def test_docker_py_version_and_ping(service):
    client = service.client()
    try:
        assert client.ping() is True
        assert client.version()["ApiVersion"] == "1.41"
        assert client.info()["Driver"] == "pyoverlay"
    finally:
        client.close()


# --- listening -------------------------------------------------------------------------------


def test_socket_mode_and_removal_on_sigterm(rt, tmp_path):
    sock = tmp_path / "svc" / "docker.sock"
    with containers.leftover_check(rt):
        svc = api.Service(rt, sock)
        try:
            st = os.stat(sock)
            assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
            # a second service on the same socket is refused (one line, exit 1)
            r = _serve(rt, "-H", f"unix://{sock}")
            assert r.returncode == 1 and r.stderr.count("\n") == 1
            assert "another service is already listening" in r.stderr
            svc.docker_ok("version")  # the first one still answers
        finally:
            assert svc.stop() == 0, svc.output()
        assert not os.path.lexists(sock)
        assert "stopped" in svc.output()


def test_stale_socket_is_replaced(rt, tmp_path):
    sock = tmp_path / "svc" / "docker.sock"
    sock.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))
    stale.close()  # a socket file nobody listens on
    with containers.leftover_check(rt):
        svc = api.Service(rt, sock)
        try:
            svc.docker_ok("version")
        finally:
            svc.stop()


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["-H", "ftp://x"], "'ftp' is not supported"),
        (["-H", "tcp://127.0.0.1:notaport"], "is not a number"),
        (["-H", "unix://relative/path"], "must be absolute"),
        (["--tlsverify", "-H", "tcp://127.0.0.1:2376"], "--tlsverify needs --tlscacert, --tlscert, --tlskey"),
        (["--tlscert", "/nonexistent"], "need --tlsverify"),
        (["-G", "no-such-group-xyz", "-H", "unix:///tmp/never-made.sock"], "no such group"),
    ],
)
def test_bad_options_one_line_nonzero(rt, args, why):
    r = _serve(rt, *args)
    assert r.returncode != 0
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("pyoverlay: "), r.stderr
    assert why in r.stderr
    assert not os.path.exists("/tmp/never-made.sock")


def test_tcp_on_loopback_works_and_warns(rt, tmp_path):
    port = _free_port()
    with containers.leftover_check(rt):
        svc = api.Service(rt, tmp_path / "svc" / "docker.sock", extra_args=("-H", f"tcp://127.0.0.1:{port}"))
        try:
            env = {**svc.env(), "DOCKER_HOST": f"tcp://127.0.0.1:{port}"}
            r = subprocess.run(
                [api.DOCKER, "version", "--format", "{{.Server.APIVersion}}"],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
                stdin=subprocess.DEVNULL,
            )
            assert r.returncode == 0, r.stderr
            assert r.stdout.strip() == "1.41"
            info = json.loads(svc.docker_ok("info", "--format", "{{json .Warnings}}").stdout)
            assert any(f"127.0.0.1:{port} without encryption" in w for w in info)
        finally:
            svc.stop()
        assert "anyone on this machine can use it" in svc.output()


def test_tcp_on_another_address_without_tls_is_refused(rt):
    r = _serve(rt, "-H", f"tcp://0.0.0.0:{_free_port()}")
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "without TLS" in r.stderr and "--tlsverify" in r.stderr


# --- TLS in a private network namespace ---------------------------------------------------------

NETNS_ADDR = "10.213.7.1"


def _openssl(*args, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=120)


def _certs(d: Path) -> None:
    """A CA, a server certificate for NETNS_ADDR and a client certificate, as docker's docs
    make them (``Protect the Docker daemon socket``)."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem", "-out", "ca.pem",
             "-days", "2", "-subj", "/CN=test-ca", cwd=d)  # fmt: skip
    for who, ext in (
        ("server", f"subjectAltName=IP:{NETNS_ADDR},IP:127.0.0.1"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{who}-key.pem", "-out", f"{who}.csr",
                 "-subj", f"/CN={who}", cwd=d)  # fmt: skip
        (d / f"{who}.ext").write_text(ext + "\n")
        _openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem", "-CAcreateserial",
                 "-out", f"{who}.pem", "-days", "2", "-extfile", f"{who}.ext", cwd=d)  # fmt: skip


def test_tls_with_client_certificates_in_a_private_netns(rt, tmp_path):
    certs = tmp_path / "certs"
    certs.mkdir()
    _certs(certs)
    sock = tmp_path / "svc" / "docker.sock"
    sock.parent.mkdir()
    log = tmp_path / "serve.log"
    port = 2376
    script = (
        # a non-loopback address on the namespace's own lo (no dummy driver needed)
        f"set -e; ip link set lo up; ip addr add {NETNS_ADDR}/32 dev lo; "
        # first the refusal, without TLS, on that (non-loopback) address
        f'if "$@" -H tcp://{NETNS_ADDR}:{port}; then exit 99; fi; '
        f'exec "$@" -H tcp://{NETNS_ADDR}:{port} -H unix://{sock} --tlsverify '
        f"--tlscacert {certs}/ca.pem --tlscert {certs}/server.pem --tlskey {certs}/server-key.pem"
    )
    with containers.leftover_check(rt), open(log, "wb") as logf:
        proc = subprocess.Popen(
            ["unshare", "--net", "--", "sh", "-c", script, "sh", *pyoverlay_cmd(), "serve"],
            env=rt.env,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 60
            while not os.path.exists(sock):
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            time.sleep(0.5)
            assert "refusing to listen on" in log.read_text()
            netns = ["nsenter", f"--net=/proc/{proc.pid}/ns/net", "--"]
            cfg = tmp_path / "docker-config"
            cfg.mkdir()
            env = {"PATH": os.environ["PATH"], "HOME": str(cfg), "DOCKER_CONFIG": str(cfg)}

            def docker(*args):
                return subprocess.run(
                    [*netns, api.DOCKER, "-H", f"tcp://{NETNS_ADDR}:{port}", *args],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=60,
                    stdin=subprocess.DEVNULL,
                )

            tls = ["--tlsverify", "--tlscacert", certs / "ca.pem"]
            r = docker(*tls, "--tlscert", certs / "client.pem", "--tlskey", certs / "client-key.pem", "version")
            assert r.returncode == 0, r.stderr + log.read_text()
            assert "Server: pyoverlay" in r.stdout
            r = docker(*tls, "version")  # no client certificate
            assert r.returncode != 0 and "Server: pyoverlay" not in r.stdout
            r = docker("version")  # plain HTTP
            assert r.returncode != 0 and "Server: pyoverlay" not in r.stdout
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        assert not os.path.lexists(sock)


# --- users ---------------------------------------------------------------------------------------


def test_another_user_cannot_use_roots_socket(rt, user):
    """The socket is 0660 root:root (no group pyoverlay here): EACCES for anyone else, even
    in a directory everyone may enter."""
    d = user.dir / "root-svc"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    sock = d / "docker.sock"
    with containers.leftover_check(rt):
        svc = api.Service(rt, sock)
        try:
            probe = (
                "import socket, sys\n"
                "s = socket.socket(socket.AF_UNIX)\n"
                "try:\n"
                f"    s.connect({str(sock)!r})\n"
                "except OSError as e:\n"
                "    print(e.errno); sys.exit(0)\n"
                "print('connected')\n"
            )
            r = user.run(["python3", "-c", probe])
            assert r.stdout.strip() == "13", r.stdout + r.stderr  # EACCES
            r = user.run([api.DOCKER, "-H", f"unix://{sock}", "version"], env={"DOCKER_CONFIG": str(user.dir)})
            assert r.returncode != 0 and "permission denied" in r.stderr
            svc.docker_ok("version")  # root still can
        finally:
            svc.stop()


def test_ordinary_users_own_service_is_rootless(user, images):
    """``pyoverlay serve`` as an ordinary user: the default socket in its XDG_RUNTIME_DIR
    (0600 in a 0700 dir), its own images; a tarball with a device node is refused."""
    with api.UserService(user, output=subprocess.PIPE) as us:
        sock = us.sock
        st = os.stat(sock)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (user.uid, 0o600)
        assert stat.S_IMODE(os.stat(sock.parent).st_mode) == 0o700
        r = us.docker("version", "--format", "{{.Server.APIVersion}}")
        assert r.returncode == 0 and r.stdout.strip() == "1.41", r.stderr
        r = us.docker("import", us.tar(images.bare.layers[0]), "userbb:1")
        assert r.returncode == 0, r.stderr
        r = us.docker("images", "--format", "{{.Repository}}:{{.Tag}}")
        assert r.returncode == 0 and r.stdout.split() == ["userbb:1"], r.stderr
        info = us.docker("info", "--format", "{{json .SecurityOptions}} {{.DockerRootDir}}")
        assert "name=rootless" in info.stdout and str(user.data_dir) in info.stdout
        # a device node in an import tarball: refused for an ordinary user
        dev = user.dir / "dev.tar"

        with tarfile.open(dev, "w") as tf:
            ti = tarfile.TarInfo("null")
            ti.type = tarfile.CHRTYPE
            ti.devmajor, ti.devminor = 1, 3
            tf.addfile(ti)
        os.chown(dev, user.uid, user.gid)
        r = us.docker("import", dev, "dev:1")
        assert r.returncode == 1 and "device nodes need root" in r.stderr, r.stdout + r.stderr
    assert not os.path.lexists(sock)


def test_roots_default_socket_dir_is_searchable_by_the_socket_group(tmp_path):
    """As root the default socket lives in the state dir (/run/pyoverlay): given to the
    socket group with mode 0710, which the state dir checks keep (every CLI command
    checks the state dir and would close anything else to 0700)."""
    from overlayfs_py.state import private_dir
    from runner.api.cli import socket_dir

    if os.geteuid() != 0:
        pytest.skip("needs root (chown to another group)")
    state = tmp_path / "state"
    gid = 4242  # any group other than root's
    socket_dir(str(state / "docker.sock"), True, gid)
    st = os.stat(state)
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o710, gid)
    private_dir(str(state), "state dir")  # what `pyoverlay run` does on each use
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o710
    os.chmod(state, 0o755)  # readable by others: still closed on use
    private_dir(str(state), "state dir")
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700


def test_an_error_before_the_upload_is_read_keeps_the_connection_usable(service):
    """An upload refused before its body is read (a bad ``--change``): the body is read
    and dropped, so the client can send it whole (no broken pipe) and the next request on
    the kept-alive connection is answered."""
    body = b"x" * 200_000
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(str(service.sock))
    try:
        s.sendall(
            b"POST /v1.41/images/create?fromSrc=-&changes=RUN%%20no HTTP/1.1\r\nHost: d\r\n"
            b"Content-Type: application/x-tar\r\nContent-Length: %d\r\n\r\n%s"
            b"GET /_ping HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n" % (len(body), body)
        )
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    finally:
        s.close()
    first, _, rest = data.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 400"), first
    assert b"RUN is not a valid change command" in rest
    assert b"HTTP/1.1 200" in rest and rest.endswith(b"OK"), rest[-300:]


def test_tcp_on_ipv6_loopback(rt, tmp_path):
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
            port = s.getsockname()[1]
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with containers.leftover_check(rt):
        svc = api.Service(rt, tmp_path / "svc" / "docker.sock", extra_args=("-H", f"tcp://[::1]:{port}"))
        try:
            r = subprocess.run(
                [api.DOCKER, "-H", f"tcp://[::1]:{port}", "version", "--format", "{{.Server.Os}}"],
                env={**svc.env(), "DOCKER_HOST": ""},
                capture_output=True,
                text=True,
                timeout=60,
                stdin=subprocess.DEVNULL,
            )
            assert r.returncode == 0 and r.stdout.strip() == "linux", r.stderr
        finally:
            svc.stop()
        assert f"tcp://[::1]:{port} has no TLS" in svc.output()


def test_docker_inspect_of_nothing_says_no_such_object(service):
    """``docker inspect NAME`` tries containers, images, networks, volumes, plugins...: the
    501s of what pyoverlay does not implement let it go on, as dockerd's 404s do."""
    r = service.docker("inspect", "nothing-by-that-name")
    assert r.returncode == 1
    assert "No such object: nothing-by-that-name" in r.stderr, r.stderr
