"""How every round travels, decided in one place.

A :class:`Plan` is a pure description of what a :class:`~decent_optim_wrapper.config.GossipConfig` means on a
backend and a device; it holds no process group and no tensor. It answers:

* how each parameter travels (:meth:`Plan.lowrank`) and so each bucket (:meth:`Plan.kind`): ``"full"``
  precision, ``"wire"`` (rounded to ``wire_dtype``) or ``"lowrank"`` (factors of an edge's difference);
* for each group and kind, the :class:`Route`: the transport, its wire format, on how many connections, and the
  bytes a member sends per round (:meth:`Route.bytes`);
* which process groups a schedule needs, in the order every rank must create them (:meth:`Plan.process_groups`);
* why a configuration cannot run (:meth:`Plan.problem`).

The engine (:class:`~decent_optim_wrapper.gossip.Gossip`) builds the transports its routes name, the cost model
(:mod:`~decent_optim_wrapper.analysis`) prices the same routes, and a benchmark that measures another choice
passes ``Gossip(..., plan=replace(plan, one_connection=True))`` instead of patching the engine.

A new wire format touches four places: its validation (:data:`~decent_optim_wrapper.config.WIRE_DTYPES`), its
kernels (:mod:`~decent_optim_wrapper.mixing`), a transport class with its ``wire_bytes``
(:mod:`~decent_optim_wrapper.transport`), and the rule of :meth:`Plan.route` that picks it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .config import GossipConfig
from .topo import Group, Schedule
from .transport import (
    COMPRESSED_GATHER_MAX,
    AllGatherCompressed,
    AllReduceSum,
    LowRankEdges,
    P2PPair,
    P2PPairCompressed,
    P2PPairLowRank,
    Transport,
)

__all__ = ["Plan", "Route", "KINDS"]

KINDS = ("full", "wire", "lowrank")


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class Route:
    """How one group's buckets of one kind travel.

    Attributes:
        ranks: the group's ranks.
        kind: ``"full"``, ``"wire"`` or ``"lowrank"``.
        transport: the :class:`~decent_optim_wrapper.transport.Transport` class that moves and mixes them.
        wire_dtype: what travels, where it is not the buckets' own dtype.
        connections: 2 where a pair's two directions each have a connection of their own (gloo point to point),
            else 1.
        lowrank_rank: ``r`` of ``LowRank(rank=r)`` for low-rank routes.
    """

    ranks: tuple[int, ...]
    kind: str
    transport: type[Transport]
    wire_dtype: torch.dtype | None
    connections: int = 1
    lowrank_rank: int | None = None

    @property
    def point_to_point(self) -> bool:
        return self.transport.point_to_point

    def bytes(self, numel: int | float, element_size: int = 4, matrices: Sequence[tuple[int, int]] = ()) -> float:
        """Bytes one member sends in a round of ``numel`` elements of ``element_size`` bytes (ring all-reduce and
        all-gather: the usual ``2(k-1)/k`` and ``k-1``). Low-rank: ``r`` columns of one side of each of
        ``matrices`` (``(rows, cols)``), the sides taking turns, so the mean of the two, to each of the ``k-1``
        other members (edge by edge)."""
        if self.kind == "lowrank":
            r = self.lowrank_rank or 1
            return sum(r * (rows + cols) / 2 for rows, cols in matrices) * element_size * (len(self.ranks) - 1)
        wire = element_size if self.wire_dtype is None else _size(self.wire_dtype)
        return self.transport.wire_bytes(len(self.ranks), numel, wire)


@dataclass(frozen=True)
class Plan:
    """What ``config`` means on ``backend`` and ``device`` (see the module docstring).

    ``one_connection``: for measuring only (``benchmarks/pairwise_exchange.py``): gloo pairs keep both directions
    on one connection, as before that was measured to be slower.
    """

    config: GossipConfig = field(default_factory=GossipConfig)
    backend: str = "gloo"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    one_connection: bool = False

    # ------------------------------------------------------------------ what travels how
    def kinds(self) -> list[str]:
        """The kinds of buckets this configuration has."""
        return ["full"] + (["wire"] if self.config.wire_dtype is not None else []) + \
            (["lowrank"] if self.config.compression is not None else [])

    def lowrank(self, p: torch.Tensor) -> bool:
        """Whether parameter ``p`` travels as low-rank factors: a matrix (``(shape[0], -1)``) they make smaller."""
        low = self.config.compression
        return low is not None and p.dim() >= 2 and low.saves_bytes(p.shape[0], p.numel() // max(p.shape[0], 1))

    def kind(self, dtype: torch.dtype, lowrank: bool = False) -> str:
        """How a bucket of ``dtype`` travels: as low-rank factors (``lowrank``: its parameters are matrices that
        :meth:`lowrank` picked), rounded to the wire dtype where that is narrower than its own, or in full."""
        if lowrank:
            return "lowrank"
        wire = self.config.wire_dtype
        return "wire" if wire is not None and _size(wire) < _size(dtype) else "full"

    # ------------------------------------------------------------------ routes
    @property
    def two_connections(self) -> bool:
        """Point to point with each direction on a connection of its own: gloo (NCCL runs a batch both ways)."""
        return self.device.type == "cpu" and "nccl" not in self.backend and not self.one_connection

    def problem(self, group: Group) -> str | None:
        """Why ``group`` cannot gossip as configured, or ``None``. Low-rank gossip travels point to point, edge by
        edge (gloo has no point to point for CUDA tensors)."""
        if self.config.compression is None or group.size < 2:
            return None
        if self.device.type == "cuda" and "nccl" not in self.backend:
            return ("Invalid compression=LowRank(...) with CUDA tensors on gloo: it sends point to point, which gloo "
                    "cannot do for CUDA tensors; use NCCL.")
        return None

    def route(self, group: Group, kind: str = "full") -> Route:
        """The route of ``group``'s buckets of ``kind`` (a group of two or more ranks).

        * Pairs on gloo with CPU tensors: point to point, each direction on a connection of its own. Measured
          (``benchmarks/pairwise_exchange.py``, 12.8 MB): on a 1 Gbit/s emulated link 113 ms against 216 ms on one
          connection and 114 ms for a 2-rank all-reduce (107 ms one way); over loopback 12.6 ms against 13.8 and
          15.0 ms, and ahead at every size from 0.4 to 40 MB (``benchmarks/results/pairwise/``).
        * Pairs with CUDA tensors on gloo: gloo has no point to point for CUDA tensors (it aborts the process), so
          they use the collectives.
        * Pairs on NCCL: point to point (one exchange each way, no scaling pass; a 2-rank all-reduce moves the
          same bytes in two phases).
        * Larger groups: an all-reduce of ``c*x`` in full precision. With a wire dtype, groups of three gather
          every member's rounded values (a low-precision all-reduce would round the sum itself, and the mean would
          drift): each member sends ``2(k-1)`` bytes per element in bfloat16 against ``8(k-1)/k`` for a float32
          ring all-reduce, which is less only for ``k < 4``; larger groups stay in full precision.
        * Low-rank buckets: point to point, a pair's edge, or a larger group's every edge of this member (``k-1``
          projections a round). Measured against topologies of pairs and DDP + PowerSGD: ``benchmarks/README.md``,
          "Low-rank gossip in larger groups".

        ``config.pair_transport`` (``"p2p"`` or ``"allreduce"``) overrides the choice for full-precision pairs.
        """
        if kind not in KINDS:
            raise ValueError(f"Invalid kind={kind!r}. Must be one of {list(KINDS)}.")
        p2p_ok = not (self.device.type == "cuda" and "nccl" not in self.backend)
        wire = self.config.wire_dtype if kind == "wire" else None
        cls: type[Transport]
        if kind == "lowrank":
            problem = self.problem(group)
            if problem is not None:
                raise ValueError(problem)
            cls = P2PPairLowRank if group.size == 2 else LowRankEdges
        elif group.size == 2 and p2p_ok and wire is not None:
            cls = P2PPairCompressed
        elif group.size == 2 and p2p_ok and self.config.pair_transport != "allreduce":
            cls = P2PPair
        elif wire is not None and group.size <= COMPRESSED_GATHER_MAX:
            cls = AllGatherCompressed
        else:
            cls, wire = AllReduceSum, None
        low = self.config.compression
        return Route(group.ranks, kind, cls, wire, 2 if cls.point_to_point and self.two_connections else 1,
                     low.rank if kind == "lowrank" and low is not None else None)

    def process_groups(self, schedule: Schedule, world_size: int, check_rounds: bool = True
                       ) -> list[list[tuple[tuple[int, ...], str]]]:
        """Every process group ``schedule`` needs on any rank, in slots of disjoint groups (one slot per round and
        use), in the same order on every rank (see :meth:`~decent_optim_wrapper.comm.ProcessGroups.prepare`):
        ``"control"`` of everyone; per round the ``"data"`` groups of collective routes, ``"data-back"`` of
        everyone where pairs use two connections, and the ``"control"`` groups of groups larger than two."""
        everyone = tuple(range(world_size))
        slots: list[list[tuple[tuple[int, ...], str]]] = [[(everyone, "control")]]
        for groups in schedule.rounds:
            data: list[tuple[tuple[int, ...], str]] = []
            back: list[tuple[tuple[int, ...], str]] = []
            control: list[tuple[tuple[int, ...], str]] = []
            for g in sorted(groups, key=lambda g: g.ranks):
                if g.size < 2:
                    continue
                for kind in self.kinds():
                    route = self.route(g, kind)
                    if not route.point_to_point:
                        data.append((g.ranks, "data"))
                    elif route.connections == 2:
                        back = [(everyone, "data-back")]
                if g.size > 2 and check_rounds:
                    control.append((g.ranks, "control"))
            slots += [list(dict.fromkeys(slot)) for slot in (data, back, control) if slot]
        return slots
