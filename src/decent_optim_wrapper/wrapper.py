"""DecentOptimWrapper: decentralized (gossip) averaging around any ``torch.optim.Optimizer``."""

from __future__ import annotations

import inspect
import math
import os
import warnings
from collections import OrderedDict
from collections.abc import Callable
from datetime import timedelta
from typing import Any, cast, overload

import torch
import torch.distributed as dist
from loguru import logger
from torch.distributed.algorithms.join import Join, Joinable, JoinHook
from torch.optim import Optimizer

from .buckets import Bucket, build_buckets, check_params, check_views, describe_params
from .comm import (
    Checks,
    Failure,
    GossipError,
    ProcessGroups,
    WeakGroup,
    agree,
    digest32,
    global_rank,
    wait_all,
)
from .config import GossipConfig, LowRank
from .gossip import CommStats, Gossip, Shadow, next_instance
from .plan import Plan
from .reinit import build_lr_scheduler, build_optimizer, validate_lr_scheduler_config
from .topo import Schedule, Topology, TopologyFactory

__all__ = ["DecentOptimWrapper"]

_STATE_KEY = "decent_optim_wrapper"


class _InitSignature:
    """``inspect.signature`` of a class: its ``__init__``'s, without ``self``."""

    def __get__(self, obj: object, cls: type) -> inspect.Signature:
        if obj is not None:  # an instance is not callable: it has no signature
            raise AttributeError("__signature__")
        sig = inspect.signature(cls.__init__)  # type: ignore[misc]
        return sig.replace(parameters=list(sig.parameters.values())[1:])


