"""How a pair of ranks should exchange its buckets, measured: on loopback and on an emulated 2-host cluster.

    uv run python benchmarks/pairwise_exchange.py                          # 2 gloo ranks over loopback
    sudo uv run python benchmarks/pairwise_exchange.py --cluster 1gbit     # 2 hosts, each link shaped (root)

Times one whole pairwise round as the engine runs it (prepare, communicate, wait, apply the mix), in the same
run for every candidate, median over repeats:

    oneway       rank 0 sends, rank 1 receives (the link's one-way time, for reference)
    p2p-1conn    the engine's pair with both directions on one connection (what it did before this measurement)
    p2p          the engine's pair: on gloo each direction on a connection of its own (two process groups)
    allreduce    the engine's pair as c*x summed by a 2-rank all-reduce (pair_transport="allreduce")
    bf16         the engine's compressed pair (wire_dtype=bfloat16), two connections

``--cluster`` builds the emulated cluster of ``benchmarks/cluster.py`` (2 hosts, one rank each) and runs the
same measurement there through torchrun, gloo over the shaped interface.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from decent_optim_wrapper import GossipConfig  # noqa: E402
from decent_optim_wrapper.buckets import build_buckets  # noqa: E402
from decent_optim_wrapper.comm import ProcessGroups  # noqa: E402
from decent_optim_wrapper.gossip import Gossip  # noqa: E402
from decent_optim_wrapper.launch import run_local  # noqa: E402
from decent_optim_wrapper.plan import Plan  # noqa: E402
from decent_optim_wrapper.topo import Group, Schedule  # noqa: E402

CANDIDATES = ["oneway", "p2p-1conn", "p2p", "allreduce", "bf16"]


def _time(fn: Any, repeats: int) -> float:
    for _ in range(2):  # warm-up: connections, buffers
        fn()
    dist.barrier()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    dist.barrier()
    return statistics.median(times)


def _candidate(name: str, rank: int, x: torch.Tensor) -> Any:
    """One round of ``name`` as a callable."""
    peer = 1 - rank
    buf = torch.empty_like(x)
    if name == "oneway":
        return lambda: dist.send(x, peer) if rank == 0 else dist.recv(buf, peer)
    p = torch.nn.Parameter(x.clone())
    config = GossipConfig(pair_transport="allreduce" if name == "allreduce" else "auto",
                          wire_dtype=torch.bfloat16 if name == "bf16" else None)
    # the engine's plan, or (p2p-1conn) the same with both directions on one connection, as it was before this
    # measurement
    plan = Plan(config, str(dist.get_backend()), x.device, one_connection=name == "p2p-1conn")
    gossip = Gossip(Schedule(2, [[Group((0, 1))]]), rank, build_buckets([p], bucket_cap_mb=1e6), ProcessGroups(None),
                    config, plan=plan)

    def round_() -> None:
        gossip.end_step()  # launch a round, due at the next step
        gossip.begin_step()  # wait for it and apply it

    return round_


def measure(rank: int, world_size: int, numel: int, repeats: int) -> dict[str, float]:
    """Median seconds of one round per candidate (this rank's view)."""
    x = torch.full((numel,), float(rank))
    return {name: _time(_candidate(name, rank, x), repeats) for name in CANDIDATES}


def _table(rows: list[dict[str, Any]], where: str) -> str:
    head = f"{'elements':>12} {'MB':>7}" + "".join(f"{c + ' ms':>13}" for c in CANDIDATES)
    lines = [where, head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['numel']:>12,} {r['numel'] * 4 / 1e6:>7.1f}" + "".join(f"{r[c] * 1e3:>13.2f}"
                                                                                for c in CANDIDATES))
    return "\n".join(lines)


def _worker_main(args: argparse.Namespace) -> None:
    """Run under torchrun on the emulated cluster: one rank per host."""
    dist.init_process_group("gloo")
    rows = []
    for numel in args.sizes:
        r = measure(dist.get_rank(), dist.get_world_size(), numel, args.repeats)
        everyone: list[Any] = [None, None]
        dist.all_gather_object(everyone, r)
        rows.append({"numel": numel, **{c: max(e[c] for e in everyone) for c in CANDIDATES}})
    if dist.get_rank() == 0:
        args.out.write_text(json.dumps(rows, indent=2))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 3_200_000])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--cluster", metavar="RATE", help="run on 2 emulated hosts with links shaped to RATE")
    parser.add_argument("--out", type=Path, default=Path("results/pairwise_exchange.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker_main(args)
        return []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.cluster:
        from cluster import Cluster, format_rate

        with Cluster(hosts=2, rate=args.cluster) as cluster:
            measured = cluster.measure_rate()
            where = f"2 emulated hosts, link {args.cluster} (one TCP stream measured {format_rate(measured)})"
            result = args.out.with_suffix(".worker.json").resolve()
            procs = cluster.torchrun(Path(__file__).resolve(), ["--worker", "--out", str(result), "--repeats",
                                                                str(args.repeats), "--sizes", *map(str, args.sizes)],
                                     procs_per_host=1, log_dir=args.out.parent / "pairwise_logs")
            cluster.wait(procs, timeout=1800, log_dir=args.out.parent / "pairwise_logs")
            rows = json.loads(result.read_text())
            result.unlink()
    else:
        where = f"2 gloo ranks over loopback ({os.cpu_count()} cores)"
        rows = []
        for numel in args.sizes:
            res = run_local(measure, 2, numel, args.repeats, timeout=900)
            rows.append({"numel": numel, **{c: max(r[c] for r in res) for c in CANDIDATES}})
    print(_table(rows, where), flush=True)
    args.out.write_text(json.dumps({"where": where, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
