"""Every example, as a user runs it (torchrun, or Lightning launching its own ranks), at 2, 3, 4 and 5 ranks:
the shards of 1,438 training digits differ in size at 3 and 5 ranks, which Join handles."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from harness import free_port

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _run(cmd: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(EXAMPLES)]))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=280, env=env, cwd=tmp_path)


def _torchrun(example: str, ranks: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{free_port()}", str(EXAMPLES / example), *args]


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


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ft_example_as_the_readme_runs_it_survives_a_kill(tmp_path: Path) -> None:
    """README's commands for examples/train_ft.py: a lighthouse, three replicas each under its own torchrun
    with --max-restarts; one replica's training process is SIGKILLed mid-run, its torchrun restarts it, it heals
    and every replica finishes the step budget with a good accuracy."""
    if importlib.util.find_spec("torchft") is None:
        pytest.skip("the torchft example needs `uv sync --group ft-dev`")
    import signal
    import time

    lighthouse_port = free_port()
    exe = Path(sys.executable).with_name("torchft_lighthouse")
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", RUST_LOG="error",
               TORCHFT_LIGHTHOUSE=f"http://127.0.0.1:{lighthouse_port}",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(EXAMPLES)]))
    procs: list[subprocess.Popen] = []
    lighthouse = subprocess.Popen([str(exe), "--min_replicas", "1", "--join_timeout_ms", "2000",
                                   "--heartbeat_timeout_ms", "2000", "--bind", f"127.0.0.1:{lighthouse_port}"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for i in range(3):
            log = open(tmp_path / f"replica{i}.log", "w")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "1",
                 "--max-restarts", "3", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
                 str(EXAMPLES / "train_ft.py"), "--steps", "3000", "--shards", "3"],
                stdout=log, stderr=subprocess.STDOUT, text=True, env=dict(env, REPLICA_GROUP_ID=str(i)), cwd=tmp_path))
        deadline = time.time() + 120
        while "step 200," not in (tmp_path / "replica0.log").read_text():
            assert time.time() < deadline and procs[0].poll() is None, (tmp_path / "replica0.log").read_text()
            time.sleep(0.1)
        worker = _children(procs[2].pid)[0]  # the training process that torchrun started
        os.kill(worker, signal.SIGKILL)
        for p in procs:
            p.wait(240)
        logs = [(tmp_path / f"replica{i}.log").read_text() for i in range(3)]
        assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(x[-3000:] for x in logs)
        for i, text in enumerate(logs):
            last = re.findall(r"replica (\d): step 3000, rank \d of (\d), accuracy (\d\.\d+)", text)
            assert last and last[-1][0] == str(i) and float(last[-1][2]) > 0.85, text[-3000:]
        assert "heals=1" in logs[2].split("step 200,")[-1] and "of 2," in logs[0], logs[2][-3000:]
    finally:
        for p in [*procs, lighthouse]:
            if p.poll() is None:
                p.kill()
            p.wait()
