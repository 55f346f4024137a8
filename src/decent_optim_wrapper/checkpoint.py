"""Per-rank checkpoints that survive a killed rank: every rank keeps its last few, and a restarted job resumes
from the newest step that *every* rank has.

Gossip is loosely coupled: when a rank dies, the ranks that do not depend on it this round go on for a
few steps, so at the moment of a crash the ranks' newest checkpoints are of different steps. Resuming each
rank from its own newest one would put them out of step (the round check then stops the job, correctly);
resuming all of them from the newest step they all have continues the very same trajectory, bit for bit, if
the data a rank reads depends only on (rank, step).

Recipe, under ``torchrun --max-restarts N`` (which restarts every worker when one dies)::

    from decent_optim_wrapper.checkpoint import CheckpointManager
    from decent_optim_wrapper.launch import init_distributed

    init_distributed("gloo")                      # a fresh rendezvous namespace per restart attempt
    model = ...; opt = DecentOptimWrapper(torch.optim.AdamW(model.parameters()), topology="ring")
    ckpts = CheckpointManager("ckpt", keep=3)
    start, state = ckpts.resume()                 # collective: the newest step every rank has, or (0, None)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
    for step in range(start, total_steps):
        train_one_step(step)                      # data chosen by (rank, step)
        if (step + 1) % 5 == 0:
            ckpts.save(step + 1, {"model": model.state_dict(), "optim": opt.state_dict()})
    opt.finish()
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from loguru import logger

from .comm import ProcessGroups

__all__ = ["CheckpointManager"]

_STEP_DIR = re.compile(r"^step(\d+)$")


class CheckpointManager:
    """Saves this rank's checkpoints under ``directory/step{N:09d}/rank{r}.pt`` (e.g. ``step000000010``) and
    resumes all ranks together.

    Args:
        directory: shared by all ranks (each writes only its own files); created if missing.
        keep: checkpoints each rank keeps. After a crash, ranks may have run ahead of the dead one by a few
            steps (up to the topology's diameter); ``keep * save_every`` must exceed that, or no common step
            is left (a clear error says so).
        process_group: the ranks that resume together (default: the world).
    """

    def __init__(self, directory: str | os.PathLike[str], keep: int = 3,
                 process_group: dist.ProcessGroup | None = None) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"Invalid keep={keep!r}. Must be an integer >= 1.")
        self.directory = Path(directory)
        self.keep = keep
        self.process_group = process_group
        self.rank = dist.get_rank(process_group) if dist.is_available() and dist.is_initialized() else 0

    def _file(self, step: int) -> Path:
        return self.directory / f"step{step:09d}" / f"rank{self.rank}.pt"

    def steps(self) -> list[int]:
        """The steps this rank has a complete checkpoint of, oldest first."""
        if not self.directory.is_dir():
            return []
        found = []
        for d in self.directory.iterdir():
            m = _STEP_DIR.match(d.name)
            if m and (d / f"rank{self.rank}.pt").is_file():
                found.append(int(m.group(1)))
        return sorted(found)

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write this rank's ``state`` for ``step`` atomically (a crash mid-write leaves the previous ones intact),
        then drop this rank's checkpoints older than the newest ``keep``."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"Invalid step={step!r}. Must be an integer >= 0.")
        path = self._file(step)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(state, tmp)
        os.replace(tmp, path)  # atomic on POSIX: the file is either the old one or complete
        for old in self.steps()[:-self.keep]:
            self._file(old).unlink(missing_ok=True)
            try:
                self._file(old).parent.rmdir()  # the last rank to drop its file removes the directory
            except OSError:
                pass
        logger.debug("rank {}: checkpoint of step {} saved to {}", self.rank, step, path)
        return path

    def resume(self, map_location: Any = None) -> tuple[int, dict[str, Any] | None]:
        """Agree with every rank on the newest step all of them have and load this rank's state of it.

        Returns ``(step, state)``, or ``(0, None)`` when no rank has a checkpoint. Collective: every rank calls
        it. Raises ``ValueError`` if some ranks have checkpoints but no step is common to all.
        """
        mine = self.steps()
        everyone: list[Any] = [mine]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.process_group) > 1:
            groups = ProcessGroups(self.process_group)
            everyone = [None] * groups.world_size
            dist.all_gather_object(everyone, mine, group=groups.control())
        common = set(everyone[0]).intersection(*map(set, everyone[1:]))
        if not common:
            if any(everyone):
                newest = {r: (s[-1] if s else None) for r, s in enumerate(everyone)}
                raise ValueError(f"No checkpoint step is common to every rank (newest by rank: {newest}); "
                                 f"keep more checkpoints (keep={self.keep}) or save more often.")
            return 0, None
        step = max(common)
        logger.debug("rank {}: resuming from step {} (this rank has {})", self.rank, step, mine)
        return step, torch.load(self._file(step), map_location=map_location, weights_only=True)
