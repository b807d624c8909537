"""The service answers the docker CLI's first questions: ``/_ping`` (HEAD and GET) and
``/version``."""

from __future__ import annotations


def test_docker_version_talks_to_the_service(service):
    r = service.docker_ok("version", "--format", "{{.Server.APIVersion}} {{.Server.Os}}")
    assert r.stdout.split() == ["1.41", "linux"]


def test_unknown_path_is_404_with_a_message(service):
    import json
    import socket

    s = socket.socket(socket.AF_UNIX)
    s.connect(str(service.sock))
    s.sendall(b"GET /v1.41/nope HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n")
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404")
    assert json.loads(body) == {"message": "page not found"}
