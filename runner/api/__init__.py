"""``pyoverlay serve``: the Docker Engine API on a unix socket (and TCP), so that the docker
CLI and docker-py drive pyoverlay's images and containers (docs/api.md).

* server.py: the HTTP/1.1 layer (stdlib ``http.server`` on threads, one per connection:
  a handler may block — a ``wait``, a log stream, an attach — without stalling others);
  dockerd's version prefix (``/v1.41/...``), its error bodies (``{"message": ...}``), chunked
  streams and the connection hijack (``Upgrade: tcp``) that attach and exec use.
* routes/handlers: one module per group of endpoints, each registering on a Router.
"""
