"""Process groups, the control plane (stamps that say what every rank is doing) and timed waits.

Control and data never share a channel. Data (parameters) moves on the job's own backend (NCCL on GPUs,
gloo on CPU). Control moves on *gloo process groups over CPU tensors*, twins of the data groups:

* a stamp is a few integers (what operation, which round, how many elements, which buckets, who failed),
  always of the same size, so two ranks doing different things can never line up collectives of different
  sizes (gloo aborts the process on that) and always learn that they differ;
* it is exchanged without touching the GPU, so on CUDA checking it never makes the host wait for the device,
  and a dead or hung peer is detected on the host, within ``timeout``, even while NCCL would wait forever.

Process groups are created once per set of ranks and shared by every wrapper in the process.
"""

from __future__ import annotations

import math
import pickle
import weakref
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from enum import IntEnum
from typing import Any, cast

import torch
import torch.distributed as dist
from loguru import logger

__all__ = ["GossipError", "Op", "Failure", "Stamp", "StampExchange", "ProcessGroups", "global_rank", "as_timeout",
           "wait_all", "digest32", "agree", "gather_objects", "Checks", "DEFAULT_TIMEOUT", "UNEVEN_HINT"]

# How long a step or a global operation waits for its peers by default: long enough for a peer that is
# evaluating or saving a checkpoint, short enough that a mistake (ranks that took different numbers of steps)
# ends in an error within minutes rather than after the process group's timeout (30 minutes on gloo).
DEFAULT_TIMEOUT = timedelta(minutes=5)

UNEVEN_HINT = ("If the ranks have different amounts of data, wrap the training loop in "
               "torch.distributed.algorithms.Join([optimizer]) (or Join([ddp_model])), or give every rank the same "
               "number of batches.")


class GossipError(RuntimeError):
    """A gossip operation failed: a peer died, hung, failed, or the ranks fell out of step."""


def global_rank(process_group: dist.ProcessGroup | None, rank: int) -> int:
    """The default-group rank of ``rank`` of ``process_group`` (``None``: the default group itself)."""
    return rank if process_group is None else dist.get_global_rank(process_group, rank)


def digest32(*parts: Any) -> int:
    """A 31-bit fingerprint of ``parts`` (their ``repr``), equal on ranks that pass equal values."""
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


def as_timeout(timeout: float | timedelta | None, name: str = "timeout") -> timedelta:
    """Validate a user timeout (``None``: :data:`DEFAULT_TIMEOUT`). Waits have millisecond resolution, so a
    shorter one is rounded up to 1 ms."""
    if timeout is None:
        return DEFAULT_TIMEOUT
    seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        raise ValueError(f"Invalid {name}={timeout!r}. Must be a positive number of seconds, a timedelta or None.")
    if not math.isfinite(seconds):
        raise ValueError(f"Invalid {name}={timeout!r}. Must be finite; None waits as long as the process "
                         "group's own timeout.")
    return timedelta(milliseconds=max(1, math.ceil(seconds * 1000)))


def wait_all(works: Sequence[dist.Work], timeout: timedelta | None, what: str) -> None:
    """Wait for ``works``; a failure or a timeout becomes a :class:`GossipError` that says ``what`` failed
    (``timeout=None``: the process group's own)."""
    for w in works:
        try:
            if timeout is None:
                w.wait()
            else:
                w.wait(timeout)
        except RuntimeError as exc:
            within = f" within {timeout.total_seconds():g} s" if timeout is not None else ""
            raise GossipError(
                f"{what} did not complete{within}. A peer may have died, hung, stopped calling the same "
                f"operations as this rank, or taken a different number of steps. {UNEVEN_HINT} The process group "
                f"is unusable now; restart from a checkpoint. Cause: {exc}"
            ) from exc


