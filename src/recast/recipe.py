"""How to rebuild a base model's architecture (without its weights) from a small JSON recipe.

A model directory stores the recipe of its base model so that ``RecastModel.from_pretrained`` can
rebuild the module tree before loading the weights. A recipe is a plain dict::

    {"factory": "timm", "name": "vit_small_patch16_224", "kwargs": {"num_classes": 1000}}

``factory`` is ``timm`` or ``torchvision``. Code that creates backbones (``recast.backbones``)
attaches the exact recipe with :func:`attach_recipe`; for other timm models one is inferred.
"""

from __future__ import annotations

from typing import Any

import timm
import torchvision
from torch import nn

from recast.errors import ConfigError

RECIPE_ATTR = "recast_recipe"


def attach_recipe(model: nn.Module, factory: str, name: str, **kwargs: Any) -> nn.Module:
    """Record on ``model`` how to rebuild it; returns ``model`` for chaining."""
    if factory not in ("timm", "torchvision"):
        raise ConfigError(f"unknown model factory {factory!r}; use 'timm' or 'torchvision'")
    model.__dict__[RECIPE_ATTR] = {"factory": factory, "name": name, "kwargs": dict(kwargs)}
    return model


def recipe_of(model: nn.Module) -> dict[str, Any] | None:
    """The recipe attached to ``model``, or one inferred for a timm model, or None if unknown."""
    recipe = model.__dict__.get(RECIPE_ATTR)
    if recipe is not None:
        return recipe
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("architecture"):
        kwargs = {}
        if hasattr(model, "num_classes"):
            kwargs["num_classes"] = int(model.num_classes)
        return {"factory": "timm", "name": cfg["architecture"], "kwargs": kwargs}
    return None


def build_from_recipe(recipe: dict[str, Any]) -> nn.Module:
    """Create the architecture a recipe names, with random weights (they are loaded afterwards)."""
    factory, name = recipe.get("factory"), recipe.get("name")
    kwargs = dict(recipe.get("kwargs", {}))
    if factory == "timm":
        model = timm.create_model(name, pretrained=False, **kwargs)
    elif factory == "torchvision":
        builder = getattr(torchvision.models, str(name), None)
        if builder is None:
            raise ConfigError(f"torchvision has no model named {name!r}")
        model = builder(weights=None, **kwargs)
    else:
        raise ConfigError(f"unknown model factory {factory!r} in recipe {recipe}; use 'timm' or 'torchvision'")
    return attach_recipe(model, factory, name, **kwargs)


def create_timm(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=False, **kwargs)`` with its recipe attached, in eval mode."""
    model = timm.create_model(name, pretrained=False, **kwargs)
    return attach_recipe(model, "timm", name, **kwargs).eval()
