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

On a GPU machine, the local overhead of the wrapper against the bare optimizer on one GPU (world size 1,
AdamW foreach and fused, float32 and bfloat16, stacks of transformer layers of about 100M and 1B parameters):

    python benchmarks/step_benchmark.py --device cuda --gpu-overhead --sizes 100M 1B

``--device cuda`` without ``--gpu-overhead`` runs the training rows with NCCL, one GPU per rank.

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
from decent_optim_wrapper.buckets import build_buckets
from decent_optim_wrapper.launch import run_local

SIZES = {"1M": 512, "10M": 1600, "50M": 3536}  # width of four square layers: 4 * w^2 parameters
# GPU sizes: (d_model, layers) of a stack of transformer encoder layers (about 12 d^2 parameters a layer)
GPU_SIZES = {"100M": (768, 14), "1B": (2048, 20)}
GPU_STEPS = {"100M": 100, "1B": 30}
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


def make_transformer(size: str, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    d, layers = GPU_SIZES[size]
    torch.manual_seed(0)
    with torch.device(device):  # built on the GPU: initialising 1B parameters on the CPU takes a minute
        stack = [torch.nn.TransformerEncoderLayer(d, d // 64, 4 * d, batch_first=True) for _ in range(layers)]
        return torch.nn.Sequential(*stack).to(dtype)


def _gpu_overhead(rank: int, world_size: int, size: str, dtype_name: str, impl: str, steps: int) -> dict[str, Any]:
    """Wrapper vs bare AdamW step on one GPU: alternated and synchronised step by step (host + device time),
    back to back without synchronising (what a training loop sees: host time hidden behind the device), the
    host time of the call alone, and bare AdamW over bucket views (to tell the layout from the wrapper)."""
    device = torch.device("cuda", torch.cuda.current_device())
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    kw = {"fused": True} if impl == "fused" else {"foreach": True}
    out: dict[str, Any] = {}
    opts: dict[str, torch.optim.Optimizer] = {}
    for name in ("bare", "wrapper", "views"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        model = make_transformer(size, dtype, device)
        if name == "views":
            build_buckets(model.parameters(), 25)  # the wrapper's layout, without the wrapper
        inner = torch.optim.AdamW(model.parameters(), lr=1e-5, **kw)
        opts[name] = DecentOptimWrapper(inner) if name == "wrapper" else inner
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        opts[name].step()  # optimizer state allocated
        torch.cuda.synchronize()
        out[f"mem_{name}"] = torch.cuda.memory_allocated() - before
        if name == "bare":
            out["params"] = sum(p.numel() for p in model.parameters())
            out["param_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
            out["tensors"] = len(list(model.parameters()))
    names = list(opts)
    synced: dict[str, list[float]] = {n: [] for n in names}
    host: dict[str, list[float]] = {n: [] for n in names}
    for i in range(steps + 3):
        for n in names if i % 2 == 0 else names[::-1]:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            opts[n].step()
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            if i >= 3:
                synced[n].append(time.perf_counter() - t0)
                host[n].append(t1 - t0)
    pipelined: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(5):
        for n in names if rep % 2 == 0 else names[::-1]:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                opts[n].step()
            torch.cuda.synchronize()
            pipelined[n].append((time.perf_counter() - t0) / steps)
    for n in names:
        out[n] = statistics.median(synced[n])
        out[f"{n}_host"] = statistics.median(host[n])
        out[f"{n}_pipelined"] = statistics.median(pipelined[n])
    return out


def gpu_overhead_main(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {"machine": f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}",
                              "rows": []}
    head = (f"{'size':>5} {'dtype':>5} {'AdamW':>8} {'params':>8}{'bare ms':>9}{'wrapper':>9}{'synced':>8}"
            f"{'pipelined':>10}{'views':>7}{'host us':>14}{'extra mem':>10}")
    print(head)
    print("-" * len(head))
    for size in args.sizes:
        for dtype_name in args.dtypes:
            for impl in args.impls:
                r = run_local(_gpu_overhead, 1, size, dtype_name, impl, GPU_STEPS[size], timeout=1200,
                              backend="nccl")[0]
                row = {"size": size, "dtype": dtype_name, "impl": impl, "params": r["params"],
                       "param_tensors": r["tensors"], "bare_step_ms": r["bare"] * 1e3,
                       "wrapper_step_ms": r["wrapper"] * 1e3, "views_step_ms": r["views"] * 1e3,
                       "overhead": r["wrapper"] / r["bare"] - 1.0,
                       "bare_pipelined_ms": r["bare_pipelined"] * 1e3,
                       "wrapper_pipelined_ms": r["wrapper_pipelined"] * 1e3,
                       "views_pipelined_ms": r["views_pipelined"] * 1e3,
                       "overhead_pipelined": r["wrapper_pipelined"] / r["bare_pipelined"] - 1.0,
                       "views_overhead_pipelined": r["views_pipelined"] / r["bare_pipelined"] - 1.0,
                       "bare_host_us": r["bare_host"] * 1e6, "wrapper_host_us": r["wrapper_host"] * 1e6,
                       "extra_memory_x_params": (r["mem_wrapper"] - r["mem_bare"]) / r["param_bytes"]}
                report["rows"].append(row)
                print(f"{size:>5} {dtype_name:>5} {impl:>8} {r['params'] / 1e6:>7.0f}M{row['bare_step_ms']:>9.3f}"
                      f"{row['wrapper_step_ms']:>9.3f}{row['overhead']:>+8.1%}{row['overhead_pipelined']:>+10.1%}"
                      f"{row['views_overhead_pipelined']:>+7.1%}{row['bare_host_us']:>7.0f}/{row['wrapper_host_us']:<6.0f}"
                      f"{row['extra_memory_x_params']:>9.4f}x", flush=True)
    print("synced: alternated steps, each synchronised (host + device time); pipelined: back to back, what a "
          "training loop sees; views: bare AdamW over bucket views; host: the call alone (bare/wrapper)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"written to {args.out}")
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=None, choices=list(SIZES) + list(GPU_SIZES))
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: one GPU per rank over NCCL (with a single GPU use --workers 1)")
    parser.add_argument("--out", type=Path, default=Path("results/step_benchmark.json"))
    parser.add_argument("--gpu-overhead", action="store_true",
                        help="one GPU: wrapper vs bare AdamW step (sizes 100M and 1B)")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--impls", nargs="+", default=["foreach", "fused"], choices=["foreach", "fused"])
    args = parser.parse_args(argv)
    if args.gpu_overhead:
        if not torch.cuda.is_available():
            parser.error("--gpu-overhead needs a CUDA device")
        args.sizes = args.sizes or list(GPU_SIZES)
        if any(s not in GPU_SIZES for s in args.sizes):
            parser.error(f"--gpu-overhead sizes are {list(GPU_SIZES)}")
        return gpu_overhead_main(args)
    args.sizes = args.sizes or list(SIZES)
    if any(s not in SIZES for s in args.sizes):
        parser.error(f"sizes are {list(SIZES)} ({list(GPU_SIZES)} with --gpu-overhead)")
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
