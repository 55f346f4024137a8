"""Optimizers and optimizer/scheduler factories for decentralized training.

* ``optim_fn_*``: factories in the Decent-DP form ``optim_fn(named_params) -> Optimizer`` (named_params is a
  list of ``(name, tensor)``), to use with :class:`~decent_optim_wrapper.ddp.DecentralizedDataParallel`
  or directly; hyper-parameters go through ``functools.partial``. Weight decay applies to weight matrices
  and not to biases or normalisation parameters (the conventional split).
* :class:`AccumAdam`, :class:`AccumAdamW`: Adam(W) whose moment estimates are refreshed once per
  ``accum_iter`` steps from the gradients accumulated over those steps, while every step still updates the
  parameters (Wang et al., "From Promise to Practice: Realizing High-performance Decentralized Training",
  ICLR 2025).
* :class:`DecoupledLionW`: Lion with weight decay decoupled from the learning rate's schedule, with
  per-parameter metrics.
* ``lr_scheduler_fn_cosine_with_warmup``: linear warm-up then cosine annealing.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = [
    "param_groups_with_weight_decay",
    "optim_fn_adam",
    "optim_fn_adamw",
    "optim_fn_accum_adam",
    "optim_fn_accum_adamw",
    "lr_scheduler_fn_cosine_with_warmup",
    "AccumAdam",
    "AccumAdamW",
    "DecoupledLionW",
]

NamedParams = list[tuple[str, Tensor]]

_NO_DECAY_NAMES = ("bias", "bn", "norm")


def param_groups_with_weight_decay(params: NamedParams, weight_decay: float) -> list[dict[str, Any]]:
    """Split named parameters into a decayed group (weight matrices) and an undecayed one.

    A parameter is not decayed if it has fewer than two dimensions (biases, norm scales) or its name
    contains ``bias``, ``bn`` or ``norm``. Empty groups are left out.
    """
    decay: list[Tensor] = []
    no_decay: list[Tensor] = []
    for name, p in params:
        lowered = name.lower()
        (no_decay if p.ndim < 2 or any(k in lowered for k in _NO_DECAY_NAMES) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def optim_fn_adam(params: NamedParams, lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999,
                  weight_decay: float = 1.0 / 32768, eps: float = 1e-8) -> Optimizer:
    """``torch.optim.Adam`` with L2 weight decay on weight matrices only."""
    return torch.optim.Adam(param_groups_with_weight_decay(params, weight_decay), lr=lr, betas=(beta1, beta2), eps=eps)


def optim_fn_adamw(params: NamedParams, lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999,
                   weight_decay: float = 0.1, eps: float = 1e-8) -> Optimizer:
    """``torch.optim.AdamW`` with decoupled weight decay on weight matrices only."""
    return torch.optim.AdamW(param_groups_with_weight_decay(params, weight_decay), lr=lr, betas=(beta1, beta2),
                             eps=eps)


def optim_fn_accum_adam(params: NamedParams, lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999,
                        eps: float = 1e-8, weight_decay: float = 1.0 / 32768, accum_iter: int = 4) -> Optimizer:
    """:class:`AccumAdam` with L2 weight decay on weight matrices only."""
    return AccumAdam(param_groups_with_weight_decay(params, weight_decay), lr=lr, betas=(beta1, beta2), eps=eps,
                     accum_iter=accum_iter)


def optim_fn_accum_adamw(params: NamedParams, lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999,
                         eps: float = 1e-8, weight_decay: float = 0.1, accum_iter: int = 4) -> Optimizer:
    """:class:`AccumAdamW` with decoupled weight decay on weight matrices only."""
    return AccumAdamW(param_groups_with_weight_decay(params, weight_decay), lr=lr, betas=(beta1, beta2), eps=eps,
                      accum_iter=accum_iter)


def lr_scheduler_fn_cosine_with_warmup(optimizer: Optimizer, t_max: int = 1000, t_warmup: int = 100,
                                       cosine_eta_min: float = 1e-6, warmup_decay: float = 0.01) -> LRScheduler:
    """Linear warm-up from ``warmup_decay * lr`` over ``t_warmup`` steps, then cosine annealing to
    ``cosine_eta_min`` over the remaining ``t_max - t_warmup`` steps (``t_max`` counts all steps).

    The defaults suit a short run; pass the real numbers with ``functools.partial``.
    """
    if isinstance(t_warmup, bool) or not isinstance(t_warmup, int) or t_warmup < 0:
        raise ValueError(f"Invalid t_warmup={t_warmup!r}. Must be an integer >= 0.")
    if isinstance(t_max, bool) or not isinstance(t_max, int) or t_max <= t_warmup:
        raise ValueError(f"Invalid t_max={t_max!r}. Must be an integer > t_warmup={t_warmup}.")
    if not 0.0 < warmup_decay <= 1.0:
        raise ValueError(f"Invalid warmup_decay={warmup_decay!r}. Must be in (0, 1].")
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t_max - t_warmup, eta_min=cosine_eta_min)
    if t_warmup == 0:
        return cosine
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=warmup_decay, total_iters=t_warmup)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, schedulers=[warmup, cosine], milestones=[t_warmup])


def _evaluate(closure: Callable[[], float] | None) -> float | None:
    """Run an optimizer closure with gradients enabled (step() itself runs under no_grad)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _check_hyper(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    if not 0.0 <= lr:
        raise ValueError(f"Invalid lr={lr!r}. Must be >= 0.")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"Invalid betas={betas!r}. Must be two numbers in [0, 1).")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid eps={eps!r}. Must be >= 0.")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay={weight_decay!r}. Must be >= 0.")


