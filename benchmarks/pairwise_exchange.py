"""Point-to-point exchange vs 2-rank all-reduce for a pairwise gossip round, on gloo (CPU).

    uv run python benchmarks/pairwise_exchange.py [--sizes 100000 1000000 10000000] [--repeats 20]

Times one whole round as the engine runs it (prepare, communicate, wait, apply the mix) for both ways of
averaging a pair, in the same run, and prints the ratio (both with the round-number check the wrapper does by
default, and point-to-point without it). The wrapper uses point-to-point for pairs.
"""

from __future__ import annotations

import argparse
import time

import torch

from decent_optim_wrapper.buckets import build_buckets
from decent_optim_wrapper.comm import ProcessGroups
from decent_optim_wrapper.gossip import Gossip
from decent_optim_wrapper.launch import run_local
from decent_optim_wrapper.topo import Group, Schedule


def _time_rounds(rank: int, world_size: int, numel: int, repeats: int) -> dict[str, float]:
    param = torch.nn.Parameter(torch.full((numel,), float(rank)))
    buckets = build_buckets([param], bucket_cap_mb=1e6)
    schedule = Schedule(2, [[Group((0, 1))]])
    out = {}
    modes = [("p2p", True), ("allreduce", True), ("p2p", False)]
    for mode, check in modes + modes:  # twice each, interleaved; keep the second
        gossip = Gossip(schedule, rank, buckets, ProcessGroups(None), pair_transport=mode, check_rounds=check)
        for _ in range(3):  # warm-up
            gossip.launch()
            gossip.apply()
        torch.distributed.barrier()
        t0 = time.perf_counter()
        for _ in range(repeats):
            gossip.launch()
            gossip.apply()
        out[mode + ("" if check else "-unchecked")] = (time.perf_counter() - t0) / repeats
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    print(f"{'elements':>12} {'MiB':>8} {'p2p ms':>9} {'allreduce ms':>13} {'allreduce/p2p':>14}"
          f" {'p2p no round check ms':>22}")
    for numel in args.sizes:
        res = run_local(_time_rounds, 2, numel, args.repeats, timeout=600)
        p2p = max(r["p2p"] for r in res) * 1e3
        ar = max(r["allreduce"] for r in res) * 1e3
        bare = max(r["p2p-unchecked"] for r in res) * 1e3
        print(f"{numel:>12,} {numel * 4 / 2**20:>8.1f} {p2p:>9.2f} {ar:>13.2f} {ar / p2p:>14.2f} {bare:>22.2f}",
              flush=True)


if __name__ == "__main__":
    main()
