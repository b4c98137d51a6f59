"""Training checkpoints: the state after a completed epoch, from which a run resumes bit for bit.

A checkpoint is ``epoch-<k>.safetensors`` (trainable parameters, buffers, the best state so far,
optimizer tensors, RNG states) plus ``checkpoint.json`` (counters, history, options, schedule),
each written atomically; the JSON is written last and names the tensor file.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import Tensor, nn

from recast.errors import ConfigError, FileFormatError
from recast.io import atomic_write_bytes, atomic_write_json, read_json
from recast.train.config import TrainConfig
from recast.train.evaluate import unwrap

CHECKPOINT_FILE = "checkpoint.json"


@dataclass
class LoopState:
    """Counters carried from epoch to epoch (and through a checkpoint)."""

    epoch: int = 0  # completed epochs
    step: int = 0
    best_epoch: int = 0
    best_val: float = -1.0
    train_seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, Tensor] = field(default_factory=dict)


def state_tensors(model: nn.Module) -> dict[str, Tensor]:
    """What training changes: the trainable parameters and every buffer, by name, copied to the CPU."""
    model = unwrap(model)
    tensors = {f"param.{n}": p for n, p in model.named_parameters() if p.requires_grad}
    tensors.update({f"buffer.{n}": b for n, b in model.named_buffers()})
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}


def load_state_tensors(model: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Copy tensors saved by :func:`state_tensors` back into ``model``."""
    model = unwrap(model)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for key, value in tensors.items():
            kind, _, name = key.partition(".")
            target = params.get(name) if kind == "param" else buffers.get(name)
            if target is None or target.shape != value.shape:
                raise FileFormatError(f"saved training state {key!r} does not fit this model")
            target.copy_(value)


def _rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Every random generator's state: tensors (torch) and JSON (python, numpy)."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {"python": [version, list(internal), gauss],
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    return tensors, plain


def _set_rng_state(tensors: dict[str, Tensor], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


@dataclass
class Trainer:
    """The objects one run steps together: model, optimizer, scheduler, scaler."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None


def save_checkpoint(directory: Path, trainer: Trainer, state: LoopState, config: TrainConfig) -> None:
    """Write the state after a completed epoch: ``epoch-<k>.safetensors`` then ``checkpoint.json``.

    The JSON, written last, names the tensor file; a run killed at any moment leaves the previous
    pair complete, and older tensor files are removed only after the new JSON is in place. A
    failed write (``DiskError``: disk full, I/O error) leaves the previous pair and no other file.
    """
    tensors = {f"model.{k}": v for k, v in state_tensors(trainer.model).items()}
    tensors.update({f"best.{k}": v for k, v in state.best.items()})
    optim_state = trainer.optimizer.state_dict()
    for index, values in optim_state["state"].items():
        for key, value in values.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    rng_tensors, rng_plain = _rng_state()
    tensors.update(rng_tensors)
    name = f"epoch-{state.epoch}.safetensors"
    data = safetensors.torch.save(tensors)
    record = {
        "format": "recast-train-checkpoint", "tensors": name, "config": config.to_dict(),
        "epoch": state.epoch, "step": state.step, "best_epoch": state.best_epoch, "best_val": state.best_val,
        "train_seconds": state.train_seconds, "history": state.history, "rng": rng_plain,
        "optimizer_groups": optim_state["param_groups"], "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
    }
    try:
        atomic_write_bytes(directory / name, data)
        atomic_write_json(directory / CHECKPOINT_FILE, record)
    finally:
        _drop_unnamed_tensors(directory)


def _drop_unnamed_tensors(directory: Path) -> None:
    """Remove every ``epoch-*.safetensors`` but the one ``checkpoint.json`` names now.

    Runs after a save and after a failed one (disk full: the new tensor file may be written but
    the JSON that names it not), so only the committed pair is ever left.
    """
    current = None
    if (directory / CHECKPOINT_FILE).is_file():
        try:
            current = read_json(directory / CHECKPOINT_FILE).get("tensors")
        except (FileFormatError, AttributeError):
            return  # unreadable: keep every tensor file, load_checkpoint will say what is wrong
    for old in directory.glob("epoch-*.safetensors"):
        if old.name != current:
            old.unlink(missing_ok=True)


def load_checkpoint(directory: Path, trainer: Trainer, config: TrainConfig) -> LoopState:
    """Restore model, optimizer, scheduler, scaler and RNG states; returns the loop counters."""
    record = read_json(directory / CHECKPOINT_FILE)
    if record.get("format") != "recast-train-checkpoint":
        raise FileFormatError(f"{directory / CHECKPOINT_FILE}: not a training checkpoint")
    if record["config"] != config.to_dict():
        changed = sorted(k for k, v in config.to_dict().items() if record["config"].get(k) != v)
        raise ConfigError(f"{directory}: the checkpoint was made with other training options ({', '.join(changed)}); "
                          "resume with the same options, or start again without --resume")
    try:
        tensors = safetensors.torch.load((directory / record["tensors"]).read_bytes())
    except (OSError, Exception) as exc:
        raise FileFormatError(f"{directory / record['tensors']}: unreadable checkpoint tensors ({exc})") from None
    load_state_tensors(trainer.model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    optim_state: dict[str, Any] = {"state": {}, "param_groups": record["optimizer_groups"]}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            optim_state["state"].setdefault(int(index), {})[name] = value
    for group in optim_state["param_groups"]:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    trainer.optimizer.load_state_dict(optim_state)
    trainer.scheduler.load_state_dict(record["scheduler"])
    if trainer.scaler is not None and record.get("scaler"):
        trainer.scaler.load_state_dict(record["scaler"])
    _set_rng_state({k: v for k, v in tensors.items() if k.startswith("rng.")}, record["rng"])
    best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
    return LoopState(record["epoch"], record["step"], record["best_epoch"], record["best_val"],
                      record["train_seconds"], list(record["history"]), best)


def has_checkpoint(directory: str | Path) -> bool:
    """True when ``directory`` holds a complete training checkpoint."""
    return (Path(directory) / CHECKPOINT_FILE).is_file()


def remove_checkpoint(directory: str | Path) -> None:
    """Delete a finished run's checkpoint folder."""
    shutil.rmtree(directory, ignore_errors=True)
