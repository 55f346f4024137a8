"""The gossip engine on several gloo ranks: every built-in topology's rounds, and failures within a timeout."""

from __future__ import annotations

import math
import os
import time

import pytest
import reference
import torch
from harness import RankFailure, run_ranks

from decent_optim_wrapper import DecentOptimWrapper
from decent_optim_wrapper.buckets import build_buckets
from decent_optim_wrapper.comm import GossipError, ProcessGroups
from decent_optim_wrapper.config import GossipConfig
from decent_optim_wrapper.gossip import Gossip
from decent_optim_wrapper.topo import Group, Schedule, Topology, TopologyFactory

LOCAL = {3: 1, 4: 2, 6: 2, 8: 4}  # local_world_size used for alternating-exp-ring
TOPOLOGIES = ["ring", "complete", "one-peer-exp", "alternating-exp-ring", "torus"]


def _rounds_of_every_topology(rank: int, world_size: int) -> dict:
    out = {}
    for name in TOPOLOGIES:
        m = torch.nn.Module()
        m.a = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
        m.b = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
        opt = DecentOptimWrapper(torch.optim.SGD(m.parameters(), lr=0.0), topology=name,
                                 local_world_size=LOCAL[world_size], timeout=30)
        with torch.no_grad():
            m.a.fill_(float(rank))
            m.b.fill_(float(rank * rank))
        seen = []
        for _ in range(opt.schedule.period + 2):
            opt.step()
            seen.append((m.a.tolist(), m.b.tolist()))
        opt.global_avg(may_revert=False)
        out[name] = seen
    return out


def _is_dyadic(schedule: Schedule) -> bool:
    """All weights are 1/2^k: every value in the test is then exact in float64."""
    def dyadic(x: float) -> bool:
        return x > 0 and (x * 2 ** 20).is_integer()
    return all(dyadic(g.self_weight) and (g.size == 1 or dyadic(g.peer_weight)) for r in schedule.rounds for g in r)


@pytest.mark.parametrize("world_size", [3, 4, pytest.param(6, marks=pytest.mark.slow),
                                        pytest.param(8, marks=pytest.mark.slow)])
def test_every_topology_mixes_by_its_own_matrices(world_size: int) -> None:
    # the oracle: the reference arithmetic (tests/reference.py), group by group, on the schedule's rounds
    results = run_ranks(_rounds_of_every_topology, world_size, timeout=120)
    for name in TOPOLOGIES:
        schedule = TopologyFactory.create(name, 0, world_size, LOCAL[world_size]).schedule()
        rounds = reference.groups_of(schedule.rounds)
        tol = 0.0 if _is_dyadic(schedule) else 1e-13
        xs = [torch.full((4,), float(r), dtype=torch.float64) for r in range(world_size)]
        ys = [torch.full((3,), float(r * r), dtype=torch.float64) for r in range(world_size)]
        for step, t in enumerate(range(schedule.period + 1)):
            got_a = torch.tensor([results[r][name][step + 1][0] for r in range(world_size)], dtype=torch.float64)
            got_b = torch.tensor([results[r][name][step + 1][1] for r in range(world_size)], dtype=torch.float64)
            xs = reference.mix_round(rounds[t % len(rounds)], xs, xs)
            ys = reference.mix_round(rounds[t % len(rounds)], ys, ys)
            torch.testing.assert_close(got_a, torch.stack(xs), rtol=0, atol=tol,
                                       msg=f"{name} n={world_size} after round {t}")
            torch.testing.assert_close(got_b, torch.stack(ys), rtol=0, atol=tol,
                                       msg=f"{name} n={world_size} after round {t}")
        if name in ("complete", "one-peer-exp", "alternating-exp-ring"):
            torch.testing.assert_close(torch.stack(xs), torch.full((world_size, 4), (world_size - 1) / 2,
                                                                   dtype=torch.float64), rtol=0, atol=1e-12)


class _Triples(Topology):
    """Groups of three where the world size allows, a pair or a rank alone for the rest: compressed groups of three
    gather, and their round checks need process groups of three that not every rank is in."""

    def rounds(self) -> list[list[Group]]:
        n = self.world_size
        return [[Group(tuple(range(a, min(a + 3, n)))) for a in range(0, n, 3)]]


