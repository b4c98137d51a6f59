"""Unlabelled images for feature fidelity and data-driven refinement, transformed as a model expects."""

from __future__ import annotations

from pathlib import Path

import timm.data
import torch
from torch import nn

from recast.data import open_data
from recast.data.images import IMAGE_SUFFIXES, load_image
from recast.errors import FileFormatError


def load_images(spec: str, base: nn.Module, count: int) -> torch.Tensor:
    """Up to ``count`` images ``(N, C, H, W)`` from ``spec``, transformed as ``base`` expects (its timm data config).

    ``spec`` is a folder of image files (searched recursively, in name order) or a data spec
    (``imagefolder:PATH``, ``builtin:NAME``, ...), whose training split is read.
    """
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(base), is_training=False)
    path = Path(spec)
    if ":" not in spec or path.is_dir():
        if not path.is_dir():
            raise FileFormatError(f"{spec}: not a folder of images nor a data spec (imagefolder:PATH, builtin:NAME, ...)")
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:count]
        pictures = [load_image(p) for p in files]
    else:
        dataset = open_data(spec).train
        pictures = [dataset[i][0] for i in range(min(count, len(dataset)))]
    if not pictures:
        raise FileFormatError(f"{spec}: no images found")
    return torch.stack([transform(picture) for picture in pictures])
