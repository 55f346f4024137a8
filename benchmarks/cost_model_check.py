"""Check the cost model of ``decent_optim_wrapper.analysis`` against emulated-cluster measurements.

    uv run python benchmarks/cost_model_check.py benchmarks/results/cluster/lm-4x1-1gbit/summary.json ...

(every summary given must have the ``ddp`` and ``local`` runs: they give the model's inputs)

For each ``cluster_compare.py`` summary: the model's inputs are taken from that run alone (model bytes from
the bytes counted per step, compute and the optimizer's step from its no-communication run ``local``,
bandwidth from the TCP stream measured on its link, no latency: the cluster adds none); the host's CPU cost per
byte moved comes from the loopback pairwise exchange (``results/pairwise/loopback.json``: the largest tensor's
two-connection exchange, on a core per rank there, scaled by the ranks per core of the cluster run), and the
CPU time to prepare and apply a round from the package's own kernels timed here on one core at the run's model
size (``analysis.time_round_work``; rounding to bf16 and the symmetric correction are most of a compressed
round's CPU cost), scaled the same way. Nothing is fitted to the figures it predicts. Prints predicted against
measured time per iteration and the error; writes JSON with ``--out``, each row with the kernel times it used
(``round_work_ms``). ``--round-work FILE`` takes those times from such a file instead of timing the kernels
again: the predictions are then a pure function of the committed measurements (tests/test_analysis.py checks
the published validation that way, independent of how busy the machine running it is).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from decent_optim_wrapper.analysis import Network, predict_ddp, predict_gossip, time_round_work

HERE = Path(__file__).resolve().parent


def host_cost(loopback: Path, ranks_per_core: float) -> float:
    """Seconds of a rank's time per byte sent or received, from the loopback exchange (2 ranks, 2 cores)."""
    rows = json.loads(loopback.read_text())["rows"]
    big = max(rows, key=lambda r: r["numel"])
    moved = 2 * 4 * big["numel"]  # float32, sent and received
    return big["p2p"] / moved * ranks_per_core


def check(summary: Path, loopback: Path, cores: int,
          recorded: dict[str, dict[str, float]] | None = None) -> list[dict[str, object]]:
    """Rows of predicted against measured time per iteration; ``recorded``: the kernel times (ms, by group size
    and wire bytes, ``"2x4"``) per run to use instead of timing them."""
    d = json.loads(summary.read_text())
    cfg, results = d["config"], {r["method"]: r for r in d["results"]}
    hosts, local = cfg["hosts"], cfg["procs_per_host"]
    n = hosts * local
    ddp = results["ddp"]
    model_bytes = ddp["wire_bytes_per_host_step"] / ddp["wire_x_model"]
    compute = results["local"]["iter_ms"] * 1e-3
    step = results["local"].get("inner_ms", 0.0) * 1e-3  # runs recorded before the breakdown existed: 0
    net = Network(bandwidth=cfg["measured_rate"] / 8, host_s_per_byte=host_cost(loopback, n / cores))
    name = summary.parent.name  # the run's directory, e.g. lm-2x2-1gbit: unique where settings repeat
    times: dict[str, float] = dict(recorded[name]) if recorded is not None else {}

    def work(k: int, wire_bytes: int) -> float:
        """Seconds to prepare and apply a round of group size k (timed once, float32 parameters)."""
        key = f"{k}x{wire_bytes}"
        if key not in times:
            times[key] = time_round_work(int(model_bytes) // 4, k, wire_bytes) * (n / cores) * 1e3
        return times[key] * 1e-3

    rows = []
    for method, r in results.items():
        if method == "local":
            continue
        topology, _, wire = method.partition("+")
        wire_bytes = 2 if wire or method == "ddp-bf16" else 4
        if topology in ("ddp", "ddp-bf16"):
            pred = predict_ddp(n, model_bytes, compute, net, local, wire_bytes)
        else:
            pred = predict_gossip(topology, n, model_bytes, compute, net, local, wire_bytes, work, step)
        measured = r["iter_ms"] * 1e-3
        rows.append({"run": name, "method": method, "measured_ms": measured * 1e3, "predicted_ms": pred * 1e3,
                     "error": pred / measured - 1.0})
    for row in rows:
        row["round_work_ms"] = dict(times)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("summaries", nargs="+", type=Path, help="cluster_compare.py summary.json files")
    parser.add_argument("--loopback", type=Path, default=HERE / "results" / "pairwise" / "loopback.json")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="cores the cluster runs shared")
    parser.add_argument("--out", type=Path, help="write the rows as JSON")
    parser.add_argument("--round-work", type=Path, help="take the kernel times from this --out file, not timing them")
    args = parser.parse_args()
    if args.cores < 1:
        parser.error(f"--cores must be >= 1, got {args.cores}")
    recorded = None
    if args.round_work is not None:
        recorded = {str(r["run"]): r["round_work_ms"] for r in json.loads(args.round_work.read_text())}
    rows = [row for s in args.summaries for row in check(s, args.loopback, args.cores, recorded)]
    print(f"{'run':<28}{'method':<22}{'measured ms':>12}{'predicted ms':>14}{'error':>8}")
    for r in rows:
        print(f"{r['run']:<28}{r['method']:<22}{r['measured_ms']:>12.1f}{r['predicted_ms']:>14.1f}"
              f"{r['error']:>+8.0%}")
    worst = max(rows, key=lambda r: abs(float(r["error"])))  # type: ignore[arg-type]
    within = sum(abs(float(r["error"])) <= 0.25 for r in rows)  # type: ignore[arg-type]
    print(f"{within} of {len(rows)} within 25%; largest error {float(worst['error']):+.0%} "  # type: ignore[arg-type]
          f"({worst['run']}, {worst['method']})")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
