"""The mixing arithmetic as pure functions: hand-computed values, and the invariants of compressed gossip
(the group's sum is kept, equal values are left alone) checked on whole schedules simulated in one process."""

from __future__ import annotations

import math

import pytest
import torch

from decent_optim_wrapper.mixing import (
    COMPRESSED_CHUNK,
    compressed_mix_,
    compressed_pair_mix_,
    group_mix_,
    group_mix_sent_,
    pair_mix_,
    pair_mix_sent_,
    quantize,
    scale_for_sum,
)
from decent_optim_wrapper.topo import Group, Schedule, TopologyFactory

LOCAL = {4: 2, 6: 2, 8: 4}


def test_pair_mix_by_hand() -> None:
    x, y = torch.tensor([1.0, 2.0, -4.0]), torch.tensor([3.0, 6.0, 4.0])
    assert pair_mix_(x.clone(), y, 0.5).tolist() == [2.0, 4.0, 0.0]
    assert pair_mix_(x.clone(), y, 0.75).tolist() == [1.5, 3.0, -2.0]  # 3/4 x + 1/4 y


def test_group_mix_by_hand() -> None:
    # uniform group of 4: the all-reduced sum of x_j/4 is the result, copied
    xs = [torch.tensor([float(4 * j)]) for j in range(4)]
    summed = sum(scale_for_sum(x, 0.25, torch.empty(1)) for x in xs)
    assert group_mix_(xs[0].clone(), summed, 0.25, 0.25).tolist() == [6.0]
    # weighted group of 3, self-weight 1/2, peers 1/4 each: x0 = 0, x1 = 4, x2 = 8 -> 1/2*0 + 1/4*(4+8) = 3
    xs = [torch.tensor([0.0]), torch.tensor([4.0]), torch.tensor([8.0])]
    summed = sum(scale_for_sum(x, 0.25, torch.empty(1)) for x in xs)
    assert group_mix_(xs[0].clone(), summed, 0.5, 0.25).tolist() == [3.0]
    assert group_mix_(xs[1].clone(), summed, 0.5, 0.25).tolist() == [4.0]  # 2 + 1/4 * 8


def test_uniform_pair_is_the_same_bits_either_way() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10_000, generator=g), torch.randn(10_000, generator=g)
    via_p2p = pair_mix_(x.clone(), y, 0.5)
    summed = scale_for_sum(x, 0.5, torch.empty_like(x)) + scale_for_sum(y, 0.5, torch.empty_like(y))
    via_allreduce = group_mix_(x.clone(), summed, 0.5, 0.5)
    assert torch.equal(via_p2p, via_allreduce)


def test_compressed_mix_by_hand() -> None:
    # bf16 has 8 significant bits: 1 + 2^-7 is representable, 1 + 2^-9 rounds to 1
    x = torch.tensor([1.0, 1.0 + 2**-9, 3.0])
    y = torch.tensor([1.0 + 2**-7, 1.0, 3.0 + 2**-12])
    qx, qy = quantize(x, torch.empty(3, dtype=torch.bfloat16)), quantize(y, torch.empty(3, dtype=torch.bfloat16))
    assert qx.tolist() == [1.0, 1.0, 3.0] and qy.tolist() == [1.0 + 2**-7, 1.0, 3.0]
    out = compressed_mix_(x.clone(), qx, [qx, qy], 0.5)
    # x += 1/2 (q_y - q_x): moves by half the quantised difference; equal quantised values leave x untouched
    assert out.tolist() == [1.0 + 2**-8, 1.0 + 2**-9, 3.0]


def test_quantize_saturates_values_beyond_the_wire_range_instead_of_making_inf() -> None:
    x = torch.tensor([70000.0, -1e6, 65519.0, 65520.0, 1.5, 3.4e38])
    q16 = quantize(x, torch.empty(6, dtype=torch.float16))
    assert q16.tolist() == [65504.0, -65504.0, 65504.0, 65504.0, 1.5, 65504.0]  # float16 ends at 65504
    q_bf = quantize(x, torch.empty(6, dtype=torch.bfloat16))
    top = torch.finfo(torch.bfloat16).max  # 3.4e38 rounds above it, within 0.2% of float32's maximum
    assert q_bf.tolist() == [70144.0, -999424.0, 65536.0, 65536.0, 1.5, top]
    # the same on a tensor of the wire's own width or narrower: nothing to saturate
    assert quantize(torch.tensor([1.0, 2.0], dtype=torch.float16), torch.empty(2, dtype=torch.float16)).tolist() \
        == [1.0, 2.0]


