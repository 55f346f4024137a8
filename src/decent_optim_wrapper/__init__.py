"""decent-optim-wrapper: decentralized (gossip) data-parallel training for PyTorch.

Wrap the optimizer you already use; every ``step()`` does the local update, then non-blocking parameter
averaging with the neighbours a topology picks. Internal logging goes through loguru and is off until
``loguru.logger.enable("decent_optim_wrapper")``, which may come before or after this import.
"""

from loguru import logger

from .comm import GossipError
from .config import GossipConfig, LowRank
from .ddp import DecentralizedDataParallel
from .topo import (
    AlternatingExpRingTopology,
    CompleteTopology,
    Group,
    OnePeerExpTopology,
    RingTopology,
    Schedule,
    Topology,
    TopologyFactory,
    TorusTopology,
)
from .wrapper import DecentOptimWrapper

__all__ = [
    "DecentOptimWrapper",
    "DecentralizedDataParallel",
    "GossipError",
    "GossipConfig",
    "LowRank",
    "Topology",
    "TopologyFactory",
    "Group",
    "Schedule",
    "RingTopology",
    "CompleteTopology",
    "OnePeerExpTopology",
    "AlternatingExpRingTopology",
    "TorusTopology",
]
__version__ = "0.2.0"



def _disable_unless_chosen(name: str) -> None:
    """``logger.disable(name)``, unless the application already enabled or disabled ``name`` or a parent.

    loguru keeps those choices only in private state (``logger._core.activation_list``, pairs
    ``("name.", enabled)``); read it so that an ``enable`` made before this import survives it. ``disable``
    also drops the choices made for sub-modules, so they are put back. Should loguru store them elsewhere,
    nothing is known and the package is disabled, as loguru's convention for libraries has it (enabling after
    the import still works).
    """
    try:
        chosen = [(n, bool(on)) for n, on in logger._core.activation_list]  # type: ignore[attr-defined]
    except (AttributeError, TypeError, ValueError):
        chosen = []
    dotted = name + "."
    if any(isinstance(n, str) and dotted.startswith(n) for n, _ in chosen):
        return
    logger.disable(name)
    for n, on in sorted((c for c in chosen if isinstance(c[0], str) and c[0].startswith(dotted)),
                        key=lambda c: c[0].count(".")):  # parents before children, as they were applied
        (logger.enable if on else logger.disable)(n[:-1])


# A library stays silent unless the application asks (loguru's convention for libraries).
_disable_unless_chosen(__name__)
