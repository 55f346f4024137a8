"""DecentralizedDataParallel: the Decent-DP module API on several gloo ranks, the seed tutorials' code with
only the imports changed, and equality with DecentOptimWrapper on the same model and data."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn as nn
from harness import CUDA, DEVICES, run_ranks

from decent_optim_wrapper import DecentOptimWrapper
from decent_optim_wrapper.ddp import DecentralizedDataParallel
from decent_optim_wrapper.ddp import DecentralizedDataParallel as DecentDP
from decent_optim_wrapper.optim import lr_scheduler_fn_cosine_with_warmup, optim_fn_adamw


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def _data(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7919 * rank + step)
    return torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)


def _adamw_fn(params):
    return torch.optim.AdamW([p for _, p in params], lr=1e-2, weight_decay=0.01)


def _ddp_vs_wrapper(rank: int, world_size: int, topology: str, accum: int, device: str = "cpu") -> dict:
    criterion = nn.CrossEntropyLoss()

    def _data_on(r: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(t.to(device) for t in _data(r, step))  # type: ignore[return-value]

    # DecentralizedDataParallel, small buckets so that several step one after another during backward
    model = _model().to(device)
    ddp = DecentralizedDataParallel(model, _adamw_fn, topology=topology, bucket_size_in_mb=0.002)
    for step in range(6):
        if accum > 1:
            ddp.set_accumulate_grad(True)
            for micro in range(accum):
                x, y = _data_on(rank, step * accum + micro)
                (criterion(ddp(x), y) / accum).backward()
            ddp.set_accumulate_grad(False)
        else:
            x, y = _data_on(rank, step)
            ddp.zero_grad()
            criterion(ddp(x), y).backward()
    n_buckets = len(ddp.optimizers)
    ddp.global_avg()
    ddp_avg = [p.detach().clone() for p in model.parameters()]
    ddp.revert_global_avg()
    ddp_params = [p.detach().clone() for p in model.parameters()]

    # DecentOptimWrapper, same model, data and optimizer
    model = _model().to(device)
    opt = DecentOptimWrapper(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01), topology=topology)
    for step in range(6):
        opt.zero_grad()
        for micro in range(accum):
            x, y = _data_on(rank, step * accum + micro)
            (criterion(model(x), y) / accum if accum > 1 else criterion(model(x), y)).backward()
        opt.step()
    opt.global_avg()
    wrapper_avg = [p.detach().clone() for p in model.parameters()]
    opt.revert_global_avg()
    return {"n_buckets": n_buckets,
            "maxdiff": max((a - b).abs().max().item() for a, b in zip(ddp_params, model.parameters())),
            "avg_maxdiff": max((a - b).abs().max().item() for a, b in zip(ddp_avg, wrapper_avg))}


@pytest.mark.parametrize("topology,accum,device", [
    ("ring", 1, "cpu"), ("complete", 1, "cpu"), ("one-peer-exp", 3, "cpu"),
    pytest.param("ring", 1, "cuda", marks=CUDA), pytest.param("one-peer-exp", 3, "cuda", marks=CUDA),
])
def test_ddp_and_wrapper_follow_the_same_trajectory(topology: str, accum: int, device: str) -> None:
    for r in run_ranks(_ddp_vs_wrapper, 4, topology, accum, device):
        assert r["n_buckets"] >= 3
        # Pairs exchange point to point and mix elementwise: bit for bit whatever the bucketing. An
        # all-reduce over differently sized buckets may sum in another order: equal up to rounding.
        assert r["maxdiff"] == 0.0 if topology != "complete" else r["maxdiff"] < 1e-6, r
        assert r["avg_maxdiff"] < 1e-6, r


# ----------------------------------------------------------------------------- parameters that get no gradient
class _Branchy(nn.Module):
    """An unused layer registered between used ones, and a branch that a rank may skip: buckets queued behind a
    bucket that gets no gradient must still step in the same backward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(8, 16)
        self.unused = nn.Linear(16, 16)  # no rank ever calls it
        self.branch = nn.Linear(16, 16)
        self.last = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, use_branch: bool = True) -> torch.Tensor:
        h = torch.tanh(self.first(x))
        if use_branch:
            h = h + self.branch(h)
        return self.last(h)


NO_GRAD_TOPOLOGIES = [("ring", None), ("complete", None), ("one-peer-exp", None), ("alternating-exp-ring", None),
                      ("torus", None), ("one-peer-exp", torch.bfloat16)]


