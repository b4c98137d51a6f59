"""Measuring a model: top-1 accuracy over a dataset, logits, and mixed-task batches."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from recast.distributed import DistContext
from recast.errors import ConfigError
from recast.train.config import TrainingError


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (the model itself otherwise)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def check_dataset(dataset: Dataset, split: str) -> None:
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise TrainingError(f"the {split} split is empty: there is nothing to {'train' if split == 'train' else 'measure'} on")


class _Shard(Sampler[int]):
    """Indices ``rank, rank + world, ...`` in order: evaluation split over processes, no padding."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def autocast(precision: str, device: str) -> Any:
    """The autocast context for ``precision`` (none for fp32)."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def check_labels(labels: Tensor, logits: Tensor) -> None:
    classes = logits.shape[-1]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        bad = int(labels.max()) if int(labels.max()) >= classes else int(labels.min())
        raise TrainingError(
            f"label {bad} is out of range for a head with {classes} classes: the data has more classes than "
            "the task was created with; create the task with the data's classes or use a new task name"
        )


@torch.no_grad()
def evaluate(
    model: nn.Module, dataset: Dataset, *, batch_size: int = 256, device: str | None = None,
    precision: str = "fp32", num_workers: int = 0, dist: DistContext | None = None,
) -> float:
    """Top-1 accuracy of ``model`` on ``dataset`` (split over processes when distributed)."""
    check_dataset(dataset, "evaluation")
    dist = dist or DistContext()
    device = device or dist.device
    model = unwrap(model)
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                        sampler=_Shard(len(dataset), dist.rank, dist.world_size))  # type: ignore[arg-type]
    correct = total = 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        with autocast(precision, device):
            logits = model(images)
        check_labels(labels, logits)
        correct += int((logits.argmax(-1) == labels).sum())
        total += int(labels.numel())
    model.train(was_training)
    correct, total = dist.sum([correct, total])
    return correct / total


@torch.no_grad()
def predict_logits(model: nn.Module, dataset: Dataset, *, batch_size: int = 256, device: str = "cpu") -> Tensor:
    """The logits of every sample of ``dataset``, in order, as one ``(N, classes)`` CPU tensor."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    out = [model(images.to(device)).float().cpu() for images, _ in DataLoader(dataset, batch_size=batch_size)]
    model.train(was_training)
    return torch.cat(out)


def forward_mixed(model: nn.Module, images: Tensor, tasks: Sequence[str], *, single_forward: bool = True) -> Tensor:
    """Logits for a batch whose samples belong to different tasks, padded with ``-inf`` to the widest head.

    Uses ``model.forward_tasks`` where the model has it and ``single_forward`` is set (one forward
    over the whole batch); otherwise groups the samples by task, one forward per task, restoring
    the active task afterwards.
    """
    if len(tasks) != images.shape[0]:
        raise ConfigError(f"{len(tasks)} task names for a batch of {images.shape[0]} samples")
    forward_tasks: Callable[..., Tensor] | None = getattr(model, "forward_tasks", None)
    if forward_tasks is not None and single_forward:
        return forward_tasks(images, list(tasks))
    active = model.active_task  # type: ignore[attr-defined]
    pieces: dict[str, tuple[list[int], Tensor]] = {}
    try:
        for name in dict.fromkeys(tasks):
            rows = [i for i, t in enumerate(tasks) if t == name]
            model.set_task(name)  # type: ignore[attr-defined, operator]
            pieces[name] = (rows, model(images[rows]))
    finally:
        if active is not None:
            model.set_task(active)  # type: ignore[attr-defined, operator]
    width = max(out.shape[-1] for _, out in pieces.values())
    logits = images.new_full((images.shape[0], width), float("-inf"))
    for rows, out in pieces.values():
        logits[rows, : out.shape[-1]] = out.to(logits.dtype)
    return logits
