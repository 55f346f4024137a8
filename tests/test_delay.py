"""Rounds that span steps (``max_delay``) and local steps between rounds (``gossip_every``): the trajectory of the
reference arithmetic, bit for bit where the values allow; checkpoints and global averaging with several rounds in
flight; bad values."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import reference
import torch
from harness import RankFailure, run_ranks

from decent_optim_wrapper import DecentOptimWrapper, TopologyFactory
from decent_optim_wrapper.ddp import DecentralizedDataParallel

LR = 0.25


def _start(rank: int, n: int = 6) -> torch.Tensor:
    return torch.arange(float(n)) / 8 + 2 * rank  # dyadic: means of pairs and of 4 ranks are exact


def _grad(rank: int, step: int, n: int = 6) -> torch.Tensor:
    # differs between ranks, steps and elements; integers, so that every value stays dyadic
    return torch.arange(float(n)) * ((rank * rank + step) % 3) + (rank + 1) * (step % 3 + 1)


def _delayed(rank: int, world_size: int, topology: str, max_delay: int, gossip_every: int,
             wire: torch.dtype | None, steps: int) -> dict:
    p = torch.nn.Parameter(torch.zeros(6))
    opt = DecentOptimWrapper(torch.optim.SGD([p], lr=LR), topology=topology, max_delay=max_delay,
                             gossip_every=gossip_every, wire_dtype=wire, timeout=30)
    with torch.no_grad():
        p.copy_(_start(rank))
    in_flight, seen = [], []
    for step in range(steps):
        p.grad = _grad(rank, step)
        opt.step()
        in_flight.append(opt.gossip.in_flight)
        seen.append(p.detach().clone())
    opt.finish()
    return {"p": p.detach().clone(), "in_flight": in_flight, "rounds": opt.comm_stats.rounds, "round": opt.round,
            "seen": seen}


@pytest.mark.parametrize("topology,max_delay,gossip_every,wire", [
    ("ring", 2, 1, None), pytest.param("ring", 4, 1, None, marks=pytest.mark.slow), ("one-peer-exp", 2, 2, None),
    pytest.param("complete", 2, 1, None, marks=pytest.mark.slow),
    pytest.param("ring", 1, 3, None, marks=pytest.mark.slow),
    ("ring", 2, 1, torch.bfloat16),
])
def test_rounds_that_span_steps_follow_the_reference(topology: str, max_delay: int, gossip_every: int,
                                                     wire: torch.dtype | None) -> None:
    steps = 7
    got = run_ranks(_delayed, 4, topology, max_delay, gossip_every, wire, steps)
    rounds = reference.groups_of(TopologyFactory.create(topology, 0, 4).schedule().rounds)
    trajectory: list[list[torch.Tensor]] = []
    expected = reference.train(rounds, [_start(r) for r in range(4)], steps, lambda r, s, x: x - LR * _grad(r, s),
                               wire, max_delay=max_delay, gossip_every=gossip_every, record=trajectory)
    launched = steps // gossip_every
    for rank, r in enumerate(got):
        # after every step (a round applied one step late would show here) and after finish()
        for got_x, want in zip(r["seen"] + [r["p"]], [t[rank] for t in trajectory] + [expected[rank]]):
            if wire is None:  # pairs and groups of 4 of dyadic values: exact
                assert torch.equal(got_x.double(), want), (rank, got_x, want)
            else:
                torch.testing.assert_close(got_x.double(), want, rtol=1e-6, atol=1e-6)
        assert r["round"] == launched
        # rounds in flight after each step: up to max_delay, never more
        assert max(r["in_flight"]) == min(max_delay, launched) and r["in_flight"][-1] <= max_delay
    # the corrections of a pair are equal and opposite: the sum over the ranks is the reference's
    total = sum(r["p"].double() for r in got)
    torch.testing.assert_close(total, sum(expected), rtol=0, atol=1e-4 if wire is not None else 0)


def _gossip_alone(rank: int, world_size: int, topology: str, max_delay: int, start: list[float],
                  steps: int) -> list[float]:
    """One float64 value per rank, starting at ``start[rank]``, lr 0: its value after each step."""
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = DecentOptimWrapper(torch.optim.SGD([p], lr=0.0), topology=topology, max_delay=max_delay, timeout=30)
    with torch.no_grad():
        p.fill_(start[rank])
    seen = []
    for _ in range(steps):
        opt.step()
        seen.append(float(p))
    opt.finish()
    return seen


@pytest.mark.parametrize("max_delay", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_a_pair_with_several_rounds_in_flight_is_damped_and_converges(max_delay: int) -> None:
    # A ring of two mixes the same pair every round, so max_delay of its rounds are in flight at once. By hand:
    # the difference D after step t is D[t-1] - 2c * D[t-d] (the round sent after step t-d lands at step t). With
    # c = 1/2 (the pair's weight, undamped) that is z^2 = z - 1 for d = 2 (|z| = 1: D oscillates forever) and
    # z^3 = z^2 - 1 for d = 3 (a root of modulus 1.15: D grows). Damped, c = 1/(2d): |D| shrinks.
    steps = 80
    got = run_ranks(_gossip_alone, 2, "ring", max_delay, [1.0, -1.0], steps)
    c = 0.5 / max_delay
    d = [2.0] * max_delay  # nothing lands before step max_delay
    for t in range(max_delay, steps):
        d.append(d[t - 1] - 2 * c * d[t - max_delay])
    diff = [a - b for a, b in zip(got[0], got[1])]
    if max_delay == 2:
        assert diff == d  # rtol = atol = 0: c = 1/4, every value dyadic
    else:  # c = 1/6 rounds
        torch.testing.assert_close(torch.tensor(diff), torch.tensor(d), rtol=1e-12, atol=1e-15)
    assert got[0] == [-x for x in got[1]]  # the mean stays 0
    assert abs(d[-1]) < 1e-3 * 2.0


def test_rounds_of_different_pairs_in_flight_at_once_are_damped_too() -> None:
    # one-peer-exp on 4 ranks pairs (0,1),(2,3), then (0,2),(1,3): no pair recurs while its round is in flight at
    # max_delay=2, yet v = (1, -1, -1, 1) is split by both rounds (each moves it by -2c v). By hand, x_0 = a[t] with
    # a[t] = a[t-1] - 2c a[t-2]: undamped (c = 1/2) a never shrinks (1, 1, 0, -1, -1, 0, 1, ...); with c = 1/4 it
    # does, every value dyadic
    steps = 30
    got = run_ranks(_gossip_alone, 4, "one-peer-exp", 2, [1.0, -1.0, -1.0, 1.0], steps)
    a = [1.0, 1.0]
    for t in range(2, steps):
        a.append(a[t - 1] - 0.5 * a[t - 2])
    assert got[0] == a and got[3] == a and got[1] == [-x for x in a]
    assert abs(a[-1]) < 1e-4


def test_the_defaults_are_the_order_of_one_round_in_flight() -> None:
    # max_delay=1, gossip_every=1: each step applies the round the previous one launched (0.1's order)
    got = run_ranks(_delayed, 4, "ring", 1, 1, None, 5)
    rounds = reference.groups_of(TopologyFactory.create("ring", 0, 4).schedule().rounds)
    expected = reference.train(rounds, [_start(r) for r in range(4)], 5, lambda r, s, x: x - LR * _grad(r, s))
    assert all(torch.equal(r["p"].double(), e) for r, e in zip(got, expected))
    assert all(r["in_flight"] == [1] * 5 for r in got)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * rank + step)
    return torch.randn(4, 5, generator=g), torch.randn(4, 2, generator=g)


def _train(model: torch.nn.Module, opt: DecentOptimWrapper, rank: int, steps: range, around_eval: int = -1) -> None:
    for step in steps:
        x, y = _batch(rank, step)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if step == around_eval:  # evaluation on the average, then back: nothing may change
            opt.global_avg()
            opt.revert_global_avg()


def _resumed(rank: int, world_size: int, path: str, max_delay: int, gossip_every: int, stop: int) -> list:
    def build() -> tuple[torch.nn.Module, DecentOptimWrapper]:
        model = _model(rank)
        return model, DecentOptimWrapper(torch.optim.AdamW(model.parameters(), lr=1e-2), topology="ring",
                                         max_delay=max_delay, gossip_every=gossip_every)

    model, opt = build()
    _train(model, opt, rank, range(10), around_eval=4)
    opt.finish()
    uninterrupted = [p.detach().clone() for p in model.parameters()]

    model, opt = build()
    _train(model, opt, rank, range(stop))
    in_flight = opt.gossip.in_flight
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, f"{path}/rank{rank}.pt")
    del model, opt
    ckpt = torch.load(f"{path}/rank{rank}.pt", weights_only=True)
    model, opt = build()
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optim"])
    _train(model, opt, rank, range(stop, 10))
    opt.finish()
    return [in_flight, all(torch.equal(a, b) for a, b in zip(uninterrupted, model.parameters())),
            [p.detach().clone() for p in model.parameters()]]


@pytest.mark.parametrize("max_delay,gossip_every,stop", [(3, 1, 5), pytest.param(2, 2, 5, marks=pytest.mark.slow)])
def test_resume_with_several_rounds_in_flight_is_bit_for_bit(tmp_path: Path, max_delay: int, gossip_every: int,
                                                             stop: int) -> None:
    # the uninterrupted run also averages globally and reverts at step 4, with rounds in flight
    results = run_ranks(_resumed, 4, str(tmp_path), max_delay, gossip_every, stop)
    for in_flight, equal, _ in results:
        assert in_flight == max_delay  # the checkpoint was taken with that many rounds in flight
        assert equal
    assert not torch.equal(results[0][2][0], results[1][2][0])  # ranks differ: the test can see a wrong mix


def _facade_and_wrapper(rank: int, world_size: int) -> float:
    torch.manual_seed(0)
    model = _model()
    ddp = DecentralizedDataParallel(model, lambda ps: torch.optim.SGD([p for _, p in ps], lr=0.1), topology="ring",
                                    bucket_size_in_mb=0.0002, max_delay=2, gossip_every=2)
    for step in range(7):
        x, y = _batch(rank, step)
        ddp.zero_grad()
        torch.nn.functional.mse_loss(ddp(x), y).backward()
    ddp.finish()
    model2 = _model()
    opt = DecentOptimWrapper(torch.optim.SGD(model2.parameters(), lr=0.1), topology="ring", max_delay=2,
                             gossip_every=2)
    _train(model2, opt, rank, range(7))
    opt.finish()
    assert len(ddp.optimizers) >= 2
    return max((a - b).abs().max().item() for a, b in zip(model.parameters(), model2.parameters()))


def test_decentralized_data_parallel_with_rounds_that_span_steps_equals_the_wrapper() -> None:
    assert run_ranks(_facade_and_wrapper, 4) == [0.0] * 4


@pytest.mark.parametrize("kwargs,msg", [
    ({"max_delay": 0}, "Invalid max_delay=0. Must be an integer >= 1."),
    ({"gossip_every": 0}, "Invalid gossip_every=0. Must be an integer >= 1."),
    ({"max_delay": 1.5}, "Invalid max_delay=1.5. Must be an integer >= 1."),
    ({"gossip_every": True}, "Invalid gossip_every=True. Must be an integer >= 1."),
])
def test_bad_values_are_value_errors_naming_them(kwargs: dict, msg: str) -> None:
    with pytest.raises(ValueError, match=re.escape(msg)):
        DecentOptimWrapper(torch.optim.SGD(_model().parameters(), lr=0.1), **kwargs)


def _differing(rank: int, world_size: int, name: str) -> str:
    kwargs = {name: 2 if rank == 1 else 1}
    try:
        DecentOptimWrapper(torch.optim.SGD(_model().parameters(), lr=0.1), **kwargs)
    except ValueError as exc:
        return str(exc)
    return "constructed"


@pytest.mark.parametrize("name", ["max_delay", "gossip_every"])
def test_a_value_that_differs_across_ranks_is_the_same_value_error_everywhere(name: str) -> None:
    results = run_ranks(_differing, 3, name)
    assert len(set(results)) == 1 and results[0].startswith("Ranks use different options while constructing"), results
    assert name in results[0]


def _bad_on_one_rank(rank: int, world_size: int) -> str:
    try:
        DecentOptimWrapper(torch.optim.SGD(_model().parameters(), lr=0.1), max_delay=0 if rank == 2 else 2)
    except ValueError as exc:
        return str(exc)
    return "constructed"


def test_a_bad_value_on_one_rank_fails_every_rank() -> None:
    results = run_ranks(_bad_on_one_rank, 3)
    assert results[2] == "Invalid max_delay=0. Must be an integer >= 1."
    assert results[0] == results[1] == "rank 2 failed while constructing DecentOptimWrapper: Invalid max_delay=0. " \
        "Must be an integer >= 1."
    assert not any(isinstance(r, RankFailure) for r in results)
