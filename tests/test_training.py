"""Real training loops: checkpoint/resume bit for bit, AMP, clipping and accumulation, re-initialisation,
thawing, hooks and metrics; on several gloo ranks."""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from harness import CUDA, DEVICES, run_ranks

from decent_optim_wrapper import DecentOptimWrapper


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)  # data depends only on (rank, step)
    return torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)


def _train_steps(model: torch.nn.Module, opt: DecentOptimWrapper, rank: int, steps: range) -> None:
    device = next(model.parameters()).device
    for step in steps:
        x, y = (t.to(device) for t in _batch(rank, step))
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _make(rank: int, topology: str, device: str = "cpu") -> tuple[torch.nn.Module, DecentOptimWrapper]:
    model = _net(seed=rank).to(device)  # different initial values: the wrapper must broadcast rank 0's
    return model, DecentOptimWrapper(torch.optim.Adam(model.parameters(), lr=1e-2), topology=topology)


def _uninterrupted(rank: int, world_size: int, topology: str, total: int, device: str) -> list[list[float]]:
    model, opt = _make(rank, topology, device)
    _train_steps(model, opt, rank, range(total))
    return [p.detach().flatten().tolist() for p in model.parameters()]


def _first_half(rank: int, world_size: int, topology: str, stop: int, path: str, device: str) -> None:
    model, opt = _make(rank, topology, device)
    _train_steps(model, opt, rank, range(stop))
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, f"{path}/rank{rank}.pt")


def _second_half(rank: int, world_size: int, topology: str, stop: int, total: int, path: str,
                 load_model_first: bool, device: str) -> list[list[float]]:
    ckpt = torch.load(f"{path}/rank{rank}.pt", weights_only=True)
    model = _net(seed=99).to(device)  # a fresh model with other values
    if load_model_first:  # then the wrapper's construction broadcasts rank 0's values over it...
        model.load_state_dict(ckpt["model"])
    opt = DecentOptimWrapper(torch.optim.Adam(model.parameters(), lr=1e-2), topology=topology)
    if not load_model_first:
        model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optim"])  # ...and loading the wrapper's state restores this rank's own
    assert opt.round == stop
    _train_steps(model, opt, rank, range(stop, total))
    return [p.detach().flatten().tolist() for p in model.parameters()]


@pytest.mark.parametrize("topology,stop,load_model_first,device", [
    ("ring", 3, False, "cpu"), pytest.param("ring", 4, True, "cpu", marks=pytest.mark.slow),
    pytest.param("one-peer-exp", 5, False, "cpu", marks=pytest.mark.slow),
    pytest.param("complete", 2, True, "cpu", marks=pytest.mark.slow),
    pytest.param("ring", 3, False, "cuda", marks=CUDA), pytest.param("complete", 2, True, "cuda", marks=CUDA),
])
def test_resume_is_bit_for_bit(tmp_path: Path, topology: str, stop: int, load_model_first: bool, device: str) -> None:
    total = 8
    expected = run_ranks(_uninterrupted, 4, topology, total, device)
    run_ranks(_first_half, 4, topology, stop, str(tmp_path), device)
    resumed = run_ranks(_second_half, 4, topology, stop, total, str(tmp_path), load_model_first, device)
    assert resumed == expected
    assert expected[0] != expected[1] or topology == "complete"


def _load_mismatch(rank: int, world_size: int) -> list[str]:
    model, opt = _make(rank, "ring")
    _train_steps(model, opt, rank, range(2))
    sd = opt.state_dict()
    errors = []
    for other in ("complete", "one-peer-exp"):
        m2, o2 = _make(rank, other)
        try:
            o2.load_state_dict(sd)
        except ValueError as exc:
            errors.append(str(exc))
    plain = torch.optim.Adam(model.parameters(), lr=1e-2).state_dict()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.load_state_dict(plain)
    errors.append(str(caught[0].message) if caught else "no warning")
    errors.append(str(opt.round))
    return errors


