"""Small models shared by the tests: tiny timm ViTs and ResNets with non-trivial weights."""

from __future__ import annotations

import timm
import torch
from torch import nn

from recast.recipe import attach_recipe


def tiny_vit(depth: int = 4, num_classes: int = 5, seed: int = 0) -> nn.Module:
    """A 16-px timm VisionTransformer, small enough for fast tests, in eval mode."""
    torch.manual_seed(seed)
    kwargs = dict(img_size=16, patch_size=8, embed_dim=32, depth=depth, num_heads=2, num_classes=num_classes)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs)
    return attach_recipe(model, "timm", "vit_tiny_patch16_224", **kwargs).eval()


def tiny_resnet(name: str = "resnet18", num_classes: int = 5, seed: int = 0) -> nn.Module:
    """A timm ResNet whose BatchNorm layers have random statistics, so every block matters."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    randomise_batchnorm(model)
    return model.eval()


def narrow_resnet(num_classes: int = 5, seed: int = 0) -> nn.Module:
    """A ResNet-18 layout with 8-16-32-64 channels: the same structure as ``tiny_resnet``, far cheaper."""
    torch.manual_seed(seed)
    kwargs = dict(channels=(8, 16, 32, 64), num_classes=num_classes)
    model = attach_recipe(timm.create_model("resnet18", pretrained=False, **kwargs), "timm", "resnet18", **kwargs)
    randomise_batchnorm(model)
    return model.eval()


def randomise_batchnorm(model: nn.Module) -> None:
    """Give BatchNorm layers non-trivial affine weights and statistics (timm zero-inits some)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference over the largest magnitude of ``b``."""
    return ((a - b).abs().max() / b.abs().max()).item()
