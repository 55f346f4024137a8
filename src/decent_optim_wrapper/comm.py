"""The gossip engine: launches one round of neighbour averaging over the buckets, waits for it, applies it.

Round ``t`` puts rank ``i`` in group ``G`` with self-weight ``w`` and peer weight ``c = (1-w)/(|G|-1)``
(uniform: ``w = c = 1/|G|``). The mix is ``x_i <- w*x_i + c * sum_{j in G, j != i} x_j``.

* ``|G| == 1``: nothing to do.
* ``|G| == 2``: point-to-point exchange. The bucket is sent as it is (nothing writes it before the next
  ``step()`` waits for the send) and the peer's bucket lands in the receive buffer; the mix is one pass,
  ``x_i*w + x_j*(1-w)``. With uniform weights this is bit for bit what the all-reduce of ``x*0.5`` gives.
* otherwise: ``buffer = x_i * c`` (one pass), a non-blocking SUM all-reduce over the group's process group,
  then ``x_i <- buffer`` for uniform weights (or ``x_i*(w-c) + buffer``). This is decent-optim-wrapper 0.1's
  arithmetic, so the same seeds give the same numbers.

Process groups: the world group serves a group of all ranks; other groups of three or more ranks get a
process group created once at construction, only by their members.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from loguru import logger

from .buckets import Bucket
from .topo import Group, Schedule

__all__ = ["GossipEngine"]

# Rounds still in flight when their engine was garbage-collected. gloo breaks the exchange for every later
# send and receive if an in-flight point-to-point Work is destroyed, so such Works (and the tensors they
# read and write) are kept here until they complete.
_ORPHANS: list[tuple[list[dist.Work], list[torch.Tensor]]] = []


def _prune_orphans() -> None:
    _ORPHANS[:] = [o for o in _ORPHANS if not all(w.is_completed() for w in o[0])]


@dataclass
class _Round:
    """An averaging round that was launched and whose result is not yet applied."""

    group: Group
    n_buckets: int
    works: list[dist.Work] = field(default_factory=list)


class GossipEngine:
    """Runs a :class:`Schedule` for one rank over a list of buckets, one round per :meth:`launch`."""

    def __init__(self, schedule: Schedule, rank: int, buckets: list[Bucket]) -> None:
        self.schedule = schedule
        self.rank = rank
        self.buckets = buckets
        # Persistent extra memory: one receive/reduce buffer per bucket, the size of the parameters.
        self.buffers = [torch.empty_like(b.flat) for b in buckets] if schedule.world_size > 1 else []
        self._pending: _Round | None = None
        self._process_groups: dict[tuple[int, ...], dist.ProcessGroup | None] = {}
        for t in range(schedule.period):
            group = schedule.group(rank, t)
            if group.size > 2 and group.ranks not in self._process_groups:
                self._process_groups[group.ranks] = self._new_process_group(group)
            logger.debug("rank {} round {}: group {} weight {}", rank, t, list(group.ranks), group.self_weight)

    def _new_process_group(self, group: Group) -> dist.ProcessGroup | None:
        if group.size == self.schedule.world_size:
            return None  # the default (world) group
        # Only the members create it: no O(world_size) group creation on every rank.
        logger.debug("rank {}: creating process group {}", self.rank, list(group.ranks))
        return dist.new_group(list(group.ranks), use_local_synchronization=True)

    def __del__(self) -> None:
        pending = getattr(self, "_pending", None)
        if pending is not None and pending.works:
            _ORPHANS.append((pending.works, self.buffers + [b.flat for b in self.buckets]))

    def add_buckets(self, buckets: list[Bucket]) -> None:
        """Include more buckets in the rounds launched from now on."""
        self.buckets.extend(buckets)
        if self.schedule.world_size > 1:
            self.buffers.extend(torch.empty_like(b.flat) for b in buckets)

    @property
    def pending(self) -> bool:
        """Whether a launched round is waiting to be applied."""
        return self._pending is not None

    @torch.no_grad()
    def launch(self, group: Group) -> None:
        """Start averaging the buckets over ``group`` without blocking."""
        if self._pending is not None:
            raise RuntimeError("GossipEngine.launch() called while a round is still pending; call finish() first.")
        if _ORPHANS:
            _prune_orphans()
        if group.size == 1:
            return
        rnd = _Round(group, len(self.buckets))
        if group.size == 2:
            peer = group.ranks[0] if group.ranks[1] == self.rank else group.ranks[1]
            ops = []
            for i, (b, buf) in enumerate(zip(self.buckets, self.buffers)):
                ops.append(dist.P2POp(dist.isend, b.flat, peer, tag=i))
                ops.append(dist.P2POp(dist.irecv, buf, peer, tag=i))
            rnd.works = dist.batch_isend_irecv(ops)
        else:
            pg = self._process_groups[group.ranks]
            for b, buf in zip(self.buckets, self.buffers):
                torch.mul(b.flat, group.peer_weight, out=buf)
                rnd.works.append(dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=pg, async_op=True))
        self._pending = rnd

    def wait(self) -> None:
        """Block until the pending round's communication is complete (its result stays in the buffers)."""
        if self._pending is not None:
            for w in self._pending.works:
                w.wait()
            self._pending.works = []

    @torch.no_grad()
    def finish(self) -> None:
        """Wait for the pending round and write its result into the buckets."""
        if self._pending is None:
            return
        self.wait()
        rnd, self._pending = self._pending, None
        g = rnd.group
        for b, buf in zip(self.buckets[: rnd.n_buckets], self.buffers):
            if g.size == 2:
                b.flat.mul_(g.self_weight).add_(buf, alpha=1.0 - g.self_weight)
            elif g.weight is None:
                b.flat.copy_(buf)
            else:
                b.flat.mul_(g.self_weight - g.peer_weight).add_(buf)

    def detach(self) -> _Round | None:
        """Wait for the pending round and take it out of the engine (its result stays in the buffers)."""
        self.wait()
        rnd, self._pending = self._pending, None
        return rnd

    def attach(self, rnd: _Round | None) -> None:
        """Put back a round taken by :meth:`detach`; valid while nothing else has used the buffers."""
        self._pending = rnd