def _no_gradient_runs(rank: int, world_size: int) -> list[tuple[str, float, int]]:
    criterion = nn.CrossEntropyLoss()
    out = []
    for topology, wire in NO_GRAD_TOPOLOGIES:
        def uses_branch(step: int) -> bool:
            return not (rank == 1 and step == 2)  # one rank skips the branch once: the forwards differ

        model = _Branchy()
        ddp = DecentralizedDataParallel(model, lambda ps: torch.optim.SGD([p for _, p in ps], lr=0.1, momentum=0.9),
                                        topology=topology, bucket_size_in_mb=0.0005, local_world_size=2,
                                        wire_dtype=wire)
        for step in range(5):
            x, y = _data(rank, step)
            ddp.zero_grad()  # before the forward, as the README's loop does
            criterion(ddp(x, uses_branch(step)), y).backward()
            ddp.zero_grad()  # and once more after the step that ran inside backward
        ddp.finish()
        got = [p.detach().clone() for p in model.parameters()]

        model = _Branchy()
        opt = DecentOptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), topology=topology,
                                 local_world_size=2, wire_dtype=wire)
        for step in range(5):
            x, y = _data(rank, step)
            opt.zero_grad()
            criterion(model(x, uses_branch(step)), y).backward()
            opt.step()
            opt.zero_grad()
        opt.finish()
        diff = max((a - b).abs().max().item() for a, b in zip(got, model.parameters()))
        moved = (model.first.weight - _Branchy().first.weight).abs().max().item()
        out.append((f"{topology}{'+bf16' if wire else ''}", diff, len(ddp.optimizers), moved))
    return out


def test_buckets_behind_one_without_gradient_step_in_the_same_backward() -> None:
    # Oracle: the plain wrapper, same model, data and SGD (lr 0.1, momentum), with zero_grad() before the forward
    # and after the step. Before the fix the first layer's bucket, queued behind the unused one, never stepped
    # during backward and the next zero_grad() wiped its gradient: it moved a third as far as under the wrapper.
    for rank_results in run_ranks(_no_gradient_runs, 4):
        for name, diff, n_buckets, moved in rank_results:
            assert n_buckets >= 4, name
            assert moved > 0.01, name  # lr > 0, ranks that differ: the layer really trains
            # pairs mix elementwise: bit for bit; an all-reduce over other bucket sizes may sum in another order
            assert diff == 0.0 if not name.startswith(("complete", "alternating")) else diff < 1e-6, (name, diff)


# ----------------------------------------------------------------------------- seed 000, imports changed
class TinyEncoderDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.decoder = nn.Linear(16, 4)

    def forward(self, x):
        return self.decoder(torch.relu(self.bn(self.encoder(x))))


def _seed_000(rank: int, world_size: int) -> list[str]:
    from torch.optim import Optimizer  # noqa: F401  (the tutorial imports it)

    from decent_optim_wrapper.optim import optim_fn_adamw

    done = []
    model = TinyEncoderDecoder()
    criterion = nn.CrossEntropyLoss()

    def train(ddp_model, steps: int = 3) -> None:
        for step in range(steps):
            data, target = _data(rank, step)
            ddp_model.zero_grad()
            criterion(ddp_model(data), target).backward()

    # Basic usage / customized hyperparameters
    ddp_model = DecentDP(model, optim_fn=optim_fn_adamw)
    train(ddp_model)
    custom_adamw = partial(optim_fn_adamw, lr=0.001, beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-8)
    ddp_model = DecentDP(TinyEncoderDecoder(), optim_fn=custom_adamw)
    train(ddp_model)
    done.append("adamw")

    def optim_fn_sgd(params, lr=0.01, momentum=0.9, weight_decay=0.0):
        """Custom SGD optimizer function."""
        params_no_decay = [x for n, x in params if not (("bn" in n) or ("bias" in n))]
        params_decay = [x for n, x in params if ("bn" in n) or ("bias" in n)]
        param_groups = [
            {"params": params_no_decay, "weight_decay": 0.0},
            {"params": params_decay, "weight_decay": weight_decay},
        ]
        return torch.optim.SGD(param_groups, lr=lr, momentum=momentum)

    ddp_model = DecentDP(TinyEncoderDecoder(), optim_fn=optim_fn_sgd)
    train(ddp_model)
    done.append("sgd")

    def optim_fn_custom_adam(params, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8):
        encoder_params = [x for n, x in params if "encoder" in n]
        decoder_params = [x for n, x in params if "decoder" in n]
        param_groups = [
            {"params": encoder_params, "lr": lr * 0.1},
            {"params": decoder_params, "lr": lr},
        ]
        return torch.optim.Adam(param_groups, betas=(beta1, beta2), eps=eps)

    ddp_model = DecentDP(TinyEncoderDecoder(), optim_fn=optim_fn_custom_adam)
    train(ddp_model)
    done.append("custom-adam")

    ddp_model = DecentDP(TinyEncoderDecoder(), optim_fn=optim_fn_adamw,
                         lr_scheduler_fn=lr_scheduler_fn_cosine_with_warmup)
    train(ddp_model)
    assert 0 < ddp_model.get_lr() < 1e-3  # still warming up
    done.append("cosine-warmup")

    def custom_lr_scheduler_fn(optimizer, step_size=10, gamma=0.1):
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)

    ddp_model = DecentDP(TinyEncoderDecoder(), optim_fn=optim_fn_adamw, lr_scheduler_fn=custom_lr_scheduler_fn)
    train(ddp_model, 12)
    assert ddp_model.get_lr() == pytest.approx(1e-4)
    done.append("steplr")

    calls = []

    class TopologyAwareOptimizer(torch.optim.Optimizer):
        def __init__(self, params, lr=0.01):
            super().__init__(params, dict(lr=lr))

        def pre_average_hook(self, edge, weight):
            calls.append((tuple(edge.ranks), weight))
            for param_group in self.param_groups:
                param_group["lr"] = self.defaults["lr"] * len(edge.ranks)

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-group["lr"])

    ddp_model = DecentDP(TinyEncoderDecoder(), optim_fn=lambda params: TopologyAwareOptimizer([p for _, p in params]),
                         topology="ring")
    train(ddp_model, 2)
    assert calls and all(len(ranks) == 2 and w == 0.5 for ranks, w in calls)
    done.append("topology-aware")
    return done