# every transport: point-to-point pairs, all-reduce pairs (also weighted), all-reduce groups, compressed pairs,
# compressed groups of three (gathered); with the process groups they need created at odd world sizes
TRANSPORT_CASES = [("ring", "p2p", None), ("ring", "allreduce", None), ("one-peer-exp", "allreduce", None),
                   ("complete", "auto", None), ("ring", "auto", torch.bfloat16), (_Triples, "auto", None),
                   (_Triples, "allreduce", torch.bfloat16), ("one-peer-exp", "auto", torch.bfloat16)]


def _start_values(rank: int) -> torch.Tensor:
    return torch.arange(6.0) / 8 + 3 * rank


def _every_transport(rank: int, world_size: int) -> list[torch.Tensor]:
    out = []
    for topology, pair_transport, wire in TRANSPORT_CASES:
        p = torch.nn.Parameter(torch.zeros(6))
        opt = DecentOptimWrapper(torch.optim.SGD([p], lr=0.25), topology=topology, pair_transport=pair_transport,
                                 wire_dtype=wire, timeout=30)
        with torch.no_grad():
            p.copy_(_start_values(rank))
        for _ in range(3):
            p.grad = torch.full((6,), float(rank % 3))
            opt.step()
        opt.finish()
        out.append(p.detach().clone())
    return out


@pytest.mark.parametrize("world_size", [3, 5, pytest.param(7, marks=pytest.mark.slow)])
def test_every_transport_at_odd_world_sizes(world_size: int) -> None:
    # Odd sizes used to hang in construction with all-reduce pairs: torch named the pair's group after a counter
    # that only members advance, and the two members of a pair had created different numbers of groups before.
    got = run_ranks(_every_transport, world_size, timeout=240)
    for k, (topology, pair_transport, wire) in enumerate(TRANSPORT_CASES):
        schedule = (TopologyFactory.create(topology, 0, world_size) if isinstance(topology, str)
                    else topology(0, world_size)).schedule()
        expected = reference.train(reference.groups_of(schedule.rounds),
                                   [_start_values(r) for r in range(world_size)], 3,
                                   lambda r, t, x: x - 0.25 * (r % 3), wire)
        for rank in range(world_size):
            torch.testing.assert_close(got[rank][k].double(), expected[rank], rtol=1e-6, atol=1e-6,
                                       msg=f"{topology} {pair_transport} {wire} rank {rank} of {world_size}")


def _weighted_rounds(rank: int, world_size: int, pair_transport: str) -> list[float]:
    # pairs keep 3/4 of themselves; then a group of three keeps 1/2 and takes 1/4 from each other member
    schedule = Schedule(4, [[Group((0, 1), 0.75), Group((2, 3), 0.75)], [Group((0, 1, 2), 0.5), Group((3,))]])
    p = torch.nn.Parameter(torch.full((5,), 4.0 * rank))
    gossip = Gossip(schedule, rank, build_buckets([p], 1.0), ProcessGroups(None),
                    GossipConfig(pair_transport=pair_transport))
    seen = []
    for _ in range(2):
        gossip.end_step()  # launches the round (every step does)
        gossip.finish()
        seen.append(p[0].item())
    return seen


@pytest.mark.parametrize("pair_transport", ["p2p", "allreduce"])
def test_weighted_groups_exact_values(pair_transport: str) -> None:
    results = run_ranks(_weighted_rounds, 4, pair_transport)
    # x = [0, 4, 8, 12] -> pairs at 3/4: [1, 3, 9, 11] -> (0,1,2) at 1/2, 1/4, 1/4: [3.5, 4, 5.5], 11
    assert [r[0] for r in results] == [1.0, 3.0, 9.0, 11.0]
    assert [r[1] for r in results] == [3.5, 4.0, 5.5, 11.0]