class DecentOptimWrapper(Optimizer, Joinable):
    """Wrap ``optimizer`` so that every :meth:`step` also averages parameters with topology neighbours.

    ``step()`` waits for the averaging launched by the previous step and writes it into the parameters,
    runs the inner optimizer's step, then launches non-blocking averaging over this round's group, so the
    communication overlaps the next forward and backward (D-PSGD: ``y <- W_t y - lr * update``).

    Uneven inputs: inside ``torch.distributed.algorithms.Join([optimizer])`` a rank that ran out of data stands
    in for the others' rounds (and their ``global_avg``) until every rank is done.

    Args:
        optimizer: the optimizer to wrap; its parameters become views into flat buckets.
        rank: this process's rank; default ``torch.distributed.get_rank()``.
        world_size: number of processes; default ``torch.distributed.get_world_size()``, or 1 when no
            process group is initialised.
        local_world_size: processes per node (used by hierarchical topologies); default (``None`` or 0)
            the ``LOCAL_WORLD_SIZE`` environment variable that ``torchrun`` sets, else 1.
        topology: a registered topology name (see ``TopologyFactory.available()``), a ``Topology``
            subclass or instance.
        bucket_cap_mb: largest bucket, in MiB; one set of buckets per (device, dtype).
        timeout: seconds (or a ``timedelta``) a step may wait for its peers before raising
            :class:`~decent_optim_wrapper.comm.GossipError` (a dead, hung or out-of-step peer); default
            :data:`~decent_optim_wrapper.comm.DEFAULT_TIMEOUT`, 5 minutes. Millisecond resolution.
        check_rounds: exchange a stamp with every round (a few integers on a gloo control group, never on
            the GPU) so that ranks out of step, a dead peer or a peer that failed raise ``GossipError``
            instead of averaging with the wrong round or waiting forever.
        process_group: gossip among the members of this group only (ranks and world size are then those
            within the group, as ``torch.distributed`` numbers them); default the world. Several groups
            can train side by side, e.g. one per model-parallel shard.
        wire_dtype: dtype the parameters travel in, e.g. ``torch.bfloat16`` (half the bytes of float32);
            default ``None``, the parameters' own dtype. Parameters stay in their own precision, and the
            mix keeps the global mean exact (see :mod:`~decent_optim_wrapper.mixing`).
        pair_transport: how full-precision pairs travel: ``"auto"`` (the backend's fastest, see
            :meth:`~decent_optim_wrapper.plan.Plan.route`), ``"p2p"`` or ``"allreduce"``.
        check_finite: after each mix and each local update, check that the parameters are finite and, if not,
            raise on this rank, naming which of the two produced them, and make its peers raise a
            ``GossipError`` that names it, before the values spread (costs two reductions and, on CUDA, two host
            synchronisations per step).
        compression: ``LowRank(rank=r)``: pairs exchange rank-``r`` factors of the difference of their matrices
            (PowerGossip) instead of the matrices, larger groups edge by edge; default ``None``.
        max_delay: a round launched after step ``t`` is applied at step ``t + max_delay * gossip_every``: its
            transfer overlaps that many forward/backward passes and optimizer steps. 1 (the default) is
            decent-optim-wrapper 0.1's order, bit for bit.
        gossip_every: launch a round every this many steps; the steps in between are local.
        config: all of the gossip arguments above (and ``topology``, ``local_world_size``,
            ``bucket_cap_mb``) as one :class:`~decent_optim_wrapper.config.GossipConfig`, instead of giving them
            one by one (the facades share it).
        manager: a ``torchft.Manager``: gossip over its live membership, so that training goes on when a replica
            dies (see :mod:`decent_optim_wrapper.ft`; ``pip install decent-optim-wrapper[ft]``). The object built
            is then a :class:`~decent_optim_wrapper.ft.ManagedDecentOptimWrapper`. Default ``None``: torchft is not
            imported.
    """

    # inspect.signature(cls) reads a class's own __new__ before its __init__, and this __new__ only dispatches:
    # without this, help(), IDEs and code that checks for an argument saw (*args, manager=None, **kwargs).
    __signature__ = _InitSignature()

    def __new__(cls, *args: Any, manager: Any = None, **kwargs: Any) -> DecentOptimWrapper:
        if manager is not None and cls is DecentOptimWrapper:
            from .ft import ManagedDecentOptimWrapper  # only with a manager: torchft users only

            return super().__new__(ManagedDecentOptimWrapper)
        return super().__new__(cls)

    def __init__(
        self,
        optimizer: Optimizer,
        rank: int | None = None,
        world_size: int | None = None,
        local_world_size: int | None = None,
        topology: str | Topology | type[Topology] = "ring",
        bucket_cap_mb: float = 25,
        *,
        timeout: float | timedelta | None = None,
        check_rounds: bool = True,
        process_group: dist.ProcessGroup | None = None,
        wire_dtype: torch.dtype | None = None,
        pair_transport: str = "auto",
        check_finite: bool = False,
        compression: LowRank | None = None,
        max_delay: int = 1,
        gossip_every: int = 1,
        config: GossipConfig | None = None,
        manager: Any = None,
    ) -> None:
        if manager is not None:  # only a subclass that takes it gets here with one (see __new__)
            raise ValueError(f"Invalid manager={manager!r} for {type(self).__name__}: give it to DecentOptimWrapper.")
        self._init_optimizer_hooks()
        Joinable.__init__(self)  # the Join configuration: off outside a Join
        self._join_work: dist.Work | None = None
        self._rank, self._world_size, error = _resolve_rank_and_world_size(rank, world_size, process_group)
        self._pg_ref = WeakGroup(process_group)
        # Every argument is checked before the first collective; a problem on one rank is shared with all
        # of them, so every rank raises the same ValueError and none is left waiting.
        checks = Checks(error)
        params: list[torch.Tensor] = []
        if checks.run(_check_optimizer, optimizer):
            params = [p for g in optimizer.param_groups for p in g["params"]]
        self._optimizer = optimizer
        given = {"topology": topology, "local_world_size": local_world_size, "bucket_cap_mb": bucket_cap_mb,
                 "timeout": timeout, "check_rounds": check_rounds, "wire_dtype": wire_dtype,
                 "pair_transport": pair_transport, "check_finite": check_finite, "compression": compression,
                 "max_delay": max_delay, "gossip_every": gossip_every}
        cfg: GossipConfig = checks.run(_config, config, given) or GossipConfig()  # defaults: the error is shared
        self._config = cfg
        self._timeout = cfg.timeout_delta
        self._local_world_size = checks.run(_resolve_local_world_size, cfg.local_world_size) or 1
        checks.run(check_params, params)
        self._topology: Topology | None = checks.run(_make_topology, cfg.topology, self._rank, self._world_size,
                                                     self._local_world_size)
        schedule: Schedule | None = checks.run(self._topology.schedule) if self._topology is not None else None
        if schedule is not None and cfg.compression is not None:
            checks.run(_check_lowrank, cfg, schedule, self._rank, params, process_group)
        self._bucket_cap_mb = cfg.bucket_cap_mb
        self._check_finite = cfg.check_finite

        groups = ProcessGroups(process_group) if self._world_size > 1 else None
        if groups is not None:
            agree(groups, self._rank, "constructing DecentOptimWrapper", checks.error, {
                "schedule": (schedule.digest() if schedule else "", "built different topology schedules",
                             "a custom topology must depend on nothing but rank, world_size and local_world_size"),
                "layout": (digest32(describe_params(params), cfg.bucket_cap_mb), "hold different parameter layouts",
                           "every rank must build the same model and optimizer, with parameters in the same "
                           "order, shapes, dtypes and requires_grad, and the same bucket_cap_mb"),
                "options": ((cfg.agreed(), next_instance(groups)), "use different options",
                            "wire_dtype, check_rounds, pair_transport, compression, max_delay and gossip_every must "
                            "be equal on every rank, and every rank must have built as many wrappers before this "
                            "one"),
            })  # the process group's timeout: ranks reach construction seconds apart (loading data, models)
        elif checks.error is not None:
            raise ValueError(checks.error)
        if schedule is None:  # unreachable: a missing schedule comes with an error, raised above
            raise RuntimeError("internal error: no schedule and no error")
        self._schedule = schedule
        self._buckets: list[Bucket] = build_buckets(params, cfg.bucket_cap_mb, self._lowrank)
        if groups is not None:
            self._broadcast_from_rank0(self._buckets)
            self._gossip = Gossip(schedule, self._rank, self._buckets, groups, cfg)
        else:
            self._gossip = Gossip.alone(schedule, self._buckets, cfg)
        logger.debug(
            "rank {}/{}: topology {} with period {}, {} bucket(s)",
            self._rank, self._world_size, self.topology.name, schedule.period, len(self._buckets),
        )

    # ------------------------------------------------------------------ torch.optim.Optimizer facade
    def _init_optimizer_hooks(self) -> None:
        # What Optimizer.__init__ sets up for step/state_dict hooks, without building a second set of
        # param_groups: those belong to the inner optimizer.
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()

    @property
    def optimizer(self) -> Optimizer:
        """The wrapped optimizer."""
        return self._optimizer

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self._optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self._optimizer.param_groups = value

    @property  # type: ignore[override]
    def state(self) -> Any:
        return self._optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self._optimizer.state = value

    @property  # type: ignore[override]
    def defaults(self) -> dict[str, Any]:
        return self._optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self._optimizer.defaults = value

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def local_world_size(self) -> int:
        return self._local_world_size

    @property
    def topology(self) -> Topology:
        return self._topology  # type: ignore[return-value]  # set whenever construction succeeded

    @property
    def schedule(self) -> Schedule:
        return self._schedule

    @property
    def round(self) -> int:
        """Number of averaging rounds launched so far (``step()`` calls since construction or resume)."""
        return self._gossip.round

    @property
    def buckets(self) -> list[Bucket]:
        return self._buckets

    @property
    def gossip(self) -> Gossip:
        """The object that runs the rounds (its state, counters and buffers)."""
        return self._gossip

    @property
    def comm_stats(self) -> CommStats:
        """Rounds that moved data and bytes this rank sent so far (read-only)."""
        return self._gossip.stats

    @torch.no_grad()
    def _broadcast_from_rank0(self, buckets: list[Bucket]) -> None:
        """Give every rank the first rank's values (rank 0 of the process group)."""
        for b in buckets:
            dist.broadcast(b.flat, src=global_rank(self._pg, 0), group=self._pg)

    def _lowrank(self, p: torch.Tensor) -> bool:
        """Whether parameter ``p`` travels as low-rank factors (see :meth:`Plan.lowrank`)."""
        return Plan(self._config).lowrank(p)

    @property
    def _pg(self) -> dist.ProcessGroup | None:
        """The gossip world's process group (``None``: the default group), held weakly (see ``comm.WeakGroup``)."""
        return cast("dist.ProcessGroup | None", self._pg_ref.get())

    def _bucketed(self) -> set[int]:
        """Identities of the parameters already in buckets."""
        return {id(p) for b in self._buckets for p in b.params}

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self._optimizer.param_groups for p in g["params"]]

    def __repr__(self) -> str:
        return (f"DecentOptimWrapper(rank={self._rank}, world_size={self._world_size}, "
                f"topology={self.topology.name!r}, optimizer={self._optimizer!r})")

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(_NO_COPY)

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        raise TypeError(_NO_COPY)

    # ------------------------------------------------------------------ training
    # GradScaler hands this wrapper its scale and inf flag instead of skipping step(): every rank must take
    # part in every round, also a rank whose gradients overflowed (it skips only its local update).
    _step_supports_amp_scaling = True

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Apply the previous round's averaging, take the inner optimizer's step, launch this round's."""
        gossip = self._gossip
        if gossip.drop_held():
            logger.debug("rank {}: step() after global_avg() without revert; training goes on from the average",
                         self._rank)
        self._announce(Shadow.STEP)
        self._thaw_buckets()
        self._check_views()
        applied = gossip.begin_step()
        if self._check_finite and applied:
            self._check_parameters_finite(f"mixing in the averaging of round {applied[-1]}")
        found_inf = getattr(self, "found_inf", None)  # set by torch.amp.GradScaler.step(wrapper)
        if found_inf is None:
            loss = self._optimizer.step() if closure is None else self._optimizer.step(closure)
        else:
            loss = self._amp_inner_step(getattr(self, "grad_scale", None), found_inf)
        if self._check_finite:
            self._check_parameters_finite(f"the local update of step {gossip.step}")
        self._end_step()
        return loss

    def _end_step(self) -> None:
        """End the step: launch this step's round if it has one (after the inner optimizer's
        ``pre_average_hook``, if it has one)."""
        hook = getattr(self._optimizer, "pre_average_hook", None)
        if callable(hook) and self._gossip.launches_now:
            group = self._schedule.group(self._rank, self._gossip.round)
            hook(group, group.self_weight)
        self._gossip.end_step()

    def finish(self) -> None:
        """Apply the averaging in flight now (blocking), so that nothing is left to send or receive.

        Every ``step()`` launches a round that the next one applies, so the last step of training leaves one
        in flight. Call this on every rank at the end of training, before the process group is destroyed: a
        rank that exits while its peer still sends to it makes that peer fail. (``global_avg()`` drains the
        round in flight too.) Training may go on afterwards; the next gradient is then taken at the mixed
        parameters rather than the un-mixed ones, so the trajectory differs from one without this call.

        Collective: it returns once every rank has called it, so that no rank tears down while a peer still
        needs it (an asynchronous collective a peer had not finished could abort that peer).
        """
        self._finish()
        self._gossip.barrier("finish()")

    def _finish(self) -> None:
        self._check_views()
        self._gossip.finish()
        self._settle_join()

    def _settle_join(self) -> None:
        """Wait for this rank's last announcement to the ranks of a Join, and Join's count: a process group
        destroyed under them would abort the process."""
        self._gossip.settle_announcements()
        if self._join_work is not None:
            wait_all([self._join_work], self._timeout, f"rank {self._rank}: counting the ranks still in a Join")
            self._join_work = None

    def _check_views(self) -> None:
        broken = check_views(self._buckets)
        if broken is None:
            return
        self._gossip.fail(Failure.LEFT_BUCKET)
        bi, pi = broken
        p = self._buckets[bi].params[pi]
        where = next(f"param_groups[{g}]['params'][{i}]" for g, group in enumerate(self._optimizer.param_groups)
                     for i, q in enumerate(group["params"]) if q is p)
        raise ValueError(
            f"rank {self._rank}: the parameter {where} (shape {tuple(p.shape)}, {p.dtype}) is no longer a view into "
            "its bucket: its storage was replaced after the optimizer was wrapped (model.to(), .double(), .half(), "
            "to_empty(), load_state_dict(assign=True) or `p.data = ...`). It would silently stop being averaged. "
            "Do such conversions before wrapping the optimizer, then build a new DecentOptimWrapper."
        )

    @torch.no_grad()
    def _check_parameters_finite(self, after: str) -> None:
        flats = [b.flat for b in self._buckets if not b.frozen]
        if not flats or all(bool(torch.isfinite(f).all()) for f in flats):
            return
        self._gossip.fail(Failure.NON_FINITE)
        raise FloatingPointError(f"rank {self._rank}: non-finite (inf/NaN) parameters after {after}; stopped before "
                                 "they reach the peers.")

    @torch.no_grad()
    def _amp_inner_step(self, grad_scale: torch.Tensor | None, found_inf: torch.Tensor | int) -> None:
        inner = self._optimizer
        if getattr(inner, "_step_supports_amp_scaling", False):  # fused optimizers unscale and skip themselves
            inner.grad_scale, inner.found_inf = grad_scale, found_inf  # type: ignore[attr-defined]
            try:
                inner.step()
            finally:
                del inner.grad_scale, inner.found_inf  # type: ignore[attr-defined]
            return
        # Skipping the update needs the flag on the host: the one synchronisation GradScaler itself makes for
        # such optimizers (fused ones skip on the device, above). A plain 0 when no parameter has a gradient.
        if float(found_inf) != 0.0:
            logger.debug("rank {}: inf/NaN gradients, local update skipped; round {} still runs",
                         self._rank, self._gossip.round)
            return
        if grad_scale is not None:  # None when scaler.unscale_(wrapper) already ran (e.g. for clipping)
            inv_scale = grad_scale.double().reciprocal().float()  # as GradScaler.unscale_ computes it
            for p in self._params():
                if p.grad is not None:
                    p.grad.mul_(inv_scale.to(p.grad.device))
        inner.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._optimizer.zero_grad(set_to_none=set_to_none)

    def _thaw_buckets(self) -> None:
        for b in self._buckets:
            if b.frozen and any(p.requires_grad for p in b.params):
                # The next round checks with the peers before any data of the new size moves.
                logger.debug("rank {}: a frozen bucket was thawed; it is averaged from round {} on",
                             self._rank, self._gossip.round)
                b.frozen = False

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group (as fine-tuning schedules do when they thaw layers), on every rank at once.

        The new parameters are bucketed, set to rank 0's values, and averaged from the next round on. All
        ranks must call this with the same parameters (checked).
        """
        error = None
        n_groups = len(self._optimizer.param_groups)
        try:
            self._optimizer.add_param_group(param_group)
        except (ValueError, TypeError) as exc:
            error = f"add_param_group failed: {exc}"
        known = self._bucketed()
        new = [p for p in self._optimizer.param_groups[-1]["params"] if id(p) not in known] if error is None else []
        if error is None:
            try:
                check_params(new)
            except ValueError as exc:
                error = str(exc)
        groups = self._gossip.groups
        if groups is not None:
            try:
                agree(groups, self._rank, "adding a parameter group", error, {
                    "layout": (digest32(describe_params(new)), "hold different parameter layouts",
                               "every rank must add the same parameters"),
                }, self._timeout)  # mid-training, in step: the step timeout applies
            except ValueError:
                del self._optimizer.param_groups[n_groups:]  # leave the optimizer as it was
                raise
        elif error is not None:
            raise ValueError(error)
        buckets = build_buckets(new, self._bucket_cap_mb, self._lowrank)
        if self._world_size > 1:
            self._broadcast_from_rank0(buckets)
        self._gossip.add_buckets(buckets)  # the gossip's list is self._buckets: one list, extended once

    def reinit_optimizer(self, optimizer: Optimizer | dict[str, Any], lr_scheduler: dict[str, Any] | None = None,
                         init_pg_lrs: list[float] | None = None) -> Any:
        """Replace the inner optimizer, keeping the buckets, the round counter and the averaging in flight.

        Args:
            optimizer: a new optimizer over (some of) the wrapped parameters, or a config
                ``{"class_path": "torch.optim.SGD", "init_args": {...}}`` built over the current parameter
                groups.
            lr_scheduler: optional config ``{"class_path": ..., "init_args": {...}}`` of an LR scheduler to
                build on this wrapper; it is returned.
            init_pg_lrs: with a config, each parameter group's initial learning rate.

        Configs are checked before anything changes: an unknown class, a class that is not an optimizer or
        scheduler, or bad arguments raise ``ValueError`` and the running optimizer stays as it was.
        """
        if isinstance(optimizer, Optimizer):
            if isinstance(optimizer, DecentOptimWrapper):
                raise ValueError("Invalid optimizer: pass the inner optimizer, not a DecentOptimWrapper.")
            known = self._bucketed()
            foreign = sum(1 for g in optimizer.param_groups for p in g["params"] if id(p) not in known)
            if foreign:
                raise ValueError(f"Invalid optimizer: {foreign} of its parameters are not wrapped here; "
                                 "add them with add_param_group() first.")
            if init_pg_lrs is not None:
                raise ValueError("Invalid init_pg_lrs: it applies to an optimizer config, not an instance.")
            new_optimizer = optimizer
        else:
            new_optimizer = build_optimizer(optimizer, self._optimizer.param_groups, init_pg_lrs)
        if lr_scheduler is not None:
            validate_lr_scheduler_config(lr_scheduler)
        old = type(self._optimizer).__name__
        self._optimizer = new_optimizer
        logger.debug("rank {}: optimizer re-initialised: {} -> {}", self._rank, old, type(new_optimizer).__name__)
        return build_lr_scheduler(lr_scheduler, self) if lr_scheduler is not None else None

    # ------------------------------------------------------------------ global averaging and metrics
    @torch.no_grad()
    def global_avg(self, may_revert: bool = True, module: torch.nn.Module | None = None, *,
                   will_revert: bool | None = None) -> None:
        """Replace every worker's parameters by the mean over all workers (for evaluation or export).

        The averaging in flight is set aside, not applied. With ``may_revert=True`` the parameters and that
        averaging are kept until :meth:`revert_global_avg`, after which training continues exactly as if
        this call never happened; the next :meth:`step` without a revert drops them. With ``module``, its
        floating-point buffers (BatchNorm statistics, say) are averaged (and restored) too.
        ``will_revert`` is a deprecated alias of ``may_revert``.
        """
        may_revert = _revert_flag(may_revert, will_revert)
        self._announce(Shadow.GLOBAL_AVG, int(may_revert) | (2 if module is not None else 0))
        self._check_views()
        buffers = [t for t in module.buffers() if t.is_floating_point()] if module is not None else []
        self._gossip.average_globally(buffers, may_revert)

    def revert_global_avg(self) -> None:
        """Undo :meth:`global_avg`: restore the parameters (and buffers) and the averaging in flight."""
        self._announce(Shadow.REVERT)
        self._gossip.revert()

    @torch.no_grad()
    def consensus_distance(self) -> float:
        """``sqrt(mean_i ||x_i - mean_j x_j||^2)`` over all wrapped parameters; the same value on every rank.

        Measures how far the workers are from agreement (0 after ``global_avg``). Uses the parameters as they
        are now (the averaging in flight is not applied) and a temporary copy of them.
        """
        self._announce(Shadow.CONSENSUS)
        return self._consensus_distance()

    def _consensus_distance(self) -> float:
        if self._world_size == 1 or not self._buckets:
            return 0.0
        means = [b.flat.clone() for b in self._buckets]
        self._gossip.global_mean(means, "consensus_distance")
        sq = squared_distance([b.flat for b in self._buckets], means)
        return math.sqrt(self._gossip.control_sum([sq])[0] / self._world_size)

    @torch.no_grad()
    def reduce_metrics(self, metrics: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Combine per-rank optimizer metrics (scalars) across all ranks; every rank gets the same result.

        If the inner optimizer has ``pre_reduce_metrics`` / ``post_reduce_metrics`` (``DecoupledLionW``
        does), the metrics are mapped to sums, summed over ranks and mapped back, so that norms and cosines
        describe the vectors of all ranks taken together; otherwise each metric is averaged over ranks.
        All ranks must pass the same keys (checked: a difference raises ``GossipError`` on every rank).
        """
        inner = self._optimizer
        work = dict(metrics)
        pre = getattr(inner, "pre_reduce_metrics", None)
        post = getattr(inner, "post_reduce_metrics", None)
        if callable(pre) and callable(post):
            work = pre(work)
        keys = sorted(work)
        values = [float(torch.as_tensor(work[k], dtype=torch.float64)) for k in keys]
        self._announce(Shadow.METRICS)
        if self._world_size > 1:
            self._gossip.agree_global("reduce_metrics", keys)
            values = self._gossip.control_sum(values)
        out = {k: torch.tensor(v, dtype=torch.float64) for k, v in zip(keys, values)}
        if callable(pre) and callable(post):
            return post(out)
        return {k: v / self._world_size for k, v in out.items()}

    # ------------------------------------------------------------------ uneven inputs (torch's Join)
    def join_hook(self, **kwargs: Any) -> JoinHook:
        """What this rank does inside ``Join([optimizer])`` once it has run out of inputs: until every rank has,
        it stands in for what the ranks still training do (a round with its parameters as they are, with no
        local update; ``global_avg``, ``revert_global_avg``, ``consensus_distance``). ``Join(..., module=model)``
        names the module whose buffers a shadowed ``global_avg(module=...)`` averages."""
        return _ShadowHook(self, kwargs.get("module"))

    @property
    def join_device(self) -> torch.device:
        return torch.device("cpu")  # Join counts the ranks still training on the gloo control plane

    @property
    def join_process_group(self) -> Any:
        groups = self._gossip.groups
        return groups.control() if groups is not None else self._pg

    def _announce(self, op: Shadow, arg: int = 0) -> None:
        """Inside a Join: count this rank as still training and tell the ranks that ran out what it does next."""
        if self._join_config.enable:
            self._join_work = Join.notify_join_context(self) or self._join_work  # kept until it has completed
            self._gossip.announce(op, arg)

    def _shadow(self, module: torch.nn.Module | None) -> None:
        """One operation of the ranks still training, stood in for by a rank that ran out of inputs."""
        op, arg = self._hear()
        self._shadow_op(op, arg, module)

    def _hear(self) -> tuple[Shadow, int]:
        """What the ranks still training announced, checked to be meant for this optimizer at its round."""
        gossip = self._gossip
        op, round_, arg, instance = gossip.hear()
        if instance != gossip.instance:
            raise GossipError(f"rank {self._rank}: inside a Join, the ranks still training used another optimizer "
                              "than the one this rank stands in for next: list every optimizer the loop steps in "
                              "Join([...]), in the order the loop steps them.")
        if round_ != gossip.round:
            raise GossipError(f"rank {self._rank}: inside a Join, the ranks still training are at round {round_}, "
                              f"this rank at round {gossip.round}.")
        return Shadow(op), arg

    def _shadow_op(self, op: Shadow, arg: int, module: torch.nn.Module | None) -> None:
        gossip = self._gossip
        if op == Shadow.STEP:  # the step's rounds, with the parameters as they are: no gradient, no local update
            self._check_views()
            gossip.begin_step()
            self._end_step()
        elif op == Shadow.GLOBAL_AVG:
            if arg & 2 and module is None:
                self._cannot_shadow("global_avg", "; for global_avg(module=...), give the module to the Join: "
                                                  "Join([optimizer], module=model).")
            buffers = [t for t in module.buffers() if t.is_floating_point()] if arg & 2 and module else []
            gossip.average_globally(buffers, bool(arg & 1))
        elif op == Shadow.REVERT:
            gossip.revert()
        elif op == Shadow.CONSENSUS:
            self._consensus_distance()
        else:
            self._cannot_shadow("reduce_metrics", ".")

    def _cannot_shadow(self, what: str, advice: str) -> None:
        try:  # a failed stamp, so that the ranks still training raise at once rather than time out
            self._gossip.agree_global(what, None, failed=Failure.CANNOT_SHADOW)
        except GossipError:
            pass
        raise GossipError(f"rank {self._rank}: {Failure.CANNOT_SHADOW.reason}{advice}")

    # ------------------------------------------------------------------ checkpointing
    def _run_identity(self) -> dict[str, Any]:
        """What a checkpoint of this run must match (see ``checkpoint.CheckpointManager``)."""
        return {"topology": self.topology.name, "schedule": self._schedule.digest(),
                "layout": digest32(describe_params(self._params()), self._bucket_cap_mb)}

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict plus what the wrapper needs to resume bit for bit.

        That is the round counter, whether a round was in flight, the schedule's fingerprint and this
        rank's parameters (so that resuming works whether the model is loaded before or after the wrapper is
        built, which broadcasts rank 0's parameters). Between :meth:`global_avg` and
        :meth:`revert_global_avg` it describes the run that the revert restores. Everything is a tensor or a
        plain value, so ``torch.load(..., weights_only=True)`` reads it.
        """
        sd = self._optimizer.state_dict()
        sd[_STATE_KEY] = {
            "world_size": self._world_size,
            "topology": self.topology.name,
            "schedule": self._schedule.digest(),
            **self._gossip.state_dict(),
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` (or a plain one of the inner optimizer)."""
        if not isinstance(state_dict, dict):
            raise ValueError(f"Invalid state_dict of type {type(state_dict).__name__}. Must be a dict from "
                             "state_dict().")
        state_dict = dict(state_dict)
        own = state_dict.pop(_STATE_KEY, None)
        if own is None:
            warnings.warn(
                "state_dict has no DecentOptimWrapper entry (a plain optimizer state dict?); the topology "
                "schedule restarts at round 0.", stacklevel=2,
            )
            own = {"round": 0, "world_size": self._world_size, "schedule": self._schedule.digest(), "pending": False}
        self._validate_own_state(own)
        self._optimizer.load_state_dict(state_dict)
        self._gossip.load_state_dict(own)

    def _validate_own_state(self, own: Any) -> None:
        where = f"state_dict[{_STATE_KEY!r}]"
        if not isinstance(own, dict):
            raise ValueError(f"Invalid {where} of type {type(own).__name__}. Must be the dict state_dict() wrote.")
        missing = [k for k in ("round", "world_size", "schedule", "pending") if k not in own]
        if missing:
            raise ValueError(f"Invalid {where}: missing {missing}. Must be the dict state_dict() wrote.")
        r = own["round"]
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ValueError(f"Invalid {where}['round']={r!r}. Must be an integer >= 0.")
        if not isinstance(own["pending"], bool):
            raise ValueError(f"Invalid {where}['pending']={own['pending']!r}. Must be a bool.")
        if own["world_size"] != self._world_size:
            raise ValueError(
                f"Cannot load a state dict saved with world_size={own['world_size']} into a wrapper with "
                f"world_size={self._world_size}."
            )
        if own["schedule"] != self._schedule.digest():
            raise ValueError(
                f"Cannot load a state dict saved with topology {own.get('topology')!r} (schedule "
                f"{own['schedule']}) into a wrapper with topology {self.topology.name!r} "
                f"(schedule {self._schedule.digest()})."
            )
        saved = own.get("buckets")
        if saved is not None:
            layout = [(b.flat.shape, b.flat.dtype) for b in self._buckets]
            if not isinstance(saved, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in saved) \
                    or [(t.shape, t.dtype) for t in saved] != layout:
                raise ValueError(f"Invalid {where}['buckets']: they differ from this wrapper's parameter buckets "
                                 "(another model, parameter order or bucket_cap_mb).")
        step = own.get("step", r)
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"Invalid {where}['step']={step!r}. Must be an integer >= 0.")
        inflight = own.get("inflight", [])
        if not isinstance(inflight, list) or len(inflight) > self._config.max_delay or not all(
                isinstance(f, dict) and isinstance(f.get("round"), int) and isinstance(f.get("due"), int)
                for f in inflight):
            raise ValueError(f"Invalid {where}['inflight']: must list at most max_delay={self._config.max_delay} "
                             "rounds in flight as state_dict() wrote them (saved with another max_delay?).")
        for what, sent in [("sent", own.get("sent"))] + [(f"inflight][{k}]['sent", f.get("sent"))
                                                           for k, f in enumerate(inflight)]:
            if sent is not None and not self._valid_sent(sent):
                raise ValueError(f"Invalid {where}['{what}']: must map bucket indices to what a round in flight sent "
                                 "of them, as state_dict() wrote it (same buckets, same wire_dtype).")

    def _valid_sent(self, sent: Any) -> bool:
        wire = self._gossip.wire_dtype
        return isinstance(sent, dict) and all(
            isinstance(i, int) and 0 <= i < len(self._buckets) and isinstance(t, torch.Tensor)
            and (t.shape == self._buckets[i].flat.shape or self._buckets[i].lowrank and t.dim() == 1)
            and t.dtype in (self._buckets[i].flat.dtype, wire)
            for i, t in sent.items())


