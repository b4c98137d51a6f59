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
        # Whole-bank reductions in float64 with one temporary per bank: a loop of per-layer
        # differences and cosine_similarity calls allocated a weight-sized tensor per call.
        generated = compose(result.templates.double(), result.coefficients.double()).flatten(1)  # (L, D)
        targets = problem.targets.reshape(len(problem.layers), -1).double()
        dots = torch.linalg.vecdot(generated, targets).tolist()
        norms = torch.linalg.vector_norm(generated, dim=1).tolist()
        refs = torch.linalg.vector_norm(targets, dim=1).tolist()
        errs = torch.linalg.vector_norm(generated.sub_(targets), dim=1).tolist()
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
