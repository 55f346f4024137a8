"""What a topology costs and how fast it mixes, computed from its schedule alone (no process group), and
what time per iteration a cluster will see.

    python -m decent_optim_wrapper.analysis ring 16
    python -m decent_optim_wrapper.analysis all 24 --local-world-size 4
    python -m decent_optim_wrapper.analysis predict --model-mb 13.3 --compute-ms 241 --bandwidth 1gbit \
        --world-sizes 8 64 1024 [--local-world-size 8] [--latency-us 50] [--measure-apply]

For a topology and world size: rounds per period, peers per worker per round, bytes each worker sends per
step as a multiple of the model size (next to ring all-reduce's ``2(n-1)/n``), and the consensus rate: the
spectral norm of ``W_{T-1} ... W_1 W_0 - J`` over one period of ``T`` rounds (``J = 11^T/n``); 0 means the
workers hold the exact average after every period, and ``rate**(1/T)`` is the per-step contraction.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from . import mixing
from .config import GossipConfig, LowRank
from .plan import Plan
from .topo import Group, Schedule, Topology, TopologyFactory
from .transport import AllGatherCompressed, AllReduceSum, P2PPair, P2PPairCompressed, spans

__all__ = ["TopologyReport", "mixing_matrix", "period_matrix", "bytes_per_step", "analyze", "Network",
           "predict_gossip", "predict_ddp", "ddp_hidden_fraction", "predict_table", "time_round_work",
           "measure_round_work", "time_lowrank_work", "RoundWork", "LowRankLayout"]

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
    """Model-sizes one member sends for its group in full precision on gloo and CPU (the plan's route): a pair
    exchanges once; larger groups all-reduce (ring)."""
    return 0.0 if g.size == 1 else Plan().route(g).bytes(1, 1)


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


# ----------------------------------------------------------------------------- cost model
@dataclass(frozen=True)
class Network:
    """What the model needs to know about a cluster.

    Args:
        bandwidth: bytes/s a host can send on its link while receiving as much (a full-duplex port); measure
            it (``benchmarks/cluster.py`` prints one TCP stream's rate).
        latency: seconds per message, one way.
        intra_bandwidth: bytes/s between ranks of one host (NVLink, shared memory, ``lo``).
        host_s_per_byte: seconds of a rank's own time per byte it sends or receives, which no overlap hides:
            0 where a NIC or a copy engine moves the data (NCCL on GPUs); on CPU hosts the kernel's copies and
            gloo's reductions run on the cores the computation needs (about 1e-9 on the 2-core emulated
            cluster: ``pairwise_exchange.py`` on loopback, 25.6 MB moved per rank in 12.6 ms on a core of its
            own, doubled for 4 ranks on 2 cores).
    """

    bandwidth: float
    latency: float = 0.0
    intra_bandwidth: float = float("inf")
    host_s_per_byte: float = 0.0

    def __post_init__(self) -> None:
        for name in ("bandwidth", "intra_bandwidth"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Invalid {name}={getattr(self, name)!r}: must be a positive number of bytes/s")
        for name in ("latency", "host_s_per_byte"):
            if not getattr(self, name) >= 0 or math.isinf(getattr(self, name)):
                raise ValueError(f"Invalid {name}={getattr(self, name)!r}: must be finite and >= 0")


def _transfer(nbytes: float, messages: int, bandwidth: float, latency: float) -> float:
    return messages * latency + nbytes / bandwidth


# LowRank for the cost model: (rank r, the (rows, cols) of every parameter that travels as factors)
LowRankLayout = tuple[int, Sequence[tuple[int, int]]]


def _plan(wire_bytes: int, lowrank: LowRankLayout | None = None) -> Plan:
    """The plan the cost model prices: gloo on CPU hosts, bfloat16 on the wire for ``wire_bytes`` 2."""
    return Plan(GossipConfig(wire_dtype=torch.bfloat16 if wire_bytes == 2 else None,
                             compression=LowRank(rank=lowrank[0]) if lowrank is not None else None))


def _round_time(groups: tuple[Group, ...], local: int, model_bytes: float, wire_bytes: int,
                net: Network, lowrank: LowRankLayout | None = None) -> tuple[float, float]:
    """Seconds until the slowest member of a round has its result (groups of ``local`` consecutive ranks share
    a host and its link), and the most bytes one rank sends and receives in it. Each group's bytes are those of
    its routes in the plan (:meth:`Plan.route`): the transports the engine would run (``lowrank``: its matrices
    as factors, the rest of ``model_bytes`` as without)."""
    plan = _plan(wire_bytes, lowrank)
    matrices = list(lowrank[1]) if lowrank is not None else []
    dense_bytes = model_bytes - 4.0 * sum(r * c for r, c in matrices)
    host_out: dict[int, float] = {}  # bytes each host's link carries in this round
    intra = 0.0
    moved = 0.0
    for g in groups:
        k = g.size
        if k == 1:
            continue
        hosts = {r // local for r in g.ranks}
        sent = plan.route(g, plan.kind(torch.float32)).bytes(dense_bytes / 4.0, 4)
        if matrices:
            sent += plan.route(g, "lowrank").bytes(0, 4, matrices)
        moved = max(moved, 2.0 * sent)  # as much received as sent
        if len(hosts) == 1:
            intra = max(intra, _transfer(sent, 2 * (k - 1), net.intra_bandwidth, 0.0))
            continue
        for r in g.ranks:  # what crosses a host boundary: every member's share, on its host's link
            if k == 2 or len(hosts) == k:
                host_out[r // local] = host_out.get(r // local, 0.0) + sent
            else:  # a ring over members sorted by host crosses each host's boundary once per direction
                host_out[r // local] = max(host_out.get(r // local, 0.0), sent)
    link = max(host_out.values(), default=0.0) / net.bandwidth
    if host_out:
        messages = 1 if max(g.size for g in groups) == 2 else 2 * (max(g.size for g in groups) - 1)
        link += messages * net.latency
    return max(link, intra), moved


# Seconds of a rank's own time to prepare and apply a round in a group of k members (first argument) with
# the wire's bytes per element (second argument): see time_round_work.
RoundWork = Callable[[int, int], float]


def time_round_work(numel: int, group_size: int, wire_bytes: int = 4, repeats: int = 5) -> float:
    """Seconds one CPU core takes to prepare and apply one round of ``numel`` float32 elements, no communication.

    Runs the kernels of :mod:`~decent_optim_wrapper.mixing` that the transport gloo picks for a group of
    ``group_size`` (its route in :meth:`~decent_optim_wrapper.plan.Plan.route`) would run, on one thread; the median of
    ``repeats``. A full-precision round copies what it sends and applies ``mix(sent, peers) + (x - sent)``
    (5 passes); a compressed pair rounds its values and applies the correction (4 passes, two of them
    converting): on CPU hosts that is the difference between the two wire dtypes that no byte count shows.
    """
    if group_size < 2 or numel < 1 or repeats < 1:
        raise ValueError(f"Invalid group_size={group_size}, numel={numel} or repeats={repeats}: "
                         "need a group of at least 2, at least 1 element and 1 repeat")
    if wire_bytes not in (2, 4):
        raise ValueError(f"Invalid wire_bytes={wire_bytes}: must be 4 (float32) or 2 (bfloat16)")
    k, c = group_size, 1.0 / group_size
    plan = _plan(wire_bytes)
    kind = plan.route(Group(tuple(range(k))), plan.kind(torch.float32)).transport
    compressed = kind in (P2PPairCompressed, AllGatherCompressed)  # groups too large to gather stay in float32
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(numel, generator=gen)
    peer = torch.randn(numel, generator=gen)
    slots = [peer.to(torch.bfloat16 if compressed else torch.float32) for _ in range(k)]
    sent = torch.empty_like(x)

    def pair() -> None:
        parts = spans(x)
        for a, b in parts:
            sent[a:b].copy_(x[a:b])
        for a, b in parts:
            mixing.pair_mix_sent_(x[a:b], sent[a:b], peer[a:b], c)

    def pair_compressed() -> None:
        parts = spans(x)
        for a, b in parts:
            mixing.quantize(x[a:b], slots[0][a:b])
        for a, b in parts:
            mixing.compressed_pair_mix_(x[a:b], slots[0][a:b], slots[1][a:b], c)

    def group() -> None:
        sent.copy_(x)
        mixing.group_mix_sent_(x, sent, mixing.scale_for_sum(sent, c, slots[0]), c, c)

    def group_compressed() -> None:
        mixing.compressed_mix_(x, mixing.quantize(x, slots[0]), slots, c)

    run = {P2PPair: pair, P2PPairCompressed: pair_compressed, AllReduceSum: group,
           AllGatherCompressed: group_compressed}[kind]
    return _time_on_one_core(run, repeats)


def _time_on_one_core(run: Callable[[], None], repeats: int) -> float:
    """Median seconds of ``run()`` over ``repeats`` calls on one thread, after one call that warms the allocator and
    the caches."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times)


def time_lowrank_work(matrices: Sequence[tuple[int, int]], rank: int = 1, repeats: int = 5) -> float:
    """Seconds one CPU core takes for a low-rank round's own work on ``matrices`` (``(rows, cols)``, float32):
    project each on the edge's basis, apply the correction, orthonormalise the next basis (both sides taking
    turns: the mean of a right and a left round); the median of ``repeats``. That is one edge's work: a member of a
    group of ``k`` does it ``k-1`` times a round (edge by edge)."""
    if rank < 1 or repeats < 1 or not matrices:
        raise ValueError(f"Invalid rank={rank}, repeats={repeats} or matrices={list(matrices)}: need rank >= 1, "
                         "repeats >= 1 and at least one matrix")
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(r, c, generator=gen) for r, c in matrices]
    # held transposed, as the transport holds them: Q^T (r x cols) for right rounds, P^T (r x rows) for left ones
    bases = [(torch.randn(rank, c, generator=gen), torch.randn(rank, r, generator=gen)) for r, c in matrices]

    def run() -> None:
        for right in (True, False):
            for x, (q_right, q_left) in zip(xs, bases):
                q = q_right if right else q_left
                mine = mixing.lowrank_project(x, q, right, torch.empty(rank, x.shape[0] if right else x.shape[1]))
                d = mixing.lowrank_correction_(x, mine, mine * 0.5, q, right, 1e-12)  # alpha 0 may skip the product
                mixing.orthonormal(d, q_left if right else q_right)

    return _time_on_one_core(run, repeats) / 2  # run() is a right and a left round


