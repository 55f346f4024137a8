"""The package's debug log: off by default, on with ``logger.enable`` before or after the import, every line of a
rank prefixed with it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from harness import run_ranks

# Runs in a fresh interpreter: the package must not be imported before the script's own choice.
_SCRIPT = """
import sys
from loguru import logger
logger.remove()
logger.add(sys.stdout, format="{{name}}|{{message}}", level="DEBUG")
{before}
import torch
import decent_optim_wrapper
{after}
model = torch.nn.Linear(3, 2)
decent_optim_wrapper.DecentOptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
print("done")
"""


def _log(before: str = "", after: str = "") -> list[str]:
    """The lines a world-size-1 wrapper's construction logs, given what runs before and after the import."""
    out = subprocess.run([sys.executable, "-c", _SCRIPT.format(before=before, after=after)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[-1] == "done"
    return lines[:-1]


@pytest.mark.slow  # five fresh interpreters, each importing torch
def test_the_log_is_off_by_default_and_an_enable_before_the_import_survives_it() -> None:
    assert _log() == []
    expected = [
        "decent_optim_wrapper.buckets|rank 0: bucket 0: 2 params, 64 elements (0.00 MiB), torch.float32 on cpu",
        "decent_optim_wrapper.gossip|rank 0 round 0: group [0] weight 1.0",
        "decent_optim_wrapper.wrapper|rank 0/1: topology ring with period 1, 1 bucket(s)",
    ]
    assert _log(before='logger.enable("decent_optim_wrapper")') == expected
    assert _log(after='logger.enable("decent_optim_wrapper")') == expected
    # a choice for one module only: the rest of the package stays off
    assert _log(before='logger.enable("decent_optim_wrapper.wrapper")') == expected[2:]
    # an application that turned the package off keeps it off
    assert _log(before='logger.disable("decent_optim_wrapper")') == []


def _logged_lines(rank: int, world_size: int) -> list[str]:
    from loguru import logger

    from decent_optim_wrapper import DecentOptimWrapper

    lines: list[str] = []
    logger.remove()
    logger.add(lambda m: lines.append(m.record["message"]), level="DEBUG")
    logger.enable("decent_optim_wrapper")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    opt = DecentOptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), topology="complete", bucket_cap_mb=1e-4)
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    opt.finish()
    logger.disable("decent_optim_wrapper")
    return lines


def test_every_line_of_a_rank_names_it_and_groups_are_described_in_words() -> None:
    for rank, lines in enumerate(run_ranks(_logged_lines, 3)):
        assert lines and all(line.startswith(f"rank {rank}") for line in lines), lines
        assert sum(f"rank {rank}: bucket " in line for line in lines) == 4  # two weights, two biases: 4 buckets
        assert f"rank {rank}: creating the gloo process group in which ranks [0, 1, 2] exchange round stamps " \
               "(what each is doing, which round)" in lines
        assert not any("data-back" in line for line in lines)

