"""Iterative mimicry follows the reference release by default: coefficient noise std 1e-4, qkv templates fan_out."""

from __future__ import annotations

import math

import pytest
import torch

from recast.mimicry import FitProblem, IterativeSettings, fit
from recast.mimicry.optimise import random_init

pytestmark = pytest.mark.usefixtures("one_thread")


def _problems() -> list[FitProblem]:
    generator = torch.Generator().manual_seed(0)
    return [
        FitProblem("q", "blocks.*.attn.qkv", ("a", "b"), torch.randn(2, 192, 64, generator=generator) * 0.1, 3, 2),
        FitProblem("f", "blocks.*.mlp.fc1", ("c", "d"), torch.randn(2, 256, 64, generator=generator) * 0.1, 3, 2),
        FitProblem("c", "layer1.*.conv1", ("e", "f"), torch.randn(2, 32, 16, 3, 3, generator=generator) * 0.1, 3, 2),
    ]


def test_qkv_templates_start_with_kaiming_fan_out_and_the_rest_with_fan_in() -> None:
    qkv, fc1, conv = random_init(_problems(), seed=0)
    assert qkv.templates.std().item() == pytest.approx(math.sqrt(2 / 192), rel=0.05)  # fan_out = 3 * dim
    assert fc1.templates.std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.05)  # fan_in
    assert conv.templates.std().item() == pytest.approx(math.sqrt(2 / (16 * 9)), rel=0.05)  # fan_in = in * kh * kw
    old_qkv, *_ = random_init(_problems(), seed=0, fan_out_roles=())
    assert old_qkv.templates.std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.05)
    conv_out = random_init(_problems()[2:], seed=0, fan_out_roles=("conv1",))[0]
    assert conv_out.templates.std().item() == pytest.approx(math.sqrt(2 / (32 * 9)), rel=0.05)


def test_the_iterative_fit_starts_from_that_init_unless_told_otherwise() -> None:
    problems = _problems()[:2]
    start = fit(problems, "iterative", steps=0)[0]
    assert torch.equal(start[0].templates, random_init(problems, seed=42)[0].templates)
    fan_in = fit(problems, "iterative", steps=0, fan_out_roles=[])[0]
    assert torch.equal(fan_in[0].templates, random_init(problems, seed=42, fan_out_roles=())[0].templates)
    assert not torch.equal(fan_in[0].templates, start[0].templates)


def test_vit_coefficient_noise_defaults_to_std_1e_4_and_stays_an_option() -> None:
    assert IterativeSettings.vit().noise == 1e-4 and IterativeSettings.resnet().noise == 0.0
    problems = _problems()[:2]
    default = fit(problems, "iterative", steps=4)[0]
    explicit = fit(problems, "iterative", steps=4, noise=1e-4)[0]
    wider = fit(problems, "iterative", steps=4, noise=1e-2)[0]
    assert all(torch.equal(a.coefficients, b.coefficients) for a, b in zip(default, explicit, strict=True))
    assert default[0].losses == explicit[0].losses and default[0].losses != wider[0].losses
