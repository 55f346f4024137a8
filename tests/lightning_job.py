"""Lightning runs under DecentralizedStrategy whose records tests/test_lightning.py checks.

    python tests/lightning_job.py OUT SCENARIO [SCENARIO ...]     # Lightning forks the ranks itself
    torchrun --nproc-per-node 2 tests/lightning_job.py OUT torchrun  # ranks started by torchrun

Lightning is imported once here and each fit forks its ranks (Lightning's ``fork`` launcher), so many runs
cost one import; the ``torchrun`` scenario uses the external launcher instead. Every rank writes what it saw
to ``OUT/<run>.rank<r>.pt``; errors that a scenario expects are written to ``OUT/<run>.error.txt``.
"""

from __future__ import annotations

import atexit
import os
import pickle
import shutil
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

torch.set_num_threads(1)  # before any fork: the ranks share 2 cores
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
sys.path.insert(0, str(Path(__file__).parent))

import lightning.pytorch as pl  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint  # noqa: E402
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402
from lightning_common import BATCH, CLIP, LR, TRAIN, VAL, flat, make_net  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from decent_optim_wrapper import DecentOptimWrapper, LowRank  # noqa: E402
from decent_optim_wrapper.lightning import DecentralizedStrategy  # noqa: E402

OUT = Path(sys.argv[1])


class Module(pl.LightningModule):
    def __init__(self, rank_metric: bool = False, fts_monitor: bool = False) -> None:
        super().__init__()
        self.net = make_net()
        self.rank_metric = rank_metric
        self.fts_monitor = fts_monitor

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.rank_metric:  # rank 1 gets worse from epoch 1 on, the others better: only rank 1 wants to stop
            value = float(self.current_epoch if self.global_rank == 1 else -self.current_epoch)
            self.log("rank_metric", value, on_step=False, on_epoch=True)
        return F.mse_loss(self.net(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.mse_loss(self.net(x), y), sync_dist=True)
        if self.fts_monitor:  # grows every epoch: the best checkpoint stays the first one (phase 0)
            self.log("fts_monitor", float(self.current_epoch), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=LR)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*TRAIN), batch_size=BATCH, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*VAL), batch_size=BATCH, shuffle=False)


class Probe(pl.Callback):
    """Records what each rank holds at the interesting points of training; saved at the end of fit."""

    def __init__(self, name: str, probe_step: int | None = None) -> None:
        self.name = name
        self.probe_step = probe_step
        self.rec: dict[str, Any] = defaultdict(list)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: Module) -> None:
        if not trainer.sanity_checking:  # callbacks run before the strategy averages: the rank's own model
            self.rec["val_local"].append(flat(pl_module.net))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: Module) -> None:
        if not trainer.sanity_checking:  # the model the validation steps just used
            self.rec["val_model"].append(flat(pl_module.net))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: Module) -> None:
        if not trainer.sanity_checking:
            self.rec["val_loss"].append(float(trainer.callback_metrics["val_loss"]))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Module, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            opt = trainer.optimizers[0]
            depth = [c.curr_depth for c in trainer.callbacks if hasattr(c, "curr_depth")]  # FinetuningScheduler
            self.rec["epochs"].append({
                "depth": depth[0] if depth else None, "inner": _inner_name(opt),
                "round": getattr(opt, "round", None), "is_wrapper": isinstance(opt, DecentOptimWrapper),
                "trainable": [n for n, p in pl_module.named_parameters() if p.requires_grad],
            })

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Module, optimizer: Any) -> None:
        # Runs inside step(), after the previous round's averaging was applied and before the local update.
        self.rec["pre"].append(flat(pl_module.net))
        self.rec["trainable"].append([p.requires_grad for p in pl_module.net.parameters()])

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Module, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.rec["post"].append(flat(pl_module.net))
        if trainer.global_step == self.probe_step and "probe_local" not in self.rec:
            opt = trainer.optimizers[0]
            self.rec["probe_local"] = flat(pl_module.net)
            opt.global_avg()
            self.rec["probe_avg"] = flat(pl_module.net)
            opt.revert_global_avg()
            self.rec["probe_reverted"] = flat(pl_module.net)

    def on_train_end(self, trainer: pl.Trainer, pl_module: Module) -> None:
        # Callbacks run before the strategy's on_train_end (which averages): the rank's own final model.
        opt = trainer.optimizers[0]
        self.rec.update(final_local=flat(pl_module.net), round=getattr(opt, "round", None),
                        global_step=trainer.global_step, epoch=trainer.current_epoch,
                        is_wrapper=isinstance(opt, DecentOptimWrapper), inner=_inner_name(opt))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: Module) -> None:
        self.rec["final"] = flat(pl_module.net)
        torch.save(dict(self.rec), OUT / f"{self.name}.rank{trainer.global_rank}.pt")


