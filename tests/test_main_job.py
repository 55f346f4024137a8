"""The README's main job, at a tiny size, as a user runs it: a subprocess, real data, every method."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_main_job_runs_every_method_and_writes_its_outputs(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train_compare.py"), "--workers", "2", "--steps", "30",
         "--eval-every", "10", "--no-progress", "--out", str(out)],
        capture_output=True, text=True, timeout=280, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["method"]: r for r in summary["results"]}
    assert list(rows) == ["ddp", "ring", "one-peer-exp", "complete", "ring+bf16", "one-peer-exp+bf16", "ring+lowrank4",
                          "local"]
    for method, r in rows.items():
        assert 0.3 < r["test_acc_global_avg"] <= 1.0, (method, r)  # 30 steps already beat chance (0.1)
        assert r["iter_ms"] > 0 and r["peak_rss_mib"] > 0
    assert rows["ddp"]["consensus_distance"] == 0.0
    assert rows["local"]["consensus_distance"] > rows["ring"]["consensus_distance"] > 0
    assert rows["ring"]["bytes_per_step_x_model"] == pytest.approx(1.0, abs=0.01)  # one peer, whole model
    assert rows["ring+bf16"]["bytes_per_step_x_model"] == pytest.approx(0.5, abs=0.01)  # in bfloat16
    # rank-4 factors of 64x256, 256x256 and 10x256 (alternating sides) and the biases whole: a tenth or less
    assert 0 < rows["ring+lowrank4"]["bytes_per_step_x_model"] < 0.1
    assert rows["local"]["bytes_per_step"] == 0
    with open(out / "curves.csv") as f:
        assert sum(1 for _ in csv.DictReader(f)) == 8 * 30
    for png in ("loss.png", "consensus.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "acc(avg)" in proc.stdout and "one-peer-exp" in proc.stdout
    # the legend under the table says what step ms is: waiting for and mixing a round, not overhead
    assert "step ms: the part of it spent in step(). For the gossip methods that is mostly waiting for the" \
        in proc.stdout and "not the wrapper's overhead" in proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_low_rank_gossip_reaches_the_accuracy_of_full_precision(tmp_path: Path) -> None:
    # the main job at its default size (4 workers, 400 steps): LowRank(rank=4) within 1 point of full precision
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train_compare.py"), "--methods", "ring", "ring+lowrank4",
         "--no-progress", "--out", str(out)],
        capture_output=True, text=True, timeout=380, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["method"]: r for r in json.loads((out / "summary.json").read_text())["results"]}
    full, low = rows["ring"]["test_acc_global_avg"], rows["ring+lowrank4"]["test_acc_global_avg"]
    assert abs(full - low) <= 0.01, (full, low)
    assert rows["ring+lowrank4"]["bytes_per_step_x_model"] < 0.1 * rows["ring"]["bytes_per_step_x_model"]