def _process_groups_created(rank: int, world_size: int) -> tuple[list, list]:
    DecentOptimWrapper(torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1),
                       topology="alternating-exp-ring", local_world_size=4)
    known = sorted((kind, list(ranks)) for ranks, kind in ProcessGroups.known())
    return known, [k for k in known if rank in k[1]]


@pytest.mark.slow  # 8 ranks
def test_every_rank_names_every_group_and_joins_only_its_own() -> None:
    # 8 ranks, 2 nodes of 4: every rank creates every group of the schedule in the same order (torch names
    # groups after a counter), but joins only its node's data group and gloo twin, the world's control group,
    # and the world's second data group (pairs go point to point on gloo, each direction on its own group)
    world = list(range(8))
    for rank, (known, joined) in enumerate(run_ranks(_process_groups_created, 8)):
        nodes = [list(range(4)), list(range(4, 8))]
        assert known == sorted([("control", world), ("data-back", world)]
                               + [(k, n) for n in nodes for k in ("control", "data")])
        node = nodes[rank // 4]
        assert joined == sorted([("control", node), ("control", world), ("data", node), ("data-back", world)])


def _killed_peer(rank: int, world_size: int, timeout: float) -> float:
    model = torch.nn.Linear(8, 8)
    opt = DecentOptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), topology="ring", timeout=timeout)
    for step in range(10):
        if rank == 1 and step == 4:
            os._exit(17)  # dies without a word, mid-training
        model(torch.randn(2, 8)).sum().backward()
        t0 = time.monotonic()
        try:
            opt.step()
        except GossipError as exc:
            raise GossipError(f"after {time.monotonic() - t0:.2f}s: {exc}") from exc
    return -1.0


def test_a_killed_rank_makes_the_others_fail_within_the_timeout() -> None:
    results = run_ranks(_killed_peer, 4, 5.0, timeout=60, allow_failure=True, pg_timeout_s=120)
    assert "died with exit code 17" in str(results[1])
    for rank in (0, 2, 3):
        assert isinstance(results[rank], RankFailure), f"rank {rank} went on without its peer"
        text = str(results[rank])  # the wrapper's 5 s bounded the wait (the process group's is 120 s), or the peer
        assert "GossipError" in text and ("did not complete within 5 s" in text or "Connection" in text), text


def _skipped_step(rank: int, world_size: int) -> str:
    model = torch.nn.Linear(4, 4)
    opt = DecentOptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), topology="ring", timeout=5)
    for step in range(12):
        if rank == 0 and step == 3:
            continue  # rank 0 skips one step() call
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
    opt.global_avg()
    return "finished"


def test_a_rank_that_skips_a_step_fails_everyone_at_once_not_after_the_timeout() -> None:
    # Pairs and groups are matched in order, so a rank one step behind still mixes with the right peers, just
    # later. At global_avg every rank checks the round counters before it waits for its round in flight, so all
    # of them learn at once (not after the 5 s timeout) that they took different numbers of steps.
    results = run_ranks(_skipped_step, 4, timeout=90, allow_failure=True, pg_timeout_s=120)
    assert all(isinstance(r, RankFailure) and "GossipError" in str(r) for r in results), results
    for rank, r in enumerate(results):
        at = 11 if rank == 0 else 12
        assert (f"rank {rank}: global_avg at round {at}: out of step: the ranks took different numbers of steps "
                f"(this rank at round {at}, the group [0, 1, 2, 3] at rounds 11 to 12)") in str(r)
        assert "did not complete" not in str(r) and "Join([optimizer])" in str(r)


def _resumed_at_another_round(rank: int, world_size: int) -> str:
    model = torch.nn.Linear(4, 4)
    opt = DecentOptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), topology="ring", timeout=10)
    for _ in range(2):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
    sd = opt.state_dict()
    if rank == 0:  # rank 0 loads a checkpoint from another step: round and step 6, round 5 in flight
        own = sd["decent_optim_wrapper"]
        own["round"] = own["step"] = 6
        own["inflight"] = [dict(r, round=5, due=6) for r in own["inflight"]]
    opt.load_state_dict(sd)
    for _ in range(4):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
    return "finished"


