"""Learning one task: one explicit training loop.

:func:`fit_task` trains ``[p for p in model.parameters() if p.requires_grad]`` of any
``nn.Module`` (for a :class:`~recast.RecastModel`, the active task's coefficients and head), picks
the best epoch on the validation split, and measures test accuracy once, at the end, with that
best state. Every epoch ends with a checkpoint (:mod:`recast.train.checkpoint`) from which
``resume=True`` continues to the same result, bit for bit on the CPU: shuffling is a pure function
of (seed, epoch), and optimizer, scheduler and RNG states are restored. Under ``torchrun`` the same
loop runs with DistributedDataParallel.
"""

from __future__ import annotations

import csv
import io
import random
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from recast.distributed import DistContext
from recast.errors import ConfigError
from recast.io import atomic_write_bytes
from recast.train.checkpoint import (
    LoopState,
    Trainer,
    has_checkpoint,
    load_checkpoint,
    load_state_tensors,
    save_checkpoint,
    state_tensors,
)
from recast.train.config import TrainConfig, TrainingError
from recast.train.evaluate import autocast, check_dataset, check_labels, evaluate


@dataclass
class FitResult:
    """What one task's training gave: the best epoch's accuracies, the history, the cost."""

    best_epoch: int
    val_accuracy: float
    test_accuracy: float | None
    history: list[dict[str, float]]
    steps: int
    train_seconds: float
    peak_rss_mb: float
    config: dict[str, Any] = field(default_factory=dict)

    def to_meta(self) -> dict[str, Any]:
        """The fields stored in a task's JSON record."""
        return {
            "metrics": {"val_accuracy": self.val_accuracy, "test_accuracy": self.test_accuracy,
                        "best_epoch": self.best_epoch, "steps": self.steps},
            "train_seconds": self.train_seconds,
            "peak_rss_mb": self.peak_rss_mb,
            "train_config": self.config,
            "history": self.history,
        }


class _Diverged(Exception):
    """Internal: the loss was not finite at some step."""

    def __init__(self, value: float, epoch: int, step: int) -> None:
        super().__init__(value, epoch, step)
        self.value, self.epoch, self.step = value, epoch, step


