"""The plan (plan.py): how every round travels, written out by hand; the engine runs what it says, counts the
bytes it says, and the cost model prices the same routes."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from harness import run_ranks

from decent_optim_wrapper import DecentOptimWrapper, GossipConfig, LowRank
from decent_optim_wrapper.analysis import Network, predict_gossip
from decent_optim_wrapper.plan import Plan
from decent_optim_wrapper.topo import Group, TopologyFactory
from decent_optim_wrapper.transport import (
    AllGatherCompressed,
    AllReduceSum,
    LowRankEdges,
    P2PPair,
    P2PPairCompressed,
    P2PPairLowRank,
)

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
BF16 = GossipConfig(wire_dtype=torch.bfloat16)


@pytest.mark.parametrize("config,backend,device,size,kind,want", [
    # (transport, wire dtype, connections)
    (GossipConfig(), "gloo", CPU, 2, "full", (P2PPair, None, 2)),
    (GossipConfig(), "nccl", CUDA, 2, "full", (P2PPair, None, 1)),  # NCCL batches both ways
    (GossipConfig(), "gloo", CUDA, 2, "full", (AllReduceSum, None, 1)),  # gloo: no p2p for CUDA tensors
    (GossipConfig(pair_transport="allreduce"), "gloo", CPU, 2, "full", (AllReduceSum, None, 1)),
    (GossipConfig(), "gloo", CPU, 3, "full", (AllReduceSum, None, 1)),
    (BF16, "gloo", CPU, 2, "wire", (P2PPairCompressed, torch.bfloat16, 2)),
    (BF16, "gloo", CUDA, 2, "wire", (AllGatherCompressed, torch.bfloat16, 1)),
    (BF16, "gloo", CPU, 3, "wire", (AllGatherCompressed, torch.bfloat16, 1)),
    (BF16, "gloo", CPU, 4, "wire", (AllReduceSum, None, 1)),  # a float32 ring all-reduce sends less
    (GossipConfig(compression=LowRank(2)), "gloo", CPU, 2, "lowrank", (P2PPairLowRank, None, 2)),
    (GossipConfig(compression=LowRank(2)), "nccl", CUDA, 2, "lowrank", (P2PPairLowRank, None, 1)),
    (GossipConfig(compression=LowRank(2)), "gloo", CPU, 3, "lowrank", (LowRankEdges, None, 2)),  # edge by edge
    (GossipConfig(compression=LowRank(2)), "nccl", CUDA, 4, "lowrank", (LowRankEdges, None, 1)),
])
def test_routes_by_hand(config: GossipConfig, backend: str, device: torch.device, size: int, kind: str,
                        want: tuple) -> None:
    route = Plan(config, backend, device).route(Group(tuple(range(size))), kind)
    assert (route.transport, route.wire_dtype, route.connections) == want
    assert route.kind == kind and route.ranks == tuple(range(size))


def test_what_travels_how_and_what_cannot() -> None:
    plan = Plan(GossipConfig(wire_dtype=torch.bfloat16, compression=LowRank(rank=4)))
    assert plan.kinds() == ["full", "wire", "lowrank"]
    assert plan.kind(torch.float32) == "wire" and plan.kind(torch.bfloat16) == "full"  # not narrower: as is
    assert plan.kind(torch.float32, lowrank=True) == "lowrank"
    # a matrix travels as factors where 4 * max(rows, cols) < rows * cols; vectors never
    assert plan.lowrank(torch.empty(64, 32)) and plan.lowrank(torch.empty(16, 2, 3, 3))  # 16 x 18
    assert not plan.lowrank(torch.empty(64)) and not plan.lowrank(torch.empty(4, 100))  # 400 == 400
    assert not Plan().lowrank(torch.empty(64, 32))  # no compression
    assert "use NCCL" in str(Plan(plan.config, "gloo", CUDA).problem(Group((0, 1))))
    assert "use NCCL" in str(Plan(plan.config, "gloo", CUDA).problem(Group((0, 1, 2))))
    assert plan.problem(Group((0, 1))) is None and plan.problem(Group((0, 1, 2))) is None
    assert Plan().problem(Group((0, 1, 2))) is None
    with pytest.raises(ValueError, match="use NCCL"):
        Plan(plan.config, "gloo", CUDA).route(Group((0, 1, 2)), "lowrank")
    with pytest.raises(ValueError, match="Invalid kind='fp8'"):
        plan.route(Group((0, 1)), "fp8")


def test_bytes_of_a_round_by_hand() -> None:
    pair, trio, quad = Group((0, 1)), Group((0, 1, 2)), Group((0, 1, 2, 3))
    assert Plan().route(pair).bytes(100) == 400
    assert Plan().route(quad).bytes(100) == 600  # ring all-reduce: 2(k-1)/k
    assert Plan(BF16).route(pair, "wire").bytes(100) == 200
    assert Plan(BF16).route(trio, "wire").bytes(100) == 400  # all-gather: every other member's 2 bytes
    assert Plan(BF16).route(quad, "wire").bytes(100) == 600  # full precision: the route says so
    low = Plan(GossipConfig(compression=LowRank(rank=2)))
    # rank 2, a 40x24 matrix: 80 or 48 floats a round, sides taking turns
    assert low.route(pair, "lowrank").bytes(0, 4, [(40, 24)]) == (80 + 48) / 2 * 4
    # a larger group, edge by edge: as much to each of the k-1 other members
    assert low.route(quad, "lowrank").bytes(0, 4, [(40, 24)]) == 3 * (80 + 48) / 2 * 4


def test_process_groups_by_hand() -> None:
    ring3 = TopologyFactory.create("ring", 0, 3).schedule()  # pairs (0, 1), (1, 2), (0, 2), the third rank alone
    # point-to-point pairs on gloo: the world's control group, and the world's twin for the way back (one group,
    # asked for in every round's slot; prepare() creates it once)
    assert Plan().process_groups(ring3, 3) == [[((0, 1, 2), "control")]] + [[((0, 1, 2), "data-back")]] * 3
    # on NCCL, one connection: nothing but the control group
    assert Plan(backend="nccl", device=CUDA).process_groups(ring3, 3) == [[((0, 1, 2), "control")]]
    # all-reduce pairs: one data group per pair, pairs that share a rank in different slots (they are created
    # one slot at a time, every rank in step)
    assert Plan(GossipConfig(pair_transport="allreduce")).process_groups(ring3, 3) == [
        [((0, 1, 2), "control")], [((0, 1), "data")], [((1, 2), "data")], [((0, 2), "data")]]
    # a group of three with check_rounds: a control group of its own; without, none
    complete = TopologyFactory.create("complete", 0, 3).schedule()
    assert Plan().process_groups(complete, 3) == [[((0, 1, 2), "control")], [((0, 1, 2), "data")],
                                                  [((0, 1, 2), "control")]]
    assert Plan().process_groups(complete, 3, check_rounds=False) == [[((0, 1, 2), "control")],
                                                                      [((0, 1, 2), "data")]]


def _engine(rank: int, world_size: int, config: GossipConfig, steps: int) -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.Tanh(), torch.nn.Linear(40, 6))
    opt = DecentOptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), config=config)
    routes = {(ranks, kind): (type(t), t.wire_dtype, 1 if t.pg_back is None else 2)
              for (ranks, kind), t in opt.gossip._transports.items()}
    for step in range(steps):
        g = torch.Generator().manual_seed(10 * rank + step)
        opt.zero_grad()
        model(torch.randn(4, 24, generator=g)).square().mean().backward()
        opt.step()
    opt.finish()
    return {"routes": routes, "bytes": opt.comm_stats.bytes_sent, "rounds": opt.comm_stats.rounds}


@pytest.mark.parametrize("config", [
    GossipConfig(topology="ring"), pytest.param(GossipConfig(topology="ring", wire_dtype=torch.bfloat16),
                                                 marks=pytest.mark.slow),
    pytest.param(GossipConfig(topology="complete", wire_dtype=torch.bfloat16), marks=pytest.mark.slow),
    GossipConfig(topology="ring", pair_transport="allreduce"),
])
def test_the_engine_runs_and_counts_what_the_plan_says(config: GossipConfig) -> None:
    steps = 4
    out = run_ranks(_engine, 3, config, steps)
    plan = Plan(config)
    schedule = TopologyFactory.create(config.topology, 0, 3).schedule()  # type: ignore[arg-type]
    for rank, r in enumerate(out):
        groups = {schedule.group(rank, t) for t in range(schedule.period)}
        want = {(g.ranks, kind): (route.transport, route.wire_dtype, route.connections)
                for g in groups if g.size > 1 for kind in plan.kinds() for route in [plan.route(g, kind)]}
        assert r["routes"] == want
    # bytes: every round sends the one float32 bucket (24*40 + 40 + 40*6 + 6 parameters, each starting on a
    # 128-byte boundary: 960 + 64 + 256 + 32 floats) over the route of the rank's group that round
    flat = 960 + 64 + 256 + 32
    for rank, r in enumerate(out):
        expected = sum(plan.route(g, plan.kind(torch.float32)).bytes(flat) for t in range(steps)
                       for g in [schedule.group(rank, t)] if g.size > 1)
        moved = sum(schedule.group(rank, t).size > 1 for t in range(steps))  # ring of 3: one rank sits out a round
        assert r["bytes"] == int(expected) and r["rounds"] == moved


def test_a_plan_given_to_the_engine_is_what_runs() -> None:
    # the measurement of one connection against two (benchmarks/pairwise_exchange.py) goes through the plan
    out = run_ranks(_one_connection, 2)
    assert out == [(1, 2), (1, 2)]


def _one_connection(rank: int, world_size: int) -> tuple[int, int]:
    from decent_optim_wrapper.buckets import build_buckets
    from decent_optim_wrapper.comm import ProcessGroups
    from decent_optim_wrapper.gossip import Gossip
    from decent_optim_wrapper.topo import Schedule

    seen = []
    for one in (True, False):
        p = torch.nn.Parameter(torch.full((8,), float(rank)))
        config = GossipConfig()
        gossip = Gossip(Schedule(2, [[Group((0, 1))]]), rank, build_buckets([p], 1.0), ProcessGroups(None), config,
                        plan=dataclasses.replace(Plan(config), one_connection=one))
        transport = gossip._transports[(0, 1), "full"]
        seen.append(1 if transport.pg_back is None else 2)
        gossip.end_step()
        gossip.begin_step()
        assert torch.equal(p.detach(), torch.full((8,), 0.5))  # the pair's mean: the round ran
    return seen[0], seen[1]


def test_the_cost_model_prices_low_rank_delay_and_local_steps_by_hand() -> None:
    net = Network(bandwidth=10.0)
    # a ring of 4, 100 bytes of model, compute 1 s: the pair sends the model each round, 10 s of link
    assert predict_gossip("ring", 4, 100.0, 1.0, net, step_s=0.5) == 10.5
    # max_delay 2: rounds go back to back, the step no longer sits between them on the link
    assert predict_gossip("ring", 4, 100.0, 1.0, net, step_s=0.5, max_delay=2) == 10.0
    # gossip_every 4: one round per 4 steps, overlapping 4 computations: max(4 * 1, 10.5) / 4
    assert predict_gossip("ring", 4, 100.0, 1.0, net, step_s=0.5, gossip_every=4) == 10.5 / 4
    assert predict_gossip("ring", 4, 100.0, 5.0, net, gossip_every=4) == 5.0  # compute-bound: 20 / 4
    # LowRank(2) on a 4x5 matrix (80 of the 100 bytes): 2 * (4 + 5) / 2 floats = 36 bytes a round, plus the
    # other 20 bytes as they are: 56 bytes, 5.6 s
    assert predict_gossip("ring", 4, 100.0, 1.0, net, lowrank=(2, [(4, 5)])) == pytest.approx(5.6, rel=1e-15)
