"""A short, real end-to-end run of the Python API: mimic, learn two tasks, switch, save, reload.

It needs no data download: the two tasks are synthetic colour/texture problems drawn from a
seeded generator, and the backbone is a small timm ViT. ``recast demo --quick`` and
``examples/quickstart.py`` run it; it is also the shortest tour of the API.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recast.config import RecastConfig
from recast.model import RecastModel


def synthetic_task(num_classes: int, samples: int, size: int, seed: int) -> tuple[Tensor, Tensor]:
    """Images whose class sets the mean colour of one quadrant, plus noise: learnable, not trivial."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(num_classes, (samples,), generator=generator)
    images = torch.randn(samples, 3, size, size, generator=generator) * 0.5
    palette = torch.randn(num_classes, 3, generator=generator)
    half = size // 2
    corner = seed % 4
    rows, cols = (slice(0, half), slice(half, size))[corner // 2], (slice(0, half), slice(half, size))[corner % 2]
    images[:, :, rows, cols] += palette[labels][:, :, None, None]
    return images, labels


def train_steps(model: nn.Module, images: Tensor, labels: Tensor, steps: int, lr: float = 2e-2) -> float:
    """A few full-batch AdamW steps on the trainable (active-task) parameters; returns the last loss."""
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=1e-6)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        optimiser.zero_grad()
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimiser.step()
    model.eval()
    return float(loss.detach())


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy of the active task."""
    return (model(images).argmax(1) == labels).float().mean().item()


def run_quickstart(base: nn.Module, out_dir: str | Path, steps: int = 30, image_size: int = 32) -> dict[str, Any]:
    """Mimic ``base`` (RECAST-Att, exact SVD fit), learn two tasks, check nothing is forgotten, save.

    Returns a summary dict (accuracies, per-task counts, bytes, timings) for printing or testing.
    """
    torch.manual_seed(0)
    start = time.perf_counter()
    depth = len(getattr(base, "blocks", [])) or 1
    model = RecastModel.from_base(base, RecastConfig(target="att", groups=depth // 2 if depth % 2 == 0 else depth))
    summary: dict[str, Any] = {"mimicry": {k: model.mimicry_report[k] for k in ("method", "seconds", "weight_rel_error")}}
    data = {name: synthetic_task(4, 128, image_size, seed) for name, seed in (("quadrants", 1), ("corners", 2))}
    logits_before: Tensor | None = None
    for name, (images, labels) in data.items():
        model.add_task(name, num_classes=4)
        model.set_task(name)
        loss = train_steps(model, images, labels, steps)
        summary[name] = {"loss": loss, "accuracy": accuracy(model, images, labels), "params": model.task_parameters(name)}
        if logits_before is None:
            with torch.no_grad():
                logits_before = model(data[name][0])
    first = next(iter(data))
    model.set_task(first)
    with torch.no_grad():
        summary["first_task_unchanged"] = bool(torch.equal(model(data[first][0]), logits_before))
    model.save_pretrained(out_dir)
    summary["bytes"] = {p.name: p.stat().st_size for p in sorted(Path(out_dir, "tasks").glob("*.safetensors"))}
    summary["seconds"] = time.perf_counter() - start
    return summary
