"""DecentralizedDataParallel: the Decent-DP module API, on the same buckets, topologies and gossip engine.

The model's trainable parameters are split into buckets of about ``bucket_size_in_mb``, in reverse
registration order (roughly the order their gradients become ready in backward). Each bucket gets its own
optimizer from ``optim_fn`` and is driven by its own :class:`~decent_optim_wrapper.DecentOptimWrapper`. When
the last gradient of a bucket has been accumulated during ``backward()``, that bucket is stepped right away:
its previous averaging is applied, its optimizer steps, and its next averaging starts, while backward goes on
computing the gradients of earlier layers. At the end of every backward pass the buckets not stepped yet (some
of their parameters got no gradient) step too, so every rank takes every bucket's round and no gradient waits
for a ``zero_grad()`` to wipe it. No ``optimizer.step()`` in the training loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from loguru import logger
from torch import Tensor, nn
from torch.distributed.algorithms.join import Join, Joinable, JoinHook
from torch.optim import Optimizer

from .buckets import check_bucket_cap
from .comm import Checks, ProcessGroups, agree, digest32, wait_all
from .config import GossipConfig, LowRank
from .gossip import Shadow
from .wrapper import DecentOptimWrapper, _revert_flag

__all__ = ["DecentralizedDataParallel", "OPTIM_FN_TYPE", "LR_SCHEDULER_FN_TYPE"]

OPTIM_FN_TYPE = Callable[[list[tuple[str, Tensor]]], Optimizer]
LR_SCHEDULER_FN_TYPE = Callable[[Optimizer], Any]


class DecentralizedDataParallel(nn.Module, Joinable):
    """Wrap ``model`` for decentralized data-parallel training; the optimizer steps inside ``backward()``.

    Uneven inputs: inside ``torch.distributed.algorithms.Join([ddp_model])`` a rank that ran out of data stands
    in for the others' iterations (and their ``global_avg``) until every rank is done.

    Args:
        model: the model, already on its device.
        optim_fn: ``optim_fn(named_params) -> Optimizer``, called once per bucket with ``[(name, param), ...]``
            (see :mod:`decent_optim_wrapper.optim`).
        lr_scheduler_fn: optional ``lr_scheduler_fn(optimizer) -> scheduler``, called once per bucket; each
            scheduler steps once per iteration.
        topology: a registered topology name (see ``TopologyFactory.available()``).
        scaler: an optional ``torch.amp.GradScaler``; ``update()`` runs once per iteration.
        grad_clip_norm: if > 0, clip each bucket's gradients to this norm before its step (per bucket, since
            the buckets step one by one during backward).
        sync_buffer_in_global_avg: also average floating-point buffers (BatchNorm statistics) in
            :meth:`global_avg`.
        bucket_size_in_mb: target bucket size.
        local_world_size: ranks per node for hierarchical topologies; default ``LOCAL_WORLD_SIZE`` or 1.
        timeout: seconds a bucket's averaging may wait for its peers (see ``DecentOptimWrapper``; default 5
            minutes).
        process_group: gossip among this group's members only (default: the world).
        wire_dtype, compression, max_delay, gossip_every: as for ``DecentOptimWrapper`` (one
            :class:`~decent_optim_wrapper.config.GossipConfig` for every bucket).
    """

    def __init__(self, model: nn.Module, optim_fn: OPTIM_FN_TYPE, lr_scheduler_fn: LR_SCHEDULER_FN_TYPE | None = None,
                 topology: str = "complete", scaler: torch.amp.GradScaler | None = None, grad_clip_norm: float = 0.0,
                 sync_buffer_in_global_avg: bool = False, bucket_size_in_mb: float = 25,
                 local_world_size: int | None = None, timeout: float | None = None,
                 process_group: torch.distributed.ProcessGroup | None = None,
                 wire_dtype: torch.dtype | None = None, *, compression: LowRank | None = None, max_delay: int = 1,
                 gossip_every: int = 1) -> None:
        super().__init__()
        Joinable.__init__(self)  # the Join configuration: off outside a Join
        self._join_work: Any = None
        # Every argument is checked, and every bucket's optimizer built, before the first collective; the
        # verdict is shared, so a problem on one rank raises the same ValueError on all of them.
        checks = Checks(None)
        checks.run(_check_model, model)
        checks.run(_check_callable, "optim_fn", optim_fn, "optim_fn(named_params) -> Optimizer")
        if lr_scheduler_fn is not None:
            checks.run(_check_callable, "lr_scheduler_fn", lr_scheduler_fn, "lr_scheduler_fn(optimizer) -> scheduler")
        checks.run(_check_grad_clip_norm, grad_clip_norm)
        checks.run(check_bucket_cap, bucket_size_in_mb, "bucket_size_in_mb")
        # every bucket is one wrapper's single bucket (bucket_cap_mb inf); the rest is checked here, once
        config = checks.run(lambda: GossipConfig(
            topology=topology, local_world_size=local_world_size, bucket_cap_mb=float("inf"), timeout=timeout,
            wire_dtype=wire_dtype, compression=compression, max_delay=max_delay, gossip_every=gossip_every))
        self.module = model
        self._scaler = scaler
        self._grad_clip_norm = float(grad_clip_norm) if checks.error is None else 0.0
        self._sync_buffers = sync_buffer_in_global_avg
        self._accumulating = False
        self._accumulated = False  # a backward ran while accumulating: set_accumulate_grad(False) steps
        self._iteration_open = False  # a gradient arrived in this iteration; every bucket must step
        self._end_queued = False  # the end-of-backward callback of the running backward pass is queued

        chunks = _bucket_plan(model, bucket_size_in_mb) if checks.error is None else []
        inners: list[Optimizer] = []
        for chunk in chunks:
            inner = checks.run(_build_inner, optim_fn, chunk)
            if inner is None:
                break
            inners.append(inner)
        dist_on = torch.distributed.is_available() and torch.distributed.is_initialized()
        if dist_on and torch.distributed.get_world_size(process_group) > 1:
            agree(ProcessGroups(process_group), torch.distributed.get_rank(process_group),
                  "constructing DecentralizedDataParallel", checks.error, {
                      "model": (digest32([[(n, tuple(p.shape), str(p.dtype)) for n, p in c] for c in chunks]),
                                "hold different models or bucket plans",
                                "every rank must wrap the same model with the same bucket_size_in_mb"),
                  })  # the process group's timeout: ranks reach construction seconds apart
        elif checks.error is not None:
            raise ValueError(checks.error)

        self._optimizers: list[DecentOptimWrapper] = []
        self._schedulers: list[Any] = []
        for inner in inners:
            wrapper = DecentOptimWrapper(inner, process_group=process_group, config=config)
            self._optimizers.append(wrapper)
            self._schedulers.append(lr_scheduler_fn(wrapper) if lr_scheduler_fn is not None else None)
        self._bucket_params: list[list[Tensor]] = [[p for _, p in chunk] for chunk in chunks]
        self._ready = [0] * len(chunks)
        # Buckets step strictly in index order, on every rank: a bucket whose gradients are ready out of turn
        # waits for the ones before it (as torch's reducer does), so that every rank issues its buckets'
        # rounds in the same order. NCCL matches messages by order alone, and so do collectives on gloo.
        self._next = 0
        self._hooks = [
            p.register_post_accumulate_grad_hook(self._make_hook(i))
            for i, params in enumerate(self._bucket_params) for p in params
        ]
        logger.debug("rank {}: DecentralizedDataParallel with {} bucket(s) of {} parameters",
                     torch.distributed.get_rank() if dist_on else 0, len(chunks), [len(c) for c in chunks])

    # ------------------------------------------------------------------ the module
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._flush()  # buckets whose parameters got no gradient still take their round
        return self.module(*args, **kwargs)

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        return self.module.parameters(recurse)

    @property
    def optimizers(self) -> list[DecentOptimWrapper]:
        """One :class:`DecentOptimWrapper` per bucket, in stepping order."""
        return self._optimizers

    @property
    def lr_schedulers(self) -> list[Any]:
        return self._schedulers

    # ------------------------------------------------------------------ stepping inside backward
    def _make_hook(self, bucket: int) -> Callable[[Tensor], None]:
        def hook(_: Tensor) -> None:
            if self._accumulating:
                self._accumulated = True
                return
            self._iteration_open = True
            if not self._end_queued:
                # Buckets with a parameter that gets no gradient (an unused layer, a branch one rank skips) never
                # become ready, and neither do the buckets queued behind them: they step when backward ends (as
                # torch's reducer finalises there), before a zero_grad() could wipe their gradients.
                torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
                self._end_queued = True
            self._ready[bucket] += 1
            # Step every bucket whose turn has come and whose gradients are all there.
            while self._next < len(self._ready) and self._ready[self._next] == len(self._bucket_params[self._next]):
                self._step_bucket(self._next)
            if self._next == len(self._ready):
                self._close_iteration()

        return hook

    def _end_of_backward(self) -> None:
        self._end_queued = False
        self._flush()

    @torch.no_grad()
    def _step_bucket(self, i: int) -> None:
        assert i == self._next  # buckets step in index order, always
        if i == 0:  # an iteration's rounds begin: inside a Join, tell the ranks that ran out of inputs
            self._announce(Shadow.STEP)
        opt = self._optimizers[i]
        if self._scaler is not None:
            if self._grad_clip_norm > 0:
                self._scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(self._bucket_params[i], self._grad_clip_norm)
            self._scaler.step(opt)
        else:
            if self._grad_clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(self._bucket_params[i], self._grad_clip_norm)
            opt.step()
        opt.zero_grad()
        if self._schedulers[i] is not None:
            self._schedulers[i].step()
        self._next += 1

    def _close_iteration(self) -> None:
        if self._scaler is not None:
            self._scaler.update()
        self._ready = [0] * len(self._ready)
        self._next = 0
        self._iteration_open = False

    def _flush(self) -> None:
        """Step, in order, the buckets an open iteration has not stepped yet."""
        if self._iteration_open:
            self._finish_iteration()

    def _finish_iteration(self) -> None:
        while self._next < len(self._ready):
            self._step_bucket(self._next)
        self._close_iteration()

    def finish(self) -> None:
        """Step the buckets still open and apply every bucket's averaging in flight (blocking).

        Call on every rank at the end of training, before the process group is destroyed (see
        :meth:`DecentOptimWrapper.finish`): it returns once every rank has called it.
        """
        self._flush()
        for opt in self._optimizers:
            opt._finish()
        if self._join_work is not None:  # Join's count: a process group destroyed under it aborts the process
            wait_all([self._join_work], None, "counting the ranks still in a Join")
            self._join_work = None
        self._optimizers[0].gossip.barrier("finish()")

    def set_accumulate_grad(self, enable: bool = True) -> None:
        """Accumulate gradients over several backward passes instead of stepping in each.

        Turning it off after gradients were accumulated performs the update right away, once, with the
        accumulated gradients (and one averaging round).
        """
        self._flush()
        self._accumulating = enable
        if not enable and self._accumulated:
            self._accumulated = False
            self._finish_iteration()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients (the buckets already clear theirs after stepping). Buckets of an iteration not stepped
        yet step first, so no gradient is lost."""
        self._flush()
        self.module.zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------------ evaluation, export, metrics

    def global_avg(self, may_revert: bool = True, *, will_revert: bool | None = None) -> None:
        """Replace every worker's parameters (and buffers, if ``sync_buffer_in_global_avg``) by the mean.

        ``may_revert=True`` keeps what is replaced until :meth:`revert_global_avg`; ``will_revert`` is a
        deprecated alias (Decent-DP's name)."""
        may_revert = _revert_flag(may_revert, will_revert)
        self._flush()
        self._announce(Shadow.GLOBAL_AVG, int(may_revert) | (2 if self._sync_buffers else 0))
        for k, opt in enumerate(self._optimizers):
            # the module's buffers are averaged once, with the first bucket
            opt.global_avg(may_revert=may_revert, module=self.module if self._sync_buffers and k == 0 else None)

    def revert_global_avg(self) -> None:
        """Restore what :meth:`global_avg` replaced; training continues as if it never ran."""
        self._announce(Shadow.REVERT)
        for opt in self._optimizers:
            opt.revert_global_avg()

    def consensus_distance(self) -> float:
        """``sqrt(mean_i ||x_i - x̄||^2)`` over all trainable parameters; the same on every rank."""
        self._announce(Shadow.CONSENSUS)
        return sum(opt.consensus_distance() ** 2 for opt in self._optimizers) ** 0.5

    # ------------------------------------------------------------------ uneven inputs (torch's Join)
    def join_hook(self, **kwargs: Any) -> JoinHook:
        """What this rank does inside ``Join([ddp_model])`` once it has run out of inputs: until every rank has,
        it stands in for each iteration of the ranks still training (every bucket's round, with the parameters
        as they are, no local update, no LR scheduler step) and for their ``global_avg``,
        ``revert_global_avg`` and ``consensus_distance``."""
        return _FacadeShadowHook(self)

    @property
    def join_device(self) -> torch.device:
        return self._optimizers[0].join_device

    @property
    def join_process_group(self) -> Any:
        return self._optimizers[0].join_process_group

    def _announce(self, op: Shadow, arg: int = 0) -> None:
        if self._join_config.enable:
            self._join_work = Join.notify_join_context(self) or self._join_work
            self._optimizers[0].gossip.announce(op, arg)

    def _shadow(self) -> None:
        op, arg = self._optimizers[0]._hear()
        for k, opt in enumerate(self._optimizers):
            opt._shadow_op(op, arg, self.module if k == 0 and arg & 2 else None)

    def get_lr(self) -> float:
        """The current learning rate of the first bucket."""
        sched = self._schedulers[0]
        if sched is not None and hasattr(sched, "get_last_lr"):
            return float(sched.get_last_lr()[0])
        return float(self._optimizers[0].param_groups[0]["lr"])

    def optim_state_dict(self) -> dict[str, Any]:
        """The buckets' optimizer (and scheduler) states, for checkpointing next to ``module.state_dict()``."""
        self._flush()
        return {"optimizers": [o.state_dict() for o in self._optimizers],
                "schedulers": [s.state_dict() if s is not None else None for s in self._schedulers]}

    def _run_identity(self) -> dict[str, Any]:
        """What a checkpoint of this run must match (see ``checkpoint.CheckpointManager``)."""
        parts = [opt._run_identity() for opt in self._optimizers]
        return {"topology": parts[0]["topology"], "schedule": parts[0]["schedule"],
                "layout": digest32([p["layout"] for p in parts])}

    def load_optim_state_dict(self, state: dict[str, Any]) -> None:
        """Load what :meth:`optim_state_dict` returned."""
        if len(state.get("optimizers", [])) != len(self._optimizers):
            raise ValueError(f"Cannot load optimizer states of {len(state.get('optimizers', []))} buckets into "
                             f"{len(self._optimizers)} buckets (another model or bucket_size_in_mb?).")
        for opt, sd in zip(self._optimizers, state["optimizers"]):
            opt.load_state_dict(sd)
        for sched, sd in zip(self._schedulers, state["schedulers"]):
            if sched is not None and sd is not None:
                sched.load_state_dict(sd)


