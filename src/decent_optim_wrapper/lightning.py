"""PyTorch Lightning strategy for decentralized (gossip) training: ``Trainer(strategy=DecentralizedStrategy())``.

Needs Lightning: the ``lightning`` extra (README.md, Install), or ``lightning>=2.6`` installed beside the
package; the core package never imports Lightning. Importing this module registers the strategy as
``"decentralized"``.

How it differs from Lightning's ``DDPStrategy``, which it extends (launchers, cluster environments, process
group setup and the collectives ``reduce`` / ``barrier`` / ``broadcast`` / ``reduce_boolean_decision`` are
DDP's):

- the model is not wrapped in ``DistributedDataParallel``: gradients stay local; every optimizer Lightning
  hands out is a :class:`~decent_optim_wrapper.DecentOptimWrapper` (also one a callback assigns later);
- each optimizer step runs the forward/backward closure first, then ``step()``: the gradient is taken at this
  rank's own parameters while the previous round's averaging is still on the wire, exactly as in a
  hand-written ``zero_grad(); backward(); step()`` loop;
- validation runs on the global average, and training then continues bit for bit (test and predict, after
  fit or from a checkpoint, see the average too);
- a checkpoint holds the global average (loadable anywhere); next to it, each rank writes what differs
  between ranks (its parameters and buffers, its wrapper state, its GradScaler state) to
  ``<checkpoint>.rank<r>.pt``, from which ``fit(ckpt_path=...)`` resumes the same trajectory;
- at the end of ``fit`` every rank holds the global average and no averaging round is left in flight.
"""

from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Callable, Generator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

try:
    from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
    from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
    from lightning.fabric.utilities.cloud_io import get_filesystem
    from lightning.fabric.utilities.types import _PATH
    from lightning.pytorch import LightningModule
    from lightning.pytorch.accelerators import Accelerator
    from lightning.pytorch.core.optimizer import LightningOptimizer
    from lightning.pytorch.plugins.precision import MixedPrecision, Precision
    from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
    from lightning.pytorch.trainer.states import TrainerFn
    from lightning.pytorch.utilities import GradClipAlgorithmType
except ModuleNotFoundError as exc:
    if (exc.name or "").split(".")[0] != "lightning":  # Lightning is there but broken: its own error says more
        raise
    raise ImportError('decent_optim_wrapper.lightning needs Lightning, an optional dependency: install the '
                      '"lightning" extra (pip install "decent-optim-wrapper[lightning]"; in a checkout: uv sync '
                      '--extra lightning) or lightning>=2.6 itself') from exc
from loguru import logger
from torch.optim import Optimizer

from .config import GossipConfig, LowRank
from .topo import Topology
from .wrapper import DecentOptimWrapper

__all__ = ["DecentralizedStrategy", "rank_file"]

STRATEGY_NAME = "decentralized"
# Key of the main checkpoint that says how it was written (world size, whether per-rank files exist).
_CKPT_KEY = "decentralized_strategy"
# Entries of a Lightning checkpoint that differ between ranks; the per-rank file holds this rank's.
_PER_RANK_KEYS = ("state_dict", "optimizer_states")


def rank_file(checkpoint_path: _PATH, rank: int) -> str:
    """The file next to ``checkpoint_path`` that holds rank ``rank``'s own state: ``<checkpoint>.rank<r>.pt``.

    Its suffix is not ``.ckpt``, so ``ModelCheckpoint`` never mistakes it for a checkpoint of its own.
    """
    return f"{checkpoint_path}.rank{rank}.pt"


