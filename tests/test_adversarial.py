"""Misuse and faults, as a new user or a failing cluster produces them: every case must end in a clear error on
every rank within the timeout (or behave correctly); none may hang, abort or corrupt silently.

The table in README.md ("When something goes wrong") lists these cases and their outcomes.
"""

from __future__ import annotations

import copy
import math
import pickle
import re
import time

import pytest
import reference
import torch
import torch.distributed as dist
from harness import RankFailure, run_ranks

from decent_optim_wrapper import DecentOptimWrapper, GossipError
from decent_optim_wrapper.ddp import DecentralizedDataParallel

TIMEOUT = 1.5  # seconds a rank waits for its peers in these cases (their models are tiny, their steps take ms)


def _net(extra_layer: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)]
    if extra_layer:
        layers.append(torch.nn.Linear(2, 2))
    return torch.nn.Sequential(*layers)


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, rank: int, t: int) -> None:
    g = torch.Generator().manual_seed(100 * rank + t)
    opt.zero_grad()
    model(torch.randn(4, 4, generator=g)).square().mean().backward()
    opt.step()


def _outcome(fn, *args) -> str:
    """What a rank saw: 'ok: ...' or '<ExceptionType>: message' (a raw gloo error shows as RuntimeError)."""
    t0 = time.monotonic()
    try:
        out = fn(*args)
    except Exception as exc:  # every failure is a finding: its type and message are asserted
        return f"{type(exc).__name__}: {exc} [{time.monotonic() - t0:.1f}s]"
    return f"ok: {out}"


def _assert_every_rank(results: list, expected: dict[int, tuple[str, str]] | tuple[str, str]) -> None:
    for rank, r in enumerate(results):
        kind, text = expected[rank] if isinstance(expected, dict) else expected
        assert not isinstance(r, RankFailure), f"rank {rank} crashed: {r}"
        assert r.startswith(kind + ":"), f"rank {rank}: {r}"
        assert re.search(text, r), f"rank {rank}: {r}"


# ----------------------------------------------------------------------------- collectives that do not line up
def _one_rank_alone(rank: int, world_size: int, topology: str, what: str) -> str:
    model = _net()
    opt = DecentOptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), topology=topology, timeout=TIMEOUT)

    def run() -> None:
        for t in range(6):
            _step(model, opt, rank, t)
            if rank == 0 and t == 2:
                if what == "global_avg":
                    opt.global_avg()
                    opt.revert_global_avg()
                elif what == "consensus_distance":
                    opt.consensus_distance()
                elif what == "reduce_metrics":
                    opt.reduce_metrics({"loss": 1.0})
        if not (rank == 0 and what == "skip_last_step"):
            _step(model, opt, rank, 6)
        opt.global_avg()

    return _outcome(run)


def _slow_unless(*fast: tuple[str, int, str]) -> list:
    """Every (topology, world size, what): most wait out the 1.5 s timeout somewhere, so the fast lane keeps a
    skipped step, and the rest run in the full suite."""
    cases = [(t, n, w) for t, n in [("complete", 3), ("ring", 4), ("one-peer-exp", 4)]
             for w in ["global_avg", "consensus_distance", "reduce_metrics", "skip_last_step"]]
    return [pytest.param(*c, marks=() if c in fast else pytest.mark.slow) for c in cases]


@pytest.mark.parametrize("topology,world_size,what", _slow_unless(("ring", 4, "skip_last_step")))
def test_a_rank_doing_something_else_fails_every_rank_cleanly(topology: str, world_size: int, what: str) -> None:
    # Before the control plane, complete at 3 ranks aborted a rank with SIGABRT (gloo's size check) here. Every
    # rank fails with a message of the stamps or of its own 1.5 s timeout (the process group's is 120 s: the harness's
    # 60 s bound would fail the test first, so no wall-clock check is needed on top).
    results = run_ranks(_one_rank_alone, world_size, topology, what, timeout=60, pg_timeout_s=120)
    _assert_every_rank(results, ("GossipError", r"did (a gossip round|a global operation)|did not complete within "
                                                r"1.5 s|out of step"))