class _ShadowHook(JoinHook):
    """The Join hook of a :class:`DecentOptimWrapper` (see :meth:`DecentOptimWrapper.join_hook`)."""

    def __init__(self, wrapper: DecentOptimWrapper, module: torch.nn.Module | None) -> None:
        self.wrapper, self.module = wrapper, module

    def main_hook(self) -> None:
        self.wrapper._shadow(self.module)


@torch.no_grad()
def squared_distance(flats: list[torch.Tensor], means: list[torch.Tensor]) -> float:
    """``sum ||mean - x||^2`` over the buckets ``flats``, formed in ``means`` (overwritten): each bucket on its own
    device, no float64 copies (the squares are summed in float64)."""
    sq = 0.0
    for x, m in zip(flats, means):
        d = m.sub_(x) if m.element_size() >= 4 else m.float().sub_(x)
        sq += float(d.square_().sum(dtype=torch.float64))
    return sq


def _revert_flag(may_revert: bool, will_revert: bool | None) -> bool:
    """``may_revert``, or the value of its deprecated alias ``will_revert`` (Decent-DP's name)."""
    if will_revert is None:
        return may_revert
    warnings.warn("global_avg(will_revert=...) is deprecated: the argument is called may_revert.", DeprecationWarning,
                  stacklevel=3)
    return will_revert


