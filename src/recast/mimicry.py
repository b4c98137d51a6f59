"""Neural Mimicry: fitting template banks and coefficients to pretrained weights (REFERENCE 3).

A fit works on plain tensors: each ``FitProblem`` is one (group, role) with the stacked pretrained
weights of its layers. Methods are looked up by name with ``registered_methods()``; each returns one
``FitResult`` per problem. ``fidelity`` measures any result against its targets, so every method is
reported the same way.

Methods: ``svd`` (closed form, here), ``iterative`` and ``svd+iterative`` (the paper's fit,
``recast.mimicry_iterative``), ``encoder`` and ``vae`` (weight-to-coefficient encoders,
``recast.mimicry_encoder``). Model-level tools live in ``recast.mimicry_features`` and are
re-exported here lazily: ``feature_fidelity``, ``refine_with_data``, ``weight_fidelity``,
``compression_curve``, ``plot_curve``.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from recast.bank import compose
from recast.errors import ConfigError


@dataclass
class FitProblem:
    """The pretrained weights one bank must reproduce.

    Attributes:
        key: the bank's key.
        role: module role (``blocks.*.mlp.fc1``), used for per-role loss weights.
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


FitMethod = Callable[..., list[FitResult]]


def fit_svd(problems: list[FitProblem], *, seed: int = 42, progress: bool = False) -> list[FitResult]:
    """Closed-form fit: the truncated SVD of each group's stacked weights (Eckart-Young).

    For targets ``W`` (L x D) with ``W = U S V^T``, templates ``S_n V_n^T / sqrt(L)`` and
    coefficients ``sqrt(L) U_n`` give the best rank-n fit in Frobenius norm, exact when
    ``n >= L``. Coefficients are scaled to order one so that a task's learning rate means the same
    for every bank. Templates beyond the rank are spare directions (random, orthogonal to the
    fitted ones, coefficient zero) that tasks can use to adapt.
    """
    del progress  # closed form: nothing to report while it runs
    generator = torch.Generator().manual_seed(seed)
    return [_svd_one(p, generator) for p in problems]


def _svd_one(problem: FitProblem, generator: torch.Generator) -> FitResult:
    targets = problem.targets
    layers, shape, n = targets.shape[0], targets.shape[1:], problem.templates
    flat = targets.reshape(layers, -1).to(torch.float64)  # (L, D)
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)  # (L, r), (r,), (r, D)
    rank = min(n, s.numel())
    signs = torch.where(u[:, :rank].sum(0) < 0, -1.0, 1.0).to(torch.float64)  # deterministic signs
    scale = math.sqrt(layers)
    templates = (s[:rank, None] * vh[:rank]) * signs[:, None] / scale  # (rank, D)
    coefficients = torch.zeros(layers, n, dtype=torch.float64)
    coefficients[:, :rank] = u[:, :rank] * signs * scale
    if n > rank:
        templates = torch.cat([templates, _spare_directions(vh[:rank], n - rank, flat, generator)])
    coefficients = coefficients[:, None, :].expand(layers, problem.coef_sets, n)  # (L, K, n)
    dtype = targets.dtype
    return FitResult(templates.reshape(n, *shape).to(dtype), coefficients.to(dtype).contiguous())


def _spare_directions(basis: Tensor, count: int, flat: Tensor, generator: torch.Generator) -> Tensor:
    """``count`` random unit directions orthogonal to ``basis`` rows, scaled to the RMS norm of the targets."""
    noise = torch.randn(count, flat.shape[1], generator=generator, dtype=torch.float64)
    if basis.numel():
        noise = noise - (noise @ basis.T) @ basis
    q, _ = torch.linalg.qr(noise.T)  # (D, count), orthonormal columns
    rms_norm = flat.norm(dim=1).pow(2).mean().sqrt()
    return q.T * rms_norm


def registered_methods() -> dict[str, FitMethod]:
    """Name -> fit function for every mimicry method (imported here, when asked, to keep imports light)."""
    from recast.mimicry_encoder import fit_encoder, fit_vae
    from recast.mimicry_iterative import fit_iterative, fit_svd_iterative

    return {
        "svd": fit_svd,
        "iterative": fit_iterative,
        "svd+iterative": fit_svd_iterative,
        "encoder": fit_encoder,
        "vae": fit_vae,
    }


def fit(problems: list[FitProblem], method: str = "svd", **options: Any) -> tuple[list[FitResult], float]:
    """Run a mimicry method by name; returns the results and the seconds it took."""
    methods = registered_methods()
    if method not in methods:
        raise ConfigError(f"unknown mimicry method {method!r}; choose one of {', '.join(methods)}")
    try:
        inspect.signature(methods[method]).bind(problems, **options)
    except TypeError as exc:
        allowed = [p for p in inspect.signature(methods[method]).parameters if p != "problems"]
        raise ConfigError(f"bad options for mimicry method {method!r} ({exc}); it takes: {', '.join(allowed)}") from None
    start = time.perf_counter()
    results = methods[method](problems, **options)
    return results, time.perf_counter() - start


def fidelity(problems: list[FitProblem], results: list[FitResult]) -> dict[str, Any]:
    """Per-layer and overall agreement between generated and pretrained weights.

    Returns ``weight_cosine_min``, ``weight_cosine_mean``, ``weight_rel_error`` (Frobenius norm of
    all errors over that of all targets) and ``layers`` (name -> cosine, rel_error).
    """
    per_layer: dict[str, dict[str, float]] = {}
    err_sq = ref_sq = 0.0
    for problem, result in zip(problems, results, strict=True):
        generated = compose(result.templates.double(), result.coefficients.double())  # (L, *shape)
        for name, w_hat, w in zip(problem.layers, generated, problem.targets.double(), strict=True):
            err, ref = (w_hat - w).norm().item(), w.norm().item()
            cosine = torch.nn.functional.cosine_similarity(w_hat.flatten(), w.flatten(), dim=0).item()
            per_layer[name] = {"cosine": cosine, "rel_error": err / ref if ref else float(err > 0)}
            err_sq, ref_sq = err_sq + err**2, ref_sq + ref**2
    cosines = [v["cosine"] for v in per_layer.values()]
    return {
        "weight_cosine_min": min(cosines),
        "weight_cosine_mean": sum(cosines) / len(cosines),
        "weight_rel_error": math.sqrt(err_sq / ref_sq) if ref_sq else 0.0,
        "layers": per_layer,
    }


_LAZY_EXPORTS = {
    name: "recast.mimicry_features"
    for name in ("feature_fidelity", "refine_with_data", "weight_fidelity", "compression_curve", "plot_curve")
}


def __getattr__(name: str) -> Any:
    """Model-level mimicry tools, importable from here without a circular import at load time."""
    if name in _LAZY_EXPORTS:
        import importlib

        return getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
