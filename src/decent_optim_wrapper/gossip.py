"""The life of gossip rounds: one object owns the round counter, the round in flight, the copy held around
global averaging, and what a checkpoint needs to resume them.

Round ``t`` of the schedule is launched by :meth:`Gossip.launch` (non-blocking) and applied by the next
:meth:`Gossip.apply`, which waits for it. :meth:`Gossip.average_globally` sets the round in flight aside and
:meth:`Gossip.revert` puts everything back, so training continues as if global averaging never happened.
:meth:`Gossip.state_dict` describes the run as :meth:`revert` would restore it.

Every launch sends a stamp on the control plane (see :mod:`~decent_optim_wrapper.comm`); the stamp is
checked before the round's result is used, and *before its data moves* when the set of buckets changed since
the previous round (a thaw), so that ranks that disagree never line up data collectives of different sizes.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from loguru import logger

from .buckets import Bucket
from .comm import GossipError, Op, ProcessGroups, Stamp, StampExchange, digest32, global_rank, wait_all
from .topo import Group, Schedule
from .transport import Piece, Transport, choose

__all__ = ["Gossip", "CommStats", "next_instance"]

# Point-to-point tags: one range per Gossip object (gloo keeps them apart; NCCL has no tags, and the order of
# launches, agreed by every rank, is what matches messages there).
_TAG_BITS = 16
_instances: dict[Any, int] = {}


def _world_key(groups: ProcessGroups) -> Any:
    return dist.distributed_c10d._get_default_group(), groups.to_global(range(groups.world_size))


def next_instance(groups: ProcessGroups) -> int:
    """The instance number the next :class:`Gossip` over ``groups`` gets (ranks check they agree on it)."""
    return _instances.get(_world_key(groups), 0)


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
    """A launched round whose result is not yet applied: its pieces, in the order they are applied."""

    index: int
    group: Group
    pieces: list[Piece]
    stamp: StampExchange | None
    # Version counters of the parameters of buckets sent with no copy, at launch: an in-place write while the
    # send is in flight would reach the peer torn.
    versions: list[tuple[int, list[int]]] = field(default_factory=list)
    settled: bool = False  # communication complete and checked; the result waits in the buffers

    @property
    def works(self) -> list[dist.Work]:
        return [w for piece in self.pieces for w in piece.works]


@dataclass
class _Held:
    """What :meth:`Gossip.average_globally` replaced, kept until :meth:`Gossip.revert`."""

    flats: list[torch.Tensor]
    pending: _InFlight | None
    relaunch: bool
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
            key = _world_key(groups)
            self.instance = _instances.get(key, 0)
            _instances[key] = self.instance + 1
        self.tag = self.instance << _TAG_BITS
        self.round = 0  # rounds launched: the next launch is round self.round
        self._stats = CommStats()
        self._pending: _InFlight | None = None
        self._relaunch = False  # resumed with a round in flight: run it again before applying
        self._held: _Held | None = None
        self._buffers: dict[tuple[int, int, torch.dtype], torch.Tensor] = {}
        self._active = self._active_ids()
        # Every group this rank belongs to, with its process groups created now (never mid-training): a
        # full-precision transport, and one for the buckets that travel compressed.
        self._transports: dict[tuple[tuple[int, ...], bool], Transport] = {}
        if groups is not None:
            groups.prepare(self._group_specs())
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
    def launch(self, failed: int = 0) -> None:
        """Start round :attr:`round` without blocking, then count it.

        ``failed`` (a :data:`~decent_optim_wrapper.comm.FAILURES` key) sends only the stamp, so that the
        peers learn at once why this rank stops; the caller then raises.
        """
        if self._pending is not None:
            raise RuntimeError("Gossip.launch() while a round is in flight; apply() it first.")
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
        sent = 0
        versions: list[tuple[int, list[int]]] = []
        for compressed in (False, True):
            part = [i for i in ids if self._compressed(i) == compressed]
            if part:
                transport = self._transports[group.ranks, compressed]
                flats = [self.buckets[i].flat for i in part]
                if transport.sends_buckets:  # before the launch: the first pieces may be on the wire at once
                    versions += [(i, list(map(_VERSION, self.buckets[i].params))) for i in part]
                pieces += transport.launch(flats, part, self._buffer, tag=len(pieces))
                sent += transport.bytes_sent(flats)
        self._stats = replace(self._stats, rounds=self._stats.rounds + 1, bytes_sent=self._stats.bytes_sent + sent)
        self._pending = _InFlight(t, group, pieces, stamp, versions)

    def fail(self, code: int) -> None:
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
        if not pending.settled:
            self._verify(pending, check_writes=True)
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

    def _settle(self, check_writes: bool = True) -> _InFlight | None:
        """Wait for the round in flight (re-running it first after a resume) and check it; keep it."""
        self._relaunched()
        return self._drain(check_writes)

    def _drain(self, check_writes: bool = False) -> _InFlight | None:
        """Wait for the round in flight and check its stamp (and, with ``check_writes``, that nobody wrote the
        buckets it sent); keep it."""
        pending = self._pending
        if pending is None or pending.settled:
            return pending
        self._verify(pending, check_writes)
        with self._waiting(pending) as what:
            self._wait_data(pending.works, what)
        pending.settled = True
        return pending

    def _verify(self, pending: _InFlight, check_writes: bool) -> None:
        """Check the stamp of the round in flight (waiting for the peers' stamps) and, with ``check_writes``,
        that nobody wrote the buckets it sends while they were being sent."""
        if pending.stamp is not None:
            with self._waiting(pending) as what:
                pending.stamp.verify(self.timeout, what)
        if check_writes:
            self._check_unchanged(pending)

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

    def _check_unchanged(self, pending: _InFlight) -> None:
        for i, versions in pending.versions:
            if list(map(_VERSION, self.buckets[i].params)) != versions:
                self.fail(4)
                raise ValueError(
                    f"rank {self.rank}: parameters were modified in place between two step() calls (after round "
                    f"{pending.index} was launched), while they were being sent to the peer: it may have received "
                    "some old and some new values. Change parameters inside the step (a step post-hook on the "
                    "inner optimizer runs before the round is launched), or call finish() before changing them.")

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
        # A round that will be dropped (no revert) may have sent torn values: every rank drops its own.
        pending = self._settle(check_writes=may_revert)
        if may_revert and self._held is None:
            self._held = _Held([b.flat.clone() for b in self.buckets], pending, False,
                               [(t, t.clone()) for t in extras])
        self._pending = None
        self.global_mean([b.flat for b in self.buckets] + extras, "global_avg")

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
        self._pending, self._relaunch = held.pending, held.relaunch

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
        if self.groups is None:
            return
        n = self.groups.world_size
        self.agree_global(what, [(str(t.dtype), t.numel()) for t in tensors])
        works = []
        for t in tensors:
            t.mul_(1.0 / n)  # scale first, as the rounds do: x/n summed, never a sum that could overflow
            works.append(dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.groups.parent, async_op=True))
        self._wait_data(works, what)

    def agree_global(self, what: str, detail: Any) -> None:
        """Blocking check that every rank of the gossip world is doing ``what`` with the same ``detail``."""
        if self.groups is None:
            return
        ident = digest32(what, detail)
        stamp = Stamp(Op.GLOBAL, self.round, 0, ident)
        self._stamp(stamp, None).verify(self.timeout, f"{what} at round {self.round}")

    def control_sum(self, values: list[float]) -> list[float]:
        """Sum small host values over all ranks on the control plane (after :meth:`agree_global`)."""
        if self.groups is None:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        wait_all([dist.all_reduce(t, group=self.groups.control(), async_op=True)], self.timeout,
                 f"rank {self.rank}: summing over ranks")
        return t.tolist()

    def _stamp(self, stamp: Stamp, group: Group | None) -> StampExchange:
        assert self.groups is not None  # only called with a process group (world size > 1)
        ranks = tuple(range(self.groups.world_size)) if group is None else group.ranks
        if len(ranks) == 2:
            peer = ranks[0] if ranks[1] == self.rank else ranks[1]
            return StampExchange(stamp, self.rank, ranks, self.groups.control(),
                                 global_rank(self.groups.parent, peer), self.tag)
        return StampExchange(stamp, self.rank, ranks, self.groups.control(ranks), None, self.tag)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """The round counter, whether a round was in flight, and the buckets, as :meth:`revert` would leave them."""
        held = self._held
        if held is not None:
            return {"round": self.round, "pending": held.pending is not None or held.relaunch,
                    "buckets": list(held.flats)}
        return {"round": self.round, "pending": self.pending, "buckets": [b.flat for b in self.buckets]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` (already validated by the caller): a round that was in flight is run
        again from the saved buckets on the next :meth:`apply`, which reproduces its result exactly."""
        # Whatever was in flight belongs to the run being replaced, but its messages must land before its buffers
        # are used again (and gloo must never see an in-flight point-to-point operation destroyed).
        self._drain()
        self._pending, self._held = None, None
        with torch.no_grad():
            for b, t in zip(self.buckets, state.get("buckets") or []):
                b.flat.copy_(t)
        self.round = int(state["round"])
        self._relaunch = bool(state["pending"]) and self.round > 0

    # ------------------------------------------------------------------ helpers
    def _active_ids(self) -> list[int]:
        return [i for i, b in enumerate(self.buckets) if not b.frozen]

    def _group_specs(self) -> list[tuple[tuple[int, ...], str]]:
        """Every process group the schedule needs, on any rank, in one order (the same on every rank)."""
        assert self.groups is not None
        device = self.buckets[0].flat.device if self.buckets else torch.device("cpu")
        specs: list[tuple[tuple[int, ...], str]] = [(tuple(range(self.groups.world_size)), "control")]
        for groups in self.schedule.rounds:
            for g in sorted(groups, key=lambda g: g.ranks):
                if g.size < 2:
                    continue
                for wire in (None, self.wire_dtype) if self.wire_dtype is not None else (None,):
                    if not choose(g, self.groups.backend, device, wire, self.pair_transport).point_to_point:
                        specs.append((g.ranks, "data"))
                    elif self._two_connections(device):
                        specs.append((tuple(range(self.groups.world_size)), "data-back"))
                if g.size > 2 and self.check_rounds:
                    specs.append((g.ranks, "control"))
        return list(dict.fromkeys(specs))

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
_VERSION = operator.attrgetter("_version")


def prune_orphans() -> None:
    """Forget orphaned rounds whose communication has completed."""
    _ORPHANS[:] = [o for o in _ORPHANS if not all(w.is_completed() for w in o[0])]
