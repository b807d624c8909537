"""The workloads in the order they run (names as in the performance reference)."""

from .base import Ctx, Workload  # noqa: F401
from .reads import (  # noqa: F401
    ImportCold,
    ImportWarm,
    RandRead,
    ReaddirBig,
    ReaddirBigStat,
    SeqReadAgain,
    SeqReadFirst,
    SmallReadCold,
    SmallReadWarm,
    WalkCold,
    WalkWarm,
)
from .writes import (
    ChownR,
    CopyupBig,
    CopyupSmall,
    Create,
    RenameLowerDir,
    RmTree,
    SeqWrite,
    Unlink,
    Untar,
    Whiteout,
)

ALL = [
    WalkCold(),
    WalkWarm(),
    ReaddirBig(),
    ReaddirBigStat(),
    SmallReadCold(),
    SmallReadWarm(),
    SeqReadFirst(),
    SeqReadAgain(),
    RandRead(),
    ImportCold(),
    ImportWarm(),
    Create(),
    Unlink(),
    Whiteout(),
    CopyupSmall(),
    CopyupBig(),
    SeqWrite(),
    Untar(),
    RmTree(),
    RenameLowerDir(),
    ChownR(),
]
BY_NAME = {w.name: w for w in ALL}
__all__ = ["ALL", "BY_NAME", "Ctx", "Workload"]
