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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = [
    "Group",
    "Schedule",
    "Topology",
    "RingTopology",
    "CompleteTopology",
    "OnePeerExpTopology",
    "AlternatingExpRingTopology",
    "TorusTopology",
    "TopologyFactory",
    "exact_consensus_pairs",
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

    # A Group reads like the list of its ranks (len, iteration, `in`), so code written for the 0.1
    # assign_groups() form keeps working where a schedule hands out weighted groups.
    def __len__(self) -> int:
        return len(self.ranks)

    def __iter__(self) -> Iterator[int]:
        return iter(self.ranks)

    def __contains__(self, rank: object) -> bool:
        return rank in self.ranks

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
    ranks: Sequence[Any]
    weight: Any
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

    def per_rank(self) -> list[list[Any]]:
        """The schedule in the 0.1 ``assign_groups()`` form: ``[rank][round] -> sorted ranks``.

        A weighted group is given as its :class:`Group` (which iterates like its list of ranks), so that
        its weight is not lost.
        """
        def entry(g: Group) -> Any:
            return list(g.ranks) if g.weight is None else g

        return [[entry(self.group(r, t)) for t in range(self.period)] for r in range(self.world_size)]

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

    def assign_groups(self) -> list[list[Any]]:
        """For every rank, its group in each round: ``groups[rank][round] -> list of ranks`` (or a weighted
        :class:`Group`)."""
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


def _fill(rounds: list[list[Group]], world_size: int) -> list[list[Group]]:
    """Give every rank not in any group of a round a group of its own (it keeps its parameters)."""
    out = []
    for groups in rounds:
        covered = {r for g in groups for r in g.ranks}
        out.append(list(groups) + [Group((r,)) for r in range(world_size) if r not in covered])
    return out


def _zip_rounds(*schedules: list[list[Group]]) -> list[list[Group]]:
    """Run schedules over disjoint ranks side by side: round t is the union of their rounds t."""
    length = max((len(s) for s in schedules), default=0)
    return [[g for s in schedules if t < len(s) for g in s[t]] for t in range(length)]


def _ring_pairs(members: Sequence[int]) -> list[list[Group]]:
    """Pair rounds that use every edge of the ring ``members[0] - members[1] - ... - members[-1] - members[0]``.

    Two rounds for an even ring (right then left neighbour), three for an odd one (its edges need three
    colours), one for a ring of two, none for a single member.
    """
    n = len(members)
    if n <= 1:
        return []
    if n == 2:
        return [[Group(tuple(sorted(members)))]]

    def edge(i: int) -> Group:
        return Group(tuple(sorted((members[i], members[(i + 1) % n]))))

    if n % 2 == 0:
        return [[edge(i) for i in range(0, n, 2)], [edge(i) for i in range(1, n, 2)]]
    return [[edge(i) for i in range(0, n - 1, 2)], [edge(i) for i in range(1, n - 1, 2)], [edge(n - 1)]]


def exact_consensus_pairs(members: Sequence[int]) -> list[list[Group]]:
    """Rounds of (weighted) pairs after which every member holds exactly the mean of ``members``.

    With ``p = 2**m`` the largest power of two ``<= n`` and ``r = n - p``:

    * ``r == 0``: the hypercube, ``m`` rounds; in round ``k`` member ``i`` averages with member ``i XOR 2**k``.
    * otherwise: the first ``p`` members run the hypercube while the last ``r`` run this construction
      recursively (side by side); then the ``j``-th of the last ``r`` pairs with the ``j``-th of the first
      ``p`` with self-weight ``r/n``, which gives it exactly the global mean and leaves the first ``p`` with
      mean equal to the global mean; a second hypercube over the first ``p`` finishes.
      Rounds: ``T(n) = max(m, T(r)) + 1 + m`` (3 for n=3, 5 for n=6, 7 for n=12, 9 for n=24).

    Every round is a set of disjoint pairs with doubly stochastic weights: one peer per worker per round.
    """
    n = len(members)
    if n <= 1:
        return []
    m = n.bit_length() - 1
    p = 1 << m
    core = list(members[:p])
    cube = [[Group(tuple(sorted((core[i], core[i ^ (1 << k)])))) for i in range(p) if i < i ^ (1 << k)]
            for k in range(m)]
    r = n - p
    if r == 0:
        return cube
    rest = list(members[p:])
    fold = [Group(tuple(sorted((core[j], rest[j]))), r / n) for j in range(r)]
    return _zip_rounds(cube, exact_consensus_pairs(rest)) + [fold] + cube


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
        if n == 2:  # 0.1 used a period of two here too (the same pair twice)
            return [[Group((0, 1))], [Group((0, 1))]]
        return _fill(_ring_pairs(range(n)), n)


class CompleteTopology(Topology):
    """All workers average together every round (one all-reduce per step)."""

    def rounds(self) -> list[list[Group]]:
        return [[Group(tuple(range(self._world_size)))]]


class OnePeerExpTopology(Topology):
    """One peer per round at exponentially growing distance, with exact consensus once a period.

    For ``n = 2**m`` workers the period is ``m`` rounds and in round ``k`` worker ``i`` averages with
    ``i XOR 2**k`` (distance ``2**k``): the product of the ``m`` mixing matrices is exactly the global
    average. Other world sizes use :func:`exact_consensus_pairs`, also exact once a period, with some
    workers idle in some rounds and a few weighted pairs.
    """

    def rounds(self) -> list[list[Group]]:
        n = self._world_size
        return _fill(exact_consensus_pairs(range(n)), n) or [[Group((0,))]]


class AlternatingExpRingTopology(Topology):
    """Hierarchical: rounds alternate between averaging inside a node and a one-peer exchange between nodes.

    Ranks ``[a*L, (a+1)*L)`` form node ``a`` (``L = local_world_size``, as torchrun numbers them). Intra-node
    rounds average each node's ranks together (one all-reduce over fast local links). Inter-node rounds pair
    local rank ``j`` of node ``a`` with local rank ``j`` of node ``b`` following
    :func:`exact_consensus_pairs` over the nodes, so after one period all workers hold the exact mean.
    With one rank per node it is ``one-peer-exp``; with one node, ``complete``.
    """

    def rounds(self) -> list[list[Group]]:
        n, local = self._world_size, self._local_world_size
        if n % local != 0:
            raise ValueError(
                f"Invalid local_world_size={local} for alternating-exp-ring: world_size={n} must be a multiple of it."
            )
        nodes = n // local
        intra = [Group(tuple(range(a * local, (a + 1) * local))) for a in range(nodes)]
        inter = [
            [Group(tuple(sorted((g.ranks[0] * local + j, g.ranks[1] * local + j))), g.weight)
             for g in groups for j in range(local)]
            for groups in exact_consensus_pairs(range(nodes))
        ]
        if local == 1:
            rounds = inter
        elif not inter:
            rounds = [intra]
        else:
            rounds = [r for pair in zip([intra] * len(inter), inter) for r in pair]
        return _fill(rounds, n) or [[Group((0,))]]


class TorusTopology(Topology):
    """A 2-D torus: ranks on an ``R x C`` grid (``R <= C``, ``R*C = n``, as close to square as n allows).

    Rank ``i*C + j`` sits at row ``i``, column ``j``. Rounds first run the ring schedule along every row at
    once, then along every column: each worker averages with one of its four grid neighbours per round.
    A line of two (a column of a ``2 x C`` grid) is one round, not the two a ring of two repeats. A prime world
    size gives a ``1 x n`` grid, i.e. a ring.
    """

    @staticmethod
    def shape(world_size: int) -> tuple[int, int]:
        rows = max(d for d in range(1, math.isqrt(world_size) + 1) if world_size % d == 0)
        return rows, world_size // rows

    def rounds(self) -> list[list[Group]]:
        n = self._world_size
        rows, cols = self.shape(n)
        along_rows = _zip_rounds(*(_ring_pairs(range(i * cols, (i + 1) * cols)) for i in range(rows)))
        along_cols = _zip_rounds(*(_ring_pairs(range(j, n, cols)) for j in range(cols)))
        return _fill(along_rows + along_cols, n) or [[Group((0,))]]


class TopologyFactory:
    """Registry of topologies by name."""

    registry: ClassVar[dict[str, type[Topology]]] = {
        "ring": RingTopology,
        "complete": CompleteTopology,
        "one-peer-exp": OnePeerExpTopology,
        "alternating-exp-ring": AlternatingExpRingTopology,
        "torus": TorusTopology,
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