def test_ranks_at_different_rounds_are_reported_not_mixed() -> None:
    results = run_ranks(_resumed_at_another_round, 4, timeout=90, allow_failure=True, pg_timeout_s=120)
    assert all(isinstance(r, RankFailure) for r in results), "mismatched rounds must not train on"
    # the in-flight round of the loaded checkpoint (5) is replayed first, against round 1 of rank 3
    assert "out of step: the ranks took different numbers of steps (this rank at round 5, rank 3 at round 1)" \
        in str(results[0])


def _hung_peer(rank: int, world_size: int) -> str:
    model = torch.nn.Linear(4, 4)
    opt = DecentOptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), topology="complete", timeout=2)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    if rank == 1:
        time.sleep(4)  # alive but not stepping, twice as long as rank 0's timeout
        return "slept"
    opt.step()  # applies round 0, launches round 1, which rank 1 never joins
    opt.step()  # waits for round 1
    return "stepped"


@pytest.mark.slow  # waits out a timeout; the killed-peer test covers the same path in the fast lane
def test_a_hung_peer_times_out_with_a_clear_error() -> None:
    results = run_ranks(_hung_peer, 2, timeout=60, allow_failure=True, pg_timeout_s=120)
    assert results[1] == "slept"
    assert "did not complete within 2 s" in str(results[0])


def _two_gossip_groups(rank: int, world_size: int, topology: str) -> tuple:
    import torch.distributed as dist

    groups = [dist.new_group([0, 2, 4]), dist.new_group([1, 3, 5])]  # every rank creates both
    p = torch.nn.Parameter(torch.zeros(4))
    opt = DecentOptimWrapper(torch.optim.SGD([p], lr=0.0), topology=topology, process_group=groups[rank % 2])
    with torch.no_grad():
        p.fill_(float(rank))
    seen = []
    for _ in range(4):
        opt.step()
        seen.append(p[0].item())
    opt.global_avg()
    return opt.rank, opt.world_size, seen, p[0].item()


