"""Time per step() and per iteration, and extra memory: bare optimizer vs DecentOptimWrapper vs DDP.

    uv run python benchmarks/step_benchmark.py                    # 1M, 10M, 50M parameters
    uv run python benchmarks/step_benchmark.py --sizes 1M --iters 20

For each model size (an MLP of four square layers), in one run:

* ``bare``: N processes each training alone with AdamW, no communication (the baseline: same processes,
  same cores, same model, so the ratios measure what the communication costs and nothing else);
* ``ring`` / ``one-peer-exp``: the same with ``DecentOptimWrapper`` (N = 2 and 4);
* ``ddp``: ``torch.nn.parallel.DistributedDataParallel`` (gradient all-reduce in backward);
* ``local overhead``: one process, a process group of one member, the wrapper's ``step()`` against the bare
  optimizer's, alternated step by step (what buckets and bookkeeping cost with nothing to send).

On a GPU machine: ``--device cuda`` (NCCL, one GPU per rank; on a single GPU add ``--workers 1``, which
measures the wrapper at world size 1 and the local overhead).

Iteration = zero_grad + forward + backward + step. Times are medians over the measured iterations, the
slowest rank's. Extra memory: the wrapper's persistent buffers (and DDP's gradient buckets) over the
parameter bytes, and the peak RSS over the bare run's.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from decent_optim_wrapper import DecentOptimWrapper
from decent_optim_wrapper.launch import run_local

SIZES = {"1M": 512, "10M": 1600, "50M": 3536}  # width of four square layers: 4 * w^2 parameters
OVERHEAD_STEPS = {"1M": 200, "10M": 40, "50M": 12}  # alternated bare/wrapper steps for the local overhead
BATCH = 16


def make_model(width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for i in range(4):
        layers.append(torch.nn.Linear(width, width))
        if i < 3:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _timed_training(rank: int, world_size: int, method: str, width: int, warmup: int, iters: int) -> dict[str, Any]:
    device = _device()
    model = make_model(width).to(device)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    net: torch.nn.Module = torch.nn.parallel.DistributedDataParallel(model) if method == "ddp" else model
    opt: torch.optim.Optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    if method in ("ring", "one-peer-exp"):
        opt = DecentOptimWrapper(opt, topology=method, timeout=600)
    g = torch.Generator().manual_seed(rank)
    x, y = (torch.randn(BATCH, width, generator=g).to(device) for _ in range(2))
    iter_t, step_t = [], []
    for i in range(warmup + iters):
        if i == warmup:
            dist.barrier()  # every rank measures at the same time, sharing the cores as in real training
        _sync(device)
        t0 = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        _sync(device)
        t1 = time.perf_counter()
        opt.step()
        _sync(device)
        t2 = time.perf_counter()
        if i >= warmup:
            iter_t.append(t2 - t0)
            step_t.append(t2 - t1)
    if isinstance(opt, DecentOptimWrapper):
        opt.global_avg(may_revert=False)  # drain the last round
        extra = opt.gossip.buffer_bytes()
    else:
        extra = param_bytes if method == "ddp" else 0  # DDP copies gradients into buckets of their size
    dist.barrier()
    return {"iter": statistics.median(iter_t), "step": statistics.median(step_t), "param_bytes": param_bytes,
            "extra": extra, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _local_overhead(rank: int, world_size: int, width: int, steps: int) -> dict[str, float]:
    device = _device()
    bare_model, wrapped_model = make_model(width).to(device), make_model(width).to(device)
    bare = torch.optim.AdamW(bare_model.parameters(), lr=1e-4)
    wrapped = DecentOptimWrapper(torch.optim.AdamW(wrapped_model.parameters(), lr=1e-4))
    for m in (bare_model, wrapped_model):
        for p in m.parameters():
            p.grad = torch.randn_like(p) * 1e-3
    tb, tw = [], []
    for i in range(steps + 3):
        for opt, out in ((bare, tb), (wrapped, tw)) if i % 2 == 0 else ((wrapped, tw), (bare, tb)):
            _sync(device)
            t0 = time.perf_counter()
            opt.step()
            _sync(device)
            if i >= 3:
                out.append(time.perf_counter() - t0)
    return {"bare": statistics.median(tb), "wrapper": statistics.median(tw)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: one GPU per rank over NCCL (with a single GPU use --workers 1)")
    parser.add_argument("--out", type=Path, default=Path("results/step_benchmark.json"))
    args = parser.parse_args(argv)
    backend = "nccl" if args.device == "cuda" else "gloo"
    if args.device == "cuda" and torch.cuda.device_count() < max(args.workers):
        parser.error(f"--device cuda needs a GPU per worker: {torch.cuda.device_count()} GPU(s) for "
                     f"--workers {args.workers}")
    machine = (torch.cuda.get_device_name(0) if args.device == "cuda"
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    report: dict[str, Any] = {"machine": f"{machine}, torch {torch.__version__}", "device": args.device,
                              "batch": BATCH, "rows": [], "local_overhead": []}
    head = (f"{'size':>5} {'N':>2} {'method':<13}{'iter ms':>9}{'step ms':>9}{'iter/bare':>10}{'step/bare':>10}"
            f"{'iter/ddp':>9}{'extra mem':>10}{'RSS/bare':>9}")
    print(head)
    print("-" * len(head))
    for size in args.sizes:
        width = SIZES[size]
        for n in args.workers:
            results = {}
            for method in ("bare", "ring", "one-peer-exp", "ddp"):
                per_rank = run_local(_timed_training, n, method, width, args.warmup, args.iters, timeout=1800,
                                     pg_timeout_s=900, backend=backend)
                results[method] = {
                    "iter": max(r["iter"] for r in per_rank), "step": max(r["step"] for r in per_rank),
                    "extra_x": per_rank[0]["extra"] / per_rank[0]["param_bytes"],
                    "rss": max(r["rss"] for r in per_rank), "params": per_rank[0]["param_bytes"] // 4,
                }
            bare, ddp = results["bare"], results["ddp"]
            for method, r in results.items():
                row = {"size": size, "params": r["params"], "workers": n, "method": method,
                       "iter_ms": r["iter"] * 1e3, "step_ms": r["step"] * 1e3,
                       "iter_vs_bare": r["iter"] / bare["iter"], "step_vs_bare": r["step"] / bare["step"],
                       "iter_vs_ddp": r["iter"] / ddp["iter"], "extra_memory_x_params": r["extra_x"],
                       "peak_rss_vs_bare": r["rss"] / bare["rss"]}
                report["rows"].append(row)
                print(f"{size:>5} {n:>2} {method:<13}{row['iter_ms']:>9.1f}{row['step_ms']:>9.2f}"
                      f"{row['iter_vs_bare']:>10.2f}{row['step_vs_bare']:>10.2f}{row['iter_vs_ddp']:>9.2f}"
                      f"{row['extra_memory_x_params']:>9.2f}x{row['peak_rss_vs_bare']:>9.2f}", flush=True)
        steps = OVERHEAD_STEPS[size]
        lo = run_local(_local_overhead, 1, width, steps, timeout=1800, backend=backend)[0]
        row = {"size": size, "bare_step_ms": lo["bare"] * 1e3, "wrapper_step_ms": lo["wrapper"] * 1e3,
               "overhead": lo["wrapper"] / lo["bare"] - 1.0, "steps": steps}
        report["local_overhead"].append(row)
        print(f"{size:>5}  1 local overhead: bare step {row['bare_step_ms']:.3f} ms, wrapper step "
              f"{row['wrapper_step_ms']:.3f} ms ({row['overhead']:+.1%})", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"written to {args.out}")
    return report


if __name__ == "__main__":
    main()
