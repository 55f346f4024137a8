"""The same LightningModule under Lightning's DDPStrategy and under DecentralizedStrategy.

    uv run python benchmarks/lightning_compare.py                  # 4 CPU workers, 10 epochs, ~2 minutes
    uv run python benchmarks/lightning_compare.py --workers 2 --epochs 5

Model, data, optimizer and data order are those of examples/train_lightning.py (MLP 64-256-256-10 on the
bundled digits, AdamW lr 1e-3, batch 32 per worker, Lightning's DistributedSampler). Every method runs in
processes that Lightning forks from this one (start method "fork"), so start-up is not timed. Reported per
method: accuracy and loss on the test set (for DecentralizedStrategy, of the global average the validation
runs on), final training loss (mean over workers), time per training batch (median over batches after the
first epoch, slowest worker) and the wall time of fit() from the first to the last batch. Writes
benchmarks/results/lightning_compare/summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from train_lightning import DigitsModule  # noqa: E402

from decent_optim_wrapper.lightning import DecentralizedStrategy  # noqa: E402

METHODS = ["ddp", "ring", "one-peer-exp"]


class Timer(pl.Callback):
    """Each worker writes its batch times (after the first epoch) and the span of training to ``out``."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.times: list[float] = []
        self.start = time.perf_counter()

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.current_epoch > 0:
            self.times.append(time.perf_counter() - self.t0)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        record = {"batch_ms": 1e3 * statistics.median(self.times), "fit_s": time.perf_counter() - self.start}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def run(method: str, workers: int, epochs: int) -> dict[str, Any]:
    strategy = (DDPStrategy(start_method="fork") if method == "ddp"
                else DecentralizedStrategy(topology=method, start_method="fork"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        pl.seed_everything(0, verbose=False)
        trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=workers, max_epochs=epochs,
                             callbacks=[Timer(out)], logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
        trainer.fit(DigitsModule())
        ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(workers)]
    metrics = trainer.callback_metrics  # sent back from rank 0 by the fork launcher
    return {"method": method, "val_acc": float(metrics["val_acc"]), "val_loss": float(metrics["val_loss"]),
            "train_loss": float(metrics["train_loss"]), "batch_ms": max(r["batch_ms"] for r in ranks),
            "fit_s": max(r["fit_s"] for r in ranks)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--out", default="benchmarks/results/lightning_compare")
    args = parser.parse_args()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)  # before forking: the workers share the cores

    rows = [run(m, args.workers, args.epochs) for m in args.methods]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps({"workers": args.workers, "epochs": args.epochs, "rows": rows},
                                                 indent=2))
    print(f"\n{args.workers} workers, {args.epochs} epochs\n")
    print("| strategy | test acc | test loss | train loss | batch ms | fit s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        name = "DDPStrategy" if r["method"] == "ddp" else f"DecentralizedStrategy({r['method']!r})"
        print(f"| {name} | {r['val_acc']:.3f} | {r['val_loss']:.4f} | {r['train_loss']:.4f} | "
              f"{r['batch_ms']:.2f} | {r['fit_s']:.1f} |")


if __name__ == "__main__":
    main()