class _Progress:
    """A tqdm bar per epoch on a terminal, a plain line per epoch otherwise, nothing when disabled."""

    def __init__(self, enabled: bool, epochs: int) -> None:
        self.enabled, self.epochs = enabled, epochs
        self.tty = enabled and sys.stderr.isatty()
        self.bar: Any = None

    def wrap(self, loader: DataLoader, epoch: int) -> Any:
        if not self.tty:
            return loader
        self.bar = tqdm(loader, desc=f"epoch {epoch + 1}/{self.epochs}", leave=False, dynamic_ncols=True)
        return self.bar

    def step(self, loss: float, accuracy: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", acc=f"{accuracy:.3f}", refresh=False)

    def end_epoch(self, row: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.enabled:
            print(
                f"epoch {int(row['epoch'])}/{self.epochs}  step {int(row['step'])}  loss {row['train_loss']:.4f}  "
                f"train_acc {row['train_accuracy']:.4f}  val_acc {row['val_accuracy']:.4f}  lr {row['lr']:.2e}  "
                f"{row['seconds']:.1f}s", flush=True,
            )


def _build_trainer(model: nn.Module, config: TrainConfig, dist: DistContext) -> Trainer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("the model has no trainable parameters: activate a task (set_task) before training")
    if config.precision == "fp16" and not dist.device.startswith("cuda"):
        raise ConfigError("precision fp16 needs a GPU (it uses a GradScaler); use bf16 or fp32 on the CPU")
    groups = model.param_groups(config.lr) if hasattr(model, "param_groups") else params  # per-kind learning rates
    if dist.enabled:
        device_ids = [dist.local_rank] if dist.device.startswith("cuda") else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.step_size, gamma=config.gamma)
    scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" else None
    return Trainer(model, optimizer, scheduler, scaler)


def _train_loader(dataset: Dataset, config: TrainConfig, dist: DistContext) -> tuple[DataLoader, DistributedSampler]:
    if config.batch_size % dist.world_size:
        raise ConfigError(f"batch_size {config.batch_size} must divide evenly over {dist.world_size} processes")
    sampler = DistributedSampler(dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                                 seed=config.seed, drop_last=False)
    loader = DataLoader(dataset, batch_size=config.batch_size // dist.world_size, sampler=sampler,
                        num_workers=config.num_workers, pin_memory=dist.device.startswith("cuda"))
    return loader, sampler


def _train_epoch(
    trainer: Trainer, loader: DataLoader, config: TrainConfig, dist: DistContext, state: LoopState,
    progress: _Progress,
) -> tuple[float, float]:
    """One pass (or up to ``max_steps``); returns the mean loss and accuracy over this process's samples."""
    model, optimizer = trainer.model, trainer.optimizer
    params = [p for group in optimizer.param_groups for p in group["params"]]
    model.train()
    loss_sum = correct = seen = 0.0
    for images, labels in progress.wrap(loader, state.epoch):
        if config.max_steps is not None and state.step >= config.max_steps:
            break
        images, labels = images.to(dist.device), labels.to(dist.device)
        with autocast(config.precision, dist.device):
            logits = model(images)
        check_labels(labels, logits)
        loss = F.cross_entropy(logits.float(), labels)
        if not dist.all_true(bool(torch.isfinite(loss))):
            raise _Diverged(float(loss.detach()), state.epoch + 1, state.step + 1)
        optimizer.zero_grad(set_to_none=True)
        _backward_step(trainer, loss, params, config)
        state.step += 1
        loss_sum += float(loss.detach()) * labels.numel()
        correct += float((logits.argmax(-1) == labels).sum())
        seen += labels.numel()
        progress.step(loss_sum / seen, correct / seen)
    loss_sum, correct, seen = dist.sum([loss_sum, correct, seen])
    return loss_sum / max(seen, 1), correct / max(seen, 1)


def _backward_step(trainer: Trainer, loss: Tensor, params: list[Tensor], config: TrainConfig) -> None:
    """Backward, optional gradient clipping, optimizer step (through the GradScaler for fp16)."""
    scaler = trainer.scaler
    if scaler is None:
        loss.backward()
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        trainer.optimizer.step()
        return
    scaler.scale(loss).backward()
    scaler.unscale_(trainer.optimizer)
    if config.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
    scaler.step(trainer.optimizer)
    scaler.update()


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def fit_task(
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset,
    test_set: Dataset | None = None,
    config: TrainConfig | None = None,
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    dist: DistContext | None = None,
    progress: bool = False,
    log_csv: str | Path | None = None,
) -> FitResult:
    """Train the trainable parameters of ``model`` on ``train_set`` and keep the best-validation state.

    ``model`` ends on ``dist.device`` holding the best epoch's state. With ``checkpoint_dir`` a
    checkpoint is written after every epoch (main process only) and ``resume=True`` continues from
    it. A non-finite loss raises :class:`TrainingError`, with the model put back to the last
    completed epoch's state (which is also what the checkpoint holds).
    """
    config = config or TrainConfig()
    dist = dist or DistContext()
    for dataset, split in ((train_set, "train"), (val_set, "validation")):
        check_dataset(dataset, split)
    model.to(dist.device)
    if not resume:
        _seed_everything(config.seed + dist.rank)
    trainer = _build_trainer(model, config, dist)
    directory = Path(checkpoint_dir) if checkpoint_dir is not None else None
    state = LoopState(best=state_tensors(model))
    if resume:
        if directory is None or not has_checkpoint(directory):
            raise ConfigError(f"--resume: no checkpoint in {directory}; start without --resume")
        state = load_checkpoint(directory, trainer, config)
    loader, sampler = _train_loader(train_set, config, dist)
    _run_epochs(trainer, loader, sampler, val_set, config, dist, state, directory,
                _Progress(progress and dist.is_main, config.epochs), log_csv)
    load_state_tensors(model, state.best)
    test_accuracy = None
    if test_set is not None:
        test_accuracy = evaluate(model, test_set, batch_size=config.eval_batch_size or config.batch_size,
                                 precision=config.precision, num_workers=config.num_workers, dist=dist)
    return FitResult(state.best_epoch, state.best_val, test_accuracy, state.history, state.step,
                     state.train_seconds, peak_rss_mb(), config.to_dict())


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _run_epochs(
    trainer: Trainer, loader: DataLoader, sampler: DistributedSampler, val_set: Dataset, config: TrainConfig,
    dist: DistContext, state: LoopState, directory: Path | None, progress: _Progress, log_csv: str | Path | None,
) -> None:
    """The epochs from ``state.epoch`` on: train, step the schedule, validate, keep the best, checkpoint."""
    for epoch in range(state.epoch, config.epochs):
        if config.max_steps is not None and state.step >= config.max_steps:
            break
        sampler.set_epoch(epoch)
        last_good = state_tensors(trainer.model)
        started = time.perf_counter()
        try:
            loss, accuracy = _train_epoch(trainer, loader, config, dist, state, progress)
        except _Diverged as err:
            load_state_tensors(trainer.model, last_good)
            where = f"the checkpoint in {directory} holds it too" if directory is not None else "no checkpoint was kept"
            raise TrainingError(
                f"the loss became {err.value} at epoch {err.epoch}, step {err.step}: training stopped. The model "
                f"holds the last good state (end of epoch {state.epoch}); {where}. Lower the learning rate "
                "(--lr) or check the data for NaN/inf values"
            ) from None
        lr = trainer.optimizer.param_groups[0]["lr"]
        trainer.scheduler.step()
        val = evaluate(trainer.model, val_set, batch_size=config.eval_batch_size or config.batch_size,
                       precision=config.precision, num_workers=config.num_workers, dist=dist)
        state.epoch = epoch + 1
        state.train_seconds += time.perf_counter() - started
        row = {"epoch": epoch + 1, "step": state.step, "lr": lr, "train_loss": loss, "train_accuracy": accuracy,
               "val_accuracy": val, "seconds": time.perf_counter() - started}
        state.history.append(row)
        if val > state.best_val:
            state.best_val, state.best_epoch, state.best = val, epoch + 1, state_tensors(trainer.model)
        progress.end_epoch(row)
        if dist.is_main:
            if directory is not None:
                save_checkpoint(directory, trainer, state, config)
            if log_csv is not None:
                write_history_csv(log_csv, state.history)


def write_history_csv(path: str | Path, history: Sequence[dict[str, float]]) -> None:
    """Write the per-epoch history as CSV, atomically (rewritten whole, so a resumed run stays consistent)."""
    buffer = io.StringIO()
    columns = ["epoch", "step", "lr", "train_loss", "train_accuracy", "val_accuracy", "seconds"]
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_bytes(path, buffer.getvalue().encode("utf-8"))
