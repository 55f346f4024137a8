"""Optimizers and factories: parameter grouping, AccumAdam(W) and DecoupledLionW against hand-written
references, the warm-up/cosine schedule, and metric reduction across ranks."""

from __future__ import annotations

import functools
import math
import re

import pytest
import torch
from harness import run_ranks

from decent_optim_wrapper import DecentOptimWrapper
from decent_optim_wrapper.optim import (
    AccumAdam,
    AccumAdamW,
    DecoupledLionW,
    lr_scheduler_fn_cosine_with_warmup,
    optim_fn_accum_adam,
    optim_fn_accum_adamw,
    optim_fn_adam,
    optim_fn_adamw,
)


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 8)
        self.bn = torch.nn.BatchNorm1d(8)
        self.norm = torch.nn.LayerNorm(8)
        self.head = torch.nn.Linear(8, 2, bias=False)


@pytest.mark.parametrize("fn,cls", [(optim_fn_adam, torch.optim.Adam), (optim_fn_adamw, torch.optim.AdamW),
                                    (optim_fn_accum_adam, AccumAdam), (optim_fn_accum_adamw, AccumAdamW)])
def test_optim_fns_decay_weight_matrices_only(fn, cls) -> None:
    net = Net()
    opt = functools.partial(fn, lr=0.01, beta1=0.8, beta2=0.95, weight_decay=0.05, eps=1e-7)(
        list(net.named_parameters()))
    assert type(opt) is cls
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    assert {id(p) for p in decayed["params"]} == {id(net.fc.weight), id(net.head.weight)}
    assert len(plain["params"]) == 5  # fc.bias, bn weight+bias, norm weight+bias
    assert decayed["lr"] == 0.01 and decayed["betas"] == (0.8, 0.95) and decayed["eps"] == 1e-7


def _reference_accum_adam(p0: list[float], grads: list[list[float]], lr: float, b1: float, b2: float, eps: float,
                          wd: float, k: int, decoupled: bool) -> list[float]:
    """Scalar, per-element reference of the AccumAdam(W) rule (float64 Python arithmetic)."""
    p = list(p0)
    n = len(p)
    m, v, a = [0.0] * n, [0.0] * n, [0.0] * n
    for t, g_raw in enumerate(grads, start=1):
        windows = math.ceil(t / k)
        c1, c2 = 1 - b1**windows, 1 - b2**windows
        for i in range(n):
            if decoupled:
                p[i] *= 1 - lr * wd
                g = g_raw[i]
            else:
                g = g_raw[i] + wd * p[i]
            a[i] += g / k
            m_t = b1 * m[i] + (1 - b1) * g
            v_t = b2 * v[i] + (1 - b2) * g * g
            p[i] -= lr / c1 * m_t / (math.sqrt(v_t) / math.sqrt(c2) + eps)
        if t % k == 0:
            for i in range(n):
                m[i] = b1 * m[i] + (1 - b1) * a[i]
                v[i] = b2 * v[i] + (1 - b2) * a[i] * a[i]
                a[i] = 0.0
    return p


