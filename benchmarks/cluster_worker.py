"""One rank of a ``cluster_compare.py`` run; ``torchrun`` starts it inside a host's network namespace.

Not meant to be run by hand. Rank, world size and ``LOCAL_WORLD_SIZE`` come from torchrun's environment; gloo
talks over ``GLOO_SOCKET_IFNAME``. The worker trains ``--steps`` steps of the workload with one method and
writes ``rank<r>.json`` into ``--out``:

- the training wall-clock at each evaluation point (evaluation excluded), the training loss of every step;
- each step's time, its time in ``opt.step()``, in the inner optimizer's step and blocked on a gossip round;
- on each host's local rank 0, the byte counters of the host's shaped interface and of ``lo`` over the
  training window (between a barrier before the first step and one after the last), so every method's traffic
  is counted the same way, on the wire;
- the validation loss of the globally averaged model at the evaluation points this rank scored.

Evaluation never touches the network or the clock: at each evaluation point every rank writes its parameters
to ``--out`` (clock stopped), and after training the ranks score the points between them, each averaging the
saved parameters of all ranks. For gossip this is exactly ``global_avg()``: the averaging in flight preserves
the mean, so the mean of the saved parameters is the mean the package would compute.
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

import torch
import torch._dynamo  # noqa: F401  (torch.optim imports it at the first step: seconds, not training time)
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import anchors  # noqa: E402  (sibling files, not a package)
import gossip_methods  # noqa: E402
import workloads  # noqa: E402

from decent_optim_wrapper import DecentOptimWrapper  # noqa: E402

DDP_METHODS = ("ddp", "ddp-bf16")


def _counters(ifname: str) -> dict[str, int]:
    # Read from sysfs: `ip netns exec` mounts the namespace's own /sys, so these are this host's interfaces.
    def read(dev: str, what: str) -> int:
        return int(Path(f"/sys/class/net/{dev}/statistics/{what}").read_text())

    return {"wire_tx": read(ifname, "tx_bytes"), "wire_rx": read(ifname, "rx_bytes"), "lo_tx": read("lo", "tx_bytes"),
            "tcp_retrans": _tcp_retransmitted()}


def _tcp_retransmitted() -> int:
    """TCP segments this host has sent again (``RetransSegs`` of ``/proc/net/snmp``, which ``ip netns exec`` shows
    per namespace): a shaped link's queue that overflows shows here, as a stall no byte counter sees."""
    lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines() if line.startswith("Tcp:")]
    return int(lines[1][lines[0].index("RetransSegs")])


def wrap(method: str, workload: workloads.Workload, timeout_s: float, anchor: anchors.Anchor | None,
         seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer | anchors.DiLoCo, torch.optim.Optimizer]:
    """(model to call, optimizer to step, inner optimizer) for ``method`` (``anchor``: its resolved anchor)."""
    model = workload.model
    if anchor is not None:
        return anchors.build(anchor, model, workload.optimizer, seed, int(os.environ["LOCAL_WORLD_SIZE"]))
    base = method.partition("+")[0]
    if base in DDP_METHODS:
        model = torch.nn.parallel.DistributedDataParallel(model)
        if base == "ddp-bf16":
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook

            model.register_comm_hook(None, bf16_compress_hook)
    inner = workload.optimizer(list(model.parameters()))
    if base in DDP_METHODS or base == "local":
        return model, inner, inner
    topology, kwargs = gossip_methods.parse(method)
    if any(k not in inspect.signature(DecentOptimWrapper).parameters for k in kwargs):
        raise ValueError(f"method {method!r} needs DecentOptimWrapper({', '.join(kwargs)}=...), which this version "
                         "lacks")
    return model, DecentOptimWrapper(inner, topology=topology, timeout=timeout_s, **kwargs), inner


def base_of(method: str) -> str:
    return method.partition("+")[0]


def _log(what: str) -> None:
    # Into the host's log: where a slow start or a hang happened, with times comparable across hosts.
    print(f"[{time.strftime('%H:%M:%S')} rank {os.environ['RANK']}] {what}", flush=True)


