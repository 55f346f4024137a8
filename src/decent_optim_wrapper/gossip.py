"""The life of gossip rounds: one object owns the round counter, the round in flight, the copy held around
global averaging, and what a checkpoint needs to resume them.

Round ``t`` of the schedule is launched by :meth:`Gossip.launch` (non-blocking) and applied by the next
:meth:`Gossip.apply`, which waits for it. :meth:`Gossip.average_globally` sets the round in flight aside and
:meth:`Gossip.revert` puts everything back, so training continues as if global averaging never happened.
:meth:`Gossip.state_dict` describes the run as :meth:`revert` would restore it.

Every launch sends a stamp on the control plane (see :mod:`~decent_optim_wrapper.comm`); the stamp is
checked before the round's result is used, and *before its data moves* when the set of buckets changed since
the previous round (a thaw), so that ranks that disagree never line up data collectives of different sizes.
Operations over every rank (global averaging, consensus distance, metrics) agree on the control plane first,
while watching the round in flight, so that ranks that took different numbers of steps learn it at once.

A round sends copies made at launch (see :mod:`~decent_optim_wrapper.transport`), and its result is applied as
a correction to whatever the parameters hold by then: a parameter written between two steps keeps its write.

**Uneven inputs.** Inside ``torch.distributed.algorithms.Join``, the ranks still training *announce* each
operation (:meth:`Gossip.announce`) on the control plane, and a rank that ran out of inputs *hears* it
(:meth:`Gossip.hear`) and stands in for it: it takes part in the round with its parameters as they are.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import timedelta
from enum import IntEnum
from typing import Any

import torch
import torch.distributed as dist
from loguru import logger

from .buckets import Bucket
from .comm import Failure, GossipError, Op, ProcessGroups, Stamp, StampExchange, digest32, global_rank, wait_all
from .topo import Group, Schedule
from .transport import Piece, Transport, choose

__all__ = ["Gossip", "CommStats", "Shadow", "next_instance"]

# Point-to-point tags: one range per Gossip object (gloo keeps them apart; NCCL has no tags, and the order of
# launches, agreed by every rank, is what matches messages there).
_TAG_BITS = 16
# Gossip objects created so far, per job (its default group, weakly: see ProcessGroups) and gossip world.
_instances: weakref.WeakKeyDictionary[Any, dict[tuple[int, ...], int]] = weakref.WeakKeyDictionary()


def _counts(groups: ProcessGroups) -> tuple[dict[tuple[int, ...], int], tuple[int, ...]]:
    counts = _instances.setdefault(dist.distributed_c10d._get_default_group(), {})
    return counts, groups.to_global(range(groups.world_size))


def next_instance(groups: ProcessGroups) -> int:
    """The instance number the next :class:`Gossip` over ``groups`` gets (ranks check they agree on it)."""
    counts, world = _counts(groups)
    return counts.get(world, 0)


class Shadow(IntEnum):
    """What a rank still training inside a ``Join`` announces it does next (see :meth:`Gossip.announce`)."""

    STEP = 1
    GLOBAL_AVG = 2  # argument: 1 if it may be reverted, + 2 if a module's buffers are averaged too
    REVERT = 3
    CONSENSUS = 4
    METRICS = 5


@dataclass(frozen=True)
class CommStats:
    """Communication so far: ``rounds`` launched that moved data, ``bytes_sent`` by this rank (parameters
    only; the stamps are a few dozen bytes a round), and ``wait_s``, the seconds this rank's host spent blocked
    waiting for rounds to complete: the communication training did not hide (on NCCL the host does not
    block, so it counts only the stamps)."""

    rounds: int = 0
    bytes_sent: int = 0
    wait_s: float = 0.0


@dataclass
class _InFlight:
    """A launched round whose result is not yet applied: its pieces, in the order they are applied, and for
    each transport the buckets it sent (to find what was sent, for a checkpoint)."""

    index: int
    group: Group
    pieces: list[Piece]
    stamp: StampExchange | None
    parts: list[tuple[Transport, list[int]]] = field(default_factory=list)
    settled: bool = False  # communication complete and checked; the result waits in the buffers

    @property
    def works(self) -> list[dist.Work]:
        return [w for piece in self.pieces for w in piece.works]


@dataclass
class _Held:
    """What :meth:`Gossip.average_globally` replaced, kept until :meth:`Gossip.revert`."""

    flats: list[torch.Tensor]
    pending: _InFlight | None
    extras: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


class Gossip:
    """Runs ``schedule`` for one rank over ``buckets``.

    Args:
        schedule: the validated schedule (every rank holds the same one).
        rank: this rank in the gossip world (the parent process group of ``groups``).
        buckets: the parameter buckets; more can be added with :meth:`add_buckets`.
        groups: the gossip world's process groups.
        wire_dtype: dtype the values travel in (``None``: the buckets' own, full precision).
        timeout: how long a wait may block before :class:`GossipError` (``None``: the process group's).
        check_rounds: exchange stamps (see the module docstring); off, nothing guards against ranks out of step.
        pair_transport: ``"auto"``, ``"p2p"`` or ``"allreduce"`` for full-precision pairs (see
            :func:`~decent_optim_wrapper.transport.choose`).
    """

    def __init__(self, schedule: Schedule, rank: int, buckets: list[Bucket], groups: ProcessGroups | None, *,
                 wire_dtype: torch.dtype | None = None, timeout: timedelta | None = None,
                 check_rounds: bool = True, pair_transport: str = "auto") -> None:
        self.schedule, self.rank, self.buckets, self.groups = schedule, rank, buckets, groups
        self.wire_dtype, self.timeout, self.check_rounds = wire_dtype, timeout, check_rounds
        self.pair_transport = pair_transport
        self.instance = 0
        if groups is not None:
            counts, world = _counts(groups)
            self.instance = counts.get(world, 0)
            counts[world] = self.instance + 1
        self.tag = self.instance << _TAG_BITS
        self.round = 0  # rounds launched: the next launch is round self.round
        self._stats = CommStats()
        self._pending: _InFlight | None = None
        self._relaunch = False  # resumed with a round in flight: run it again before applying
        self._resend: dict[int, torch.Tensor] | None = None  # ...sending these (bucket index -> what was sent)
        self._announced: tuple[torch.Tensor, dist.Work] | None = None  # the last announcement, in Join mode
        self._held: _Held | None = None
        self._buffers: dict[tuple[int, int, torch.dtype], torch.Tensor] = {}
        self._active = self._active_ids()
        # Every group this rank belongs to, with its process groups created now (never mid-training): a
        # full-precision transport, and one for the buckets that travel compressed.
        self._transports: dict[tuple[tuple[int, ...], bool], Transport] = {}
        if groups is not None:
            groups.prepare(self._group_slots())
        for t in range(schedule.period):
            group = schedule.group(rank, t)
            if group.size > 1 and (group.ranks, False) not in self._transports:
                for compressed in (False, True) if wire_dtype is not None else (False,):
                    self._transports[group.ranks, compressed] = self._make_transport(group, compressed)
            logger.debug("rank {} round {}: group {} weight {}", rank, t, list(group.ranks), group.self_weight)

    @classmethod
    def alone(cls, schedule: Schedule, buckets: list[Bucket]) -> Gossip:
        """A gossip world of one rank: no process group, nothing ever sent."""
        return cls(schedule, 0, buckets, None)

    # ------------------------------------------------------------------ public state
    @property
    def stats(self) -> CommStats:
        """Rounds and bytes sent so far (read-only)."""
        return self._stats

    @property
    def pending(self) -> bool:
        """Whether a launched round waits to be applied (or to be re-run after a resume)."""
        return self._pending is not None or self._relaunch

    @property
    def held(self) -> bool:
        """Whether :meth:`average_globally` replaced the parameters and :meth:`revert` can restore them."""
        return self._held is not None

    def buffer_bytes(self) -> int:
        """Persistent extra memory: the communication buffers, in bytes."""
        return sum(t.numel() * t.element_size() for t in self._buffers.values())

    def add_buckets(self, buckets: list[Bucket]) -> None:
        """Average these buckets too, from the next launch on (the list given at construction is extended)."""
        self.buckets.extend(buckets)

    # ------------------------------------------------------------------ rounds
    def launch(self, failed: Failure = Failure.NONE) -> None:
        """Start round :attr:`round` without blocking, then count it.

        ``failed`` sends only the stamp, so that the peers learn at once why this rank stops; the caller then
        raises.
        """
        if self._pending is not None:
            raise RuntimeError("Gossip.launch() while a round is in flight; apply() it first.")
        if _ORPHANS:
            prune_orphans()
        t = self.round
        self.round += 1
        group = self.schedule.group(self.rank, t)
        ids = self._active_ids()
        resend, self._resend = self._resend, None
        if group.size == 1 or not ids:
            return
        stamp = None
        if self.check_rounds:
            flats = [self.buckets[i].flat for i in ids]
            numel = sum(f.numel() for f in flats)
            ident = digest32(self.instance, [(str(f.dtype), f.numel()) for f in flats])
            stamp = self._stamp(Stamp(Op.ROUND, t, numel, ident, failed), group)
            if ids != self._active and not failed:
                # The buckets changed (a thaw): the peers must agree before data of another size moves.
                stamp.verify(self.timeout, f"round {t} with ranks {list(group.ranks)} (after a thaw)")
                stamp = None
        if failed:
            if stamp is not None:
                _ORPHANS.append((stamp.works, []))
            return
        self._active = ids
        pieces: list[Piece] = []
        parts: list[tuple[Transport, list[int]]] = []
        sent = 0
        for compressed in (False, True):
            part = [i for i in ids if self._compressed(i) == compressed]
            if part:
                transport = self._transports[group.ranks, compressed]
                flats = [self.buckets[i].flat for i in part]
                if resend is not None:  # a round resumed from a checkpoint: what it sent then, not a new copy
                    for i, flat, buf in zip(part, flats, transport.sent(part, self._buffer, flats)):
                        if i in resend:
                            buf.copy_(resend[i])
                        else:  # the checkpoint left it out: it was what a copy of the bucket gives
                            transport.snapshot(flat, buf)
                pieces += transport.launch(flats, part, self._buffer, tag=len(pieces), resend=resend is not None)
                parts.append((transport, part))
                sent += transport.bytes_sent(flats)
        self._stats = replace(self._stats, rounds=self._stats.rounds + 1, bytes_sent=self._stats.bytes_sent + sent)
        self._pending = _InFlight(t, group, pieces, stamp, parts)

    def fail(self, code: Failure) -> None:
        """Tell this round's peers that this rank failed (see :meth:`launch`); the round in flight is abandoned."""
        pending, self._pending, self._relaunch = self._pending, None, False
        if pending is not None and not pending.settled:
            _ORPHANS.append((pending.works + (pending.stamp.works if pending.stamp else []), []))
        self.launch(failed=code)

    def apply(self) -> None:
        """Wait for the round in flight and write its result into the buckets, piece by piece: a piece is mixed
        as soon as it has arrived, while the next ones are still on their way."""
        pending = self._relaunched()
        if pending is None:
            return
        if not pending.settled and pending.stamp is not None:
            with self._waiting(pending) as what:
                pending.stamp.verify(self.timeout, what)
        self._pending = None
        for piece in pending.pieces:
            if not pending.settled:
                with self._waiting(pending) as what:
                    self._wait_data(piece.works, what)
            piece.mix()

    def _relaunched(self) -> _InFlight | None:
        """The round in flight, launched again first if this rank resumed with it in flight."""
        if self._relaunch:
            self._relaunch = False
            self.round -= 1
            self.launch()
        return self._pending

    def _settle(self) -> _InFlight | None:
        """Wait for the round in flight (re-running it first after a resume) and check it; keep it."""
        self._relaunched()
        return self._drain()

    def _drain(self) -> _InFlight | None:
        """Wait for the round in flight and check its stamp; keep it."""
        pending = self._pending
        if pending is None or pending.settled:
            return pending
        with self._waiting(pending) as what:
            if pending.stamp is not None:
                pending.stamp.verify(self.timeout, what)
            self._wait_data(pending.works, what)
        pending.settled = True
        return pending

    @contextmanager
    def _waiting(self, pending: _InFlight) -> Iterator[str]:
        """Around a wait for the round in flight: gives what to call it in errors, counts the time in
        :attr:`stats`, and forgets the round if it failed (the process group is unusable then)."""
        start = time.perf_counter()
        try:
            yield f"averaging round {pending.index} with ranks {list(pending.group.ranks)}"
        except GossipError:
            self._pending = None
            raise
        finally:
            self._stats = replace(self._stats, wait_s=self._stats.wait_s + time.perf_counter() - start)

    def _wait_data(self, works: list[dist.Work], what: str) -> None:
        if self._stream_ordered:
            # NCCL: wait() makes the current stream wait; the host never blocks. A dead peer shows in the stamp.
            for w in works:
                w.wait()
        else:
            wait_all(works, self.timeout, f"rank {self.rank}: {what}")

    @property
    def _stream_ordered(self) -> bool:
        """Whether data works complete on a CUDA stream (NCCL) rather than on the host (gloo)."""
        device = self.buckets[0].flat.device if self.buckets else torch.device("cpu")
        return self.groups is not None and device.type == "cuda" and "nccl" in self.groups.backend

    # ------------------------------------------------------------------ global averaging
    def average_globally(self, extras: list[torch.Tensor], may_revert: bool) -> None:
        """Replace the buckets (and ``extras``) by their mean over all ranks; blocking.

        The round in flight is set aside, not applied. With ``may_revert`` everything replaced is kept
        until :meth:`revert` (or dropped by :meth:`drop_held`).
        """
        tensors = [b.flat for b in self.buckets] + extras
        self.agree_global("global_avg", _layout(tensors))
        pending = self._settle()
        if may_revert and self._held is None:
            self._held = _Held([b.flat.clone() for b in self.buckets], pending, [(t, t.clone()) for t in extras])
        self._pending = None
        self._mean(tensors, "global_avg")

    def revert(self) -> None:
        """Undo :meth:`average_globally`: the parameters, ``extras`` and the round in flight come back."""
        held = self._held
        if held is None:
            raise RuntimeError("revert_global_avg() has nothing to revert: call global_avg(may_revert=True) first, "
                               "and revert before the next step().")
        self._held = None
        with torch.no_grad():
            for b, saved in zip(self.buckets, held.flats):
                b.flat.copy_(saved)
            for t, saved in held.extras:
                t.copy_(saved)
        self._pending = held.pending

    def drop_held(self) -> bool:
        """Forget what :meth:`average_globally` held (training goes on from the average); whether there was any."""
        held, self._held = self._held, None
        return held is not None

    @torch.no_grad()
    def global_mean(self, tensors: list[torch.Tensor], what: str) -> None:
        """Replace each tensor by its mean over all ranks of the gossip world (blocking).

        Every rank first confirms on the control plane that all of them are doing this same operation, so a
        rank that calls it alone fails with :class:`GossipError` instead of lining up with a gossip round.
        """
        self.agree_global(what, _layout(tensors))
        self._mean(tensors, what)

    @torch.no_grad()
    def _mean(self, tensors: list[torch.Tensor], what: str) -> None:
        if self.groups is None:
            return
        n = self.groups.world_size
        works = []
        for t in tensors:
            t.mul_(1.0 / n)  # scale first, as the rounds do: x/n summed, never a sum that could overflow
            works.append(dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.groups.parent, async_op=True))
        self._wait_data(works, what)

    def agree_global(self, what: str, detail: Any, failed: Failure = Failure.NONE) -> None:
        """Blocking check that every rank of the gossip world is doing ``what`` with the same ``detail`` at the
        same round (``failed``: tell them instead why this rank cannot).

        A rank that took one step more than a peer has a round in flight whose stamp that peer never sends. If
        the round's group is every rank, its stamp travels on the same channel as this one and was posted first,
        so it is checked first: it meets the peer's stamp for this operation, and both ranks learn at once that
        they are out of step. Otherwise this operation's stamp is checked first: every rank sends it.
        """
        if self.groups is None:
            return
        stamp = self._stamp(Stamp(Op.GLOBAL, self.round, 0, digest32(what, detail), failed), None)
        pending = self._pending
        if pending is not None and not pending.settled and pending.stamp is not None \
                and pending.group.size == self.groups.world_size:
            with self._waiting(pending) as label:
                pending.stamp.verify(self.timeout, label)
        stamp.verify(self.timeout, f"{what} at round {self.round}")

    def barrier(self, what: str) -> None:
        """Block until every rank of the gossip world has called this (on the control plane)."""
        if self.groups is not None:
            self.control_sum([0.0], f"waiting for every rank in {what}")

    def control_sum(self, values: list[float], what: str = "summing over ranks") -> list[float]:
        """Sum small host values over all ranks on the control plane (after :meth:`agree_global`)."""
        if self.groups is None:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        wait_all([dist.all_reduce(t, group=self.groups.control(), async_op=True)], self.timeout,
                 f"rank {self.rank}: {what}")
        return t.tolist()

    def _stamp(self, stamp: Stamp, group: Group | None) -> StampExchange:
        assert self.groups is not None  # only called with a process group (world size > 1)
        ranks = tuple(range(self.groups.world_size)) if group is None else group.ranks
        if len(ranks) == 2:
            peer = ranks[0] if ranks[1] == self.rank else ranks[1]
            return StampExchange(stamp, self.rank, ranks, self.groups.control(),
                                 global_rank(self.groups.parent, peer), self.tag)
        return StampExchange(stamp, self.rank, ranks, self.groups.control(ranks), None, self.tag)

    # ------------------------------------------------------------------ uneven inputs (Join)
    def announce(self, op: int, arg: int = 0) -> None:
        """On a rank still training inside a ``Join``: say what this rank does next (``op`` with ``arg``) to the
        ranks that ran out of inputs (:meth:`hear`). Non-blocking; the previous announcement is checked, since
        every rank still training must have announced the same."""
        if self.groups is None:
            return
        self._check_announced()
        mine = [op, self.round, arg, self.instance]
        t = torch.tensor(mine + [-v for v in mine], dtype=torch.int64)
        self._announced = (t, dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.groups.control(), async_op=True))

    def hear(self) -> list[int]:
        """On a rank that ran out of inputs inside a ``Join``: ``[op, round, arg, instance]`` that the ranks still
        training announced (blocking)."""
        assert self.groups is not None
        t = torch.full((8,), _SILENT, dtype=torch.int64)
        wait_all([dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.groups.control(), async_op=True)],
                 self.timeout, f"rank {self.rank}: waiting (out of inputs, inside a Join) for the next operation of "
                               "the ranks still training")
        return self._announcement(t)

    def settle_announcements(self) -> None:
        """Wait for (and check) this rank's last announcement, if any."""
        self._check_announced()

    def _check_announced(self) -> None:
        if self._announced is not None:
            t, work = self._announced
            self._announced = None
            wait_all([work], self.timeout, f"rank {self.rank}: announcing an operation inside a Join")
            self._announcement(t)

    def _announcement(self, t: torch.Tensor) -> list[int]:
        hi, lo = t[:4].tolist(), [-v for v in t[4:].tolist()]
        if hi != lo:
            raise GossipError(f"rank {self.rank}: inside a Join, the ranks still training did different things (an "
                              f"operation, round, argument and optimizer of {lo} and of {hi}): every rank must call "
                              "step(), global_avg() and the like on the same optimizers in the same order.")
        return hi

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """The round counter, whether a round was in flight, and the buckets, as :meth:`revert` would leave them;
        and ``"sent"``, what the round in flight sent of the buckets where that is not what a copy of them gives
        now (they were written since), so that resuming sends the very same values."""
        held = self._held
        flats = list(held.flats) if held is not None else [b.flat for b in self.buckets]
        pending = held.pending if held is not None else self._pending
        state: dict[str, Any] = {"round": self.round, "pending": pending is not None or self._relaunch,
                                 "buckets": flats}
        sent = self._resend if self._relaunch else self._sent_since_written(pending, flats)
        if sent:
            state["sent"] = dict(sent)
        return state

    def _sent_since_written(self, pending: _InFlight | None, flats: list[torch.Tensor]) -> dict[int, torch.Tensor]:
        out: dict[int, torch.Tensor] = {}
        for transport, ids in pending.parts if pending is not None else []:
            mine = [flats[i] for i in ids]
            for i, flat, sent in zip(ids, mine, transport.sent(ids, self._buffer, mine)):
                if not torch.equal(sent, transport.snapshot(flat, torch.empty_like(sent))):
                    out[i] = sent
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` (already validated by the caller): a round that was in flight is run
        again on the next :meth:`apply`, sending what it sent then, which reproduces its result exactly."""
        # Whatever was in flight belongs to the run being replaced, but its messages must land before its buffers
        # are used again (and gloo must never see an in-flight point-to-point operation destroyed).
        self._drain()
        self._pending, self._held = None, None
        with torch.no_grad():
            for b, t in zip(self.buckets, state.get("buckets") or []):
                b.flat.copy_(t)
        self.round = int(state["round"])
        self._relaunch = bool(state["pending"]) and self.round > 0
        sent = state.get("sent")
        self._resend = {int(i): t for i, t in sent.items()} if self._relaunch and sent else None

    # ------------------------------------------------------------------ helpers
    def _active_ids(self) -> list[int]:
        return [i for i, b in enumerate(self.buckets) if not b.frozen]

    def _group_slots(self) -> list[list[tuple[tuple[int, ...], str]]]:
        """Every process group the schedule needs, on any rank, in slots of disjoint groups (one slot per round
        and kind), in the same order on every rank (see :meth:`ProcessGroups.prepare`)."""
        assert self.groups is not None
        device = self.buckets[0].flat.device if self.buckets else torch.device("cpu")
        everyone = tuple(range(self.groups.world_size))
        slots: list[list[tuple[tuple[int, ...], str]]] = [[(everyone, "control")]]
        for groups in self.schedule.rounds:
            data: list[tuple[tuple[int, ...], str]] = []
            back: list[tuple[tuple[int, ...], str]] = []
            control: list[tuple[tuple[int, ...], str]] = []
            for g in sorted(groups, key=lambda g: g.ranks):
                if g.size < 2:
                    continue
                for wire in (None, self.wire_dtype) if self.wire_dtype is not None else (None,):
                    if not choose(g, self.groups.backend, device, wire, self.pair_transport).point_to_point:
                        data.append((g.ranks, "data"))
                    elif self._two_connections(device):
                        back = [(everyone, "data-back")]
                if g.size > 2 and self.check_rounds:
                    control.append((g.ranks, "control"))
            slots += [list(dict.fromkeys(slot)) for slot in (data, back, control) if slot]
        return slots

    def _two_connections(self, device: torch.device) -> bool:
        """Point to point with each direction on a connection of its own: gloo (NCCL runs a batch both ways)."""
        assert self.groups is not None
        return device.type == "cpu" and "nccl" not in self.groups.backend

    def _compressed(self, i: int) -> bool:
        """Whether bucket ``i`` travels in the wire dtype (only where that dtype is narrower than its own)."""
        flat = self.buckets[i].flat
        return self.wire_dtype is not None and \
            torch.empty((), dtype=self.wire_dtype).element_size() < flat.element_size()

    def _make_transport(self, group: Group, compressed: bool) -> Transport:
        assert self.groups is not None
        device = self.buckets[0].flat.device if self.buckets else torch.device("cpu")
        wire = self.wire_dtype if compressed else None
        cls = choose(group, self.groups.backend, device, wire, self.pair_transport)
        peer = None
        if group.size == 2:
            other = group.ranks[0] if group.ranks[1] == self.rank else group.ranks[1]
            peer = global_rank(self.groups.parent, other)
        # Point-to-point goes on the gossip world's group (peers addressed by global rank), on gloo the lower rank
        # of a pair sending on it and the higher on its twin; collectives go on the group's own.
        pg, pg_back = self.groups.parent, None
        if not cls.point_to_point:
            pg = self.groups.data(group.ranks)
        elif self._two_connections(device):
            # the world group as an object: None would read as "one connection" in the transport
            pg = pg if pg is not None else dist.group.WORLD
            back = self.groups.data_back()
            pg, pg_back = (pg, back) if self.rank < min(r for r in group.ranks if r != self.rank) else (back, pg)
        return cls(group, self.rank, pg, peer, self.tag, wire, pg_back)

    def _buffer(self, i: int, slot: int, dtype: torch.dtype) -> torch.Tensor:
        key = (i, slot, dtype)
        buf = self._buffers.get(key)
        if buf is None:
            flat = self.buckets[i].flat
            buf = self._buffers[key] = torch.empty(flat.numel(), dtype=dtype, device=flat.device)
        return buf

    def __del__(self) -> None:
        # gloo breaks every later exchange between two ranks if an in-flight point-to-point Work is destroyed,
        # so a round still in flight when its owner goes away is kept alive until it completes.
        pending = getattr(self, "_pending", None)
        if pending is not None and not pending.settled:
            try:
                works = pending.works + (pending.stamp.works if pending.stamp is not None else [])
                _ORPHANS.append((works, list(self._buffers.values()) + [b.flat for b in self.buckets]))
            except Exception:  # interpreter shutdown: module globals may already be gone
                pass


_ORPHANS: list[tuple[list[dist.Work], list[torch.Tensor]]] = []
# What a rank that ran out of inputs contributes to an announcement (a MAX all-reduce): less than any value.
_SILENT = -(1 << 62)


def _layout(tensors: list[torch.Tensor]) -> list[tuple[str, int]]:
    return [(str(t.dtype), t.numel()) for t in tensors]


def prune_orphans() -> None:
    """Forget orphaned rounds whose communication has completed."""
    _ORPHANS[:] = [o for o in _ORPHANS if not all(w.is_completed() for w in o[0])]
