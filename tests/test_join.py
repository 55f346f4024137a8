"""Uneven inputs: inside ``torch.distributed.algorithms.Join``, a rank that ran out of data stands in for the
rounds (and the global averaging) of the ranks still training; checked against the reference arithmetic."""

from __future__ import annotations

import pytest
import reference
import torch
from harness import run_ranks
from torch.distributed.algorithms import Join

from decent_optim_wrapper import DecentOptimWrapper, GossipError, TopologyFactory
from decent_optim_wrapper.ddp import DecentralizedDataParallel

STEPS = [6, 4, 5]  # batches per rank: rank 1 runs out first, then rank 2
LR = 0.25
EVAL_AT = 4  # the ranks still training average globally (and revert) after this step; rank 1 has joined by then


def _start(rank: int) -> torch.Tensor:
    return torch.arange(5.0) / 4 + 2 * rank


def _grad(rank: int) -> torch.Tensor:
    return torch.full((5,), float(rank + 1))


def _wrapper_in_join(rank: int, world_size: int, topology: str, wire: torch.dtype | None) -> dict:
    p = torch.nn.Parameter(torch.zeros(5))
    opt = DecentOptimWrapper(torch.optim.SGD([p], lr=LR), topology=topology, wire_dtype=wire, timeout=30)
    with torch.no_grad():
        p.copy_(_start(rank))
    seen = None
    with Join([opt]):
        for step in range(STEPS[rank]):
            p.grad = _grad(rank)
            opt.step()
            if step == EVAL_AT:
                opt.global_avg()
                seen = p.detach().clone()
                distance = opt.consensus_distance()
                opt.revert_global_avg()
    opt.finish()
    final = p.detach().clone()
    opt.global_avg(may_revert=False)  # after the Join every rank is at the same round: this just works
    return {"final": final, "seen": seen, "avg": p.detach().clone(), "round": opt.round,
            "distance": distance if seen is not None else None}


def _reference(topology: str, wire: torch.dtype | None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Ranks past their last batch take part in every round with their values as they are (no update)."""
    schedule = TopologyFactory.create(topology, 0, 3).schedule()
    seen: list[torch.Tensor] = []

    def record(t: int, x: list[torch.Tensor]) -> list[torch.Tensor]:
        if t == EVAL_AT:
            seen.append(sum(x) / 3)  # the global mean of the values each rank holds right after that step
        return x

    final = reference.train(reference.groups_of(schedule.rounds), [_start(r) for r in range(3)], max(STEPS),
                            lambda r, t, x: x - LR * _grad(r) if t < STEPS[r] else x, wire, record)
    return final, seen[0]


@pytest.mark.parametrize("topology,wire", [("ring", None), ("one-peer-exp", None), ("complete", None),
                                           ("ring", torch.bfloat16)])
def test_ranks_that_run_out_stand_in_for_the_others_rounds_and_global_avg(topology: str,
                                                                          wire: torch.dtype | None) -> None:
    got = run_ranks(_wrapper_in_join, 3, topology, wire, timeout=120)
    final, seen = _reference(topology, wire)
    exact = topology == "ring" and wire is None  # one-peer-exp and complete weigh by thirds: not exact in binary
    for rank, r in enumerate(got):
        assert r["round"] == max(STEPS)
        if exact:
            assert torch.equal(r["final"].double(), final[rank]), rank
        else:
            torch.testing.assert_close(r["final"].double(), final[rank], rtol=1e-6, atol=1e-6)
        if r["seen"] is not None:  # the ranks still training at EVAL_AT saw the mean over all three
            torch.testing.assert_close(r["seen"].double(), seen, rtol=1e-6, atol=1e-6)
            assert r["distance"] > 0
        torch.testing.assert_close(r["avg"], got[0]["avg"], rtol=0, atol=0)
    assert got[1]["seen"] is None and got[0]["seen"] is not None and got[2]["seen"] is not None


class _Linear(torch.nn.Module):
    """``loss = <a, g_r> + <b, 2 g_r>``: constant gradients, two parameters in two buckets."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(_start(rank).clone())
        self.b = torch.nn.Parameter(_start(rank).clone() + 1)

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        return (self.a * g).sum() + (self.b * 2 * g).sum()


def _ddp_in_join(rank: int, world_size: int) -> list[torch.Tensor]:
    model = _Linear(rank)
    ddp = DecentralizedDataParallel(model, lambda ps: torch.optim.SGD([p for _, p in ps], lr=LR), topology="ring",
                                    bucket_size_in_mb=1e-5, timeout=30)
    with torch.no_grad():  # construction broadcast rank 0's values
        model.a.copy_(_start(rank))
        model.b.copy_(_start(rank) + 1)
    with Join([ddp]):
        for _ in range(STEPS[rank]):
            ddp.zero_grad()
            ddp(_grad(rank)).backward()
    ddp.finish()
    assert len(ddp.optimizers) == 2
    return [model.a.detach().clone(), model.b.detach().clone()]


def test_decentralized_data_parallel_in_a_join() -> None:
    got = run_ranks(_ddp_in_join, 3, timeout=120)
    rounds = reference.groups_of(TopologyFactory.create("ring", 0, 3).schedule().rounds)
    for k, (offset, scale) in enumerate([(0.0, 1.0), (1.0, 2.0)]):
        def update(r: int, t: int, x: torch.Tensor, scale: float = scale) -> torch.Tensor:
            return x - LR * scale * _grad(r) if t < STEPS[r] else x

        expected = reference.train(rounds, [_start(r) + offset for r in range(3)], max(STEPS), update)
        for rank in range(3):
            assert torch.equal(got[rank][k].double(), expected[rank]), (k, rank)


def _metrics_in_join(rank: int, world_size: int, what: str) -> str:
    p = torch.nn.Parameter(torch.zeros(5))
    opt = DecentOptimWrapper(torch.optim.SGD([p], lr=LR), topology="ring", timeout=20)
    try:
        with Join([opt]):
            for step in range(STEPS[rank]):
                p.grad = _grad(rank)
                opt.step()
                if step == EVAL_AT:
                    if what == "metrics":
                        opt.reduce_metrics({"loss": 1.0})
                    else:
                        opt.global_avg(module=torch.nn.BatchNorm1d(3))
                        opt.revert_global_avg()
    except GossipError as exc:
        return f"GossipError: {exc}"
    return "ok"


@pytest.mark.parametrize("what", ["metrics", "module"])
def test_what_a_rank_out_of_inputs_cannot_stand_in_for_fails_every_rank_at_once(what: str) -> None:
    results = run_ranks(_metrics_in_join, 3, what, timeout=120)
    assert "it ran out of inputs inside a Join and cannot stand in for that operation" in results[1], results[1]
    if what == "module":
        assert "give the module to the Join: Join([optimizer], module=model)" in results[1]
    for rank in (0, 2):  # told by rank 1's stamp, not after their 20 s timeout
        assert results[rank].startswith("GossipError: ") and "rank 1 failed: it ran out of inputs" in results[rank], \
            results[rank]