def _different_bucket_order(rank: int, world_size: int) -> str:
    a, b = torch.nn.Parameter(torch.zeros(8)), torch.nn.Parameter(torch.zeros(8))
    oa = DecentOptimWrapper(torch.optim.SGD([a], lr=0.0), topology="complete", timeout=TIMEOUT)
    ob = DecentOptimWrapper(torch.optim.SGD([b], lr=0.0), topology="complete", timeout=TIMEOUT)
    order = [oa, ob] if rank != 1 else [ob, oa]  # rank 1 launches its buckets the other way round

    def run() -> None:
        for _ in range(3):
            for o in order:
                o.step()

    return _outcome(run)


def test_buckets_averaged_in_different_orders_are_caught_not_mixed() -> None:
    # Same sizes, so nothing but the stamp's fingerprint of the buckets tells them apart.
    results = run_ranks(_different_bucket_order, 3, timeout=60)
    _assert_every_rank(results, ("GossipError", "averaged different buckets"))


def _add_group_alone(rank: int, world_size: int) -> str:
    model = _net()
    opt = DecentOptimWrapper(torch.optim.SGD(model[0].parameters(), lr=0.1), topology="ring", timeout=TIMEOUT)

    def run() -> None:
        for t in range(4):
            _step(model, opt, rank, t)
            if rank == 1 and t == 1:
                opt.add_param_group({"params": list(model[2].parameters())})

    return _outcome(run)


def test_add_param_group_on_one_rank_fails_every_rank_cleanly() -> None:
    results = run_ranks(_add_group_alone, 2, timeout=60)
    _assert_every_rank(results, ("GossipError", r"did (a gossip round|a layout agreement)|did not complete"))


# ----------------------------------------------------------------------------- faults
def _one_rank_raises(rank: int, world_size: int) -> str:
    model = _net()
    opt = DecentOptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), topology="ring", timeout=TIMEOUT)

    def run() -> None:
        for t in range(8):
            if rank == 2 and t == 3:
                raise KeyError("a bug in the user's data loader")
            _step(model, opt, rank, t)
        opt.global_avg()

    return _outcome(run)


def test_a_rank_that_raises_makes_its_peers_fail_within_the_timeout() -> None:
    results = run_ranks(_one_rank_raises, 4, timeout=60, pg_timeout_s=120)
    assert results[2].startswith("KeyError")
    for rank in (0, 1, 3):  # the 1.5 s timeout of the wrapper, not the process group's 120 s
        assert results[rank].startswith("GossipError:") and "within 1.5 s" in results[rank], results[rank]


def _hung_with_tiny_timeout(rank: int, world_size: int) -> str:
    model = _net()
    opt = DecentOptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), topology="ring", timeout=0.0004)

    def run() -> None:
        _step(model, opt, rank, 0)
        # Both ranks have launched round 0 before rank 0 goes on: otherwise rank 0 may time out and exit while
        # rank 1 is still in its first step (torch's first optimizer step imports for seconds), and rank 1's
        # send then fails on the closed connection instead of rank 1 returning.
        dist.barrier()
        if rank == 1:
            time.sleep(2)  # far longer than the 1 ms rank 0 waits for it
            return
        _step(model, opt, rank, 1)
        _step(model, opt, rank, 2)

    return _outcome(run)


def test_a_sub_millisecond_timeout_is_honoured_not_replaced() -> None:
    # 0.4 ms rounds up to gloo's 1 ms resolution; it used to become the process group's 20 s
    results = run_ranks(_hung_with_tiny_timeout, 2, timeout=60, pg_timeout_s=20)
    assert "within 0.001 s" in results[0], results[0]  # the wait that failed had the 1 ms timeout, not 20 s
    assert results[1].startswith("ok")