def measure_round_work(numel: int, scale: float = 1.0) -> RoundWork:
    """A :data:`RoundWork` that times each ``(group size, wire bytes)`` once with :func:`time_round_work` and
    multiplies by ``scale`` (the ranks sharing a core on the hosts predicted)."""
    seen: dict[tuple[int, int], float] = {}

    def work(k: int, wire_bytes: int) -> float:
        if (k, wire_bytes) not in seen:
            seen[k, wire_bytes] = time_round_work(numel, k, wire_bytes) * scale
        return seen[k, wire_bytes]

    return work


def predict_gossip(topology: str, world_size: int, model_bytes: float, compute_s: float, net: Network,
                   local_world_size: int = 1, wire_bytes: int = 4, apply_s: float | RoundWork = 0.0,
                   step_s: float = 0.0, *, max_delay: int = 1, gossip_every: int = 1,
                   lowrank: LowRankLayout | None = None) -> float:
    """Predicted seconds per iteration of ``DecentOptimWrapper`` with ``topology``.

    A round's communication overlaps the next forward and backward, so an iteration takes the longer of the
    two. On the compute side, the host's share of moving the bytes (:attr:`Network.host_s_per_byte`) adds to
    ``compute_s``. On the link's side, ``step_s``, the inner optimizer's step (part of ``compute_s``), adds to
    the round: it runs between one round landing and the next leaving, so the link waits for it. ``apply_s``,
    preparing and applying a round (memory passes: one figure for every round, or a :data:`RoundWork` of the
    round's largest group, e.g. :func:`measure_round_work`), adds to both sides: it takes the rank's time, and
    it too runs between a round landing and the next leaving. Averaged over the schedule's period.

    ``gossip_every=H``: one round per ``H`` steps, which it overlaps (``H`` computations against one round).
    ``max_delay > 1``: the next round leaves before this one lands, so the link carries rounds back to back and
    the step and the apply no longer wait between them: the link side is the round's transfer alone.
    ``lowrank=(r, [(rows, cols), ...])``: those matrices travel as rank-``r`` factors (the sides taking turns),
    the rest of ``model_bytes`` as without (``LowRank`` of :class:`~decent_optim_wrapper.config.GossipConfig`).
    """
    s = TopologyFactory.create(topology, 0, world_size, local_world_size).schedule()
    h = gossip_every
    times = []
    for r in s.rounds:
        link, moved = _round_time(r, local_world_size, model_bytes, wire_bytes, net, lowrank)
        k = max(g.size for g in r)
        work = 0.0 if k == 1 else apply_s(k, wire_bytes) if callable(apply_s) else apply_s  # k == 1: no round
        compute = h * compute_s + work + moved * net.host_s_per_byte
        wire_side = link if max_delay > 1 else link + step_s + work
        times.append(max(compute, wire_side) / h)
    return sum(times) / len(times)


