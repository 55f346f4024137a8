"""How a gossip world averages, validated once: the one configuration object that every facade
(``DecentOptimWrapper``, ``DecentralizedDataParallel``, the Lightning strategy) takes, so that an argument is
added, documented and checked in one place.

Each check raises ``ValueError("Invalid <name>=<value>. Must be ...")``; the facades share the first error of any
rank with all of them before anyone raises (see :func:`~decent_optim_wrapper.comm.agree`), and check that the
ranks agree on :meth:`GossipConfig.agreed`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from .buckets import check_bucket_cap
from .comm import as_timeout
from .topo import Topology, TopologyFactory

__all__ = ["GossipConfig", "LowRank", "PAIR_TRANSPORTS", "WIRE_DTYPES"]

PAIR_TRANSPORTS = ("auto", "p2p", "allreduce")
WIRE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class LowRank:
    """Low-rank gossip (PowerGossip, Vogels, Karimireddy and Jaggi, NeurIPS 2020): a pair exchanges a rank-``rank``
    approximation of the *difference* of its members' matrices, found by power iteration with a warm start kept
    per edge, instead of the matrices.

    Applies to every parameter with two or more dimensions (viewed as ``(shape[0], -1)``) where the factors are
    smaller than the matrix; the other parameters travel as without compression (in ``wire_dtype`` if one is
    set). Both members compute the same approximation to the last bit and apply equal and opposite corrections,
    so the global mean is kept. A group of more than two (``complete``, ``alternating-exp-ring``'s intra-node rounds
    with three or more ranks per node) goes edge by edge: each member exchanges factors with every other member,
    ``k-1`` a round.
    """

    rank: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"Invalid rank={self.rank!r}. Must be an integer >= 1.")

    def saves_bytes(self, rows: int, cols: int) -> bool:
        """Whether a ``rows x cols`` matrix is cheaper as factors, either way round, than as itself."""
        return self.rank * max(rows, cols) < rows * cols


@dataclass(frozen=True)
class GossipConfig:
    """How a gossip world averages. Every field is checked when the object is built.

    Args:
        topology: a registered topology name (``TopologyFactory.available()``), a ``Topology`` subclass or an
            instance built for this rank.
        local_world_size: ranks per node for hierarchical topologies; ``None`` or 0: ``LOCAL_WORLD_SIZE`` (set by
            torchrun), else 1.
        bucket_cap_mb: largest bucket, in MiB (``inf``: one bucket per device and dtype).
        timeout: seconds (or a ``timedelta``) a step or a global operation waits for its peers; ``None``:
            :data:`~decent_optim_wrapper.comm.DEFAULT_TIMEOUT`, 5 minutes.
        check_rounds: exchange a stamp with every round so that ranks out of step raise instead of mis-mixing.
        wire_dtype: the dtype parameters travel in (``torch.bfloat16``, ``torch.float16``); ``None``: their own.
        pair_transport: how full-precision pairs travel: ``"auto"``, ``"p2p"`` or ``"allreduce"``.
        check_finite: check after each mix and local update that the parameters are finite.
        compression: ``LowRank(rank=r)``: pairs exchange low-rank factors of their difference (see
            :class:`LowRank`); ``None``: the parameters themselves.
        max_delay: a round launched after step ``t`` is applied at step ``t + max_delay * gossip_every``, so its
            transfer overlaps that many forward/backward passes and optimizer steps; 1 (the default) is
            decent-optim-wrapper 0.1's order, bit for bit.
        gossip_every: launch a round every this many steps (local steps in between).
    """

    topology: str | Topology | type[Topology] = "ring"
    local_world_size: int | None = None
    bucket_cap_mb: float = 25
    timeout: float | timedelta | None = None
    check_rounds: bool = True
    wire_dtype: torch.dtype | None = None
    pair_transport: str = "auto"
    check_finite: bool = False
    compression: LowRank | None = None
    max_delay: int = 1
    gossip_every: int = 1

    def __post_init__(self) -> None:
        topology = self.topology
        if isinstance(topology, str):
            if topology not in TopologyFactory.registry:
                raise ValueError(f"Unknown topology={topology!r}. Registered topologies: "
                                 f"{TopologyFactory.available()}.")
        elif not isinstance(topology, Topology) and not (isinstance(topology, type) and issubclass(topology, Topology)):
            raise ValueError(f"Invalid topology={topology!r}. Must be a registered name "
                             f"({TopologyFactory.available()}), a Topology subclass or a Topology instance.")
        lws = self.local_world_size
        if lws is not None and (isinstance(lws, bool) or not isinstance(lws, int) or lws < 0):
            raise ValueError(f"Invalid local_world_size={lws!r}. Must be an integer >= 1.")
        check_bucket_cap(self.bucket_cap_mb)
        object.__setattr__(self, "timeout", as_timeout(self.timeout))
        for name in ("check_rounds", "check_finite"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Invalid {name}={getattr(self, name)!r}. Must be True or False.")
        if self.wire_dtype is not None and self.wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"Invalid wire_dtype={self.wire_dtype!r}. Must be None, torch.bfloat16, torch.float16 or "
                             "torch.float32.")
        if self.pair_transport not in PAIR_TRANSPORTS:
            raise ValueError(f"Invalid pair_transport={self.pair_transport!r}. Must be one of {list(PAIR_TRANSPORTS)}.")
        if self.compression is not None and not isinstance(self.compression, LowRank):
            raise ValueError(f"Invalid compression={self.compression!r}. Must be None or LowRank(rank=r).")
        for name in ("max_delay", "gossip_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Invalid {name}={value!r}. Must be an integer >= 1.")

    @property
    def timeout_delta(self) -> timedelta:
        """The timeout as a ``timedelta`` (validated)."""
        assert isinstance(self.timeout, timedelta)  # __post_init__ made it one
        return self.timeout

    def agreed(self) -> dict[str, Any]:
        """What every rank of a gossip world must set alike (the schedule and the layout are checked apart)."""
        return {"wire_dtype": str(self.wire_dtype), "check_rounds": self.check_rounds,
                "pair_transport": self.pair_transport, "compression": repr(self.compression),
                "max_delay": self.max_delay, "gossip_every": self.gossip_every}
