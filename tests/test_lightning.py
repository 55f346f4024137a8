"""DecentralizedStrategy in real Lightning training on 2 and 4 CPU ranks (gloo).

The runs happen in two jobs started once for this module (tests/lightning_job.py): one where Lightning forks
the ranks of each fit itself, one launched by torchrun; they run side by side, and each test checks what the
ranks recorded. Oracles: the hand-written DecentOptimWrapper loop (tests/lightning_common.py) gives the same
parameters bit for bit; world size 1 equals plain single-device Lightning; an uninterrupted run equals a
resumed one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from harness import run_ranks
from lightning_common import BATCH, CLIP, VAL, Net, make_net, reference_run, shard

from decent_optim_wrapper import LowRank

pytestmark = [
    pytest.mark.skipif(find_spec("lightning") is None or find_spec("finetuning_scheduler") is None,
                       reason="needs Lightning and Fine-Tuning Scheduler: uv sync --group lightning-dev"),
    pytest.mark.timeout(600),  # the jobs start once, in the first test that needs them
    pytest.mark.slow,  # Lightning launches its own ranks
]

TESTS = Path(__file__).parent
JOB = TESTS / "lightning_job.py"
JOB_TIMEOUT = 500


class _Job:
    def __init__(self, out: Path, argv: list[str]) -> None:
        self.out = out
        self.log = out / "job.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=TESTS.parent,
                                         env={**os.environ, "PYTHONWARNINGS": "ignore"}, start_new_session=True)

    def result(self) -> Path:
        try:
            rc = self.proc.wait(timeout=JOB_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)  # the job and the ranks it started
            self.proc.wait()
            pytest.fail(f"{JOB.name} did not finish within {JOB_TIMEOUT}s:\n{self.log.read_text()[-3000:]}")
        if rc != 0:
            pytest.fail(f"{JOB.name} failed ({rc}):\n{self.log.read_text()[-5000:]}")
        return self.out


def _references_4(rank: int, world_size: int) -> dict[str, list[float]]:
    return {"basic": reference_run(rank, world_size, "one-peer-exp", 3)}


def _references_2(rank: int, world_size: int) -> dict[str, list[float]]:
    out = {p: reference_run(rank, world_size, "ring", 2, accumulate=2, clip=CLIP, precision=p)
           for p in ("16-mixed", "bf16-mixed")}
    out["torchrun"] = reference_run(rank, world_size, "one-peer-exp", 2)
    out["slowlink"] = reference_run(rank, world_size, "ring", 2, compression=LowRank(rank=1), max_delay=2)
    return out


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Starts both jobs, then computes the hand-written references while they run."""
    fork_out, torchrun_out = tmp_path_factory.mktemp("fork"), tmp_path_factory.mktemp("torchrun")
    started = {
        "fork": _Job(fork_out, [sys.executable, str(JOB), str(fork_out), "basic", "early_stop", "fts",
                                "precision", "misc"]),
        "torchrun": _Job(torchrun_out, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                        "--nproc-per-node", "2", str(JOB), str(torchrun_out), "torchrun"]),
    }
    refs = [{**a, **b} for a, b in zip(run_ranks(_references_4, 4), run_ranks(_references_2, 2) + [{}, {}])]
    yield {**started, "refs": refs}
    for job in started.values():
        if job.proc.poll() is None:
            os.killpg(job.proc.pid, 9)
            job.proc.wait()


@pytest.fixture(scope="module")
def fork(jobs: dict[str, Any]) -> Path:
    return jobs["fork"].result()


@pytest.fixture(scope="module")
def torchrun(jobs: dict[str, Any]) -> Path:
    return jobs["torchrun"].result()


@pytest.fixture(scope="module")
def refs(jobs: dict[str, Any]) -> list[dict[str, list[float]]]:
    """By rank: the hand-written loop's final parameters for each run that has one."""
    return jobs["refs"]


def _records(out: Path, name: str, world_size: int) -> list[dict[str, Any]]:
    return [torch.load(out / f"{name}.rank{r}.pt", weights_only=True) for r in range(world_size)]