class Op(IntEnum):
    """Operation kinds carried by a stamp."""

    ROUND = 1  # a gossip round
    GLOBAL = 2  # global averaging, consensus distance, metrics: blocking, over all ranks
    LAYOUT = 3  # agreeing on the model (construction, add_param_group)

    @property
    def description(self) -> str:
        return {Op.ROUND: "a gossip round", Op.GLOBAL: "a global operation", Op.LAYOUT: "a layout agreement"}[self]


def _describe(op: int) -> str:
    return Op(op).description if op in Op._value2member_map_ else f"operation {op}"


class Failure(IntEnum):
    """Why a rank failed, sent in a stamp so that its peers raise at once instead of timing out."""

    NONE = 0
    LEFT_BUCKET = 1
    NON_FINITE = 2
    CANNOT_SHADOW = 3

    @property
    def reason(self) -> str:
        return _REASONS[self]


_REASONS = {
    Failure.NONE: "nothing",
    Failure.LEFT_BUCKET: "its parameters are no longer views into the buckets (their storage was replaced after "
                         "wrapping)",
    Failure.NON_FINITE: "it has non-finite (inf/NaN) parameters",
    Failure.CANNOT_SHADOW: "it ran out of inputs inside a Join and cannot stand in for that operation (only step(), "
                           "global_avg(), revert_global_avg() and consensus_distance() can be shadowed)",
}


@dataclass(frozen=True)
class Stamp:
    """What a rank is doing: ``op`` (an :class:`Op`), its ``round``, element count and a fingerprint
    ``ident`` of what it averages (which buckets, which operation), ``failed`` (a :class:`Failure`), and its
    ``step`` (which differs from the round when rounds are launched every few steps)."""

    op: int
    round: int
    numel: int
    ident: int
    failed: int = Failure.NONE
    step: int = 0

    def values(self) -> list[int]:
        return [self.op, self.round, self.numel, self.ident, self.failed, self.step]


_N = 6  # fields in a stamp