def _allreduce_time(world_size: int, model_bytes: float, net: Network, local_world_size: int,
                    wire_bytes: int) -> float:
    """Seconds of a ring all-reduce of ``model_bytes`` of float32 values sent as ``wire_bytes`` per value."""
    n = world_size
    hosts = -(-n // local_world_size)
    nbytes = model_bytes * wire_bytes / 4.0 * 2.0 * (n - 1) / n
    bandwidth = net.bandwidth if hosts > 1 else net.intra_bandwidth
    return _transfer(nbytes, 2 * (n - 1), bandwidth, net.latency if hosts > 1 else 0.0)


def predict_ddp(world_size: int, model_bytes: float, compute_s: float, net: Network, local_world_size: int = 1,
                wire_bytes: int = 4, overlap: float = 0.0) -> float:
    """Predicted seconds per iteration of ``DistributedDataParallel`` (ring all-reduce of the gradients).

    ``overlap``: the fraction of the all-reduce hidden behind backward. :func:`ddp_hidden_fraction` gives what DDP's
    bucketing hides on hardware where communication runs beside the computation (NCCL on GPUs); with gloo on
    busy CPUs little is hidden (near 0 measured on the emulated cluster, where the default 0 fits).
    """
    n = world_size
    if n == 1:
        return compute_s
    nbytes = model_bytes * wire_bytes / 4.0 * 2.0 * (n - 1) / n
    comm = _allreduce_time(n, model_bytes, net, local_world_size, wire_bytes)
    return compute_s + 2.0 * nbytes * net.host_s_per_byte + (1.0 - overlap) * comm


# DistributedDataParallel's defaults: gradients are all-reduced in buckets, the first of 1 MiB, the others of
# bucket_cap_mb=25 MiB, in reverse order of the parameters (about the order backward produces them).
DDP_FIRST_BUCKET_BYTES = 2**20
DDP_BUCKET_BYTES = 25 * 2**20
# Backward does about twice the forward's arithmetic: 2/3 of forward + backward.
BACKWARD_SHARE = 2.0 / 3.0


def ddp_hidden_fraction(world_size: int, model_bytes: float, compute_s: float, net: Network, local_world_size: int = 1,
                wire_bytes: int = 4, step_s: float = 0.0) -> float:
    """The fraction of DDP's all-reduce that backward hides, from DDP's bucketing (for :func:`predict_ddp`).

    Backward takes :data:`BACKWARD_SHARE` of ``compute_s - step_s`` and is taken to produce gradients at a
    steady rate; each bucket's all-reduce starts once its gradients exist and the bucket before it is done.
    What runs past the end of backward is exposed, at least the last bucket's all-reduce, which starts only
    then. A model within one bucket (up to 26 MiB) hides little; a large one whose all-reduce is shorter than
    backward hides nearly all of it. Assumes communication does not slow the computation (NCCL on GPUs).
    """
    if world_size == 1 or model_bytes <= 0:
        return 0.0
    sizes = [min(model_bytes, DDP_FIRST_BUCKET_BYTES)]
    while sum(sizes) < model_bytes:
        sizes.append(min(model_bytes - sum(sizes), DDP_BUCKET_BYTES))
    backward_s = BACKWARD_SHARE * (compute_s - step_s)
    produced = end = 0.0
    for size in sizes:
        produced += size
        end = max(end, backward_s * produced / model_bytes) + _allreduce_time(world_size, size, net,
                                                                                local_world_size, wire_bytes)
    # Relative to one all-reduce of the whole model, what predict_ddp scales: with many buckets and a high
    # latency, the buckets' own messages may expose more than that (then 0: DDP is not made slower than without
    # overlap, which keeps the comparison with gossip conservative).
    exposed = end - backward_s
    return min(1.0, max(0.0, 1.0 - exposed / _allreduce_time(world_size, model_bytes, net, local_world_size,
                                                              wire_bytes)))


def predict_table(world_sizes: list[int], model_bytes: float, compute_s: float, net: Network,
                  local_world_size: int = 1, topologies: list[str] | None = None,
                  ddp_overlap: float | None = None, step_s: float = 0.0,
                  apply_s: float | RoundWork = 0.0) -> list[dict[str, float | int | str]]:
    """Rows ``{"world_size", "method", "iter_s", "vs_ddp"}`` for DDP, DDP + bf16 and each topology (full
    precision and bf16); the DDP rows also give ``"overlap"``, the fraction of the all-reduce hidden:
    ``ddp_overlap``, or with ``None`` :func:`ddp_hidden_fraction`'s. ``step_s`` and ``apply_s`` as in
    :func:`predict_gossip`."""
    rows: list[dict[str, float | int | str]] = []
    for n in world_sizes:
        ddp_rows: list[dict[str, float | int | str]] = []
        for method, wire in (("ddp", 4), ("ddp-bf16", 2)):
            hidden = ddp_overlap if ddp_overlap is not None else \
                ddp_hidden_fraction(n, model_bytes, compute_s, net, local_world_size, wire, step_s)
            t = predict_ddp(n, model_bytes, compute_s, net, local_world_size, wire, hidden)
            ddp_rows.append({"world_size": n, "method": method, "iter_s": t, "overlap": hidden})
        ddp = float(ddp_rows[0]["iter_s"])
        for r in ddp_rows:
            r["vs_ddp"] = float(r["iter_s"]) / ddp
        rows += ddp_rows
        for name in topologies or TopologyFactory.available():
            for wire in (4, 2):
                try:
                    t = predict_gossip(name, n, model_bytes, compute_s, net, local_world_size, wire, apply_s, step_s)
                except ValueError:  # e.g. alternating-exp-ring where local_world_size does not divide n
                    continue
                rows.append({"world_size": n, "method": name + ("+bf16" if wire == 2 else ""), "iter_s": t,
                             "vs_ddp": t / ddp})
    return rows


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
    return "\n".join(rows + COLUMNS.splitlines())


# What the columns of the topology table mean (printed under it and in --help).
COLUMNS = """\
n: world size; L: ranks per node (--local-world-size; only alternating-exp-ring uses it);
period: rounds before the schedule repeats; peers/round: peers each worker averages with in a round;
sent/step: model-sizes each worker sends per step, mean over workers and rounds, (max) the largest;
all-reduce: what a ring all-reduce (DDP) sends per step, 2(n-1)/n, for comparison;
consensus rate: ||W_(T-1)...W_0 - 11^T/n||_2 over one period of T rounds, 0 = exact average every period;
per step: consensus rate^(1/period), how much one step shrinks the workers' distance from their average
(0 = exact after a period; closer to 1 = slower mixing)."""


def _parse_rate(text: str) -> float:
    """``"1gbit"``, ``"100mbit"``, ``"10gbit"`` or bit/s -> bytes/s."""
    t = text.lower().strip()
    for suffix, scale in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1.0)):
        if t.endswith(suffix):
            return float(t[: -len(suffix)]) * scale / 8
    return float(t) / 8