def _net_from(values: list[float]) -> Net:
    net = make_net()
    torch.nn.utils.vector_to_parameters(torch.tensor(values), net.parameters())
    return net


def _slices() -> dict[str, slice]:
    out, start = {}, 0
    for name, p in Net().named_parameters():
        out[f"net.{name}"] = slice(start, start + p.numel())
        start += p.numel()
    return out


def _val_metric(values: list[float], world_size: int) -> float:
    """The epoch's val_loss as Lightning logs it: per rank the batch-size-weighted mean over its shard, then
    the mean over ranks (sync_dist)."""
    torch.set_num_threads(1)
    net, per_rank = _net_from(values), []
    with torch.no_grad():
        for r in range(world_size):
            x, y = shard(VAL, r, world_size)
            losses = [F.mse_loss(net(x[i:i + BATCH]), y[i:i + BATCH]) * BATCH for i in range(0, len(x), BATCH)]
            per_rank.append(float(sum(losses) / len(x)))
    return sum(per_rank) / world_size


def test_training_equals_the_hand_written_loop_and_ranks_differ(fork: Path, refs: list[dict]) -> None:
    """4 ranks, one-peer-exp, 3 epochs with validation and checkpoints each epoch and a global_avg/revert in a
    callback: each rank's parameters equal those of the plain DecentOptimWrapper loop, bit for bit."""
    runs = _records(fork, "basic", 4)
    assert [r["final_local"] for r in runs] == [ref["basic"] for ref in refs]
    assert len({tuple(r["final_local"]) for r in runs}) == 4, "every rank trains its own model"
    assert [(r["round"], r["global_step"], r["is_wrapper"], r["inner"]) for r in runs] == [(12, 12, True, "AdamW")] * 4
    assert all(r["final"] == runs[0]["final"] for r in runs), "after fit every rank holds the global average"
    assert runs[0]["final"] != runs[0]["final_local"]


def test_global_avg_in_a_callback_agrees_and_reverts_exactly(fork: Path) -> None:
    runs = _records(fork, "basic", 4)
    assert len({tuple(r["probe_local"]) for r in runs}) == 4
    assert all(r["probe_avg"] == runs[0]["probe_avg"] for r in runs)
    assert all(r["probe_reverted"] == r["probe_local"] for r in runs)
    mean = torch.tensor([r["probe_local"] for r in runs]).mean(0)
    assert (torch.tensor(runs[0]["probe_avg"]) - mean).abs().max() < 1e-6


def test_validation_runs_on_the_global_average(fork: Path) -> None:
    runs = _records(fork, "basic", 4)
    for epoch in range(3):
        model = runs[0]["val_model"][epoch]
        assert all(r["val_model"][epoch] == model for r in runs), "every rank validates the same model"
        mean = torch.tensor([r["val_local"][epoch] for r in runs]).mean(0)
        assert (torch.tensor(model) - mean).abs().max() < 1e-6
        logged = runs[0]["val_loss"][epoch]
        assert logged == pytest.approx(_val_metric(model, 4), rel=1e-6, abs=0)
        own = _val_metric(runs[0]["val_local"][epoch], 4)  # what rank 0's own model would have scored
        assert abs(own - logged) > 1e-4 * logged


def test_checkpoint_holds_the_average_and_each_rank_its_own_state(fork: Path) -> None:
    runs = _records(fork, "basic", 4)
    path = fork / "basic_ckpt" / "epoch=0.ckpt"
    ckpt = torch.load(path, weights_only=True)
    net = Net()
    net.load_state_dict({k.removeprefix("net."): v for k, v in ckpt["state_dict"].items()})  # loads anywhere
    assert torch.nn.utils.parameters_to_vector(net.parameters()).tolist() == runs[0]["val_model"][0]
    assert "decent_optim_wrapper" not in ckpt["optimizer_states"][0], "a plain optimizer state, rank 0's"
    assert ckpt["decentralized_strategy"] == {"world_size": 4, "rank_files": True, "topology": "one-peer-exp"}
    for r in range(4):
        own = torch.load(f"{path}.rank{r}.pt", weights_only=True)
        net.load_state_dict({k.removeprefix("net."): v for k, v in own["state_dict"].items()})
        assert torch.nn.utils.parameters_to_vector(net.parameters()).tolist() == runs[r]["val_local"][0]
        assert own["optimizer_states"][0]["decent_optim_wrapper"]["round"] == 4


