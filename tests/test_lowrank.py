"""Low-rank gossip (PowerGossip): the arithmetic by hand, the global mean kept and consensus reached on several
topologies and delays, the bytes that travel, resuming with rounds in flight, and what it refuses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from harness import run_ranks
from torch.distributed.algorithms import Join

from decent_optim_wrapper import DecentOptimWrapper, LowRank
from decent_optim_wrapper.ddp import DecentralizedDataParallel
from decent_optim_wrapper.mixing import lowrank_correction_, lowrank_project, orthonormal


def test_one_round_by_hand() -> None:
    # Factors are held transposed (r rows). X_low = [[2, 0], [0, 0]], X_high = 0, basis q = e1 (right side):
    # projections (X q)^T = [2, 0] and [0, 0]; D^T = [2, 0]; the rank-1 approximation D q^T = [[2, 0], [0, 0]] is the
    # whole difference here; with c = 1/2 the low member moves to [[1, 0], [0, 0]], the high one to the same: the
    # pair's mean, exactly
    x_low, x_high = torch.tensor([[2.0, 0.0], [0.0, 0.0]]), torch.zeros(2, 2)
    q_t = torch.tensor([[1.0, 0.0]])
    p_low = lowrank_project(x_low, q_t, True, torch.empty(1, 2))
    p_high = lowrank_project(x_high, q_t, True, torch.empty(1, 2))
    assert p_low.tolist() == [[2.0, 0.0]] and p_high.tolist() == [[0.0, 0.0]]
    d_t = lowrank_correction_(x_low, p_low, p_high, q_t, True, -0.5)
    lowrank_correction_(x_high, p_low, p_high, q_t, True, 0.5)
    assert x_low.tolist() == x_high.tolist() == [[1.0, 0.0], [0.0, 0.0]]
    # the next round works on the left side: orthonormal(D) = e1 (rows)
    assert orthonormal(d_t, q_t).tolist() == [[1.0, 0.0]]
    # a difference orthogonal to the basis is invisible to this round: X_low = [[0, 3]], q = e1 -> no change
    x = torch.tensor([[0.0, 3.0]])
    lowrank_correction_(x, lowrank_project(x, q_t, True, torch.empty(1, 1)), torch.zeros(1, 1), q_t, True, -0.5)
    assert x.tolist() == [[0.0, 3.0]]
    # left side: p = e2 (rows), (X_low^T p)^T for X_low = [[1, 2], [3, 4]] is [3, 4]; approximation p D^T =
    # [[0, 0], [3, 4]]
    x_low, p_t = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[0.0, 1.0]])
    r_low = lowrank_project(x_low, p_t, False, torch.empty(1, 2))
    assert r_low.tolist() == [[3.0, 4.0]]
    lowrank_correction_(x_low, r_low, torch.zeros(1, 2), p_t, False, -0.5)
    assert x_low.tolist() == [[1.0, 2.0], [1.5, 2.0]]
    # rank 2 on a 3x2 matrix, right side, q = I: the projections are X itself (transposed); the approximation is the
    # whole difference
    x_low, x_high, eye = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), torch.zeros(3, 2), torch.eye(2)
    p2 = lowrank_project(x_low, eye, True, torch.empty(2, 3))
    assert p2.tolist() == [[1.0, 3.0, 5.0], [2.0, 4.0, 6.0]]
    lowrank_correction_(x_low, p2, lowrank_project(x_high, eye, True, torch.empty(2, 3)), eye, True, -0.5)
    assert x_low.tolist() == [[0.5, 1.0], [1.5, 2.0], [2.5, 3.0]]
    # a zero difference keeps the previous basis (the pair agrees on that matrix), or, if that was of the other
    # side, takes the unit vector of equal entries: never a zero basis, which would hide every later difference
    assert torch.equal(orthonormal(torch.zeros(1, 3), torch.ones(1, 3)), torch.ones(1, 3))
    assert torch.equal(orthonormal(torch.zeros(1, 4), torch.ones(1, 3)), torch.full((1, 4), 0.5))
    q2 = orthonormal(torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]]))  # rank 2: rows orthonormal, row-major
    assert q2.is_contiguous() and torch.allclose(q2 @ q2.t(), torch.eye(2), atol=1e-6)


def test_which_parameters_travel_as_factors() -> None:
    low = LowRank(rank=2)
    assert low.saves_bytes(64, 32) and low.saves_bytes(3, 3) and not low.saves_bytes(2, 2)
    m = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 2))  # weights 64x32 and 2x64
    opt = DecentOptimWrapper(torch.optim.SGD(m.parameters(), lr=0.1), compression=low)
    lowrank = [[tuple(p.shape) for p in b.params] for b in opt.buckets if b.lowrank]
    dense = [[tuple(p.shape) for p in b.params] for b in opt.buckets if not b.lowrank]
    # rank-2 factors of a 2x64 matrix are no smaller than it (2 * 64 elements): it travels whole
    assert lowrank == [[(64, 32)]] and dense == [[(64,), (2, 64), (2,)]]


def _gossip_only(rank: int, world_size: int, topology: str, max_delay: int, rounds: int, r: int) -> dict:
    torch.manual_seed(rank)
    m = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.Tanh(), torch.nn.Linear(40, 6))
    opt = DecentOptimWrapper(torch.optim.SGD(m.parameters(), lr=0.0), topology=topology, compression=LowRank(r),
                             max_delay=max_delay)
    with torch.no_grad():  # after construction (which broadcast rank 0's values): the ranks differ
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * (1 + rank))
    start = [p.detach().double().clone() for p in m.parameters()]
    distances = [opt.consensus_distance()]
    for step in range(rounds):
        opt.step()  # no gradient: only the rounds move the values
        if step == rounds // 2:
            distances.append(opt.consensus_distance())
    opt.finish()
    distances.append(opt.consensus_distance())
    return {"start": start, "end": [p.detach().double().clone() for p in m.parameters()], "distances": distances,
            "bytes": opt.comm_stats.bytes_sent, "rounds": opt.comm_stats.rounds, "memory": opt.gossip.buffer_bytes(),
            "ulp": max(float(p.detach().abs().max()) for p in m.parameters()) * 2.0 ** -24}


@pytest.mark.slow  # 1,000 rounds on 4 ranks, three ways
@pytest.mark.parametrize("topology,max_delay", [("ring", 1), ("one-peer-exp", 2), ("torus", 3), ("complete", 2)])
def test_the_global_mean_is_kept_over_1000_rounds_and_consensus_shrinks(topology: str, max_delay: int) -> None:
    rounds = 1000
    out = run_ranks(_gossip_only, 4, topology, max_delay, rounds, 2, timeout=300)
    for k in range(len(out[0]["start"])):
        before = sum(o["start"][k] for o in out)  # float64 sums across the ranks
        after = sum(o["end"][k] for o in out)
        # the corrections cancel to the last bit; only the final float32 additions round: at most one rounding
        # per rank and round, and far less in practice (the roundings do not all point one way)
        bound = 4 * rounds * max(o["ulp"] for o in out)
        assert float((after - before).abs().max()) <= bound, (topology, k)
    d = out[0]["distances"]
    assert d[2] < d[1] < d[0] and d[2] < 0.05 * d[0], d  # consensus: the workers agree far better than at the start


@pytest.mark.parametrize("topology,world_size", [("one-peer-exp", 4), ("complete", 3)])  # pairs; a group of three
def test_the_mean_is_kept_and_consensus_shrinks_in_a_few_rounds(topology: str, world_size: int) -> None:
    out = run_ranks(_gossip_only, world_size, topology, 2, 40, 2)
    for k in range(len(out[0]["start"])):
        drift = float((sum(o["end"][k] for o in out) - sum(o["start"][k] for o in out)).abs().max())
        assert drift <= world_size * 40 * max(o["ulp"] for o in out)
    d = out[0]["distances"]
    assert d[2] < d[1] < d[0]


def _agree_then_differ(rank: int, world_size: int) -> list[float]:
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 6), torch.nn.Linear(3, 6)  # b.weight is 6x3: its two sides differ in length
    opt = DecentOptimWrapper(torch.optim.SGD([*a.parameters(), *b.parameters()], lr=0.1), topology="ring",
                             compression=LowRank(rank=1))
    gap = []
    for step in range(30):
        g = torch.Generator().manual_seed(10 * rank + step)
        opt.zero_grad()
        if step < 3:  # b gets no gradient: the ranks hold the same b, and its rounds see a zero difference
            a(torch.randn(2, 4, generator=g)).square().mean().backward()
        elif step < 6:  # now they differ
            b(torch.randn(2, 3, generator=g)).square().mean().backward()
        else:  # gossip alone
            for group in opt.param_groups:
                group["lr"] = 0.0
        opt.step()
        if step >= 5:
            w = b.weight.detach().clone()
            dist.all_reduce(w, group=None)  # the pair's sum; the gap is |x0 - x1| = |2 x_rank - sum|
            gap.append(float((2 * b.weight.detach() - w).norm()))
    opt.finish()
    return gap


def test_a_difference_that_appears_after_the_pair_agreed_is_still_gossiped() -> None:
    # a round that sees the pair agree on a matrix (zero difference) must leave a usable basis: with a zero one
    # every later projection is zero and the matrix is never averaged again
    gap = run_ranks(_agree_then_differ, 2)[0]
    assert gap[0] > 1e-3 and gap[-1] < 1e-3 * gap[0], gap


def test_bytes_sent_match_the_formula() -> None:
    # weights 40x24 and 6x40 travel as rank-2 projections on alternating sides, the biases (40 + 6) whole, as
    # their bucket holds them (every parameter starts on a 128-byte boundary: 40 -> 64 floats, 6 -> 32);
    # per round, a right-side round sends 2*40 + 2*6 floats of factors, a left-side one 2*24 + 2*40
    rounds = 6
    out = run_ranks(_gossip_only, 2, "ring", 1, rounds, 2)
    dense = (64 + 32) * 4
    factors = [(2 * 40 + 2 * 6) * 4, (2 * 24 + 2 * 40) * 4]  # ring of two: the same edge every round
    expected = sum(dense + factors[k % 2] for k in range(rounds))
    assert [o["bytes"] for o in out] == [expected, expected]
    assert out[0]["rounds"] == rounds
    # memory (README, "Persistent extra memory"): the biases' bucket a snapshot and a receive buffer, 2 * 96 floats;
    # the factors' bucket what a round sends (projections and the bases they were taken on, room for each matrix's
    # wider side: 2 * (2*40 + 2*40) floats, and one side flag per matrix) and a receive buffer (2*40 + 2*40); the
    # edge's bases, after an even number of rounds on the right side: 2 x 24 and 2 x 40
    pair_memory = (2 * 96 + (2 * 160 + 2) + 160 + (2 * 24 + 2 * 40)) * 4
    assert [o["memory"] for o in out] == [pair_memory] * 2
    full = (40 * 24 + 40 + 6 * 40 + 6) * 4 * rounds
    assert expected < full / 5  # a fifth of full precision at this size
    # complete on 3 ranks: every round one group of three; the factors go edge by edge, to each of the two others
    # (both edges' sides take turns together), the biases in a float32 ring all-reduce (2(k-1)/k of their bytes)
    out = run_ranks(_gossip_only, 3, "complete", 1, rounds, 2)
    trio = sum((64 + 32) * 4 * 4 // 3 + 2 * factors[k % 2] for k in range(rounds))
    assert [o["bytes"] for o in out] == [trio] * 3
    # the biases' all-reduce keeps a snapshot and a sum buffer; each of the two edges the pair's factor buffers and
    # bases
    assert [o["memory"] for o in out] == [(2 * 96 + 2 * ((2 * 160 + 2) + 160 + (2 * 24 + 2 * 40))) * 4] * 3


def _resume(rank: int, world_size: int, path: str, max_delay: int, topology: str = "ring") -> bool:
    def build() -> tuple[torch.nn.Module, DecentOptimWrapper]:
        torch.manual_seed(rank)
        model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))
        return model, DecentOptimWrapper(torch.optim.Adam(model.parameters(), lr=1e-2), topology=topology,
                                         compression=LowRank(rank=1), max_delay=max_delay)

    def train(model: torch.nn.Module, opt: DecentOptimWrapper, steps: range, around_eval: int = -1) -> None:
        for step in steps:
            g = torch.Generator().manual_seed(100 * rank + step)
            opt.zero_grad()
            x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            if step == around_eval:  # evaluation on the average with rounds in flight, then back: nothing changes
                opt.global_avg()
                opt.revert_global_avg()

    model, opt = build()
    train(model, opt, range(9), around_eval=3)
    opt.finish()
    uninterrupted = [p.detach().clone() for p in model.parameters()]
    model, opt = build()
    train(model, opt, range(5))
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, f"{path}/rank{rank}.pt")
    ckpt = torch.load(f"{path}/rank{rank}.pt", weights_only=True)
    model, opt = build()
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optim"])
    train(model, opt, range(5, 9))
    opt.finish()
    assert "lowrank" in ckpt["optim"]["decent_optim_wrapper"]  # the warm starts travel with the checkpoint
    return all(torch.equal(a, b) for a, b in zip(uninterrupted, model.parameters()))


@pytest.mark.parametrize("max_delay", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_resume_with_low_rank_rounds_in_flight_is_bit_for_bit(tmp_path: Path, max_delay: int) -> None:
    # max_delay=1: one edge has a round in flight, the other's bases come from the checkpoint alone (a resume that
    # dropped them would draw fresh ones and differ from step 6 on); max_delay=2: both edges' rounds are in flight
    assert run_ranks(_resume, 4, str(tmp_path), max_delay) == [True] * 4


@pytest.mark.slow  # the same resume, edge by edge
def test_resume_with_rounds_in_flight_in_a_group_of_four_is_bit_for_bit(tmp_path: Path) -> None:
    # complete on 4 ranks: every member has three edges, each with bases of its own and a round in flight
    assert run_ranks(_resume, 4, str(tmp_path), 2, "complete") == [True] * 4


def _facade(rank: int, world_size: int, topology: str) -> float:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    ddp = DecentralizedDataParallel(model, lambda ps: torch.optim.SGD([p for _, p in ps], lr=0.1), topology=topology,
                                    compression=LowRank(rank=1))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(rank)
    before = ddp.consensus_distance()
    for step in range(20):
        g = torch.Generator().manual_seed(10 * rank + step)
        ddp.zero_grad()
        ddp(torch.randn(4, 16, generator=g)).square().mean().backward()
    ddp.finish()
    return ddp.consensus_distance() / before


@pytest.mark.slow  # the facade's plumbing; the arithmetic is the wrapper's
@pytest.mark.parametrize("topology,world_size", [("ring", 4), ("complete", 3)])  # pairs; edge by edge
def test_decentralized_data_parallel_gossips_low_rank(topology: str, world_size: int) -> None:
    assert all(ratio < 0.5 for ratio in run_ranks(_facade, world_size, topology))


def test_bad_rank_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=re.escape("Invalid rank=0. Must be an integer >= 1.")):
        LowRank(rank=0)
    with pytest.raises(ValueError, match=re.escape("Invalid compression='lowrank'. Must be None or LowRank(rank=r).")):
        DecentOptimWrapper(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2, 2))], lr=0.1),
                           compression="lowrank")  # type: ignore[arg-type]


def _refused(rank: int, world_size: int, topology: str, differ: bool) -> str:
    compression = LowRank(rank=2 if differ and rank == 1 else 1)
    try:
        DecentOptimWrapper(torch.optim.SGD(torch.nn.Linear(8, 8).parameters(), lr=0.1), topology=topology,
                           compression=compression)
    except ValueError as exc:
        return str(exc)
    return "constructed"


def _one_round_in_a_group_of_three(rank: int, world_size: int) -> dict:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 4))
    opt = DecentOptimWrapper(torch.optim.SGD(m.parameters(), lr=0.1), topology="complete",
                             compression=LowRank(rank=2))
    with torch.no_grad():  # the ranks differ
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(rank + 10 * p.numel())))
    g = torch.Generator().manual_seed(100 + rank)
    m(torch.randn(3, 5, generator=g)).square().mean().backward()
    grads = [p.grad.detach().double().clone() for p in m.parameters()]  # type: ignore[union-attr]
    before = [p.detach().double().clone() for p in m.parameters()]
    opt.step()  # the local step, then round 0 is launched
    held = opt.state_dict()["decent_optim_wrapper"]["lowrank"]["0-1-2"]  # the group's bases, per edge
    bases = {k: v.double().clone() for k, v in held.items() if not k.endswith("/right")}
    sides = {k: v for k, v in held.items() if k.endswith("/right")}
    opt.finish()  # ... and applied
    return {"before": before, "grads": grads, "after": [p.detach().double().clone() for p in m.parameters()],
            "bases": bases, "sides": sides}


def test_a_group_of_three_gossips_edge_by_edge_by_hand() -> None:
    # complete on 3 ranks, LowRank(rank=2), one SGD step then one round. The oracle, in float64 from the bases the
    # ranks hold: y_i = x_i - lr g_i, then for each matrix x_i <- y_i + 1/3 sum_{j != i} (y_j - y_i) Q Q^T, with Q
    # the edge's basis (a right side in the first round), and the biases (vectors travel whole) the group's mean
    out = run_ranks(_one_round_in_a_group_of_three, 3)
    y = [[b - 0.1 * g for b, g in zip(o["before"], o["grads"])] for o in out]
    weights = [0, 2]  # the parameters that are matrices, 7x5 and 4x7: rank-2 factors are smaller than either
    for i, o in enumerate(out):
        others = [j for j in range(3) if j != i]
        # every member holds one basis per edge and matrix; both members of an edge hold the same one
        assert sorted(o["bases"]) == sorted(f"{j}:0/{m}" for j in others for m in range(2)), sorted(o["bases"])
        for j in others:
            for m in range(2):
                assert torch.equal(o["bases"][f"{j}:0/{m}"], out[j]["bases"][f"{i}:0/{m}"])
                assert o["sides"][f"{j}:0/{m}/right"] is True
        for m, k in enumerate(weights):
            want = y[i][k].clone()
            for j in others:
                q_t = o["bases"][f"{j}:0/{m}"]  # r x cols, Q^T
                want += (y[j][k] - y[i][k]) @ q_t.t() @ q_t / 3
            assert torch.allclose(o["after"][k], want, rtol=0, atol=1e-6), (i, k)
            assert not torch.allclose(want, sum(y[r][k] for r in range(3)) / 3, atol=1e-3)  # not the full average
        for k in (1, 3):  # biases: the exact mean of the three (all-reduce of c*x, float32)
            assert torch.allclose(o["after"][k], sum(y[r][k] for r in range(3)) / 3, rtol=0, atol=1e-6)


@pytest.mark.slow  # the same agreement check as every other argument's (tests/test_delay.py)
def test_ranks_with_different_ranks_of_approximation_are_refused_on_every_rank() -> None:
    results = run_ranks(_refused, 2, "ring", True)
    assert len(set(results)) == 1 and results[0].startswith("Ranks use different options"), results
    assert "LowRank(rank=2)" in results[0]


STEPS_JOIN = [9, 5, 7]  # rank 1 runs out first, then rank 2: they stand in for the rounds of the ranks still going


def _lowrank_in_join(rank: int, world_size: int, topology: str) -> dict:
    torch.manual_seed(0)
    m = torch.nn.Linear(12, 10)  # the weight travels as rank-2 factors, the bias as values
    opt = DecentOptimWrapper(torch.optim.SGD(m.parameters(), lr=0.05), topology=topology, compression=LowRank(rank=2),
                             timeout=30)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(rank)) * (1 + rank))
    start = [p.detach().double().clone() for p in m.parameters()]
    before = opt.consensus_distance()
    updates = [torch.zeros_like(s) for s in start]  # what this rank's own SGD steps subtracted, in float64
    with Join([opt]):
        for step in range(STEPS_JOIN[rank]):
            g = torch.Generator().manual_seed(10 * rank + step)
            opt.zero_grad()
            m(torch.randn(4, 12, generator=g)).square().mean().backward()
            for u, p in zip(updates, m.parameters()):
                u += 0.05 * p.grad.double()  # type: ignore[union-attr]
            opt.step()
    opt.finish()
    return {"start": start, "end": [p.detach().double().clone() for p in m.parameters()], "updates": updates,
            "round": opt.round, "ratio": opt.consensus_distance() / before,
            "ulp": max(float(p.detach().abs().max()) for p in m.parameters()) * 2.0 ** -24}


@pytest.mark.parametrize("topology", ["ring", "complete"])  # pairs; a group of three, edge by edge
def test_ranks_that_run_out_of_inputs_stand_in_for_low_rank_rounds(topology: str) -> None:
    out = run_ranks(_lowrank_in_join, 3, topology, timeout=120)
    assert [o["round"] for o in out] == [max(STEPS_JOIN)] * 3  # every rank took part in every round
    for k in range(2):
        # the global sum moves by the local updates alone: every round, stood in for or not, keeps it (up to one
        # float32 rounding per rank, round and update)
        moved = sum(o["end"][k] for o in out) - sum(o["start"][k] for o in out) + sum(o["updates"][k] for o in out)
        assert float(moved.abs().max()) <= 3 * 2 * max(STEPS_JOIN) * max(o["ulp"] for o in out), (topology, k)
    assert all(o["ratio"] < 1 for o in out)