def test_loading_a_state_dict_of_another_setup() -> None:
    errors = run_ranks(_load_mismatch, 2)[0]
    assert errors[0].startswith("Cannot load a state dict saved with topology 'ring'")
    # at world size 2, one-peer-exp is a single pair like ring's, but its period differs
    assert errors[1].startswith("Cannot load a state dict saved with topology 'ring'")
    assert "schedule restarts at round 0" in errors[2]
    assert errors[3] == "0"


def test_loading_a_state_dict_from_another_world_size() -> None:
    model = _net()
    opt = DecentOptimWrapper(torch.optim.Adam(model.parameters(), lr=1e-2))
    sd = opt.state_dict()
    sd["decent_optim_wrapper"]["world_size"] = 4
    with pytest.raises(ValueError, match=re.escape("saved with world_size=4 into a wrapper with world_size=1")):
        opt.load_state_dict(sd)


# ----------------------------------------------------------------------------- mixed precision
def _amp_loop(model: torch.nn.Module, opt: torch.optim.Optimizer, overflow_steps: set[int], rank: int,
              clip: float | None = None) -> tuple[list[torch.Tensor], list[float]]:
    device = next(model.parameters()).device
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**8)
    scales = []
    for step in range(6):
        x, y = (t.to(device) for t in _batch(rank, step))
        opt.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        if step in overflow_steps:
            next(model.parameters()).grad.view(-1)[0] = float("inf")
        if clip is not None:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    return [p.detach().clone() for p in model.parameters()], scales


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("clip", [None, 0.5])
def test_grad_scaler_world_size_one_equals_bare_optimizer(clip: float | None, device: str) -> None:
    bare, wrapped = _net().to(device), _net().to(device)
    expected, s1 = _amp_loop(bare, torch.optim.Adam(bare.parameters(), lr=1e-2), {2}, 0, clip)
    got, s2 = _amp_loop(wrapped, DecentOptimWrapper(torch.optim.Adam(wrapped.parameters(), lr=1e-2)), {2}, 0, clip)
    assert s1 == s2 and s1[2] == s1[1] / 2  # the overflow halved the scale
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def _amp_overflow_on_one_rank(rank: int, world_size: int, device: str) -> dict:
    model = _net().to(device)
    inner = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt = DecentOptimWrapper(inner, topology="ring", timeout=30)
    _, scales = _amp_loop(model, opt, {2} if rank == 1 else set(), rank)
    opt.global_avg()
    avg = [p.flatten().tolist() for p in model.parameters()]
    return {"scales": scales, "round": opt.round, "adam_steps": int(inner.state[model[0].weight]["step"]),
            "avg": avg, "finite": all(math.isfinite(v) for a in avg for v in a)}


@pytest.mark.parametrize("device", DEVICES)
def test_grad_scaler_overflow_on_one_rank_keeps_every_rank_in_the_round(device: str) -> None:
    results = run_ranks(_amp_overflow_on_one_rank, 4, device)
    assert [r["round"] for r in results] == [6] * 4, "every rank took part in every round"
    assert [r["adam_steps"] for r in results] == [6, 5, 6, 6], "only rank 1 skipped its local update"
    assert results[1]["scales"][2] == results[1]["scales"][1] / 2
    assert results[0]["scales"][2] == results[0]["scales"][1]
    assert all(r["finite"] for r in results)
    assert all(r["avg"] == results[0]["avg"] for r in results)


# ----------------------------------------------------------------------------- clipping and accumulation
def _accumulate(model: torch.nn.Module, opt: torch.optim.Optimizer, rank: int, k: int, steps: int) -> None:
    device = next(model.parameters()).device
    for step in range(steps):
        opt.zero_grad()
        for micro in range(k):
            x, y = (t.to(device) for t in _batch(rank, step * k + micro))
            (torch.nn.functional.mse_loss(model(x), y) / k).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.1)
        opt.step()


