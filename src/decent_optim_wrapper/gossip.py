"""The life of gossip rounds: one object owns the step and round counters, the rounds in flight, the copy held
around global averaging, and what a checkpoint needs to resume them.

Each ``step()`` of a facade calls :meth:`Gossip.begin_step` (apply the rounds due now) and, after the local
update, :meth:`Gossip.end_step`, which launches a round (non-blocking) every ``gossip_every`` steps. A round
launched at the end of step ``s`` is due at the start of step ``s + gossip_every * max_delay``: with the
defaults (1, 1) the next step applies it, decent-optim-wrapper 0.1's order; a larger ``max_delay`` lets its
transfer overlap that many forward/backward passes and optimizer steps, with up to ``max_delay`` rounds in flight,
each with buffers of its own. Rounds are applied at their due step exactly, never earlier, so the trajectory does
not depend on how fast the network was. :meth:`Gossip.average_globally` sets the rounds in flight aside and
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
from enum import IntEnum
from functools import partial
from typing import Any, cast

import torch
import torch.distributed as dist
from loguru import logger

from .buckets import Bucket
from .comm import Failure, GossipError, Op, ProcessGroups, Stamp, StampExchange, digest32, global_rank, wait_all
from .config import GossipConfig
from .plan import Plan
from .topo import Group, Schedule
from .transport import LowRankEdges, P2PPairLowRank, Piece, Transport

# Transports with per-edge state (low-rank bases) that a checkpoint keeps
_LOWRANK = (P2PPairLowRank, LowRankEdges)

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
    due: int  # the step at whose start it is applied
    group: Group
    pieces: list[Piece]
    stamp: StampExchange | None
    parts: list[tuple[Transport, list[int]]] = field(default_factory=list)
    lane: int = 0  # which set of buffers it uses (one per round that can be in flight)
    settled: bool = False  # communication complete and checked; the result waits in the buffers

    @property
    def works(self) -> list[dist.Work]:
        return [w for piece in self.pieces for w in piece.works]


@dataclass
class _Held:
    """What :meth:`Gossip.average_globally` replaced, kept until :meth:`Gossip.revert`."""

    flats: list[torch.Tensor]
    inflight: list[_InFlight]
    extras: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


@dataclass
class _Resume:
    """A round that was in flight at a checkpoint: launched again, from what it sent then, before it is due."""

    index: int
    due: int
    sent: dict[int, torch.Tensor]  # bucket index -> what it sent (left out: what a copy of the bucket gives)


class Gossip:
    """Runs ``schedule`` for one rank over ``buckets``.

    Args:
        schedule: the validated schedule (every rank holds the same one).
        rank: this rank in the gossip world (the parent process group of ``groups``).
        buckets: the parameter buckets; more can be added with :meth:`add_buckets`.
        groups: the gossip world's process groups (``None``: a world of one rank).
        config: how rounds travel and when (``wire_dtype``, ``pair_transport``, ``check_rounds``, ``timeout``,
            ``max_delay``, ``gossip_every``); see :class:`~decent_optim_wrapper.config.GossipConfig`.
    """

    def __init__(self, schedule: Schedule, rank: int, buckets: list[Bucket], groups: ProcessGroups | None,
                 config: GossipConfig | None = None, plan: Plan | None = None) -> None:
        config = config if config is not None else GossipConfig()
        device = buckets[0].flat.device if buckets else torch.device("cpu")
        # how every round travels (plan.py); given: its config must be this one
        self.plan = plan if plan is not None else Plan(config, groups.backend if groups is not None else "gloo", device)
        if self.plan.config != config:
            raise ValueError("internal error: Gossip's plan was made for another configuration")
        self.schedule, self.rank, self.buckets, self.groups, self.config = schedule, rank, buckets, groups, config
        self.wire_dtype, self.timeout, self.check_rounds = config.wire_dtype, config.timeout_delta, config.check_rounds
        self.max_delay, self.gossip_every = config.max_delay, config.gossip_every
        self.instance = 0
        if groups is not None:
            counts, world = _counts(groups)
            self.instance = counts.get(world, 0)
            counts[world] = self.instance + 1
        self.tag = self.instance << _TAG_BITS
        self.round = 0  # rounds launched: the next launch is round self.round
        self.step = 0  # steps begun and ended: the next end_step() ends step self.step
        self._stats = CommStats()
        self._inflight: list[_InFlight] = []  # launched, not applied yet; oldest first
        self._resume: list[_Resume] = []  # resumed from a checkpoint with these in flight: launch them again first
        self._announced: tuple[torch.Tensor, dist.Work] | None = None  # the last announcement, in Join mode
        self._held: _Held | None = None
        self._buffers: dict[tuple[int, int, torch.dtype, int, int], torch.Tensor] = {}
        self._active = self._active_ids()
        # Every group this rank belongs to, with its process groups created now (never mid-training): a
        # full-precision transport, one for the buckets that travel compressed, one for the low-rank ones.
        self._transports: dict[tuple[tuple[int, ...], str], Transport] = {}
        if groups is not None:
            groups.prepare(self.plan.process_groups(schedule, groups.world_size, self.check_rounds))
        for t in range(schedule.period):
            group = damped(schedule.group(rank, t), self.max_delay)
            if group.size > 1 and (group.ranks, "full") not in self._transports:
                for kind in self.plan.kinds():
                    self._transports[group.ranks, kind] = self._make_transport(group, kind)
            logger.debug("rank {} round {}: group {} weight {}", rank, t, list(group.ranks), group.self_weight)

    @classmethod
    def alone(cls, schedule: Schedule, buckets: list[Bucket], config: GossipConfig | None = None) -> Gossip:
        """A gossip world of one rank: no process group, nothing ever sent."""
        return cls(schedule, 0, buckets, None, config)

    # ------------------------------------------------------------------ public state
    @property
    def stats(self) -> CommStats:
        """Rounds and bytes sent so far (read-only)."""
        return self._stats

    @property
    def pending(self) -> bool:
        """Whether a launched round waits to be applied (or to be launched again after a resume)."""
        return bool(self._inflight or self._resume)

    @property
    def in_flight(self) -> int:
        """How many launched rounds wait to be applied."""
        return len(self._inflight) + len(self._resume)

    @property
    def launches_now(self) -> bool:
        """Whether the step being taken ends by launching a round (every ``gossip_every`` steps)."""
        return (self.step + 1) % self.gossip_every == 0

    @property
    def held(self) -> bool:
        """Whether :meth:`average_globally` replaced the parameters and :meth:`revert` can restore them."""
        return self._held is not None

    def buffer_bytes(self) -> int:
        """Persistent extra memory, in bytes: the communication buffers and low-rank gossip's per-edge bases."""
        bases = [b for t in self._transports.values() if isinstance(t, _LOWRANK) for _, b in t.bases.values()]
        return sum(t.numel() * t.element_size() for t in [*self._buffers.values(), *bases])

    def add_buckets(self, buckets: list[Bucket]) -> None:
        """Average these buckets too, from the next launch on (the list given at construction is extended)."""
        self.buckets.extend(buckets)

    # ------------------------------------------------------------------ rounds
    def begin_step(self) -> list[int]:
        """At the start of a step: apply the rounds due now (waiting for them), oldest first; their indices."""
        self._launch_resumed()
        applied = []
        while self._inflight and self._inflight[0].due <= self.step:
            applied.append(self._apply(self._inflight.pop(0)))
        return applied

    def end_step(self, failed: Failure = Failure.NONE) -> None:
        """At the end of a step: launch a round if this step launches one (see :attr:`launches_now`), then count
        the step. ``failed``: launch nothing but tell this round's peers why this rank stops (the caller raises)."""
        if failed or self.launches_now:
            self.launch(due=self.step + self.gossip_every * self.max_delay, failed=failed)
        if not failed:
            self.step += 1

    def finish(self) -> list[int]:
        """Apply every round in flight now (blocking); their indices."""
        self._launch_resumed()
        applied = []
        while self._inflight:
            applied.append(self._apply(self._inflight.pop(0)))
        return applied

    def launch(self, due: int, failed: Failure = Failure.NONE, resend: dict[int, torch.Tensor] | None = None) -> None:
        """Start round :attr:`round` without blocking, to be applied at the start of step ``due``; count it.

        ``failed`` sends only the stamp, so that the peers learn at once why this rank stops. ``resend``: a round
        resumed from a checkpoint, sending what it sent then (bucket index -> values; left out: a copy of the
        bucket as it is).
        """
        if len(self._inflight) >= self.max_delay and not failed:
            raise RuntimeError(f"internal error: round {self.round} launched with {len(self._inflight)} in flight "
                               f"(max_delay={self.max_delay})")
        if _ORPHANS:
            prune_orphans()
        t = self.round
        self.round += 1
        group = self.schedule.group(self.rank, t)
        ids = self._active_ids()
        if group.size == 1 or not ids:
            return
        stamp = None
        if self.check_rounds:
            flats = [self.buckets[i].flat for i in ids]
            numel = sum(f.numel() for f in flats)
            ident = digest32(self.instance, [(str(f.dtype), f.numel()) for f in flats])
            stamp = self._stamp(Stamp(Op.ROUND, t, numel, ident, failed, self.step), group)
            if ids != self._active and not failed:
                # The buckets changed (a thaw): the peers must agree before data of another size moves.
                stamp.verify(self.timeout, f"round {t} with ranks {list(group.ranks)} (after a thaw)")
                stamp = None
        if failed:
            if stamp is not None:
                _ORPHANS.append((stamp.works, []))
            return
        self._active = ids
        lane = t % self.max_delay
        buffer = partial(self._buffer, lane=lane)
        pieces: list[Piece] = []
        parts: list[tuple[Transport, list[int]]] = []
        sent = 0
        for kind in self.plan.kinds():
            part = [i for i in ids if self._kind(i) == kind]
            if part:
                transport = self._transports[group.ranks, kind]
                flats = [self.buckets[i].flat for i in part]
                if resend is not None:  # what it sent then, not a new copy
                    for i, flat, buf in zip(part, flats, transport.sent(part, buffer, flats)):
                        if i in resend:
                            buf.copy_(resend[i])
                        else:  # the checkpoint left it out: it was what a copy of the bucket gives
                            transport.snapshot(flat, buf)
                pieces += transport.launch(flats, part, buffer, tag=len(pieces), resend=resend is not None)
                parts.append((transport, part))
                sent += transport.bytes_sent(flats, part)
        self._stats = replace(self._stats, rounds=self._stats.rounds + 1, bytes_sent=self._stats.bytes_sent + sent)
        self._inflight.append(_InFlight(t, due, group, pieces, stamp, parts, lane))

    def fail(self, code: Failure) -> None:
        """Tell the next round's peers that this rank failed; the rounds in flight are abandoned."""
        for pending in self._inflight:
            if not pending.settled:
                _ORPHANS.append((pending.works + (pending.stamp.works if pending.stamp else []), []))
        self._inflight, self._resume = [], []
        self.end_step(failed=code)

    def _apply(self, pending: _InFlight) -> int:
        """Wait for a round and write its result into the buckets, piece by piece: a piece is mixed as soon as it
        has arrived, while the next ones are still on their way."""
        if not pending.settled and pending.stamp is not None:
            with self._waiting(pending) as what:
                pending.stamp.verify(self.timeout, what)
        for piece in pending.pieces:
            if not pending.settled:
                with self._waiting(pending) as what:
                    self._wait_data(piece.works, what)
            piece.mix()
        return pending.index

    def _launch_resumed(self) -> None:
        """Launch again the rounds that were in flight at the checkpoint this rank resumed from."""
        if self._resume:
            resume, self._resume = self._resume, []
            end = self.round
            for r in resume:
                self.round = r.index
                self.launch(r.due, resend=r.sent)
            self.round = end

    def _settle(self) -> list[_InFlight]:
        """Wait for every round in flight (launching resumed ones first) and check them; keep them."""
        self._launch_resumed()
        return self._drain()

    def _drain(self) -> list[_InFlight]:
        """Wait for every round in flight and check its stamp; keep them."""
        for pending in list(self._inflight):
            if pending.settled:
                continue
            with self._waiting(pending) as what:
                if pending.stamp is not None:
                    pending.stamp.verify(self.timeout, what)
                self._wait_data(pending.works, what)
            pending.settled = True
        return list(self._inflight)

    @contextmanager
    def _waiting(self, pending: _InFlight) -> Iterator[str]:
        """Around a wait for the round in flight: gives what to call it in errors, counts the time in
        :attr:`stats`, and forgets the round if it failed (the process group is unusable then)."""
        start = time.perf_counter()
        try:
            yield f"averaging round {pending.index} with ranks {list(pending.group.ranks)}"
        except GossipError:
            self._inflight = []
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
        inflight = self._settle()
        if may_revert and self._held is None:
            self._held = _Held([b.flat.clone() for b in self.buckets], inflight, [(t, t.clone()) for t in extras])
        self._inflight = []
        self._mean(tensors, "global_avg")

    def revert(self) -> None:
        """Undo :meth:`average_globally`: the parameters, ``extras`` and the rounds in flight come back."""
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
        self._inflight = held.inflight

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
        stamp = self._stamp(Stamp(Op.GLOBAL, self.round, 0, digest32(what, detail), failed, self.step), None)
        for pending in self._inflight:
            if not pending.settled and pending.stamp is not None and pending.group.size == self.groups.world_size:
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
        """The round and step counters, the buckets, and the rounds in flight, as :meth:`revert` would leave them.

        ``"inflight"`` lists each round in flight (its index, the step it is due at) with what it sent of the
        buckets where that is not what a copy of them gives now (they were written since, or local steps ran
        since: ``max_delay > 1``), so that resuming sends the very same values. ``"pending"`` says whether any is
        in flight, and ``"sent"`` repeats the first round's, as decent-optim-wrapper 0.2's first checkpoints had.
        """
        held = self._held
        flats = list(held.flats) if held is not None else [b.flat for b in self.buckets]
        inflight = held.inflight if held is not None else self._inflight
        rounds: list[dict[str, Any]] = [{"round": r.index, "due": r.due, "sent": r.sent} for r in self._resume] + [
            {"round": r.index, "due": r.due, "sent": self._sent_since_written(r, flats)} for r in inflight]
        state: dict[str, Any] = {"round": self.round, "step": self.step, "pending": bool(rounds), "buckets": flats,
                                 "inflight": rounds}
        lowrank = {"-".join(map(str, ranks)): t.state() for (ranks, kind), t in self._transports.items()
                   if isinstance(t, _LOWRANK)}
        if lowrank:  # the warm starts of low-rank gossip: per edge, per matrix
            state["lowrank"] = lowrank
        if rounds and rounds[0]["sent"]:
            state["sent"] = dict(rounds[0]["sent"])
        return state

    def _sent_since_written(self, pending: _InFlight, flats: list[torch.Tensor]) -> dict[int, torch.Tensor]:
        out: dict[int, torch.Tensor] = {}
        buffer = partial(self._buffer, lane=pending.lane)
        for transport, ids in pending.parts:
            mine = [flats[i] for i in ids]
            for i, flat, sent in zip(ids, mine, transport.sent(ids, buffer, mine)):
                fresh = transport.snapshot(flat, torch.empty_like(sent)) if transport.sends_a_copy else None
                if fresh is None or not torch.equal(sent, fresh):
                    out[i] = sent
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` (already validated by the caller): the rounds that were in flight are
        launched again on the next step, sending what they sent then, which reproduces their results exactly.
        A state dict of decent-optim-wrapper 0.1/0.2 (``"pending"`` and no ``"inflight"``) has one round in flight
        at most, due at the next step."""
        # Whatever was in flight belongs to the run being replaced, but its messages must land before its buffers
        # are used again (and gloo must never see an in-flight point-to-point operation destroyed).
        self._drain()
        self._inflight, self._held = [], None
        with torch.no_grad():
            for b, t in zip(self.buckets, state.get("buckets") or []):
                b.flat.copy_(t)
        self.round = int(state["round"])
        self.step = int(state.get("step", self.round))
        rounds = state.get("inflight")
        if rounds is None:  # the older form: one round at most, launched at the end of the last step
            sent = state.get("sent") or {}
            rounds = [{"round": self.round - 1, "due": self.step, "sent": sent}] \
                if state["pending"] and self.round > 0 else []
        self._resume = [_Resume(int(r["round"]), int(r["due"]), {int(i): t for i, t in (r.get("sent") or {}).items()})
                        for r in rounds]
        for key, bases in (state.get("lowrank") or {}).items():
            transport = self._transports.get((tuple(int(r) for r in key.split("-")), "lowrank"))
            if isinstance(transport, _LOWRANK):
                transport.load_state(bases)

    # ------------------------------------------------------------------ helpers
    def _active_ids(self) -> list[int]:
        return [i for i, b in enumerate(self.buckets) if not b.frozen]

    def _kind(self, i: int) -> str:
        """How bucket ``i`` travels (see :meth:`Plan.kind`)."""
        bucket = self.buckets[i]
        return self.plan.kind(bucket.flat.dtype, bucket.lowrank)

    def _matrices(self, i: int) -> list[tuple[int, int, int]]:
        """``(offset, rows, cols)`` of every parameter of bucket ``i`` viewed as a matrix ``(shape[0], -1)``."""
        bucket = self.buckets[i]
        return [(off, p.shape[0], p.numel() // p.shape[0]) for p, off in zip(bucket.params, bucket.offsets)]

    def _make_transport(self, group: Group, kind: str) -> Transport:
        """The transport of :meth:`Plan.route`, connected: its process groups and peer."""
        assert self.groups is not None
        route = self.plan.route(group, kind)
        if route.transport is LowRankEdges:  # a larger group: an edge with every other member, in ascending order
            c = group.peer_weight
            return LowRankEdges(group, self.rank, [cast(P2PPairLowRank, self._make_transport(
                Group((min(self.rank, o), max(self.rank, o)), 1.0 - c), kind)) for o in group.ranks if o != self.rank])
        peer = None
        if group.size == 2:
            other = group.ranks[0] if group.ranks[1] == self.rank else group.ranks[1]
            peer = global_rank(self.groups.parent, other)
        # Point-to-point goes on the gossip world's group (peers addressed by global rank), on gloo the lower rank
        # of a pair sending on it and the higher on its twin; collectives go on the group's own.
        pg, pg_back = self.groups.parent, None
        if not route.point_to_point:
            pg = self.groups.data(group.ranks)
        elif route.connections == 2:
            # the world group as an object: None would read as "one connection" in the transport
            pg = pg if pg is not None else dist.group.WORLD
            back = self.groups.data_back()
            pg, pg_back = (pg, back) if self.rank < min(r for r in group.ranks if r != self.rank) else (back, pg)
        if route.transport is P2PPairLowRank:
            return P2PPairLowRank(group, self.rank, pg, peer, self.tag, None, pg_back, rank_r=route.lowrank_rank or 1,
                                  layout=self._matrices)
        return route.transport(group, self.rank, pg, peer, self.tag, route.wire_dtype, pg_back)

    def _buffer(self, i: int, slot: int, dtype: torch.dtype, numel: int | None = None, lane: int = 0) -> torch.Tensor:
        """Buffer ``slot`` of bucket ``i`` (``numel`` elements, default the bucket's) for the rounds of ``lane``
        (one lane per round that can be in flight)."""
        flat = self.buckets[i].flat
        numel = flat.numel() if numel is None else numel
        key = (i, slot, dtype, numel, lane)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = torch.empty(numel, dtype=dtype, device=flat.device)
        return buf

    def __del__(self) -> None:
        # gloo breaks every later exchange between two ranks if an in-flight point-to-point Work is destroyed,
        # so a round still in flight when its owner goes away is kept alive until it completes.
        inflight = [p for p in getattr(self, "_inflight", []) if not p.settled]
        if inflight:
            try:
                works = [w for p in inflight for w in p.works + (p.stamp.works if p.stamp is not None else [])]
                _ORPHANS.append((works, list(self._buffers.values()) + [b.flat for b in self.buckets]))
            except Exception:  # interpreter shutdown: module globals may already be gone
                pass


def damped(group: Group, max_delay: int) -> Group:
    """``group`` with the weight its rounds mix with when ``max_delay`` rounds are in flight: the peers' share
    ``1 - w`` divided by ``max_delay``.

    A round applied ``d`` steps after its launch brings a correction computed from values that lack the ``d - 1``
    corrections applied in between (from this group or another). Along a direction that every round's mixing moves
    by ``-lam`` (a pair's difference: ``lam = 2(1 - w)``, 1 at equal weights), the delayed recurrence is
    ``z^d = z^(d-1) - lam``, which converges only for ``lam < 2 sin(pi / (2(2d - 1)))`` (1 at ``d = 2``, 0.62 at
    ``d = 3``): undamped, such a direction oscillates forever at ``d = 2`` and grows at ``d = 3`` (measured: with
    ``one-peer-exp`` on 4 ranks at ``d = 2`` the consensus distance stayed 3-4x that of ``d = 1``, and the LM's
    averaged model trained like ranks that never communicate). ``lam / d`` is inside that bound for every ``d``.
    ``max_delay=1``: unchanged."""
    if max_delay <= 1 or group.size == 1:
        return group
    return Group(group.ranks, 1.0 - (1.0 - group.self_weight) / max_delay)


_ORPHANS: list[tuple[list[dist.Work], list[torch.Tensor]]] = []
# What a rank that ran out of inputs contributes to an announcement (a MAX all-reduce): less than any value.
_SILENT = -(1 << 62)


def _layout(tensors: list[torch.Tensor]) -> list[tuple[str, int]]:
    return [(str(t.dtype), t.numel()) for t in tensors]


def prune_orphans() -> None:
    """Forget orphaned rounds whose communication has completed."""
    _ORPHANS[:] = [o for o in _ORPHANS if not all(w.is_completed() for w in o[0])]
