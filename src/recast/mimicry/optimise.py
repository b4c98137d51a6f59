"""What the trained fits share: the random start, the weighted weight loss and the optimisation loop.

The iterative fit, the encoder fits and the data-driven refinement all run :func:`optimise`, so all
of them keep their best state and report progress the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from fnmatch import fnmatchcase

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from recast.mimicry.problem import FitProblem, FitResult

Objective = Callable[[], tuple[Tensor, float]]

FAN_OUT_ROLES: tuple[str, ...] = ("qkv",)
"""Roles whose random templates use Kaiming fan_out, as the reference release's attention bank."""


def role_matches(role: str, key: str) -> bool:
    """Whether ``key`` names ``role``: equal to it, its last part(s) (``.key``), or an fnmatch pattern."""
    return role == key or role.endswith("." + key) or fnmatchcase(role, key)


def role_weight(role: str, weights: Mapping[str, float]) -> float:
    """The loss weight of ``role`` (first matching key of ``weights``, else 1.0)."""
    for key, value in weights.items():
        if role_matches(role, key):
            return float(value)
    return 1.0


def weight_loss(generated: Tensor, targets: Tensor, weight: float) -> Tensor:
    """``weight * sum over layers of SmoothL1(W_hat, W)`` (mean over each layer's elements)."""
    per_element = F.smooth_l1_loss(generated, targets, reduction="none")  # (L, *shape)
    return weight * per_element.flatten(1).mean(dim=1).sum()


def kaiming_fan(shape: torch.Size, fan_out: bool) -> int:
    """Kaiming's fan of a weight ``(out, in, *kernel)``: ``in * kernel`` (fan_in) or ``out * kernel``."""
    receptive = math.prod(shape[2:])
    return (shape[0] if fan_out else shape[1]) * receptive


def random_init(
    problems: list[FitProblem], seed: int = 42, fan_out_roles: Iterable[str] = FAN_OUT_ROLES
) -> list[FitResult]:
    """The reference's start: Kaiming-normal templates, a random unit vector per coefficient set.

    Templates are drawn with std ``sqrt(2 / fan)``: fan_in, except roles matching ``fan_out_roles``
    (default: ``qkv``), which use fan_out as the reference's attention bank does
    (``kaiming_normal_(mode="fan_out", nonlinearity="relu")``). The reference starts each
    coefficient set with ``orthogonal_`` on an ``(n, 1)`` matrix: a random unit vector.
    """
    generator = torch.Generator().manual_seed(seed)
    fan_out_roles = tuple(fan_out_roles)
    results = []
    for p in problems:
        shape, layers, n, k = p.targets.shape[1:], p.targets.shape[0], p.templates, p.coef_sets
        fan = kaiming_fan(shape, any(role_matches(p.role, key) for key in fan_out_roles))
        templates = torch.randn(n, *shape, generator=generator) * math.sqrt(2.0 / fan)  # (n, *shape)
        coefficients = torch.randn(layers, k, n, generator=generator)  # (L, K, n)
        coefficients = coefficients / coefficients.norm(dim=-1, keepdim=True)
        results.append(FitResult(templates.to(p.targets), coefficients.to(p.targets)))  # the targets' dtype and device
    return results


def optimise(
    params: list[Tensor],
    objective: Objective,
    optimiser: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    *,
    steps: int,
    clip: float | None,
    progress: bool,
    desc: str,
) -> list[float]:
    """Run ``steps`` updates of ``objective`` and leave ``params`` at the best-scored state.

    ``objective()`` returns the loss to differentiate and a score (lower is better) of the current
    parameters; the state is scored before each update and once after the last. Returns the loss
    per step. The progress bar shows the current loss.
    """
    best_score, best = math.inf, [p.detach().clone() for p in params]
    losses: list[float] = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for _ in bar:
        loss, score = objective()
        if score < best_score:
            best_score, best = score, [p.detach().clone() for p in params]
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimiser.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4g}", best=f"{best_score:.4g}")
    with torch.no_grad():
        _, score = objective()
        if score < best_score:
            best = [p.detach().clone() for p in params]
        for param, value in zip(params, best, strict=True):
            param.copy_(value)
    return losses
