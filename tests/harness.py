"""The multi-rank test harness: N gloo ranks on CPU with a hard timeout (see decent_optim_wrapper.launch)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from decent_optim_wrapper.launch import RankFailure, run_local

__all__ = ["RankFailure", "run_ranks"]


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, **kwargs: Any) -> list[Any]:
    """``run_local`` with the test modules preloaded in the forkserver."""
    return run_local(fn, world_size, *args, preload=("harness",), **kwargs)
