"""The Decent-DP style API on the digits task: the optimizer steps inside backward, bucket by bucket.

Run on 4 CPU workers (gloo)::

    uv run torchrun --nproc-per-node 4 examples/train_decent_dp.py --topology one-peer-exp

Shards that differ in size by a batch (world sizes that do not divide the data) are handled by
``torch.distributed.algorithms.Join``, as with torch's DistributedDataParallel.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms import Join
from train_digits import accuracy, init_and_shard

from decent_optim_wrapper import DecentralizedDataParallel
from decent_optim_wrapper.optim import lr_scheduler_fn_cosine_with_warmup, optim_fn_adamw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="one-peer-exp")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    rank, world_size, x_shard, y_shard, x_test, y_test = init_and_shard()
    steps = args.epochs * (len(x_shard) // args.batch_size)

    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    ddp_model = DecentralizedDataParallel(
        model,
        optim_fn=partial(optim_fn_adamw, lr=1e-2, weight_decay=1e-4),
        lr_scheduler_fn=partial(lr_scheduler_fn_cosine_with_warmup, t_max=steps, t_warmup=steps // 10),
        topology=args.topology,
        bucket_size_in_mb=0.02,  # a few small buckets, so that they step one after another in backward
    )
    g = torch.Generator().manual_seed(1000 + rank)
    for epoch in range(args.epochs):
        perm = torch.randperm(len(x_shard), generator=g)
        with Join([ddp_model]):  # uneven shards: ranks that finish first stand in for the others' rounds
            for i in range(0, len(perm) - args.batch_size + 1, args.batch_size):
                idx = perm[i:i + args.batch_size]
                ddp_model.zero_grad()
                F.cross_entropy(ddp_model(x_shard[idx]), y_shard[idx]).backward()  # steps happen in here
        ddp_model.global_avg()
        acc = accuracy(ddp_model, x_test, y_test)
        ddp_model.revert_global_avg()
        if rank == 0 and (epoch % 5 == 4 or epoch == args.epochs - 1):
            print(f"epoch {epoch + 1:3d}  lr {ddp_model.get_lr():.2e}  test acc of the global average {acc:.3f}",
                  flush=True)
    ddp_model.finish()  # apply every bucket's round in flight before the process group goes away
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