def test_seed_000_code_blocks_run_on_four_ranks() -> None:
    for done in run_ranks(_seed_000, 4, timeout=120):
        assert done == ["adamw", "sgd", "custom-adam", "cosine-warmup", "steplr", "topology-aware"]


# ----------------------------------------------------------------------------- seed 001, imports changed
def _seed_001(rank: int, world_size: int) -> dict:
    from torch.cuda.amp import GradScaler  # noqa: F401  (as the tutorial imports it; disabled on CPU)

    from decent_optim_wrapper.optim import optim_fn_adamw

    model = TinyEncoderDecoder()

    def my_optim_fn(params):
        return torch.optim.SGD([p for _, p in params], lr=0.01, momentum=0.9)

    ddp_model = DecentDP(model, my_optim_fn, lr_scheduler_fn=None, topology="complete", bucket_size_in_mb=25)
    criterion = nn.CrossEntropyLoss()
    train_loader = [_data(rank, s) for s in range(4)]
    val_loader = [_data(100 + rank, s) for s in range(2)]
    num_epochs = 2
    for _epoch in range(num_epochs):
        ddp_model.train()
        for _batch_idx, (data, target) in enumerate(train_loader):
            output = ddp_model(data)
            loss = criterion(output, target)
            ddp_model.zero_grad()
            loss.backward()
        ddp_model.eval()
        with torch.no_grad():
            for data, target in val_loader:
                output = ddp_model(data)
                val_loss = criterion(output, target)

    # Gradient accumulation
    accumulation_steps = 3
    data, target = train_loader[0]
    ddp_model.train()
    ddp_model.set_accumulate_grad(True)
    for _i in range(accumulation_steps):
        output = ddp_model(data)
        loss = criterion(output, target) / accumulation_steps
        loss.backward()
    ddp_model.set_accumulate_grad(False)

    for topology in ["complete", "ring", "one-peer-exp", "alternating-exp-ring"]:
        ddp_model = DecentDP(TinyEncoderDecoder(), optim_fn=optim_fn_adamw, topology=topology, bucket_size_in_mb=50)
        ddp_model.zero_grad()
        criterion(ddp_model(data), target).backward()
    ddp_model = DecentDP(TinyEncoderDecoder(), optim_fn=optim_fn_adamw, grad_clip_norm=1.0)
    criterion(ddp_model(data), target).backward()
    scaler = torch.amp.GradScaler("cpu")
    ddp_model = DecentDP(TinyEncoderDecoder(), optim_fn=optim_fn_adamw, scaler=scaler, grad_clip_norm=1.0)
    for _ in range(2):
        scaler.scale(criterion(ddp_model(data), target)).backward()
    ddp_model.global_avg()
    return {"val_loss": float(val_loss), "weight": ddp_model.module.decoder.weight.flatten().tolist()}


def test_seed_001_code_blocks_run_on_four_ranks() -> None:
    results = run_ranks(_seed_001, 4, timeout=120)
    assert all(r["weight"] == results[0]["weight"] for r in results)


def _unused_bucket(rank: int, world_size: int) -> list[int]:
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(4, 4)
            self.unused = nn.Linear(4, 4)

        def forward(self, x):
            return self.body(x)

    torch.manual_seed(0)
    ddp = DecentralizedDataParallel(TwoHeads(), _adamw_fn, topology="ring", bucket_size_in_mb=1e-5)
    for _ in range(3):
        ddp(torch.randn(2, 4)).sum().backward()
    ddp(torch.randn(2, 4))  # the next forward makes the idle bucket take its round
    return [o.round for o in ddp.optimizers]