def _overlap_arg(text: str) -> float | None:
    """``--ddp-overlap``: ``auto`` (None: DDP's bucketing decides) or a fraction in [0, 1]."""
    if text == "auto":
        return None
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not 'auto' or a fraction between 0 and 1")
    return value


def _predict_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m decent_optim_wrapper.analysis predict", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Predicted time per iteration of DDP, DDP with bf16 compression (ddp-bf16), and each topology\n"
                    "in full precision and with wire_dtype=torch.bfloat16 (+bf16), at each world size.",
        epilog="The defaults describe GPU hosts (NCCL: communication runs beside the computation). On CPU hosts\n"
               "(gloo) pass --host-ns-per-byte (about 1 on the emulated cluster), --ddp-overlap 0 and --measure-apply.")
    parser.add_argument("--model-mb", type=float, required=True, help="parameter bytes, MB (1e6)")
    parser.add_argument("--compute-ms", type=float, required=True,
                        help="forward + backward + local step with no communication, ms")
    parser.add_argument("--step-ms", type=float, default=0.0,
                        help="the optimizer's step alone, ms, part of --compute-ms: the link waits for it (default: 0)")
    parser.add_argument("--bandwidth", default="1gbit",
                        help="each host link, each direction, e.g. 100mbit, 10gbit (default: 1gbit)")
    parser.add_argument("--latency-us", type=float, default=0.0, help="per message, one way (default: 0)")
    parser.add_argument("--intra-bandwidth", default=None, help="between ranks of one host (default: unlimited)")
    parser.add_argument("--host-ns-per-byte", type=float, default=0.0,
                        help="a rank's CPU time per byte sent or received, not hidden by overlap (default: 0, right "
                             "for GPUs)")
    parser.add_argument("--local-world-size", type=int, default=1,
                        help="ranks per host, sharing its link (default: 1)")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[8, 16, 64, 256, 1024],
                        help="world sizes to predict, 1 to 4096 (default: 8 16 64 256 1024)")
    parser.add_argument("--topologies", nargs="+", default=None,
                        help=f"default: every registered one, {TopologyFactory.available()}")
    parser.add_argument("--ddp-overlap", type=_overlap_arg, default=None, metavar="{auto,FRACTION}",
                        help="the fraction of DDP's gradient all-reduce hidden behind backward. auto: what DDP's "
                             "own bucketing hides (a 1 MiB bucket, then 25 MiB buckets, each all-reduced once "
                             "backward, 2/3 of --compute-ms less --step-ms, has produced it; whatever runs past "
                             "backward, at least the last bucket, is exposed): little for a model of a bucket or "
                             "two, most of it for a large model on a fast link. 0 for gloo on busy CPU hosts, "
                             "where the emulated cluster measured almost none hidden. Default: auto")
    parser.add_argument("--measure-apply", action="store_true",
                        help="time the CPU work of preparing and applying a round on this machine (one core, the "
                             "model's size) and add it to the compute side: CPU hosts like this one")
    args = parser.parse_args(argv)
    if max(args.world_sizes) > 4096 or min(args.world_sizes) < 1:
        parser.error("--world-sizes must be between 1 and 4096")
    if not args.model_mb > 0 or not args.compute_ms >= 0 or not 0 <= args.step_ms <= args.compute_ms:
        parser.error("--model-mb must be > 0, --compute-ms >= 0 and --step-ms between 0 and --compute-ms")
    try:
        net = Network(_parse_rate(args.bandwidth), args.latency_us * 1e-6,
                      _parse_rate(args.intra_bandwidth) if args.intra_bandwidth else float("inf"),
                      args.host_ns_per_byte * 1e-9)
    except ValueError as e:
        parser.error(str(e))
    apply = measure_round_work(int(args.model_mb * 1e6 / 4)) if args.measure_apply else 0.0
    rows = predict_table(args.world_sizes, args.model_mb * 1e6, args.compute_ms * 1e-3, net, args.local_world_size,
                         args.topologies, args.ddp_overlap, args.step_ms * 1e-3, apply)
    print(f"{'n':>6}  {'method':<26}{'iter ms':>10}{'x DDP':>8}{'hidden':>8}")
    for r in rows:
        hidden = f"{float(r['overlap']):>8.0%}" if "overlap" in r else ""
        print(f"{r['world_size']:>6}  {r['method']:<26}{float(r['iter_s']) * 1e3:>10.1f}{float(r['vs_ddp']):>8.2f}"
              f"{hidden}")
    overlap = "auto, from DDP's bucketing" if args.ddp_overlap is None else f"{args.ddp_overlap:g}"
    print(f"DDP = compute + the ring all-reduce of the gradients, less the part hidden behind backward (hidden; "
          f"--ddp-overlap {overlap}).\nGossip = the longer of compute and the round's exchange on the busiest host "
          "link plus the optimizer's step, averaged over the topology's period"
          + (", with the round's CPU work (measured here) on both sides." if args.measure_apply else "."))


def main(argv: list[str] | None = None) -> None:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["predict"]:
        _predict_main(argv[1:])
        return
    parser = argparse.ArgumentParser(
        prog="python -m decent_optim_wrapper.analysis", formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s [-h] [--local-world-size L] {TOPOLOGY,all} WORLD_SIZE\n"
              "       %(prog)s predict --model-mb MB --compute-ms MS [options]  (predict --help: the options)",
        description="Cost and mixing speed of gossip topologies, from their schedules alone (no process group).\n"
                    "predict: the time per iteration a cluster will see, DDP against each topology.",
        epilog="The columns:\n" + COLUMNS)
    parser.add_argument("topology", metavar="TOPOLOGY", help=f"one of {TopologyFactory.available()} or 'all'")
    parser.add_argument("world_size", metavar="WORLD_SIZE", type=int, help="number of workers")
    parser.add_argument("--local-world-size", metavar="L", type=int, default=1,
                        help="ranks per node, for hierarchical topologies (default: 1)")
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