class DecentralizedStrategy(DDPStrategy):
    """Data-parallel training where each rank keeps its own model and averages it with topology neighbours.

    Args:
        topology: a registered topology name (``TopologyFactory.available()``) or a ``Topology`` subclass.
        bucket_cap_mb: largest parameter bucket, in MiB.
        timeout: seconds (or a ``timedelta``) a step waits for its peers before raising ``GossipError``;
            default 5 minutes.
        check_rounds: send each round's number with its data to catch ranks that step a different number of
            times.
        wire_dtype, compression, max_delay, gossip_every: as for ``DecentOptimWrapper`` (see
            :class:`~decent_optim_wrapper.config.GossipConfig`, which holds them all and checks them here).
        process_group_timeout: timeout of the process group Lightning creates (``DDPStrategy``'s ``timeout``).
        start_method: how Lightning starts the processes, as for ``DDPStrategy``: ``"popen"`` (the script is
            run once per rank; also what ``torchrun`` and cluster launchers use), ``"spawn"``, ``"fork"``,
            ``"forkserver"``.
        accelerator, parallel_devices, cluster_environment, checkpoint_io, precision_plugin,
            process_group_backend: as for ``DDPStrategy``.
    """

    strategy_name = STRATEGY_NAME  # what FinetuningScheduler (and logs) call this strategy

    def __init__(
        self,
        topology: str | type[Topology] = "ring",
        bucket_cap_mb: float = 25,
        *,
        timeout: float | timedelta | None = None,
        check_rounds: bool = True,
        wire_dtype: torch.dtype | None = None,
        compression: LowRank | None = None,
        max_delay: int = 1,
        gossip_every: int = 1,
        process_group_timeout: timedelta | None = default_pg_timeout,
        start_method: str = "popen",
        accelerator: Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
    ) -> None:
        self._gossip_config = _validated_config(topology, bucket_cap_mb=bucket_cap_mb, timeout=timeout,
                                                check_rounds=check_rounds, wire_dtype=wire_dtype,
                                                compression=compression, max_delay=max_delay,
                                                gossip_every=gossip_every)
        self._topology_name = topology if isinstance(topology, str) else topology.__name__
        self._gossip_active = False  # wrappers exist and train: from setup() in fit to on_train_end()
        self._train_started = False  # on_train_start() was reached: a later checkpoint load is a mid-fit restore
        self._held = False  # every rank holds the global average (between _enter_average and _exit_average)
        self._local_state_loaded = False  # setup() must not overwrite the rank's own restored state
        self._known_params: dict[int, set[int]] = {}  # wrapper id -> ids of the parameters it is known to bucket
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=process_group_timeout,
            start_method=start_method,  # type: ignore[arg-type]
        )

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        # Overrides DDPStrategy's, which would register "ddp" & co. for this class.
        if STRATEGY_NAME not in strategy_registry:
            strategy_registry.register(STRATEGY_NAME, cls,
                                       description="Decentralized (gossip) data parallel with DecentOptimWrapper")

    def setup_distributed(self) -> None:
        created = not (dist.is_available() and dist.is_initialized())
        super().setup_distributed()  # initialises the group unless one exists (or raises)
        # Lightning destroys the process group it created at exit only for NCCL. Left to interpreter shutdown, a
        # gloo group aborts the process ("terminate called without an active exception") whenever a worker
        # thread is still releasing the tensors of a finished collective: it needs the GIL, which a finalising
        # interpreter no longer hands out (torch 2.15; 22 of 30 three-rank torchrun jobs that end on an
        # all_reduce). Destroying the group at exit joins those threads first.
        if created and self._process_group_backend != "nccl":  # Lightning's own condition for its hook
            atexit.register(_destroy_process_group_at_exit)

    # ------------------------------------------------------------------ precision: keep every rank stepping
    @property  # type: ignore[override]
    def precision_plugin(self) -> Precision:
        return self._precision_plugin if self._precision_plugin is not None else Precision()

    @precision_plugin.setter
    def precision_plugin(self, precision_plugin: Precision | None) -> None:
        if type(precision_plugin) is MixedPrecision:
            precision_plugin = _GossipMixedPrecision(precision_plugin.precision,  # type: ignore[arg-type]
                                                     precision_plugin.device, precision_plugin.scaler)
        self._precision_plugin = precision_plugin

    # ------------------------------------------------------------------ model and optimizers
    def connect(self, model: LightningModule) -> None:
        _register_with_finetuning_scheduler()  # FTS checks the strategy in its setup(), which comes after this
        super().connect(model)

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:  # type: ignore[override]
        return model  # no DistributedDataParallel: gradients stay local

    def configure_ddp(self) -> None:
        # Instead of wrapping in DDP (whose construction broadcasts rank 0's module state), start everyone from
        # rank 0's parameters and buffers, also those no optimizer holds (frozen layers a schedule thaws later).
        # A rank resuming from its own per-rank file keeps what it loaded.
        if not self._local_state_loaded and self.world_size > 1:
            assert self.model is not None
            _broadcast_module(self.model)

    def setup_optimizers(self, trainer: Any) -> None:
        super().setup_optimizers(trainer)  # the setter below wraps what configure_optimizers returned
        self._gossip_active = True

    @property  # type: ignore[override]
    def optimizers(self) -> list[Optimizer]:
        return self._optimizers

    @optimizers.setter
    def optimizers(self, optimizers: list[Optimizer]) -> None:
        # Only during training can an assignment replace a live wrapper's optimizer; setup_optimizers() of a new
        # fit always builds new wrappers (the previous fit's may no longer own the parameters' storage).
        previous = [o for o in self._optimizers if isinstance(o, DecentOptimWrapper)] if self._gossip_active else []
        wrapped: list[Optimizer] = [self._as_wrapper(o, previous) for o in optimizers]
        self._optimizers = wrapped
        self._lightning_optimizers = [LightningOptimizer._to_lightning_optimizer(o, self) for o in wrapped]

    def _as_wrapper(self, optimizer: Optimizer, previous: list[DecentOptimWrapper]) -> DecentOptimWrapper:
        """The DecentOptimWrapper that ``optimizer`` becomes (every rank calls this at the same point)."""
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer.optimizer
        if isinstance(optimizer, DecentOptimWrapper):
            self._known_params.setdefault(id(optimizer), _param_ids(optimizer))
            return optimizer  # never wrapped twice
        ids = _param_ids(optimizer)
        owner = next((w for w in previous if ids & (self._known_params.get(id(w), set()) | _param_ids(w))), None)
        if owner is not None:
            # A callback replaced the optimizer over parameters a wrapper already holds (Fine-Tuning Scheduler's
            # optimizer re-initialisation): keep the buckets, the round counter and the averaging in flight.
            self._adopt_new_groups(owner)
            missing = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in _param_ids(owner)]
            if missing:
                owner.add_param_group({"params": missing})  # buckets them (and gives them rank 0's values)
            owner.reinit_optimizer(optimizer)
            self._known_params[id(owner)] = _param_ids(owner)
            logger.debug("rank {}: optimizer replaced by {}; wrapper kept at round {}",
                         self.global_rank, type(optimizer).__name__, owner.round)
            return owner
        wrapper = DecentOptimWrapper(optimizer, config=replace(self._gossip_config,
                                                               local_world_size=self.num_processes or None))
        self._known_params[id(wrapper)] = _param_ids(wrapper)
        logger.debug("rank {}/{}: {} wrapped in DecentOptimWrapper (topology {})", self.global_rank,
                     self.world_size, type(optimizer).__name__, self._topology_name)
        return wrapper

    def _wrappers(self) -> list[DecentOptimWrapper]:
        if not self._gossip_active:
            return []
        return [o for o in self._optimizers if isinstance(o, DecentOptimWrapper)]

    def _adopt_new_groups(self, wrapper: DecentOptimWrapper | None = None) -> None:
        """Bucket parameter groups that were added to a wrapper's inner optimizer behind its back.

        Fine-Tuning Scheduler adds the groups of later phases to the optimizer it re-initialised, which is the
        wrapper's inner optimizer: without this they would train locally and never be averaged. Groups added
        since the last check are taken out and added again through the wrapper (for parameters it already
        buckets that changes nothing). Called at points every rank reaches together: it may communicate.
        """
        for w in [wrapper] if wrapper is not None else self._wrappers():
            known = self._known_params.get(id(w), set())
            groups = w.param_groups
            first_new = next((i for i, g in enumerate(groups) if not {id(p) for p in g["params"]} <= known),
                             len(groups))
            if first_new < len(groups):
                added = groups[first_new:]
                del groups[first_new:]
                for group in added:
                    w.add_param_group(group)
                logger.debug("rank {}: {} parameter group(s) added to the inner optimizer are now bucketed",
                             self.global_rank, len(added))
            self._known_params[id(w)] = _param_ids(w)

    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any],
                       model: LightningModule | torch.nn.Module | None = None, **kwargs: Any) -> Any:
        self._adopt_new_groups()
        # Forward and backward now, then step(): the gradient is taken at this rank's own parameters while the
        # previous round's averaging is still in flight (inside step() it would run after that round is applied).
        return super().optimizer_step(optimizer, _RunFirstClosure(closure), model, **kwargs)

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        # The main checkpoint gets the plain inner optimizer state (rank 0's), loadable by any strategy; each
        # rank's full wrapper state goes to its own file (see save_checkpoint).
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer.optimizer
        if isinstance(optimizer, DecentOptimWrapper):
            return optimizer.optimizer.state_dict()
        return super().optimizer_state(optimizer)

    # ------------------------------------------------------------------ the global average
    @contextmanager
    def global_average(self) -> Generator[None, None, None]:
        """Within the block every rank's model holds the global average (parameters and floating-point buffers).

        On exit each rank gets its own parameters back, with the averaging that was in flight, so training
        continues bit for bit. All ranks must enter the block together (it all-reduces the parameters).
        Outside ``fit`` (no optimizers) the ranks hold the same model already and this does nothing.
        """
        entered = self._enter_average()
        try:
            yield
        finally:
            if entered:
                self._exit_average()

    def _enter_average(self) -> bool:
        wrappers = self._wrappers()
        if self._held or not wrappers:
            return False
        self._adopt_new_groups()
        for i, w in enumerate(wrappers):  # the module's buffers once, with the first wrapper
            w.global_avg(may_revert=True, module=self.lightning_module if i == 0 else None)
        self._held = True
        return True

    def _exit_average(self) -> None:
        if not self._held:
            return
        for w in reversed(self._wrappers()):
            w.revert_global_avg()
        self._held = False

    # Validation inside fit runs on the average; test, predict and validate outside fit need nothing: fit ends
    # with every rank holding the average, a checkpoint holds it, and DDP's setup broadcasts rank 0's model.
    def on_validation_start(self) -> None:
        self._enter_average()

    def on_validation_end(self) -> None:
        self._exit_average()

    def on_train_start(self) -> None:
        self._train_started = True

    def on_train_end(self) -> None:
        # The model people use after fit() is the average; waiting for it also completes the round in flight,
        # so no peer is left waiting for this rank.
        self._exit_average()
        for i, w in enumerate(self._wrappers()):
            w.global_avg(may_revert=False, module=self.lightning_module if i == 0 else None)
        logger.debug("rank {}: fit ended; every rank holds the global average", self.global_rank)
        self._gossip_active = False
        self._train_started = False

    def teardown(self) -> None:
        self._gossip_active = self._train_started = self._held = self._local_state_loaded = False
        self._known_params = {}
        super().teardown()

    # ------------------------------------------------------------------ checkpoints
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The model's state dict as the global average (every rank computes it: it all-reduces)."""
        with self.global_average():
            state = super().lightning_module_state_dict()
            # copies: the live tensors get each rank's own values back when the block ends
            return {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH,
                        storage_options: Any | None = None) -> None:
        """Rank 0 writes the checkpoint (the global average); every rank writes its own state next to it."""
        per_rank = bool(self._wrappers()) and "optimizer_states" in checkpoint  # not for weights-only saves
        if isinstance(self.precision_plugin, _GossipMixedPrecision) and _GOSSIP_AMP_KEY in checkpoint:
            checkpoint[_AMP_KEY] = checkpoint.pop(_GOSSIP_AMP_KEY)
        checkpoint[_CKPT_KEY] = {"world_size": self.world_size, "rank_files": per_rank,
                                 "topology": self._topology_name}
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)
        if not per_rank:
            return
        held = self._held  # e.g. ModelCheckpoint saving in on_validation_end, before the strategy reverts
        self._exit_average()
        try:
            own: dict[str, Any] = {_CKPT_KEY: {"world_size": self.world_size, "rank": self.global_rank}}
            assert self.lightning_module is not None  # set while fitting
            own["state_dict"] = self.lightning_module.state_dict()
            own["optimizer_states"] = [o.state_dict() for o in self._optimizers]
            precision_state = self.precision_plugin.state_dict()
            if precision_state:  # the GradScaler's scale is per rank: overflows differ between ranks
                own[_precision_key(self.precision_plugin)] = precision_state
            self.checkpoint_io.save_checkpoint(own, rank_file(filepath, self.global_rank),
                                               storage_options=storage_options)
        finally:
            if held:
                self._enter_average()

    def remove_checkpoint(self, filepath: _PATH) -> None:
        super().remove_checkpoint(filepath)
        self.checkpoint_io.remove_checkpoint(rank_file(filepath, self.global_rank))

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        """Load the checkpoint; when fitting, replace its per-rank entries by this rank's own file's."""
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        if self._trainer_fn() == TrainerFn.FITTING:
            self._merge_own_state(checkpoint, checkpoint_path, weights_only)
        if isinstance(self.precision_plugin, _GossipMixedPrecision) and _AMP_KEY in checkpoint:
            checkpoint[_GOSSIP_AMP_KEY] = checkpoint[_AMP_KEY]  # where Lightning looks for this plugin's state
        return checkpoint

    def _merge_own_state(self, checkpoint: dict[str, Any], checkpoint_path: _PATH, weights_only: bool | None) -> None:
        meta = checkpoint.get(_CKPT_KEY)
        if not isinstance(meta, Mapping) or not meta.get("rank_files"):
            return  # a plain checkpoint (another strategy, weights only): every rank starts from its model
        if meta["world_size"] != self.world_size:
            raise ValueError(
                f"Cannot resume decentralized training from {checkpoint_path}: it was saved by "
                f"{meta['world_size']} ranks, this run has {self.world_size}. Each rank resumes its own parameters, "
                "so the world size must be the same; to start a new run from the averaged model, load the "
                "checkpoint's weights instead (LightningModule.load_from_checkpoint)."
            )
        own_path = rank_file(_resolve_link(checkpoint_path), self.global_rank)
        if not get_filesystem(own_path).exists(own_path):
            raise FileNotFoundError(
                f"Cannot resume decentralized training from {checkpoint_path}: rank {self.global_rank}'s own state "
                f"{own_path} is missing. Every rank writes <checkpoint>.rank<r>.pt next to the checkpoint; copy "
                "them along with it."
            )
        own = self.checkpoint_io.load_checkpoint(own_path, weights_only=weights_only)
        if own[_CKPT_KEY]["rank"] != self.global_rank or own[_CKPT_KEY]["world_size"] != self.world_size:
            raise ValueError(f"{own_path} belongs to rank {own[_CKPT_KEY]['rank']} of {own[_CKPT_KEY]['world_size']}, "
                             f"not to rank {self.global_rank} of {self.world_size}.")
        checkpoint.update({k: v for k, v in own.items() if k != _CKPT_KEY})
        if not self._train_started:
            self._local_state_loaded = True  # fit(ckpt_path=...): setup() must not broadcast rank 0's state
        logger.debug("rank {}: restoring own state from {}", self.global_rank, own_path)

    def _trainer_fn(self) -> TrainerFn | None:
        try:
            return self.lightning_module.trainer.state.fn if self.lightning_module is not None else None
        except RuntimeError:  # the module is not attached to a Trainer
            return None

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        # Resuming a fine-tuning schedule, the callback has already set the later phases' parameter groups
        # (BaseFinetuning.on_fit_start): bucket them first, in order, as the saved run did.
        self._adopt_new_groups()
        for optimizer, state in zip(self._optimizers, checkpoint["optimizer_states"]):
            if isinstance(optimizer, DecentOptimWrapper) and self._train_started:
                self._restore_mid_fit(optimizer, state)
            else:
                optimizer.load_state_dict(state)  # torch puts the state on its parameters' devices
        for optimizer in self._optimizers:
            self._known_params[id(optimizer)] = _param_ids(optimizer)

    def _restore_mid_fit(self, wrapper: DecentOptimWrapper, state: dict[str, Any]) -> None:
        """Restore during training (Fine-Tuning Scheduler's ``restore_best`` at a phase boundary).

        A checkpoint from an earlier phase has fewer buckets than the wrapper holds now (parameters were added
        since), so the wrapper cannot resume its exact state: then this rank's inner optimizer state is loaded
        (its parameters and buffers already are), the round in flight is dropped, and every rank restarts from
        the global average of the restored models (the checkpoint's averaged model). The round counter goes on.
        """
        try:
            wrapper.load_state_dict(state)
            return
        except ValueError as exc:  # raised before anything changes, on every rank alike (same layout)
            logger.debug("rank {}: restoring a checkpoint with another bucket layout ({}); restarting from its "
                         "global average", self.global_rank, exc)
        wrapper.optimizer.load_state_dict({k: state[k] for k in ("state", "param_groups")})
        wrapper.global_avg(may_revert=False, module=self.lightning_module)


