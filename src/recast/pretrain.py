"""``recast pretrain``: full supervised pretraining of the small backbones the project ships.

A plain, explicit, seeded training loop: AdamW with linear warm-up then cosine decay, cross-entropy
with label smoothing, model selection on a validation split carved from train, and accuracy on the
held-out test split reported once. The result is written as fp16 safetensors plus a JSON manifest
(sha256, seed, data, epochs, accuracies, time, the exact command that remakes it).
"""

from __future__ import annotations

import hashlib
import math
import platform
import shlex
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy
import PIL
import timm
import torch
from safetensors.torch import save
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from recast.backbones import build_shipped_architecture, shipped_registry
from recast.data import open_data
from recast.data.transforms import transforms_for
from recast.io import atomic_write_bytes, atomic_write_json


@dataclass(frozen=True)
class PretrainConfig:
    """Everything a pretraining run depends on (recorded in the manifest)."""

    backbone: str
    data: str = "builtin:glyphs"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    val_fraction: float = 0.1
    seed: int = 0
    threads: int = 2
    device: str = "cpu"
    workers: int = 0  # DataLoader worker processes (decoding and augmentation run there)


def pretrain(config: PretrainConfig, out_dir: Path) -> dict[str, Any]:
    """Pretrain ``config.backbone`` (a shipped backbone name) and write it into ``out_dir``."""
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    probe = build_shipped_architecture(config.backbone, num_classes=1)
    splits = open_data(config.data, val_fraction=config.val_fraction, seed=config.seed,
                       train_transform=transforms_for(probe, True, hflip=0.0, scale=(0.5, 1.0)),
                       eval_transform=transforms_for(probe, False))
    model = build_shipped_architecture(config.backbone, num_classes=len(splits.classes))
    start = time.time()
    best_state, history = _fit(model.to(config.device), splits, config)
    seconds = time.time() - start
    model.load_state_dict(best_state)
    test_accuracy = evaluate(model, _loader(splits.test, config, shuffle=False))
    entry = shipped_registry()[config.backbone]
    return _write(model, entry, config, splits, history, test_accuracy, seconds, out_dir)


def _loader(dataset: Any, config: PretrainConfig, shuffle: bool) -> DataLoader:
    """A loader seeded when shuffling; single-process by default (the CPU cores go to the model)."""
    generator = torch.Generator().manual_seed(config.seed)
    return DataLoader(dataset, batch_size=config.batch_size, shuffle=shuffle, generator=generator,
                      drop_last=shuffle, num_workers=config.workers, persistent_workers=config.workers > 0)


def _fit(model: nn.Module, splits: Any, config: PretrainConfig) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Train for ``config.epochs``; returns the state with the best validation accuracy and the history."""
    train_loader = _loader(splits.train, config, shuffle=True)
    val_loader = _loader(splits.val, config, shuffle=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    total = config.epochs * len(train_loader)
    warmup = int(config.warmup_epochs * len(train_loader))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, warmup, total))
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    best_accuracy, best_state, history = -1.0, {}, []
    for epoch in range(config.epochs):
        loss = _train_epoch(model, train_loader, optimizer, schedule, criterion, f"epoch {epoch + 1}/{config.epochs}")
        accuracy = evaluate(model, val_loader)
        if accuracy > best_accuracy:
            best_accuracy, best_state = accuracy, {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        history.append({"epoch": epoch + 1, "train_loss": round(loss, 4), "val_accuracy": round(accuracy, 4)})
        tqdm.write(f"epoch {epoch + 1}: train loss {loss:.3f}, val accuracy {accuracy:.3f}")
    return best_state, history


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _train_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                 schedule: Any, criterion: nn.Module, label: str) -> float:
    """One pass over ``loader``; returns the mean training loss."""
    model.train()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for images, labels in tqdm(loader, desc=label, leave=False):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        loss = criterion(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        total += loss.item() * len(labels)
        count += len(labels)
    return total / max(1, count)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy of ``model`` over ``loader``, as a fraction."""
    model.eval()
    device = next(model.parameters()).device
    correct, count = 0, 0
    for images, labels in loader:
        correct += int((model(images.to(device)).argmax(dim=1).cpu() == labels).sum())
        count += len(labels)
    return correct / max(1, count)


def _write(model: nn.Module, entry: dict[str, Any], config: PretrainConfig, splits: Any,
           history: list[dict], test_accuracy: float, seconds: float, out_dir: Path) -> dict[str, Any]:
    """Write the fp16 weights and the manifest; returns the manifest."""
    weights = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()
               if v.is_floating_point()}
    data = save(weights, metadata={"backbone": config.backbone, "format": "recast-shipped-1"})
    weights_path = Path(out_dir) / entry["file"]
    atomic_write_bytes(weights_path, data)
    manifest = {
        "name": config.backbone,
        "file": entry["file"],
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "dtype": "float16",
        "recipe": {**entry["recipe"], "kwargs": {**entry["recipe"]["kwargs"], "num_classes": len(splits.classes)}},
        "data_config": entry["data_config"],
        "params": sum(p.numel() for p in model.parameters()),
        "pretraining": {
            "config": asdict(config),
            "data": config.data,
            "classes": len(splits.classes),
            "split": splits.split_info,
            "history": history,
            "val_accuracy": max(h["val_accuracy"] for h in history),
            "test_accuracy": round(test_accuracy, 4),
            "seconds": round(seconds, 1),
            "machine": f"{platform.machine()}, {config.threads} CPU threads, device {_device_name(config.device)}",
            "versions": _versions(),
        },
        "command": remake_command(config),
    }
    atomic_write_json(weights_path.with_suffix(".json"), manifest)
    return manifest


def remake_command(config: PretrainConfig) -> str:
    """The ``recast pretrain`` command line that repeats this run into the package's assets."""
    return " ".join(shlex.quote(part) for part in [
        "recast", "pretrain", config.backbone, "--data", config.data, "--epochs", str(config.epochs),
        "--batch-size", str(config.batch_size), "--lr", str(config.lr), "--weight-decay", str(config.weight_decay),
        "--seed", str(config.seed), "--threads", str(config.threads), "--device", config.device,
        "--workers", str(config.workers), "--out", "src/recast/assets",
    ])


def _device_name(device: str) -> str:
    """``cpu``, or the GPU's name for a CUDA device."""
    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else device


def _versions() -> dict[str, str]:
    """Library versions the result depends on."""
    return {"torch": torch.__version__, "timm": timm.__version__, "numpy": numpy.__version__, "pillow": PIL.__version__}
