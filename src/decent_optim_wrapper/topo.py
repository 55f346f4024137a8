"""Communication topologies: who averages with whom in each round.

A topology is a *pure* schedule: a function of (rank, world size, round) that needs no process group, so
it can be built, validated and analysed anywhere, and a checkpoint only has to remember the round counter.

Two ways to write one (subclass :class:`Topology` and implement either):

* ``assign_groups()`` (the decent-optim-wrapper 0.1 form): for every rank, the list of groups it belongs to,
  one per round, each group a list of ranks (or a :class:`Group` to give a self-weight).
* ``rounds()``: for every round, the list of :class:`Group` objects that partition the ranks. Cheaper at
  large world sizes, because a group is stored once rather than once per member.

:meth:`Topology.schedule` turns either form into a validated :class:`Schedule`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = [
    "Group",
    "Schedule",
    "Topology",
    "RingTopology",
    "CompleteTopology",
    "TopologyFactory",
]


@dataclass(frozen=True)
class Group:
    """A set of ranks that average together in one round.

    Args:
        ranks: the members, sorted ascending.
        weight: the self-weight ``w`` of every member: ``x_i <- w*x_i + (1-w)/(|G|-1) * sum_{j != i} x_j``.
            ``None`` means uniform averaging (``w = 1/|G|``).
    """

    ranks: tuple[int, ...]
    weight: float | None = None

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def self_weight(self) -> float:
        """Weight a member gives its own parameters."""
        return 1.0 / len(self.ranks) if self.weight is None else self.weight

    @property
    def peer_weight(self) -> float:
        """Weight a member gives each other member's parameters."""
        if self.weight is None:
            return 1.0 / len(self.ranks)
        return (1.0 - self.weight) / (len(self.ranks) - 1) if len(self.ranks) > 1 else 0.0


def _as_group(entry: Any, where: str) -> Group:
    """Normalise a user-supplied group (list of ranks, tuple, or Group) into a sorted Group."""
    if isinstance(entry, Group):
        ranks, weight = entry.ranks, entry.weight
    elif isinstance(entry, (list, tuple)):
        ranks, weight = entry, None
    else:
        raise ValueError(f"{where}: a group must be a list of ranks or a Group, got {type(entry).__name__}")
    if not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks):
        raise ValueError(f"{where}: group {list(ranks)} must contain integer ranks only")
    if weight is not None:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"{where}: group weight must be a finite number in [0, 1], got {weight!r}")
        weight = float(weight)
    return Group(tuple(sorted(ranks)), weight)