def _nan_on_one_rank(rank: int, world_size: int, check: bool) -> str:
    model = _net()
    opt = DecentOptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), topology="ring", timeout=TIMEOUT,
                             check_finite=check)

    def run() -> float:
        for t in range(6):
            g = torch.Generator().manual_seed(100 * rank + t)
            opt.zero_grad()
            model(torch.randn(4, 4, generator=g)).square().mean().backward()
            if rank == 3 and t == 2:
                model[0].weight.grad[0, 0] = float("inf")  # a bad gradient: the local update goes non-finite
            opt.step()
        return float(sum(p.detach().sum() for p in model.parameters()))

    return _outcome(run)


def test_non_finite_parameters_are_stopped_at_their_source_with_check_finite() -> None:
    results = run_ranks(_nan_on_one_rank, 4, True, timeout=60)
    assert results[3].startswith("FloatingPointError: rank 3: non-finite"), results[3]
    for rank in (0, 1, 2):
        r = results[rank]
        assert r.startswith("GossipError:") and ("rank 3 failed: it has non-finite" in r or "did not complete" in r), r
    assert "rank 3 failed: it has non-finite" in results[2]  # rank 3's peer in the next round names it


def _nan_from_a_peer(rank: int, world_size: int) -> str:
    # rank 1 does not check (check_finite is a rank's own choice); rank 0 does, and receives rank 1's NaN
    p = torch.nn.Parameter(torch.ones(4))
    opt = DecentOptimWrapper(torch.optim.SGD([p], lr=0.1), topology="ring", timeout=TIMEOUT,
                             check_finite=rank == 0)

    def run() -> None:
        for t in range(3):
            p.grad = torch.ones(4)
            opt.step()
            if rank == 1 and t == 0:
                with torch.no_grad():
                    p[2] = float("nan")  # reaches rank 0 with round 1
        opt.finish()

    return _outcome(run)


def test_check_finite_blames_the_mix_when_the_values_came_from_a_peer() -> None:
    results = run_ranks(_nan_from_a_peer, 2, timeout=60)
    assert results[0].startswith("FloatingPointError: rank 0: non-finite (inf/NaN) parameters after mixing in the "
                                 "averaging of round 1;"), results[0]
    assert "rank 0 failed: it has non-finite" in results[1], results[1]


def _float16_beyond_range(rank: int, world_size: int) -> torch.Tensor:
    p = torch.nn.Parameter(torch.zeros(3))
    opt = DecentOptimWrapper(torch.optim.SGD([p], lr=0.1), topology="ring", wire_dtype=torch.float16)
    with torch.no_grad():  # beyond float16's 65504: on both ranks, on one rank only, and an ordinary value
        p.copy_(torch.tensor([70000.0, 70000.0 if rank == 0 else 0.0, 1.0 + 2 * rank]))
    for _ in range(3):
        opt.step()  # no gradient: only the rounds move the values
    opt.finish()
    return p.detach().clone()


def test_a_float16_wire_never_turns_values_beyond_its_range_into_nan() -> None:
    r0, r1 = run_ranks(_float16_beyond_range, 2)
    assert torch.isfinite(r0).all() and torch.isfinite(r1).all(), (r0, r1)
    assert r0[0] == r1[0] == 70000.0  # equal values saturate alike: their correction is exactly zero
    assert (r0 + r1).tolist() == [140000.0, 70000.0, 4.0]  # the corrections cancel: the sum is kept
    assert r0[2] == r1[2] == 2.0 and abs(float(r0[1] - r1[1])) < 100  # and the pair still mixes


def test_without_check_finite_nan_spreads_to_every_rank() -> None:
    # documented behaviour: gossip carries the non-finite values to the peers within a few rounds
    for r in run_ranks(_nan_on_one_rank, 4, False, timeout=60):
        assert r.startswith("ok:") and not math.isfinite(float(r[4:]))


