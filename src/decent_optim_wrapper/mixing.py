"""The arithmetic of one gossip round: pure functions over tensors, no communication.

A round puts rank ``i`` in a group ``G`` of ``k`` ranks with self-weight ``w`` and peer weight
``c = (1-w)/(k-1)`` (uniform averaging: ``w = c = 1/k``). Every member computes

    x_i <- w * x_i + c * sum_{j in G, j != i} x_j

**Full precision** (the values travel as they are):

* a pair, from the peer's values ``y``: :func:`pair_mix_` computes ``x*w + y*(1-w)``;
* a group, from a SUM all-reduce of ``c * x_j``: :func:`scale_for_sum` prepares the buffer, :func:`group_mix_`
  applies the sum (uniform weights: the sum *is* the result, decent-optim-wrapper 0.1's arithmetic).

With uniform weights both forms give the same bits for a pair (``0.5*x + 0.5*y``: the scalings are exact and
the addition commutes), so a pair may travel either way.

**What was sent, and what changed since.** A round sends a snapshot ``s`` of ``x`` taken at launch, and the
parameters may be written before the round is applied (weight clipping through ``p.data``, an EMA written
back, a ``no_grad`` update). :func:`pair_mix_sent_` and :func:`group_mix_sent_` apply

    x <- mix(s, peers) + (x - s)

the round's result computed from the values that were sent, plus whatever changed ``x`` since. Where nothing
changed, ``x - s`` is exactly zero and the result has the bits of ``mix(x, peers)``; a write survives as it
was made, and the peers mixed with the values they were sent, never with a torn mixture.

**Compressed** (the values travel rounded to a wire dtype, ``q_j = Q(x_j)``): the naive
``x_i <- w*x_i + c*sum q_j`` moves the global mean by the rounding errors and cannot move ``x_i`` by less than
half a wire ulp. The symmetric correction

    x_i <- x_i + c * sum_{j != i} (q_j - q_i) = x_i + c * (S - k*q_i),   S = sum_{j in G} q_j

changes the sum over the group by nothing but the rounding of the final additions (the corrections of the
members cancel), and members whose values round alike get a zero correction. For a pair the correction is
``c*(q_j - q_i)`` (:func:`compressed_pair_mix_`): the difference is formed in ``x``'s dtype, where the two
members' differences are each other's negation to the last bit; a larger group (:func:`compressed_mix_`) forms
``S - k*q_i`` in float64, where the sum of bfloat16/float16 values is exact, so the corrections cancel to the
last bit and only the final addition rounds.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

__all__ = ["pair_mix_", "scale_for_sum", "group_mix_", "pair_mix_sent_", "group_mix_sent_", "quantize",
           "compressed_pair_mix_", "compressed_mix_", "COMPRESSED_CHUNK", "COMPRESSED_CHUNK_CUDA", "lowrank_project",
           "lowrank_correction_", "orthonormal"]

# Elements per chunk of the compressed mix, which bounds its scratch whatever the bucket size (a bucket-sized
# temporary every round costs memory on the GPU). On the CPU the chunk stays in cache: with the scratch below, a
# pair of 3.2M elements mixes in 1.35 ms on one core with chunks of 2^18 against 1.6-1.7 ms with 2^22. On CUDA
# (the caching allocator, no page faults) large chunks keep the number of kernel launches low.
COMPRESSED_CHUNK = 1 << 18
COMPRESSED_CHUNK_CUDA = 1 << 22

# The CPU scratch is kept per thread and reused: torch's CPU allocator is malloc, and glibc serves a block of
# 128 KiB or more with a fresh mmap (page faults on first touch, munmap on free) until the process has freed
# one that large. In such a process a 1 MiB scratch made per call took a 3.2M-element pair mix from 1.4 ms to
# 6-7 ms on one core (measured in a fresh interpreter); training loops that free large gradients each step
# raise glibc's threshold and never saw it, others (gradients kept, small activations) would every round.
_cpu_scratch = threading.local()


def _scratch(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor of ``n`` elements for a mix to work in: on the CPU a per-thread block reused
    across calls (grown when needed), elsewhere a new one (CUDA's caching allocator reuses it anyway)."""
    if device.type != "cpu":
        return torch.empty(n, dtype=dtype, device=device)
    blocks: dict[torch.dtype, torch.Tensor] = _cpu_scratch.__dict__.setdefault("blocks", {})
    block = blocks.get(dtype)
    if block is None or block.numel() < n:
        block = blocks[dtype] = torch.empty(n, dtype=dtype)
    return block[:n]


@torch.no_grad()
def pair_mix_(x: torch.Tensor, peer: torch.Tensor, self_weight: float) -> torch.Tensor:
    """``x <- self_weight * x + (1 - self_weight) * peer``, in place; returns ``x``."""
    return x.mul_(self_weight).add_(peer, alpha=1.0 - self_weight)