class Schedule:
    """A validated gossip schedule: for each round, a partition of the ranks into groups.

    Round ``t`` of training uses ``rounds[t % period]``.
    """

    def __init__(self, world_size: int, rounds: Sequence[Sequence[Group]]) -> None:
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"Invalid world_size={world_size!r}. Must be an integer >= 1.")
        if len(rounds) == 0:
            raise ValueError("Invalid schedule: it has no rounds. Give at least one round.")
        self.world_size = world_size
        self.rounds: tuple[tuple[Group, ...], ...] = tuple(tuple(r) for r in rounds)
        # owner[t][rank] = index of the rank's group in round t
        self._owner: list[list[int]] = []
        for t, groups in enumerate(self.rounds):
            owner = [-1] * world_size
            for gi, group in enumerate(groups):
                self._check_group(group, t)
                for r in group.ranks:
                    if owner[r] != -1:
                        raise ValueError(
                            f"Invalid schedule: rank {r} is in two groups of round {t} "
                            f"({list(groups[owner[r]].ranks)} and {list(group.ranks)})."
                        )
                    owner[r] = gi
            missing = [r for r, g in enumerate(owner) if g == -1]
            if missing:
                raise ValueError(f"Invalid schedule: round {t} has no group for rank(s) {missing[:8]}.")
            self._owner.append(owner)

    def _check_group(self, group: Group, t: int) -> None:
        ranks = group.ranks
        if len(ranks) == 0:
            raise ValueError(f"Invalid schedule: round {t} contains an empty group.")
        if len(set(ranks)) != len(ranks):
            raise ValueError(f"Invalid schedule: group {list(ranks)} in round {t} repeats a rank.")
        bad = [r for r in ranks if not 0 <= r < self.world_size]
        if bad:
            raise ValueError(
                f"Invalid schedule: group {list(ranks)} in round {t} names rank(s) {bad} "
                f"outside [0, {self.world_size})."
            )
        w = group.weight
        if w is not None:
            if not 0.0 <= w <= 1.0:
                raise ValueError(
                    f"Invalid schedule: group {list(ranks)} in round {t} has weight {w}; must be in [0, 1]."
                )
            if len(ranks) == 1 and w != 1.0:
                raise ValueError(
                    f"Invalid schedule: single-rank group {list(ranks)} in round {t} has weight {w}; "
                    "a rank alone can only keep its own parameters (weight 1 or None)."
                )

    @property
    def period(self) -> int:
        """Number of rounds after which the schedule repeats."""
        return len(self.rounds)

    def group(self, rank: int, round_: int) -> Group:
        """The group of ``rank`` at training round ``round_`` (taken modulo the period)."""
        t = round_ % self.period
        return self.rounds[t][self._owner[t][rank]]

    def per_rank(self) -> list[list[list[int]]]:
        """The schedule in the 0.1 ``assign_groups()`` form: ``[rank][round] -> sorted ranks``."""
        return [[list(self.group(r, t).ranks) for t in range(self.period)] for r in range(self.world_size)]

    def digest(self) -> str:
        """A short fingerprint; ranks compare it to check they all built the same schedule."""
        h = hashlib.sha256(str(self.world_size).encode())
        for groups in self.rounds:
            h.update(b"|")
            for g in sorted(groups, key=lambda g: g.ranks):
                h.update(repr((g.ranks, g.weight)).encode())
        return h.hexdigest()[:16]

    @classmethod
    def from_per_rank(cls, world_size: int, per_rank: Any) -> Schedule:
        """Build a schedule from the ``assign_groups()`` form, checking that every member agrees."""
        if not isinstance(per_rank, (list, tuple)) or len(per_rank) != world_size:
            got = len(per_rank) if isinstance(per_rank, (list, tuple)) else type(per_rank).__name__
            raise ValueError(
                f"Invalid schedule: assign_groups() must return one list of groups per rank "
                f"({world_size} lists), got {got}."
            )
        lengths = {len(g) if isinstance(g, (list, tuple)) else -1 for g in per_rank}
        if -1 in lengths:
            raise ValueError("Invalid schedule: each rank's entry must be a list of groups (one per round).")
        if len(lengths) != 1:
            detail = ", ".join(f"rank {r}: {len(g)}" for r, g in enumerate(per_rank))
            raise ValueError(f"Invalid schedule: ranks have different numbers of rounds ({detail}).")
        period = lengths.pop()
        if period == 0:
            raise ValueError("Invalid schedule: it has no rounds. Give at least one round.")
        norm = [[_as_group(per_rank[r][t], f"rank {r}, round {t}") for t in range(period)] for r in range(world_size)]
        for r in range(world_size):
            for t, g in enumerate(norm[r]):
                if r not in g.ranks:
                    raise ValueError(f"Invalid schedule: rank {r} is missing from its own group {list(g.ranks)} "
                                     f"in round {t}.")
                for m in g.ranks:
                    if not 0 <= m < world_size:
                        raise ValueError(f"Invalid schedule: group {list(g.ranks)} of rank {r} in round {t} names "
                                         f"rank {m} outside [0, {world_size}).")
        rounds: list[list[Group]] = []
        for t in range(period):
            seen: dict[tuple[int, ...], Group] = {}
            for r in range(world_size):
                g = norm[r][t]
                for m in g.ranks:
                    other = norm[m][t]
                    if other.ranks != g.ranks:
                        raise ValueError(
                            f"Invalid schedule: in round {t}, rank {r} lists group {list(g.ranks)} but member "
                            f"{m} lists {list(other.ranks)}; members must agree on their group."
                        )
                    if other.weight != g.weight:
                        raise ValueError(
                            f"Invalid schedule: in round {t}, members {r} and {m} of group {list(g.ranks)} give "
                            f"different self-weights ({g.weight} and {other.weight}); the mixing matrix would not "
                            "be doubly stochastic."
                        )
                seen.setdefault(g.ranks, g)
            rounds.append(list(seen.values()))
        return cls(world_size, rounds)


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {name}={value!r}. Must be an integer >= 1.")
    return value


