"""One replica (or rank) of an ``ft_drill.py`` run; ``torchrun`` starts it inside a host's network namespace.

Not meant to be run by hand. Trains the ``lm`` workload of ``workloads.py`` with the settings of
``cluster_compare.py`` and appends one JSON line per step to ``--out/replica<k>.jsonl`` (every life of a
restarted process appends to the same file, with its ``life``): the wall time after ``step()``, the step, the
members it was taken with, the training loss. At the end it saves its parameters to ``--out/final<k>.pt``; the
driver scores the mean of the replicas that finished. Modes:

- ``gossip``: ``DecentOptimWrapper(AdamW, topology=..., manager=Manager(...))`` (``decent_optim_wrapper.ft``), one
  torchrun job of one process per replica, ``REPLICA_GROUP_ID`` = the replica;
- ``torchft-ddp``: ``torchft.ddp.DistributedDataParallel`` + ``torchft.optim.OptimizerWrapper`` over the same kind
  of Manager (gradients averaged over the quorum every step; a joiner heals model + optimizer state);
- ``ckpt``: plain ``DecentOptimWrapper`` over one 4-node torchrun job, ``launch.init_distributed`` +
  ``checkpoint.CheckpointManager`` every ``--save-every`` steps (the "Surviving a killed rank" recipe).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch._dynamo  # noqa: F401  (torch.optim imports it at the first step: seconds, not training time)
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workloads  # noqa: E402  (sibling file, not a package)

from decent_optim_wrapper import DecentOptimWrapper  # noqa: E402


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["gossip", "torchft-ddp", "ckpt"], required=True)
    p.add_argument("--topology", default="ring")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--replicas", type=int, default=4, help="replicas at the start (data shards, first quorum)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=30.0, help="seconds a collective / quorum may wait")
    p.add_argument("--save-every", type=int, default=25, help="ckpt mode: checkpoint period in steps")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


class Log:
    """Appends JSON lines to this replica's file, flushed at once (the driver reads them while we run)."""

    def __init__(self, path: Path, life: int) -> None:
        self.f = open(path, "a", buffering=1)
        self.life, self.pid = life, os.getpid()

    def __call__(self, **rec: Any) -> None:
        self.f.write(json.dumps({"t": time.time(), "life": self.life, "pid": self.pid, **rec}) + "\n")


class Batches:
    """The workload's batches, fast-forwarded to any step: a restarted replica draws what it would have drawn
    undisturbed (workloads.py draws from one generator per worker, so the batch of step s is its s-th draw)."""

    def __init__(self, wl: workloads.Workload) -> None:
        self.wl = wl
        v = inspect.getclosurevars(wl.loss).nonlocals
        self.gen, self.high, self.shape = v["gen"], len(v["data"]) - v["context"] - 1, (v["batch_size"], 1)
        self.drawn = 0

    def loss(self, model: torch.nn.Module, step: int) -> torch.Tensor:
        for _ in range(step - self.drawn):  # skipped steps (healed past them, or resumed from a checkpoint)
            torch.randint(self.high, self.shape, generator=self.gen)
        self.drawn = max(self.drawn, step) + 1
        return self.wl.loss(model, step)


def set_lr(inner: torch.optim.Optimizer, wl: workloads.Workload, lr: float, step: int) -> None:
    # As LambdaLR stepped once per step, but from the step itself: a healed or resumed replica gets it right.
    for g in inner.param_groups:
        g["lr"] = lr * wl.lr_lambda(step)


def make_manager(args: argparse.Namespace, replica: int, **kw: Any) -> Any:
    from torchft import Manager, ProcessGroupGloo
    from torchft.checkpointing.pg_transport import PGTransport

    timeout = timedelta(seconds=args.timeout)
    pg = ProcessGroupGloo(timeout=timeout)
    # MASTER_ADDR/MASTER_PORT: this replica's own store (its torchrun agent's); MASTER_ADDR is this host's address
    # on the shaped link, advertised to the lighthouse so the other replicas reach this one there.
    return Manager(pg=pg, min_replica_size=1, replica_id=f"ftdrill_{replica}", hostname=os.environ["MASTER_ADDR"],
                   timeout=timeout, quorum_timeout=timeout, rank=0, world_size=1,
                   checkpoint_transport=PGTransport(pg, timeout, torch.device("cpu")), **kw)


def first_quorum_barrier(out: Path, replicas: int) -> None:
    """Every first-life replica heartbeats before any asks for a quorum, so the first quorum holds all of them
    (the lighthouse runs with --min_replicas 1). A FileStore on the shared disk: no traffic on the links."""
    barrier = dist.FileStore(str(out / "start-barrier"), -1)
    barrier.add("ready", 1)
    while int(barrier.add("ready", 0)) < replicas:
        time.sleep(0.05)


