"""Image transforms taken from the backbone's own pretrained data config.

Size, mean/std, interpolation and crop fraction come from timm's ``resolve_data_config`` on the
model (the statistics the weights were trained with), never from per-dataset constants. Every
transform first converts to RGB, so grey and palette images work with any backbone.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode


def data_config(model: nn.Module) -> dict[str, Any]:
    """timm's data config of ``model``: ``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``.

    A timm ViT built for a fixed image size other than its pretrained config's (``img_size=32``)
    reports its real size, taken from its patch embedding.
    """
    from timm.data import resolve_data_config

    config = dict(resolve_data_config(model=model))
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    if img_size is not None and tuple(config["input_size"][1:]) != tuple(img_size):
        config["input_size"] = (3, *img_size)
    return config


def transforms_for(
    model: nn.Module, train: bool, *, hflip: float = 0.5, scale: tuple[float, float] = (0.25, 1.0)
) -> T.Compose:
    """The input pipeline of ``model``: PIL image -> normalised float tensor ``(3, H, W)``.

    Training: random resized crop (area fraction ``scale``) and horizontal flip with probability
    ``hflip`` (pass 0 for data where mirroring changes the class, like characters). Evaluation:
    resize to ``size / crop_pct`` then centre crop, as timm evaluates.
    """
    config = data_config(model)
    size = int(config["input_size"][-1])
    interpolation = InterpolationMode(config.get("interpolation", "bilinear"))
    normalise = T.Normalize(mean=config["mean"], std=config["std"])
    steps: list[Any] = [T.Lambda(_to_rgb)]
    if train:
        steps.append(T.RandomResizedCrop(size, scale=scale, interpolation=interpolation, antialias=True))
        if hflip > 0:
            steps.append(T.RandomHorizontalFlip(hflip))
    else:
        resize = round(size / float(config.get("crop_pct", 1.0)))
        steps += [T.Resize(resize, interpolation=interpolation, antialias=True), T.CenterCrop(size)]
    steps += [T.ToTensor(), normalise]
    return T.Compose(steps)


def _to_rgb(image: Any) -> Any:
    """Convert a PIL image of any mode (L, P, RGBA, ...) to RGB."""
    return image if image.mode == "RGB" else image.convert("RGB")
