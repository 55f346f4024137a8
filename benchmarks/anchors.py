"""Slow-link anchors for ``cluster_compare.py``: what an informed user runs instead of plain DDP on a slow link.

    ddp-powersgd-r<R>[-s<START>][+bf16]   DDP + torch's powerSGD_hook, rank R, error feedback and warm start on,
                                          plain all-reduce for the first START steps; +bf16 wraps the hook in
                                          bf16_compress_wrapper
    localsgd-<H>[-w<WARMUP>]              torch's post-local SGD: DDP with post_localSGD_hook for WARMUP steps,
                                          then local steps and PostLocalSGDOptimizer's parameter average every H
    diloco-<H>[-lr<LR>][-olr<OLR>][-own]  DiLoCo: inner AdamW (learning rate LR) for H steps, then one outer
                                          Nesterov SGD step (lr OLR, default 0.7, momentum 0.9) on the averaged
                                          pseudo-gradient; -own: the workload's own optimizer as the inner one

The optional parts default to the values chosen by the sweep written down in benchmarks/README.md ("Slow-link
anchors"), relative to the step budget where the choice depends on it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["Anchor", "DiLoCo", "build", "describe", "parse", "DILOCO_OUTER_LR", "DILOCO_OUTER_MOMENTUM",
           "MLP_DILOCO_INNER_LR", "MLP_LOCALSGD_WARMUP", "MLP_POWERSGD_START"]

DILOCO_OUTER_LR = 0.7
DILOCO_OUTER_MOMENTUM = 0.9
# What an unspecified setting becomes, per workload. The MLP's come from the sweep in benchmarks/README.md
# ("Slow-link anchors"); the LM's are not swept: torch's advice for PowerSGD (plain all-reduce for the first 10% of
# training, no less than the learning-rate warm-up: 24 of the default 240 steps, warm-up 20), the same warm-up
# for post-local SGD, and the workload's own AdamW for DiLoCo.
MLP_POWERSGD_START = 2  # the hook's minimum with error feedback or warm start (its state needs a plain step)
MLP_LOCALSGD_WARMUP = 0
MLP_DILOCO_INNER_LR = 1e-3
TENTH = 0.1

_NUM = r"\d+(?:\.\d*)?(?:e-?\d+)?"
_PATTERNS = {
    "powersgd": re.compile(r"ddp-powersgd-r(?P<value>[1-9]\d*)(?:-s(?P<warmup>\d+))?(?P<bf16>\+bf16)?"),
    "localsgd": re.compile(r"localsgd-(?P<value>[1-9]\d*)(?:-w(?P<warmup>\d+))?"),
    "diloco": re.compile(rf"diloco-(?P<value>[1-9]\d*)(?:-lr(?P<lr>{_NUM}))?(?:-olr(?P<olr>{_NUM}))?(?P<own>-own)?"),
}


@dataclass(frozen=True)
class Anchor:
    """A parsed anchor method: ``value`` is PowerSGD's rank or the period H; None means the default."""

    kind: str
    value: int
    warmup: int | None = None
    lr: float | None = None
    outer_lr: float = DILOCO_OUTER_LR
    own_inner: bool = False
    bf16: bool = False

    @property
    def period(self) -> int:
        """Steps between two communications that cost the link (1: every step)."""
        return 1 if self.kind == "powersgd" else self.value

    def resolve(self, steps: int, workload: str) -> Anchor:
        """This anchor with every unspecified setting filled in for ``workload`` and a budget of ``steps``."""
        if self.kind == "diloco":
            lr = self.lr
            if lr is None and workload == "mlp" and not self.own_inner:
                lr = MLP_DILOCO_INNER_LR
            return replace(self, lr=lr)
        if self.warmup is not None:
            return self
        tenth = round(TENTH * steps)
        if self.kind == "powersgd":
            return replace(self, warmup=MLP_POWERSGD_START if workload == "mlp" else max(2, tenth))
        return replace(self, warmup=MLP_LOCALSGD_WARMUP if workload == "mlp" else tenth)


def parse(method: str) -> Anchor | None:
    """The anchor ``method`` names, or None if it names none (ValueError if it is one with a bad value)."""
    for kind, pattern in _PATTERNS.items():
        m = pattern.fullmatch(method)
        if m is None:
            continue
        g = m.groupdict()
        anchor = Anchor(kind, int(g["value"]), None if g.get("warmup") is None else int(g["warmup"]),
                        None if g.get("lr") is None else float(g["lr"]), own_inner=bool(g.get("own")),
                        outer_lr=DILOCO_OUTER_LR if g.get("olr") is None else float(g["olr"]),
                        bf16=bool(g.get("bf16")))
        if kind == "powersgd" and anchor.warmup is not None and anchor.warmup < 2:
            raise ValueError(f"Invalid method={method!r}: PowerSGD with error feedback needs -s2 or more.")
        if (anchor.lr is not None and not anchor.lr > 0) or not anchor.outer_lr > 0:
            raise ValueError(f"Invalid method={method!r}: learning rates must be > 0.")
        return anchor
    return None