def test_buckets_without_gradients_still_take_their_round() -> None:
    for rounds in run_ranks(_unused_bucket, 2):
        assert rounds == [3] * len(rounds) and len(rounds) == 4


def test_ddp_validates_arguments() -> None:
    with pytest.raises(ValueError, match="Invalid grad_clip_norm=-1"):
        DecentralizedDataParallel(_model(), _adamw_fn, grad_clip_norm=-1)
    with pytest.raises(ValueError, match="Invalid optim_fn"):
        DecentralizedDataParallel(_model(), None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Invalid bucket_size_in_mb=0"):
        DecentralizedDataParallel(_model(), _adamw_fn, bucket_size_in_mb=0)
    with pytest.raises(ValueError, match="Invalid optim_fn: it returned list, not a torch.optim.Optimizer"):
        DecentralizedDataParallel(_model(), lambda params: [p for _, p in params])


@pytest.mark.parametrize("device", DEVICES)
def test_ddp_world_size_one_equals_bare_optimizer(device: str) -> None:
    bare = _model().to(device)
    opt = torch.optim.AdamW(bare.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    ddp = DecentralizedDataParallel(_model().to(device), partial(optim_fn_adamw, weight_decay=0.0),
                                    bucket_size_in_mb=0.002)
    criterion = nn.CrossEntropyLoss()
    for step in range(5):
        x, y = (t.to(device) for t in _data(0, step))
        opt.zero_grad()
        criterion(bare(x), y).backward()
        opt.step()
        criterion(ddp(x), y).backward()
    for a, b in zip(bare.parameters(), ddp.module.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


# ----------------------------------------------------------------------------- bucket order across ranks
class ThreeParams(nn.Module):
    """Three equal-sized parameters; the forward may skip ``b`` (a rank whose data does not use it)."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(4, dtype=dtype))
        self.b = nn.Parameter(torch.zeros(4, dtype=dtype))
        self.c = nn.Parameter(torch.zeros(4, dtype=dtype))

    def forward(self, x: torch.Tensor, skip_b: bool) -> torch.Tensor:
        out = x * self.a.sum() + x * self.c.sum()
        return out if skip_b else out + x * self.b.sum()


LOCAL_3 = 3  # alternating-exp-ring on 3 ranks: one node of three


def _skipped_parameter(rank: int, world_size: int, topology: str, dtype: torch.dtype, iterations: int) -> list:
    model = ThreeParams(dtype)
    # one bucket per parameter, all of the same size; lr 0 isolates the averaging
    ddp = DecentralizedDataParallel(model, lambda ps: torch.optim.SGD([p for _, p in ps], lr=0.0),
                                    topology=topology, bucket_size_in_mb=1e-6, local_world_size=LOCAL_3, timeout=30)
    assert len(ddp.optimizers) == 3
    with torch.no_grad():  # after construction, which broadcasts rank 0's values
        model.a.fill_(100 + rank)
        model.b.fill_(200 + rank)
        model.c.fill_(300 + rank)
    x = torch.ones(2, dtype=dtype)
    for _ in range(iterations):
        ddp(x, skip_b=rank == 2).sum().backward()  # rank 2's b gets no gradient
    ddp(x, skip_b=rank == 2)  # the next forward steps the buckets still open
    return [model.a[0].item(), model.b[0].item(), model.c[0].item()]


def test_buckets_ready_in_different_orders_are_not_mixed_complete() -> None:
    # The reliability report's repro: 3 ranks, complete, rank 2 skips b. One round applied: the means, up to
    # float32 rounding of x/3 (mixing b with a, as before the fix, gave 134.33 and 167.67).
    for values in run_ranks(_skipped_parameter, 3, "complete", torch.float32, 2):
        assert values == pytest.approx([101.0, 201.0, 301.0], abs=2e-5, rel=0)


@pytest.mark.parametrize("topology", ["ring", "one-peer-exp", "alternating-exp-ring", "torus", "complete"])
def test_buckets_ready_in_different_orders_are_not_mixed(topology: str) -> None:
    import reference

    from decent_optim_wrapper.topo import TopologyFactory

    iterations = 4
    results = run_ranks(_skipped_parameter, 3, topology, torch.float64, iterations)
    rounds = reference.groups_of(TopologyFactory.create(topology, 0, 3, LOCAL_3).schedule().rounds)
    xs = [torch.tensor(float(r), dtype=torch.float64) for r in range(3)]
    for t in range(iterations - 1):  # the last iteration's rounds are launched, not yet applied
        xs = reference.mix_round(rounds[t % len(rounds)], xs, xs)
    x = torch.stack(xs)
    for base, column in zip((100, 200, 300), zip(*results)):
        # every bucket went through the same rounds: base + (W x)_rank, to float64 rounding
        torch.testing.assert_close(torch.tensor(column, dtype=torch.float64), base + x, rtol=0, atol=1e-12)