# ----------------------------------------------------------------------------- writes between two steps
# Each case: (topology, world size, pair_transport, wire dtype), and the schedule written out from the topology's
# definition (README's table), not taken from the package: the groups of each round, in order.
WRITE_CASES = {
    "ring-p2p": ("ring", 4, "p2p", None, [[(0, 1), (2, 3)], [(1, 2), (0, 3)]]),
    "ring-allreduce": ("ring", 4, "allreduce", None, [[(0, 1), (2, 3)], [(1, 2), (0, 3)]]),
    "complete": ("complete", 4, "auto", None, [[(0, 1, 2, 3)]]),
    "ring-bf16": ("ring", 4, "auto", torch.bfloat16, [[(0, 1), (2, 3)], [(1, 2), (0, 3)]]),
    "complete3-bf16": ("complete", 3, "auto", torch.bfloat16, [[(0, 1, 2)]]),
}
WRITE_STEPS, WRITE_AT, LR = 4, 1, 0.5


def _start(rank: int, n: int) -> torch.Tensor:
    return torch.arange(float(n)) / 4 + 8 * rank  # dyadic values: sums and halves are exact in float32


def _write(p: torch.Tensor, how: str) -> None:
    if how == "p.data":  # WGAN weight clipping, EMA written back: no version counter sees it
        for chunk in p.data.split(1 << 18):  # chunk by chunk, while the round sends the parameter
            chunk.add_(100.0)
    else:
        with torch.no_grad():
            p.add_(100.0)


def _writes_between_steps(rank: int, world_size: int, case: str, how: str, n: int) -> torch.Tensor:
    topology, _, pair_transport, wire, _ = WRITE_CASES[case]
    p = torch.nn.Parameter(torch.zeros(n))
    opt = DecentOptimWrapper(torch.optim.SGD([p], lr=LR), topology=topology, pair_transport=pair_transport,
                             wire_dtype=wire, timeout=30)
    with torch.no_grad():
        p.copy_(_start(rank, n))
    for t in range(WRITE_STEPS):
        p.grad = torch.full((n,), float(rank + 1))  # the gradients differ between ranks, the lr is not 0
        opt.step()
        if rank == 1 and t == WRITE_AT:
            _write(p, how)  # while round WRITE_AT is in flight
    opt.finish()
    return p.detach().clone()  # a tensor: run_local sends results by value


def _reference_with_write(case: str, n: int, write: bool = True) -> list[torch.Tensor]:
    """The reference's D-PSGD from the schedule written above: the values sent are copies, so a write changes
    only the writer, and it survives."""
    _, world, _, wire, rounds = WRITE_CASES[case]

    def writes(t: int, x: list[torch.Tensor]) -> list[torch.Tensor]:
        if t == WRITE_AT and write:
            x[1] = x[1] + 100.0
        return x

    return reference.train(reference.groups_of(rounds), [_start(r, n) for r in range(world)], WRITE_STEPS,
                           lambda r, t, x: x - LR * (r + 1), wire, writes)


@pytest.mark.parametrize("how", ["p.data", pytest.param("no_grad", marks=pytest.mark.slow)])
@pytest.mark.parametrize("case", sorted(WRITE_CASES))
def test_a_write_between_two_steps_survives_and_peers_mix_what_was_sent(case: str, how: str) -> None:
    n = 40
    got = run_ranks(_writes_between_steps, WRITE_CASES[case][1], case, how, n, timeout=90)
    expected = _reference_with_write(case, n)
    for rank, (g, e) in enumerate(zip(got, expected)):
        if case == "complete3-bf16":  # a third is not exact in binary: the mean of three rounds once
            torch.testing.assert_close(g.double(), e, rtol=1e-6, atol=0)
        else:
            assert torch.equal(g.double(), e), f"rank {rank}"
    # the write of +100 is in the sum over the ranks (a round moves values between ranks, it keeps their sum)
    without = _reference_with_write(case, n, write=False)
    assert float(sum(g[0] for g in got) - sum(w[0] for w in without)) == pytest.approx(100.0, rel=1e-6)


