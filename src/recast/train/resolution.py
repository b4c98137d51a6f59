"""Input resolution as an option: set the model's input size, and the transforms follow.

The transforms (:func:`recast.data.transforms.transforms_for`) read the input size from the
network's own data config, so changing the network is enough: a timm ViT is resized with its
``set_input_size`` (the patch grid changes, the position embeddings are resampled, and its recipe
records the new ``img_size`` so that a saved copy is rebuilt at that size); a
convolutional network takes any size already, so only its recorded input size changes.
"""

from __future__ import annotations

from torch import nn

from recast.data.transforms import data_config
from recast.errors import ConfigError
from recast.recipe import attach_recipe, recipe_of

MIN_IMAGE_SIZE = 8


def image_size_of(net: nn.Module) -> int:
    """The side length of the images ``net`` takes (from its data config)."""
    return int(data_config(net)["input_size"][-1])


def set_image_size(net: nn.Module, size: int | None) -> nn.Module:
    """Make ``net`` (and the transforms made for it) take ``size`` x ``size`` images; returns ``net``.

    ``net`` may be a wrapper (a PEFT model, a RECAST ``.net``): the timm model inside it is
    changed. ``None`` leaves the network as it is.
    """
    if size is None:
        return net
    if isinstance(size, bool) or not isinstance(size, int) or size < MIN_IMAGE_SIZE:
        raise ConfigError(f"image size must be an integer >= {MIN_IMAGE_SIZE}, got {size!r}")
    inner = _timm_model(net)
    if hasattr(inner, "set_input_size") and hasattr(inner, "patch_embed"):
        patch = inner.patch_embed.patch_size
        if size % patch[0] or size % patch[1]:
            raise ConfigError(f"image size {size} is not a multiple of this ViT's patch size {tuple(patch)}; "
                              f"use a multiple of {patch[0]}")
        inner.set_input_size(img_size=(size, size))
        recipe = recipe_of(inner)
        if recipe is not None and recipe.get("factory") == "timm":  # rebuilt at this size when loaded again
            attach_recipe(inner, "timm", recipe["name"], **{**recipe.get("kwargs", {}), "img_size": size})
    config = dict(getattr(inner, "pretrained_cfg", None) or {})
    config["input_size"] = (3, size, size)
    config.pop("test_input_size", None)
    inner.pretrained_cfg = config  # a new dict: other models built from the same config are not changed
    return net


def _timm_model(net: nn.Module) -> nn.Module:
    """The outermost module that carries a timm data config (``net`` itself when none does)."""
    for module in net.modules():
        if vars(module).get("pretrained_cfg") is not None:  # set on the module itself, not forwarded by a wrapper
            return module
    return net