class StampExchange:
    """One stamp exchange in flight with a pair peer (point to point) or a group (all-reduce of max and -min)."""

    def __init__(self, stamp: Stamp, rank: int, ranks: tuple[int, ...], control: dist.ProcessGroup,
                 global_peer: int | None, tag: int) -> None:
        self.stamp, self.rank, self.ranks = stamp, rank, ranks
        self.verified = False
        mine = stamp.values()
        if global_peer is not None:
            # A pair: the peer's stamp itself arrives, so a mismatch names the peer.
            self._out = torch.tensor(mine + [rank], dtype=torch.int64)
            self._in = torch.empty(_N + 1, dtype=torch.int64)
            self.works = dist.batch_isend_irecv([dist.P2POp(dist.isend, self._out, global_peer, control, tag=tag),
                                                 dist.P2POp(dist.irecv, self._in, global_peer, control, tag=tag)])
        else:
            # A group: max and -min of every field (and the largest failing rank + 1) in one fixed-size message.
            failer = rank + 1 if stamp.failed else 0
            self._in = torch.tensor(mine + [-v for v in mine] + [failer], dtype=torch.int64)
            self.works = [dist.all_reduce(self._in, op=dist.ReduceOp.MAX, group=control, async_op=True)]

    def verify(self, timeout: timedelta | None, what: str) -> None:
        """Wait for the exchange and raise :class:`GossipError` if any member did something else. Once it has
        passed, it returns at once (a gloo point-to-point work must not be waited for twice)."""
        if self.verified:
            return
        wait_all(self.works, timeout, f"rank {self.rank}: {what}")
        v = self._in.tolist()
        if len(v) == _N + 1:  # a pair: the peer's own stamp
            peer = Stamp(*v[:_N])
            problem = self._compare(peer, peer, v[_N] if peer.failed else -1, v[_N])
        else:
            hi, lo = Stamp(*v[:_N]), Stamp(*[-x for x in v[_N:2 * _N]])
            problem = self._compare(lo, hi, v[2 * _N] - 1, None)
        if problem is not None:
            raise GossipError(f"rank {self.rank}: {what}: {problem}")
        self.verified = True

    def _compare(self, lo: Stamp, hi: Stamp, failer: int, peer: int | None) -> str | None:
        s = self.stamp
        others = f"rank {peer}" if peer is not None else f"the group {list(self.ranks)}"
        if hi.failed and failer != self.rank:
            reason = Failure(hi.failed).reason if hi.failed in Failure._value2member_map_ else "an unknown failure"
            return f"rank {failer} failed: {reason}."
        rounds = "" if lo.round == hi.round == s.round else (
            f" (this rank at round {s.round}, {others} at "
            f"{f'round {lo.round}' if lo.round == hi.round else f'rounds {lo.round} to {hi.round}'})")
        if lo.op != s.op or hi.op != s.op:
            theirs = {_describe(o) for o in (lo.op, hi.op) if o != s.op}
            steps = f"; the ranks took different numbers of steps{rounds}. {UNEVEN_HINT}" if rounds else "."
            return (f"this rank did {_describe(s.op)} while {others} did {', '.join(sorted(theirs))}{steps} Every "
                    "rank must call step(), global_avg(), consensus_distance() and the like in the same order.")
        if lo.round != s.round or hi.round != s.round:
            return (f"out of step: the ranks took different numbers of steps{rounds}. Every rank must call step() "
                    f"the same number of times and resume from the same step. {UNEVEN_HINT}")
        if lo.step != s.step or hi.step != s.step:
            at = f"step {lo.step}" if lo.step == hi.step else f"steps {lo.step} to {hi.step}"
            return (f"out of step: the ranks took different numbers of steps (this rank at step {s.step}, {others} "
                    f"at {at}). Every rank must call step() the same number of times. {UNEVEN_HINT}")
        if lo.ident != s.ident or hi.ident != s.ident:
            return (f"{others} averaged different buckets or did another operation in round {s.round} (ranks "
                    "launched their buckets in different orders, or hold different models).")
        if lo.numel != s.numel or hi.numel != s.numel:
            n = f"{lo.numel}" if lo.numel == hi.numel else f"between {lo.numel} and {hi.numel}"
            return (f"this rank averaged {s.numel} elements in round {s.round}, {others} {n}: the ranks disagree "
                    "on which parameters are trainable (requires_grad).")
        return None


# What each kind of group is for, as the debug log says it (the kinds are internal names).
_GROUP_PURPOSE = {
    "data": "the process group in which ranks {} average their parameters",
    "data-back": "a second process group of ranks {}, so that the two directions of a point-to-point pair travel "
                 "on connections of their own",
    "control": "the gloo process group in which ranks {} exchange round stamps (what each is doing, which round)",
}


class WeakGroup:
    """A process group held weakly: torch's registry keeps it alive until ``destroy_process_group()``, and then it
    must go. A group still held by this package (or a gloo worker thread it keeps alive) would outlive that into
    interpreter shutdown, where a worker thread that frees a tensor aborts the process ("terminate called without
    an active exception"). ``None`` stands for the default group."""

    __slots__ = ("_ref",)

    def __init__(self, pg: dist.ProcessGroup | None) -> None:
        self._ref = None if pg is None else weakref.ref(pg)

    def get(self) -> Any:
        if self._ref is None:
            return None
        pg = self._ref()
        if pg is None:
            raise RuntimeError("The process group was destroyed (torch.distributed.destroy_process_group()); build "
                               "the wrapper again after init_process_group().")
        return pg


