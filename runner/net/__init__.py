"""Container networks: the root bridge (``pyoverlay0``), rootless networking, published
ports. Plain option parsing lives in :mod:`runner.net.ports`; what touches links,
addresses and firewall tables is kept in this package, away from the rest of the runner."""
