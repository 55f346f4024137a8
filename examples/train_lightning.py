"""A LightningModule trained with DecentralizedStrategy on scikit-learn's bundled handwritten digits.

Lightning starts the worker processes itself (as for DDP), or joins the ones torchrun started::

    uv run python examples/train_lightning.py --devices 4 --topology one-peer-exp
    uv run torchrun --nproc-per-node 4 examples/train_lightning.py
    uv run python examples/train_lightning.py --devices 4 --fts      # a three-phase Fine-Tuning Scheduler schedule

Each worker trains on its own shard (Lightning's DistributedSampler); validation runs on the global average
of the workers' models, so ``val_acc`` is the accuracy of the model a checkpoint holds. Checkpoints go to
``lightning_logs/``: ``*.ckpt`` is the averaged model (loadable anywhere), ``*.ckpt.rank<r>.pt`` each worker's
own state, from which ``--resume PATH`` continues the same run.
"""

from __future__ import annotations

import argparse
import os

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from decent_optim_wrapper.lightning import DecentralizedStrategy


def digits(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Train and test sets (80/20), pixels scaled to [0, 1]."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_test = len(x) // 5
    return TensorDataset(x[n_test:], y[n_test:]), TensorDataset(x[:n_test], y[:n_test])


class DigitsModule(pl.LightningModule):
    def __init__(self, hidden: int = 256, lr: float = 1e-3, batch_size: int = 32) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.features = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(),
                                            torch.nn.Linear(hidden, hidden), torch.nn.ReLU())
        self.classifier = torch.nn.Linear(hidden, 10)
        self.train_set, self.test_set = digits()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("val_acc", (logits.argmax(1) == y).float().mean(), sync_dist=True, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # Each worker's optimizer becomes a DecentOptimWrapper; with a fine-tuning schedule only the thawed
        # parameters are handed over here, the scheduler adds the others phase by phase.
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=256)


def fine_tuning_scheduler() -> pl.Callback:
    """Phase 0 trains the classifier; phase 1 thaws the second layer and re-initialises the optimizer as SGD;
    phase 2 thaws everything."""
    from finetuning_scheduler import FinetuningScheduler

    schedule = {
        0: {"params": ["classifier.weight", "classifier.bias"], "max_transition_epoch": 3},
        1: {"params": ["features.2.weight", "features.2.bias"], "max_transition_epoch": 6,
            "new_optimizer": {"optimizer_init": {"class_path": "torch.optim.SGD",
                                                 "init_args": {"lr": 0.05, "momentum": 0.9}}}},
        2: {"params": ["features.0.weight", "features.0.bias"]},
    }
    return FinetuningScheduler(ft_schedule=schedule, max_depth=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=int(os.environ.get("LOCAL_WORLD_SIZE", 4)))
    parser.add_argument("--topology", default="one-peer-exp")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--precision", default="32-true", help="e.g. bf16-mixed")
    parser.add_argument("--fts", action="store_true", help="train with a Fine-Tuning Scheduler schedule")
    parser.add_argument("--resume", default=None, help="a checkpoint to resume from")
    args = parser.parse_args()

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # CPU workers on one machine talk over loopback
    torch.set_num_threads(1)
    pl.seed_everything(0)
    callbacks: list[pl.Callback] = [ModelCheckpoint(monitor="val_acc", mode="max", save_last=True)]
    if args.fts:
        callbacks.append(fine_tuning_scheduler())
    trainer = pl.Trainer(
        strategy=DecentralizedStrategy(topology=args.topology),
        accelerator="auto",
        devices=args.devices,
        precision=args.precision,
        max_epochs=args.epochs,
        callbacks=callbacks,
        enable_progress_bar=False,
    )
    trainer.fit(DigitsModule(), ckpt_path=args.resume)
    if trainer.is_global_zero:
        print(f"val_acc of the averaged model: {float(trainer.callback_metrics['val_acc']):.4f}; "
              f"checkpoints in {trainer.checkpoint_callback.dirpath}")


if __name__ == "__main__":
    main()