def test_a_large_parameter_written_chunk_by_chunk_while_being_sent_reaches_the_peer_whole() -> None:
    # 2^21 elements: four pieces of a point-to-point round, the write runs while they are on the wire
    n = 1 << 21
    got = run_ranks(_writes_between_steps, 4, "ring-p2p", "p.data", n, timeout=120)
    expected = _reference_with_write("ring-p2p", n)
    for rank in range(4):
        assert torch.equal(got[rank].double(), expected[rank]), f"rank {rank}"


# ----------------------------------------------------------------------------- the model changed under the wrapper
def _replaced_storage(rank: int, world_size: int, how: str) -> str:
    model = _net()
    opt = DecentOptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), topology="ring", timeout=TIMEOUT)

    def run() -> None:
        for t in range(4):
            if t == 2:
                if how == "double":
                    model.double()  # every rank
                elif how == "p.data" and rank == 1:
                    model[2].bias.data = model[2].bias.data.clone()
                elif how == "to_empty":
                    model.to_empty(device="cpu")
            _step(model, opt, rank, t) if how != "double" else _step_double(model, opt, rank, t)

    return _outcome(run)


def _step_double(model: torch.nn.Module, opt: torch.optim.Optimizer, rank: int, t: int) -> None:
    dtype = next(model.parameters()).dtype
    opt.zero_grad()
    model(torch.randn(4, 4, dtype=dtype)).square().mean().backward()
    opt.step()


@pytest.mark.parametrize("how", ["double", "p.data", "to_empty"])
def test_parameters_that_left_their_bucket_raise_instead_of_silently_not_averaging(how: str) -> None:
    results = run_ranks(_replaced_storage, 2, how, timeout=60)
    if how == "p.data":  # only rank 1 did it: it names the parameter, its peer names rank 1
        _assert_every_rank(results, {1: ("ValueError", r"param_groups\[0\]\['params'\]\[3\] .* no longer a view"),
                                     0: ("GossipError", "rank 1 failed: its parameters are no longer views")})
    else:
        _assert_every_rank(results, ("ValueError", r"no longer a view into its bucket"))


def test_meta_parameters_are_rejected_at_construction() -> None:
    with torch.device("meta"):
        model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="on the meta device: it has no values to average"):
        DecentOptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))


# ----------------------------------------------------------------------------- construction disagreements
def _one_rank_bad_argument(rank: int, world_size: int) -> str:
    return _outcome(lambda: DecentOptimWrapper(torch.optim.SGD(_net().parameters(), lr=0.1), topology="ring",
                                               bucket_cap_mb=-1 if rank == 1 else 25))


def test_a_bad_argument_on_one_rank_raises_the_same_value_error_everywhere() -> None:
    results = run_ranks(_one_rank_bad_argument, 3, timeout=60)
    _assert_every_rank(results, {0: ("ValueError", r"rank 1 failed while constructing .* bucket_cap_mb=-1"),
                                 1: ("ValueError", r"^ValueError: Invalid bucket_cap_mb=-1"),
                                 2: ("ValueError", r"rank 1 failed while constructing .* bucket_cap_mb=-1")})


def _ddp_other_model(rank: int, world_size: int) -> str:
    return _outcome(lambda: DecentralizedDataParallel(
        _net(extra_layer=rank == 1), lambda ps: torch.optim.SGD([p for _, p in ps], lr=0.1), bucket_size_in_mb=1e-5,
        timeout=TIMEOUT))


def test_ddp_ranks_with_different_models_raise_the_same_value_error() -> None:
    _assert_every_rank(run_ranks(_ddp_other_model, 2, timeout=60), ("ValueError", "hold different models"))


def _ddp_optim_fn_fails_on_one_rank(rank: int, world_size: int) -> str:
    def optim_fn(params):
        if rank == 0:
            raise TypeError("lr must be a float")
        return torch.optim.SGD([p for _, p in params], lr=0.1)

    return _outcome(lambda: DecentralizedDataParallel(_net(), optim_fn, timeout=TIMEOUT))


def test_ddp_optim_fn_failing_on_one_rank_raises_everywhere() -> None:
    _assert_every_rank(run_ranks(_ddp_optim_fn_fails_on_one_rank, 2, timeout=60),
                       ("ValueError", "optim_fn: it raised TypeError: lr must be a float"))


