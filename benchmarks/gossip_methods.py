"""The benchmarks' spelling of a gossip configuration: ``<topology>[+bf16][+lowrank<R>][+delay<D>][+every<H>]``.

    one-peer-exp+lowrank1+delay2   DecentOptimWrapper(..., topology="one-peer-exp", compression=LowRank(rank=1),
                                   max_delay=2)
    ring+bf16+every4               ..., topology="ring", wire_dtype=torch.bfloat16, gossip_every=4

One parser for ``cluster_compare.py`` (which checks names before it builds a cluster), its worker and
``train_compare.py``, so a name means the same everywhere. The values themselves are validated by
``GossipConfig``, as for any user.
"""

from __future__ import annotations

import re
from typing import Any

import torch

_MODIFIER = re.compile(r"(bf16)|lowrank(\d+)|delay(\d+)|every(\d+)")
SPELLING = "<topology>[+bf16][+lowrank<R>][+delay<D>][+every<H>]"


def parse(method: str) -> tuple[str, dict[str, Any]]:
    """``(topology, keyword arguments of DecentOptimWrapper)`` for ``method``; ValueError for an unknown part."""
    from decent_optim_wrapper import LowRank, TopologyFactory

    base, *mods = method.split("+")
    if base not in TopologyFactory.available():
        raise ValueError(f"Unknown topology {base!r} in method={method!r}. Registered topologies: "
                         f"{TopologyFactory.available()}; spelling {SPELLING}.")
    kwargs: dict[str, Any] = {}
    for mod in mods:
        m = _MODIFIER.fullmatch(mod)
        if m is None:
            raise ValueError(f"Unknown part '+{mod}' in method={method!r}. Spelling: {SPELLING}.")
        bf16, r, d, h = m.groups()
        key, value = (("wire_dtype", torch.bfloat16) if bf16 else ("compression", LowRank(rank=int(r))) if r else
                      ("max_delay", int(d)) if d else ("gossip_every", int(h)))
        if key in kwargs:
            raise ValueError(f"Invalid method={method!r}: '+{mod}' repeats a setting.")
        kwargs[key] = value
    # what GossipConfig refuses (lowrank0, delay0, every0) fails here, before a cluster is built
    from decent_optim_wrapper import GossipConfig

    GossipConfig(topology=base, **kwargs)
    return base, kwargs


def period(method: str) -> int:
    """Steps from one round to the next: ``gossip_every``."""
    return int(parse(method)[1].get("gossip_every", 1))
