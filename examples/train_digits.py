"""Decentralized training of a small MLP on scikit-learn's bundled handwritten digits, one shard per worker.

Run on 4 CPU workers (gloo)::

    uv run torchrun --nproc-per-node 4 examples/train_digits.py --topology ring

Each worker trains on its own quarter of the training set with AdamW wrapped in DecentOptimWrapper; every
epoch the workers' models are globally averaged for evaluation, then reverted so training continues
exactly as before. At world sizes that do not divide the data, the shards differ in size by a batch: the epoch
runs inside ``torch.distributed.algorithms.Join``, so a worker that runs out of batches takes part in the others'
remaining rounds with its parameters as they are.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.distributed.algorithms import Join

from decent_optim_wrapper import DecentOptimWrapper


def load_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_test = len(x) // 5
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


def init_and_shard() -> tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Join the torchrun job over gloo; return (rank, world_size, shard x, shard y, test x, test y)."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    x_train, y_train, x_test, y_test = load_data()
    return rank, world_size, x_train[rank::world_size], y_train[rank::world_size], x_test, y_test


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(1) == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="ring")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    rank, world_size, x_shard, y_shard, x_test, y_test = init_and_shard()

    torch.manual_seed(rank)  # different initialisations on purpose: the wrapper starts everyone from rank 0's
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    optimizer = DecentOptimWrapper(torch.optim.AdamW(model.parameters(), lr=args.lr), topology=args.topology)

    g = torch.Generator().manual_seed(1000 + rank)
    for epoch in range(args.epochs):
        perm = torch.randperm(len(x_shard), generator=g)
        total = 0.0
        with Join([optimizer]):  # uneven shards: ranks that finish first stand in for the others' rounds
            for i in range(0, len(perm) - args.batch_size + 1, args.batch_size):
                idx = perm[i:i + args.batch_size]
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x_shard[idx]), y_shard[idx])
                loss.backward()
                optimizer.step()
                total += loss.item()
        local_acc = accuracy(model, x_test, y_test)
        optimizer.global_avg()
        avg_acc = accuracy(model, x_test, y_test)
        optimizer.revert_global_avg()
        if rank == 0 and (epoch % 5 == 4 or epoch == args.epochs - 1):
            print(f"epoch {epoch + 1:3d}  loss {total / (len(perm) // args.batch_size):.4f}  "
                  f"test acc: worker 0 {local_acc:.3f}, global average {avg_acc:.3f}", flush=True)
    # The last step() leaves a round in flight; a rank that left without applying it could make a peer still
    # sending to it fail.
    optimizer.finish()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
