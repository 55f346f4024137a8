"""Topologies as pure schedules: built-ins, the 0.1 assign_groups() form, and validation of bad schedules."""

from __future__ import annotations

import re

import pytest

from decent_optim_wrapper.topo import (
    CompleteTopology,
    Group,
    RingTopology,
    Schedule,
    Topology,
    TopologyFactory,
)


def test_ring_even_world_size_matches_decent_optim_wrapper_0_1() -> None:
    # 0.1's RingTopology.assign_groups(), written out for 4 ranks
    assert RingTopology(0, 4, 1, "ring").assign_groups() == [
        [[0, 1], [0, 3]],
        [[0, 1], [1, 2]],
        [[2, 3], [1, 2]],
        [[2, 3], [0, 3]],
    ]


@pytest.mark.parametrize("n", [3, 5, 7, 9])
def test_ring_odd_world_size_uses_every_ring_edge_once_per_period(n: int) -> None:
    s = RingTopology(0, n).schedule()
    assert s.period == 3
    edges = [g.ranks for rnd in s.rounds for g in rnd if g.size == 2]
    expected = sorted(tuple(sorted((i, (i + 1) % n))) for i in range(n))
    assert sorted(edges) == expected


def test_complete_is_one_group_of_everyone() -> None:
    assert CompleteTopology(2, 5).assign_groups() == [[[0, 1, 2, 3, 4]]] * 5


def test_world_size_one() -> None:
    for cls in (RingTopology, CompleteTopology):
        assert cls(0, 1).schedule().rounds == ((Group((0,)),),)


def test_factory_registry_and_unknown_names() -> None:
    assert isinstance(TopologyFactory.create("ring", 1, 4, 1), RingTopology)
    assert {"ring", "complete"} <= set(TopologyFactory.available())
    with pytest.raises(ValueError, match=re.escape("Unknown topology='torus-9d'. Registered topologies: [")):
        TopologyFactory.create("torus-9d", 0, 4, 1)


def test_add_topology_rejects_non_topologies() -> None:
    with pytest.raises(ValueError, match="Must be a subclass of Topology"):
        TopologyFactory.add_topology("bad", dict)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty string"):
        TopologyFactory.add_topology("", RingTopology)


def test_base_topology_needs_an_implementation() -> None:
    with pytest.raises(NotImplementedError, match="assign_groups"):
        Topology(0, 2).schedule()


@pytest.mark.parametrize("rank,world_size,local,msg", [
    (4, 4, 1, "Invalid rank=4. Must be an integer in [0, world_size=4)."),
    (0, 0, 1, "Invalid world_size=0. Must be an integer >= 1."),
    (0, 4, 0, "Invalid local_world_size=0. Must be an integer >= 1."),
])
def test_topology_constructor_validates(rank: int, world_size: int, local: int, msg: str) -> None:
    with pytest.raises(ValueError, match=re.escape(msg)):
        RingTopology(rank, world_size, local)


def _custom(per_rank):
    class Custom(Topology):
        def assign_groups(self):
            return per_rank

    return Custom(0, len(per_rank) if isinstance(per_rank, list) and per_rank else 2)


BAD_SCHEDULES = {
    "missing-self": ([[[0, 1]], [[0, 2]], [[2, 3]], [[2, 3]]], "rank 1 is missing from its own group [0, 2]"),
    "disagree": ([[[0, 1]], [[0, 1]], [[1, 2]], [[2, 3]]], "rank 2 lists group [1, 2] but member 1 lists [0, 1]"),
    "lengths": ([[[0, 1], [0, 1]], [[0, 1]]], "ranks have different numbers of rounds (rank 0: 2, rank 1: 1)"),
    "no-rounds": ([[], []], "it has no rounds"),
    "outside": ([[[0, 5]], [[1]]], "names rank 5 outside [0, 2)"),
    "not-a-list": ([[[0, 1]], "x"], "each rank's entry must be a list of groups"),
    "weight-range": ([[Group((0, 1), 1.5)], [Group((0, 1), 1.5)]], "has weight 1.5; must be in [0, 1]"),
    "weights-disagree": ([[Group((0, 1), 0.25)], [Group((0, 1), 0.75)]], "would not be doubly stochastic"),
    "not-ints": ([[[0, "1"]], [[0, "1"]]], "must contain integer ranks only"),
}


@pytest.mark.parametrize("case", sorted(BAD_SCHEDULES))
def test_bad_assign_groups_raise_value_error(case: str) -> None:
    per_rank, msg = BAD_SCHEDULES[case]
    with pytest.raises(ValueError, match=re.escape(msg)):
        _custom(per_rank).schedule()


def test_wrong_number_of_ranks_in_assign_groups() -> None:
    class Short(Topology):
        def assign_groups(self):
            return [[[0, 1]], [[0, 1]]]

    with pytest.raises(ValueError, match=re.escape("one list of groups per rank (4 lists), got 2")):
        Short(0, 4).schedule()


def test_rounds_form_validates_partitions() -> None:
    with pytest.raises(ValueError, match=re.escape("rank 1 is in two groups of round 0")):
        Schedule(3, [[Group((0, 1)), Group((1, 2))]])
    with pytest.raises(ValueError, match=re.escape("round 0 has no group for rank(s) [2]")):
        Schedule(3, [[Group((0, 1))]])
    with pytest.raises(ValueError, match="single-rank group"):
        Schedule(2, [[Group((0,), 0.5), Group((1,))]])


def test_weighted_groups_via_assign_groups_and_rounds() -> None:
    class Lazy(Topology):
        """Every worker keeps 3/4 of itself and takes 1/4 from its pair partner."""

        def assign_groups(self):
            return [[Group((r, r ^ 1), 0.75)] for r in range(self._world_size)]

    s = Lazy(0, 4).schedule()
    g = s.group(3, 0)
    assert (g.ranks, g.self_weight, g.peer_weight) == ((2, 3), 0.75, 0.25)
    assert Group((0, 1, 2)).self_weight == Group((0, 1, 2)).peer_weight == 1 / 3


def test_schedule_digest_tells_schedules_apart() -> None:
    assert RingTopology(0, 4).schedule().digest() == RingTopology(3, 4).schedule().digest()
    assert RingTopology(0, 4).schedule().digest() != CompleteTopology(0, 4).schedule().digest()
    assert RingTopology(0, 4).schedule().digest() != RingTopology(0, 6).schedule().digest()


def test_get_group_cycles_with_the_step() -> None:
    t = RingTopology(0, 4)
    assert [t.get_group(s).ranks for s in range(4)] == [(0, 1), (0, 3), (0, 1), (0, 3)]


def test_weighted_groups_survive_the_per_rank_form() -> None:
    from decent_optim_wrapper.topo import OnePeerExpTopology

    per_rank = OnePeerExpTopology(0, 3).assign_groups()  # round 1 pairs (0, 2) with self-weight 1/3
    g = per_rank[2][1]
    assert isinstance(g, Group) and g.weight == pytest.approx(1 / 3)
    assert list(g) == [0, 2] and len(g) == 2 and 2 in g and sorted(g) == [0, 2]
    assert per_rank[0][0] == [0, 1]  # unweighted groups stay plain lists
    rebuilt = Schedule.from_per_rank(3, per_rank)
    assert rebuilt.digest() == OnePeerExpTopology(0, 3).schedule().digest()
