"""run_local: N local ranks in a process group, results back by value, failures with their tracebacks."""

from __future__ import annotations

import torch
from harness import RankFailure, run_ranks


def _tensor_result(rank: int, world_size: int) -> dict:
    return {"t": torch.full((1000,), float(rank)), "nested": [torch.arange(3) * rank]}


def test_tensors_come_back_by_value_after_the_ranks_exit() -> None:
    # a tensor used to travel as a handle to the rank's shared memory, gone with the rank: EOFError, no message
    out = run_ranks(_tensor_result, 2)
    assert [r["t"][0].item() for r in out] == [0.0, 1.0]
    assert out[1]["nested"][0].tolist() == [0, 1, 2]


def _unpicklable(rank: int, world_size: int) -> object:
    return lambda: rank


def test_an_unpicklable_result_is_a_clear_error() -> None:
    out = run_ranks(_unpicklable, 2, allow_failure=True)
    assert all(isinstance(r, RankFailure) and "the function returned function, which cannot be pickled" in str(r)
               for r in out)