class _GossipMixedPrecision(MixedPrecision):
    """``MixedPrecision`` that unscales before clipping and always calls ``step()``.

    Lightning skips unscaling and refuses clipping (even for bf16, which has no scaler) for optimizers that
    handle scaling in ``step()``, as ``DecentOptimWrapper`` does so that a rank whose gradients overflowed still
    takes part in its round; and it skips ``scaler.step`` when ``training_step`` returned None. Here gradients
    are always unscaled first (the wrapper accepts unscaled gradients) and every rank always steps.
    """

    def optimizer_step(self, optimizer: Any, model: LightningModule, closure: Callable[[], Any],  # type: ignore[override]
                       **kwargs: Any) -> Any:
        if self.scaler is None or not isinstance(optimizer, DecentOptimWrapper):
            return super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)
        closure_result = closure()
        if closure_result is None and model.automatic_optimization:
            # training_step returned None: no gradients on this rank, but its round must still run
            self._after_closure(model, optimizer)
            return optimizer.step(**kwargs)
        self.scaler.unscale_(optimizer)
        self._after_closure(model, optimizer)
        step_output = self.scaler.step(optimizer, **kwargs)
        self.scaler.update()
        return step_output

    def clip_gradients(self, optimizer: Optimizer, clip_val: int | float = 0.0,
                       gradient_clip_algorithm: GradClipAlgorithmType = GradClipAlgorithmType.NORM) -> None:
        # The gradients were unscaled in optimizer_step, so clipping is valid here, although the wrapper
        # "handles scaling in step()" (for which MixedPrecision refuses to clip).
        Precision.clip_gradients(self, optimizer, clip_val, gradient_clip_algorithm)