@pytest.mark.parametrize("cls,decoupled", [(AccumAdam, False), (AccumAdamW, True)])
@pytest.mark.parametrize("k", [1, 3])
def test_accum_adam_matches_hand_written_reference(cls, decoupled: bool, k: int) -> None:
    g = torch.Generator().manual_seed(0)
    p0 = torch.randn(5, generator=g, dtype=torch.float64)
    grads = [torch.randn(5, generator=g, dtype=torch.float64) for _ in range(10)]
    p = torch.nn.Parameter(p0.clone())
    opt = cls([p], lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01, accum_iter=k)
    for grad in grads:
        p.grad = grad.clone()
        opt.step()
    expected = _reference_accum_adam(p0.tolist(), [x.tolist() for x in grads], 0.1, 0.9, 0.99, 1e-8, 0.01, k,
                                     decoupled)
    torch.testing.assert_close(p.detach(), torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cls,decoupled", [(AccumAdam, False), (AccumAdamW, True)])
def test_accum_adam_counts_steps_per_parameter(cls, decoupled: bool) -> None:
    # b gets a gradient only on some steps: its bias correction and window boundaries follow its own step
    # count, exactly as if it were optimised alone on the steps where it had a gradient
    g = torch.Generator().manual_seed(2)
    a0, b0 = (torch.randn(4, generator=g, dtype=torch.float64) for _ in range(2))
    grads = [(torch.randn(4, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64))
             for _ in range(9)]
    used_b = [0, 2, 3, 6, 7, 8]
    a, b = torch.nn.Parameter(a0.clone()), torch.nn.Parameter(b0.clone())
    opt = cls([a, b], lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01, accum_iter=2)
    for t, (ga, gb) in enumerate(grads):
        a.grad, b.grad = ga.clone(), (gb.clone() if t in used_b else None)
        opt.step()
    ref = _reference_accum_adam(b0.tolist(), [grads[t][1].tolist() for t in used_b], 0.1, 0.9, 0.99, 1e-8, 0.01, 2,
                                decoupled)
    torch.testing.assert_close(b.detach(), torch.tensor(ref, dtype=torch.float64), rtol=1e-12, atol=1e-14)
    assert int(opt.state[b]["step"]) == len(used_b) and int(opt.state[a]["step"]) == len(grads)


@pytest.mark.parametrize("cls,torch_cls", [(AccumAdam, torch.optim.Adam), (AccumAdamW, torch.optim.AdamW)])
def test_accum_iter_one_is_adam(cls, torch_cls) -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.nn.Parameter(torch.randn(6, dtype=torch.float64, generator=g))
    b = torch.nn.Parameter(a.detach().clone())
    oa = cls([a], lr=0.05, weight_decay=0.1, accum_iter=1)
    ob = torch_cls([b], lr=0.05, weight_decay=0.1)
    for _ in range(8):
        grad = torch.randn(6, dtype=torch.float64, generator=g)
        a.grad, b.grad = grad.clone(), grad.clone()
        oa.step()
        ob.step()
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kwargs,msg", [
    ({"lr": -1.0}, "Invalid lr=-1.0"), ({"betas": (0.9, 1.0)}, "Invalid betas=(0.9, 1.0)"),
    ({"eps": -1e-8}, "Invalid eps"), ({"weight_decay": -0.1}, "Invalid weight_decay"),
    ({"accum_iter": 0}, "Invalid accum_iter=0. Must be an integer >= 1."),
])
def test_accum_adam_validates(kwargs: dict, msg: str) -> None:
    with pytest.raises(ValueError, match=re.escape(msg)):
        AccumAdam([torch.nn.Parameter(torch.zeros(1))], **kwargs)


def test_cosine_with_warmup_schedule() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = lr_scheduler_fn_cosine_with_warmup(opt, t_max=14, t_warmup=4, cosine_eta_min=0.0, warmup_decay=0.1)
    lrs = []
    for _ in range(14):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    warm = [0.1 + (1.0 - 0.1) * s / 4 for s in range(4)]
    cos = [0.5 * (1 + math.cos(math.pi * s / 10)) for s in range(10)]
    assert lrs == pytest.approx(warm + cos, abs=1e-12)
    with pytest.raises(ValueError, match=re.escape("Invalid t_max=4. Must be an integer > t_warmup=4.")):
        lr_scheduler_fn_cosine_with_warmup(opt, t_max=4, t_warmup=4)


def _reference_lion(p0, grads, lr_at, wd, b1, b2):
    p, m = list(p0), [0.0] * len(p0)
    initial = lr_at(0)
    for t, g in enumerate(grads):
        lr = lr_at(t)
        for i in range(len(p)):
            p[i] *= 1 - (lr / initial) * wd
            c = b1 * m[i] + (1 - b1) * g[i]
            p[i] -= lr * (1.0 if c > 0 else -1.0 if c < 0 else 0.0)
            m[i] = b2 * m[i] + (1 - b2) * g[i]
    return p


