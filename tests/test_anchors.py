"""The slow-link anchors of benchmarks/cluster_compare.py (benchmarks/anchors.py): names and DiLoCo's outer step."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from harness import run_ranks

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import anchors  # noqa: E402  (benchmarks/ is not a package)
import cluster_compare  # noqa: E402
import gossip_methods  # noqa: E402

from decent_optim_wrapper import LowRank  # noqa: E402


def test_anchor_names_parse_with_their_defaults_and_bad_ones_are_refused() -> None:
    a = anchors.parse("ddp-powersgd-r4-s20+bf16")
    assert a == anchors.Anchor("powersgd", 4, warmup=20, bf16=True) and a.period == 1
    a = anchors.parse("ddp-powersgd-r1")
    assert a is not None and a.resolve(200, "mlp").warmup == anchors.MLP_POWERSGD_START
    assert a.resolve(240, "lm").warmup == 24 and a.resolve(6, "lm").warmup == 2  # 10%, at least 2
    assert a.resolve(200, "mlp") == a.resolve(100, "mlp") and a.warmup is None
    a = anchors.parse("localsgd-8")
    assert a is not None and a.period == 8 and a.resolve(240, "lm").warmup == 24
    assert a.resolve(200, "mlp").warmup == anchors.MLP_LOCALSGD_WARMUP
    assert anchors.parse("localsgd-8-w5").resolve(240, "lm").warmup == 5  # given: kept
    a = anchors.parse("diloco-16")
    assert a.resolve(200, "mlp").lr == anchors.MLP_DILOCO_INNER_LR and a.resolve(240, "lm").lr is None
    assert anchors.parse("diloco-16-own").resolve(200, "mlp").lr is None  # the workload's optimizer, its lr
    assert anchors.parse("diloco-8-lr1e-3-olr0.3") == anchors.Anchor("diloco", 8, lr=1e-3, outer_lr=0.3)
    assert anchors.parse("localsgd-16-w0") == anchors.Anchor("localsgd", 16, warmup=0)
    assert anchors.parse("diloco-16-lr3e-4") == anchors.Anchor("diloco", 16, lr=3e-4)
    for other in ("ddp", "ring", "one-peer-exp+bf16", "local", "ddp-powersgd-r0", "localsgd-8+bf16", "diloco-"):
        assert anchors.parse(other) is None, other
    with pytest.raises(ValueError, match="-s2 or more"):
        anchors.parse("ddp-powersgd-r1-s1")
    cluster_compare.check_method("diloco-16")
    with pytest.raises(ValueError, match="anchor"):
        cluster_compare.check_method("localsgd-x")


def test_gossip_method_names_spell_the_wrapper_s_arguments() -> None:
    assert gossip_methods.parse("one-peer-exp+lowrank1+delay2") == (
        "one-peer-exp", {"compression": LowRank(rank=1), "max_delay": 2})
    assert gossip_methods.parse("ring+bf16+every4") == ("ring", {"wire_dtype": torch.bfloat16, "gossip_every": 4})
    assert gossip_methods.parse("torus") == ("torus", {}) and gossip_methods.period("ring+every8+delay2") == 8
    for bad, msg in [("ring+lowrank0", "Invalid rank=0"), ("ring+delay0", "Invalid max_delay=0"),
                     ("ring+every0", "Invalid gossip_every=0"), ("ring+fp8", "Unknown part '[+]fp8'"),
                     ("ring+delay2+delay3", "repeats"), ("mesh+bf16", "Unknown topology 'mesh'")]:
        with pytest.raises(ValueError, match=msg):
            gossip_methods.parse(bad)
    cluster_compare.check_method("one-peer-exp+lowrank1+delay2")
    with pytest.raises(ValueError, match="Unknown method='mesh'"):
        cluster_compare.check_method("mesh")


def _diloco_two_syncs(rank: int, world_size: int) -> list[list[float]]:
    # One parameter of four elements; rank r's loss (r + 1) * sum(p) gives the gradient r + 1 everywhere, so
    # after two plain SGD steps (lr 0.1) rank r has moved by 0.2 (r + 1) and the averaged pseudo-gradient is 0.3.
    p = torch.nn.Parameter(torch.zeros(4))
    inner = torch.optim.SGD([p], lr=0.1)
    opt = anchors.DiLoCo(inner, [p], sync_every=2)
    after = []
    for step in range(4):
        opt.zero_grad()
        ((rank + 1) * p.sum()).backward()
        opt.step()
        if step % 2 == 1:
            after.append(p.detach().clone().tolist())
    assert opt.syncs == 2
    return after


def test_diloco_steps_the_global_parameters_with_outer_nesterov_on_the_averaged_pseudo_gradient() -> None:
    # Nesterov SGD (lr 0.7, momentum 0.9) on the pseudo-gradient g = 0.3 twice: the buffer is g, then 0.9 g + g;
    # each step moves by lr * (g + 0.9 * buffer).
    lr, m, g = anchors.DILOCO_OUTER_LR, anchors.DILOCO_OUTER_MOMENTUM, 0.3
    first = -lr * (g + m * g)
    second = first - lr * (g + m * (m * g + g))
    for after in run_ranks(_diloco_two_syncs, 2):
        assert after[0] == pytest.approx([first] * 4, abs=1e-6)
        assert after[1] == pytest.approx([second] * 4, abs=1e-6)
