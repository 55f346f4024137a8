"""Model, data and hand-written reference loops shared by the Lightning job and its tests (no Lightning import:
the references run on ranks started by run_local, which must not pay for importing Lightning)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler, TensorDataset

from decent_optim_wrapper import DecentOptimWrapper

BATCH = 4
LR = 1e-2
CLIP = 0.5


class Net(torch.nn.Module):
    """Three blocks for a three-phase fine-tuning schedule: ``head``, then ``body.2``, then ``body.0``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(),
                                        torch.nn.Linear(16, 16), torch.nn.Tanh())
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return x, torch.tanh(x @ torch.randn(6, 3, generator=g)) + 0.1 * torch.randn(n, 3, generator=g)


TRAIN = make_data(64, 1)
VAL = make_data(32, 2)


def shard(data: tuple[torch.Tensor, torch.Tensor], rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What a DistributedSampler without shuffling gives rank ``rank`` (sizes here divide evenly)."""
    return data[0][rank::world_size], data[1][rank::world_size]


def flat(module: torch.nn.Module) -> list[float]:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).tolist()


def reference_run(rank: int, world_size: int, topology: str, epochs: int, accumulate: int = 1,
                  clip: float | None = None, precision: str = "32-true", **gossip: Any) -> list[float]:
    """The hand-written loop that Lightning's automatic optimization under DecentralizedStrategy must equal.

    ``gossip``: more arguments of the wrapper (the strategy's own: compression, max_delay, ...). Per window of
    ``accumulate`` batches: zero_grad, forward (autocast for mixed precision), loss divided by
    ``accumulate``, (scaled) backward; at the window's end: unscale, clip, step.
    """
    torch.set_num_threads(1)
    net = make_net()
    opt = DecentOptimWrapper(torch.optim.AdamW(net.parameters(), lr=LR), topology=topology, timeout=60, **gossip)
    scaler = torch.amp.GradScaler("cpu") if precision == "16-mixed" else None
    dtype = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}.get(precision)
    sampler = DistributedSampler(TensorDataset(*TRAIN), num_replicas=world_size, rank=rank, shuffle=True, seed=0)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)  # Lightning shuffles training data with a DistributedSampler, reseeded per epoch
        order = list(sampler)
        x, y = TRAIN[0][order], TRAIN[1][order]
        n_batches = len(order) // BATCH
        for i in range(n_batches):
            if i % accumulate == 0:
                opt.zero_grad()
            ctx = torch.autocast("cpu", dtype=dtype, cache_enabled=False) if dtype else contextlib.nullcontext()
            with ctx:
                loss = F.mse_loss(net(x[i * BATCH:(i + 1) * BATCH]), y[i * BATCH:(i + 1) * BATCH])
            loss = loss / accumulate
            (scaler.scale(loss) if scaler else loss).backward()
            if (i + 1) % accumulate and i + 1 < n_batches:
                continue
            if scaler:
                scaler.unscale_(opt)
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(list(net.parameters()), clip)
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
    return flat(net)
