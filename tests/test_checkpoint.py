"""CheckpointManager: every rank resumes from the newest common step; a directory holding another run's
checkpoints, a changed world size and an unreadable file are clear errors on every rank."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from harness import RankFailure, run_ranks

from decent_optim_wrapper import DecentOptimWrapper
from decent_optim_wrapper.checkpoint import CheckpointManager


def _train_and_save(rank: int, world_size: int, directory: str, run_name: str | None, topology: str,
                    steps: int) -> list[int]:
    p = torch.nn.Parameter(torch.full((3,), float(rank)))
    opt = DecentOptimWrapper(torch.optim.SGD([p], lr=0.5), topology=topology)
    ckpts = CheckpointManager(directory, keep=2, run_name=run_name, optimizer=opt)
    for step in range(steps):
        p.grad = torch.full((3,), float(rank + 1))
        opt.step()
        ckpts.save(step + 1, {"optim": opt.state_dict(), "p": p.detach().clone()})
    opt.finish()
    return ckpts.steps()


def _resume(rank: int, world_size: int, directory: str, run_name: str | None, topology: str) -> str:
    p = torch.nn.Parameter(torch.zeros(3))
    opt = DecentOptimWrapper(torch.optim.SGD([p], lr=0.5), topology=topology)
    try:
        step, state = CheckpointManager(directory, keep=2, run_name=run_name, optimizer=opt).resume()
    except ValueError as exc:
        return f"ValueError: {exc}"
    if state is not None:
        opt.load_state_dict(state["optim"])
    return f"step {step}: {p.tolist()}"


def test_the_same_run_resumes_from_its_newest_common_step(tmp_path: Path) -> None:
    assert run_ranks(_train_and_save, 2, str(tmp_path), "a", "ring", 4) == [[3, 4], [3, 4]]
    got = run_ranks(_resume, 2, str(tmp_path), "a", "ring")
    saved = [torch.load(tmp_path / "step000000004" / f"rank{r}.pt", weights_only=True)["p"] for r in range(2)]
    assert got == [f"step 4: {saved[r].tolist()}" for r in range(2)]  # each rank its own parameters
    assert saved[0].tolist() != saved[1].tolist()


@pytest.mark.parametrize("theirs,ours,text", [
    (("b", "ring"), ("a", "ring"), "has run_name 'b' (this run: 'a')"),
    (("a", "ring"), ("a", "complete"), "has topology 'ring' (this run: 'complete')"),
])
def test_a_directory_with_another_runs_checkpoints_is_refused_on_every_rank(tmp_path: Path, theirs: tuple,
                                                                           ours: tuple, text: str) -> None:
    run_ranks(_train_and_save, 2, str(tmp_path), *theirs, 3)  # job B writes step 3 into the directory
    for r in run_ranks(_resume, 2, str(tmp_path), *ours):  # job A must not resume from it
        assert r.startswith(f"ValueError: {tmp_path} holds checkpoints of another run: "), r
        assert text in r and "Give every run a directory of its own." in r, r


def test_a_changed_world_size_is_named_as_such(tmp_path: Path) -> None:
    run_ranks(_train_and_save, 2, str(tmp_path), None, "ring", 2)
    for r in run_ranks(_resume, 3, str(tmp_path), None, "ring"):
        assert "was saved by 2 ranks and this run has 3: the world size changed" in r, r
        assert "keep more checkpoints" not in r


def test_an_unreadable_checkpoint_file_is_named_on_every_rank(tmp_path: Path) -> None:
    run_ranks(_train_and_save, 2, str(tmp_path), None, "ring", 2)
    bad = tmp_path / "step000000002" / "rank1.pt"
    bad.write_bytes(b"\x00garbage" * 100)
    for r in run_ranks(_resume, 2, str(tmp_path), None, "ring"):
        assert r.startswith(f"ValueError: rank 1: cannot read the checkpoint {bad}: "), r


def test_saving_into_another_runs_directory_is_refused(tmp_path: Path) -> None:
    run_ranks(_train_and_save, 2, str(tmp_path), "b", "ring", 1)
    results = run_ranks(_train_and_save, 2, str(tmp_path), "a", "ring", 1, allow_failure=True)
    for rank, r in enumerate(results):
        assert isinstance(r, RankFailure) and f"ValueError: rank {rank}: {tmp_path} holds checkpoints of another " \
            "run" in str(r), r


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="Invalid keep=0"):
        CheckpointManager("x", keep=0)
    with pytest.raises(ValueError, match="Invalid run_name=3"):
        CheckpointManager("x", run_name=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Invalid optimizer of type SGD"):
        CheckpointManager("x", optimizer=torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
