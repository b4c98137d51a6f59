"""The mimicry registry: every method is found by name, runs on a tiny problem, and bad names are refused."""

from __future__ import annotations

import pytest
import torch

from recast import ConfigError
from recast.mimicry import (
    FitProblem,
    FitResult,
    fidelity,
    fit,
    method_names,
    method_options,
    register_mimicry,
    registry,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_problems() -> list[FitProblem]:
    generator = torch.Generator().manual_seed(0)
    return [
        FitProblem("g0.qkv", "blocks.*.attn.qkv", ("blocks.0.attn.qkv", "blocks.1.attn.qkv"),
                   torch.randn(2, 12, 4, generator=generator) * 0.2, templates=2, coef_sets=2),
        FitProblem("g0.fc1", "blocks.*.mlp.fc1", ("blocks.0.mlp.fc1", "blocks.1.mlp.fc1", "blocks.2.mlp.fc1"),
                   torch.randn(3, 8, 4, generator=generator) * 0.2, templates=1, coef_sets=2),
    ]


def test_the_package_registers_every_method_in_order() -> None:
    assert method_names() == ("svd", "iterative", "svd+iterative", "encoder", "vae")


@pytest.mark.parametrize("method", method_names())
def test_each_registered_method_runs_on_a_tiny_problem(method: str) -> None:
    problems = _tiny_problems()
    steps = {"epochs": 3} if "epochs" in method_options(method) else {"steps": 3} if method != "svd" else {}
    results, seconds = fit(problems, method, **steps)
    assert seconds >= 0 and len(results) == len(problems)
    for problem, result in zip(problems, results, strict=True):
        layers, shape = problem.targets.shape[0], problem.targets.shape[1:]
        assert result.templates.shape == (problem.templates, *shape)
        assert result.coefficients.shape == (layers, problem.coef_sets, problem.templates)
        assert torch.isfinite(result.templates).all() and torch.isfinite(result.coefficients).all()
    report = fidelity(problems, results)
    assert set(report["layers"]) == {name for p in problems for name in p.layers}
    assert 0 <= report["weight_rel_error"] < float("inf")


def test_unknown_method_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ConfigError) as caught:
        fit(_tiny_problems(), "pca")
    message = str(caught.value)
    assert "unknown mimicry method 'pca'" in message
    assert all(name in message for name in method_names())


def test_unknown_option_is_refused_with_the_methods_options_before_running() -> None:
    with pytest.raises(ConfigError) as caught:
        fit(_tiny_problems(), "encoder", steps=3)
    message = str(caught.value)
    assert "bad options for mimicry method 'encoder'" in message
    assert all(option in message for option in method_options("encoder"))
    assert "epochs" in method_options("encoder") and "steps" not in method_options("encoder")


def test_a_new_method_registers_by_decorator_and_a_taken_name_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(registry, "_METHODS", dict(registry.registered_methods()))

    @register_mimicry("zeros")
    def fit_zeros(problems: list[FitProblem], *, seed: int = 0) -> list[FitResult]:
        del seed
        return [FitResult(torch.zeros(p.templates, *p.targets.shape[1:]),
                          torch.zeros(p.targets.shape[0], p.coef_sets, p.templates)) for p in problems]

    assert method_names()[-1] == "zeros"
    results, _ = fit(_tiny_problems(), "zeros", seed=1)
    assert fidelity(_tiny_problems(), results)["weight_rel_error"] == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="'svd' is registered twice"):
        register_mimicry("svd")(fit_zeros)