@pytest.mark.parametrize("device", DEVICES)
def test_accumulation_and_clipping_world_size_one_equals_bare(device: str) -> None:
    bare, wrapped = _net().to(device), _net().to(device)
    _accumulate(bare, torch.optim.SGD(bare.parameters(), lr=0.1, momentum=0.9), 0, 3, 4)
    _accumulate(wrapped, DecentOptimWrapper(torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9)), 0, 3, 4)
    for e, g in zip(bare.parameters(), wrapped.parameters()):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def _count_communication(rank: int, world_size: int, topology: str) -> dict:
    calls = {"p2p": 0, "all_reduce": 0}
    real_send, real_ar = dist.isend, dist.all_reduce

    def isend(*args, **kwargs):
        calls["p2p"] += 1
        return real_send(*args, **kwargs)

    def all_reduce(*args, **kwargs):
        calls["all_reduce"] += 1
        return real_ar(*args, **kwargs)

    model = _net()
    opt = DecentOptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), topology=topology, check_rounds=False)
    dist.isend, dist.all_reduce = isend, all_reduce
    try:
        _accumulate(model, opt, rank, 4, 5)
    finally:
        dist.isend, dist.all_reduce = real_send, real_ar
    return {"calls": calls, "rounds": opt.comm_stats.rounds, "buckets": len(opt.buckets)}


@pytest.mark.parametrize("topology,kind", [("ring", "p2p"), ("complete", "all_reduce")])
def test_communication_happens_once_per_step_not_per_micro_batch(topology: str, kind: str) -> None:
    for r in run_ranks(_count_communication, 4, topology):
        assert r["rounds"] == 5  # 5 steps of 4 micro-batches each
        assert r["calls"][kind] == 5 * r["buckets"]  # one send (p2p) or all-reduce per bucket and round