@pytest.mark.parametrize("wire", [torch.float16, torch.bfloat16])
def test_quantize_is_clamp_then_round_bit_for_bit(wire: torch.dtype) -> None:
    # the oracle saturates before rounding; quantize rounds first and clamps only where the rounded values
    # overflowed: the same bits for every value, specials included
    top = torch.finfo(wire).max
    g = torch.Generator().manual_seed(4)
    x = torch.randn(100_000, generator=g) * torch.logspace(0, 38.5, 100_000).clamp(max=3.4e38)
    x[:8] = torch.tensor([float("inf"), float("-inf"), float("nan"), top * 1.001, -top * 1.001, top, 0.0, -0.0])
    got = quantize(x, torch.empty(x.numel(), dtype=wire))
    want = x.clamp(-top, top).to(wire)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    assert torch.isfinite(got[torch.isfinite(x) | torch.isinf(x)]).all()


def test_pair_and_group_mix_of_what_was_sent_keep_a_write_and_the_bits() -> None:
    g = torch.Generator().manual_seed(2)
    sent, peer = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    # nothing written since the launch: the bits of the plain mix (the 0.1 arithmetic)
    assert torch.equal(pair_mix_sent_(sent.clone(), sent.clone(), peer, 0.5), pair_mix_(sent.clone(), peer, 0.5))
    summed = scale_for_sum(sent, 0.25, torch.empty(1000)) + scale_for_sum(peer, 0.75, torch.empty(1000))
    assert torch.equal(group_mix_sent_(sent.clone(), sent.clone(), summed, 0.25, 0.25),
                       group_mix_(sent.clone(), summed, 0.25, 0.25))
    # written since: by hand, x = [1, 2], sent [1, 4], peer [3, 8]: mix of what was sent (2, 6), plus x - sent
    x, s, y = torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0]), torch.tensor([3.0, 8.0])
    assert pair_mix_sent_(x.clone(), s.clone(), y, 0.5).tolist() == [2.0, 4.0]
    assert pair_mix_sent_(x.clone(), s.clone(), y, 0.75).tolist() == [1.5, 3.0]  # 3/4*[1,4] + 1/4*[3,8] - [0,2]
    # a weighted group: self-weight 1/2, peer weight 1/4: 1/2*s + summed - 1/4*s, summed = 1/4*(s + 8 + 12)
    summed = torch.tensor([(1.0 + 8 + 12) / 4, (4.0 + 8 + 12) / 4])
    assert group_mix_sent_(x.clone(), s.clone(), summed, 0.5, 0.25).tolist() == [5.5, 5.0]


def test_compressed_pair_mix_by_hand() -> None:
    x = torch.tensor([1.0, 1.0 + 2**-9, 3.0, -2.0])
    y = torch.tensor([1.0 + 2**-7, 1.0, 3.0 + 2**-12, 2.0 ** 20])
    qx, qy = x.to(torch.bfloat16), y.to(torch.bfloat16)
    out_x = compressed_pair_mix_(x.clone(), qx, qy, 0.5)
    out_y = compressed_pair_mix_(y.clone(), qy, qx, 0.5)
    assert out_x.tolist() == [1.0 + 2**-8, 1.0 + 2**-9, 3.0, -2.0 + (2.0**20 + 2.0) / 2]
    # the two corrections are each other's negation to the last bit: the pair's sum moves by the final roundings only
    assert ((out_x - x) + (out_y - y)).tolist() == [0.0, 0.0, 0.0, 0.0]
    # the same as the group form with k = 2 wherever the latter's sum is exact
    assert torch.equal(out_x, compressed_mix_(x.clone(), qx, [qx, qy], 0.5))


def test_compressed_mix_in_chunks_equals_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    import decent_optim_wrapper.mixing as mixing

    n = COMPRESSED_CHUNK + 1000  # crosses a chunk boundary
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(n, generator=g) for _ in range(3)]
    qs = [x.to(torch.bfloat16) for x in xs]
    chunked = compressed_mix_(xs[0].clone(), qs[0], qs, 1 / 3)
    monkeypatch.setattr(mixing, "COMPRESSED_CHUNK", 2 * n)
    whole = compressed_mix_(xs[0].clone(), qs[0], qs, 1 / 3)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=0)
    # and it is the formula: x + 1/3 (q0 + q1 + q2 - 3 q0), the sum formed exactly (in float64)
    s = qs[0].double() + qs[1].double() + qs[2].double() - 3 * qs[0].double()
    torch.testing.assert_close(whole, xs[0].clone().add_(s, alpha=1 / 3), rtol=0, atol=0)


