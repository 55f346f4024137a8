"""Writes trajectories_0_1_1.json: decent-optim-wrapper 0.1.1's parameters after a short run (the oracle of
tests/test_compat_0_1_1.py). Not part of the suite: it needs the 0.1.1 wheel from PyPI.

    pip download decent-optim-wrapper==0.1.1 --no-deps --python-version 3.12 --only-binary=:all: -d /tmp/w011
    (cd /tmp/w011 && unzip -o -q decent_optim_wrapper-0.1.1-py3-none-any.whl)
    PYTHONPATH=/tmp/w011 uv run python tests/data/trajectories_0_1_1.py

The run itself (`run`) is shared with the test, which repeats it with this tree's wrapper.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

WORLD_SIZE, STEPS = 4, 9
TOPOLOGIES = ("ring", "complete")


def run(rank: int, world_size: int, topology: str) -> dict[str, list[float]]:
    """AdamW on a small MLP, ranks with different data, a global_avg/revert after step 4; each rank's parameters
    at the end, and the global average (0.1.1's positional arguments: rank, world size, local world size)."""
    from decent_optim_wrapper.wrapper import DecentOptimWrapper  # 0.1.1's __init__ exports nothing

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    opt = DecentOptimWrapper(torch.optim.AdamW(model.parameters(), lr=1e-2), rank, world_size, 1, topology)
    for step in range(STEPS):
        g = torch.Generator().manual_seed(100 * rank + step)
        opt.zero_grad()
        x, y = torch.randn(4, 5, generator=g), torch.randn(4, 3, generator=g)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if step == 4:
            opt.global_avg()
            opt.revert_global_avg()
    local = torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()
    opt.global_avg()
    avg = torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()
    return {"local": local, "avg": avg}


def _rank(rank: int, store: str, topology: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, WORLD_SIZE), rank=rank, world_size=WORLD_SIZE)
    Path(f"{out}.{rank}").write_text(json.dumps(run(rank, WORLD_SIZE, topology)))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    import torch.multiprocessing as mp

    result: dict[str, list[dict[str, list[str]]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for topology in TOPOLOGIES:
            mp.spawn(_rank, args=(f"{tmp}/{topology}.store", topology, f"{tmp}/{topology}"), nprocs=WORLD_SIZE)
            ranks = [json.loads(Path(f"{tmp}/{topology}.{r}").read_text()) for r in range(WORLD_SIZE)]
            # float.hex: exact
            result[topology] = [{k: [float.hex(v) for v in r[k]] for k in ("local", "avg")} for r in ranks]
    (Path(__file__).parent / "trajectories_0_1_1.json").write_text(json.dumps(result))
