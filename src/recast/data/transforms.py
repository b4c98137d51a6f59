"""Image transforms: the backbone's own input pipeline, under one of three augmentation presets.

Size, mean/std, interpolation and crop fraction come from timm's ``resolve_data_config`` on the
model (the statistics the weights were trained with). ``augment`` picks the training pipeline:

- ``"default"``: random resized crop (area 0.25-1) and horizontal flip, backbone statistics;
  evaluation resizes to ``size / crop_pct`` and centre-crops, as timm evaluates;
- ``"reference"``: what the reference release trains with: a squash resize to the input size,
  horizontal flip, ``ColorJitter(0.4, 0.4, 0.4, 0.2)``, ``RandomAffine(10 degrees, translate 0.1,
  scale 0.9-1.1)``; evaluation is the squash resize alone. Normalisation uses the reference's own
  per-dataset statistics for the datasets it names (see :data:`REFERENCE_STATISTICS`), for training
  and evaluation alike, and the backbone's statistics for any other data;
- ``"none"``: no augmentation: training uses the evaluation pipeline of ``"default"``.

Every pipeline first converts to RGB (:func:`~recast.data.decode.to_rgb`), so grey, 16-bit and
palette images work with any backbone. Each pipeline is a :class:`Pipeline` whose ``info`` says
what it does; :func:`~recast.data.open_data` records it with the splits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from timm.data import resolve_data_config
from torch import nn
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from recast.data.decode import to_rgb
from recast.errors import ConfigError

AUGMENT_PRESETS = ("default", "reference", "none")
Statistics = tuple[tuple[float, float, float], tuple[float, float, float]]
# The reference release's normalisation (mean, std) by its dataset names; None: it normalises nothing.
# Its CIFAR-100 statistics are applied to training images only there; here to evaluation too.
REFERENCE_STATISTICS: dict[str, Statistics | None] = {
    "cars": ((-0.0639, 0.0145, 0.2118), (1.2796, 1.3035, 1.3343)),
    "aircraft": ((-0.0266, 0.2407, 0.5663), (0.9745, 0.9684, 1.1040)),
    "flowers": ((0.5642, 0.7694, 0.8410), (0.2560, 0.2589, 0.2783)),
    "scenes": ((-0.0081, -0.1473, -0.1866), (1.1616, 1.1583, 1.1599)),
    "birds": ((0.0049, 0.1962, 0.1152), (1.0027, 1.0053, 1.1734)),
    "svhn": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar100": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "chars": None,
    "cifar10": None,
}
# Other names of those datasets: torchvision's, and the reference's CSV file names.
REFERENCE_ALIASES = {"stanfordcars": "cars", "fgvcaircraft": "aircraft", "aircrafts": "aircraft",
                     "flowers102": "flowers", "cub200": "birds", "mit67": "scenes", "chars74k": "chars"}


class Pipeline(T.Compose):
    """A ``torchvision`` ``Compose`` that also says what it does (``info``), for the results files."""

    def __init__(self, steps: list[Any], info: dict[str, Any]) -> None:
        super().__init__(steps)
        self.info = info


def check_augment(augment: Any) -> str:
    """``augment`` itself when it names a preset, else a ``ConfigError`` listing the presets."""
    if not isinstance(augment, str) or augment not in AUGMENT_PRESETS:
        raise ConfigError(f"unknown augmentation preset {augment!r}; use one of: {', '.join(AUGMENT_PRESETS)} "
                          "(default: random resized crop + flip; reference: the reference release's; none)")
    return augment


def data_config(model: nn.Module) -> dict[str, Any]:
    """timm's data config of ``model``: ``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``.

    A timm ViT built for a fixed image size other than its pretrained config's (``img_size=32``)
    reports its real size, taken from its patch embedding.
    """
    config = dict(resolve_data_config(model=model))
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    if img_size is not None and tuple(config["input_size"][1:]) != tuple(img_size):
        config["input_size"] = (3, *img_size)
    return config


def reference_dataset(data: str | None) -> str | None:
    """The reference release's name for the data that spec ``data`` opens, or ``None`` if it has none.

    ``torchvision:NAME:ROOT`` is known by NAME, ``csv:PATH`` by the file's stem and
    ``imagefolder:PATH`` by the folder's name (``cars``, ``flowers``, ``StanfordCars``, ...);
    built-in data is never one of the reference's datasets.
    """
    if not data:
        return None
    kind, _, rest = data.partition(":")
    if kind == "torchvision":
        name = rest.partition(":")[0]
    elif kind == "csv":
        name = Path(rest).stem
    elif kind == "imagefolder":
        name = Path(rest.rstrip("/\\")).name
    else:
        return None
    name = name.lower().replace("-", "").replace("_", "")
    name = REFERENCE_ALIASES.get(name, name)
    return name if name in REFERENCE_STATISTICS else None


def transforms_for(
    model: nn.Module, train: bool, *, augment: str = "default", hflip: float = 0.5,
    scale: tuple[float, float] = (0.25, 1.0), data: str | None = None,
) -> Pipeline:
    """The input pipeline of ``model`` under preset ``augment``: PIL image -> float tensor ``(3, H, W)``.

    ``hflip`` is the flip probability of the training pipelines (pass 0 for data where mirroring
    changes the class, like characters; the reference release flips every dataset). ``scale`` is
    the area range of the default preset's random resized crop. ``data`` (the data spec) lets the
    reference preset use the reference's statistics for the datasets it names.
    """
    augment = check_augment(augment)
    config = data_config(model)
    size = int(config["input_size"][-1])
    if augment == "reference":
        return _reference(size, train, hflip, data, (tuple(config["mean"]), tuple(config["std"])))
    interpolation = InterpolationMode(config.get("interpolation", "bilinear"))
    info: dict[str, Any] = {"augment": augment, "train": train, "size": size, "normalisation": "backbone",
                            "mean": list(config["mean"]), "std": list(config["std"])}
    steps: list[Any] = [T.Lambda(to_rgb)]
    if train and augment == "default":
        steps.append(T.RandomResizedCrop(size, scale=scale, interpolation=interpolation, antialias=True))
        if hflip > 0:
            steps.append(T.RandomHorizontalFlip(hflip))
        info.update(resize="random resized crop", crop_scale=list(scale), hflip=hflip)
    else:
        crop_pct = float(config.get("crop_pct", 1.0))
        resize = round(size / crop_pct)
        steps += [T.Resize(resize, interpolation=interpolation, antialias=True), T.CenterCrop(size)]
        info.update(resize=f"shorter side to {resize}, centre crop")
    steps += [T.ToTensor(), T.Normalize(mean=config["mean"], std=config["std"])]
    return Pipeline(steps, info)


def _reference(size: int, train: bool, hflip: float, data: str | None, backbone: Statistics) -> Pipeline:
    """The reference release's pipeline (see the module docstring); ``backbone``: statistics for other data."""
    steps: list[Any] = [T.Lambda(to_rgb), T.Resize((size, size), antialias=True)]
    info: dict[str, Any] = {"augment": "reference", "train": train, "size": size, "resize": "squash"}
    if train:
        if hflip > 0:
            steps.append(T.RandomHorizontalFlip(hflip))
        steps += [T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.2),
                  T.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1))]
        info.update(hflip=hflip, color_jitter=[0.4, 0.4, 0.4, 0.2],
                    affine={"degrees": 10, "translate": [0.1, 0.1], "scale": [0.9, 1.1]})
    steps.append(T.ToTensor())
    name = reference_dataset(data)
    statistics = REFERENCE_STATISTICS[name] if name is not None else backbone
    if name is None:
        info["normalisation"] = "backbone"
    elif statistics is None:
        info["normalisation"] = f"none (as the reference for {name})"
    else:
        info["normalisation"] = f"reference {name}"
    if statistics is not None:
        steps.append(T.Normalize(mean=statistics[0], std=statistics[1]))
        info.update(mean=list(statistics[0]), std=list(statistics[1]))
    return Pipeline(steps, info)


def describe_transform(transform: Any) -> dict[str, Any]:
    """What a transform does, for the results: a :class:`Pipeline`'s ``info``, else its type (``{}`` for none)."""
    if transform is None:
        return {}
    info = getattr(transform, "info", None)
    if isinstance(info, dict):
        return dict(info)
    return {"augment": "custom", "type": type(transform).__name__}
