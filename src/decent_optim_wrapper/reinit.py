"""Optimizer and LR-scheduler configs of the form ``{"class_path": ..., "init_args": {...}}``.

The form fine-tuning schedules use to re-initialise the optimizer (and its LR scheduler) at a phase
boundary. Configs are checked before anything is built, and building never touches the running optimizer,
so a bad config fails with a ``ValueError`` and training can go on as it was.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

__all__ = ["load_class", "validate_optimizer_config", "validate_lr_scheduler_config", "build_optimizer",
           "build_lr_scheduler"]


def load_class(class_path: Any, what: str) -> type:
    """Import ``"package.module.Class"``; a ``ValueError`` names what could not be found."""
    if not isinstance(class_path, str) or "." not in class_path:
        raise ValueError(f"Invalid {what} class_path={class_path!r}. Must be a dotted path like 'torch.optim.SGD'.")
    module_name, _, name = class_path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"Invalid {what} class_path={class_path!r}: cannot import module {module_name!r} ({exc}).") \
            from exc
    cls = getattr(module, name, None)
    if not isinstance(cls, type):
        raise ValueError(f"Invalid {what} class_path={class_path!r}: module {module_name!r} has no class {name!r}.")
    return cls


def _split(config: Any, what: str) -> tuple[str, dict[str, Any]]:
    if not isinstance(config, Mapping):
        raise ValueError(f"Invalid {what} config {config!r}. Must be a dict with 'class_path' and 'init_args'.")
    unknown = set(config) - {"class_path", "init_args"}
    if unknown:
        raise ValueError(
            f"Invalid {what} config: unknown key(s) {sorted(unknown)}; expected 'class_path' and 'init_args'."
        )
    if "class_path" not in config:
        raise ValueError(f"Invalid {what} config {dict(config)!r}: 'class_path' is missing.")
    init_args = config.get("init_args") or {}
    if not isinstance(init_args, Mapping):
        raise ValueError(f"Invalid {what} init_args={init_args!r}. Must be a dict of keyword arguments.")
    return config["class_path"], dict(init_args)


def validate_optimizer_config(config: Any) -> type[Optimizer]:
    """Check an optimizer config without building it; returns the optimizer class."""
    class_path, init_args = _split(config, "optimizer")
    cls = load_class(class_path, "optimizer")
    if not issubclass(cls, Optimizer):
        raise ValueError(f"Invalid optimizer class_path={class_path!r}: {cls.__name__} is not a torch.optim.Optimizer.")
    if "params" in init_args:
        raise ValueError(
            "Invalid optimizer init_args: 'params' comes from the wrapper's parameter groups, not the config."
        )
    # Build it once on a throw-away parameter: catches unknown or out-of-range arguments now, not mid-training.
    try:
        cls([torch.nn.Parameter(torch.zeros(1))], **init_args)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"Invalid optimizer init_args for {class_path}: {exc}") from exc
    return cls


def validate_lr_scheduler_config(config: Any) -> type:
    """Check an LR-scheduler config without building it; returns the scheduler class."""
    class_path, init_args = _split(config, "lr_scheduler")
    cls = load_class(class_path, "lr_scheduler")
    if not issubclass(cls, (LRScheduler, ReduceLROnPlateau)):
        raise ValueError(f"Invalid lr_scheduler class_path={class_path!r}: {cls.__name__} is not an LR scheduler.")
    probe = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    try:
        cls(probe, **init_args)
    except (TypeError, ValueError, KeyError) as exc:
        raise ValueError(f"Invalid lr_scheduler init_args for {class_path}: {exc}") from exc
    return cls


def build_optimizer(config: Any, param_groups: Sequence[Mapping[str, Any]],
                    init_pg_lrs: Sequence[float] | None = None) -> Optimizer:
    """A new optimizer over the parameters of ``param_groups`` (one group each), from ``config``.

    Each new group takes the config's hyper-parameters; ``init_pg_lrs`` sets each group's initial lr.
    """
    cls = validate_optimizer_config(config)
    _, init_args = _split(config, "optimizer")
    groups: list[dict[str, Any]] = [{"params": list(g["params"])} for g in param_groups]
    if init_pg_lrs is not None:
        if len(init_pg_lrs) != len(groups):
            raise ValueError(f"Invalid init_pg_lrs={list(init_pg_lrs)}: {len(init_pg_lrs)} values for "
                             f"{len(groups)} parameter groups.")
        for g, lr in zip(groups, init_pg_lrs):
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr < 0:
                raise ValueError(f"Invalid init_pg_lrs value {lr!r}. Must be a number >= 0.")
            g["lr"] = float(lr)
    try:
        return cls(groups, **init_args)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"Cannot build {cls.__name__} from init_args {init_args}: {exc}") from exc


def build_lr_scheduler(config: Any, optimizer: Optimizer) -> Any:
    """A new LR scheduler on ``optimizer`` from ``config``."""
    cls = validate_lr_scheduler_config(config)
    _, init_args = _split(config, "lr_scheduler")
    for g in optimizer.param_groups:
        g["initial_lr"] = g["lr"]  # the new schedule starts from the new optimizer's learning rates
    return cls(optimizer, **init_args)
