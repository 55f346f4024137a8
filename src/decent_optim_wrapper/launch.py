"""Run a function on N local processes, one rank each, joined in a process group, with a hard timeout.

For tests, benchmarks and single-machine jobs that launch their own workers (``torchrun`` is the way for
everything else). Workers come from a forkserver that has imported torch once, so a 4-rank run starts in a
fraction of a second instead of importing torch four times. The ranks meet through a FileStore in a fresh
temporary file (never a fixed port). A rank that raises, dies or outlives the timeout fails the call, with
that rank's traceback in the message.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

__all__ = ["RankFailure", "run_local", "shared_counter", "init_distributed"]

_CTX = mp.get_context("forkserver")
# torch.optim.Optimizer.__init__ imports torch._dynamo on first use: seconds per process, so preload it too.
_PRELOAD = ["torch", "torch._dynamo", "torch.distributed", "decent_optim_wrapper"]


class RankFailure(AssertionError):
    """Raised when a rank failed; carries every failing rank's traceback."""


def init_distributed(backend: str | None = None, timeout: float | None = None) -> None:
    """``torch.distributed.init_process_group`` for ``torchrun`` jobs that must survive restarts.

    Under ``torchrun --max-restarts``, the restarted workers share the rendezvous store with the attempt that
    failed, and its stale keys make them fail in gloo's ``connectFullMesh`` or hang (pytorch/pytorch#135712).
    This initialises the default process group on a namespace of that store per restart attempt
    (``TORCHELASTIC_RESTART_COUNT``). Outside torchrun it is a plain ``init_process_group(backend)`` from the
    ``env://`` variables.

    One node only: across several, only the failed node's agent counts a restart, so the nodes' workers would wait
    in different namespaces; run such jobs with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` and a plain
    ``init_process_group`` instead (found by ``benchmarks/ft_drill.py``).
    """
    import torch.distributed as dist

    store, rank, world_size = next(dist.rendezvous("env://"))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    kwargs: dict[str, Any] = {} if timeout is None else {"timeout": timedelta(seconds=timeout)}
    dist.init_process_group(backend, store=dist.PrefixStore(f"attempt{attempt}", store), rank=rank,
                            world_size=world_size, **kwargs)


def shared_counter() -> Any:
    """An integer in shared memory that ranks started by :func:`run_local` can update (pass it in ``args``),
    e.g. to drive a progress bar in the launching process: ``with c.get_lock(): c.value += 1``."""
    return _CTX.Value("i", 0)


def _worker(fn: Callable[..., Any], rank: int, world_size: int, store_path: str, results: Any,
            args: tuple, env: dict[str, str], pg_timeout_s: float, backend: str, threads: int) -> None:
    os.environ.update(env)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=pg_timeout_s))
        ok = False
        try:
            out = fn(rank, world_size, *args)
            ok = True
        finally:
            # A rank that returns while a peer still launches rounds to it would make that peer's sends fail
            # (a gossip job's last step leaves a round in flight): nobody tears down before every rank is done.
            store.add("finished", 1)
            deadline = time.monotonic() + min(pg_timeout_s, 10.0)
            while ok and int(store.add("finished", 0)) < world_size and time.monotonic() < deadline:
                time.sleep(0.01)
            dist.destroy_process_group()
        try:
            # Pickled here, by value: the queue's own pickler would pass tensors as handles to this process's
            # shared memory, which are gone once it exits (the parent then got an EOFError with no message).
            payload = pickle.dumps(out)
        except Exception as exc:
            raise TypeError(f"rank {rank}: the function returned {type(out).__name__}, which cannot be pickled "
                            f"to send it to the launching process: {exc}") from exc
        results.put((rank, "ok", payload))
    except BaseException:  # report anything, including SystemExit, to the test process
        results.put((rank, "error", traceback.format_exc()))


def run_local(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 60.0,
              env: dict[str, str] | None = None, pg_timeout_s: float = 60.0, backend: str = "gloo",
              threads: int = 1, allow_failure: bool = False, preload: tuple[str, ...] = ()) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` local ranks; return the results by rank.

    ``fn`` must be importable by name (a module-level function) and its results picklable (tensors are sent by
    value). ``threads`` is
    each rank's ``torch.set_num_threads``. With ``allow_failure=True`` a rank that raised or died returns
    ``RankFailure(traceback or exit code)`` in its slot instead of failing the call (for tests that expect
    errors); hangs still fail.
    """
    if world_size < 1:
        raise ValueError(f"Invalid world_size={world_size}. Must be >= 1.")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"Invalid backend={backend!r}. Must be 'gloo' or 'nccl'.")
    _CTX.set_forkserver_preload(_PRELOAD + list(preload))  # takes effect when the server first starts
    fd, store_path = tempfile.mkstemp(prefix="dow-store-")
    os.close(fd)
    os.unlink(store_path)  # FileStore creates it
    results = _CTX.Queue()
    procs = [
        _CTX.Process(target=_worker, daemon=True,
                     args=(fn, r, world_size, store_path, results, args, env or {}, pg_timeout_s, backend, threads))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    out: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                rank, status, value = results.get(timeout=min(remaining, 0.5))
                out[rank] = (status, value)
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0) and i not in out]
                if dead:
                    time.sleep(0.5)  # let a dying rank's report arrive, if it sent one
                    while not results.empty():
                        rank, status, value = results.get()
                        out[rank] = (status, value)
                    dead = [i for i in dead if i not in out]
                    if dead and not allow_failure:
                        raise RankFailure(f"rank(s) {dead} died with exit codes "
                                          f"{[procs[i].exitcode for i in dead]}") from None
                    for i in dead:
                        out[i] = ("error", f"rank {i} died with exit code {procs[i].exitcode}")
    finally:
        for p in procs:
            p.join(timeout=2 if len(out) == world_size else 0)
            if p.is_alive():
                p.kill()
                p.join()
        if os.path.exists(store_path):
            os.unlink(store_path)
    missing = [r for r in range(world_size) if r not in out]
    if missing:
        reports = "".join(f"\n--- rank {r} ---\n{v}" for r, (s, v) in sorted(out.items()) if s == "error")
        raise RankFailure(f"rank(s) {missing} did not finish within {timeout}s{reports}")
    errors = {r: v for r, (s, v) in out.items() if s == "error"}
    if errors and not allow_failure:
        raise RankFailure("".join(f"\n--- rank {r} ---\n{v}" for r, v in sorted(errors.items())))
    return [RankFailure(out[r][1]) if out[r][0] == "error" else pickle.loads(out[r][1]) for r in range(world_size)]