_NO_COPY = ("DecentOptimWrapper cannot be copied or pickled: it holds process groups and communication in flight. "
            "Copy or save its state_dict() instead (and load it into a new wrapper).")


def _check_optimizer(optimizer: Any) -> bool:
    if not isinstance(optimizer, Optimizer):
        raise ValueError(f"Invalid optimizer of type {type(optimizer).__name__}. Must be a torch.optim.Optimizer.")
    if isinstance(optimizer, DecentOptimWrapper):
        raise ValueError("Invalid optimizer: it is already a DecentOptimWrapper; wrap the inner optimizer once.")
    return True


def _resolve_rank_and_world_size(rank: Any, world_size: Any,
                                 process_group: dist.ProcessGroup | None = None) -> tuple[int, int, str | None]:
    """The actual (rank, world_size), and an error to share with the other ranks if the arguments are wrong.

    Raises at once only where there is nobody to share it with (no process group, or not a member of it).
    """
    if process_group is not None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("Invalid process_group: torch.distributed is not initialised.")
        # new_group() hands non-members a marker instead of a group
        if process_group is dist.GroupMember.NON_GROUP_MEMBER or (
                isinstance(process_group, dist.ProcessGroup) and dist.get_rank(process_group) < 0):
            raise ValueError("Invalid process_group: this process is not one of its members.")
        if not isinstance(process_group, dist.ProcessGroup):
            raise ValueError(f"Invalid process_group of type {type(process_group).__name__}. Must be a "
                             "torch.distributed ProcessGroup.")
    error = None
    for name, value in (("rank", rank), ("world_size", world_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)) and error is None:
            error = f"Invalid {name}={value!r}. Must be an int or None."
    if dist.is_available() and dist.is_initialized():
        actual_rank, actual_ws = dist.get_rank(process_group), dist.get_world_size(process_group)
        if error is None and world_size is not None and world_size != actual_ws:
            error = f"Invalid world_size={world_size}: the process group has {actual_ws} ranks."
        elif error is None and rank is not None and rank != actual_rank:
            error = f"Invalid rank={rank}: this process is rank {actual_rank} of the process group."
        if error is not None and actual_ws == 1:
            raise ValueError(error)
        return actual_rank, actual_ws, error
    if error is not None:
        raise ValueError(error)
    ws = 1 if world_size is None else world_size
    r = 0 if rank is None else rank
    if ws != 1 or r != 0:
        raise ValueError(
            f"Invalid rank={rank}, world_size={world_size}: torch.distributed is not initialised. Call "
            "torch.distributed.init_process_group() first (torchrun sets up the environment), or leave both "
            "unset to train in a single process."
        )
    return 0, 1, None


