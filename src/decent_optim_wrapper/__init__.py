"""decent-optim-wrapper: decentralized (gossip) data-parallel training for PyTorch.

Wrap the optimizer you already use; every ``step()`` does the local update, then non-blocking parameter
averaging with the neighbours a topology picks. Internal logging goes through loguru and is off until
``loguru.logger.enable("decent_optim_wrapper")``.
"""

from loguru import logger

from .comm import GossipError
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

# A library stays silent unless the application asks (loguru's convention for libraries).
logger.disable("decent_optim_wrapper")
