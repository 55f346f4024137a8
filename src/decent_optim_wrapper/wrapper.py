"""DecentOptimWrapper: decentralized (gossip) averaging around any ``torch.optim.Optimizer``."""

from __future__ import annotations

import os
import warnings
import zlib
from collections import OrderedDict
from collections.abc import Callable
from datetime import timedelta
from typing import Any, overload

import torch
import torch.distributed as dist
from loguru import logger
from torch.optim import Optimizer

from .buckets import Bucket, build_buckets, layout_digest
from .comm import GossipEngine, global_rank
from .reinit import build_lr_scheduler, build_optimizer, validate_lr_scheduler_config
from .topo import Schedule, Topology, TopologyFactory

__all__ = ["DecentOptimWrapper"]

_STATE_KEY = "decent_optim_wrapper"


class DecentOptimWrapper(Optimizer):
    """Wrap ``optimizer`` so that every :meth:`step` also averages parameters with topology neighbours.

    ``step()`` waits for the averaging launched by the previous step and writes it into the parameters,
    runs the inner optimizer's step, then launches non-blocking averaging over this round's group, so the
    communication overlaps the next forward and backward (D-PSGD: ``y <- W_t y - lr * update``).

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
            :class:`~decent_optim_wrapper.comm.GossipError` (a dead, hung or out-of-step peer); default the
            process group's timeout.
        check_rounds: send each round's number with its data so that ranks calling ``step()`` a different
            number of times raise ``GossipError`` instead of averaging with the wrong round (on CUDA the
            check reports one round later, to keep the host from waiting on the GPU).
        process_group: gossip among the members of this group only (ranks and world size are then those
            within the group, as ``torch.distributed`` numbers them); default the world. Several groups
            can train side by side, e.g. one per model-parallel shard.
    """

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
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise ValueError(f"Invalid optimizer of type {type(optimizer).__name__}. Must be a torch.optim.Optimizer.")
        if isinstance(optimizer, DecentOptimWrapper):
            raise ValueError("Invalid optimizer: it is already a DecentOptimWrapper; wrap the inner optimizer once.")
        timeout_td = _as_timedelta(timeout)
        self._init_optimizer_hooks()
        self._optimizer = optimizer
        self._pg = process_group
        self._rank, self._world_size, error = _resolve_rank_and_world_size(rank, world_size, process_group)
        self._local_world_size = _resolve_local_world_size(local_world_size)
        self._round = 0
        self._backup: tuple[list[torch.Tensor], Any, list[tuple[torch.Tensor, torch.Tensor]]] | None = None
        self._relaunch_round: int | None = None

        # Problems found locally are shared with every rank before anyone raises, so a bad schedule or a
        # mismatched model on one rank can never leave the others waiting in a collective.
        self._topology: Topology | None = None
        schedule: Schedule | None = None
        if error is None:
            try:
                self._topology = _make_topology(topology, self._rank, self._world_size, self._local_world_size)
                schedule = self._topology.schedule()
            except ValueError as exc:
                error = str(exc)
        self._buckets: list[Bucket] = build_buckets(self._params(), bucket_cap_mb)
        self._bucket_cap_mb = bucket_cap_mb
        if self._world_size > 1:
            self._agree(error, schedule.digest() if schedule else "", "constructing DecentOptimWrapper")
        elif error is not None:
            raise ValueError(error)
        if schedule is None:  # unreachable: a missing schedule comes with an error, raised above
            raise RuntimeError("internal error: no schedule and no error")
        self._schedule = schedule

        if self._world_size > 1:
            self._broadcast_from_rank0(self._buckets)
        self._engine = GossipEngine(schedule, self._rank, self._buckets, timeout=timeout_td,
                                    check_rounds=bool(check_rounds), process_group=self._pg)
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
        return self._round

    @property
    def buckets(self) -> list[Bucket]:
        return self._buckets

    @torch.no_grad()
    def _broadcast_from_rank0(self, buckets: list[Bucket]) -> None:
        """Give every rank the first rank's values (rank 0 of the process group)."""
        for b in buckets:
            dist.broadcast(b.flat, src=global_rank(self._pg, 0), group=self._pg)

    def _bucketed(self) -> set[int]:
        """Identities of the parameters already in buckets."""
        return {id(p) for b in self._buckets for p in b.params}

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self._optimizer.param_groups for p in g["params"]]

    def __repr__(self) -> str:
        return (f"DecentOptimWrapper(rank={self._rank}, world_size={self._world_size}, "
                f"topology={self.topology.name!r}, optimizer={self._optimizer!r})")

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
        self._drop_backup()
        self._thaw_buckets()
        self._finish_pending()
        found_inf = getattr(self, "found_inf", None)  # set by torch.amp.GradScaler.step(wrapper)
        if found_inf is None:
            loss = self._optimizer.step() if closure is None else self._optimizer.step(closure)
        else:
            loss = self._amp_inner_step(getattr(self, "grad_scale", None), found_inf)
        hook = getattr(self._optimizer, "pre_average_hook", None)
        if callable(hook):
            group = self._schedule.group(self._rank, self._round)
            hook(group, group.self_weight)
        self._engine.launch(self._round)
        self._round += 1
        return loss

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
        # GradScaler passes a plain 0 when none of these parameters has a gradient (an idle bucket, say)
        if float(found_inf) != 0.0:
            logger.debug("rank {}: inf/NaN gradients, local update skipped; round {} still runs",
                         self._rank, self._round)
            return
        if grad_scale is not None:  # None when scaler.unscale_(wrapper) already ran (e.g. for clipping)
            inv_scale = grad_scale.double().reciprocal().float()  # as GradScaler.unscale_ computes it
            for p in self._params():
                if p.grad is not None:
                    p.grad.mul_(inv_scale.to(p.grad.device))
        inner.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._optimizer.zero_grad(set_to_none=set_to_none)

    def _finish_pending(self) -> None:
        if self._relaunch_round is not None:
            # Resumed from a checkpoint taken while round k was in flight: the parameters loaded are the
            # ones that round was averaging, so running it again reproduces its result exactly.
            rnd, self._relaunch_round = self._relaunch_round, None
            self._engine.launch(rnd)
        self._engine.finish()

    def _thaw_buckets(self) -> None:
        for b in self._buckets:
            if b.frozen and any(p.requires_grad for p in b.params):
                # Ranks thaw at the same step in any sane schedule; the round stamp catches those that don't.
                logger.debug("rank {}: a frozen bucket was thawed; it is averaged from round {} on",
                             self._rank, self._round)
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
        buckets = build_buckets(new, self._bucket_cap_mb)
        if self._world_size > 1:
            try:
                self._agree(error, self._schedule.digest(), "adding a parameter group", buckets)
            except ValueError:
                del self._optimizer.param_groups[n_groups:]  # leave the optimizer as it was
                raise
            self._broadcast_from_rank0(buckets)
        elif error is not None:
            raise ValueError(error)
        self._engine.add_buckets(buckets)  # the engine's list is self._buckets: one list, extended once

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
    def global_avg(self, may_revert: bool = True, module: torch.nn.Module | None = None) -> None:
        """Replace every worker's parameters by the mean over all workers (for evaluation or export).

        The averaging in flight is set aside, not applied. With ``may_revert=True`` the parameters and that
        averaging are kept until :meth:`revert_global_avg`, after which training continues exactly as if
        this call never happened; the next :meth:`step` without a revert drops them. With ``module``, its
        floating-point buffers (BatchNorm statistics, say) are averaged (and restored) too.
        """
        pending = self._engine.detach()
        relaunch, self._relaunch_round = self._relaunch_round, None
        buffers = [t for t in module.buffers() if t.is_floating_point()] if module is not None else []
        if may_revert and self._backup is None:
            self._backup = ([b.flat.clone() for b in self._buckets], (pending, relaunch),
                            [(t, t.clone()) for t in buffers])
        if self._world_size > 1:
            self._engine.all_reduce_mean([b.flat for b in self._buckets] + buffers)

    @torch.no_grad()
    def revert_global_avg(self) -> None:
        """Undo :meth:`global_avg`: restore the parameters (and buffers) and the averaging in flight."""
        if self._backup is None:
            raise RuntimeError(
                "revert_global_avg() has nothing to revert: call global_avg(may_revert=True) first, and revert "
                "before the next step()."
            )
        flats, (pending, relaunch), buffers = self._backup
        self._backup = None
        for b, saved in zip(self._buckets, flats):
            b.flat.copy_(saved)
        for t, saved in buffers:
            t.copy_(saved)
        self._engine.attach(pending)
        self._relaunch_round = relaunch

    def _drop_backup(self) -> None:
        if self._backup is not None:
            logger.debug("rank {}: step() after global_avg() without revert; training goes on from the average",
                         self._rank)
            self._backup = None

    @torch.no_grad()
    def consensus_distance(self) -> float:
        """``sqrt(mean_i ||x_i - mean_j x_j||^2)`` over all wrapped parameters; the same value on every rank.

        Measures how far the workers are from agreement (0 after ``global_avg``). Uses the parameters as they
        are now (the averaging in flight is not applied) and a temporary copy of them.
        """
        if self._world_size == 1:
            return 0.0
        means = [b.flat.clone() for b in self._buckets]
        self._engine.all_reduce_mean(means)
        sq = torch.zeros((), dtype=torch.float64, device=self._buckets[0].flat.device)
        for b, m in zip(self._buckets, means):
            sq += (b.flat.double() - m.double()).square().sum()
        self._engine.all_reduce_mean([sq])
        return float(sq.sqrt())

    @torch.no_grad()
    def reduce_metrics(self, metrics: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Combine per-rank optimizer metrics (scalars) across all ranks; every rank gets the same result.

        If the inner optimizer has ``pre_reduce_metrics`` / ``post_reduce_metrics`` (``DecoupledLionW``
        does), the metrics are mapped to sums, summed over ranks and mapped back, so that norms and cosines
        describe the vectors of all ranks taken together; otherwise each metric is averaged over ranks.
        All ranks must pass the same keys.
        """
        inner = self._optimizer
        device = self._buckets[0].flat.device if self._buckets else torch.device("cpu")
        work = dict(metrics)
        pre = getattr(inner, "pre_reduce_metrics", None)
        post = getattr(inner, "post_reduce_metrics", None)
        if callable(pre) and callable(post):
            work = pre(work)
        keys = sorted(work)
        values = torch.stack([torch.as_tensor(work[k], dtype=torch.float64).reshape(()).to(device) for k in keys]) \
            if keys else torch.zeros(0, dtype=torch.float64, device=device)
        if self._world_size > 1:
            digest = zlib.crc32("\x00".join(keys).encode())
            check = torch.tensor([digest, -digest], dtype=torch.int64, device=device)
            dist.all_reduce(check, op=dist.ReduceOp.MAX, group=self._pg)
            if check[0].item() != digest or -check[1].item() != digest:
                raise ValueError("reduce_metrics: the ranks passed different metric names; pass the same keys "
                                 "on every rank.")
            dist.all_reduce(values, op=dist.ReduceOp.SUM, group=self._pg)
        out = dict(zip(keys, values.unbind()))
        if callable(pre) and callable(post):
            return post(out)
        return {k: v / self._world_size for k, v in out.items()}

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict plus what the wrapper needs to resume bit for bit.

        That is the round counter, whether a round was in flight, the schedule's fingerprint and this
        rank's parameters (so that resuming works whether the model is loaded before or after the wrapper is
        built, which broadcasts rank 0's parameters). Everything is a tensor or a plain value, so
        ``torch.load(..., weights_only=True)`` reads it.
        """
        sd = self._optimizer.state_dict()
        sd[_STATE_KEY] = {
            "round": self._round,
            "world_size": self._world_size,
            "topology": self.topology.name,
            "schedule": self._schedule.digest(),
            "pending": self._engine.pending or self._relaunch_round is not None,
            "buckets": [b.flat for b in self._buckets],
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` (or a plain one of the inner optimizer)."""
        state_dict = dict(state_dict)
        own = state_dict.pop(_STATE_KEY, None)
        if own is None:
            warnings.warn(
                "state_dict has no DecentOptimWrapper entry (a plain optimizer state dict?); the topology "
                "schedule restarts at round 0.", stacklevel=2,
            )
            own = {"round": 0, "world_size": self._world_size, "schedule": self._schedule.digest(), "pending": False}
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
            if [(t.shape, t.dtype) for t in saved] != layout:
                raise ValueError("Cannot load a state dict whose parameter buckets differ from this wrapper's "
                                 "(another model, parameter order or bucket_cap_mb).")
        self._optimizer.load_state_dict(state_dict)
        self._engine.detach()  # whatever was in flight belongs to the run being replaced
        self._backup = None
        if saved is not None:
            with torch.no_grad():
                for b, t in zip(self._buckets, saved):
                    b.flat.copy_(t)
        self._round = int(own["round"])
        self._relaunch_round = self._round - 1 if own["pending"] and self._round > 0 else None

    # ------------------------------------------------------------------ helpers
    def _agree(self, error: str | None, schedule_digest: str, what: str, buckets: list[Bucket] | None = None) -> None:
        """Check that all ranks are consistent; every rank raises the same ValueError if they are not."""
        mine = (error, schedule_digest, layout_digest(self._buckets if buckets is None else buckets))
        everyone: list[Any] = [None] * self._world_size
        dist.all_gather_object(everyone, mine, group=self._pg)
        if error is not None:
            raise ValueError(error)
        failed = [(r, e[0]) for r, e in enumerate(everyone) if e[0] is not None]
        if failed:
            raise ValueError(f"rank {failed[0][0]} failed while {what}: {failed[0][1]}")
        if len({e[1] for e in everyone}) != 1:
            raise ValueError(
                f"Ranks built different topology schedules while {what} (fingerprints by rank: "
                f"{[e[1] for e in everyone]}); a custom topology must not depend on anything but rank, "
                "world_size and local_world_size."
            )
        if len({e[2] for e in everyone}) != 1:
            raise ValueError(
                f"Ranks hold different parameter layouts while {what} (fingerprints by rank: "
                f"{[e[2] for e in everyone]}); every rank must build the same model and optimizer, with "
                "parameters in the same order, shapes and dtypes."
            )


def _resolve_rank_and_world_size(rank: int | None, world_size: int | None,
                                 process_group: dist.ProcessGroup | None = None) -> tuple[int, int, str | None]:
    """The actual (rank, world_size), and an error to share with the other ranks if the arguments disagree."""
    for name, value in (("rank", rank), ("world_size", world_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"Invalid {name}={value!r}. Must be an int or None.")
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
    if dist.is_available() and dist.is_initialized():
        actual_rank, actual_ws = dist.get_rank(process_group), dist.get_world_size(process_group)
        error = None
        if world_size is not None and world_size != actual_ws:
            error = f"Invalid world_size={world_size}: the process group has {actual_ws} ranks."
        elif rank is not None and rank != actual_rank:
            error = f"Invalid rank={rank}: this process is rank {actual_rank} of the process group."
        return actual_rank, actual_ws, error
    ws = 1 if world_size is None else world_size
    r = 0 if rank is None else rank
    if ws != 1 or r != 0:
        raise ValueError(
            f"Invalid rank={rank}, world_size={world_size}: torch.distributed is not initialised. Call "
            "torch.distributed.init_process_group() first (torchrun sets up the environment), or leave both "
            "unset to train in a single process."
        )
    return 0, 1, None


def _as_timedelta(timeout: float | timedelta | None) -> timedelta | None:
    if timeout is None or isinstance(timeout, timedelta):
        if isinstance(timeout, timedelta) and timeout.total_seconds() <= 0:
            raise ValueError(f"Invalid timeout={timeout!r}. Must be positive.")
        return timeout
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"Invalid timeout={timeout!r}. Must be a positive number of seconds, a timedelta or None.")
    return timedelta(seconds=timeout)


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