@torch.no_grad()
def scale_for_sum(x: torch.Tensor, peer_weight: float, out: torch.Tensor) -> torch.Tensor:
    """``out <- peer_weight * x``: what a member contributes to the group's SUM all-reduce.

    Scaling before summing (never summing first) keeps the sum in range for low-precision dtypes.
    """
    return torch.mul(x, peer_weight, out=out)


@torch.no_grad()
def group_mix_(x: torch.Tensor, summed: torch.Tensor, self_weight: float, peer_weight: float) -> torch.Tensor:
    """``x <- (self_weight - peer_weight) * x + summed``, where ``summed = sum_j peer_weight * x_j``.

    Uniform weights (``self_weight == peer_weight``): ``x <- summed`` exactly, no arithmetic.
    """
    if self_weight == peer_weight:
        return x.copy_(summed)
    return x.mul_(self_weight - peer_weight).add_(summed)


@torch.no_grad()
def pair_mix_sent_(x: torch.Tensor, sent: torch.Tensor, peer: torch.Tensor, self_weight: float) -> torch.Tensor:
    """``x <- (self_weight * sent + (1 - self_weight) * peer) + (x - sent)``, in place; ``sent`` is overwritten.

    ``sent`` is what this rank sent, ``peer`` what it received. Where ``x`` still equals ``sent`` the result has
    the bits of :func:`pair_mix_` (the mix runs on ``sent`` with the same operations, then adds an exact zero).
    """
    x.sub_(sent)
    pair_mix_(sent, peer, self_weight)
    return x.add_(sent)


@torch.no_grad()
def group_mix_sent_(x: torch.Tensor, sent: torch.Tensor, summed: torch.Tensor, self_weight: float,
                    peer_weight: float) -> torch.Tensor:
    """``x <- group_mix(sent, summed) + (x - sent)``, in place (``sent`` may be overwritten); ``summed`` is the
    all-reduced ``peer_weight * sent_j``. Where ``x`` still equals ``sent``: the bits of :func:`group_mix_`."""
    x.sub_(sent)
    if self_weight == peer_weight:  # the sum is the mix itself: no copy into sent first
        return x.add_(summed)
    return x.add_(group_mix_(sent, summed, self_weight, peer_weight))


