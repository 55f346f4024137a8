"""What a topology costs and how fast it mixes, computed from its schedule alone (no process group).

    python -m decent_optim_wrapper.analysis ring 16
    python -m decent_optim_wrapper.analysis all 24 --local-world-size 4

For a topology and world size: rounds per period, peers per worker per round, bytes each worker sends per
step as a multiple of the model size (next to ring all-reduce's ``2(n-1)/n``), and the consensus rate: the
spectral norm of ``W_{T-1} ... W_1 W_0 - J`` over one period of ``T`` rounds (``J = 11^T/n``); 0 means the
workers hold the exact average after every period, and ``rate**(1/T)`` is the per-step contraction.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

import torch

from .topo import Group, Schedule, Topology, TopologyFactory

__all__ = ["TopologyReport", "mixing_matrix", "period_matrix", "bytes_per_step", "analyze"]

# Below this, a period's product is taken to equal the exact average (float64 round-off of ~log2(n) rounds).
EXACT_TOL = 1e-9


def mixing_matrix(schedule: Schedule, round_: int) -> torch.Tensor:
    """The ``n x n`` float64 mixing matrix ``W`` of one round: row ``i`` gives worker ``i``'s weights."""
    n = schedule.world_size
    w = torch.zeros(n, n, dtype=torch.float64)
    for g in schedule.rounds[round_ % schedule.period]:
        idx = torch.tensor(g.ranks)
        w[idx.unsqueeze(1), idx.unsqueeze(0)] = g.peer_weight
        w[idx, idx] = g.self_weight
    return w


def period_matrix(schedule: Schedule) -> torch.Tensor:
    """``W_{T-1} ... W_0``: the mixing one period applies (later rounds multiply on the left)."""
    n = schedule.world_size
    acc = torch.eye(n, dtype=torch.float64)
    for t in range(schedule.period):
        acc = mixing_matrix(schedule, t) @ acc
    return acc


def _group_bytes(g: Group) -> float:
    """Model-sizes one member sends for its group: a pair exchanges once; larger groups all-reduce (ring)."""
    k = g.size
    return 0.0 if k == 1 else 1.0 if k == 2 else 2.0 * (k - 1) / k


def bytes_per_step(schedule: Schedule) -> tuple[float, float]:
    """(mean over workers and rounds, worst worker-round) of model-sizes sent per step."""
    per = [_group_bytes(g) for rnd in schedule.rounds for g in rnd for _ in g.ranks]
    return sum(per) / len(per), max(per)


@dataclass(frozen=True)
class TopologyReport:
    topology: str
    world_size: int
    local_world_size: int
    period: int
    peers_per_round: float
    max_peers: int
    bytes_per_step: float
    max_bytes_per_step: float
    allreduce_bytes_per_step: float
    consensus_rate: float
    rate_per_step: float
    exact_consensus: bool

    def as_dict(self) -> dict:
        return asdict(self)


def analyze(topology: str | Topology, world_size: int | None = None, local_world_size: int = 1) -> TopologyReport:
    """Analyse a registered topology by name (with ``world_size``) or a built :class:`Topology`."""
    if isinstance(topology, str):
        if world_size is None:
            raise ValueError("Invalid world_size=None. A topology given by name needs a world size.")
        topo = TopologyFactory.create(topology, 0, world_size, local_world_size)
    else:
        topo = topology
    s = topo.schedule()
    n = s.world_size
    peers = [g.size - 1 for rnd in s.rounds for g in rnd for _ in g.ranks]
    mean_b, max_b = bytes_per_step(s)
    if n > 1:
        deviation = period_matrix(s) - torch.full((n, n), 1.0 / n, dtype=torch.float64)
        rate = float(torch.linalg.matrix_norm(deviation, ord=2))
    else:
        rate = 0.0
    rate = 0.0 if rate < EXACT_TOL else rate
    return TopologyReport(
        topology=topo.name, world_size=n, local_world_size=topo.local_world_size, period=s.period,
        peers_per_round=sum(peers) / len(peers), max_peers=max(peers),
        bytes_per_step=mean_b, max_bytes_per_step=max_b,
        allreduce_bytes_per_step=2.0 * (n - 1) / n,
        consensus_rate=rate, rate_per_step=rate ** (1.0 / s.period), exact_consensus=rate == 0.0,
    )


def _format(reports: list[TopologyReport]) -> str:
    head = (f"{'topology':<22}{'n':>6}{'L':>4}{'period':>8}{'peers/round':>13}{'sent/step':>11}"
            f"{'(max)':>7}{'all-reduce':>12}{'consensus rate':>16}{'per step':>10}")
    rows = [head, "-" * len(head)]
    for r in reports:
        rows.append(
            f"{r.topology:<22}{r.world_size:>6}{r.local_world_size:>4}{r.period:>8}{r.peers_per_round:>13.2f}"
            f"{r.bytes_per_step:>10.3f}x{r.max_bytes_per_step:>6.2f}x{r.allreduce_bytes_per_step:>11.3f}x"
            f"{r.consensus_rate:>16.4g}{r.rate_per_step:>10.4f}"
        )
    rows.append("sent/step: model-sizes each worker sends per step (mean over workers and rounds; max in brackets);")
    rows.append("consensus rate: ||W_(T-1)...W_0 - 11^T/n||_2 over one period, 0 = exact average every period.")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m decent_optim_wrapper.analysis",
                                     description="Cost and mixing speed of gossip topologies.")
    parser.add_argument("topology", help=f"one of {TopologyFactory.available()} or 'all'")
    parser.add_argument("world_size", type=int)
    parser.add_argument("--local-world-size", type=int, default=1, help="ranks per node (hierarchical topologies)")
    args = parser.parse_args(argv)
    names = TopologyFactory.available() if args.topology == "all" else [args.topology]
    reports = []
    for name in names:
        try:
            reports.append(analyze(name, args.world_size, args.local_world_size))
        except ValueError as exc:
            if args.topology != "all":
                parser.error(str(exc))
            print(f"{name}: {exc}")
    print(_format(reports))


if __name__ == "__main__":
    main()
