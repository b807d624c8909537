"""pyoverlay: OverlayFS reimplemented in userspace (pyfuse3 + trio).

The public API is small; the modules are described in docs/architecture.md.
"""

from .config import ConfigError as ConfigError
from .config import MountConfig as MountConfig
from .config import build_config as build_config

__version__ = "0.1.0"