class _FacadeShadowHook(JoinHook):
    """The Join hook of a :class:`DecentralizedDataParallel` (see its :meth:`~DecentralizedDataParallel.join_hook`)."""

    def __init__(self, ddp: DecentralizedDataParallel) -> None:
        self.ddp = ddp

    def main_hook(self) -> None:
        self.ddp._shadow()


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise ValueError(f"Invalid model of type {type(model).__name__}. Must be a torch.nn.Module.")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("Invalid model: it has no parameters with requires_grad=True.")


def _check_callable(name: str, fn: Any, form: str) -> None:
    if not callable(fn):
        raise ValueError(f"Invalid {name}={fn!r}. Must be callable: {form}.")


def _check_grad_clip_norm(grad_clip_norm: Any) -> None:
    if isinstance(grad_clip_norm, bool) or not isinstance(grad_clip_norm, (int, float)) or grad_clip_norm < 0:
        raise ValueError(f"Invalid grad_clip_norm={grad_clip_norm!r}. Must be a number >= 0 (0: no clipping).")


def _bucket_plan(model: nn.Module, bucket_size_in_mb: float) -> list[list[tuple[str, Tensor]]]:
    """The trainable parameters in buckets of about ``bucket_size_in_mb``, in reverse registration order
    (roughly the order in which backward produces their gradients)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    cap = bucket_size_in_mb * 2**20
    chunks: list[list[tuple[str, Tensor]]] = [[]]
    size = 0
    for name, p in reversed(named):
        nbytes = p.numel() * p.element_size()
        if chunks[-1] and size + nbytes > cap:
            chunks.append([])
            size = 0
        chunks[-1].append((name, p))
        size += nbytes
    return chunks


def _build_inner(optim_fn: OPTIM_FN_TYPE, chunk: list[tuple[str, Tensor]]) -> Optimizer:
    try:
        inner = optim_fn(chunk)
    except Exception as exc:  # shared with the other ranks, which would otherwise wait for this one
        raise ValueError(f"Invalid optim_fn: it raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(inner, Optimizer):
        raise ValueError(f"Invalid optim_fn: it returned {type(inner).__name__}, not a torch.optim.Optimizer.")
    return inner
