"""Check the cost model of ``decent_optim_wrapper.analysis`` against emulated-cluster measurements.

    uv run python benchmarks/cost_model_check.py benchmarks/results/cluster/lm-4x1-1gbit/summary.json ...

(every summary given must have the ``local`` run and one that sends the model or part of it: they give the
model's inputs; the slow-link anchors are not modelled and are left out; gossip methods are read with
``gossip_methods.parse``, so ``+lowrank<R>``, ``+delay<D>`` and ``+every<H>`` are priced too)

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
import sys
from pathlib import Path
from typing import Any

from decent_optim_wrapper import GossipConfig, LowRank
from decent_optim_wrapper.analysis import Network, predict_ddp, predict_gossip, time_lowrank_work, time_round_work
from decent_optim_wrapper.plan import Plan

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import anchors  # noqa: E402  (sibling files, not a package)
import gossip_methods  # noqa: E402
import workloads  # noqa: E402


def matrices(cfg: dict[str, Any], low: LowRank, world_size: int) -> list[tuple[int, int]]:
    """``(rows, cols)`` of the run's parameters that travel as factors under ``low`` (the plan's rule)."""
    model = workloads.build(cfg["workload"], 0, world_size, cfg["batch_size"], cfg["lr"], cfg["seed"]).model
    plan = Plan(GossipConfig(compression=low))
    return [(p.shape[0], p.numel() // p.shape[0]) for p in model.parameters() if plan.lowrank(p)]


def host_cost(loopback: Path, ranks_per_core: float) -> float:
    """Seconds of a rank's time per byte sent or received, from the loopback exchange (2 ranks, 2 cores)."""
    rows = json.loads(loopback.read_text())["rows"]
    big = max(rows, key=lambda r: r["numel"])
    moved = 2 * 4 * big["numel"]  # float32, sent and received
    return big["p2p"] / moved * ranks_per_core


def check(summary: Path, loopback: Path, cores: int, recorded: dict[str, dict[str, float]] | None = None,
          local_from: Path | None = None) -> list[dict[str, object]]:
    """Rows of predicted against measured time per iteration; ``recorded``: the kernel times (ms, by group size
    and wire bytes, ``"2x4"``) per run to use instead of timing them; ``local_from``: a summary whose ``local`` run
    gives the compute, for a run that has none (the same workload and cluster)."""
    d = json.loads(summary.read_text())
    cfg, results = d["config"], {r["method"]: r for r in d["results"]}
    if "local" not in results:
        if local_from is None:
            raise SystemExit(f"{summary} has no `local` run, which gives the model the compute: add one to the run, "
                             "or pass --local-from with a summary of the same workload and cluster that has one")
        other = json.loads(local_from.read_text())
        alone = next((r for r in other["results"] if r["method"] == "local"), None)
        shape = ("workload", "hosts", "procs_per_host")
        if alone is None or [other["config"][k] for k in shape] != [cfg[k] for k in shape]:
            raise SystemExit(f"--local-from {local_from} has no `local` run of {summary}'s workload and cluster")
        results["local"] = alone
    hosts, local = cfg["hosts"], cfg["procs_per_host"]
    n = hosts * local
    # the model's size: from any run that sent something (bytes per step / the same as model-sizes)
    sent = results.get("ddp") or next(r for r in results.values() if r["wire_x_model"] > 0)
    model_bytes = sent["wire_bytes_per_host_step"] / sent["wire_x_model"]
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

    def lowrank_work(mats: list[tuple[int, int]], r: int) -> float:
        key = f"lowrank{r}"
        if key not in times:
            times[key] = time_lowrank_work(mats, r) * (n / cores) * 1e3
        return times[key] * 1e-3

    rows = []
    for method, r in results.items():
        if method == "local" or anchors.parse(method) is not None:  # the anchors have no model here
            continue
        if method in ("ddp", "ddp-bf16"):
            pred = predict_ddp(n, model_bytes, compute, net, local, 2 if method == "ddp-bf16" else 4)
        else:
            topology, kw = gossip_methods.parse(method)
            wire_bytes = 2 if "wire_dtype" in kw else 4
            low, layout, round_work = kw.get("compression"), None, work
            if low is not None:
                mats = matrices(cfg, low, n)
                layout = (low.rank, mats)
                dense = 1.0 - 4.0 * sum(a * b for a, b in mats) / model_bytes  # what still travels as values

                def round_work(k: int, w: int, mats: list[tuple[int, int]] = mats, r: int = low.rank,
                               dense: float = dense) -> float:
                    return work(k, w) * dense + (k - 1) * lowrank_work(mats, r)  # edge by edge: k-1 edges
            pred = predict_gossip(topology, n, model_bytes, compute, net, local, wire_bytes, round_work, step,
                                  max_delay=kw.get("max_delay", 1), gossip_every=kw.get("gossip_every", 1),
                                  lowrank=layout)
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
    parser.add_argument("--local-from", type=Path, help="a summary.json whose `local` run gives the compute to runs "
                        "without one (the same workload and cluster)")
    args = parser.parse_args()
    if args.cores < 1:
        parser.error(f"--cores must be >= 1, got {args.cores}")
    recorded = None
    if args.round_work is not None:
        recorded = {str(r["run"]): r["round_work_ms"] for r in json.loads(args.round_work.read_text())}
    rows = [row for s in args.summaries for row in check(s, args.loopback, args.cores, recorded, args.local_from)]
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