def save_final(args: argparse.Namespace, replica: int, model: torch.nn.Module, step: int) -> None:
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.save({"step": step, "params": flat}, args.out / f"final{replica}.pt")


def run_managed(args: argparse.Namespace, log: Log, life: int) -> None:
    replica = int(os.environ["REPLICA_GROUP_ID"])
    wl = workloads.build("lm", replica, args.replicas, args.batch_size, args.lr, args.seed)
    batches = Batches(wl)
    model = wl.model
    inner = wl.optimizer(list(model.parameters()))
    if args.mode == "gossip":
        # load_state_dict/state_dict None: the wrapper registers what a joiner needs (parameters, AdamW state, round)
        manager = make_manager(args, replica, load_state_dict=None, state_dict=None, use_async_quorum=False,
                               init_sync=False)
        opt: Any = DecentOptimWrapper(inner, topology=args.topology, manager=manager)
        fwd: torch.nn.Module = model
    else:
        from torchft.ddp import DistributedDataParallel
        from torchft.optim import OptimizerWrapper

        def load(sd: dict[str, Any]) -> None:
            model.load_state_dict(sd["model"])
            inner.load_state_dict(sd["optim"])

        # torchft's defaults otherwise (async quorum, init_sync): as its own train_ddp example runs
        manager = make_manager(args, replica, load_state_dict=load,
                               state_dict=lambda: {"model": model.state_dict(), "optim": inner.state_dict()})
        fwd = DistributedDataParallel(manager, model)
        opt = OptimizerWrapper(manager, inner)
    log(event="ready")
    if life == 0:
        first_quorum_barrier(args.out, args.replicas)
    while manager.current_step() < args.steps:
        step = manager.current_step()
        set_lr(inner, wl, args.lr, step)
        opt.zero_grad()  # torchft-ddp: starts the quorum here
        loss = batches.loss(fwd, step)
        loss.backward()
        opt.step()
        n = opt.world_size if args.mode == "gossip" else manager.num_participants()
        log(step=manager.current_step(), took=step, n=n, loss=loss.item())
    if args.mode == "gossip":
        opt.finish()
        stats = opt.ft_stats
        log(event="done", ft_stats={k: getattr(stats, k) for k in ("applied", "dropped", "quorums", "heals")})
    else:
        log(event="done")
    save_final(args, replica, model, manager.current_step())
    manager.shutdown(wait=False)


def run_ckpt(args: argparse.Namespace, log: Log) -> None:
    from decent_optim_wrapper.checkpoint import CheckpointManager
    from decent_optim_wrapper.launch import init_distributed

    if os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") == "1":
        # Each rendezvous round gives a fresh store (MASTER_PORT picked anew on rank 0): nothing stale to avoid.
        # init_distributed's per-attempt prefix cannot be used across nodes: TORCHELASTIC_RESTART_COUNT only
        # counts an agent's own failures, so the agents whose workers were restarted for a membership change
        # keep 0 while the failed node's says 1, and the ranks wait on different prefixes.
        dist.init_process_group("gloo", timeout=timedelta(seconds=args.timeout))
    else:
        init_distributed("gloo", timeout=args.timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    wl = workloads.build("lm", rank, world, args.batch_size, args.lr, args.seed)
    batches = Batches(wl)
    model, inner = wl.model, wl.optimizer(list(wl.model.parameters()))
    opt = DecentOptimWrapper(inner, topology=args.topology, timeout=args.timeout)
    ckpts = CheckpointManager(args.out / "ckpt", keep=3, run_name="ft-drill", optimizer=opt)
    start, state = ckpts.resume()
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
    log(event="ready", resumed_from=start)
    for step in range(start, args.steps):
        set_lr(inner, wl, args.lr, step)
        opt.zero_grad()
        loss = batches.loss(model, step)
        loss.backward()
        opt.step()
        log(step=step + 1, took=step, n=world, loss=loss.item())
        if (step + 1) % args.save_every == 0:
            ckpts.save(step + 1, {"model": model.state_dict(), "optim": opt.state_dict()})
    opt.finish()
    log(event="done")
    save_final(args, rank, model, args.steps)
    dist.destroy_process_group()


def main() -> None:
    args = parse()
    torch.set_num_threads(1)
    life = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    who = os.environ["DOW_HOST"]  # the emulated host (= the replica; in ckpt mode torchrun may number ranks otherwise)
    # The driver SIGKILLs this process (not torchrun) by the pid written here.
    (args.out / f"pid{who}").write_text(str(os.getpid()))
    log = Log(args.out / f"replica{who}.jsonl", life)
    log(event="start")
    if args.mode == "ckpt":
        run_ckpt(args, log)
    else:
        run_managed(args, log, life)


if __name__ == "__main__":
    main()