def _resolve_local_world_size(local_world_size: int | None) -> int:
    # 0 is what the 0.1 README's `local_world_size=torch.cuda.device_count()` gives on a CPU-only machine:
    # treat it as "not given" rather than rejecting the documented call.
    if local_world_size is None or (local_world_size == 0 and not isinstance(local_world_size, bool)):
        env = os.environ.get("LOCAL_WORLD_SIZE")
        if env is None:
            return 1
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"Invalid LOCAL_WORLD_SIZE={env!r} in the environment. Must be an integer >= 1.")
        return int(env)
    if isinstance(local_world_size, bool) or not isinstance(local_world_size, int) or local_world_size < 1:
        raise ValueError(f"Invalid local_world_size={local_world_size!r}. Must be an integer >= 1.")
    return local_world_size


def _make_topology(topology: Any, rank: int, world_size: int, local_world_size: int) -> Topology:
    if isinstance(topology, str):
        return TopologyFactory.create(topology, rank, world_size, local_world_size)
    if isinstance(topology, type) and issubclass(topology, Topology):
        return topology(rank, world_size, local_world_size, topology.__name__)
    if isinstance(topology, Topology):
        if topology.world_size != world_size or topology.rank != rank:
            raise ValueError(
                f"Invalid topology: it was built for rank {topology.rank} of {topology.world_size}, but this is "
                f"rank {rank} of {world_size}."
            )
        return topology
    raise ValueError(
        f"Invalid topology={topology!r}. Must be a registered name ({TopologyFactory.available()}), "
        "a Topology subclass or a Topology instance."
    )


