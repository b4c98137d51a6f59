"""What a mimicry fit works on and returns, and how every result is measured.

A fit works on plain tensors: each ``FitProblem`` is one (group, role) with the stacked pretrained
weights of its layers; a method returns one ``FitResult`` per problem. ``fidelity`` measures any
result against its targets, so every method is reported the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from recast.bank import compose

COLUMNS_PER_PASS = 1 << 16
"""Columns of a bank's (L, D) weights taken to float64 at a time, by the fidelity report and the SVD
fit: whole float64 copies of a bank (7-42 MB for ViT-S) were faulted in afresh by most fits, the
main cost and spread of the fit's time."""


@dataclass
class FitProblem:
    """The pretrained weights one bank must reproduce.

    Attributes:
        key: the bank's key.
        role: module role (``blocks.*.mlp.fc1``), used for per-role loss weights and inits.
        layers: module names, one per row of ``targets``.
        targets: ``(L, *shape)`` pretrained weights.
        templates: n, templates in the bank.
        coef_sets: K, coefficient sets per layer.
    """

    key: str
    role: str
    layers: tuple[str, ...]
    targets: Tensor
    templates: int
    coef_sets: int


@dataclass
class FitResult:
    """A fitted bank: ``templates`` ``(n, *shape)`` and ``coefficients`` ``(L, K, n)``.

    ``losses`` is the objective per optimisation step for methods that iterate (the same joint list
    for every problem of one fit), empty for closed forms.
    """

    templates: Tensor
    coefficients: Tensor
    losses: list[float] = field(default_factory=list)


def fidelity(problems: list[FitProblem], results: list[FitResult]) -> dict[str, Any]:
    """Per-layer and overall agreement between generated and pretrained weights.

    Returns ``weight_cosine_min``, ``weight_cosine_mean``, ``weight_rel_error`` (Frobenius norm of
    all errors over that of all targets) and ``layers`` (name -> cosine, rel_error).
    """
    per_layer: dict[str, dict[str, float]] = {}
    err_sq = ref_sq = 0.0
    for problem, result in zip(problems, results, strict=True):
        dots, norms, refs, errs = _agreement(problem.targets, result).tolist()
        for name, dot, norm, ref, err in zip(problem.layers, dots, norms, refs, errs, strict=True):
            cosine = dot / max(norm * ref, 1e-12)  # cosine_similarity's eps, on the product of norms
            per_layer[name] = {"cosine": cosine, "rel_error": err / ref if ref else float(err > 0)}
            err_sq, ref_sq = err_sq + err**2, ref_sq + ref**2
    cosines = [v["cosine"] for v in per_layer.values()]
    return {
        "weight_cosine_min": min(cosines),
        "weight_cosine_mean": sum(cosines) / len(cosines),
        "weight_rel_error": math.sqrt(err_sq / ref_sq) if ref_sq else 0.0,
        "layers": per_layer,
    }


def _agreement(targets: Tensor, result: FitResult) -> Tensor:
    """``(4, L)`` float64: per layer the dot product of generated and target weight, the norm of each
    and the norm of their difference.

    Composed and compared ``COLUMNS_PER_PASS`` columns at a time.
    """
    layers = targets.shape[0]
    flat_targets = targets.reshape(layers, -1)
    flat_templates = result.templates.reshape(result.templates.shape[0], -1)
    coefficients = result.coefficients.double()
    sums = torch.zeros(4, layers, dtype=torch.float64, device=targets.device)
    for start in range(0, flat_targets.shape[1], COLUMNS_PER_PASS):
        columns = slice(start, start + COLUMNS_PER_PASS)
        generated = compose(flat_templates[:, columns].double(), coefficients)  # (L, block)
        wanted = flat_targets[:, columns].double()
        sums[0] += torch.linalg.vecdot(generated, wanted)
        sums[1] += generated.square().sum(1)
        sums[2] += wanted.square().sum(1)
        sums[3] += (generated - wanted).square().sum(1)
    return torch.cat([sums[:1], sums[1:].sqrt()])