@pytest.mark.slow  # two process groups' worth of construction
def test_independent_gossip_groups_side_by_side() -> None:
    ring = run_ranks(_two_gossip_groups, 6, "ring")
    # each group of 3 runs the odd ring: local pairs (0,1), then (1,2), then (0,2); values are global ranks
    expected = {0: [0, 1, 1, 1.75], 2: [2, 1, 2.5, 2.5], 4: [4, 4, 2.5, 1.75],
                1: [1, 2, 2, 2.75], 3: [3, 2, 3.5, 3.5], 5: [5, 5, 3.5, 2.75]}
    for g, (rank, ws, seen, avg) in enumerate(ring):
        assert (rank, ws) == (g // 2, 3)
        assert seen == expected[g], g
        assert avg == pytest.approx(2.0 if g % 2 == 0 else 3.0, abs=1e-6)  # each group's own mean
    complete = run_ranks(_two_gossip_groups, 6, "complete")
    for g, (_, _, seen, _) in enumerate(complete):
        assert seen[1] == pytest.approx(2.0 if g % 2 == 0 else 3.0, abs=1e-6)


# ----------------------------------------------------------------------------- compressed gossip
def _compressed_rounds(rank: int, world_size: int, wire: torch.dtype, rounds: int) -> dict:
    out = {}
    for name in TOPOLOGIES:
        p = torch.nn.Parameter(torch.zeros(1000))
        opt = DecentOptimWrapper(torch.optim.SGD([p], lr=0.0), topology=name, local_world_size=LOCAL[world_size],
                                 wire_dtype=wire, timeout=30)
        g = torch.Generator().manual_seed(rank)
        with torch.no_grad():
            p.copy_(torch.randn(1000, generator=g) + rank)
        start = p.detach().clone()
        for _ in range(rounds + 1):  # the last step applies round `rounds - 1`
            opt.step()
        out[name] = {"start": start.tolist(), "end": p.detach().tolist(), "sent": opt.comm_stats.bytes_sent,
                     "rounds": opt.comm_stats.rounds}
    return out


@pytest.mark.slow  # 1,000 rounds
@pytest.mark.parametrize("wire", [torch.bfloat16, torch.float16])
def test_compressed_gossip_keeps_the_global_mean_on_four_ranks(wire: torch.dtype) -> None:
    rounds = 1000
    results = run_ranks(_compressed_rounds, 4, wire, rounds, timeout=240)
    bits = 8 if wire == torch.bfloat16 else 11
    for name in TOPOLOGIES:
        start = torch.tensor([r[name]["start"] for r in results], dtype=torch.float64)
        end = torch.tensor([r[name]["end"] for r in results], dtype=torch.float64)
        top = start.abs().max().item()
        ulp32 = 2.0 ** (math.floor(math.log2(top)) - 23)
        drift = (end.mean(0) - start.mean(0)).abs().max().item()
        assert drift <= rounds * 0.5 * ulp32, (name, drift)  # float32 rounding of the additions, no more
        spread = (end - end.mean(0)).abs().max().item()  # started about 2 apart
        assert spread <= 2.0 ** (math.floor(math.log2(top)) - bits + 1), (name, spread)
        # half the bytes of float32 (bfloat16 and float16 alike): 2 bytes per element (1000 padded to 1024)
        per_round = results[0][name]["sent"] / results[0][name]["rounds"]
        if name in ("ring", "one-peer-exp"):
            assert per_round == 1024 * 2


# ----------------------------------------------------------------------------- pieces
def _start(rank: int, n: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(100 + rank)) * (rank + 1)


def _streamed_rounds(rank: int, world_size: int, n: int, wire: torch.dtype | None, rounds: int) -> dict:
    p = torch.nn.Parameter(torch.zeros(n))
    q = torch.nn.Parameter(torch.zeros(7))  # a second, small bucket: pieces of several buckets in one round
    opt = DecentOptimWrapper(torch.optim.SGD([p, q], lr=0.0), topology="one-peer-exp", wire_dtype=wire,
                             bucket_cap_mb=n * 4 / 2**20, timeout=60)
    with torch.no_grad():  # after wrapping, which starts every rank from rank 0's parameters
        p.copy_(_start(rank, n))
        q.copy_(_start(rank, 7))
    for _ in range(rounds + 1):
        opt.step()
    # as numpy arrays: tensors would travel back through shared memory that dies with the worker
    return {"p": p.detach().numpy().copy(), "q": q.detach().numpy().copy(), "buckets": len(opt.buckets),
            "wait_s": opt.comm_stats.wait_s}


@pytest.mark.parametrize("wire", [None, torch.bfloat16])
def test_buckets_larger_than_a_piece_stream_to_the_same_bits(wire: torch.dtype | None) -> None:
    from decent_optim_wrapper.transport import PIECE

    n, rounds, world_size = 2 * PIECE + 12345, 3, 4  # three pieces, the last one short
    results = run_ranks(_streamed_rounds, world_size, n, wire, rounds, timeout=120)
    assert all(r["buckets"] == 2 for r in results)
    assert all(r["wait_s"] >= 0.0 for r in results)
    # the oracle: whole tensors in one process, each pair mixed as x/2 + y/2 (full precision) or, compressed,
    # x + 1/2 (Q(y) - Q(x)) with the difference formed in float32
    schedule = TopologyFactory.create("one-peer-exp", 0, world_size).schedule()
    for name, size in (("p", n), ("q", 7)):
        xs = [_start(r, size) for r in range(world_size)]
        for t in range(rounds):
            new = list(xs)
            for group in schedule.rounds[t % schedule.period]:
                a, b = group.ranks
                if wire is None:
                    new[a], new[b] = xs[a] * 0.5 + xs[b] * 0.5, xs[b] * 0.5 + xs[a] * 0.5
                else:
                    qa, qb = xs[a].to(wire).float(), xs[b].to(wire).float()
                    new[a], new[b] = xs[a] + 0.5 * (qb - qa), xs[b] + 0.5 * (qa - qb)
            xs = new
        for r in range(world_size):
            torch.testing.assert_close(torch.from_numpy(results[r][name]), xs[r], rtol=0, atol=0,
                                       msg=f"{name} rank {r}")