# Lightning stores a precision plugin's state under its class's qualified name; checkpoints keep
# MixedPrecision's, so that the scaler state moves between this strategy and others.
_AMP_KEY = MixedPrecision.__qualname__
_GOSSIP_AMP_KEY = _GossipMixedPrecision.__qualname__


def _precision_key(plugin: Precision) -> str:
    return _AMP_KEY if isinstance(plugin, _GossipMixedPrecision) else type(plugin).__qualname__


class _RunFirstClosure:
    """Runs the closure at once; the optimizer's first call returns that result, later calls (LBFGS) re-run it."""

    def __init__(self, closure: Callable[[], Any]) -> None:
        self._closure = closure
        self._result = closure()
        self._fresh = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._fresh:
            self._fresh = False
            return self._result
        return self._closure(*args, **kwargs)


def _destroy_process_group_at_exit() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
        logger.debug("destroyed the process group Lightning created, before interpreter shutdown")


def _param_ids(optimizer: Optimizer) -> set[int]:
    return {id(p) for g in optimizer.param_groups for p in g["params"]}


@torch.no_grad()
def _broadcast_module(module: torch.nn.Module) -> None:
    """Give every rank global rank 0's parameters and buffers."""
    works = [dist.broadcast(t.detach(), src=0, async_op=True) for t in [*module.parameters(), *module.buffers()]]
    for work in works:
        if work is not None:
            work.wait()


