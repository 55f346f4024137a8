"""Check that benchmarks/anchors.py's DiLoCo takes the same steps as torchft's ``DiLoCo`` (CPU, gloo, loopback).

    uv venv /tmp/ftvenv && VIRTUAL_ENV=/tmp/ftvenv uv pip install torchft==0.2.0
    /tmp/ftvenv/bin/python benchmarks/diloco_torchft_check.py          # prints the largest difference, exits 1 if
                                                                       # it is above 1e-6

torchft is not a dependency of this project (its Manager needs a lighthouse server, a store and a manager server
per replica group: see benchmarks/README.md, "Slow-link anchors"), so this runs in a separate environment. It
starts ``torchft_lighthouse`` on 127.0.0.1, then ``--replicas`` processes; each trains the same small MLP on its
own batches twice, from the same start, once under torchft (one replica group of one rank per process) and once
under ``anchors.DiLoCo`` over a plain gloo group, and compares the parameters after ``--steps`` steps.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import anchors  # noqa: E402  (a sibling file, not a package)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(step_fn: Callable[[], object], model: nn.Module, inner: torch.optim.Optimizer, rank: int,
           steps: int) -> None:
    gen = torch.Generator().manual_seed(100 + rank)  # each replica its own data, the same for both runs
    for _ in range(steps):
        x = torch.randn(32, 16, generator=gen)
        loss = ((model(x) - x.sum(1, keepdim=True).sin()) ** 2).mean()
        inner.zero_grad()
        loss.backward()
        step_fn()


def _fresh(lr: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=lr)


def _replica(rank: int, world: int, ports: dict[str, int], steps: int, sync_every: int, lr: float,
             out: Path) -> None:
    from torchft import Manager, ProcessGroupGloo
    from torchft.local_sgd import DiLoCo as TorchftDiLoCo

    torch.set_num_threads(1)
    # torchft: each process is a replica group of one rank, with its own store; the lighthouse forms the quorum.
    store = dist.TCPStore("127.0.0.1", ports["store"] + rank, is_master=True, wait_for_workers=False)
    model, inner = _fresh(lr)
    outer = torch.optim.SGD(model.parameters(), lr=anchors.DILOCO_OUTER_LR, momentum=anchors.DILOCO_OUTER_MOMENTUM,
                            nesterov=True)
    manager = Manager(pg=ProcessGroupGloo(timeout=timedelta(seconds=60)), min_replica_size=world,
                      load_state_dict=lambda sd: model.load_state_dict(sd["model"]),
                      state_dict=lambda: {"model": model.state_dict()}, use_async_quorum=False,
                      replica_id=f"replica{rank}", store_addr="127.0.0.1", store_port=ports["store"] + rank, rank=0,
                      world_size=1, hostname="127.0.0.1", lighthouse_addr=f"http://127.0.0.1:{ports['lighthouse']}",
                      timeout=timedelta(seconds=60),
                      # Every replica starts from the same model (seed 0): no healing from a peer at step 0, which
                      # would replace one replica's first inner steps by another's.
                      init_sync=False)
    with TorchftDiLoCo(manager, [model], inner, outer, sync_every=sync_every, pin_memory=False):
        _train(inner.step, model, inner, rank, steps)
    reference = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    manager.shutdown()
    del store

    # Ours, over a plain gloo group of the same processes.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{ports['dist']}", rank=rank, world_size=world)
    model, inner = _fresh(lr)
    ours = anchors.DiLoCo(inner, model.parameters(), sync_every)
    _train(ours.step, model, inner, rank, steps)
    mine = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    dist.destroy_process_group()
    torch.save({"torchft": reference, "ours": mine, "syncs": ours.syncs}, out / f"{rank}.pt")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--sync-every", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--tolerance", type=float, default=1e-6)
    a = p.parse_args()
    lighthouse = shutil.which("torchft_lighthouse") or str(Path(sys.executable).parent / "torchft_lighthouse")
    ports = {"lighthouse": _free_port(), "dist": _free_port(), "store": _free_port() + 100}
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"diloco-check-{os.getpid()}"
    out.mkdir(parents=True)
    lh = subprocess.Popen([lighthouse, "--min_replicas", str(a.replicas), "--join_timeout_ms", "2000",
                           "--bind", f"127.0.0.1:{ports['lighthouse']}"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        mp.spawn(_replica, args=(a.replicas, ports, a.steps, a.sync_every, a.lr, out), nprocs=a.replicas)
    finally:
        lh.terminate()
        lh.wait()
    worst = 0.0
    for r in range(a.replicas):
        res = torch.load(out / f"{r}.pt")
        diff = (res["torchft"] - res["ours"]).abs().max().item()
        moved = (res["ours"] - _vector0()).abs().max().item()
        worst = max(worst, diff)
        print(f"replica {r}: {res['syncs']} syncs; largest |torchft - ours| {diff:.3g} (largest move from the "
              f"start {moved:.3g})")
    shutil.rmtree(out)
    print("same steps" if worst <= a.tolerance else f"DIFFERENT: {worst:.3g} > {a.tolerance:g}")
    return 0 if worst <= a.tolerance else 1


def _vector0() -> torch.Tensor:
    model, _ = _fresh(1.0)
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach()


if __name__ == "__main__":
    raise SystemExit(main())