def _config(config: Any, given: dict[str, Any]) -> GossipConfig:
    """``config``, or the arguments given one by one (not both: an argument would silently lose to the other)."""
    if config is None:
        return GossipConfig(**given)
    if not isinstance(config, GossipConfig):
        raise ValueError(f"Invalid config of type {type(config).__name__}. Must be a GossipConfig or None.")
    defaults = GossipConfig()
    changed = [k for k, v in given.items() if k != "timeout" and v != getattr(defaults, k) or k == "timeout" and v]
    if changed:
        raise ValueError(f"Invalid config: give either config=GossipConfig(...) or the gossip arguments, not both "
                         f"(also given: {changed}).")
    return config


def _check_lowrank(config: GossipConfig, schedule: Schedule, rank: int, params: list[torch.Tensor],
                   process_group: dist.ProcessGroup | None) -> None:
    """``ValueError`` where low-rank gossip cannot run: CUDA tensors on gloo (no point to point)."""
    device = params[0].device if params else torch.device("cpu")
    backend = str(dist.get_backend(process_group)) if dist.is_available() and dist.is_initialized() else "gloo"
    plan = Plan(config, backend, device)
    for t in range(schedule.period):
        problem = plan.problem(schedule.group(rank, t))
        if problem is not None:
            raise ValueError(problem)
