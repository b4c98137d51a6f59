"""Neural Mimicry: every method fits, svd is exact and optimal, reports are computed, errors are clear."""

from __future__ import annotations

import math

import pytest
import timm
import torch

from recast import ConfigError, RecastConfig, RecastModel, TaskError
from recast.bench.mimicry import problems_of
from recast.mimicry import (
    FitProblem,
    IterativeSettings,
    block_of,
    compression_curve,
    feature_fidelity,
    fidelity,
    fit,
    plot_curve,
    refine_with_data,
    registered_methods,
    weight_fidelity,
)
from recast.mimicry.encoder import CoefficientEncoder
from recast.mimicry.optimise import random_init, role_weight

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=4, embed_dim=32, num_heads=2,
        num_classes=10,
    )
    return model.eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _problems(model: torch.nn.Module, templates: int | None = 1) -> list[FitProblem]:
    return problems_of(model, RecastConfig(target="att+mlp", groups=2, templates=templates))


FAST_OPTIONS = {
    "iterative": {"steps": 150},
    "svd+iterative": {"steps": 20},
    "encoder": {"epochs": 150},
    "vae": {"epochs": 150},
}


def test_every_method_is_registered() -> None:
    assert set(registered_methods()) == {"svd", "iterative", "svd+iterative", "encoder", "vae"}


@pytest.mark.parametrize("method", ["iterative", "encoder", "vae"])
def test_trained_methods_lower_the_loss_and_beat_the_random_init(tiny, method: str) -> None:
    problems = _problems(tiny)
    results, seconds = fit(problems, method, **FAST_OPTIONS[method])
    losses = results[0].losses
    assert len(losses) == next(iter(FAST_OPTIONS[method].values())) and seconds > 0
    assert min(losses[-10:]) < losses[0]
    fitted = fidelity(problems, results)["weight_rel_error"]
    start = fidelity(problems, random_init(problems))["weight_rel_error"]
    assert fitted < 0.9 * start, (fitted, start)


def test_svd_iterative_refines_from_the_closed_form_and_never_loses_it(tiny) -> None:
    problems = _problems(tiny)
    svd = fidelity(problems, fit(problems, "svd")[0])["weight_rel_error"]
    refined = fidelity(problems, fit(problems, "svd+iterative", steps=20, lr=1e-3)[0])["weight_rel_error"]
    assert refined <= svd + 1e-6
    assert refined < fidelity(problems, random_init(problems))["weight_rel_error"]