def test_resume_continues_the_same_trajectory(fork: Path) -> None:
    full, resumed = _records(fork, "basic", 4), _records(fork, "resumed", 4)
    assert [r["final_local"] for r in resumed] == [r["final_local"] for r in full]
    assert [r["round"] for r in resumed] == [12] * 4
    assert "saved by 4 ranks, this run has 2" in (fork / "resume_ws2.error.txt").read_text()
    missing = (fork / "resume_missing.error.txt").read_text()
    assert "rank 3's own state" in missing and "epoch=0.ckpt.rank3.pt is missing" in missing


def test_early_stopping_on_a_metric_only_one_rank_sees(fork: Path) -> None:
    """EarlyStopping and ModelCheckpoint decide at train-epoch end, with a gossip round in flight; only rank 1's
    metric gets worse (epoch 1): every rank stops after that same epoch, having taken the same rounds."""
    runs = _records(fork, "early_stop", 4)
    assert [(r["epoch"], r["global_step"], r["round"]) for r in runs] == [(2, 8, 8)] * 4  # of max_epochs=5
    assert all(r["final"] == runs[0]["final"] for r in runs)
    saved = sorted(p.name for p in (fork / "early_stop_ckpt").iterdir())
    assert saved == ["epoch=0-step=4.ckpt"] + [f"epoch=0-step=4.ckpt.rank{r}.pt" for r in range(4)]


def test_fine_tuning_scheduler_phases_reinit_and_thawed_parameters_averaged(fork: Path) -> None:
    """Three phases (head; body.2 with SGD; body.0 with AdamW again), restore_best at each boundary (the best
    checkpoint stays phase 0's, so the second restore meets fewer buckets than the wrapper holds). With the
    complete topology, what step() starts from (the round just applied) is the same on every rank for every
    parameter that is averaged, while after the local update the ranks differ."""
    runs = _records(fork, "fts", 4)
    epochs = runs[0]["epochs"]
    assert all(r["epochs"] == epochs for r in runs)
    assert [(e["depth"], e["inner"], e["round"], e["is_wrapper"]) for e in epochs] == [
        (0, "AdamW", 0, True), (1, "SGD", 4, True), (2, "AdamW", 8, True), (2, "AdamW", 12, True)]
    assert [len(e["trainable"]) for e in epochs] == [2, 4, 6, 6]
    slices = _slices()
    names = list(slices)
    for step in range(16):
        trainable = [n for n, t in zip(names, runs[0]["trainable"][step]) if t]
        for name in trainable:
            sl = slices[name]
            pre = {tuple(r["pre"][step][sl]) for r in runs}
            post = {tuple(r["post"][step][sl]) for r in runs}
            assert len(pre) == 1, f"{name} is not averaged before step {step}"
            assert len(post) == 4, f"{name} did not train locally at step {step}"
    assert set(trainable) == set(names), "in the last phase everything trains"
    assert [r["round"] for r in runs] == [16] * 4 and runs[0]["inner"] == "AdamW"
    assert all(r["final"] == runs[0]["final"] for r in runs)


def test_fine_tuning_scheduler_resume_in_a_later_phase(fork: Path) -> None:
    """Resuming (fit(ckpt_path=last.ckpt)) in phase 1: FTS sets phase 1's parameter groups before Lightning
    restores the optimizer; they are bucketed as in the saved run, the state loads, and with the complete
    topology every trained parameter is the same on both ranks before each step (averaged every round)."""
    half, resumed = _records(fork, "fts_half", 2), _records(fork, "fts_resumed", 2)
    first = resumed[0]["epochs"][0]
    assert (first["depth"], first["round"], len(first["trainable"])) == (1, 8, 4)
    assert [e["depth"] for e in resumed[0]["epochs"]][-1] == 2 and resumed[0]["round"] == 24
    assert half[0]["round"] == 16
    for step in range(len(resumed[0]["pre"])):
        assert resumed[0]["pre"][step] == resumed[1]["pre"][step]
        assert resumed[0]["post"][step] != resumed[1]["post"][step]
    assert resumed[0]["final"] == resumed[1]["final"]