class AccumAdam(Optimizer):
    """Adam whose moments follow gradients accumulated over ``accum_iter`` steps; parameters move every step.

    With ``m, v`` the moments of the completed accumulation windows, ``a`` the running mean of this window's
    gradients and ``k = ceil(t / accum_iter)`` the number of windows begun, step ``t`` does::

        g   = grad (+ weight_decay * p, L2, for AccumAdam)
        a  += g / accum_iter
        m_t = beta1 * m + (1 - beta1) * g                 # look-ahead moments with the fresh gradient
        v_t = beta2 * v + (1 - beta2) * g**2
        p  -= lr / (1 - beta1**k) * m_t / (sqrt(v_t) / sqrt(1 - beta2**k) + eps)
        every accum_iter-th step: m = beta1*m + (1-beta1)*a; v = beta2*v + (1-beta2)*a**2; a = 0

    ``AccumAdamW`` instead decays the parameters, ``p *= 1 - lr * weight_decay``, before the update.
    With ``accum_iter=1`` this is Adam (AdamW). In decentralized training ``accum_iter`` is usually scaled
    with the number of workers, so that the moments see a batch as large as the global one.
    """

    _decoupled = False

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, accum_iter: int = 4) -> None:
        _check_hyper(lr, betas, eps, weight_decay)
        if isinstance(accum_iter, bool) or not isinstance(accum_iter, int) or accum_iter < 1:
            raise ValueError(f"Invalid accum_iter={accum_iter!r}. Must be an integer >= 1.")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      accum_iter=accum_iter))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = _evaluate(closure)
        for group in self.param_groups:
            params, grads, ms, vs, accs, steps = [], [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError(f"{type(self).__name__} does not support sparse gradients.")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["accum_grad"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                ms.append(state["exp_avg"])
                vs.append(state["exp_avg_sq"])
                accs.append(state["accum_grad"])
                steps.append(state["step"])
            if params:
                self._update(group, params, grads, ms, vs, accs, steps)
        return loss

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], ms: list[Tensor],
                vs: list[Tensor], accs: list[Tensor], steps: list[Tensor]) -> None:
        torch._foreach_add_(steps, 1.0)
        # Each parameter counts its own steps (as torch's Adam does): one that had no gradient on some steps
        # is behind the others, with its own bias correction and window boundary. The counts live on the CPU.
        by_step: dict[int, list[int]] = {}
        for i, s in enumerate(steps):
            by_step.setdefault(int(s.item()), []).append(i)
        for t, idx in by_step.items():
            pick = [params[i] for i in idx], [grads[i] for i in idx], [ms[i] for i in idx], [vs[i] for i in idx], \
                [accs[i] for i in idx]
            self._update_at(group, t, *pick)

    def _update_at(self, group: dict[str, Any], t: int, params: list[Tensor], grads: list[Tensor],
                   ms: list[Tensor], vs: list[Tensor], accs: list[Tensor]) -> None:
        """The update of step ``t`` for parameters that have all taken ``t`` steps."""
        lr, (beta1, beta2), eps, wd, k_iter = (group["lr"], group["betas"], group["eps"], group["weight_decay"],
                                                group["accum_iter"])
        if wd != 0:
            if self._decoupled:
                torch._foreach_mul_(params, 1.0 - lr * wd)
            else:
                grads = list(torch._foreach_add(grads, params, alpha=wd))
        torch._foreach_add_(accs, grads, alpha=1.0 / k_iter)
        windows = (t + k_iter - 1) // k_iter
        bias1 = 1.0 - beta1**windows
        bias2_sqrt = math.sqrt(1.0 - beta2**windows)
        m_t = torch._foreach_mul(ms, beta1)
        torch._foreach_add_(m_t, grads, alpha=1.0 - beta1)
        denom = torch._foreach_mul(vs, beta2)
        torch._foreach_addcmul_(denom, grads, grads, value=1.0 - beta2)
        torch._foreach_sqrt_(denom)
        torch._foreach_div_(denom, bias2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, m_t, denom, value=-lr / bias1)
        if t % k_iter == 0:  # the window is complete: refresh the moments from its accumulated gradient
            torch._foreach_mul_(ms, beta1)
            torch._foreach_add_(ms, accs, alpha=1.0 - beta1)
            torch._foreach_mul_(vs, beta2)
            torch._foreach_addcmul_(vs, accs, accs, value=1.0 - beta2)
            torch._foreach_zero_(accs)