@pytest.mark.parametrize("method", ["iterative", "svd+iterative", "encoder", "vae"])
def test_methods_run_through_from_base(tiny, method: str) -> None:
    options = {k: max(2, v // 30) for k, v in FAST_OPTIONS[method].items()}
    model = RecastModel.from_base(tiny, RecastConfig(target="mlp", groups=2, templates=1), mimicry=method, **options)
    report = model.mimicry_report
    assert report["method"] == method and report["options"] == options
    assert report["weight_rel_error"] > 0 and report["seconds"] > 0
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_svd_is_exact_at_n_equal_to_layers_per_group(tiny, images) -> None:
    model = RecastModel.from_base(tiny, RecastConfig(target="att+mlp", groups=2), mimicry="svd")
    assert model.mimicry_report["weight_cosine_min"] >= 0.99999
    assert model.mimicry_report["weight_rel_error"] < 1e-5
    with torch.no_grad():
        assert torch.allclose(model(images), tiny(images), atol=1e-5)


def test_svd_at_n1_is_no_worse_than_iterative(tiny) -> None:
    problems = _problems(tiny)
    svd = fidelity(problems, fit(problems, "svd")[0])["weight_rel_error"]
    iterative = fidelity(problems, fit(problems, "iterative", steps=100)[0])["weight_rel_error"]
    assert svd <= iterative


@pytest.mark.parametrize("n", [1, 3])
def test_svd_error_is_the_eckart_young_optimum(n) -> None:
    """With fewer templates than layers the fit's error is what the dropped singular values leave."""
    targets = torch.randn(5, 24, 16, generator=torch.Generator().manual_seed(3)) * 0.1
    problem = FitProblem(key="bank", role="fc", layers=tuple(f"l{i}" for i in range(5)), targets=targets,
                         templates=n, coef_sets=1)
    singular = torch.linalg.svdvals(targets.reshape(5, -1).double())
    optimum = math.sqrt(singular[n:].pow(2).sum() / singular.pow(2).sum())
    assert fidelity([problem], fit([problem], "svd")[0])["weight_rel_error"] == pytest.approx(optimum, rel=1e-5)


def test_svd_gives_equal_layers_one_template_and_a_zero_one() -> None:
    """A rank-deficient bank (two equal layers) is still reproduced exactly, its second template empty."""
    layer = torch.randn(1, 12, 8, generator=torch.Generator().manual_seed(4))
    problem = FitProblem(key="bank", role="fc", layers=("a", "b"), targets=layer.expand(2, 12, 8).clone(),
                         templates=2, coef_sets=1)
    result = fit([problem], "svd")[0][0]
    assert fidelity([problem], [result])["weight_rel_error"] < 1e-6
    assert result.templates[1].abs().max() < 1e-5 * result.templates[0].abs().max()
    assert torch.isfinite(result.coefficients).all()


def test_report_numbers_are_computed_not_copied(tiny) -> None:
    model = RecastModel.from_base(tiny, RecastConfig(target="att", groups=2), mimicry="svd")
    before = weight_fidelity(model, tiny)
    assert before["weight_cosine_min"] == pytest.approx(model.mimicry_report["weight_cosine_min"])
    bank = next(iter(model.banks.values()))
    with torch.no_grad():
        bank.templates[0] += torch.randn_like(bank.templates[0]) * bank.templates[0].std() * 3
    after = weight_fidelity(model, tiny)
    assert after["weight_cosine_min"] < before["weight_cosine_min"] - 0.01
    assert after["weight_rel_error"] > before["weight_rel_error"] + 0.01


def test_fidelity_measures_every_layer(tiny) -> None:
    problems = _problems(tiny, templates=None)
    results = fit(problems, "svd")[0]
    report = fidelity(problems, results)
    assert set(report["layers"]) == {name for p in problems for name in p.layers}
    results[0].coefficients[0] *= -1  # flips one layer's weight
    flipped = fidelity(problems, results)
    assert flipped["weight_cosine_min"] == pytest.approx(-1.0, abs=1e-6)


def test_unknown_method_and_bad_options_say_what_to_do(tiny) -> None:
    problems = _problems(tiny)
    with pytest.raises(ConfigError, match="unknown mimicry method 'magic'; choose one of svd, iterative"):
        fit(problems, "magic")
    with pytest.raises(ConfigError, match="bad options for mimicry method 'iterative'.*it takes: steps, lr"):
        fit(problems, "iterative", epochs=3)
    with pytest.raises(ConfigError, match="unknown mimicry method"):
        RecastModel.from_base(tiny, RecastConfig(target="att", groups=2), mimicry="pca")
    with pytest.raises(ConfigError, match="steps >= 0"):
        fit(problems, "iterative", steps=-1)


def test_paper_defaults_follow_the_targets() -> None:
    linear = [FitProblem("a", "blocks.*.mlp.fc1", ("x",), torch.zeros(1, 4, 3), 1, 2)]
    conv = [FitProblem("b", "layer1.*.conv1", ("y",), torch.zeros(1, 4, 3, 3, 3), 1, 2)]
    vit, resnet = IterativeSettings.paper(linear), IterativeSettings.paper(conv)
    assert (vit.steps, vit.lr, vit.step_size, vit.noise) == (1000, 0.1, 200, 1e-4)
    assert (resnet.steps, resnet.lr, resnet.step_size, resnet.noise) == (3000, 0.2, 500, 0.0)
    assert role_weight("blocks.*.mlp.fc2", vit.role_weights) == 2.0
    assert role_weight("blocks.*.attn.qkv", vit.role_weights) == 1.0
    assert role_weight("layer3.*.conv1", resnet.role_weights) == 3.5
    assert role_weight("layer3.*.conv2", resnet.role_weights) == 2.5


def test_random_init_is_kaiming_templates_and_unit_coefficient_sets() -> None:
    problems = [FitProblem("a", "r", ("x", "y"), torch.zeros(2, 256, 512), 3, 2)]
    (start,) = random_init(problems, seed=0)
    assert start.templates.std().item() == pytest.approx(math.sqrt(2 / 512), rel=0.05)
    assert torch.allclose(start.coefficients.norm(dim=-1), torch.ones(2, 2))


def test_iterative_fits_convolutions(tiny) -> None:
    torch.manual_seed(0)
    conv = [FitProblem("c", "layer1.*.conv1", ("a", "b"), torch.randn(2, 8, 4, 3, 3) * 0.1, 1, 2)]
    results = fit(conv, "iterative", steps=200, step_size=100)[0]
    assert results[0].losses[-1] < results[0].losses[0]
    assert fidelity(conv, results)["weight_rel_error"] < fidelity(conv, random_init(conv))["weight_rel_error"]


def test_vae_encoder_samples_and_encoder_does_not() -> None:
    weights = torch.randn(3, 20)
    mean, log_var = CoefficientEncoder(20, templates=2, coef_sets=2, variational=True)(weights)
    assert mean.shape == log_var.shape == (3, 2, 2)
    assert CoefficientEncoder(20, templates=2, coef_sets=2)(weights)[1] is None


def test_feature_fidelity_is_perfect_when_exact_and_drops_when_compressed(tiny, images) -> None:
    exact = RecastModel.from_base(tiny, RecastConfig(target="att+mlp", groups=2), mimicry="svd")
    report = feature_fidelity(exact, tiny, images)
    assert set(report["feature_cosine"]) == {f"blocks.{i}" for i in range(4)}
    assert report["feature_cosine_min"] > 0.9999 and report["top1_agreement"] == 1.0 and report["seconds"] > 0
    compressed = RecastModel.from_base(tiny, RecastConfig(target="att+mlp", groups=1, templates=1), mimicry="svd")
    assert feature_fidelity(compressed, tiny, images)["logit_cosine"] < report["logit_cosine"] - 1e-3
    assert block_of("layer2.1.conv1") == "layer2.1" and block_of("blocks.1.0.conv_pw") == "blocks.1.0"


def test_refine_with_data_matches_features_better(tiny, images) -> None:
    model = RecastModel.from_base(tiny, RecastConfig(target="att+mlp", groups=1, templates=1), mimicry="svd")
    before = feature_fidelity(model, tiny, images)["logit_cosine"]
    entry = refine_with_data(model, tiny, images, steps=30, lr=1e-3)
    assert entry["loss_last"] < entry["loss_first"]
    assert feature_fidelity(model, tiny, images)["logit_cosine"] > before
    layer = model.net.get_submodule("blocks.0.mlp.fc1")
    assert torch.equal(layer.mimicry, layer.coefficients("base"))
    assert model.mimicry_report["refine"]["steps"] == 30
    assert not any(bank.templates.requires_grad for bank in model.banks.values())
    model.add_task("other", num_classes=3)
    with pytest.raises(TaskError, match="before adding tasks"):
        refine_with_data(model, tiny, images, steps=1)


def test_compression_curve_and_plot(tiny, images, tmp_path) -> None:
    points = compression_curve(tiny, RecastConfig(target="mlp", groups=2), images=images, builder=RecastModel.from_base)
    assert [p["templates"] for p in points] == [1, 2, 3]
    assert points[0]["weight_rel_error"] > points[1]["weight_rel_error"] and points[1]["weight_cosine_min"] > 0.99999
    assert points[0]["backbone_bytes"] < points[0]["original_bytes"] < points[2]["backbone_bytes"]
    assert "top1_agreement" in points[0]
    path = plot_curve(points, tmp_path / "curve.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