# ----------------------------------------------------------------------------- re-initialisation
def test_reinit_optimizer_from_config_keeps_buckets_and_round() -> None:
    model = _net()
    opt = DecentOptimWrapper(torch.optim.AdamW(model.parameters(), lr=1e-3))
    _train_steps(model, opt, 0, range(3))
    buckets = [b.flat for b in opt.buckets]
    sched = opt.reinit_optimizer(
        {"class_path": "torch.optim.SGD", "init_args": {"lr": 2e-3, "momentum": 0.9, "weight_decay": 2e-6}},
        lr_scheduler={"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 1, "gamma": 0.5}},
    )
    assert isinstance(opt.optimizer, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.9
    assert [b.flat for b in opt.buckets] == buckets and opt.round == 3
    _train_steps(model, opt, 0, range(3, 4))
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)
    assert opt.round == 4


def test_reinit_optimizer_with_per_group_lrs() -> None:
    model = _net()
    opt = DecentOptimWrapper(torch.optim.SGD([{"params": model[0].parameters()},
                                              {"params": model[2].parameters()}], lr=0.1))
    opt.reinit_optimizer({"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-5}}, init_pg_lrs=[1e-6, 2e-6])
    assert [g["lr"] for g in opt.param_groups] == [1e-6, 2e-6]


@pytest.mark.parametrize("config,scheduler,msg", [
    ({"class_path": "torch.optim.NoSuchOpt"}, None, "module 'torch.optim' has no class 'NoSuchOpt'"),
    ({"class_path": "nosuchpkg.Opt"}, None, "cannot import module 'nosuchpkg'"),
    ({"class_path": "torch.nn.Linear", "init_args": {}}, None, "Linear is not a torch.optim.Optimizer"),
    ({"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1, "momentum": -1}}, None, "Invalid optimizer init_args"),
    ({"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1, "mommentum": 0.9}}, None, "mommentum"),
    ({"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}, "extra": 1}, None, "unknown key(s) ['extra']"),
    ({"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}},
     {"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"gamma": 0.1}}, "step_size"),
    ({"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}},
     {"class_path": "torch.optim.SGD", "init_args": {}}, "SGD is not an LR scheduler"),
])
def test_bad_reinit_configs_leave_the_running_optimizer_untouched(config: dict, scheduler, msg: str) -> None:
    model = _net()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = DecentOptimWrapper(inner)
    _train_steps(model, opt, 0, range(2))
    before = opt.state_dict()
    with pytest.raises(ValueError, match=re.escape(msg)):
        opt.reinit_optimizer(config, lr_scheduler=scheduler)
    assert opt.optimizer is inner
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"] and after["state"].keys() == before["state"].keys()


def test_reinit_with_an_instance_over_foreign_parameters() -> None:
    model = _net()
    opt = DecentOptimWrapper(torch.optim.SGD(model[0].parameters(), lr=0.1))
    with pytest.raises(ValueError, match="2 of its parameters are not wrapped here"):
        opt.reinit_optimizer(torch.optim.SGD(model[2].parameters(), lr=0.1))


# ----------------------------------------------------------------------------- thawing, three phases
def _three_phases(rank: int, world_size: int, topology: str) -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
                                torch.nn.Linear(16, 3))
    backbone, block, head = model[0], model[2], model[4]
    for p in list(backbone.parameters()) + list(block.parameters()):
        p.requires_grad_(False)
    opt = DecentOptimWrapper(torch.optim.AdamW(head.parameters(), lr=1e-2), topology=topology, timeout=30)
    sent = []

    def train(steps: range) -> float:
        total = 0.0
        for step in steps:
            x, y = _batch(rank, step)
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            total += loss.item()
        sent.append(opt.comm_stats.bytes_sent)
        return total / len(steps)

    losses = [train(range(0, 10))]
    # phase 1: thaw the block, switch to SGD
    for p in block.parameters():
        p.requires_grad_(True)
    opt.add_param_group({"params": list(block.parameters())})
    opt.reinit_optimizer({"class_path": "torch.optim.SGD", "init_args": {"lr": 5e-2, "momentum": 0.9}})
    losses.append(train(range(10, 20)))
    # phase 2: thaw everything, AdamW with a new scheduler
    for p in backbone.parameters():
        p.requires_grad_(True)
    opt.add_param_group({"params": list(backbone.parameters())})
    sched = opt.reinit_optimizer({"class_path": "torch.optim.AdamW", "init_args": {"lr": 5e-3}},
                                 lr_scheduler={"class_path": "torch.optim.lr_scheduler.CosineAnnealingLR",
                                               "init_args": {"T_max": 10}})
    for step in range(20, 30):
        losses.append(train(range(step, step + 1)))
        sched.step()
    opt.global_avg()
    x, y = _batch(12345, 0)
    final = torch.nn.functional.mse_loss(model(x), y).item()
    return {"losses": losses, "final": final, "sent": sent, "groups": len(opt.param_groups),
            "consensus": opt.consensus_distance(), "backbone": backbone.weight.flatten().tolist()}


def test_three_phase_fine_tuning_on_four_ranks() -> None:
    ring = run_ranks(_three_phases, 4, "ring", timeout=120)
    full = run_ranks(_three_phases, 4, "complete", timeout=120)
    for runs in (ring, full):
        assert all(r["groups"] == 3 for r in runs)
        assert all(r["backbone"] == runs[0]["backbone"] for r in runs), "global_avg: every rank equal"
        assert all(r["consensus"] == 0.0 for r in runs)
        losses = runs[0]["losses"]
        assert losses[-1] < losses[0]
    # frozen layers cost nothing: phase 0 sends only the head (16*3+3 -> 64+32 padded float32s, 10 steps)
    assert ring[0]["sent"][0] == 10 * (64 + 32) * 4
    # the decentralized run ends close to the one that averages everything every step
    assert abs(ring[0]["final"] - full[0]["final"]) < 0.1 * full[0]["final"]


def _thaw_values(rank: int, world_size: int) -> list[float]:
    head = torch.nn.Linear(2, 2)
    frozen = torch.nn.Parameter(torch.zeros(4), requires_grad=False)
    opt = DecentOptimWrapper(torch.optim.SGD(list(head.parameters()) + [frozen], lr=0.0), topology="ring")
    with torch.no_grad():
        frozen.fill_(float(rank))
    opt.step()
    opt.step()
    seen = [frozen[0].item()]  # frozen: not averaged
    frozen.requires_grad_(True)
    opt.step()  # thawed now: this round averages it...
    opt.step()  # ...and this step applies that
    seen.append(frozen[0].item())
    return seen


def test_frozen_parameters_are_not_averaged_until_thawed() -> None:
    results = run_ranks(_thaw_values, 4)
    assert [r[0] for r in results] == [0.0, 1.0, 2.0, 3.0]
    # thawed at round 2 (even: pairs (0,1), (2,3))
    assert [r[1] for r in results] == [0.5, 0.5, 2.5, 2.5]


def _add_group_mismatch(rank: int, world_size: int) -> str:
    model = _net()
    opt = DecentOptimWrapper(torch.optim.SGD(model[0].parameters(), lr=0.1), topology="ring")
    extra = [model[2].weight] if rank == 0 else list(model[2].parameters())
    opt.add_param_group({"params": extra})
    return "added"


def test_add_param_group_must_agree_on_every_rank() -> None:
    results = run_ranks(_add_group_mismatch, 2, allow_failure=True)
    assert all("Ranks hold different parameter layouts while adding a parameter group" in str(r) for r in results)


# ----------------------------------------------------------------------------- hooks and metrics
class HookedSGD(torch.optim.SGD):
    def __init__(self, params, lr: float) -> None:
        super().__init__(params, lr=lr)
        self.calls: list[tuple[tuple[int, ...], float]] = []

    def pre_average_hook(self, group, weight: float) -> None:
        self.calls.append((group.ranks, weight))


def _hook_calls(rank: int, world_size: int) -> list:
    model = _net()
    inner = HookedSGD(model.parameters(), lr=0.1)
    opt = DecentOptimWrapper(inner, topology="ring")
    _train_steps(model, opt, rank, range(3))
    return inner.calls


def test_pre_average_hook_sees_each_rounds_group_and_weight() -> None:
    results = run_ranks(_hook_calls, 4)
    assert results[0] == [((0, 1), 0.5), ((0, 3), 0.5), ((0, 1), 0.5)]
    assert results[2] == [((2, 3), 0.5), ((1, 2), 0.5), ((2, 3), 0.5)]


def _consensus(rank: int, world_size: int) -> list[float]:
    p = torch.nn.Parameter(torch.zeros(10))
    opt = DecentOptimWrapper(torch.optim.SGD([p], lr=0.0), topology="ring")
    with torch.no_grad():
        p.fill_(float(rank))
    before = opt.consensus_distance()
    opt.global_avg()
    after = opt.consensus_distance()
    return [before, after]


def test_consensus_distance_is_exact_and_equal_on_every_rank() -> None:
    results = run_ranks(_consensus, 4)
    # mean 1.5; mean over ranks of 10 * (x - 1.5)^2 = 10 * 1.25
    assert all(r == [math.sqrt(12.5), 0.0] for r in results)


def _bn_buffers(rank: int, world_size: int) -> dict:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = DecentOptimWrapper(torch.optim.SGD(model.parameters(), lr=0.0), topology="ring")
    model[1].running_mean.fill_(float(rank))
    opt.global_avg(module=model)
    avg = model[1].running_mean.tolist()
    tracked = model[1].num_batches_tracked.item()
    opt.revert_global_avg()
    return {"avg": avg, "restored": model[1].running_mean.tolist(), "tracked": tracked}


def test_global_avg_with_module_averages_floating_buffers() -> None:
    results = run_ranks(_bn_buffers, 4)
    for rank, r in enumerate(results):
        assert r["avg"] == [1.5] * 4
        assert r["restored"] == [float(rank)] * 4
        assert r["tracked"] == 0  # integer buffers are left alone


def test_grad_scaler_step_when_no_parameter_has_a_gradient() -> None:
    p, other = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = DecentOptimWrapper(torch.optim.SGD([p], lr=0.1))
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(other.sum()).backward()  # the loss does not reach this optimizer's parameters
    scaler.step(opt)  # GradScaler hands over found_inf as a plain 0 here; the round still runs
    assert opt.round == 1 and p.tolist() == [1.0, 1.0, 1.0]
