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

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from loguru import logger

from .comm import ProcessGroups, gather_objects

__all__ = ["CheckpointManager"]

_STEP_DIR = re.compile(r"^step(\d+)$")


class CheckpointManager:
    """Saves this rank's checkpoints under ``directory/step{N:09d}/rank{r}.pt`` (e.g. ``step000000010``) and
    resumes all ranks together.

    Next to each file, ``rank{r}.json`` records what identifies the run: the world size, ``run_name`` and, with
    ``optimizer``, its topology schedule and parameter layout. :meth:`resume` refuses a directory that holds
    checkpoints of another run (two jobs writing to one directory would overwrite each other's files), and says
    so when only the world size changed.

    Args:
        directory: shared by all ranks (each writes only its own files); created if missing. One per run.
        keep: checkpoints each rank keeps. After a crash, ranks may have run ahead of the dead one by a few
            steps (up to the topology's diameter); ``keep * save_every`` must exceed that, or no common step
            is left (a clear error says so).
        process_group: the ranks that resume together (default: the world).
        run_name: a name for the run; checkpoints saved under another name are refused.
        optimizer: the ``DecentOptimWrapper`` (or ``DecentralizedDataParallel``) being checkpointed: checkpoints
            of another topology or another model are refused too.
    """

    def __init__(self, directory: str | os.PathLike[str], keep: int = 3,
                 process_group: dist.ProcessGroup | None = None, *, run_name: str | None = None,
                 optimizer: Any = None) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"Invalid keep={keep!r}. Must be an integer >= 1.")
        if run_name is not None and not isinstance(run_name, str):
            raise ValueError(f"Invalid run_name={run_name!r}. Must be a string or None.")
        identify = getattr(optimizer, "_run_identity", None)
        if optimizer is not None and not callable(identify):
            raise ValueError(f"Invalid optimizer of type {type(optimizer).__name__}. Must be a DecentOptimWrapper or "
                             "a DecentralizedDataParallel.")
        self.directory = Path(directory)
        self.keep = keep
        self.process_group = process_group
        initialised = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(process_group) if initialised else 0
        self.world_size = dist.get_world_size(process_group) if initialised else 1
        self.identity: dict[str, Any] = {"world_size": self.world_size, "run_name": run_name,
                                         **(identify() if callable(identify) else {})}
        self._checked = False  # the directory was checked for another run's checkpoints

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
        if not self._checked:
            problem = self._another_run()
            if problem is not None:
                raise ValueError(f"rank {self.rank}: {problem}")
            self._checked = True
        path = self._file(step)
        path.parent.mkdir(parents=True, exist_ok=True)
        # the identity first: a checkpoint counts once its .pt file exists
        _write_atomically(path.with_suffix(".json"), lambda f: f.write(json.dumps(self.identity).encode()))
        _write_atomically(path, lambda f: torch.save(state, f))
        for old in self.steps()[:-self.keep]:
            for suffix in (".pt", ".json"):
                self._file(old).with_suffix(suffix).unlink(missing_ok=True)
            try:
                self._file(old).parent.rmdir()  # the last rank to drop its file removes the directory
            except OSError:
                pass
        logger.debug("rank {}: checkpoint of step {} saved to {}", self.rank, step, path)
        return path

    def resume(self, map_location: Any = None) -> tuple[int, dict[str, Any] | None]:
        """Agree with every rank on the newest step all of them have and load this rank's state of it.

        Returns ``(step, state)``, or ``(0, None)`` when no rank has a checkpoint. Collective: every rank calls
        it, and every rank raises the same ``ValueError`` if any rank finds checkpoints of another run (another
        world size, name, topology or model), some ranks have checkpoints but no step is common to all, or a
        rank's file cannot be read.
        """
        problem = self._another_run()
        self._checked = problem is None
        mine = self.steps() if problem is None else []
        everyone = self._gather((mine, problem), "comparing checkpoint steps")
        _raise_first([p for _, p in everyone])
        steps = [s for s, _ in everyone]
        common = set(steps[0]).intersection(*map(set, steps[1:]))
        if not common:
            if any(steps):
                newest = {r: (s[-1] if s else None) for r, s in enumerate(steps)}
                raise ValueError(f"No checkpoint step is common to every rank (newest by rank: {newest}); "
                                 f"keep more checkpoints (keep={self.keep}) or save more often.")
            return 0, None
        step = max(common)
        logger.debug("rank {}: resuming from step {} (this rank has {})", self.rank, step, mine)
        state, error = None, None
        try:
            state = torch.load(self._file(step), map_location=map_location, weights_only=True)
        except Exception as exc:  # a truncated or foreign file: named, on every rank
            error = f"rank {self.rank}: cannot read the checkpoint {self._file(step)}: {type(exc).__name__}: {exc}"
        _raise_first(self._gather(error, "loading checkpoints"))
        return step, state

    def _another_run(self) -> str | None:
        """Why this rank's checkpoints in the directory are not this run's, or ``None``."""
        for step in self.steps():
            meta = self._file(step).with_suffix(".json")
            if not meta.is_file():  # written before identities were recorded
                continue
            try:
                theirs = json.loads(meta.read_text())
            except (OSError, ValueError) as exc:
                return f"cannot read {meta}: {exc}"
            if not isinstance(theirs, dict):
                return f"cannot read {meta}: not a JSON object"
            differs = [k for k, v in self.identity.items() if k in theirs and theirs[k] != v]
            if not differs:
                continue
            if "world_size" in differs:
                return (f"{self._file(step)} was saved by {theirs['world_size']} ranks and this run has "
                        f"{self.world_size}: the world size changed. A run resumes on as many ranks as it had; start "
                        "a new run (in another directory) from the averaged weights instead.")
            what = ", ".join(f"{k} {theirs[k]!r} (this run: {self.identity[k]!r})" for k in differs)
            return (f"{self.directory} holds checkpoints of another run: {self._file(step)} has {what}. Give every "
                    "run a directory of its own.")
        return None

    def _gather(self, obj: Any, what: str) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        groups = ProcessGroups(self.process_group)
        return gather_objects(obj, groups.control(), None, f"rank {self.rank}: {what}")


def _raise_first(problems: list[str | None]) -> None:
    """The same ``ValueError`` on every rank for the first rank's problem, if any rank has one."""
    first = next((p for p in problems if p is not None), None)
    if first is not None:
        raise ValueError(first)


def _write_atomically(path: Path, write: Any) -> None:
    tmp = path.with_suffix(f"{path.suffix}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)  # atomic on POSIX: the file is either the old one or complete
