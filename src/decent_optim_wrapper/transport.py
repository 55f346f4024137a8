"""Transports: how one group's buckets travel in a round, and which mixing arithmetic turns them into the result.

Every transport has the same small interface: :meth:`Transport.launch` prepares and starts the
communication of a round for a list of buckets (non-blocking) and returns it as :class:`Piece` s, each the
communication of one part of a bucket and the mix that writes that part's result once the communication is
complete. The arithmetic lives in :mod:`~decent_optim_wrapper.mixing`.

=======================  ==================================================================  ========================
transport                what travels                                                        mixing
=======================  ==================================================================  ========================
``P2PPair``              a pair swaps snapshots of its buckets point to point (the peer's    ``pair_mix_sent_``
                         lands in a buffer); on gloo each direction on a connection of its
                         own
``AllReduceSum``         ``c*s`` of a snapshot ``s`` summed over the group by an all-reduce  ``group_mix_sent_``
                         (any group size)
``P2PPairCompressed``    a pair swaps its buckets rounded to the wire dtype                  ``compressed_pair_mix_``
``AllGatherCompressed``  every member's rounded bucket gathered on every member (the sum is  ``compressed_mix_``
                         then formed exactly, identically on every member)
``P2PPairLowRank``       a pair swaps the projections of its matrices on the edge's shared   ``lowrank_correction_``
                         basis (per-edge state, warm-started)
``LowRankEdges``         a larger group: ``P2PPairLowRank`` with every other member          ``lowrank_correction_``
                         (``k-1`` projections a round)
=======================  ==================================================================  ========================

**What was sent.** Every transport sends a copy made at launch, never the parameters themselves: the full-precision
ones a snapshot (buffer slot 1), the compressed ones the rounded values (slot 0). So a parameter written
between two steps (through ``p.data`` too, which no version counter sees) can neither reach a peer torn nor be
overwritten by the round: each mix applies the round's result computed from what was sent, plus what changed
since (see :mod:`~decent_optim_wrapper.mixing`). :meth:`Transport.sent` gives those copies, so that a
checkpoint can resume a round in flight with the very values it sent.

**Pieces.** On the CPU, pairs move a bucket in pieces of :data:`PIECE` elements, so that the round streams:
the first piece's mix runs while the next ones are still arriving, and (compressed) a piece is rounded while
the one before it is on the wire. When the link is the bottleneck this takes the mix and the rounding off
the critical path, which is otherwise communication, then the mix, the inner step and the next launch one
after another. The arithmetic is elementwise, so the result is bit for bit the same. Collectives move whole
buckets (an all-reduce of a piece sums in another order than one of the bucket), and so do CUDA tensors (the
host never waits for them; more pieces would only mean more kernel launches).

Which transport a group gets is decided by :meth:`~decent_optim_wrapper.plan.Plan.route`, per backend, device and
configuration (see there for the figures); this module only moves and mixes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import torch
import torch.distributed as dist

from .comm import WeakGroup, digest32
from .config import PAIR_TRANSPORTS
from .mixing import (
    compressed_mix_,
    compressed_pair_mix_,
    group_mix_sent_,
    lowrank_correction_,
    lowrank_project,
    orthonormal,
    pair_mix_sent_,
    quantize,
    scale_for_sum,
)
from .topo import Group

__all__ = ["Transport", "Piece", "PIECE", "P2PPair", "AllReduceSum", "P2PPairCompressed", "AllGatherCompressed",
           "P2PPairLowRank", "LowRankEdges", "PAIR_TRANSPORTS"]

# A buffer of the gossip state: (bucket index, slot, dtype[, numel]) -> tensor (default: the size of the bucket).
BufferFn = Callable[..., torch.Tensor]

# Elements per piece of a pair's bucket on the CPU (see the module docstring; measured in benchmarks/README.md).
PIECE = 1 << 19
# The largest group that gathers compressed values; larger ones all-reduce in full precision (fewer bytes).
COMPRESSED_GATHER_MAX = 3


@dataclass
class Piece:
    """Part of a launched round: the communication it waits for, and the mix that writes its result."""

    works: list[dist.Work]
    mix: Callable[[], object]


def spans(flat: torch.Tensor) -> list[tuple[int, int]]:
    """``(start, end)`` of the pieces a pair moves ``flat`` in: :data:`PIECE` elements on the CPU, else one."""
    n = flat.numel()
    step = PIECE if flat.device.type == "cpu" else max(n, 1)
    return [(a, min(a + step, n)) for a in range(0, n, step)]


class Transport(ABC):
    """Moves one round's data for one group of ranks and applies the mix.

    Args:
        group: this round's group (ranks of the gossip world) with its weights.
        rank: this process's rank in the gossip world.
        pg: the data process group of the group (point-to-point transports use the gossip world's group).
        peer: the peer's default-group rank, for point-to-point pairs.
        tag: base tag of point-to-point messages (gloo keeps tags apart; NCCL ignores them and relies on
            every rank issuing its exchanges in the same order, which the callers guarantee).
        wire_dtype: what compressed transports send.
        pg_back: point to point on gloo: the group this rank receives on (it sends on ``pg``; its peer the
            other way round), so that each direction has a connection of its own.
    """

    point_to_point = False  # True: addresses the peer by global rank on the gossip world's group
    sent_slot = 1  # the buffer slot that holds what this rank sent (the snapshot, or its rounded values)
    # What it sends is a copy of the bucket (or its rounded values), which a checkpoint can leave out where the
    # bucket still holds it; False: a checkpoint always keeps it (low-rank projections: small).
    sends_a_copy = True

    def __init__(self, group: Group, rank: int, pg: dist.ProcessGroup | None, peer: int | None = None,
                 tag: int = 0, wire_dtype: torch.dtype | None = None, pg_back: dist.ProcessGroup | None = None) -> None:
        self.group, self.rank, self.peer, self.tag, self.wire_dtype = group, rank, peer, tag, wire_dtype
        self._pg, self._pg_back = WeakGroup(pg), WeakGroup(pg_back)

    @property
    def pg(self) -> dist.ProcessGroup | None:
        return cast("dist.ProcessGroup | None", self._pg.get())

    @property
    def pg_back(self) -> dist.ProcessGroup | None:
        return cast("dist.ProcessGroup | None", self._pg_back.get())

    @abstractmethod
    def launch(self, flats: list[torch.Tensor], ids: list[int], buffer: BufferFn, tag: int = 0,
               resend: bool = False) -> list[Piece]:
        """Copy what is sent out of buckets ``flats`` (``ids``: their indices for ``buffer``) and start the
        communication; point-to-point messages take tags from :attr:`tag` ``+ tag`` on, one per piece.

        ``resend=True``: the buffers of :meth:`sent` already hold what to send (a round resumed from a
        checkpoint), so nothing is copied from the buckets.
        """

    def sent(self, ids: list[int], buffer: BufferFn, flats: list[torch.Tensor]) -> list[torch.Tensor]:
        """What this rank sent for each bucket (its buffer of :attr:`sent_slot`)."""
        return [buffer(i, self.sent_slot, self.wire_dtype or f.dtype) for f, i in zip(flats, ids)]

    def snapshot(self, flat: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out <-`` what a launch now would send of ``flat`` (a copy, or its rounded values)."""
        return out.copy_(flat) if self.wire_dtype is None else quantize(flat, out)

    @classmethod
    @abstractmethod
    def wire_bytes(cls, k: int, numel: int | float, element_size: int) -> float:
        """Bytes a member of a group of ``k`` sends in a round of ``numel`` elements that travel as
        ``element_size`` bytes each (the cost model prices routes with it; :meth:`bytes_sent` counts with it)."""

    def bytes_sent(self, flats: list[torch.Tensor], ids: list[int]) -> int:
        """Bytes this rank sends for the round of buckets ``flats``."""
        size = torch.empty((), dtype=self.wire_dtype).element_size() if self.wire_dtype is not None else None
        return int(sum(self.wire_bytes(self.group.size, f.numel(), size or f.element_size()) for f in flats))

    def _exchange(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], tag: int,
                  prepare: Callable[[int], object] | None = None) -> list[list[dist.Work]]:
        """Send each ``out`` to the peer and receive its ``in``, for ``(out, in)`` in ``pairs``; the works per pair.

        ``prepare(j)`` runs just before pair ``j`` is sent (it fills ``out``), so that preparing a pair overlaps
        sending the ones before it. With :attr:`pg_back` (gloo) this rank sends on :attr:`pg` and receives on
        ``pg_back``, while the peer does the opposite: each direction has a TCP connection of its own. gloo takes
        turns between the two directions of one connection, so this halves the time of an exchange on a real
        link (``benchmarks/pairwise_exchange.py``). Every receive is posted before the first send, so that a piece
        can land while the later ones are still being prepared. Without ``pg_back`` (NCCL) both directions of a
        pair go in one batch, which NCCL runs at once (unbatched, two ranks that both send first would wait for
        each other).
        """
        peer, pg, back, tag = self.peer, self.pg, self.pg_back, self.tag + tag
        assert peer is not None  # set by Gossip for every point-to-point transport
        out: list[list[dist.Work]] = []
        if back is None:
            for j, (send, recv) in enumerate(pairs):
                if prepare is not None:
                    prepare(j)
                out.append(dist.batch_isend_irecv([dist.P2POp(dist.isend, send, peer, pg, tag=tag + j),  # type: ignore[arg-type]
                                                   dist.P2POp(dist.irecv, recv, peer, pg, tag=tag + j)]))  # type: ignore[arg-type]
            return out
        recvs = [dist.irecv(recv, peer, group=back, tag=tag + j) for j, (_, recv) in enumerate(pairs)]
        for j, ((send, _), recv_work) in enumerate(zip(pairs, recvs)):
            if prepare is not None:
                prepare(j)
            out.append([w for w in (dist.isend(send, peer, group=pg, tag=tag + j), recv_work) if w is not None])
        return out