def test_decoupled_lionw_matches_reference_over_many_steps() -> None:
    g = torch.Generator().manual_seed(2)
    p0 = torch.randn(7, dtype=torch.float64, generator=g)
    grads = [torch.randn(7, dtype=torch.float64, generator=g) for _ in range(200)]
    p = torch.nn.Parameter(p0.clone())
    opt = DecoupledLionW([p], lr=1e-2, betas=(0.9, 0.99), weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + 0.01 * t))
    for grad in grads:
        p.grad = grad.clone()
        opt.step()
        sched.step()
    expected = _reference_lion(p0.tolist(), [x.tolist() for x in grads], lambda t: 1e-2 / (1 + 0.01 * t), 1e-4,
                               0.9, 0.99)
    torch.testing.assert_close(p.detach(), torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-12)


def test_decoupled_lionw_validates_and_warns() -> None:
    ps = [torch.nn.Parameter(torch.zeros(1))]
    with pytest.raises(ValueError, match=re.escape("Invalid lr=0.0. Must be > 0.")):
        DecoupledLionW(ps, lr=0.0)
    with pytest.raises(ValueError, match="Invalid betas"):
        DecoupledLionW(ps, betas=(0.9, 1.5))
    with pytest.warns(UserWarning, match="multiplied by 0.99 every step"):
        DecoupledLionW(ps, weight_decay=0.01)


def test_seed_003_usage_and_metrics() -> None:
    model = torch.nn.Linear(3, 2)
    optimizer = DecoupledLionW(model.parameters(), lr=0.001, betas=(0.9, 0.99), weight_decay=0.0001)
    optimizer.zero_grad()
    loss = model(torch.randn(4, 3)).square().mean()
    loss.backward()
    optimizer.step()
    metrics = optimizer.get_metrics(model.named_parameters())
    assert set(metrics) == {f"{m}/{n}" for m in DecoupledLionW.metric_functions for n in ("weight", "bias")}
    w = model.weight
    assert metrics["l2_norm/grad/weight"].item() == pytest.approx(w.grad.norm().item())
    assert metrics["l2_norm/moment/weight"].item() == pytest.approx((0.01 * w.grad).norm().item())


def _reduce(rank: int, world_size: int) -> dict:
    p = torch.nn.Parameter(torch.zeros(3))
    inner = DecoupledLionW([p], lr=0.1)
    opt = DecentOptimWrapper(inner, topology="complete")
    with torch.no_grad():
        p.copy_(torch.tensor([1.0, 2.0, 2.0]) * (rank + 1))
    p.grad = torch.tensor([1.0, 0.0, 0.0]) if rank == 0 else torch.tensor([0.0, 3.0, 4.0])
    inner.step()
    local = inner.get_metrics([("p", p)])
    reduced = opt.reduce_metrics({k: v.clone() for k, v in local.items()})
    return {"reduced": {k: v.item() for k, v in reduced.items()}, "param": p.detach().tolist(),
            "grad": p.grad.tolist(), "update": (inner.state[p]["exp_avg"]).tolist()}


def test_reduce_metrics_gives_norms_and_cosines_of_all_ranks_together() -> None:
    r0, r1 = run_ranks(_reduce, 2)
    assert r0["reduced"] == r1["reduced"]
    grads = torch.tensor(r0["grad"] + r1["grad"])
    params = torch.tensor(r0["param"] + r1["param"])
    assert r0["reduced"]["l2_norm/grad/p"] == pytest.approx(grads.norm().item(), rel=1e-6)
    assert r0["reduced"]["l2_norm/param/p"] == pytest.approx(params.norm().item(), rel=1e-6)
    moments = torch.tensor(r0["update"] + r1["update"])
    cos = torch.nn.functional.cosine_similarity(grads, moments, dim=0).item()
    assert r0["reduced"]["cosine/moment_grad/p"] == pytest.approx(cos, rel=1e-6)


def _reduce_plain(rank: int, world_size: int) -> dict:
    opt = DecentOptimWrapper(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
    return {k: v.item() for k, v in opt.reduce_metrics({"loss": float(rank), "acc": 2.0 * rank}).items()}


def test_reduce_metrics_averages_without_optimizer_protocol() -> None:
    assert run_ranks(_reduce_plain, 4) == [{"acc": 3.0, "loss": 1.5}] * 4