class _GroupCache:
    """``(ranks, kind, backend)`` -> process group (weakly, see :class:`WeakGroup`) or torch's non-member marker."""

    def __init__(self) -> None:
        self._groups: weakref.WeakValueDictionary[Any, Any] = weakref.WeakValueDictionary()
        self._markers: dict[Any, Any] = {}

    def __contains__(self, key: Any) -> bool:
        return key in self._markers or key in self._groups

    def __getitem__(self, key: Any) -> Any:
        return self._markers[key] if key in self._markers else self._groups[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        if isinstance(value, dist.ProcessGroup):
            self._groups[key] = value
        else:
            self._markers[key] = value

    def keys(self) -> list[Any]:
        return list(self._markers) + list(self._groups.keys())


class ProcessGroups:
    """The process groups of one gossip world (``parent``: the default group, or the user's subgroup).

    Data groups use the parent's backend; control groups are gloo twins. A data group of every rank of the
    parent is the parent itself. Groups are created once and cached process-wide; :meth:`prepare` creates a
    whole schedule's groups at construction, never mid-training.
    """

    # Per job (its default process group) and weakly, groups and jobs alike (see WeakGroup).
    _caches: weakref.WeakKeyDictionary[Any, _GroupCache] = weakref.WeakKeyDictionary()

    def __init__(self, parent: dist.ProcessGroup | None) -> None:
        self._parent = WeakGroup(parent)
        self.world_size = dist.get_world_size(parent)
        self.backend = str(dist.get_backend(parent))
        self._cache = self._caches.setdefault(dist.distributed_c10d._get_default_group(), _GroupCache())

    @property
    def parent(self) -> dist.ProcessGroup | None:
        return cast("dist.ProcessGroup | None", self._parent.get())

    @classmethod
    def known(cls) -> list[tuple[tuple[int, ...], str]]:
        """``(global ranks, kind)`` of every group this process knows of in the current job (for tests)."""
        cache = cls._caches.get(dist.distributed_c10d._get_default_group())
        return [(ranks, kind) for ranks, kind, _ in cache.keys()] if cache is not None else []

    def to_global(self, ranks: Sequence[int]) -> tuple[int, ...]:
        return tuple(global_rank(self.parent, r) for r in ranks)

    def prepare(self, slots: Sequence[Sequence[tuple[tuple[int, ...], str]]]) -> None:
        """Create the groups ``(ranks, "data" | "data-back" | "control")`` (ranks of the parent), slot by slot, on
        every rank of the gossip world; the groups of one slot are disjoint.

        torch names a group that only its members create (``use_local_synchronization=True``, which spares every
        other rank a rendezvous) after a counter that only its members advance (torch 2.15: non-members return
        before it moves). Two members that had created different numbers of groups before would then compute
        different names for the same group and wait for each other forever (a ring of 3 with all-reduce pairs
        did). So every rank advances the counter by exactly one per slot: a member of a new group of the slot
        creates it, any other rank creates and drops a group of its own. A group of every rank of the job is
        created by all of them, torch's default.
        """
        me = dist.get_rank()
        for slot in slots:
            new = [(g, kind) for g, kind in ((self.to_global(r), kind) for r, kind in slot
                                             if not (kind == "data" and len(r) == self.world_size))
                   if self._key(g, kind) not in self._cache]
            if not new:
                continue
            mine = [(g, kind) for g, kind in new if me in g]
            for g, kind in new:
                if me not in g:  # torch's marker, so that this rank never creates the group later
                    self._cache[self._key(g, kind)] = dist.GroupMember.NON_GROUP_MEMBER
            if mine:
                self._create(*mine[0])
            else:
                pad = dist.new_group([me], backend="gloo", use_local_synchronization=True)
                dist.destroy_process_group(pad)

    def data(self, ranks: Sequence[int]) -> dist.ProcessGroup | None:
        """The data group of ``ranks`` (ranks of the parent)."""
        if len(ranks) == self.world_size:
            return self.parent
        return self._get(self.to_global(ranks), "data")

    def data_back(self) -> dist.ProcessGroup:
        """A second data group of every rank (gloo point to point: the direction back has its own connections)."""
        return self._get(self.to_global(range(self.world_size)), "data-back")

    def control(self, ranks: Sequence[int] | None = None) -> dist.ProcessGroup:
        """The gloo control group of ``ranks`` (default: every rank of the parent)."""
        ranks = range(self.world_size) if ranks is None else ranks
        return self._get(self.to_global(ranks), "control")

    def _key(self, global_ranks: tuple[int, ...], kind: str) -> tuple[tuple[int, ...], str, str]:
        return global_ranks, kind, "gloo" if kind == "control" else self.backend

    def _get(self, global_ranks: tuple[int, ...], kind: str) -> dist.ProcessGroup:
        pg = self._create(global_ranks, kind)
        if pg is dist.GroupMember.NON_GROUP_MEMBER:
            raise RuntimeError(f"internal error: rank {dist.get_rank()} is not in process group {list(global_ranks)}")
        return cast(dist.ProcessGroup, pg)

    def _create(self, global_ranks: tuple[int, ...], kind: str) -> Any:
        key = self._key(global_ranks, kind)
        if key not in self._cache:
            logger.debug("rank {}: creating {}", dist.get_rank(), _GROUP_PURPOSE[kind].format(list(global_ranks)))
            everyone = len(global_ranks) == dist.get_world_size()
            self._cache[key] = dist.new_group(list(global_ranks), backend=key[2],
                                              use_local_synchronization=not everyone)
        return self._cache[key]


def gather_objects(obj: Any, group: dist.ProcessGroup, timeout: timedelta | None, what: str) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, over a gloo ``group``; blocking.

    ``torch.distributed.all_gather_object`` does this too, but it converts through numpy, which torch does not
    require (a fresh install without it failed at construction); this moves the pickled bytes as uint8 tensors.
    """
    data = pickle.dumps(obj)
    n = dist.get_world_size(group)
    size = torch.tensor([len(data)], dtype=torch.int64)
    sizes = [torch.empty(1, dtype=torch.int64) for _ in range(n)]
    wait_all([dist.all_gather(sizes, size, group=group, async_op=True)], timeout, what)
    longest = max(int(t) for t in sizes)
    mine = torch.zeros(longest, dtype=torch.uint8)
    mine[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    everyone = [torch.empty(longest, dtype=torch.uint8) for _ in range(n)]
    wait_all([dist.all_gather(everyone, mine, group=group, async_op=True)], timeout, what)
    return [pickle.loads(bytes(t[:int(k)].tolist())) for t, k in zip(everyone, sizes)]


class Checks:
    """Runs argument checks, keeping the first ``ValueError``'s message instead of raising it (so that it can
    be shared with the other ranks by :func:`agree` before anyone raises)."""

    def __init__(self, error: str | None) -> None:
        self.error = error

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except ValueError as exc:
            if self.error is None:
                self.error = str(exc)
            return None


def agree(groups: ProcessGroups, rank: int, what: str, error: str | None,
          checks: dict[str, tuple[Any, str, str]], timeout: timedelta | None = None) -> None:
    """Make every rank of ``groups`` raise the same ``ValueError`` if any of them failed or they differ.

    ``error``: this rank's own problem (``None`` if none). ``checks``: name -> (value, what differing values
    mean, what to do); values must be equal on every rank. Nobody raises before everybody has spoken, so a
    problem on one rank never leaves the others waiting in a collective.
    """
    control = groups.control()
    everyone_ranks = tuple(range(groups.world_size))
    StampExchange(Stamp(Op.LAYOUT, 0, 0, digest32(what)), rank, everyone_ranks, control, None, 0).verify(timeout, what)
    mine = (error, {k: v for k, (v, _, _) in checks.items()})
    everyone = gather_objects(mine, control, timeout, what)
    if error is not None:
        raise ValueError(error)
    failed = [(r, e[0]) for r, e in enumerate(everyone) if e[0] is not None]
    if failed:
        raise ValueError(f"rank {failed[0][0]} failed while {what}: {failed[0][1]}")
    for name, (_, meaning, advice) in checks.items():
        values = [e[1][name] for e in everyone]
        if len(set(map(repr, values))) != 1:
            raise ValueError(f"Ranks {meaning} while {what} (by rank: {values}); {advice}.")