class DiLoCo:
    """DiLoCo (Douillard et al., 2023): ``inner`` steps locally; every ``sync_every`` steps the ranks average
    their pseudo-gradients (global parameters at the last sync minus the current local ones) in one all-reduce,
    an outer Nesterov SGD steps the global parameters with it, and every rank continues from the result.

    Behaves like an optimizer for the training loop (``step``, ``zero_grad``); the outer momentum and the global
    parameters are the only state besides ``inner``'s.
    """

    def __init__(self, inner: torch.optim.Optimizer, params: Iterable[nn.Parameter], sync_every: int,
                 outer_lr: float = DILOCO_OUTER_LR, outer_momentum: float = DILOCO_OUTER_MOMENTUM,
                 group: dist.ProcessGroup | None = None) -> None:
        if sync_every < 1:
            raise ValueError(f"Invalid sync_every={sync_every}. Must be >= 1.")
        self.inner, self.sync_every, self.group = inner, sync_every, group
        self.params = list(params)
        with torch.no_grad():
            self.global_params = [p.detach().clone() for p in self.params]
        self.outer = torch.optim.SGD(self.global_params, lr=outer_lr, momentum=outer_momentum, nesterov=True)
        # One flat buffer, one all-reduce per sync (as DDP's buckets do): per-tensor collectives would pay a
        # message per tensor on the link.
        self._flat = torch.empty(sum(p.numel() for p in self.params), dtype=self.params[0].dtype)
        self._views = [v.view_as(p) for v, p in zip(self._flat.split([p.numel() for p in self.params]),
                                                    self.params)]
        self.local_step = 0
        self.syncs = 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.inner.step()
        self.local_step += 1
        if self.local_step % self.sync_every == 0:
            self.sync()

    @torch.no_grad()
    def sync(self) -> None:
        """The outer step: average the pseudo-gradients, step the global parameters, start every rank from them."""
        for view, g, p in zip(self._views, self.global_params, self.params):
            torch.sub(g, p, out=view)
        dist.all_reduce(self._flat, group=self.group)  # gloo has no AVG: sum, then divide
        self._flat.div_(dist.get_world_size(self.group))
        for view, g in zip(self._views, self.global_params):
            g.grad = view
        self.outer.step()
        for g, p in zip(self.global_params, self.params):
            p.copy_(g)
        self.syncs += 1


def describe(anchor: Anchor, inner: torch.optim.Optimizer) -> str:
    """The settings a resolved ``anchor`` runs with, for the summary."""
    if anchor.kind == "powersgd":
        return (f"PowerSGD rank {anchor.value}, start_powerSGD_iter {anchor.warmup}, error feedback and "
                f"warm start on, one DDP bucket{', bf16_compress_wrapper' if anchor.bf16 else ''}")
    if anchor.kind == "localsgd":
        return (f"post-local SGD: DDP gradient all-reduce for {anchor.warmup} steps, then parameter "
                f"average every {anchor.value} steps")
    g = inner.param_groups[0]
    return (f"DiLoCo: inner {type(inner).__name__} lr {g['lr']:g} weight decay {g['weight_decay']:g} for "
            f"{anchor.value} steps, outer SGD lr {anchor.outer_lr:g} Nesterov momentum {DILOCO_OUTER_MOMENTUM}")


def build(anchor: Anchor, model: nn.Module, make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
          seed: int, local_world_size: int) -> tuple[nn.Module, torch.optim.Optimizer | DiLoCo, torch.optim.Optimizer]:
    """(model to call, optimizer to step, inner optimizer) for ``anchor`` on this rank.

    ``make_optimizer(params)`` is the workload's own optimizer; every rank must call this (it creates groups).
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    if anchor.kind == "powersgd":
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_wrapper

        # One bucket: on gloo (torch 2.15) the hook hangs or aborts with two or more buckets, because the
        # collectives it chains from future callbacks (P all-reduce, then Q all-reduce) run in a different order
        # on different ranks. A bucket larger than the model holds every gradient.
        model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        ddp = DDP(model, bucket_cap_mb=math.ceil(model_mb) + 1)
        state = psgd.PowerSGDState(process_group=None, matrix_approximation_rank=anchor.value,
                                   start_powerSGD_iter=anchor.warmup, use_error_feedback=True,
                                   warm_start=True, random_seed=seed)
        ddp.register_comm_hook(state, bf16_compress_wrapper(psgd.powerSGD_hook) if anchor.bf16
                               else psgd.powerSGD_hook)
        inner = make_optimizer(list(ddp.parameters()))
        return ddp, inner, inner
    if anchor.kind == "localsgd":
        from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import (
            PostLocalSGDState,
            post_localSGD_hook,
        )
        from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
        from torch.distributed.optim import PostLocalSGDOptimizer

        warmup = anchor.warmup or 0
        # torch's recipe: DDP all-reduces gradients globally during the warm-up, then only inside a host (the
        # subgroup; ranks of a host are consecutive), and the optimizer averages parameters globally every H
        # steps. new_subgroups' default sizes groups by CUDA devices, which a CPU host has none of.
        subgroup, _ = dist.new_subgroups(group_size=local_world_size)
        ddp = DDP(model)
        ddp.register_comm_hook(PostLocalSGDState(process_group=None, subgroup=subgroup, start_localSGD_iter=warmup),
                               post_localSGD_hook)
        inner = make_optimizer(list(ddp.parameters()))
        averager = PeriodicModelAverager(period=anchor.value, warmup_steps=warmup)
        return ddp, PostLocalSGDOptimizer(inner, averager), inner
    if anchor.kind == "diloco":
        params = list(model.parameters())
        inner = make_optimizer(params)
        if not anchor.own_inner and not isinstance(inner, torch.optim.AdamW):
            # DiLoCo's inner optimizer is AdamW; a workload that trains with another one gets a plain AdamW.
            inner = torch.optim.AdamW(params, lr=anchor.lr or MLP_DILOCO_INNER_LR)
        if anchor.lr is not None:
            for g in inner.param_groups:
                g["lr"] = anchor.lr
        return model, DiLoCo(inner, params, anchor.value, outer_lr=anchor.outer_lr), inner
    raise ValueError(f"Unknown anchor kind={anchor.kind!r}.")