def test_compressed_mixes_share_a_per_thread_scratch_and_stay_the_formula() -> None:
    """The CPU scratch is reused across calls (a fresh 1 MiB block per call cost page faults every round) and
    grows when needed; whatever the order of sizes, dtypes and threads, every result is the formula's."""
    import threading

    import decent_optim_wrapper.mixing as mixing

    g = torch.Generator().manual_seed(3)

    def case(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        xs = [torch.randn(n, generator=g) for _ in range(k)]
        qs = [x.to(torch.bfloat16) for x in xs]
        if k == 2:  # the pair kernel: q_peer - q_self in float32
            got = compressed_pair_mix_(xs[0].clone(), qs[0], qs[1], 0.25)
            want = xs[0].clone().add_(qs[1].float() - qs[0].float(), alpha=0.25)
        else:  # the group kernel: the sum in float64
            got = compressed_mix_(xs[0].clone(), qs[0], qs, 1 / k)
            want = xs[0].clone().add_(sum(q.double() for q in qs) - k * qs[0].double(), alpha=1 / k)
        return got, want

    sizes = [(1000, 2), (COMPRESSED_CHUNK + 7, 2), (10, 3), (3 * COMPRESSED_CHUNK, 3), (5, 2)]
    for n, k in sizes:
        got, want = case(n, k)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    a = mixing._scratch(100, torch.float32, torch.device("cpu"))
    b = mixing._scratch(COMPRESSED_CHUNK, torch.float32, torch.device("cpu"))
    assert a.data_ptr() == b.data_ptr()  # one block, reused
    other: list[int] = []
    worker = threading.Thread(target=lambda: other.append(
        mixing._scratch(100, torch.float32, torch.device("cpu")).data_ptr()))
    worker.start()
    worker.join()
    assert other[0] != a.data_ptr()  # a thread of its own gets a block of its own
    errors: list[BaseException] = []

    def mix_in_thread() -> None:
        try:
            for n, k in sizes:
                got, want = case(n, k)
                torch.testing.assert_close(got, want, rtol=0, atol=0)
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=mix_in_thread) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def _simulate(schedule: Schedule, xs: list[torch.Tensor], rounds: int, wire: torch.dtype,
              naive: bool = False) -> list[torch.Tensor]:
    """Every rank of ``schedule`` in one process, mixing with the package's kernels (or the naive rule)."""
    xs = [x.clone() for x in xs]
    for t in range(rounds):
        new = [x.clone() for x in xs]
        for group in schedule.rounds[t % schedule.period]:
            if group.size == 1:
                continue
            qs = [xs[r].to(wire) for r in group.ranks]
            for r, q in zip(group.ranks, qs):
                if naive:  # x_i <- w x_i + c sum_{j != i} Q(x_j)
                    others = sum(qq.float() for rr, qq in zip(group.ranks, qs) if rr != r)
                    new[r] = xs[r] * group.self_weight + others * group.peer_weight
                else:
                    compressed_mix_(new[r], q, qs, group.peer_weight)
        xs = new
    return xs


TOPOLOGIES = ["ring", "complete", "one-peer-exp", "alternating-exp-ring", "torus"]


def _ulp(x: float, bits: int) -> float:
    """The spacing of floats with ``bits`` significant bits at magnitude ``x``."""
    return 2.0 ** (math.floor(math.log2(x)) - bits + 1)


@pytest.mark.parametrize("world_size", [4, 6, 8])
@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_compressed_gossip_keeps_the_mean_and_reaches_the_floor(topology: str, world_size: int) -> None:
    schedule = TopologyFactory.create(topology, 0, world_size, LOCAL[world_size]).schedule()
    g = torch.Generator().manual_seed(world_size)
    xs = [torch.randn(1000, generator=g) + 0.1 * r for r in range(world_size)]
    rounds = 1000
    top = torch.stack(xs).abs().max().item()
    mean0 = torch.stack(xs).double().mean(0)
    out = _simulate(schedule, xs, rounds, torch.bfloat16)
    mean = torch.stack(out).double().mean(0)
    # float32 rounding: each round adds one rounding (at most half a float32 ulp) to each member
    bound = rounds * 0.5 * _ulp(top, 24)
    assert (mean - mean0).abs().max().item() <= bound
    # consensus down to the quantisation floor: every rank within one bfloat16 ulp of the mean (it started
    # about 1 away)
    spread = (torch.stack(out).double() - mean).abs().max().item()
    assert spread <= _ulp(top, 8)
    # the naive rule drifts the mean by bfloat16 rounding, far beyond the float32 bound (in fewer rounds)
    naive = torch.stack(_simulate(schedule, xs, 300, torch.bfloat16, naive=True)).double().mean(0)
    assert (naive - mean0).abs().max().item() > 10 * bound


def test_compressed_weighted_groups_keep_the_mean() -> None:
    schedule = Schedule(4, [[Group((0, 1), 0.75), Group((2, 3), 0.75)], [Group((0, 1, 2), 0.5), Group((3,))]])
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(500, generator=g) * 10 for _ in range(4)]
    rounds = 300
    out = _simulate(schedule, xs, rounds, torch.float16)
    drift = (torch.stack(out).double().mean(0) - torch.stack(xs).double().mean(0)).abs().max().item()
    assert drift <= rounds * 0.5 * _ulp(torch.stack(xs).abs().max().item(), 24)
