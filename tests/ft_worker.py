"""One torchft replica for tests/test_ft.py: gossip over a Manager, optionally dying (SIGKILL) at a chosen point.

Each replica is a process of its own with its own TCPStore and Manager; the test starts the lighthouse. After
every step the replica records its parameters, the round counter and the quorum it saw; at the end it writes
them to ``--out/<replica>-<pid>.pt``. ``--die STEP:WHERE`` kills it at step STEP (its manager's step count):

- ``between``: right after the round in flight has ended (applied on both sides), before the quorum;
- ``round``: with the round in flight transferred both ways, before the verdicts are swapped;
- ``global_avg``: inside ``global_avg()``, before the all-reduce;
- ``silent``: like ``round``, but a child process forked just before keeps the replica's connections open, so
  that no close reaches its peers (as when a FIN is lost on a congested link); only its liveness port closes.
  The child writes its pid to ``--out/holder-<replica>`` and sleeps; the test kills it.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from decent_optim_wrapper import DecentOptimWrapper, GossipError
from decent_optim_wrapper.ft import ManagedDecentOptimWrapper


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--replica", type=int, required=True)
    p.add_argument("--replicas", type=int, required=True, help="how many start together (the first quorum)")
    p.add_argument("--lighthouse", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=0.0)
    p.add_argument("--topology", default="one-peer-exp")
    p.add_argument("--die", default="", help="STEP:WHERE (between, round, global_avg)")
    p.add_argument("--eval-every", type=int, default=0, help="global_avg()/revert_global_avg() every this many steps")
    p.add_argument("--joiner", action="store_true", help="a restarted replica: do not wait for the first quorum")
    p.add_argument("--timeout", type=float, default=20.0)
    p.add_argument("--quorum-retries", type=int, default=0)
    p.add_argument("--wire-dtype", default="", help="e.g. bfloat16")
    p.add_argument("--consensus", action="store_true", help="consensus_distance() after finish(), into the result")
    p.add_argument("--step-time", type=float, default=0.0, help="seconds of 'compute' per step (a sleep)")
    return p.parse_args(argv)


def model_for(replica: int, lr: float) -> torch.nn.Module:
    """float64; with lr = 0 every replica starts from small integers of its own, so that pair averages stay exact
    (each halving adds one bit) for far more rounds than a test runs; with lr > 0 every replica starts alike."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    if lr == 0:
        with torch.no_grad():
            for k, p in enumerate(model.parameters()):
                p.copy_((torch.arange(p.numel(), dtype=torch.float64).view_as(p) * (replica + 3) + 5 * k) % 17 - 8)
    return model


def batch(replica: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * replica + step)
    x = torch.randn(16, 6, generator=g, dtype=torch.float64)
    return x, x.sum(1, keepdim=True).sin()


def main(args: argparse.Namespace) -> None:
    from torchft import Manager, ProcessGroupGloo
    from torchft.checkpointing.pg_transport import PGTransport

    torch.set_num_threads(1)
    faulthandler.dump_traceback_later(args.timeout * 4, exit=True)  # a hang shows where, in the test's log
    die_step, die_where = (int(args.die.split(":")[0]), args.die.split(":")[1]) if args.die else (-1, "")
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    timeout = timedelta(seconds=args.timeout)
    pg = ProcessGroupGloo(timeout=timeout)
    manager = Manager(pg=pg, min_replica_size=1, load_state_dict=None, state_dict=None, use_async_quorum=False,
                      replica_id=f"replica{args.replica}", store_addr="127.0.0.1", store_port=store.port, rank=0,
                      world_size=1, hostname="127.0.0.1", lighthouse_addr=args.lighthouse, timeout=timeout,
                      quorum_timeout=timeout, checkpoint_transport=PGTransport(pg, timeout, torch.device("cpu")),
                      init_sync=False, quorum_retries=args.quorum_retries)
    model = model_for(args.replica, args.lr)
    wire = getattr(torch, args.wire_dtype) if args.wire_dtype else None
    opt = DecentOptimWrapper(torch.optim.SGD(model.parameters(), lr=args.lr), topology=args.topology, manager=manager,
                             wire_dtype=wire)
    assert isinstance(opt, ManagedDecentOptimWrapper)

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    end_round, allreduce_mean = opt._end_round, opt._allreduce_mean

    def end_round_then_maybe_die(apply: bool = True) -> None:
        now = manager.current_step()
        if now == die_step and die_where in ("round", "silent") and opt._inflight is not None:
            for w in opt._inflight.works:  # both transfers are complete; the verdict never goes out
                w.wait(timeout)
            if die_where == "silent" and os.fork() == 0:  # the child holds every connection but the liveness port
                opt._liveness._sock.close()
                (args.out / f"holder-{args.replica}").write_text(str(os.getpid()))
                time.sleep(120)
                os._exit(0)
            die()
        end_round(apply)
        if now == die_step and die_where == "between":
            die()

    def allreduce_then_maybe_die(tensors: list[torch.Tensor], what: str) -> None:
        if manager.current_step() == die_step and die_where == "global_avg" and what == "global_avg()":
            die()
        allreduce_mean(tensors, what)

    opt._end_round = end_round_then_maybe_die  # type: ignore[method-assign]
    opt._allreduce_mean = allreduce_then_maybe_die  # type: ignore[method-assign]

    if not args.joiner:  # every first-generation replica heartbeats before anyone asks for a quorum
        barrier = dist.FileStore(str(args.out / "start"), -1)
        barrier.add("ready", 1)
        while int(barrier.add("ready", 0)) < args.replicas:
            time.sleep(0.05)
    (args.out / f"ready-{args.replica}").touch()  # built: about to ask for its first quorum
    records, evals = [], []
    while manager.current_step() < args.steps:
        while (args.out / "hold").exists():  # the test holds the others until a restarted replica is up
            time.sleep(0.05)
        step = manager.current_step()
        opt.zero_grad()
        if args.lr > 0:
            x, y = batch(args.replica, step)
            torch.nn.functional.mse_loss(model(x), y).backward()
        time.sleep(args.step_time)
        opt.step()
        flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
        (args.out / f"step-{args.replica}").write_text(str(manager.current_step()))  # progress, for the test
        records.append({"step": manager.current_step(), "round": opt.round, "rank": opt.rank, "n": opt.world_size,
                        "params": flat, "time": time.time()})
        if args.eval_every and manager.current_step() % args.eval_every == 0:
            try:
                opt.global_avg()
                evals.append(("ok", manager.current_step(),
                              torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()))
                opt.revert_global_avg()
            except GossipError as exc:
                evals.append(("failed", manager.current_step(), str(exc)))
            after = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
            assert torch.equal(after, flat), "global_avg + revert (or a failed global_avg) changed the parameters"
    opt.finish()
    consensus = opt.consensus_distance() if args.consensus else None
    final = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    torch.save({"replica": args.replica, "records": records, "evals": evals, "final": final,
                "stats": opt.ft_stats, "joiner": args.joiner, "consensus": consensus},
               args.out / f"{args.replica}-{os.getpid()}.pt")
    manager.shutdown(wait=False)


if __name__ == "__main__":
    main(parse())
