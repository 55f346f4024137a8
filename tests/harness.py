"""The multi-rank test harness: N gloo ranks on CPU with a hard timeout (see decent_optim_wrapper.launch)."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import pytest
import torch

from decent_optim_wrapper.launch import RankFailure, run_local

__all__ = ["RankFailure", "run_ranks", "DEVICES", "CUDA"]


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, **kwargs: Any) -> list[Any]:
    """``run_local`` with the test modules preloaded in the forkserver."""
    return run_local(fn, world_size, *args, preload=("harness",), **kwargs)


# The device variants of a test: "cuda" runs where a GPU is (several gloo ranks may share one GPU; NCCL needs
# one GPU per rank, so multi-rank NCCL is not exercised by the suite).
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here; the CUDA variants run on a "
                          "GPU machine")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a rendezvous, a lighthouse, a master)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
