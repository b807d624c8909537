"""pyoverlay's own FUSE engine: the wire protocol spoken on /dev/fuse (no libfuse).

``proto`` is the protocol (the kernel's ``include/uapi/linux/fuse.h``), ``session`` the
mount and the request loop, ``ops`` the translation of requests to the core
(``core.Core``), the same calls ``fs.py`` makes for pyfuse3. Chosen with ``-o engine=direct``.
"""