def _inner_name(opt: torch.optim.Optimizer) -> str:
    return type(opt.optimizer if isinstance(opt, DecentOptimWrapper) else opt).__name__


def trainer(name: str, devices: int, topology: str = "one-peer-exp", callbacks: tuple = (),
            probe_step: int | None = None, start_method: str = "fork", gossip: dict | None = None,
            **kwargs: Any) -> pl.Trainer:
    """A Trainer under DecentralizedStrategy on ``devices`` CPU ranks (0: plain single-device Lightning);
    ``gossip``: more arguments of the strategy."""
    strategy = DecentralizedStrategy(topology=topology, timeout=60, start_method=start_method, **(gossip or {})) \
        if devices else "auto"
    return pl.Trainer(accelerator="cpu", devices=devices or 1, strategy=strategy,
                      callbacks=[Probe(name, probe_step), *callbacks], logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(OUT / name), num_sanity_val_steps=0,
                      **kwargs)


def expect_error(name: str, fn: Any) -> None:
    try:
        fn()
    except Exception as exc:  # the launcher re-raises a rank's exception with its traceback
        (OUT / f"{name}.error.txt").write_text(str(exc))
    else:
        (OUT / f"{name}.error.txt").write_text("no error")


# ----------------------------------------------------------------------------- scenarios
def basic() -> None:
    """4 ranks, one-peer-exp, 3 epochs with validation; checkpoints every epoch; then resumes from epoch 0."""
    ckpts = OUT / "basic_ckpt"
    save = ModelCheckpoint(dirpath=ckpts, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    trainer("basic", 4, callbacks=(save,), probe_step=3, max_epochs=3).fit(Module())
    trainer("resumed", 4, max_epochs=3).fit(Module(), ckpt_path=str(ckpts / "epoch=0.ckpt"))
    # resuming needs the same world size and every rank's own file
    expect_error("resume_ws2", lambda: trainer("resume_ws2", 2, max_epochs=3).fit(
        Module(), ckpt_path=str(ckpts / "epoch=0.ckpt")))
    partial = OUT / "partial_ckpt"
    partial.mkdir()
    for f in ckpts.glob("epoch=0.ckpt*"):
        if not f.name.endswith(".rank3.pt"):
            shutil.copy(f, partial / f.name)
    expect_error("resume_missing", lambda: trainer("resume_missing", 4, max_epochs=3).fit(
        Module(), ckpt_path=str(partial / "epoch=0.ckpt")))


def early_stop() -> None:
    """4 ranks, ring: early stopping and checkpointing decided at train-epoch end (a round in flight) on a
    metric only rank 1 sees getting worse."""
    stop = EarlyStopping(monitor="rank_metric", mode="min", patience=0, check_on_train_epoch_end=True)
    save = ModelCheckpoint(dirpath=OUT / "early_stop_ckpt", monitor="rank_metric", mode="min", save_top_k=1,
                           save_on_train_epoch_end=True)
    trainer("early_stop", 4, topology="ring", callbacks=(stop, save), max_epochs=5,
            limit_val_batches=0).fit(Module(rank_metric=True))


def fts() -> None:
    """4 ranks, complete topology: a three-phase Fine-Tuning Scheduler schedule re-initialising the optimizer
    at both boundaries; restore_best (the default) restores phase 0's checkpoint at each boundary."""
    from finetuning_scheduler import FinetuningScheduler, FTSCheckpoint, FTSEarlyStopping  # not for torchrun

    schedule = {
        0: {"params": ["net.head.weight", "net.head.bias"], "max_transition_epoch": 1},
        1: {"params": ["net.body.2.weight", "net.body.2.bias"], "max_transition_epoch": 2,
            "new_optimizer": {"optimizer_init": {"class_path": "torch.optim.SGD",
                                                 "init_args": {"lr": 0.05, "momentum": 0.9}}}},
        2: {"params": ["net.body.0.weight", "net.body.0.bias"],
            "new_optimizer": {"optimizer_init": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 5e-3}}}},
    }
    callbacks = (FinetuningScheduler(ft_schedule=schedule, max_depth=2),
                 FTSCheckpoint(monitor="fts_monitor", mode="min", save_top_k=1, dirpath=OUT / "fts_ckpt"),
                 FTSEarlyStopping(monitor="fts_monitor", mode="min", patience=100))
    trainer("fts", 4, topology="complete", callbacks=callbacks, max_epochs=4).fit(Module(fts_monitor=True))

    # Resuming in phase 1 (from last.ckpt): the scheduler sets phase 1's parameter groups on the optimizer
    # before Lightning restores its state; they must be bucketed as in the saved run. (No re-initialisation
    # before the resumed phase: FTS cannot load another optimizer class's state on resume, under DDP either.)
    del schedule[1]["new_optimizer"]

    def resumable(name: str) -> tuple:
        return (FinetuningScheduler(ft_schedule=schedule, max_depth=2),
                FTSCheckpoint(monitor="val_loss", save_top_k=1, save_last=True, dirpath=OUT / name),
                FTSEarlyStopping(monitor="val_loss", patience=100))

    trainer("fts_half", 2, topology="complete", callbacks=resumable("fts_resume_ckpt"), max_epochs=2).fit(Module())
    trainer("fts_resumed", 2, topology="complete", callbacks=resumable("fts_resume_ckpt"), max_epochs=3).fit(
        Module(), ckpt_path=str(OUT / "fts_resume_ckpt" / "last.ckpt"))