class P2PPair(Transport):
    """A pair swaps snapshots of its buckets point to point (slot 1: this rank's, slot 0: the peer's); each piece
    is copied just before it is sent, so copying the next overlaps sending this one."""

    point_to_point = True

    def launch(self, flats: list[torch.Tensor], ids: list[int], buffer: BufferFn, tag: int = 0,
               resend: bool = False) -> list[Piece]:
        parts = [(flat[a:b], buffer(i, 1, flat.dtype)[a:b], buffer(i, 0, flat.dtype)[a:b])
                 for flat, i in zip(flats, ids) for a, b in spans(flat)]
        prepare = (lambda j: parts[j][1].copy_(parts[j][0])) if not resend else None
        works = self._exchange([(sent, peer) for _, sent, peer in parts], tag, prepare)
        w = self.group.self_weight
        return [Piece(ws, partial(pair_mix_sent_, x, sent, peer, w)) for (x, sent, peer), ws in zip(parts, works)]

    @classmethod
    def wire_bytes(cls, k: int, numel: int | float, element_size: int) -> float:
        return numel * element_size


class AllReduceSum(Transport):
    """``c*s`` of a snapshot ``s`` summed over the group by an all-reduce (any group size; a pair over a
    2-member group). Slot 1 keeps ``s``, slot 0 is the all-reduced buffer."""

    def launch(self, flats: list[torch.Tensor], ids: list[int], buffer: BufferFn, tag: int = 0,
               resend: bool = False) -> list[Piece]:
        pieces = []
        g = self.group
        for flat, i in zip(flats, ids):
            sent = buffer(i, 1, flat.dtype)
            if not resend:
                sent.copy_(flat)
            buf = scale_for_sum(sent, g.peer_weight, buffer(i, 0, flat.dtype))
            work = dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.pg, async_op=True)
            pieces.append(Piece([work], partial(group_mix_sent_, flat, sent, buf, g.self_weight, g.peer_weight)))
        return pieces

    @classmethod
    def wire_bytes(cls, k: int, numel: int | float, element_size: int) -> float:
        return numel * element_size * 2 * (k - 1) / k  # ring all-reduce

    def bytes_sent(self, flats: list[torch.Tensor], ids: list[int]) -> int:
        k = self.group.size
        return sum(f.numel() * f.element_size() for f in flats) * 2 * (k - 1) // k