def _machine_cpu() -> dict[str, int]:
    """This machine's CPU time in jiffies from ``/proc/stat`` (not per namespace: every emulated host shares
    the machine's cores): ``busy`` (all but idle and iowait) and, of it, ``system`` and ``softirq``."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return {"busy": user + nice + system + irq + softirq + steal, "system": system, "softirq": softirq}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--method", required=True)
    p.add_argument("--workload", required=True, choices=workloads.WORKLOADS)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--eval-steps", required=True, help="comma-separated steps at which to evaluate")
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--timeout", type=float, default=600, help="seconds a collective may wait")
    a = p.parse_args()

    _log("started")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=a.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    _log(f"process group ready ({world} ranks)")
    local_rank = int(os.environ["LOCAL_RANK"])
    ifname = os.environ["GLOO_SOCKET_IFNAME"]
    wl = workloads.build(a.workload, rank, world, a.batch_size, a.lr, a.seed)
    params = list(wl.model.parameters())  # the plain model's, in a fixed order, for snapshots
    anchor = anchors.parse(a.method)
    anchor = None if anchor is None else anchor.resolve(a.steps, a.workload)
    model, opt, inner = wrap(a.method, wl, a.timeout, anchor, a.seed)
    sched = torch.optim.lr_scheduler.LambdaLR(inner, wl.lr_lambda)
    eval_steps = sorted({int(s) for s in a.eval_steps.split(",")})
    snap_dir = a.out / "snapshots"
    snap_dir.mkdir(parents=True, exist_ok=True)
    progress = os.open(a.out / "progress", os.O_WRONLY | os.O_CREAT) if rank == 0 else None

    def snapshot(step: int) -> None:
        with torch.no_grad():
            torch.save(torch.cat([q.detach().reshape(-1) for q in params]), snap_dir / f"{step}.{rank}.pt")

    train_s, clock, losses, iter_s = 0.0, {}, [], []
    # Where a step's time goes: in opt.step() (for gossip: the wait, the mix, the inner step, the next launch), in
    # the inner optimizer's own step (timed by torch's public step hooks), and blocked on a round (comm_stats).
    step_s, inner_s, wait_s = [], [], []
    inner_t0 = [0.0]
    inner.register_step_pre_hook(lambda *_: inner_t0.__setitem__(0, time.perf_counter()))
    inner.register_step_post_hook(lambda *_: inner_s.append(time.perf_counter() - inner_t0[0]))
    waited = (lambda: opt.comm_stats.wait_s) if isinstance(opt, DecentOptimWrapper) else (lambda: 0.0)
    dist.barrier()
    _log("model and optimizer built, training starts")
    before = _counters(ifname) if local_rank == 0 else None
    # CPU of this rank over the loop (user and kernel, from os.times) and, on rank 0, of the whole machine: on
    # two shared cores, the kernel's TCP work of one congestion control against another shows here
    cpu0, machine0 = os.times(), _machine_cpu() if rank == 0 else None
    for step in range(a.steps):
        if step in eval_steps:
            clock[step] = train_s
            snapshot(step)
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = wl.loss(model, step)
        loss.backward()
        t1, w0 = time.perf_counter(), waited()
        opt.step()
        step_s.append(time.perf_counter() - t1)
        wait_s.append(waited() - w0)
        sched.step()
        dt = time.perf_counter() - t0
        train_s += dt
        iter_s.append(dt)
        losses.append(loss.item())
        if progress is not None:
            os.pwrite(progress, f"{step + 1:>10}".encode(), 0)
    cpu1, machine1 = os.times(), _machine_cpu() if rank == 0 else None
    if isinstance(opt, DecentOptimWrapper) and hasattr(opt, "finish"):
        opt.finish()  # the rounds still in flight (max_delay > 1) land before the counters are read
    dist.barrier()  # every rank is done (and the last round has landed) before the counters are read
    after = _counters(ifname) if local_rank == 0 else None
    clock[a.steps] = train_s
    snapshot(a.steps)
    dist.barrier()  # all snapshots written
    _log(f"trained {a.steps} steps in {train_s:.1f} s")

    # Score this rank's share of the evaluation points on the average of all ranks' saved parameters.
    scored = {}
    wl.model.eval()
    with torch.no_grad():
        for s in sorted(clock)[rank::world]:
            mean = sum(torch.load(snap_dir / f"{s}.{r}.pt") for r in range(world)) / world
            torch.nn.utils.vector_to_parameters(mean, params)
            scored[s] = wl.val_loss(wl.model)
    dist.barrier()
    out = {
        "rank": rank, "host": int(os.environ["DOW_HOST"]), "local_rank": local_rank, "world_size": world,
        "local_world_size": int(os.environ["LOCAL_WORLD_SIZE"]), "clock": clock, "losses": losses,
        "iter_s": iter_s, "step_s": step_s, "inner_s": inner_s, "wait_s": wait_s, "val_loss": scored,
        "describe": wl.describe,
        # steps from one communication on the link to the next: the iteration time is a mean over whole periods
        "period": anchor.period if anchor is not None else 1 if base_of(a.method) in (*DDP_METHODS, "local") else
        gossip_methods.period(a.method),
        "setup": None if anchor is None else anchors.describe(anchor, inner),
        "param_bytes": sum(q.numel() * q.element_size() for q in params),
        "counters": None if before is None or after is None else {k: after[k] - before[k] for k in before},
        "cpu_s": {"user": cpu1.user - cpu0.user, "system": cpu1.system - cpu0.system},
        "machine_cpu_s": None if machine0 is None or machine1 is None else
        {k: (machine1[k] - machine0[k]) / os.sysconf("SC_CLK_TCK") for k in machine0},
    }
    (a.out / f"rank{rank}.json").write_text(json.dumps(out))
    _log(f"scored {len(scored)} evaluation points; done")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
