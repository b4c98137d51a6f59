"""Transforms come from the backbone's own data config, under the default, reference and none presets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from recast.data import open_data
from recast.data.transforms import (
    AUGMENT_PRESETS,
    REFERENCE_STATISTICS,
    check_augment,
    data_config,
    reference_dataset,
    transforms_for,
)
from recast.errors import ConfigError


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


def test_every_pipeline_accepts_grey_sixteen_bit_and_transparent_images(vit32: torch.nn.Module) -> None:
    images = [Image.new("L", (20, 20), 128), Image.new("I;16", (20, 20), 40000), Image.new("LA", (9, 7), (3, 0))]
    torch.manual_seed(0)
    for preset in AUGMENT_PRESETS:
        for train in (True, False):
            pipeline = transforms_for(vit32, train=train, augment=preset)
            assert all(pipeline(image).shape == (3, 32, 32) for image in images)
    evaluation = transforms_for(vit32, train=False)
    assert torch.allclose(evaluation(images[1]), torch.full((3, 32, 32), (156 / 255 - 0.5) / 0.5), atol=1e-3)
    assert torch.allclose(evaluation(images[2]), torch.ones(3, 32, 32), atol=1e-3)  # transparent -> white


def test_imagenet_statistics_for_a_resnet() -> None:
    import timm

    model = timm.create_model("resnet18", pretrained=False)
    config = data_config(model)
    assert tuple(config["input_size"]) == (3, 224, 224)
    black = transforms_for(model, train=False)(Image.new("RGB", (300, 260)))
    assert black.shape == (3, 224, 224)
    assert torch.allclose(black[0], torch.full((224, 224), -0.485 / 0.229), atol=1e-4)


def test_unknown_preset_is_refused_in_one_place(vit32: torch.nn.Module) -> None:
    for bad in ("Reference", "", None, True):
        with pytest.raises(ConfigError, match=r"unknown augmentation preset .*default, reference, none"):
            transforms_for(vit32, train=True, augment=bad)
    assert [check_augment(p) for p in AUGMENT_PRESETS] == ["default", "reference", "none"]


def test_reference_preset_squashes_and_augments_as_the_reference(vit32: torch.nn.Module) -> None:
    stripes = Image.new("RGB", (60, 20), (255, 0, 0))
    stripes.paste((0, 0, 255), (40, 0, 60, 20))
    evaluation = transforms_for(vit32, train=False, augment="reference")
    out = evaluation(stripes)  # the whole image squashed to 32 x 32: nothing cropped
    assert out.shape == (3, 32, 32)
    assert torch.allclose(out[:, :, 1], torch.tensor([1.0, -1.0, -1.0])[:, None].expand(3, 32), atol=1e-3)
    assert torch.allclose(out[:, :, 30], torch.tensor([-1.0, -1.0, 1.0])[:, None].expand(3, 32), atol=1e-3)
    assert evaluation.info["normalisation"] == "backbone" and evaluation.info["resize"] == "squash"
    train = transforms_for(vit32, train=True, augment="reference")
    steps = {type(step).__name__: step for step in train.transforms}
    jitter, affine = steps["ColorJitter"], steps["RandomAffine"]
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == ((0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.2, 0.2))
    assert (affine.degrees, affine.translate, affine.scale) == ([-10.0, 10.0], (0.1, 0.1), (0.9, 1.1))
    assert steps["RandomHorizontalFlip"].p == 0.5 and "RandomResizedCrop" not in steps
    torch.manual_seed(0)
    first, second = train(stripes), train(stripes)
    assert first.shape == (3, 32, 32) and not torch.equal(first, second)


def test_reference_statistics_follow_the_data(vit32: torch.nn.Module) -> None:
    white = Image.new("RGB", (32, 32), "white")
    flowers = transforms_for(vit32, train=False, augment="reference", data="torchvision:Flowers102:/data")
    mean, std = REFERENCE_STATISTICS["flowers"]
    expected = torch.tensor([(1 - m) / s for m, s in zip(mean, std, strict=True)])
    assert torch.allclose(flowers(white)[:, 5, 5], expected, atol=1e-4)
    assert flowers.info["normalisation"] == "reference flowers"
    chars = transforms_for(vit32, train=True, augment="reference", data="csv:/lists/chars.csv", hflip=0.0)
    assert chars.info["normalisation"] == "none (as the reference for chars)"
    assert not any(isinstance(step, T.Normalize | T.RandomHorizontalFlip) for step in chars.transforms)
    assert torch.allclose(transforms_for(vit32, train=False, augment="reference", data="csv:/lists/chars.csv")(white),
                          torch.ones(3, 32, 32))
    assert [reference_dataset(s) for s in ("imagefolder:/x/StanfordCars/", "torchvision:CIFAR10:/r", "builtin:chars",
                                           "csv:/x/aircrafts.csv", "imagefolder:/x/pets", None)] == [
        "cars", "cifar10", None, "aircraft", None, None]


def test_none_preset_trains_on_the_evaluation_pipeline(vit32: torch.nn.Module) -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    plain = transforms_for(vit32, train=True, augment="none")
    assert torch.equal(plain(image), transforms_for(vit32, train=False)(image))
    assert torch.equal(plain(image), plain(image))
    assert plain.info["augment"] == "none" and transforms_for(vit32, True).info["resize"] == "random resized crop"


def test_open_data_records_the_preset(vit32: torch.nn.Module, image_folder) -> None:
    for preset in AUGMENT_PRESETS:
        splits = open_data(f"imagefolder:{image_folder}", train_transform=transforms_for(vit32, True, augment=preset),
                           eval_transform=transforms_for(vit32, False, augment=preset), input_shape=(3, 32, 32))
        info = splits.split_info
        assert info["augment"] == preset and info["transforms"]["train"]["augment"] == preset
        assert info["transforms"]["eval"]["train"] is False and splits.train[0][0].shape == (3, 32, 32)
    assert open_data(f"imagefolder:{image_folder}").split_info["augment"] == "none (PIL images)"
    custom = open_data(f"imagefolder:{image_folder}", train_transform=T.ToTensor())
    assert custom.split_info["augment"] == "custom"
