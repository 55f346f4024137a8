"""An independent reference of the gossip arithmetic, written from its definition (README, "How it works" and
"Compressed gossip"), simulated for every rank in one process in float64. It shares no code with the package:
tests compare the package's ranks with it.

A round gives rank ``i`` a group ``G`` of ``k`` ranks with self-weight ``w`` (uniform: ``1/k``) and peer weight
``c = (1 - w) / (k - 1)``. From the values ``s`` each member sent at launch:

* full precision: ``w * s_i + c * sum_{j != i} s_j``;
* rounded to a wire dtype ``Q``: ``s_i + c * sum_{j != i} (Q(s_j) - Q(s_i))``;

and what changed ``x_i`` since it was sent is added: ``result + (x_i - s_i)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# A group as the reference takes it: its ranks and its self-weight (None: uniform).
RefGroup = tuple[Sequence[int], float | None]


def groups_of(rounds: Sequence[Sequence[object]]) -> list[list[RefGroup]]:
    """``Schedule.rounds`` (or lists of rank tuples) as the reference's groups."""
    out = []
    for rnd in rounds:
        groups: list[RefGroup] = []
        for g in rnd:
            ranks = getattr(g, "ranks", g)
            groups.append((tuple(ranks), getattr(g, "weight", None)))  # type: ignore[arg-type]
        out.append(groups)
    return out


def saturate(x: torch.Tensor, wire: torch.dtype) -> torch.Tensor:
    """``Q``: round to nearest in ``wire``, values beyond its range at its largest finite value; in float64."""
    top = torch.finfo(wire).max
    return x.float().to(wire).double().nan_to_num(posinf=top, neginf=-top)


def mix_round(groups: Sequence[RefGroup], sent: list[torch.Tensor], current: list[torch.Tensor],
              wire: torch.dtype | None = None) -> list[torch.Tensor]:
    """Every rank's values after one round (ranks in no group keep theirs)."""
    out = [x.clone() for x in current]
    for ranks, weight in groups:
        k = len(ranks)
        if k == 1:
            continue
        w = 1.0 / k if weight is None else weight
        c = (1.0 - w) / (k - 1)
        q = {j: saturate(sent[j], wire) for j in ranks} if wire is not None else {}
        for i in ranks:
            if wire is None:
                result = w * sent[i] + c * sum(sent[j] for j in ranks if j != i)
            else:
                result = sent[i] + c * sum(q[j] - q[i] for j in ranks if j != i)
            out[i] = result + (current[i] - sent[i])
    return out


def damp(rounds: list[list[RefGroup]], max_delay: int) -> list[list[RefGroup]]:
    """The rounds with the weights they mix with when rounds span steps: with ``max_delay = d > 1`` every group
    gives its peers ``(1 - w) / d`` instead of ``1 - w`` (the stability bound of delayed averaging: gossip.damped)."""
    if max_delay <= 1:
        return rounds
    out = []
    for rnd in rounds:
        groups: list[RefGroup] = []
        for ranks, weight in rnd:
            w = 1.0 / len(ranks) if weight is None else weight
            groups.append((ranks, weight if len(ranks) == 1 else 1.0 - (1.0 - w) / max_delay))
        out.append(groups)
    return out


def train(rounds: list[list[RefGroup]], start: list[torch.Tensor], steps: int, update, wire: torch.dtype | None = None,
          after_step=None, max_delay: int = 1, gossip_every: int = 1,
          record: list[list[torch.Tensor]] | None = None) -> list[torch.Tensor]:
    """D-PSGD as ``DecentOptimWrapper`` runs it, ``steps`` steps and then ``finish()``.

    Step ``s`` applies the rounds due at ``s``, takes the local update ``update(rank, s, x) -> x``, and, every
    ``gossip_every`` steps, launches the next round with a copy of the values, due at step
    ``s + gossip_every * max_delay``; ``after_step(s, xs)`` may change values between steps (a write while a round
    is in flight). ``finish()`` applies every round still in flight, oldest first. ``record`` gets every rank's
    values at the end of each step."""
    rounds = damp(rounds, max_delay)
    x = [t.double().clone() for t in start]
    flight: list[tuple[int, int, list[torch.Tensor]]] = []  # (due step, round, what was sent)
    launched = 0
    for s in range(steps):
        while flight and flight[0][0] <= s:
            _, r, sent = flight.pop(0)
            x = mix_round(rounds[r % len(rounds)], sent, x, wire)
        x = [update(rank, s, xi) for rank, xi in enumerate(x)]
        if (s + 1) % gossip_every == 0:
            flight.append((s + gossip_every * max_delay, launched, [xi.clone() for xi in x]))
            launched += 1
        if after_step is not None:
            x = after_step(s, x)
        if record is not None:
            record.append([xi.clone() for xi in x])
    for _, r, sent in flight:
        x = mix_round(rounds[r % len(rounds)], sent, x, wire)
    return x
