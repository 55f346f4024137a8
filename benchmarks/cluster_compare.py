"""DDP vs decentralized training on an emulated cluster: real multi-node launches over shaped links.

    sudo uv run python benchmarks/cluster_compare.py                       # 4 hosts x 1 rank, 1 Gbit/s, lm
    sudo uv run python benchmarks/cluster_compare.py --hosts 2 --procs-per-host 2 --rate 1gbit
    sudo uv run python benchmarks/cluster_compare.py --hosts 4 --rate 100mbit --workload mlp --steps 200

Builds the cluster of ``cluster.py`` (``--hosts`` network namespaces, each link shaped to ``--rate`` both
ways), then for each method launches one ``torchrun`` per host (c10d rendezvous at host 0, gloo over the
shaped interface, ``--procs-per-host`` ranks per host sharing its link), all with the same data, seeds and
step budget:

    ddp                    torch DistributedDataParallel (gradient all-reduce in backward)
    ddp-bf16               DDP with bf16_compress_hook (gradients all-reduced in bfloat16)
    ring, one-peer-exp,    DecentOptimWrapper with that topology (any registered topology works)
    complete, ...
    alternating-exp-ring   hierarchical: inside a host, then one peer across hosts (default when P > 1)
    <topology>+bf16        DecentOptimWrapper(..., wire_dtype=torch.bfloat16), where the package has it
    ...+lowrank<R>         compression=LowRank(rank=R); +delay<D>: max_delay=D; +every<H>: gossip_every=H
                           (benchmarks/gossip_methods.py), e.g. one-peer-exp+lowrank1+delay2
    local                  no communication: each rank trains alone (averaged only for evaluation)
    ddp-powersgd-r<R>      slow-link anchors (benchmarks/anchors.py): DDP + PowerSGD of rank R, torch's post-local
    localsgd-<H>           SGD averaging every H steps, DiLoCo syncing every H steps; optional settings in
    diloco-<H>             the name, e.g. ddp-powersgd-r4-s20+bf16, localsgd-8-w0, diloco-16-lr3e-4

It reports time per iteration (for a method that talks every H steps, the mean over whole periods), bytes per
host per step on the shaped link (interface counters, the same for every method) and on ``lo`` (traffic
between ranks of one host), the validation loss of the globally averaged model against steps and against
training wall-clock (evaluation excluded), and the wall-clock each method needs to reach a target validation
loss (``--target``, or by default the loss DDP reaches at 80% of the budget), and the CPU each step costs (each
rank's user and system time, and the machine's busy, system and softirq time). ``--repeat N`` launches every
method N times, interleaved, each repetition in a rotated order; a method's row is its median launch (on a
2-core machine one method's iteration time varies by up to 10% from one launch to the next, and a first launch
on a new cluster can run 20% slower: more than the differences between some methods).
Writes summary.json, summary.csv, curves.csv,
val_loss_vs_time.png and val_loss_vs_step.png under --out. Needs root (network namespaces).
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import anchors  # noqa: E402  (sibling files, not a package)
import gossip_methods  # noqa: E402
from cluster import (  # noqa: E402
    TBF_LATENCY_MS,
    Cluster,
    ClusterError,
    NeedRootError,
    available_tcp_cc,
    format_rate,
    parse_rate,
    require_privileges,
)

WORKER = Path(__file__).resolve().parent / "cluster_worker.py"
# Per workload: steps, batch per worker, learning rate. The step budgets keep the default run (4 hosts x 1 rank,
# 1 Gbit/s, 6 methods) under 20 minutes on 2 cores, starts and evaluation included.
DEFAULTS = {"lm": {"steps": 240, "batch_size": 2, "lr": 2e-3}, "mlp": {"steps": 200, "batch_size": 32, "lr": 0.01}}
TARGET_FRACTION = 0.8


def has_wire_dtype() -> bool:
    from decent_optim_wrapper import DecentOptimWrapper

    return "wire_dtype" in inspect.signature(DecentOptimWrapper).parameters


def default_methods(procs_per_host: int) -> list[str]:
    methods = ["ddp", "ddp-bf16", "ring", "one-peer-exp", "complete"]
    if procs_per_host > 1:
        methods.append("alternating-exp-ring")
    if has_wire_dtype():
        methods.append("one-peer-exp+bf16")
    return methods + ["local"]


def check_method(method: str) -> None:
    """Raise ValueError for a method name the worker would not know."""
    from decent_optim_wrapper import TopologyFactory

    if method in ("ddp", "ddp-bf16", "local") or anchors.parse(method) is not None:
        return
    if method.partition("+")[0] not in TopologyFactory.available():
        raise ValueError(f"Unknown method={method!r}. Must be ddp, ddp-bf16, local, an anchor (ddp-powersgd-r<R>, "
                         f"localsgd-<H>, diloco-<H>) or gossip: {gossip_methods.SPELLING} with a topology of "
                         f"{sorted(TopologyFactory.available())}.")
    if "wire_dtype" in gossip_methods.parse(method)[1] and not has_wire_dtype():
        raise ValueError(f"Invalid method={method!r}: this version of DecentOptimWrapper has no wire_dtype.")


# ---------------------------------------------------------------------- running
def launch_order(methods: list[str], repeat: int) -> list[tuple[int, str]]:
    """(repetition, method) in the order they run: every method once per repetition, each repetition's order
    rotated by one, so that no method always runs first (the first launch on a fresh machine can be slower)
    or always after the same neighbour."""
    if repeat < 1:
        raise ValueError(f"Invalid repeat={repeat}. Must be >= 1.")
    k = len(methods)
    return [(r, methods[(r + i) % k]) for r in range(repeat) for i in range(k)]


def median_run(iter_ms: list[float]) -> int:
    """Index of the repetition whose iteration time is the median (the lower one of two middles)."""
    if not iter_ms:
        raise ValueError("Invalid iter_ms=[]: need at least one repetition.")
    order = sorted(range(len(iter_ms)), key=lambda i: (iter_ms[i], i))
    return order[(len(order) - 1) // 2]


def run_method(cluster: Cluster, method: str, cfg: dict[str, Any], out: Path, bar: Any,
               repetition: int | None = None) -> list[dict[str, Any]]:
    """One torchrun launch per host for ``method``; the per-rank results (under ``runs/<method>/<repetition>``
    when the run repeats)."""
    run_dir = out / "runs" / method
    if repetition is not None:
        run_dir = run_dir / str(repetition)
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    args = ["--method", method, "--workload", cfg["workload"], "--steps", str(cfg["steps"]),
            "--eval-steps", ",".join(map(str, cfg["eval_steps"])), "--batch-size", str(cfg["batch_size"]),
            "--lr", str(cfg["lr"]), "--seed", str(cfg["seed"]), "--out", str(run_dir.resolve()),
            "--timeout", str(cfg["timeout"])]
    t0 = time.monotonic()
    procs = cluster.torchrun(WORKER, args, cfg["procs_per_host"], run_dir / "logs")
    done = 0

    def poll() -> None:
        nonlocal done
        try:
            now = int((run_dir / "progress").read_text() or 0)
        except (FileNotFoundError, ValueError):
            return
        if bar is not None and now > done:
            bar.update(now - done)
            done = now

    cluster.wait(procs, timeout=cfg["timeout"], log_dir=run_dir / "logs", poll=poll)
    if bar is not None and cfg["steps"] > done:
        bar.update(cfg["steps"] - done)
    shutil.rmtree(run_dir / "snapshots")
    world = cfg["hosts"] * cfg["procs_per_host"]
    per_rank = [json.loads((run_dir / f"rank{r}.json").read_text()) for r in range(world)]
    per_rank[0]["launch_s"] = time.monotonic() - t0  # start-up, training, evaluation and shutdown
    return per_rank


# ---------------------------------------------------------------------- summarising
def curve(per_rank: list[dict[str, Any]]) -> list[tuple[int, float, float]]:
    """(step, training seconds, validation loss of the global average) at each evaluation point."""
    scored = {int(s): v for r in per_rank for s, v in r["val_loss"].items()}
    steps = sorted(int(s) for s in per_rank[0]["clock"])
    # The slowest rank's clock: the averaged model at step s exists once every rank has reached s.
    return [(s, max(r["clock"][str(s)] for r in per_rank), scored[s]) for s in steps]


def reach(points: list[tuple[int, float, float]], target: float) -> tuple[float, float] | None:
    """(step, seconds) at which the validation loss first reaches ``target``, linear between evaluations."""
    if points[0][2] <= target:
        return points[0][0], points[0][1]
    for (s0, t0, v0), (s1, t1, v1) in zip(points, points[1:]):
        if v1 <= target:
            f = 0.0 if v0 <= target else (v0 - target) / (v0 - v1)
            return s0 + f * (s1 - s0), t0 + f * (t1 - t0)
    return None


def summarise(method: str, per_rank: list[dict[str, Any]], cfg: dict[str, Any]) -> dict[str, Any]:
    steps = cfg["steps"]
    # Skip the first 10% (process-group connections, DDP's bucket rebuild: not steady state). A method that
    # talks every H steps is averaged over a whole number of periods, ending at the last step: any H
    # consecutive steps hold one communication, so the mean charges each its share whatever the phase.
    period = per_rank[0].get("period", 1)
    warm = max(1, steps // 10)
    warm = max(0, steps - max(period, (steps - warm) // period * period))
    hosts = [r["counters"] for r in per_rank if r["counters"] is not None]
    param_bytes = per_rank[0]["param_bytes"]
    wire = statistics.mean(c["wire_tx"] for c in hosts) / steps
    points = curve(per_rank)
    tail = max(1, steps // 10)
    slowest = max(per_rank, key=lambda r: statistics.mean(r["iter_s"][warm:]))
    return {
        "method": method,
        "iter_ms": max(statistics.mean(r["iter_s"][warm:]) for r in per_rank) * 1e3,
        # the slowest rank's breakdown (the iteration time is the slowest rank's too)
        **{f"{part}_ms": statistics.mean(slowest[f"{part}_s"][warm:]) * 1e3
           for part in ("step", "inner", "wait") if f"{part}_s" in slowest},
        "train_s": points[-1][1],
        "wire_bytes_per_host_step": wire,
        "wire_x_model": wire / param_bytes,
        "wire_rx_bytes_per_host_step": statistics.mean(c["wire_rx"] for c in hosts) / steps,
        "local_bytes_per_host_step": statistics.mean(c["lo_tx"] for c in hosts) / steps,
        # runs recorded before this counter existed: None
        "tcp_retrans_per_host_step": (statistics.mean(c["tcp_retrans"] for c in hosts) / steps
                                      if all("tcp_retrans" in c for c in hosts) else None),
        # CPU per step over the whole loop (runs recorded before these existed: None): each rank's own, as the
        # mean over ranks, and the machine's (every emulated host shares its cores)
        **_cpu_per_step(per_rank, steps),
        "final_val_loss": points[-1][2],
        "best_val_loss": min(p[2] for p in points),
        "final_train_loss": statistics.mean(x for r in per_rank for x in r["losses"][-tail:]),
        "launch_s": per_rank[0]["launch_s"],
        "period": period,
        "iter_window": [warm, steps],
        "setup": per_rank[0].get("setup"),
    }


def _cpu_per_step(per_rank: list[dict[str, Any]], steps: int) -> dict[str, float | None]:
    ranks = [r["cpu_s"] for r in per_rank if "cpu_s" in r]
    machine = next((r["machine_cpu_s"] for r in per_rank if r.get("machine_cpu_s")), None)
    out: dict[str, float | None] = {
        f"cpu_{k}_ms_per_rank_step": statistics.mean(c[k] for c in ranks) / steps * 1e3 if ranks else None
        for k in ("user", "system")}
    out.update({f"machine_{k}_ms_per_step": machine[k] / steps * 1e3 if machine else None
                for k in ("busy", "system", "softirq")})
    return out


def choose_target(cfg: dict[str, Any], curves: dict[str, list[tuple[int, float, float]]]) -> tuple[float, str]:
    if cfg["target"] is not None:
        return cfg["target"], "given with --target"
    ref = "ddp" if "ddp" in curves else next(iter(curves))
    at = TARGET_FRACTION * cfg["steps"]
    s, _, v = min(curves[ref], key=lambda p: abs(p[0] - at))
    return v, f"the validation loss {ref} reaches at step {s} ({s / cfg['steps']:.0%} of the budget)"


def fmt_mb(x: float) -> str:
    return f"{x / 1e6:.2f}"


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'method':<22}{'iter ms':>9}{'wait ms':>8}{'x local':>8}{'link MB':>9}{'x model':>8}{'lo MB':>7}"
            f"{'val loss':>9}{'steps to':>9}{'s to':>7}{'train s':>8}")
    sub = (f"{'':<22}{'':>9}{'':>8}{'':>8}{'/host/st':>9}{'':>8}{'/h/st':>7}{'(end)':>9}{'target':>9}{'target':>7}"
           f"{'':>8}")
    base = next((r["iter_ms"] for r in rows if r["method"] == "local"), None)
    lines = [head, sub, "-" * len(head)]
    for r in rows:
        ratio = f"{r['iter_ms'] / base:.2f}" if base else "-"
        reached = r["steps_to_target"] is not None
        steps_to = str(r["steps_to_target"]) if reached else "-"
        s_to = f"{r['s_to_target']:.1f}" if reached else "never"
        lines.append(
            f"{r['method']:<22}{r['iter_ms']:>9.1f}{r.get('wait_ms', 0.0):>8.1f}{ratio:>8}"
            f"{fmt_mb(r['wire_bytes_per_host_step']):>9}"
            f"{r['wire_x_model']:>7.2f}x{fmt_mb(r['local_bytes_per_host_step']):>7}{r['final_val_loss']:>9.4f}"
            f"{steps_to:>9}{s_to:>7}"
            f"{r['train_s']:>8.1f}"
        )
    return "\n".join(lines)


def write_outputs(out: Path, rows: list[dict[str, Any]], curves: dict[str, list[tuple[int, float, float]]],
                  cfg: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(
        {"config": cfg, "results": rows, "curves": {m: [list(p) for p in c] for m, c in curves.items()}}, indent=2))
    with open(out / "summary.csv", "w", newline="") as f:
        dw = csv.DictWriter(f, fieldnames=list(rows[0]))
        dw.writeheader()
        dw.writerows(rows)
    with open(out / "curves.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "step", "train_seconds", "val_loss_global_avg"])
        for method, points in curves.items():
            w.writerows([method, s, f"{t:.3f}", f"{v:.6f}"] for s, t, v in points)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title = (f"{cfg['hosts']} hosts x {cfg['procs_per_host']} rank(s), {format_rate(cfg['rate'])} links "
             f"(measured {format_rate(cfg['measured_rate'])}), {cfg['workload']}")
    for x_axis in ("time", "step"):
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
        for method, points in curves.items():
            ax.plot([p[1] if x_axis == "time" else p[0] for p in points], [p[2] for p in points], marker=".",
                    label=method)
        ax.axhline(cfg["target_val_loss"], color="grey", linestyle=":", linewidth=1, label="target")
        # The untrained model's loss (step 0) would squash the part that differs between methods: start the
        # axis at the highest loss of the second evaluation.
        later = [p[2] for points in curves.values() for p in points[1:]]
        low, high = (min(later), max(later)) if later else (0.0, 0.0)
        if high > low:
            ax.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
        ax.set_xlabel("training wall-clock, s (evaluation excluded)" if x_axis == "time" else "step")
        ax.set_ylabel("validation loss, globally averaged model")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"val_loss_vs_{x_axis}.png")
        plt.close(fig)


# ---------------------------------------------------------------------- main
def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Needs root: it creates network namespaces, veth pairs and tc qdiscs (CAP_NET_ADMIN, CAP_SYS_ADMIN). "
               "Run it as  sudo env PATH=\"$PATH\" uv run python benchmarks/cluster_compare.py ...  Without root, "
               "benchmarks/train_compare.py runs the comparison over loopback, with no link shaping.")
    parser.add_argument("--hosts", type=int, default=4, help="network namespaces (machines)")
    parser.add_argument("--procs-per-host", type=int, default=1, help="ranks per host, sharing its link")
    parser.add_argument("--rate", default="1gbit", help="each host link, each direction: 1gbit, 100mbit, ...")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay per link (needs netem)")
    parser.add_argument("--queue-ms", type=float, default=TBF_LATENCY_MS,
                        help="the longest a packet may wait in a link's queue before it is dropped (tbf's latency)")
    parser.add_argument("--tcp-cc", help="TCP congestion control of the hosts (e.g. cubic, bbr); default: the "
                        "machine's, recorded in summary.json either way")
    parser.add_argument("--workload", choices=["lm", "mlp"], default="lm")
    parser.add_argument("--steps", type=int, help="step budget, the same for every method (default per workload)")
    parser.add_argument("--batch-size", type=int, help="per rank (default per workload)")
    parser.add_argument("--lr", type=float, help="default per workload")
    parser.add_argument("--evals", type=int, default=12, help="evaluation points besides step 0")
    parser.add_argument("--target", type=float, help="validation loss for time-to-target (default: DDP's at 80%%)")
    parser.add_argument("--methods", nargs="+", help="default: ddp ddp-bf16 ring one-peer-exp complete "
                        "[alternating-exp-ring if P > 1] [one-peer-exp+bf16 if the package has wire_dtype] local")
    parser.add_argument("--repeat", type=int, default=1,
                        help="launches per method, interleaved (orders rotated); each row is the median launch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900, help="seconds one method may take")
    parser.add_argument("--out", type=Path, help="default results/cluster/<workload>-<H>x<P>-<rate>")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.hosts < 2 or args.procs_per_host < 1:
        parser.error("--hosts must be >= 2 and --procs-per-host >= 1")
    d = DEFAULTS[args.workload]
    steps = args.steps or d["steps"]
    if steps < 2 or args.evals < 1 or args.repeat < 1 or not args.queue_ms > 0:
        parser.error("--steps must be >= 2, --evals >= 1, --repeat >= 1 and --queue-ms > 0")
    if args.tcp_cc is not None and args.tcp_cc not in available_tcp_cc():
        parser.error(f"--tcp-cc {args.tcp_cc}: this kernel has {' '.join(sorted(available_tcp_cc()))}")
    try:
        require_privileges()  # before anything slow: say at once what is missing
    except ClusterError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2 if isinstance(exc, NeedRootError) else 1) from None
    methods = args.methods or default_methods(args.procs_per_host)
    try:
        rate = parse_rate(args.rate)
        for m in methods:
            check_method(m)
    except ValueError as exc:
        parser.error(str(exc))
    out = args.out or Path("results/cluster") / f"{args.workload}-{args.hosts}x{args.procs_per_host}-{args.rate}"
    eval_steps = sorted({round(i * steps / args.evals) for i in range(args.evals)})
    cfg: dict[str, Any] = {
        "hosts": args.hosts, "procs_per_host": args.procs_per_host, "rate": rate, "delay_ms": args.delay_ms,
        "queue_ms": args.queue_ms,
        "workload": args.workload, "steps": steps, "batch_size": args.batch_size or d["batch_size"],
        "lr": args.lr or d["lr"], "eval_steps": eval_steps, "seed": args.seed, "target": args.target,
        "timeout": args.timeout, "methods": methods, "repeat": args.repeat,
    }
    # SIGTERM (a scheduler, `kill`) unwinds like Ctrl-C, so the cluster is removed the same way. SIGINT too,
    # also where the shell started this in the background with SIGINT ignored (Python then never handles it).
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    t_start = time.time()
    bar = None
    try:
        with Cluster(args.hosts, rate, args.delay_ms, queue_ms=args.queue_ms, tcp_cc=args.tcp_cc) as cluster:
            cfg["tcp_cc"] = cluster.tcp_cc()
            cfg["measured_rate"] = cluster.measure_rate()
            print(f"{args.hosts} hosts x {args.procs_per_host} rank(s), link {format_rate(rate)} requested, "
                  f"{format_rate(cfg['measured_rate'])} measured (one TCP stream host 0 -> host 1, goodput: "
                  "TCP/IP/Ethernet headers take about 4.5% of the link)", flush=True)
            if not args.no_progress:
                from tqdm import tqdm

                bar = tqdm(total=steps * len(methods) * args.repeat, unit="step")
            launches: dict[str, list[list[dict[str, Any]]]] = {m: [] for m in methods}
            for rep, method in launch_order(methods, args.repeat):
                if bar is not None:
                    bar.set_description(method)
                launches[method].append(run_method(cluster, method, cfg, out, bar,
                                                   rep if args.repeat > 1 else None))
    except NeedRootError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None
    except ClusterError as exc:
        print(f"cluster_compare: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print("cluster_compare: interrupted; the cluster and its processes were removed", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        if bar is not None:
            bar.close()
    # Each method's row, curve and time to target come from its median launch, so that one slow launch (the
    # machine busy for a while) moves no figure; the others' iteration times are kept in the row.
    rows: list[dict[str, Any]] = []
    curves: dict[str, list[tuple[int, float, float]]] = {}
    for m, runs in launches.items():
        summaries, launch_curves = [summarise(m, r, cfg) for r in runs], [curve(r) for r in runs]
        k = median_run([x["iter_ms"] for x in summaries])
        row, curves[m] = summaries[k], launch_curves[k]
        row["iter_ms_runs"] = [x["iter_ms"] for x in summaries]
        # The runs are deterministic (same seeds and data, same schedule); a differing loss would be a bug.
        row["same_val_loss_in_every_run"] = len({tuple(p[2] for p in c) for c in launch_curves}) == 1
        rows.append(row)
    cfg["describe"] = launches[methods[0]][0][0]["describe"]
    cfg["target_val_loss"], cfg["target_rule"] = choose_target(cfg, curves)
    for row in rows:
        m = row["method"]
        hit = reach(curves[m], cfg["target_val_loss"])
        row["steps_to_target"] = None if hit is None else round(hit[0])
        row["s_to_target"] = None if hit is None else hit[1]
    write_outputs(out, rows, curves, cfg)
    print(format_table(rows))
    if args.repeat > 1:
        print(f"\n{args.repeat} launches per method, interleaved; each row is the median one. iter ms of each, in "
              "launch order:")
        for r in rows:
            note = "" if r["same_val_loss_in_every_run"] else "  (validation losses differ between launches!)"
            print(f"  {r['method']:<22}" + " ".join(f"{x:7.1f}" for x in r["iter_ms_runs"]) + note)
    print(f"\n{cfg['describe']}.")
    print(f"Target validation loss {cfg['target_val_loss']:.4f}: {cfg['target_rule']}; reached where the "
          "globally averaged model's loss crosses it, linear between evaluations.")
    print(f"iter ms: mean time per iteration after the first 10% of steps, slowest rank; wait ms: of it, blocked on "
          f"gossip rounds (comm_stats.wait_s; DDP's wait is inside backward); x local: over the "
          f"no-communication run. link MB/host/st: bytes each host sent on its shaped link per step; lo MB: "
          f"between ranks of one host. {steps} steps per method, {time.time() - t_start:.0f} s in all. "
          f"Written to {out}/: summary.json, summary.csv, curves.csv, val_loss_vs_time.png, val_loss_vs_step.png")
    return rows


if __name__ == "__main__":
    main()
