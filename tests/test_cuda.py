"""The CUDA path, on a GPU: a step that never makes the host wait for the device, AMP with real float16
overflow, a torch.compile'd model, NCCL at world size 1, and several gloo ranks sharing one GPU.

Multi-rank NCCL needs one GPU per rank, which a single-GPU machine cannot give; those paths (NCCL point to
point, NCCL subgroups) are not exercised here. Every test here is skipped without CUDA.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from harness import CUDA, run_ranks

from decent_optim_wrapper import DecentOptimWrapper

pytestmark = CUDA


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).cuda()


def _syncs_during(fn) -> list[str]:
    """Run ``fn`` with torch's CUDA sync debug mode and return the synchronising calls this thread made."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return [str(w.message) for w in caught if "synchroniz" in str(w.message)]


def _nccl_world_of_one(rank: int, world_size: int, fused: bool, amp: bool) -> dict:
    bare_model, model = _mlp(), _mlp()
    kw = {"fused": True} if fused else {"foreach": True}
    bare = torch.optim.AdamW(bare_model.parameters(), lr=1e-2, **kw)
    opt = DecentOptimWrapper(torch.optim.AdamW(model.parameters(), lr=1e-2, **kw), topology="ring")
    syncs: list[str] = []
    for m, o in ((bare_model, bare), (model, opt)):
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0**20) if amp else None
        g = torch.Generator().manual_seed(3)
        for _ in range(6):
            x = torch.randn(16, 32, generator=g).cuda()
            o.zero_grad()
            with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
                loss = m(x).square().mean()
            if scaler is None:
                loss.backward()
                found = _syncs_during(o.step)
            else:
                scaler.scale(loss).backward()
                found = _syncs_during(lambda o=o, s=scaler: s.step(o))
                scaler.update()
            if o is opt:
                syncs += found
    return {"equal": all(torch.equal(a, b) for a, b in zip(bare_model.parameters(), model.parameters())),
            "syncs": syncs}


@pytest.mark.parametrize("fused,amp", [(False, False), (True, False), (True, True)])
def test_nccl_world_of_one_equals_bare_and_step_never_waits_for_the_gpu(fused: bool, amp: bool) -> None:
    # fused optimizers skip an overflowed step on the device; a non-fused one under GradScaler needs the inf
    # flag on the host (GradScaler itself synchronises for such optimizers), so it is not in this list.
    [r] = run_ranks(_nccl_world_of_one, 1, fused, amp, backend="nccl")
    assert r["equal"]
    assert r["syncs"] == []


def _gloo_cuda_step_syncs(rank: int, world_size: int, topology: str, wire: torch.dtype | None) -> dict:
    model = _mlp()
    opt = DecentOptimWrapper(torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True), topology=topology,
                             wire_dtype=wire, timeout=60)
    syncs = []
    g = torch.Generator().manual_seed(rank)
    for _ in range(5):
        opt.zero_grad()
        model(torch.randn(16, 32, generator=g).cuda()).square().mean().backward()
        syncs += _syncs_during(opt.step)  # waits for the round (gloo works on the host), launches the next
    opt.global_avg()
    return {"syncs": syncs, "avg": [p.detach().cpu().tolist() for p in model.parameters()],
            "sent": opt.comm_stats.bytes_sent}


@pytest.mark.parametrize("topology,wire", [("ring", None), ("complete", None), ("ring", torch.bfloat16),
                                           ("complete", torch.bfloat16)])
def test_gloo_ranks_on_one_gpu_step_without_synchronising(topology: str, wire: torch.dtype | None) -> None:
    results = run_ranks(_gloo_cuda_step_syncs, 4, topology, wire, timeout=180)
    for r in results:
        assert r["syncs"] == [], r["syncs"]
        assert r["avg"] == results[0]["avg"]
        assert r["sent"] > 0


def _amp_real_overflow(fused: bool) -> tuple[bool, list[float], int]:
    """Float16 autocast with a loss scale so large that the first backward passes overflow for real."""
    results = []
    for wrap in (False, True):
        model = _mlp()
        inner = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused)
        opt = DecentOptimWrapper(inner) if wrap else inner
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0**40, growth_interval=3)
        g = torch.Generator().manual_seed(0)
        scales, skipped = [], 0
        for _ in range(20):
            x = torch.randn(16, 32, generator=g).cuda() * 100
            opt.zero_grad()
            with torch.autocast("cuda", dtype=torch.float16):
                loss = model(x).square().mean()
            scaler.scale(loss).backward()
            before = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            skipped += scaler.get_scale() < before
            scales.append(scaler.get_scale())
        results.append(([p.detach().clone() for p in model.parameters()], scales, skipped))
    (p1, s1, k1), (p2, s2, k2) = results
    return all(torch.equal(a, b) for a, b in zip(p1, p2)) and s1 == s2, s2, k2


@pytest.mark.parametrize("fused", [False, True])
def test_amp_with_real_float16_overflow_equals_the_bare_optimizer(fused: bool) -> None:
    equal, scales, skipped = _amp_real_overflow(fused)
    assert skipped >= 5, "the loss scale must really overflow float16 several times"
    assert equal, scales


def test_compiled_model_under_the_wrapper_equals_the_bare_optimizer() -> None:
    outs = []
    for wrap in (False, True):
        model = _mlp()
        compiled = torch.compile(model)
        inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
        opt = DecentOptimWrapper(inner) if wrap else inner
        g = torch.Generator().manual_seed(1)
        for _ in range(6):
            x = torch.randn(16, 32, generator=g).cuda()
            opt.zero_grad()
            compiled(x).square().mean().backward()
            opt.step()
        outs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def _compiled_on_ranks(rank: int, world_size: int) -> list:
    model = _mlp()
    opt = DecentOptimWrapper(torch.optim.AdamW(model.parameters(), lr=1e-2), topology="ring", timeout=120)
    compiled = torch.compile(model)  # compiled after wrapping: the parameters are views into the buckets
    g = torch.Generator().manual_seed(rank)
    for _ in range(4):
        opt.zero_grad()
        compiled(torch.randn(16, 32, generator=g).cuda()).square().mean().backward()
        opt.step()
    opt.global_avg()
    return [p.detach().cpu().tolist() for p in model.parameters()]


def test_compiled_model_gossips_on_two_ranks() -> None:
    a, b = run_ranks(_compiled_on_ranks, 2, timeout=240)
    assert a == b