@torch.no_grad()
def quantize(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out <- Q(x)``: ``x`` rounded to nearest in ``out``'s dtype (the wire dtype), saturated to its finite range.

    A value beyond the wire dtype's range (float16 ends at 65504) travels as its largest finite value instead of
    as inf: an inf on both sides of a difference would turn the correction, and so the parameter, into NaN. The
    correction stays mean-exact; such a value only mixes as if it were that large.
    """
    out.copy_(x)
    top = torch.finfo(out.dtype).max
    # A value beyond ``top`` rounds to ``top`` or to inf, so clamping where the *rounded* values reach beyond it
    # gives the same bits as clamping where ``x`` does, and reads half the bytes (on the CPU: 0.27 ms against
    # 0.48 ms for 3.2M elements on one core).
    if torch.finfo(x.dtype).max > top and (x.device.type != "cpu" or _beyond(out, top)):
        out.clamp_(-top, top)  # on the GPU unconditionally: testing first would make the host wait for it
    return out


def _beyond(x: torch.Tensor, top: float) -> bool:
    """Whether ``x`` (on the CPU) may hold a value beyond ``+-top``: one read, cheaper than clamping every round.
    A NaN anywhere hides the extremes from ``aminmax``, so it also says yes (clamping keeps a NaN a NaN)."""
    if x.numel() == 0:
        return False
    lo, hi = torch.aminmax(x)
    return not bool(lo >= -top and hi <= top)


def _chunk(x: torch.Tensor) -> int:
    return COMPRESSED_CHUNK if x.device.type == "cpu" else COMPRESSED_CHUNK_CUDA


@torch.no_grad()
def compressed_pair_mix_(x: torch.Tensor, q_self: torch.Tensor, q_peer: torch.Tensor,
                         peer_weight: float) -> torch.Tensor:
    """``x <- x + peer_weight * (q_peer - q_self)``, in place; returns ``x``.

    The pair's case of :func:`compressed_mix_` in three passes instead of four: the difference is formed in
    ``x``'s dtype (the peer forms its exact negation), then scaled and added once.
    """
    n = x.numel()
    chunk = _chunk(x)
    scratch = _scratch(min(n, chunk), x.dtype, x.device)
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        s = scratch[:size]
        s.copy_(q_peer[start:start + size])
        s.sub_(q_self[start:start + size])
        x[start:start + size].add_(s, alpha=peer_weight)
    return x


@torch.no_grad()
def compressed_mix_(x: torch.Tensor, q_self: torch.Tensor, q_group: Sequence[torch.Tensor],
                    peer_weight: float) -> torch.Tensor:
    """``x <- x + peer_weight * (sum(q_group) - k * q_self)``, in place; returns ``x``.

    ``q_group`` holds ``Q(x_j)`` of every member ``j`` (this rank's ``q_self`` included), ``k = len(q_group)``.
    The difference is formed in ``x``'s dtype before it is scaled and added once, so equal quantised values
    leave ``x`` untouched.
    """
    k = len(q_group)
    n = x.numel()
    chunk = _chunk(x)
    # A pair's q_j - q_i is exact in x's dtype; a larger group's sum of k quantised values is exact only in
    # float64 (values of different magnitudes need more than float32's 24 bits), and an inexact sum would move
    # the group's mean by its rounding every round.
    acc = x.dtype if k == 2 else torch.float64
    scratch = _scratch(min(n, chunk), acc, x.device)
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        s = scratch[:size]
        s.copy_(q_group[0][start:start + size])
        for q in q_group[1:]:
            s.add_(q[start:start + size])
        s.sub_(q_self[start:start + size], alpha=k)
        x[start:start + size].add_(s, alpha=peer_weight)
    return x


# ----------------------------------------------------------------------------- low rank (PowerGossip)
# A pair (low, high) shares a basis B of one side of a matrix parameter: ``right`` (B = Q, cols x r) or ``left``
# (B = P, rows x r). Each member sends the projection of what it holds, X Q (rows x r) or X^T P (cols x r); both
# form D = proj_low - proj_high from the same two tensors, so D is the same to the last bit on both, and so is the
# rank-r approximation of X_low - X_high it gives: D Q^T, or P D^T. The low member subtracts c times it, the high
# member adds it (equal and opposite: the pair's sum is kept up to the final additions' rounding), and the next
# round of the edge uses the other side, orthonormal(D), as its basis: one power iteration step per round, warm
# started from the previous one (Vogels, Karimireddy and Jaggi, PowerGossip, NeurIPS 2020).
#
# Layout: every factor is held transposed, ``r`` rows of one side's length (``Q^T``, ``(X Q)^T``, ``D^T``), row-major.
# Then each product is one BLAS call on contiguous operands: on one CPU core and a 1024 x 1024 matrix at r = 4,
# X^T P as mm(x.t(), P) with P column-major (what QR returns) took 2.9-3.5 ms, as mm(P^T, x) 0.2 ms; the other
# kernels 0.17-0.63 ms (benchmarks/README.md, "Low-rank gossip").


@torch.no_grad()
def lowrank_project(x: torch.Tensor, basis_t: torch.Tensor, right: bool, out_t: torch.Tensor) -> torch.Tensor:
    """``out_t <- (x @ Q)^T`` (``right``; ``basis_t`` is ``Q^T``, ``r x cols``) or ``(x^T @ P)^T = P^T @ x``
    (``basis_t`` is ``P^T``, ``r x rows``): what a member sends of matrix ``x``, ``r x rows`` or ``r x cols``."""
    if right:
        return out_t.copy_(torch.mm(x, basis_t.t()).t())  # x @ Q with Q column-major: BLAS's fast path
    return torch.mm(basis_t, x, out=out_t)


@torch.no_grad()
def lowrank_correction_(x: torch.Tensor, low_t: torch.Tensor, high_t: torch.Tensor, basis_t: torch.Tensor,
                        right: bool, scale: float) -> torch.Tensor:
    """``x <- x + scale * approx`` with ``approx = D @ Q^T`` (``right``) or ``P @ D^T``, ``D^T = low_t - high_t``
    (the low and the high member's projections, transposed); returns ``D^T``. ``scale``: ``-c`` on the low member,
    ``+c`` on the high one, so that the two corrections are each other's negation to the last bit."""
    d_t = torch.sub(low_t, high_t)
    if right:
        x.addmm_(d_t.t(), basis_t, alpha=scale)
    else:
        x.addmm_(basis_t.t(), d_t, alpha=scale)
    return d_t


@torch.no_grad()
def orthonormal(d_t: torch.Tensor, previous_t: torch.Tensor | None = None) -> torch.Tensor:
    """``B^T`` for an orthonormal basis ``B`` of the columns of ``D`` (given as ``d_t``, ``r x n``): the same on
    both members, who hold the same ``d_t``.

    One row: ``d_t / |d_t|``; where ``d_t`` is zero (the pair agrees on that matrix, e.g. after ``global_avg()``),
    ``previous_t`` if it has ``d_t``'s shape, else the unit vector of equal entries, so that later rounds still see
    a difference that appears (a zero basis would hide every later one). Chosen on the device: the host never
    waits. Several rows: the reduced QR's ``Q``, transposed (an orthonormal basis even of a zero ``D``); row-major,
    as every factor is held.
    """
    if d_t.shape[0] == 1:
        norm = torch.linalg.vector_norm(d_t)
        if previous_t is None or previous_t.shape != d_t.shape:
            previous_t = torch.full_like(d_t, d_t.shape[1] ** -0.5)
        return torch.where(norm > 0, d_t / norm, previous_t)
    return torch.linalg.qr(d_t.t()).Q.t().contiguous()
