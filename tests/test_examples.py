"""Every example, as a user runs it (torchrun, or Lightning launching its own ranks), at 2, 3, 4 and 5 ranks:
the shards of 1,438 training digits differ in size at 3 and 5 ranks, which Join handles."""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(cmd: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(EXAMPLES)]))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=280, env=env, cwd=tmp_path)


def _torchrun(example: str, ranks: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", str(EXAMPLES / example), *args]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("ranks", [2, 3, 4, 5])
@pytest.mark.parametrize("example", ["train_digits.py", "train_decent_dp.py"])
def test_torchrun_examples_run_at_any_world_size(example: str, ranks: int, tmp_path: Path) -> None:
    proc = _run(_torchrun(example, ranks, "--epochs", "2"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    acc = float(re.findall(r"global average (\d\.\d+)", proc.stdout)[-1])
    assert acc > 0.5, proc.stdout  # two epochs on digits: well above chance (0.1)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("ranks", [2, 3, 4, 5])
def test_lightning_example_runs_at_any_world_size(ranks: int, tmp_path: Path) -> None:
    if importlib.util.find_spec("lightning") is None:  # not imported here: test_lightning checks nobody did
        pytest.skip("the Lightning example needs `uv sync --group lightning-dev`")
    proc = _run([sys.executable, str(EXAMPLES / "train_lightning.py"), "--devices", str(ranks), "--epochs", "1"],
                tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(re.findall(r"val_acc of the averaged model: (\d\.\d+)", proc.stdout)[-1]) > 0.3, proc.stdout
