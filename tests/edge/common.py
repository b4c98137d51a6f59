"""Small RECAST models with trained-looking tasks, shared by the edge tests."""

from __future__ import annotations

import torch

from recast import RecastConfig, RecastModel
from tests.helpers import narrow_resnet, tiny_vit


def perturb_tasks(model: RecastModel, seed: int = 0, scale: float = 0.1) -> RecastModel:
    """Move every task's coefficients and head away from their start, so tasks really differ."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if ".per_task." in name:
                tensor.add_(torch.randn(tensor.shape, generator=generator) * scale)
    return model


def vit_model(target: str = "att", seed: int = 0) -> RecastModel:
    """A tiny 16-px timm ViT (4 blocks, the ViT-S structure), RECAST ``target``, tasks a (3) and b (7) and base (5)."""
    model = RecastModel.from_base(tiny_vit(seed=seed), RecastConfig(target=target, groups=2))
    model.add_task("a", 3, class_names=["x", "y", "z"])
    model.add_task("b", 7)
    return perturb_tasks(model, seed).eval()


def resnet_model() -> RecastModel:
    """A narrow ResNet-18 with generated convolutions and two tasks, one of them keeping its own BatchNorm."""
    model = RecastModel.from_base(narrow_resnet(), RecastConfig(target="conv"))
    model.add_task("a", 3)
    model.add_task("own", 4, own_bn=True)
    return perturb_tasks(model, 1, 0.05).eval()
