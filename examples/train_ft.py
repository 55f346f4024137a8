"""Gossip training that goes on when a replica dies: DecentOptimWrapper over a torchft Manager.

Needs torchft (``pip install "decent-optim-wrapper[ft]"``, or ``uv sync --group ft-dev`` in a checkout). Start the
lighthouse once, then one replica per ``torchrun`` (each its own job of one process, restarted by its own
``--max-restarts``)::

    torchft_lighthouse --min_replicas 1 --join_timeout_ms 2000 --heartbeat_timeout_ms 2000 &
    for i in 0 1 2 3; do
        REPLICA_GROUP_ID=$i TORCHFT_LIGHTHOUSE=http://localhost:29510 \\
            torchrun --nnodes 1 --nproc-per-node 1 --max-restarts 3 --master-port $((29600 + i)) \\
            examples/train_ft.py &
    done

Kill one (``pkill -9 -f "train_ft.py" -n``): the others pause for the lighthouse's heartbeat timeout and go on
as three; its torchrun restarts it, it heals from a live replica at the next quorum and trains as one of four
again. Each replica trains an MLP on its own shard of scikit-learn's handwritten digits and prints its accuracy
and the quorum it is in every 50 steps.
"""

from __future__ import annotations

import argparse
import os
from datetime import timedelta

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torchft import Manager, ProcessGroupGloo
from torchft.checkpointing.pg_transport import PGTransport

from decent_optim_wrapper import DecentOptimWrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--topology", default="ring", help="a topology of pairs: ring, one-peer-exp, torus")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--shards", type=int, default=4, help="how the data is split (by REPLICA_GROUP_ID)")
    args = parser.parse_args()
    replica = int(os.environ.get("REPLICA_GROUP_ID", "0"))
    torch.set_num_threads(1)

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32) / 16.0, torch.tensor(y)
    x_test, y_test, x, y = x[:360], y[:360], x[360:], y[360:]
    x, y = x[replica % args.shards::args.shards], y[replica % args.shards::args.shards]

    # One process per replica: torchrun's store (MASTER_ADDR:MASTER_PORT) is the replica's own. Across machines,
    # give torchrun --master-addr this machine's address: the other replicas connect to it.
    timeout = timedelta(seconds=30)
    pg = ProcessGroupGloo(timeout=timeout)
    manager = Manager(
        pg=pg,
        min_replica_size=1,
        load_state_dict=None,  # the wrapper registers what a joining replica needs (parameters, optimizer state)
        state_dict=None,
        use_async_quorum=False,  # gossip needs the quorum before its round starts
        replica_id=f"train_ft_{replica}",
        hostname=os.environ.get("MASTER_ADDR", "localhost"),
        timeout=timeout,
        checkpoint_transport=PGTransport(pg, timeout, torch.device("cpu")),  # heal over the process group
        init_sync=False,  # every replica starts from the same seed
    )
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    optimizer = DecentOptimWrapper(torch.optim.AdamW(model.parameters(), lr=args.lr), topology=args.topology,
                                   manager=manager)

    while manager.current_step() < args.steps:
        step = manager.current_step()
        idx = torch.randint(len(x), (32,), generator=torch.Generator().manual_seed(1000 * replica + step))
        optimizer.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        optimizer.step()  # ends the last round, joins the quorum (healing if behind), steps, starts a round
        if manager.current_step() % 50 == 0:
            with torch.no_grad():
                acc = (model(x_test).argmax(1) == y_test).float().mean().item()
            print(f"replica {replica}: step {manager.current_step()}, rank {optimizer.rank} of "
                  f"{optimizer.world_size}, accuracy {acc:.3f}, {optimizer.ft_stats}", flush=True)
    optimizer.finish()
    manager.shutdown(wait=False)


if __name__ == "__main__":
    main()
