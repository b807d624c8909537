"""The filesystem core an engine serves: the read side, the write path and the node budget.

``mount.build_overlay`` builds one (the one place where the objects are wired together);
an engine (``fs.py`` for pyfuse3) only translates its requests to calls on these objects
and their errors to replies. No FUSE types here.
"""

from __future__ import annotations

from dataclasses import dataclass

from .budget import NodeBudget
from .overlay import Overlay
from .workdir import Work
from .write import WritePath


@dataclass(frozen=True)
class Core:
    view: Overlay  # lookups, attributes, listings, reads, opens
    writes: WritePath  # every change (EROFS on a read-only overlay)
    budget: NodeBudget  # how many nodes (each holding a descriptor) are kept
    work: Work | None = None  # work/ of a writable overlay (closed with the core)

    def destroy(self) -> None:
        """Close every descriptor the core holds (the mount is going away)."""
        self.view.destroy()
        if self.work is not None:
            self.work.close()
