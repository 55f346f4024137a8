"""The main job: decentralized training vs all-reduce on a real task, same data, steps and hyper-parameters.

    uv run python benchmarks/train_compare.py            # 4 workers, all methods
    uv run python benchmarks/train_compare.py --workers 8 --steps 600 --out results/run8

Trains an MLP on scikit-learn's bundled handwritten digits (1,797 8x8 images, shipped with the package: no
download), each worker on its own shard, with AdamW and these ways of keeping the workers together:

    ddp            torch DistributedDataParallel (gradient all-reduce every step)
    ring           DecentOptimWrapper, topology "ring"
    one-peer-exp   DecentOptimWrapper, topology "one-peer-exp"
    complete       DecentOptimWrapper, topology "complete" (parameter all-reduce every step)
    ring+bf16      the same with wire_dtype=torch.bfloat16: half the bytes on the wire (also one-peer-exp+bf16)
    ring+lowrank4  compression=LowRank(rank=4): a pair sends rank-4 factors of its difference for each matrix
                   (PowerGossip); any spelling of benchmarks/gossip_methods.py works, e.g. one-peer-exp+delay2
    local          no communication at all (each worker alone; averaged only for evaluation)

It launches the workers itself (gloo on CPU; NCCL when every worker can have its own GPU) and writes, under
--out: summary.json, summary.csv, curves.csv and loss.png / consensus.png. The table it prints gives, for
each method: test accuracy of the globally averaged model and of worker 0's own model, final training loss,
consensus distance sqrt(mean_i ||x_i - mean x||^2), time per iteration and the part of it spent in
``step()``, bytes each worker sends per step and peak memory (RSS) per worker; a legend under it says what
each column means.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import resource
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from decent_optim_wrapper import DecentOptimWrapper
from decent_optim_wrapper.launch import run_local, shared_counter

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gossip_methods  # noqa: E402  (a sibling file, not a package)

METHODS = ["ddp", "ring", "one-peer-exp", "complete", "ring+bf16", "one-peer-exp+bf16", "ring+lowrank4", "local"]


def _method(name: str) -> str:
    """argparse type: ddp, local or a gossip spelling."""
    if name not in ("ddp", "local"):
        try:
            gossip_methods.parse(name)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return name


def load_digits_split(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits, standardised with training statistics; 20% held out for testing."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_test = len(x) // 5
    x_train, y_train, x_test, y_test = x[n_test:], y[n_test:], x[:n_test], y[:n_test]
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-3)
    return (x_train - mean) / std, y_train, (x_test - mean) / std, y_test


def make_model(hidden: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden),
                               torch.nn.ReLU(), torch.nn.Linear(hidden, 10))


@torch.no_grad()
def consensus_distance(model: torch.nn.Module, world_size: int) -> float:
    """sqrt(mean_i ||x_i - mean_j x_j||^2) over all parameters; the same formula for every method."""
    flat = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
    mean = flat.clone()
    dist.all_reduce(mean)
    mean /= world_size
    sq = (flat - mean).square().sum()
    dist.all_reduce(sq)
    return math.sqrt(sq.item() / world_size)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def _worker(rank: int, world_size: int, method: str, cfg: dict[str, Any], progress: Any) -> dict[str, Any]:
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    x_train, y_train, x_test, y_test = (t.to(device) for t in load_digits_split(cfg["seed"]))
    x_shard, y_shard = x_train[rank::world_size], y_train[rank::world_size]
    model = make_model(cfg["hidden"]).to(device)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    inner_model: torch.nn.Module = model
    if method == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(inner_model)
    adamw = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    opt: torch.optim.Optimizer = adamw
    if method not in ("ddp", "local"):
        topology, kwargs = gossip_methods.parse(method)
        opt = DecentOptimWrapper(adamw, topology=topology, timeout=300, **kwargs)

    g = torch.Generator().manual_seed(cfg["seed"] * 1000 + rank)
    losses, consensus, iter_times, step_times = [], [], [], []
    order = torch.randperm(len(x_shard), generator=g)
    pos = 0
    for step in range(cfg["steps"]):
        if pos + cfg["batch_size"] > len(order):
            order, pos = torch.randperm(len(x_shard), generator=g), 0
        idx = order[pos:pos + cfg["batch_size"]].to(device)
        pos += cfg["batch_size"]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = F.cross_entropy(model(x_shard[idx]), y_shard[idx])
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        iter_times.append(t2 - t0)
        step_times.append(t2 - t1)
        losses.append(loss.item())
        if step % cfg["eval_every"] == 0 or step == cfg["steps"] - 1:
            consensus.append((step, consensus_distance(inner_model, world_size)))
        if rank == 0:
            with progress.get_lock():
                progress.value += 1

    local_acc = accuracy(inner_model, x_test, y_test)
    if isinstance(opt, DecentOptimWrapper):
        opt.global_avg(may_revert=False)
        sent = opt.comm_stats.bytes_sent / cfg["steps"]
        extra = opt.gossip.buffer_bytes()
    else:
        with torch.no_grad():
            for p in inner_model.parameters():  # the same global average, for evaluation
                dist.all_reduce(p)
                p /= world_size
        # DDP all-reduces every gradient each step; a ring all-reduce sends 2(n-1)/n of the data
        sent = param_bytes * 2 * (world_size - 1) / world_size if method == "ddp" else 0.0
        extra = param_bytes if method == "ddp" else 0  # DDP's gradient buckets
    avg_acc = accuracy(inner_model, x_test, y_test)
    warm = max(1, len(iter_times) // 10)
    return {
        "losses": losses, "consensus": consensus, "local_acc": local_acc, "avg_acc": avg_acc,
        "iter_ms": statistics.median(iter_times[warm:]) * 1e3, "step_ms": statistics.median(step_times[warm:]) * 1e3,
        "bytes_per_step": sent, "param_bytes": param_bytes, "extra_bytes": extra,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_method(method: str, workers: int, cfg: dict[str, Any], bar: Any) -> list[dict[str, Any]]:
    backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= workers else "gloo"
    progress = shared_counter()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["out"] = run_local(_worker, workers, method, cfg, progress, backend=backend, timeout=1800,
                                   pg_timeout_s=600)
        except BaseException as exc:  # re-raised in the main thread
            box["err"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    done = 0
    while thread.is_alive():
        thread.join(0.2)
        now = progress.value
        if bar is not None and now > done:
            bar.update(now - done)
            done = now
    if "err" in box:
        raise box["err"]
    if bar is not None and cfg["steps"] > done:
        bar.update(cfg["steps"] - done)
    return box["out"]


def summarise(method: str, per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(per_rank)
    tail = max(1, len(per_rank[0]["losses"]) // 10)
    return {
        "method": method,
        "test_acc_global_avg": per_rank[0]["avg_acc"],
        "test_acc_worker0": per_rank[0]["local_acc"],
        "final_train_loss": statistics.mean(x for r in per_rank for x in r["losses"][-tail:]),
        "consensus_distance": per_rank[0]["consensus"][-1][1],
        "iter_ms": max(r["iter_ms"] for r in per_rank),
        "step_ms": max(r["step_ms"] for r in per_rank),
        "bytes_per_step": per_rank[0]["bytes_per_step"],
        "bytes_per_step_x_model": per_rank[0]["bytes_per_step"] / per_rank[0]["param_bytes"],
        "extra_memory_x_params": per_rank[0]["extra_bytes"] / per_rank[0]["param_bytes"],
        "peak_rss_mib": max(r["peak_rss_mib"] for r in per_rank),
        "workers": n,
    }


# Printed under the table: what each column is (the step column is easily misread as the wrapper's overhead).
LEGEND = """\
acc(avg): test accuracy of the global average of the workers' models; acc(w0): of worker 0's own model.
loss: training loss, mean over workers of the last 10% of steps; consensus: sqrt(mean_i ||x_i - mean x||^2).
iter ms: one iteration (zero_grad, forward, backward, step), median over steps after the first 10%, slowest
worker. step ms: the part of it spent in step(). For the gossip methods that is mostly waiting for the
previous round's exchange and mixing it into the parameters (the communication the forward and backward
did not hide), then AdamW's update and the next round's launch: not the wrapper's overhead (about 12 us with
nothing to send, benchmarks/README.md). For ddp it is AdamW's update alone: DDP all-reduces the gradients
inside backward, so its communication is in iter ms.
sent/step: bytes each worker sends per step (x model: in model-sizes); peak MiB: peak RSS per worker."""


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'method':<18}{'acc(avg)':>9}{'acc(w0)':>9}{'loss':>8}{'consensus':>11}{'iter ms':>9}"
            f"{'step ms':>9}{'sent/step':>11}{'(x model)':>10}{'peak MiB':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['method']:<18}{r['test_acc_global_avg']:>9.3f}{r['test_acc_worker0']:>9.3f}"
            f"{r['final_train_loss']:>8.4f}{r['consensus_distance']:>11.4f}{r['iter_ms']:>9.2f}{r['step_ms']:>9.2f}"
            f"{r['bytes_per_step'] / 1024:>9.1f}KB{r['bytes_per_step_x_model']:>9.2f}x{r['peak_rss_mib']:>10.0f}"
        )
    return "\n".join(lines + ["", LEGEND])


# One look per method, the same in every panel, so that curves lying on top of one another stay
# distinguishable: a colour, a line style, and markers that each method places at its own offset.
_LINES = ["-", "--", "-.", ":"]
_MARKERS = ["o", "s", "^", "v", "D", "x", "P", "*"]


def _style(i: int, n_points: int) -> dict[str, Any]:
    every = max(1, n_points // 8)
    return {"color": f"C{i % 10}", "linestyle": _LINES[i % len(_LINES)], "marker": _MARKERS[i % len(_MARKERS)],
            "markersize": 5, "markevery": (i * every // len(_MARKERS) % every, every), "markerfacecolor": "none",
            "linewidth": 1.3}


def _smoothed_loss(per_rank: list[dict[str, Any]]) -> list[float]:
    """The training loss, mean over workers, moving average over ~2% of the run (for readability)."""
    mean = [statistics.mean(r["losses"][s] for r in per_rank) for s in range(len(per_rank[0]["losses"]))]
    k = max(1, len(mean) // 50)
    return [statistics.mean(mean[max(0, i - k + 1):i + 1]) for i in range(len(mean))]


def write_outputs(out: Path, rows: list[dict[str, Any]], curves: dict[str, list[dict[str, Any]]],
                  cfg: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps({"config": cfg, "results": rows}, indent=2))
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(out / "curves.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "step", "train_loss_mean_over_workers", "consensus_distance"])
        for method, per_rank in curves.items():
            cons = dict(per_rank[0]["consensus"])
            for step in range(len(per_rank[0]["losses"])):
                mean_loss = statistics.mean(r["losses"][step] for r in per_rank)
                w.writerow([method, step, f"{mean_loss:.6f}", f"{cons[step]:.6f}" if step in cons else ""])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title = f"{cfg['workers']} workers, digits MLP, AdamW lr={cfg['lr']}"
    loss = {method: _smoothed_loss(per_rank) for method, per_rank in curves.items()}
    style = {method: _style(i, len(values)) for i, (method, values) in enumerate(loss.items())}
    # The gossip methods' losses nearly coincide on a log scale: below the losses, each method's relative to
    # DDP's, then each gossip method's relative to their mean, where their differences show.
    gossip = [m for m in loss if m not in ("ddp", "local")]
    panels: list[tuple[str, dict[str, list[float]], bool]] = [("training loss (mean over workers, smoothed)", loss,
                                                               True)]
    if "ddp" in loss:
        panels.append(("loss / DDP's loss", {m: [v / d for v, d in zip(loss[m], loss["ddp"])] for m in loss}, True))
    if len(gossip) > 1:
        mean = [statistics.mean(vs) for vs in zip(*(loss[m] for m in gossip))]
        panels.append(("gossip: loss vs their mean, %",
                       {m: [100.0 * (v / c - 1.0) for v, c in zip(loss[m], mean)] for m in gossip}, False))
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.2 + 2.1 * len(panels)), dpi=120, sharex=True,
                             squeeze=False, gridspec_kw={"height_ratios": [3] + [2] * (len(panels) - 1)})
    for ax, (label, series, log) in zip(axes[:, 0], panels):
        for method, values in series.items():
            ax.plot(range(len(values)), values, label=method, **style[method])
        ax.set_ylabel(label, fontsize=9)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].set_title(title)
    axes[0][0].legend(ncol=2, fontsize=8)
    axes[-1][0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out / "loss.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for i, (method, per_rank) in enumerate(curves.items()):
        steps, values = zip(*per_rank[0]["consensus"])
        ax.plot(steps, values, label=method, **_style(i, len(steps)))
    ax.set_xlabel("step")
    ax.set_ylabel("consensus distance")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(ncol=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "consensus.png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=32, help="per worker")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--eval-every", type=int, default=10, help="steps between consensus measurements")
    parser.add_argument("--methods", nargs="+", default=METHODS, type=_method,
                        help=f"default: {' '.join(METHODS)}; gossip: {gossip_methods.SPELLING}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.steps < 1:
        parser.error("--workers and --steps must be >= 1")
    cfg = {"workers": args.workers, "steps": args.steps, "batch_size": args.batch_size, "hidden": args.hidden,
           "lr": args.lr, "weight_decay": args.weight_decay, "eval_every": args.eval_every, "seed": args.seed}
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=args.steps * len(args.methods), unit="step", desc="training")
    curves, rows = {}, []
    t0 = time.time()
    for method in args.methods:
        if bar is not None:
            bar.set_description(method)
        curves[method] = run_method(method, args.workers, cfg, bar)
        rows.append(summarise(method, curves[method]))
    if bar is not None:
        bar.close()
    write_outputs(args.out, rows, curves, cfg)
    print(format_table(rows))
    print(f"\n{args.workers} workers x {args.steps} steps, batch {args.batch_size} per worker, "
          f"{time.time() - t0:.0f} s in all. Written to {args.out}/: summary.json, summary.csv, curves.csv, "
          "loss.png, consensus.png")
    return rows


if __name__ == "__main__":
    main()