def _resolve_link(path: _PATH) -> str:
    """A local symlink (ModelCheckpoint's ``save_last="link"``) is resolved: the rank files sit by its target."""
    path = str(path)
    return os.path.realpath(path) if "://" not in path and os.path.islink(path) else path


def _validated_config(topology: Any, **gossip: Any) -> GossipConfig:
    """The strategy's gossip arguments as one validated configuration (the wrappers are only built in the rank
    processes; a mistake shows where the strategy is built)."""
    if not isinstance(topology, str) and not (isinstance(topology, type) and issubclass(topology, Topology)):
        raise ValueError(f"Invalid topology={topology!r}. Must be a registered name or a Topology subclass (each rank "
                         "builds its own instance).")
    return GossipConfig(topology=topology, **gossip)


def _register_with_finetuning_scheduler() -> None:
    """Let Fine-Tuning Scheduler accept this strategy without ``allow_untested`` (when FTS is in use).

    FTS checks the strategy's name against a fixed list; its default strategy adapter suits this strategy
    (the model is not wrapped; thawing goes through ``add_param_group``, re-initialisation through the
    ``optimizers`` setter, both handled above).
    """
    fts_module = sys.modules.get("finetuning_scheduler.fts")
    if fts_module is None:  # FTS not imported: no FinetuningScheduler callback can exist
        return
    scheduler = fts_module.FinetuningScheduler
    supported = scheduler._supported_strategy_flags
    if STRATEGY_NAME in supported():
        return
    scheduler._supported_strategy_flags = staticmethod(lambda: (*supported(), STRATEGY_NAME))
    logger.debug("registered strategy {!r} with FinetuningScheduler", STRATEGY_NAME)


DecentralizedStrategy.register_strategies(StrategyRegistry)
_register_with_finetuning_scheduler()