def test_mixed_precision_clipping_and_accumulation(fork: Path, refs: list[dict]) -> None:
    """16-mixed (GradScaler), bf16-mixed, gradient_clip_val and accumulate_grad_batches through Lightning's flags
    on 2 ranks equal the hand-written loop; at world size 1 the strategy equals plain single-device Lightning."""
    for name, precision in (("fp16", "16-mixed"), ("bf16", "bf16-mixed")):
        runs = _records(fork, name, 2)
        assert [r["final_local"] for r in runs] == [ref[precision] for ref in refs[:2]], name
        assert runs[0]["final_local"] != runs[1]["final_local"] and [r["round"] for r in runs] == [8, 8]
    # the GradScaler state sits where Lightning's MixedPrecision keeps it, rank 0's in the checkpoint, each
    # rank's own in its file
    ckpt = fork / "fp16" / "checkpoints" / "epoch=1-step=8.ckpt"
    assert "scale" in torch.load(ckpt, weights_only=True)["MixedPrecision"]
    assert all("scale" in torch.load(f"{ckpt}.rank{r}.pt", weights_only=True)["MixedPrecision"] for r in range(2))
    ws1, single = _records(fork, "ws1", 1)[0], _records(fork, "single", 1)[0]
    assert ws1["final_local"] == single["final_local"] and ws1["global_step"] == single["global_step"] == 16
    assert ws1["is_wrapper"] and not single["is_wrapper"]


def test_arguments_registry_and_a_wrapper_from_configure_optimizers(fork: Path) -> None:
    assert (fork / "args.txt").read_text().splitlines() == [
        "Unknown topology='nope'. Registered topologies: ['alternating-exp-ring', 'complete', 'one-peer-exp', "
        "'ring', 'torus'].",
        "Invalid bucket_cap_mb=0. Must be a number > 0.",
        "Invalid timeout=-1. Must be a positive number of seconds, a timedelta or None.",
        "Invalid check_rounds=1. Must be True or False.",
    ]
    assert (fork / "registry.txt").read_text() == "DecentralizedStrategy"
    assert [(fork / f"own_wrapper.rank{r}.txt").read_text() for r in range(2)] == ["True", "True"]


def test_low_rank_gossip_with_rounds_that_span_steps_under_lightning(fork: Path, refs: list[dict]) -> None:
    """DecentralizedStrategy(compression=LowRank(rank=1), max_delay=2): the plain wrapper's loop, bit for bit."""
    runs = _records(fork, "slowlink", 2)
    assert [r["final_local"] for r in runs] == [ref["slowlink"] for ref in refs[:2]]
    assert runs[0]["final_local"] != runs[1]["final_local"]


def test_torchrun_launch_checkpoint_resume_and_a_clean_exit(torchrun: Path, refs: list[dict]) -> None:
    full, resumed = _records(torchrun, "torchrun", 2), _records(torchrun, "torchrun_resumed", 2)
    assert [r["final_local"] for r in full] == [ref["torchrun"] for ref in refs[:2]]
    assert [r["final_local"] for r in resumed] == [r["final_local"] for r in full]
    assert full[0]["final_local"] != full[1]["final_local"]
    assert all(r["final"] == full[0]["final"] for r in full + resumed)
    # The job ended on all_reduces; Lightning created the gloo group, and the strategy destroyed it before the
    # interpreter's shutdown (the job's exit code 0 is checked by the fixture too).
    assert [(torchrun / f"torchrun.exit.rank{r}.txt").read_text() for r in range(2)] == ["destroyed"] * 2
