"""Schedules, mixing matrices and period products written out by hand from the written definitions.

The definitions: README.md ("## Topologies" and "one-peer-exp at any world size") and the docstrings of
RingTopology, OnePeerExpTopology / exact_consensus_pairs, AlternatingExpRingTopology and TorusTopology.
Every expectation below is literal data worked out on paper from them (the derivation sits above it), so
these tests compare the package with something other than itself. Arithmetic is exact (Fraction).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction as F

import pytest
import torch

from decent_optim_wrapper.analysis import mixing_matrix, period_matrix
from decent_optim_wrapper.topo import TopologyFactory

H, T, TT = F(1, 2), F(1, 3), F(2, 3)


@dataclass(frozen=True)
class Weighted:
    """A group whose members all keep ``self_weight`` of their own parameters (not 1/|G|)."""

    ranks: tuple[int, ...]
    self_weight: F


Entry = tuple[int, ...] | Weighted  # a bare tuple averages uniformly
Round = set[Entry]
Matrix = list[list[F]]

# ----------------------------------------------------------------------------- schedules
# ring, even n (RingTopology): (0,1),(2,3),... then (1,2),(3,4),...,(n-1,0). n=4: two rounds, nobody idle.
RING_4: list[Round] = [
    {(0, 1), (2, 3)},
    {(1, 2), (0, 3)},
]
# ring, odd n=5: (0,1),...,(n-3,n-2) = (0,1),(2,3), 4 alone; (1,2),...,(n-2,n-1) = (1,2),(3,4), 0 alone;
# then (n-1,0) = (0,4) with 1, 2, 3 alone. README's "in each, one worker has no partner" holds for n=3
# only: 5 edges in 3 rounds of disjoint pairs leave 1, 1 and 3 workers alone (the docstring is exact).
RING_5: list[Round] = [
    {(0, 1), (2, 3), (4,)},
    {(1, 2), (3, 4), (0,)},
    {(0, 4), (1,), (2,), (3,)},
]
# one-peer-exp n=6: p=4 (m=2), r=2. Hypercube over 0..3 (k=0: i^1, k=1: i^2) for m=2 rounds while 4,5 run
# the construction for n=2 (p=2, r=0: one round (4,5)) side by side; fold: the j-th of the last r with
# worker j, (0,4) and (1,5), self-weight r/n = 2/6; the hypercube over 0..3 again. T = max(2, 1) + 1 + 2 = 5.
ONE_PEER_EXP_6: list[Round] = [
    {(0, 1), (2, 3), (4, 5)},
    {(0, 2), (1, 3), (4,), (5,)},
    {Weighted((0, 4), T), Weighted((1, 5), T), (2,), (3,)},
    {(0, 1), (2, 3), (4,), (5,)},
    {(0, 2), (1, 3), (4,), (5,)},
]
# alternating-exp-ring, L=2: node a is ranks {2a, 2a+1}; intra rounds average a node, inter rounds pair local
# rank j of node a with local rank j of node b along one-peer-exp over the nodes, alternating intra, inter.
# 2 nodes: one-peer-exp 2 is one round (N0,N1) -> (0,2),(1,3). Period 2 x 1.
ALT_2X2: list[Round] = [
    {(0, 1), (2, 3)},
    {(0, 2), (1, 3)},
]
# 3 nodes: one-peer-exp 3 (p=2, r=1): (N0,N1) with N2 alone; fold (N0,N2) with self-weight 1/3; (N0,N1).
# In ranks: (0,2),(1,3) with 4,5 alone; (0,4),(1,5) weighted 1/3 with 2,3 alone; (0,2),(1,3). Period 2 x 3.
ALT_3X2: list[Round] = [
    {(0, 1), (2, 3), (4, 5)},
    {(0, 2), (1, 3), (4,), (5,)},
    {(0, 1), (2, 3), (4, 5)},
    {Weighted((0, 4), T), Weighted((1, 5), T), (2,), (3,)},
    {(0, 1), (2, 3), (4, 5)},
    {(0, 2), (1, 3), (4,), (5,)},
]
# torus n=6: R x C with R <= C closest to square -> 2 x 3; rank i*3 + j. Rows {0,1,2}, {3,4,5} run the odd
# ring schedule side by side: (0,1),(3,4); (1,2),(4,5); (2,0),(5,3). Then the columns {0,3}, {1,4}, {2,5}.
# A column of two is read as one round ((0,3),(1,4),(2,5)): the two ranks share one grid edge, and
# topo._ring_pairs says "one for a ring of two". RingTopology(n=2) alone runs that pair twice (period 2,
# kept from 0.1), so "the ring schedule along every column" read literally would give 5 rounds, not 4;
# the mixing is the same (averaging a pair twice is averaging it once).
TORUS_2X3: list[Round] = [
    {(0, 1), (3, 4), (2,), (5,)},
    {(1, 2), (4, 5), (0,), (3,)},
    {(0, 2), (3, 5), (1,), (4,)},
    {(0, 3), (1, 4), (2, 5)},
]

BY_HAND: dict[tuple[str, int, int], list[Round]] = {
    ("ring", 4, 1): RING_4,
    ("ring", 5, 1): RING_5,
    ("one-peer-exp", 6, 1): ONE_PEER_EXP_6,
    ("alternating-exp-ring", 4, 2): ALT_2X2,
    ("alternating-exp-ring", 6, 2): ALT_3X2,
    ("torus", 6, 1): TORUS_2X3,
}


@pytest.mark.parametrize("key", list(BY_HAND), ids=lambda k: f"{k[0]}-n{k[1]}-local{k[2]}")
def test_schedule_is_the_one_written_by_hand(key: tuple[str, int, int]) -> None:
    name, n, local = key

    def as_float(e: Entry) -> tuple[tuple[int, ...], float | None]:
        # the package stores r/n as a float; float(F(r, n)) is the same correctly rounded value
        return (e.ranks, float(e.self_weight)) if isinstance(e, Weighted) else (e, None)

    rounds = TopologyFactory.create(name, 0, n, local).schedule().rounds
    got = [{(g.ranks, g.weight) for g in rnd} for rnd in rounds]
    assert [len(rnd) for rnd in rounds] == [len(s) for s in got], "a group listed twice in one round"
    assert got == [{as_float(e) for e in rnd} for rnd in BY_HAND[key]]


# ----------------------------------------------------------------------------- mixing matrices
def _matrix(rows: list[list[int | F]]) -> Matrix:
    return [[F(x) for x in row] for row in rows]


def _rule(n: int, rnd: Round) -> Matrix:
    """README "Custom topologies": x_i <- w*x_i + (1-w)/(|G|-1) * sum of the others, w = 1/|G| if unweighted."""
    w = [[F(0)] * n for _ in range(n)]
    for e in rnd:
        ranks, self_w = (e.ranks, e.self_weight) if isinstance(e, Weighted) else (e, F(1, len(e)))
        for i in ranks:
            for j in ranks:
                w[i][j] = self_w if i == j else (1 - self_w) / (len(ranks) - 1)
    return w


def _product(mats: list[Matrix]) -> Matrix:
    """W_{T-1} ... W_0: round t mixes x <- W_t x, so later rounds multiply on the left."""
    n = len(mats[0])
    acc = [[F(int(i == j)) for j in range(n)] for i in range(n)]
    for w in mats:
        acc = [[sum((w[i][k] * acc[k][j] for k in range(n)), F(0)) for j in range(n)] for i in range(n)]
    return acc


def _average(n: int) -> Matrix:
    return [[F(1, n)] * n for _ in range(n)]


# ring 4: round 0 averages (0,1) and (2,3), round 1 (1,2) and (0,3); 1/2 on those entries and the diagonal
RING_4_MATS = [
    _matrix([[H, H, 0, 0], [H, H, 0, 0], [0, 0, H, H], [0, 0, H, H]]),
    _matrix([[H, 0, 0, H], [0, H, H, 0], [0, H, H, 0], [H, 0, 0, H]]),
]
ALT_2X2_MATS = [
    _matrix([[H, H, 0, 0], [H, H, 0, 0], [0, 0, H, H], [0, 0, H, H]]),
    _matrix([[H, 0, H, 0], [0, H, 0, H], [H, 0, H, 0], [0, H, 0, H]]),
]
# the fold keeps 1/3 of one's own parameters and takes 2/3 of the partner's; a rank alone keeps them all
ONE_PEER_EXP_6_MATS = [
    _matrix([[H, H, 0, 0, 0, 0], [H, H, 0, 0, 0, 0], [0, 0, H, H, 0, 0],
             [0, 0, H, H, 0, 0], [0, 0, 0, 0, H, H], [0, 0, 0, 0, H, H]]),
    _matrix([[H, 0, H, 0, 0, 0], [0, H, 0, H, 0, 0], [H, 0, H, 0, 0, 0],
             [0, H, 0, H, 0, 0], [0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 1]]),
    _matrix([[T, 0, 0, 0, TT, 0], [0, T, 0, 0, 0, TT], [0, 0, 1, 0, 0, 0],
             [0, 0, 0, 1, 0, 0], [TT, 0, 0, 0, T, 0], [0, TT, 0, 0, 0, T]]),
    _matrix([[H, H, 0, 0, 0, 0], [H, H, 0, 0, 0, 0], [0, 0, H, H, 0, 0],
             [0, 0, H, H, 0, 0], [0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 1]]),
    _matrix([[H, 0, H, 0, 0, 0], [0, H, 0, H, 0, 0], [H, 0, H, 0, 0, 0],
             [0, H, 0, H, 0, 0], [0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 1]]),
]
LITERAL_MATS = {"ring-4": (RING_4, RING_4_MATS), "alt-2x2": (ALT_2X2, ALT_2X2_MATS),
                "one-peer-exp-6": (ONE_PEER_EXP_6, ONE_PEER_EXP_6_MATS)}


@pytest.mark.parametrize("case", list(LITERAL_MATS))
def test_hand_written_matrices_are_the_hand_written_rounds(case: str) -> None:
    rounds, mats = LITERAL_MATS[case]
    assert len(rounds) == len(mats)
    assert [_rule(len(m), rnd) for rnd, m in zip(rounds, mats)] == mats


def test_ring_4_period_is_the_exact_average() -> None:
    # worker 0 after round 1: ((x0+x1)/2 + (x2+x3)/2) / 2, the mean; likewise every worker (the 2-cube)
    assert _product(RING_4_MATS) == _average(4)


def test_one_peer_exp_6_period_is_the_exact_average() -> None:
    # after rounds 0-1: 0..3 hold A = mean(x0..x3), 4,5 hold B = mean(x4,x5), mean M = (2A + B)/3; the fold
    # gives 4,5 A*2/3 + B/3 = M and 0,1 A/3 + 2B/3; round 3 changes nothing, round 4 averages (0,2),(1,3) to M
    assert _product(ONE_PEER_EXP_6_MATS) == _average(6)


def test_alternating_exp_ring_2x2_period_is_the_exact_average() -> None:
    assert _product(ALT_2X2_MATS) == _average(4)


def test_alternating_exp_ring_3x2_period_is_the_exact_average() -> None:
    # after round 0 both ranks of a node agree and every later round keeps them agreeing, so the inter rounds
    # are one-peer-exp 3 over the nodes (exact) and the intra rounds change nothing
    assert _product([_rule(6, rnd) for rnd in ALT_3X2]) == _average(6)


# ring 5, worked through: round 0 gives y0=y1=(x0+x1)/2, y2=y3=(x2+x3)/2, y4=x4; round 1 z0=y0,
# z1=z2=(x0+..+x3)/4, z3=z4=(x2+x3)/4 + x4/2; round 2 averages z0 and z4. Not the average: a ring of 5 is not.
RING_5_PERIOD = _matrix([
    [F(1, 4), F(1, 4), F(1, 8), F(1, 8), F(1, 4)],
    [F(1, 4), F(1, 4), F(1, 4), F(1, 4), 0],
    [F(1, 4), F(1, 4), F(1, 4), F(1, 4), 0],
    [0, 0, F(1, 4), F(1, 4), F(1, 2)],
    [F(1, 4), F(1, 4), F(1, 8), F(1, 8), F(1, 4)],
])
# torus 2x3: a ring of 3 (a,b,c) over a period gives a,c -> 3(a+b)/8 + c/4 and b -> (a+b)/4 + c/2; the column
# round then averages each rank with the one below/above it, so ranks j and j+3 get half of each row's value.
TORUS_2X3_PERIOD = _matrix([
    [F(3, 16), F(3, 16), F(1, 8), F(3, 16), F(3, 16), F(1, 8)],
    [F(1, 8), F(1, 8), F(1, 4), F(1, 8), F(1, 8), F(1, 4)],
    [F(3, 16), F(3, 16), F(1, 8), F(3, 16), F(3, 16), F(1, 8)],
    [F(3, 16), F(3, 16), F(1, 8), F(3, 16), F(3, 16), F(1, 8)],
    [F(1, 8), F(1, 8), F(1, 4), F(1, 8), F(1, 8), F(1, 4)],
    [F(3, 16), F(3, 16), F(1, 8), F(3, 16), F(3, 16), F(1, 8)],
])


def test_ring_5_and_torus_2x3_periods_by_hand() -> None:
    assert _product([_rule(5, rnd) for rnd in RING_5]) == RING_5_PERIOD
    assert _product([_rule(6, rnd) for rnd in TORUS_2X3]) == TORUS_2X3_PERIOD


def _tensor(m: Matrix) -> torch.Tensor:
    return torch.tensor([[float(x) for x in row] for row in m], dtype=torch.float64)


# the package's float64 matrices against the hand-written ones, where every entry is a dyadic fraction and so
# exactly a float64: the 1/3 and 2/3 of a weighted fold are not (the schedule test pins those weights)
@pytest.mark.parametrize("key", list(BY_HAND), ids=lambda k: f"{k[0]}-n{k[1]}-local{k[2]}")
def test_package_round_matrices_equal_the_hand_written_ones(key: tuple[str, int, int]) -> None:
    name, n, local = key
    schedule = TopologyFactory.create(name, 0, n, local).schedule()
    dyadic = [t for t, rnd in enumerate(BY_HAND[key]) if not any(isinstance(e, Weighted) for e in rnd)]
    for t in dyadic:
        torch.testing.assert_close(mixing_matrix(schedule, t), _tensor(_rule(n, BY_HAND[key][t])), rtol=0, atol=0)


@pytest.mark.parametrize("name,n,local,period", [
    ("ring", 4, 1, _average(4)),
    ("ring", 5, 1, RING_5_PERIOD),
    ("alternating-exp-ring", 4, 2, _average(4)),
    ("torus", 6, 1, TORUS_2X3_PERIOD),
])
def test_package_period_matrices_equal_the_hand_written_ones(name: str, n: int, local: int, period: Matrix) -> None:
    schedule = TopologyFactory.create(name, 0, n, local).schedule()
    torch.testing.assert_close(period_matrix(schedule), _tensor(period), rtol=0, atol=0)