class Topology:
    """Base class of all topologies.

    Subclasses implement ``assign_groups()`` or ``rounds()`` (see the module docstring). The constructor
    signature is the one ``TopologyFactory.create`` uses; subclasses can read ``self._rank``,
    ``self._world_size`` and ``self._local_world_size``.
    """

    def __init__(self, rank: int, world_size: int, local_world_size: int = 1, topology: str | None = None) -> None:
        self._world_size = _check_positive_int("world_size", world_size)
        self._local_world_size = _check_positive_int("local_world_size", local_world_size)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"Invalid rank={rank!r}. Must be an integer in [0, world_size={world_size}).")
        self._rank = rank
        self._topology = topology or type(self).__name__
        self._schedule: Schedule | None = None

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def local_world_size(self) -> int:
        return self._local_world_size

    @property
    def name(self) -> str:
        return self._topology

    def assign_groups(self) -> list[list[list[int]]]:
        """For every rank, its group in each round: ``groups[rank][round] -> list of ranks``."""
        if type(self).rounds is Topology.rounds:
            raise NotImplementedError(f"{type(self).__name__} must implement assign_groups() or rounds().")
        return self.schedule().per_rank()

    def rounds(self) -> list[list[Group]]:
        """For every round, the groups that partition the ranks."""
        return list(map(list, Schedule.from_per_rank(self._world_size, self.assign_groups()).rounds))

    def schedule(self) -> Schedule:
        """The validated schedule (built once, then cached)."""
        if self._schedule is None:
            if type(self).rounds is not Topology.rounds:
                raw = self.rounds()
                if not isinstance(raw, (list, tuple)):
                    raise ValueError(f"{type(self).__name__}.rounds() must return a list of rounds.")
                rounds = [[_as_group(g, f"round {t}") for g in groups] for t, groups in enumerate(raw)]
                self._schedule = Schedule(self._world_size, rounds)
            else:
                self._schedule = Schedule.from_per_rank(self._world_size, self.assign_groups())
        return self._schedule

    def get_group(self, step: int) -> Group:
        """This rank's group at training step ``step``."""
        return self.schedule().group(self._rank, step)


class RingTopology(Topology):
    """Each worker averages with one ring neighbour per round, alternating right and left.

    Even world size (as in decent-optim-wrapper 0.1): two rounds, pairs ``(0,1),(2,3),...`` then
    ``(1,2),(3,4),...,(n-1,0)``. Odd world size ``n >= 3``: the ring's ``n`` edges need three colours, so
    the period is three rounds: ``(0,1),(2,3),...,(n-3,n-2)``; then ``(1,2),...,(n-2,n-1)``; then ``(n-1,0)``.
    A worker without a partner in a round keeps its parameters. Every edge of the ring is used once a period.
    """

    def rounds(self) -> list[list[Group]]:
        n = self._world_size
        if n == 1:
            return [[Group((0,))]]
        if n % 2 == 0:
            first = [Group((i, i + 1)) for i in range(0, n, 2)]
            second = [Group((i, i + 1)) for i in range(1, n - 1, 2)] + [Group((0, n - 1))]
            return [first, second]

        def pairs(start: int, stop: int) -> list[Group]:
            return [Group((i, i + 1)) for i in range(start, stop, 2)]

        singles = lambda ranks: [Group((r,)) for r in ranks]  # noqa: E731
        r0 = pairs(0, n - 1) + singles([n - 1])
        r1 = singles([0]) + pairs(1, n - 1)
        r2 = [Group((0, n - 1))] + singles(range(1, n - 1))
        return [r0, r1, r2]


class CompleteTopology(Topology):
    """All workers average together every round (one all-reduce per step)."""

    def rounds(self) -> list[list[Group]]:
        return [[Group(tuple(range(self._world_size)))]]


class TopologyFactory:
    """Registry of topologies by name."""

    registry: ClassVar[dict[str, type[Topology]]] = {
        "ring": RingTopology,
        "complete": CompleteTopology,
    }

    @classmethod
    def create(cls, topology: str, rank: int, world_size: int, local_world_size: int = 1) -> Topology:
        """Instantiate the topology registered as ``topology``."""
        topology_class = cls.registry.get(topology) if isinstance(topology, str) else None
        if topology_class is None:
            raise ValueError(f"Unknown topology={topology!r}. Registered topologies: {sorted(cls.registry)}.")
        return topology_class(rank, world_size, local_world_size, topology)

    @classmethod
    def add_topology(cls, name: str, topology_class: type[Topology]) -> None:
        """Register ``topology_class`` under ``name`` (replacing any earlier registration)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"Invalid topology name={name!r}. Must be a non-empty string.")
        if not (isinstance(topology_class, type) and issubclass(topology_class, Topology)):
            raise ValueError(f"Invalid topology_class={topology_class!r}. Must be a subclass of Topology.")
        cls.registry[name] = topology_class

    @classmethod
    def available(cls) -> list[str]:
        """Names of all registered topologies."""
        return sorted(cls.registry)
