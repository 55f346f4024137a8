"""Workloads for the cluster benchmark: a model, its data split across workers, an optimizer, a validation loss.

    mlp   an MLP of 3.2M parameters on scikit-learn's handwritten digits, SGD with momentum (the issue's MLP:
          little compute per step, so the link dominates)
    lm    a byte-level decoder-only transformer (3.3M parameters) on the Python standard library's own source
          files, AdamW: every machine has the data, each worker reads a disjoint set of files, and the
          validation loss is taken on held-out files

Everything is deterministic given the seed: the same model initialisation on every rank and for every method,
and the same batches for a given (seed, rank, step), so methods differ only in how workers communicate.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["WORKLOADS", "Workload", "TinyLM", "build", "stdlib_files"]

WORKLOADS = ("mlp", "lm")


@dataclass
class Workload:
    """What one worker trains: ``loss(model, step)`` draws this worker's batch for ``step``."""

    name: str
    model: nn.Module
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]
    lr_lambda: Callable[[int], float]
    loss: Callable[[nn.Module, int], torch.Tensor]
    val_loss: Callable[[nn.Module], float]
    describe: str


# ---------------------------------------------------------------------- MLP on digits
def _digits(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_val = len(x) // 5
    mean, std = x[n_val:].mean(0), x[n_val:].std(0).clamp_min(1e-3)
    x = (x - mean) / std
    return x[n_val:], y[n_val:], x[:n_val], y[:n_val]


def _mlp_workload(rank: int, world_size: int, batch_size: int, lr: float, seed: int) -> Workload:
    x_train, y_train, x_val, y_val = _digits(seed)
    x_shard, y_shard = x_train[rank::world_size], y_train[rank::world_size]
    torch.manual_seed(seed)
    hidden = 1024
    model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                          nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                          nn.Linear(hidden, 10))
    gen = torch.Generator().manual_seed(seed * 1000 + rank)

    def loss(m: nn.Module, step: int) -> torch.Tensor:
        idx = torch.randint(len(x_shard), (batch_size,), generator=gen)
        return F.cross_entropy(m(x_shard[idx]), y_shard[idx])

    @torch.no_grad()
    def val_loss(m: nn.Module) -> float:
        return F.cross_entropy(m(x_val), y_val).item()

    return Workload("mlp", model, lambda ps: torch.optim.SGD(ps, lr=lr, momentum=0.9), lambda s: 1.0, loss,
                    val_loss, f"MLP 64-{hidden}x4-10 on digits ({len(x_shard)} training samples per worker, "
                    f"{len(x_val)} validation), SGD lr {lr} momentum 0.9, batch {batch_size} per worker")


# ---------------------------------------------------------------------- byte-level LM on the stdlib
class _Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """Decoder-only transformer over bytes (vocabulary 256), pre-LayerNorm, learned positions."""

    def __init__(self, d_model: int = 256, layers: int = 4, heads: int = 4, context: int = 128) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(256, d_model), nn.Embedding(context, d_model)
        self.blocks = nn.Sequential(*(_Block(d_model, heads) for _ in range(layers)))
        self.ln, self.head = nn.LayerNorm(d_model), nn.Linear(d_model, 256, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        return self.head(self.ln(self.blocks(x)))


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files (installed packages excluded), sorted: the same list on every rank."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts))
    if len(files) < 100:
        raise RuntimeError(f"found only {len(files)} .py files under {root}: the lm workload needs the Python "
                           "standard library's sources (a Python installed without them, e.g. .pyc only)")
    return files


def _read(files: list[Path]) -> torch.Tensor:
    # A NUL between files: a byte that never occurs in source, so the model sees where one file ends.
    return torch.frombuffer(bytearray(b"\0".join(f.read_bytes() for f in files)), dtype=torch.uint8).long()


def _lm_workload(rank: int, world_size: int, batch_size: int, lr: float, seed: int, context: int,
                 val_windows: int, warmup: int) -> Workload:
    files = stdlib_files()
    val_files = files[::10]  # every tenth file is held out
    train_files = [f for i, f in enumerate(files) if i % 10 != 0]
    data = _read(train_files[rank::world_size])  # disjoint files per worker: the data differs across workers
    val = _read(val_files)
    starts = torch.linspace(0, len(val) - context - 2, val_windows).long()  # evenly spread, fixed
    val_x = torch.stack([val[s:s + context] for s in starts])
    val_y = torch.stack([val[s + 1:s + context + 1] for s in starts])
    torch.manual_seed(seed)
    model = TinyLM(context=context)
    gen = torch.Generator().manual_seed(seed * 1000 + rank)

    def loss(m: nn.Module, step: int) -> torch.Tensor:
        s = torch.randint(len(data) - context - 1, (batch_size, 1), generator=gen) + torch.arange(context + 1)
        chunk = data[s]
        return F.cross_entropy(m(chunk[:, :-1]).flatten(0, 1), chunk[:, 1:].flatten())

    @torch.no_grad()
    def val_loss(m: nn.Module) -> float:
        total = 0.0
        for i in range(0, val_windows, 32):
            logits = m(val_x[i:i + 32])
            total += F.cross_entropy(logits.flatten(0, 1), val_y[i:i + 32].flatten(), reduction="sum").item()
        return total / val_y.numel()

    def optimizer(ps: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(ps, lr=lr, betas=(0.9, 0.95), weight_decay=0.1)

    n_params = sum(p.numel() for p in model.parameters())
    return Workload(
        "lm", model, optimizer, lambda s: min(1.0, (s + 1) / warmup), loss, val_loss,
        f"byte-level transformer ({n_params / 1e6:.2f}M parameters, d_model 256, 4 layers, 4 heads, context "
        f"{context}) on {len(files)} stdlib .py files ({len(train_files)} for training, {len(data) / 1e6:.1f} MB "
        f"on this worker; {len(val_files)} held out, {val_windows} windows scored), AdamW lr {lr} "
        f"(warm-up {warmup} steps), batch {batch_size}x{context} bytes per worker",
    )


def build(name: str, rank: int, world_size: int, batch_size: int, lr: float, seed: int, context: int = 128,
          val_windows: int = 64, warmup: int = 20) -> Workload:
    """The workload ``name`` as worker ``rank`` of ``world_size`` sees it."""
    if name == "mlp":
        return _mlp_workload(rank, world_size, batch_size, lr, seed)
    if name == "lm":
        return _lm_workload(rank, world_size, batch_size, lr, seed, context, val_windows, warmup)
    raise ValueError(f"Unknown workload={name!r}. Must be one of {WORKLOADS}.")