def precision() -> None:
    """2 ranks, ring: 16-mixed (GradScaler) and bf16-mixed with clipping and accumulation; and world size 1
    under this strategy against plain single-device Lightning."""
    common = dict(max_epochs=2, gradient_clip_val=CLIP, accumulate_grad_batches=2, limit_val_batches=0)
    trainer("fp16", 2, topology="ring", plugins=[MixedPrecision("16-mixed", "cpu")], **common).fit(Module())
    trainer("bf16", 2, topology="ring", precision="bf16-mixed", **common).fit(Module())
    # same data order for both: a single-device Trainer adds no DistributedSampler
    common["use_distributed_sampler"] = False
    trainer("ws1", 1, plugins=[MixedPrecision("16-mixed", "cpu")], **common).fit(Module())
    trainer("single", 0, plugins=[MixedPrecision("16-mixed", "cpu")], **common).fit(Module())


class OwnWrapperModule(Module):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        self.own = DecentOptimWrapper(torch.optim.SGD(self.parameters(), lr=LR), topology="ring")
        return self.own


class Same(pl.Callback):
    def on_train_end(self, trainer: pl.Trainer, pl_module: OwnWrapperModule) -> None:
        same = trainer.optimizers[0] is pl_module.own and pl_module.optimizers().optimizer is pl_module.own
        (OUT / f"own_wrapper.rank{trainer.global_rank}.txt").write_text(str(same))


def misc() -> None:
    """Arguments checked where they are given; the registered name; a wrapper from configure_optimizers kept."""
    errors = []
    for kwargs in ({"topology": "nope"}, {"bucket_cap_mb": 0}, {"timeout": -1}, {"check_rounds": 1}):
        try:
            DecentralizedStrategy(**kwargs)
            errors.append("no error")
        except ValueError as exc:
            errors.append(str(exc))
    (OUT / "args.txt").write_text("\n".join(errors))
    t = pl.Trainer(strategy="decentralized", accelerator="cpu", devices=2, logger=False,
                   plugins=[MixedPrecision("16-mixed", "cpu")])
    (OUT / "registry.txt").write_text(type(t.strategy).__name__)
    pickle.dumps(t.strategy)  # the spawn start method pickles the strategy, with its precision plugin
    trainer("own_wrapper", 2, callbacks=(Same(),), max_epochs=1, limit_val_batches=0).fit(OwnWrapperModule())
    # the slow-link arguments reach the wrappers the strategy builds
    trainer("slowlink", 2, topology="ring", gossip={"compression": LowRank(rank=1), "max_delay": 2}, max_epochs=2,
            limit_val_batches=0).fit(Module())


def torchrun() -> None:
    """Ranks started by torchrun (Lightning only joins them): train, checkpoint, resume, in one job."""
    # Registered before Lightning creates the process group, so it runs after every atexit hook registered later
    # (the strategy's among them): what a finalising interpreter would find.
    exit_record = OUT / f"torchrun.exit.rank{os.environ['RANK']}.txt"
    atexit.register(lambda: exit_record.write_text("alive" if torch.distributed.is_initialized() else "destroyed"))
    ckpts = OUT / "torchrun_ckpt"
    save = ModelCheckpoint(dirpath=ckpts, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    trainer("torchrun", 2, callbacks=(save,), start_method="popen", max_epochs=2).fit(Module())
    resumed = trainer("torchrun_resumed", 2, start_method="popen", max_epochs=2)
    resumed.fit(Module(), ckpt_path=str(ckpts / "epoch=0.ckpt"))
    # The script ends on collectives, as one that reduces a last metric does. Lightning leaves a gloo group to
    # interpreter shutdown, where a gloo worker still releasing a finished all_reduce's tensors aborts the
    # process; the strategy destroys the group at exit, so every rank exits with 0. A long switch interval makes
    # it likelier that the worker waits for the GIL into shutdown, as on a loaded machine (without the fix, 5 of
    # 8 jobs aborted with it, 3 of 8 without); the exit record below sees the cause whatever the timing.
    sys.setswitchinterval(10.0)
    for _ in range(20):
        resumed.strategy.reduce(torch.ones(1), reduce_op="sum")


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    for scenario in sys.argv[2:]:
        globals()[scenario]()
