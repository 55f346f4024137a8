"""Surviving a killed rank under ``torchrun --max-restarts``: the job restarts, every rank resumes from the newest
checkpoint step they all have, and the final parameters equal an undisturbed run's, bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from elastic_worker import parse, train
from harness import free_port, run_ranks

pytestmark = pytest.mark.slow  # torchrun jobs, restarted after a kill

WORKER = Path(__file__).with_name("elastic_worker.py")
ROOT = Path(__file__).resolve().parents[1]


def _torchrun(tmp: Path, name: str, *extra: str, restarts: int = 2) -> tuple[subprocess.CompletedProcess, Path]:
    out, ckpt = tmp / name / "out", tmp / name / "ckpt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "4",
           "--max-restarts", str(restarts), "--monitor-interval", "0.2", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{free_port()}", str(WORKER), "--out", str(out), "--ckpt", str(ckpt),
           *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp)
    return proc, out


def _undisturbed(rank: int, world_size: int, argv: list[str]) -> None:
    train(parse(argv))


def _final(out: Path) -> list[dict]:
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(4)]


def _workers_left(tmp: Path) -> list[str]:
    """Processes still running one of this test's workers (their command line names the test's directory)."""
    left = subprocess.run(["pgrep", "-af", str(tmp)], capture_output=True, text=True).stdout.splitlines()
    return [line for line in left if "pgrep" not in line]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("kill,flags", [("0:21", []), ("2:11", ["--finish-before-save"])],
                         ids=["rank0-round-in-flight", "rank2-no-round-in-flight"])
def test_a_killed_rank_restarts_and_finishes_bit_for_bit(tmp_path: Path, kill: str, flags: list[str]) -> None:
    # with --finish-before-save every checkpoint is taken with no round in flight (finish() also moves the next
    # gradient to the mixed parameters, so that run has its own undisturbed reference)
    # the undisturbed reference: the same training function on 4 local ranks (no torchrun needed)
    out = tmp_path / "undisturbed" / "out"
    run_ranks(_undisturbed, 4, ["--out", str(out), "--ckpt", str(tmp_path / "undisturbed" / "ckpt"), "--steps", "24",
                                "--save-every", "4", *flags], timeout=120)
    reference = _final(out)
    assert all(r["attempt"] == 0 for r in reference)
    assert not torch.equal(reference[0]["params"][0], reference[2]["params"][0])  # ring: ranks differ

    proc, out = _torchrun(tmp_path, "killed", "--steps", "24", "--save-every", "4", "--kill", kill, *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = _final(out)
    assert all(r["attempt"] == 1 for r in got)  # it did restart
    kill_step = int(kill.split(":")[1])
    assert {r["resumed_from"] for r in got} == {kill_step // 4 * 4}  # the newest checkpoint every rank has
    for rank in range(4):
        for a, b in zip(got[rank]["params"], reference[rank]["params"]):
            assert torch.equal(a, b), rank
    time.sleep(0.5)
    assert _workers_left(tmp_path) == []


@pytest.mark.timeout(300)
def test_no_common_checkpoint_is_a_clear_error_and_leaves_no_worker(tmp_path: Path) -> None:
    # rank 3's checkpoints are gone (another disk, say): the restart cannot agree on a step
    ckpt = tmp_path / "gone" / "ckpt"
    for step in (4, 8):
        d = ckpt / f"step{step:09d}"
        d.mkdir(parents=True)
        for r in range(3):
            torch.save({}, d / f"rank{r}.pt")
    proc, _ = _torchrun(tmp_path, "gone", "--steps", "12", "--save-every", "4", restarts=1)
    assert proc.returncode != 0
    assert "No checkpoint step is common to every rank" in proc.stderr
    time.sleep(0.5)
    assert _workers_left(tmp_path) == []