# ----------------------------------------------------------------------------- state dicts and copies
@pytest.mark.parametrize("mutate,msg", [
    (lambda own: own.pop("round"), "missing ['round']"),
    (lambda own: own.update(round=-1), "['round']=-1. Must be an integer >= 0"),
    (lambda own: own.update(round="3"), "['round']='3'. Must be an integer >= 0"),
    (lambda own: own.update(pending="yes"), "['pending']='yes'. Must be a bool"),
    (lambda own: own.update(buckets=[torch.zeros(3)]), "['buckets']: they differ from this wrapper's"),
    (lambda own: own.update(buckets="x"), "['buckets']: they differ from this wrapper's"),
])
def test_a_corrupt_state_dict_raises_value_error_naming_the_field(mutate, msg: str) -> None:
    model = _net()
    opt = DecentOptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    sd = opt.state_dict()
    mutate(sd["decent_optim_wrapper"])
    with pytest.raises(ValueError, match=re.escape(msg)):
        opt.load_state_dict(sd)
    sd["decent_optim_wrapper"] = "garbage"
    with pytest.raises(ValueError, match="Must be the dict state_dict"):
        opt.load_state_dict(sd)
    with pytest.raises(ValueError, match="Invalid state_dict of type list"):
        opt.load_state_dict([])  # type: ignore[arg-type]


def test_copying_or_pickling_the_wrapper_says_why_not() -> None:
    opt = DecentOptimWrapper(torch.optim.SGD(_net().parameters(), lr=0.1))
    for attempt in (lambda: copy.deepcopy(opt), lambda: pickle.dumps(opt), lambda: copy.copy(opt)):
        with pytest.raises(TypeError, match=r"cannot be copied or pickled.*state_dict\(\)"):
            attempt()
    copy.deepcopy(opt.state_dict())  # what to copy instead works


def _checkpoint_inside_global_avg(rank: int, world_size: int, path: str, mode: str) -> list:
    model = _net()
    opt = DecentOptimWrapper(torch.optim.Adam(model.parameters(), lr=1e-2), topology="ring")
    if mode == "resume":
        ckpt = torch.load(f"{path}/rank{rank}.pt", weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optim"])
        steps = range(5, 9)
    else:
        steps = range(9)
    for t in steps:
        _step(model, opt, rank, t)
        if mode == "save" and t == 4:
            opt.global_avg()  # evaluate the average, save, revert: the checkpoint is the run revert restores
            torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, f"{path}/rank{rank}.pt")
            opt.revert_global_avg()
    opt.finish()
    return [p.detach().flatten().tolist() for p in model.parameters()]


def test_a_checkpoint_taken_between_global_avg_and_revert_resumes_bit_for_bit(tmp_path) -> None:
    uninterrupted = run_ranks(_checkpoint_inside_global_avg, 4, str(tmp_path), "save")
    resumed = run_ranks(_checkpoint_inside_global_avg, 4, str(tmp_path), "resume")
    assert resumed == uninterrupted
    assert uninterrupted[0] != uninterrupted[2]  # ring workers are not in consensus: the test can tell


def _finish(rank: int, world_size: int) -> tuple:
    p = torch.nn.Parameter(torch.zeros(4))
    opt = DecentOptimWrapper(torch.optim.SGD([p], lr=0.0), topology="ring")
    with torch.no_grad():
        p.fill_(float(rank))
    opt.step()  # launches round 0: pairs (0,1), (2,3)
    opt.finish()
    return p[0].item(), opt.gossip.pending, dist.get_world_size()


def test_finish_applies_the_round_in_flight() -> None:
    assert [r[:2] for r in run_ranks(_finish, 4)] == [(0.5, False), (0.5, False), (2.5, False), (2.5, False)]


def test_gossip_error_is_importable_from_the_package() -> None:
    assert issubclass(GossipError, RuntimeError)
