"""decent-optim-wrapper 0.1.1's trajectories, bit for bit: with the defaults (max_delay=1, gossip_every=1, full
precision), the same run gives the same parameters as the PyPI release did. The oracle is 0.1.1 itself: its
parameters, written once by tests/data/trajectories_0_1_1.py from the 0.1.1 wheel (float.hex, exact)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from harness import run_ranks

DATA = Path(__file__).parent / "data"


def _run(rank: int, world_size: int, topology: str) -> dict[str, list[float]]:
    sys.path.insert(0, str(DATA))
    import trajectories_0_1_1

    return trajectories_0_1_1.run(rank, world_size, topology)


@pytest.mark.parametrize("topology", ["ring", pytest.param("complete", marks=pytest.mark.slow)])
def test_the_defaults_give_0_1_1_s_trajectory_bit_for_bit(topology: str) -> None:
    want = json.loads((DATA / "trajectories_0_1_1.json").read_text())[topology]
    got = run_ranks(_run, len(want), topology)
    for rank, (g, w) in enumerate(zip(got, want)):
        assert [float.hex(v) for v in g["local"]] == w["local"], rank  # each rank's own model after 9 steps
        assert [float.hex(v) for v in g["avg"]] == w["avg"], rank  # and the global average
    assert len({tuple(g["local"]) for g in got}) == len(got)  # the ranks differ: nothing is hidden by equality