class P2PPairCompressed(Transport):
    """A pair swaps its buckets rounded to the wire dtype (slot 0: this rank's, slot 1: the peer's)."""

    point_to_point = True
    sent_slot = 0

    def launch(self, flats: list[torch.Tensor], ids: list[int], buffer: BufferFn, tag: int = 0,
               resend: bool = False) -> list[Piece]:
        wire = self.wire_dtype
        assert wire is not None  # set by Gossip for every compressed transport
        parts = [(flat[a:b], buffer(i, 0, wire)[a:b], buffer(i, 1, wire)[a:b]) for flat, i in zip(flats, ids)
                 for a, b in spans(flat)]
        prepare = (lambda j: quantize(parts[j][0], parts[j][1])) if not resend else None
        works = self._exchange([(mine, theirs) for _, mine, theirs in parts], tag, prepare)
        c = self.group.peer_weight
        return [Piece(w, partial(compressed_pair_mix_, x, mine, theirs, c))
                for (x, mine, theirs), w in zip(parts, works)]

    @classmethod
    def wire_bytes(cls, k: int, numel: int | float, element_size: int) -> float:
        return numel * element_size


class AllGatherCompressed(Transport):
    """Every member's bucket, rounded to the wire dtype, gathered on every member (slot j: member j's)."""

    def __init__(self, group: Group, rank: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(group, rank, *args, **kwargs)
        self.sent_slot = group.ranks.index(rank)

    def launch(self, flats: list[torch.Tensor], ids: list[int], buffer: BufferFn, tag: int = 0,
               resend: bool = False) -> list[Piece]:
        wire = self.wire_dtype
        assert wire is not None
        me = self.sent_slot
        pieces = []
        for flat, i in zip(flats, ids):
            slots = [buffer(i, j, wire) for j in range(self.group.size)]
            if not resend:
                quantize(flat, slots[me])
            work = dist.all_gather(slots, slots[me], group=self.pg, async_op=True)
            pieces.append(Piece([work], partial(compressed_mix_, flat, slots[me], slots, self.group.peer_weight)))
        return pieces

    @classmethod
    def wire_bytes(cls, k: int, numel: int | float, element_size: int) -> float:
        return numel * element_size * (k - 1)  # ring all-gather: every member's piece, once


class P2PPairLowRank(Transport):
    """A pair exchanges, for every matrix of a low-rank bucket, the projection of what it holds on the edge's
    shared basis (``rank`` columns of one side of the matrix) and applies the rank-``rank`` approximation of its
    difference as equal and opposite corrections (:func:`~decent_optim_wrapper.mixing.lowrank_correction_`).

    The bases are per-edge state, warm-started: after a round the edge's basis of each matrix is the other side,
    ``orthonormal(D)``, so successive rounds are the steps of a power iteration on the pair's difference. They
    start from a random orthonormal basis that both members draw from the same seed: the edge, bucket and matrix, and
    nothing else (not which wrapper of the process this is), so that a run rebuilt and resumed draws the same ones.

    What a round sends lives in buffer slot 1 as ``[projections | bases they were taken on | sides]`` (fixed size:
    every matrix's widest side), so that a checkpoint can resume a round in flight exactly; slot 0 receives the
    peer's projections.
    """

    point_to_point = True
    sends_a_copy = False

    def __init__(self, group: Group, rank: int, pg: dist.ProcessGroup | None, peer: int | None = None,
                 tag: int = 0, wire_dtype: torch.dtype | None = None, pg_back: dist.ProcessGroup | None = None, *,
                 rank_r: int = 1, layout: Callable[[int], list[tuple[int, int, int]]] | None = None) -> None:
        super().__init__(group, rank, pg, peer, tag, None, pg_back)
        if group.size != 2:
            raise ValueError(f"internal error: low-rank gossip needs a pair, got group {list(group.ranks)}")
        self.r = rank_r
        self.layout = layout if layout is not None else (lambda i: [])
        self.low = rank == min(group.ranks)
        self.bases: dict[tuple[int, int], tuple[bool, torch.Tensor]] = {}  # (bucket, matrix) -> (right, basis)

    def _room(self, i: int) -> int:
        """Room for the projections of bucket ``i``, and as much for the bases: every matrix's widest side, ``r``
        columns."""
        return sum(self.r * max(rows, cols) for _, rows, cols in self.layout(i))

    def _numel(self, rows: int, cols: int, right: bool) -> int:
        """Elements of a projection of a ``rows x cols`` matrix on a basis of its right side (else its left)."""
        return self.r * (rows if right else cols)

    def basis(self, i: int, j: int, rows: int, cols: int, like: torch.Tensor) -> tuple[bool, torch.Tensor]:
        """The edge's current basis of matrix ``j`` of bucket ``i``: ``(right, basis^T)`` (``r x cols`` or
        ``r x rows``, see :mod:`~decent_optim_wrapper.mixing`); drawn at first use."""
        if (i, j) not in self.bases:
            g = torch.Generator().manual_seed(digest32(0, self.group.ranks, i, j))
            start = torch.randn(cols, self.r, generator=g, dtype=torch.float64)
            q = torch.linalg.qr(start).Q if self.r > 1 else start / torch.linalg.vector_norm(start)
            self.bases[i, j] = (True, q.t().contiguous().to(device=like.device, dtype=like.dtype))
        return self.bases[i, j]

    def sent_numel(self, i: int) -> int:
        """Elements of what a round sends of bucket ``i`` and keeps for a checkpoint: projections, bases, sides."""
        return 2 * self._room(i) + len(self.layout(i))

    def sent(self, ids: list[int], buffer: BufferFn, flats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [buffer(i, 1, f.dtype, self.sent_numel(i)) for f, i in zip(flats, ids)]

    def launch(self, flats: list[torch.Tensor], ids: list[int], buffer: BufferFn, tag: int = 0,
               resend: bool = False) -> list[Piece]:
        pairs, parts = [], []
        for flat, i, sent in zip(flats, ids, self.sent(ids, buffer, flats)):
            mats = self.layout(i)
            room = self._room(i)
            sides = sent[2 * room:]
            # Each matrix's side, kept on the host for the exchange's size and the mix; only a round resumed from a
            # checkpoint reads it back from what it sent (on CUDA, a host synchronisation once per resume).
            rights: list[bool] = [bool(f) for f in sides.tolist()] if resend else []
            if not resend:
                p = b = 0
                for j, (offset, rows, cols) in enumerate(mats):
                    right, basis = self.basis(i, j, rows, cols, flat)
                    rights.append(right)
                    n_proj = self._numel(rows, cols, right)
                    sent[room + b:room + b + basis.numel()].copy_(basis.reshape(-1))
                    sides[j] = 1.0 if right else 0.0
                    x = flat[offset:offset + rows * cols].view(rows, cols)
                    lowrank_project(x, basis, right, out_t=sent[p:p + n_proj].view(self.r, -1))
                    p, b = p + n_proj, b + basis.numel()
            used = sum(self._numel(rows, cols, right) for (_, rows, cols), right in zip(mats, rights))
            recv = buffer(i, 0, flat.dtype, room)[:used]
            pairs.append((sent[:used], recv))
            parts.append((flat, i, mats, rights, sent, recv, room))
        works = self._exchange(pairs, tag)
        return [Piece(w, partial(self._mix, *part)) for part, w in zip(parts, works)]

    @torch.no_grad()
    def _mix(self, flat: torch.Tensor, i: int, mats: list[tuple[int, int, int]], rights: list[bool],
             sent: torch.Tensor, recv: torch.Tensor, room: int) -> None:
        scale = -self.group.peer_weight if self.low else self.group.peer_weight
        p = b = 0
        for j, ((offset, rows, cols), right) in enumerate(zip(mats, rights)):
            n_proj, n_basis = self._numel(rows, cols, right), self._numel(rows, cols, not right)
            mine, theirs = sent[p:p + n_proj].view(self.r, -1), recv[p:p + n_proj].view(self.r, -1)
            basis = sent[room + b:room + b + n_basis].view(self.r, -1)
            low, high = (mine, theirs) if self.low else (theirs, mine)
            x = flat[offset:offset + rows * cols].view(rows, cols)
            d = lowrank_correction_(x, low, high, basis, right, scale)
            # the next round of this edge works on the other side, from this difference (the same on both members)
            other = orthonormal(d, self.bases.get((i, j), (right, None))[1])
            self.bases[i, j] = (not right, other.clone())
            p, b = p + n_proj, b + n_basis

    @classmethod
    def wire_bytes(cls, k: int, numel: int | float, element_size: int) -> float:
        raise TypeError("low-rank bytes depend on the matrices: see Route.bytes")

    def bytes_sent(self, flats: list[torch.Tensor], ids: list[int]) -> int:
        # the sides of the next launch: the bases as they are now (a launch does not change them)
        total = 0
        for f, i in zip(flats, ids):
            for j, (_, rows, cols) in enumerate(self.layout(i)):
                right = self.bases.get((i, j), (True, None))[0]
                total += self._numel(rows, cols, right) * f.element_size()
        return total

    def state(self) -> dict[str, Any]:
        """The edge's bases: ``"i/j"`` -> basis, ``"i/j/right"`` -> side (for a checkpoint)."""
        out: dict[str, Any] = {}
        for (i, j), (right, basis) in self.bases.items():
            out[f"{i}/{j}"], out[f"{i}/{j}/right"] = basis, right
        return out

    def load_state(self, state: dict[str, Any]) -> None:
        self.bases = {}
        for key, value in state.items():
            if not key.endswith("/right"):
                i, j = (int(v) for v in key.split("/"))
                self.bases[i, j] = (bool(state[f"{key}/right"]), value.clone())


class LowRankEdges(Transport):
    """Low-rank gossip in a group of three or more, edge by edge: this member runs a :class:`P2PPairLowRank` with
    each other member, with the group's peer weight ``c``, so that

        x_i <- x_i + c * sum_{j != i} approx_ij(x_j - x_i)

    where ``approx_ij`` is the edge's rank-``r`` approximation, the same to the last bit on both of its members
    (equal and opposite corrections: the group's sum is kept up to the final additions' rounding). With exact
    differences this is the group's average. Each ``approx_ij`` is an orthogonal projection of the difference (the
    same on both members), so the round moves the members no further apart or past each other than the average
    would: with ``c <= 1/k`` it never overshoots. Each edge keeps its own bases (warm-started round after round).

    A member sends ``k - 1`` projections a round. The edges run in ascending order of the peer's rank, which is
    the order of the edges ``(low, high)`` on every member: NCCL (which ignores tags and runs each exchange as a
    batch of its own) never waits in a cycle. Buffers: edge ``e`` uses the ``e``-th part of the group's, so that
    what a round sent (:meth:`sent`) is one tensor per bucket, as a checkpoint keeps it.
    """

    point_to_point = True
    sends_a_copy = False

    def __init__(self, group: Group, rank: int, edges: list[P2PPairLowRank]) -> None:
        super().__init__(group, rank, None)
        if len(edges) != group.size - 1:
            raise ValueError(f"internal error: {len(edges)} edges for rank {rank} in group {list(group.ranks)}")
        self.edges = edges

    def other(self, edge: P2PPairLowRank) -> int:
        """The gossip-world rank of ``edge``'s other member."""
        return next(r for r in edge.group.ranks if r != self.rank)

    def _edge_buffer(self, buffer: BufferFn, e: int) -> BufferFn:
        n = len(self.edges)

        def part(i: int, slot: int, dtype: torch.dtype, numel: int) -> torch.Tensor:
            return buffer(i, slot, dtype, n * numel)[e * numel:(e + 1) * numel]
        return part

    def sent(self, ids: list[int], buffer: BufferFn, flats: list[torch.Tensor]) -> list[torch.Tensor]:
        n = len(self.edges)
        return [buffer(i, 1, f.dtype, n * self.edges[0].sent_numel(i)) for f, i in zip(flats, ids)]

    def launch(self, flats: list[torch.Tensor], ids: list[int], buffer: BufferFn, tag: int = 0,
               resend: bool = False) -> list[Piece]:
        # Every edge's messages may share tags: they go to different peers, and gloo matches tags per peer.
        return [piece for e, edge in enumerate(self.edges)
                for piece in edge.launch(flats, ids, self._edge_buffer(buffer, e), tag, resend)]

    @classmethod
    def wire_bytes(cls, k: int, numel: int | float, element_size: int) -> float:
        raise TypeError("low-rank bytes depend on the matrices: see Route.bytes")

    def bytes_sent(self, flats: list[torch.Tensor], ids: list[int]) -> int:
        return sum(edge.bytes_sent(flats, ids) for edge in self.edges)

    @property
    def bases(self) -> dict[tuple[int, int, int], tuple[bool, torch.Tensor]]:
        """Every edge's bases: ``(other member, bucket, matrix) -> (right, basis^T)``."""
        return {(self.other(edge), i, j): v for edge in self.edges for (i, j), v in edge.bases.items()}

    def state(self) -> dict[str, Any]:
        """Every edge's :meth:`P2PPairLowRank.state`, keys prefixed with the other member's rank: ``"j:..."``."""
        return {f"{self.other(edge)}:{k}": v for edge in self.edges for k, v in edge.state().items()}

    def load_state(self, state: dict[str, Any]) -> None:
        for edge in self.edges:
            prefix = f"{self.other(edge)}:"
            edge.load_state({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
