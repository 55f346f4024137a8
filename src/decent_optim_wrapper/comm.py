"""The gossip engine: launches one round of neighbour averaging over the buckets, waits for it, applies it.

Round ``t`` puts rank ``i`` in group ``G`` with self-weight ``w`` and peer weight ``c = (1-w)/(|G|-1)``
(uniform: ``w = c = 1/|G|``). The mix is ``x_i <- w*x_i + c * sum_{j in G, j != i} x_j``.

* ``|G| == 1``: nothing to do.
* ``|G| == 2``: point-to-point exchange. The bucket is sent as it is (nothing writes it before the next
  ``step()`` waits for the send), so nothing is prepared, and the peer's bucket lands in the receive buffer;
  the mix ``x_i*w + x_j*(1-w)`` takes two passes (scale, add), the same count as the all-reduce path's
  prepare and apply. With uniform weights this is bit for bit what the all-reduce of ``x*0.5`` gives.
* otherwise: ``buffer = x_i * c`` (one pass), a non-blocking SUM all-reduce over the group's process group,
  then ``x_i <- buffer`` for uniform weights (or ``x_i*(w-c) + buffer``). This is decent-optim-wrapper 0.1's
  arithmetic, so the same seeds give the same numbers.

Process groups: the world group serves a group of all ranks; other groups of three or more ranks get a
process group created once at construction, only by their members.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, cast

import torch
import torch.distributed as dist
from loguru import logger

from .buckets import Bucket
from .topo import Group, Schedule

__all__ = ["GossipEngine", "GossipError", "global_rank"]

# Rounds still in flight when their engine was garbage-collected. gloo breaks the exchange for every later
# send and receive if an in-flight point-to-point Work is destroyed, so such Works (and the tensors they
# read and write) are kept here until they complete.
_ORPHANS: list[tuple[list[dist.Work], list[torch.Tensor]]] = []


# Process groups by (default group, ranks): every engine in the process (one per DecentOptimWrapper, one
# per DecentralizedDataParallel bucket) shares them, so a set of ranks gets exactly one group.
_PROCESS_GROUPS: dict[tuple[Any, tuple[int, ...]], dist.ProcessGroup] = {}


def global_rank(process_group: dist.ProcessGroup | None, rank: int) -> int:
    """The default-group rank of ``rank`` of ``process_group`` (``None``: the default group itself)."""
    return rank if process_group is None else dist.get_global_rank(process_group, rank)


def _stamp(values: list[int], device: torch.device) -> torch.Tensor:
    """A small int64 tensor on ``device``, filled by device-side writes (no host-device synchronisation)."""
    t = torch.empty(len(values), dtype=torch.int64, device=device)
    for i, v in enumerate(values):
        t[i] = v  # a scalar fill: a kernel on CUDA, never a blocking copy from host memory
    return t


def _prune_orphans() -> None:
    _ORPHANS[:] = [o for o in _ORPHANS if not all(w.is_completed() for w in o[0])]


class GossipError(RuntimeError):
    """A gossip round failed: a peer died or timed out, or the ranks fell out of step."""


@dataclass
class _Round:
    """An averaging round that was launched and whose result is not yet applied."""

    index: int
    group: Group
    buckets: list[int]  # indices of the buckets this round averages
    numel: int  # elements in those buckets, checked against the peers'
    works: list[dist.Work] = field(default_factory=list)
    # Round numbers exchanged with the data: the peer's (pairs) or [max, -min] over the group.
    stamp: torch.Tensor | None = None
    stamp_out: torch.Tensor | None = None
    # CUDA: the stamp copied to pinned host memory without blocking, and the event that says it has landed.
    stamp_host: torch.Tensor | None = None
    stamp_ready: Any = None


class GossipEngine:
    """Runs a :class:`Schedule` for one rank over a list of buckets, one round per :meth:`launch`.

    Args:
        schedule: the validated schedule; every rank must hold the same one.
        rank: this process's rank.
        buckets: the parameter buckets to average (more can be added with :meth:`add_buckets`).
        pair_mode: ``"p2p"`` (default, measured faster on gloo) or ``"allreduce"`` for 2-rank groups.
        timeout: how long a wait may block before a :class:`GossipError`; ``None`` uses the process
            group's timeout.
        process_group: the group whose members the schedule's ranks number (default: the world); ranks
            in the schedule are ranks within this group.
        check_rounds: send the round number along with the data, so ranks that called ``step()`` a
            different number of times are caught instead of mixing with the wrong round's parameters.
    """

    def __init__(self, schedule: Schedule, rank: int, buckets: list[Bucket], *, pair_mode: str = "p2p",
                 timeout: timedelta | None = None, check_rounds: bool = True,
                 process_group: dist.ProcessGroup | None = None) -> None:
        if pair_mode not in ("p2p", "allreduce"):
            raise ValueError(f"Invalid pair_mode={pair_mode!r}. Must be 'p2p' or 'allreduce'.")
        self.pair_mode = pair_mode
        self.process_group = process_group
        self.schedule = schedule
        self.rank = rank
        self.buckets = buckets
        self.timeout = timeout
        self.check_rounds = check_rounds
        # Point-to-point tags start here; engines that exchange with the same peer use disjoint ranges.
        self.tag_base = 0
        # Persistent extra memory: one receive/reduce buffer per communicated bucket, the size of the
        # parameters; made on first use, so frozen buckets cost nothing.
        self.buffers: list[torch.Tensor | None] = [None] * len(buckets)
        self.rounds_launched = 0
        self.elements_sent = 0
        self._pending: _Round | None = None
        self._unchecked: _Round | None = None  # on CUDA a round's stamp is checked one round later
        self._process_groups: dict[tuple[int, ...], dist.ProcessGroup | None] = {}
        for t in range(schedule.period):
            group = schedule.group(rank, t)
            if not self._is_p2p(group) and group.size > 1 and group.ranks not in self._process_groups:
                self._process_groups[group.ranks] = self._new_process_group(group)
            logger.debug("rank {} round {}: group {} weight {}", rank, t, list(group.ranks), group.self_weight)

    def _is_p2p(self, group: Group) -> bool:
        return group.size == 2 and self.pair_mode == "p2p"

    def _new_process_group(self, group: Group) -> dist.ProcessGroup | None:
        if group.size == self.schedule.world_size:
            return self.process_group  # the whole group (None: the default, world group)
        ranks = tuple(global_rank(self.process_group, r) for r in group.ranks)
        key = (dist.distributed_c10d._get_default_group(), ranks)
        if key not in _PROCESS_GROUPS:
            # Only the members create it: no O(world_size) group creation on every rank.
            logger.debug("rank {}: creating process group {}", self.rank, list(ranks))
            _PROCESS_GROUPS[key] = cast(dist.ProcessGroup,
                                        dist.new_group(list(ranks), use_local_synchronization=True))
        return _PROCESS_GROUPS[key]

    def __del__(self) -> None:
        pending = getattr(self, "_pending", None)
        if pending is not None and pending.works:
            tensors = [t for t in self.buffers if t is not None] + [b.flat for b in self.buckets]
            try:
                _ORPHANS.append((pending.works, tensors))
            except Exception:  # interpreter shutdown: module globals may already be gone
                pass

    def add_buckets(self, buckets: list[Bucket]) -> None:
        """Include more buckets in the rounds launched from now on (appended to the list given at construction)."""
        self.buckets.extend(buckets)
        self.buffers.extend([None] * len(buckets))

    def _buffer(self, i: int) -> torch.Tensor:
        buf = self.buffers[i]
        if buf is None:
            buf = self.buffers[i] = torch.empty_like(self.buckets[i].flat)
        return buf

    def active(self) -> list[int]:
        """Indices of the buckets that are communicated (all but the frozen ones)."""
        return [i for i, b in enumerate(self.buckets) if not b.frozen]

    @property
    def pending(self) -> bool:
        """Whether a launched round is waiting to be applied."""
        return self._pending is not None

    @torch.no_grad()
    def launch(self, round_: int) -> None:
        """Start averaging the buckets over this rank's group of round ``round_`` without blocking."""
        if self._pending is not None:
            raise RuntimeError("GossipEngine.launch() called while a round is still pending; call finish() first.")
        if _ORPHANS:
            _prune_orphans()
        group = self.schedule.group(self.rank, round_)
        active = self.active()
        if group.size == 1 or not active:
            return
        # The stamp: this round's number and how many elements this rank averages, checked against the peers'.
        numel = sum(self.buckets[i].flat.numel() for i in active)
        rnd = _Round(round_, group, active, numel)
        device = self.buckets[0].flat.device
        self.rounds_launched += 1
        if self._is_p2p(group):
            peer = global_rank(self.process_group, group.ranks[0] if group.ranks[1] == self.rank else group.ranks[1])
            pg = self.process_group
            ops = []
            if self.check_rounds:
                rnd.stamp_out = _stamp([round_, numel], device)
                rnd.stamp = torch.empty_like(rnd.stamp_out)
                ops += [dist.P2POp(dist.isend, rnd.stamp_out, peer, pg, tag=self.tag_base),
                        dist.P2POp(dist.irecv, rnd.stamp, peer, pg, tag=self.tag_base)]
            for i in active:
                # The bucket is sent as it is: nothing writes it before the next step() waits for the send.
                ops.append(dist.P2POp(dist.isend, self.buckets[i].flat, peer, pg, tag=self.tag_base + i + 1))
                ops.append(dist.P2POp(dist.irecv, self._buffer(i), peer, pg, tag=self.tag_base + i + 1))
            rnd.works = dist.batch_isend_irecv(ops)
            self.elements_sent += numel
        else:
            pg = self._process_groups[group.ranks]
            if self.check_rounds:
                rnd.stamp = _stamp([round_, -round_, numel, -numel], device)
                rnd.works.append(dist.all_reduce(rnd.stamp, op=dist.ReduceOp.MAX, group=pg, async_op=True))
            for i in active:
                buf = self._buffer(i)
                torch.mul(self.buckets[i].flat, group.peer_weight, out=buf)
                rnd.works.append(dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=pg, async_op=True))
            # a ring all-reduce sends 2(k-1)/k of the data
            self.elements_sent += numel * 2 * (group.size - 1) // group.size
        self._pending = rnd

    def wait(self) -> None:
        """Block until the pending round's communication is complete (its result stays in the buffers)."""
        if self._unchecked is not None:
            earlier, self._unchecked = self._unchecked, None
            self._check_stamp(earlier)
        rnd = self._pending
        if rnd is None or not rnd.works:
            return
        for w in rnd.works:
            try:
                self._wait(w)
            except RuntimeError as exc:
                self._pending = None
                within = f" within {self.timeout.total_seconds():g} s" if self.timeout is not None else ""
                raise GossipError(
                    f"rank {self.rank}: averaging round {rnd.index} with ranks {list(rnd.group.ranks)} did not "
                    f"complete{within}. A peer may have died, hung, or called step() a different number of "
                    f"times than this rank. The process group is unusable now; restart from a checkpoint. "
                    f"Cause: {exc}"
                ) from exc
        rnd.works = []
        if rnd.stamp is not None:
            if rnd.stamp.is_cuda:
                # Reading it now would make the host wait for the GPU; copy it out without blocking and
                # check it at the next wait, by when the copy has long landed.
                rnd.stamp_host = torch.empty(rnd.stamp.shape, dtype=rnd.stamp.dtype, pin_memory=True)
                rnd.stamp_host.copy_(rnd.stamp, non_blocking=True)
                rnd.stamp_ready = torch.cuda.Event()
                rnd.stamp_ready.record()
                self._unchecked = rnd
            else:
                self._check_stamp(rnd)

    def _wait(self, work: dist.Work) -> None:
        if self.timeout is None:
            work.wait()
        else:
            work.wait(self.timeout)

    def _check_stamp(self, rnd: _Round) -> None:
        assert rnd.stamp is not None
        if rnd.stamp_ready is not None:
            rnd.stamp_ready.synchronize()
            values = rnd.stamp_host.tolist()  # type: ignore[union-attr]
        else:
            values = rnd.stamp.tolist()
        numel = rnd.numel
        again = "Every rank must call step() the same number of times and resume from the same step."
        trainable = "the ranks disagree on which parameters are trainable (requires_grad)."
        problem = None
        if rnd.stamp_out is not None:  # a pair: the peer's round number and size
            peer = [r for r in rnd.group.ranks if r != self.rank][0]
            if values[0] != rnd.index:
                problem = (f"rank {self.rank} is out of step: at its round {rnd.index} it averaged with rank {peer}, "
                           f"which was at round {values[0]}. {again}")
            elif values[1] != numel:
                problem = (f"rank {self.rank} averaged {numel} elements in round {rnd.index} but rank {peer} "
                           f"averaged {values[1]}: {trainable}")
        elif values[0] != rnd.index or -values[1] != rnd.index:
            problem = (f"rank {self.rank} is out of step: in its round {rnd.index} the group "
                       f"{list(rnd.group.ranks)} was at rounds {-values[1]} to {values[0]}. {again}")
        elif values[2] != numel or -values[3] != numel:
            problem = (f"rank {self.rank}: in round {rnd.index} the group {list(rnd.group.ranks)} averaged between "
                       f"{-values[3]} and {values[2]} elements, this rank {numel}: {trainable}")
        if problem is not None:
            self._pending = None
            raise GossipError(problem)

    @torch.no_grad()
    def finish(self) -> None:
        """Wait for the pending round and write its result into the buckets."""
        if self._pending is None:
            return
        self.wait()
        rnd, self._pending = self._pending, None
        g = rnd.group
        for i in rnd.buckets:
            b, buf = self.buckets[i], self._buffer(i)
            if self._is_p2p(g):
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

    @torch.no_grad()
    def all_reduce_mean(self, tensors: list[torch.Tensor]) -> None:
        """Replace each tensor by its mean over all ranks (blocking, bounded by the timeout)."""
        n = self.schedule.world_size
        works = []
        for t in tensors:
            t.mul_(1.0 / n)  # scale first, as the rounds do: x/n summed, never a sum that could overflow
            works.append(dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.process_group, async_op=True))
        for w in works:
            try:
                self._wait(w)
            except RuntimeError as exc:
                raise GossipError(f"rank {self.rank}: global averaging did not complete. Cause: {exc}") from exc
