"""Transforms come from the backbone's own data config."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from recast.data.transforms import data_config, transforms_for


@pytest.fixture(scope="module")
def vit32() -> torch.nn.Module:
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1)


def test_vit_built_for_32px_gets_its_real_size_and_own_statistics(vit32: torch.nn.Module) -> None:
    config = data_config(vit32)
    assert tuple(config["input_size"]) == (3, 32, 32)
    assert tuple(config["mean"]) == (0.5, 0.5, 0.5)  # the pretrained config of vit_tiny
    white = transforms_for(vit32, train=False)(Image.new("RGB", (50, 40), "white"))
    assert white.shape == (3, 32, 32)
    assert torch.allclose(white, torch.ones_like(white), atol=1e-3)  # (1 - 0.5) / 0.5


def test_train_and_eval_pipelines_accept_grey_images(vit32: torch.nn.Module) -> None:
    grey = Image.new("L", (20, 20), 128)
    torch.manual_seed(0)
    for train in (True, False):
        assert transforms_for(vit32, train=train)(grey).shape == (3, 32, 32)


def test_imagenet_statistics_for_a_resnet() -> None:
    import timm

    model = timm.create_model("resnet18", pretrained=False)
    config = data_config(model)
    assert tuple(config["input_size"]) == (3, 224, 224)
    black = transforms_for(model, train=False)(Image.new("RGB", (300, 260)))
    assert black.shape == (3, 224, 224)
    assert torch.allclose(black[0], torch.full((224, 224), -0.485 / 0.229), atol=1e-4)
