"""Bad input gives a clear error on every rank, never a hang."""

from __future__ import annotations

import re

import pytest
import torch
from harness import RankFailure, run_ranks

from decent_optim_wrapper import DecentOptimWrapper, Topology


def _params() -> list[torch.nn.Parameter]:
    return list(torch.nn.Linear(3, 2).parameters())


@pytest.mark.parametrize("kwargs,msg", [
    ({"bucket_cap_mb": 0}, "Invalid bucket_cap_mb=0. Must be a number > 0."),
    ({"bucket_cap_mb": "25"}, "Invalid bucket_cap_mb='25'. Must be a number > 0."),
    ({"topology": "hypercube-of-doom"}, "Unknown topology='hypercube-of-doom'"),
    ({"topology": 3}, "Invalid topology=3. Must be a registered name"),
    ({"local_world_size": -1}, "Invalid local_world_size=-1. Must be an integer >= 1."),
    ({"world_size": 4}, "Invalid rank=None, world_size=4: torch.distributed is not initialised."),
    ({"rank": 1}, "Invalid rank=1, world_size=None: torch.distributed is not initialised."),
    ({"rank": 1.0}, "Invalid rank=1.0. Must be an int or None."),
    ({"timeout": 0}, "Invalid timeout=0. Must be a positive number of seconds, a timedelta or None."),
    ({"timeout": "10"}, "Invalid timeout='10'."),
])
def test_bad_arguments_raise_value_error(kwargs: dict, msg: str) -> None:
    with pytest.raises(ValueError, match=re.escape(msg)):
        DecentOptimWrapper(torch.optim.SGD(_params(), lr=0.1), **kwargs)


def test_not_an_optimizer() -> None:
    with pytest.raises(ValueError, match=re.escape("Invalid optimizer of type list. Must be a torch.optim.Optimizer.")):
        DecentOptimWrapper(_params())  # type: ignore[arg-type]
    inner = DecentOptimWrapper(torch.optim.SGD(_params(), lr=0.1))
    with pytest.raises(ValueError, match="already a DecentOptimWrapper"):
        DecentOptimWrapper(inner)


def test_bad_local_world_size_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "two")
    with pytest.raises(ValueError, match=re.escape("Invalid LOCAL_WORLD_SIZE='two' in the environment.")):
        DecentOptimWrapper(torch.optim.SGD(_params(), lr=0.1))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert DecentOptimWrapper(torch.optim.SGD(_params(), lr=0.1)).local_world_size == 4
    # the 0.1 README passes torch.cuda.device_count(), which is 0 on a CPU-only machine
    assert DecentOptimWrapper(torch.optim.SGD(_params(), lr=0.1), local_world_size=0).local_world_size == 4


def test_revert_without_global_avg() -> None:
    opt = DecentOptimWrapper(torch.optim.SGD(_params(), lr=0.1))
    with pytest.raises(RuntimeError, match=re.escape("revert_global_avg() has nothing to revert")):
        opt.revert_global_avg()


def test_topology_instance_for_another_rank() -> None:
    from decent_optim_wrapper import RingTopology

    with pytest.raises(ValueError, match="built for rank 0 of 4, but this is rank 0 of 1"):
        DecentOptimWrapper(torch.optim.SGD(_params(), lr=0.1), topology=RingTopology(0, 4))


class RankDependent(Topology):
    """A broken custom topology: rank 0 believes in a ring, the others in fixed pairs."""

    def assign_groups(self):
        n = self._world_size
        if self._rank == 0:
            return [[sorted([r, (r + 1) % n]) if r % 2 == 0 else sorted([r, r - 1])] for r in range(n)]
        return [[sorted([r, r ^ 1])] + [sorted([r, r ^ 1])] for r in range(n)]


class InvalidOnOneRank(Topology):
    """A broken custom topology: only rank 2 produces an invalid schedule."""

    def assign_groups(self):
        n = self._world_size
        if self._rank == 2:
            return [[[0, 1]] for _ in range(n)]
        return [[list(range(n))] for _ in range(n)]


def _construct(rank: int, world_size: int, case: str) -> str:
    model = torch.nn.Linear(4 + (1 if case == "model" and rank == 3 else 0), 2)
    kwargs = {
        "schedule": {"topology": RankDependent},
        "invalid-on-one": {"topology": InvalidOnOneRank},
        "model": {"topology": "ring"},
        "wrong-rank": {"topology": "ring", "rank": (rank + 1) % world_size if rank == 1 else rank},
        "wrong-world": {"topology": "ring", "world_size": 8 if rank == 0 else world_size},
    }[case]
    DecentOptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)
    return "constructed"


@pytest.mark.parametrize("case,msg", [
    ("schedule", "Ranks built different topology schedules"),
    ("invalid-on-one", "rank 2 failed while constructing DecentOptimWrapper: Invalid schedule"),
    ("model", "Ranks hold different parameter layouts"),
    ("wrong-rank", "rank 1 failed while constructing DecentOptimWrapper: Invalid rank=2"),
    ("wrong-world", "rank 0 failed while constructing DecentOptimWrapper: Invalid world_size=8"),
])
def test_inconsistent_ranks_all_raise_instead_of_hanging(case: str, msg: str) -> None:
    results = run_ranks(_construct, 4, case, timeout=60, allow_failure=True)
    for rank, r in enumerate(results):
        assert isinstance(r, RankFailure), f"rank {rank} constructed a wrapper from an inconsistent setup"
        text = str(r)
        assert "ValueError" in text
        local = ("Invalid rank=2" in text and case == "wrong-rank" and rank == 1) or (
            "Invalid world_size=8" in text and case == "wrong-world" and rank == 0) or (
            "Invalid schedule" in text and case == "invalid-on-one" and rank == 2)
        assert local or msg in text, text


def _not_a_member(rank: int, world_size: int) -> object:
    import torch.distributed as dist

    only_rank0 = dist.new_group([0])
    try:
        opt = DecentOptimWrapper(torch.optim.SGD(_params(), lr=0.1), process_group=only_rank0)
    except ValueError as exc:
        return str(exc)
    return opt.world_size


def test_process_group_this_rank_is_not_in() -> None:
    assert run_ranks(_not_a_member, 2) == [1, "Invalid process_group: this process is not one of its members."]


def _integer_parameter(rank: int, world_size: int) -> str:
    steps = torch.nn.Parameter(torch.zeros(3, dtype=torch.int64), requires_grad=False)  # a counter, say
    try:
        DecentOptimWrapper(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2)), steps], lr=0.1))
    except ValueError as exc:
        return str(exc)
    return "constructed"


def test_an_integer_parameter_is_refused_at_construction_on_every_rank_naming_it() -> None:
    msg = ("Invalid parameter (parameter 1 of the optimizer, counted over its param_groups) of shape (3,) and dtype "
           "torch.int64: only floating-point parameters can be averaged.")
    assert all(r.startswith(msg) for r in run_ranks(_integer_parameter, 2))
    assert _integer_parameter(0, 1).startswith(msg)  # and without a process group


def _default_timeout(rank: int, world_size: int) -> float:
    return DecentOptimWrapper(torch.optim.SGD(_params(), lr=0.1)).gossip.timeout.total_seconds()


def test_the_default_timeout_is_minutes_not_the_process_groups_half_hour() -> None:
    assert run_ranks(_default_timeout, 2, pg_timeout_s=1800) == [300.0, 300.0]
