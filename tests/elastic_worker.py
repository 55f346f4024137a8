"""A training script for tests/test_elastic.py, run under torchrun: ring gossip with per-rank checkpoints that
resumes after a restart, optionally killing one rank (SIGKILL) at one step of the first attempt."""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist

from decent_optim_wrapper import DecentOptimWrapper
from decent_optim_wrapper.checkpoint import CheckpointManager
from decent_optim_wrapper.launch import init_distributed


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--save-every", type=int, default=5)
    parser.add_argument("--kill", default="", help="RANK:STEP to SIGKILL in the first attempt")
    parser.add_argument("--finish-before-save", action="store_true", help="checkpoints with no round in flight")
    return parser.parse_args(argv)


def train(args: argparse.Namespace) -> None:
    """Train on the process group that is already initialised; write each rank's final parameters to --out."""
    rank, attempt = dist.get_rank(), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    opt = DecentOptimWrapper(torch.optim.Adam(model.parameters(), lr=1e-2), topology="ring", timeout=20)
    ckpts = CheckpointManager(args.ckpt, keep=3)
    start, state = ckpts.resume()
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
    kill_rank, kill_step = (int(v) for v in args.kill.split(":")) if args.kill else (-1, -1)
    for step in range(start, args.steps):
        if attempt == 0 and rank == kill_rank and step == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
        g = torch.Generator().manual_seed(1000 * rank + step)  # the data depends only on (rank, step)
        x, y = torch.randn(16, 8, generator=g), torch.randn(16, 2, generator=g)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if (step + 1) % args.save_every == 0:
            if args.finish_before_save:
                opt.finish()
            ckpts.save(step + 1, {"model": model.state_dict(), "optim": opt.state_dict()})
    opt.finish()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save({"params": [p.detach() for p in model.parameters()], "attempt": attempt, "resumed_from": start},
               args.out / f"rank{rank}.pt")


if __name__ == "__main__":
    init_distributed("gloo", timeout=60)
    train(parse())
    dist.destroy_process_group()