class AccumAdamW(AccumAdam):
    """:class:`AccumAdam` with decoupled weight decay (``p *= 1 - lr * weight_decay`` each step)."""

    _decoupled = True

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, accum_iter: int = 4) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, accum_iter=accum_iter)


def _norm(t: Tensor | None) -> Tensor:
    assert t is not None  # metrics are only reported for parameters with a gradient
    return torch.linalg.vector_norm(t)


def _cosine(a: Tensor | None, b: Tensor) -> Tensor:
    assert a is not None
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)


class DecoupledLionW(Optimizer):
    """Lion (sign of an interpolated momentum) with decoupled, learning-rate-proportional weight decay.

    Per step, for each parameter ``p`` with gradient ``g`` and momentum ``m``::

        p *= 1 - (lr / initial_lr) * weight_decay      # decay follows the lr schedule, relative to the start
        p -= lr * sign(beta1 * m + (1 - beta1) * g)
        m  = beta2 * m + (1 - beta2) * g

    ``initial_lr`` is each group's lr at construction. Per-parameter metrics (norms of the moment, the
    parameter, the update and the gradient, and cosines between update/moment and gradient) come from
    :meth:`report_per_parameter_metrics`; across ranks, ``DecentOptimWrapper.reduce_metrics`` combines them
    through :meth:`pre_reduce_metrics` and :meth:`post_reduce_metrics`.
    """

    metric_functions: dict[str, Callable[[Tensor, dict[str, Tensor], Tensor], Tensor]] = {
        "l2_norm/moment": lambda p, state, step: _norm(state["exp_avg"]),
        "l2_norm/param": lambda p, state, step: _norm(p.data),
        "l2_norm/update": lambda p, state, step: _norm(step),
        "l2_norm/grad": lambda p, state, step: _norm(p.grad),
        "cosine/update_grad": lambda p, state, step: _cosine(p.grad, step),
        "cosine/moment_grad": lambda p, state, step: _cosine(p.grad, state["exp_avg"]),
    }

    def __init__(self, params: Any, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0) -> None:
        if not lr > 0.0:
            raise ValueError(f"Invalid lr={lr!r}. Must be > 0.")
        if len(betas) != 2 or not all(0.0 <= b <= 1.0 for b in betas):
            raise ValueError(f"Invalid betas={betas!r}. Must be two numbers in [0, 1].")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay={weight_decay!r}. Must be >= 0.")
        if weight_decay >= 1e-3:
            warnings.warn(
                f"DecoupledLionW with weight_decay={weight_decay}: the parameters are multiplied by "
                f"{1.0 - weight_decay} every step (at the initial lr). Decoupled decay is not scaled by lr, so "
                "values like 1e-5 to 1e-4 are usual.", UserWarning, stacklevel=2,
            )
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))
        for group in self.param_groups:
            group["initial_lr"] = group["lr"]

    @staticmethod
    def lionw(p: Tensor, grad: Tensor, exp_avg: Tensor, lr: float, initial_lr: float, wd: float, beta1: float,
              beta2: float) -> None:
        """One DecoupledLionW update of ``p`` and its momentum ``exp_avg``, in place."""
        if wd != 0:
            p.mul_(1.0 - (lr / initial_lr if initial_lr else 1.0) * wd)
        p.add_(exp_avg.lerp(grad, 1.0 - beta1).sign_(), alpha=-lr)
        exp_avg.lerp_(grad, 1.0 - beta2)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = _evaluate(closure)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None or not p.requires_grad:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                self.lionw(p, p.grad, state["exp_avg"], group["lr"], group["initial_lr"], group["weight_decay"],
                           beta1, beta2)
        return loss

    def _group_of(self, param: Tensor) -> dict[str, Any]:
        for group in self.param_groups:
            if any(p is param for p in group["params"]):
                return group
        return self.param_groups[0]

    def report_per_parameter_metrics(self, param: Tensor, name: str,
                                     optimizer_metrics: dict[str, Tensor]) -> dict[str, Tensor]:
        """Add ``{metric}/{name}`` entries for ``param`` (which must have a gradient and state)."""
        group = self._group_of(param)
        lr, wd, initial_lr = group["lr"], group["weight_decay"], group["initial_lr"]
        beta1, _ = group["betas"]
        if param in self.state and param.grad is not None:
            state = self.state[param]
            step = state["exp_avg"].clone().lerp_(param.grad, 1.0 - beta1).sign_().mul_(lr)
            step.add_(param, alpha=-wd * (lr / initial_lr if initial_lr else 1.0))
            for metric, fn in self.metric_functions.items():
                optimizer_metrics[f"{metric}/{name}"] = fn(param, state, step)
        return optimizer_metrics

    def get_metrics(self, named_parameters: Iterable[tuple[str, Tensor]] | None = None) -> dict[str, Tensor]:
        """All per-parameter metrics, named by ``named_parameters`` (else ``group{i}.param{j}``)."""
        if named_parameters is None:
            named = [(f"group{i}.param{j}", p)
                     for i, g in enumerate(self.param_groups) for j, p in enumerate(g["params"])]
        else:
            named = list(named_parameters)
        metrics: dict[str, Tensor] = {}
        for name, p in named:
            self.report_per_parameter_metrics(p, name, metrics)
        return metrics

    def pre_reduce_metrics(self, optimizer_metrics: dict[str, Tensor]) -> dict[str, Tensor]:
        """Make the metrics summable across ranks: squared norms, cosines times both norms (dot products)."""
        norms = {k: v for k, v in optimizer_metrics.items() if k.startswith("l2_norm")}
        for key in optimizer_metrics:
            if key.startswith("cosine"):
                _, vectors, name = key.split("/", 2)
                a, b = vectors.split("_")
                optimizer_metrics[key] = optimizer_metrics[key] * norms[f"l2_norm/{a}/{name}"] * \
                    norms[f"l2_norm/{b}/{name}"]
        for key, v in norms.items():
            optimizer_metrics[key] = v * v
        return optimizer_metrics

    def post_reduce_metrics(self, optimizer_metrics: dict[str, Tensor]) -> dict[str, Tensor]:
        """Undo :meth:`pre_reduce_metrics` after summing: norms and cosines of the vectors of all ranks."""
        for key in optimizer_metrics:
            if key.startswith("cosine"):
                _, vectors, name = key.split("/", 2)
                a, b = vectors.split("_")
                denom = (optimizer_metrics[f"l2_norm/{a}/{name}"] * optimizer_metrics[f"l2_norm/{b}/{name}"]).sqrt()
                optimizer_metrics[key] = optimizer_metrics[key] / denom
        for key in optimizer_metrics:
            if key.startswith("l2_norm"):
                optimizer_metrics[key] = optimizer_metrics[key].sqrt()
        return optimizer_metrics
