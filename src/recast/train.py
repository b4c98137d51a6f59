"""Learning one task: one explicit training loop, evaluation, checkpoints that resume exactly.

:func:`fit_task` trains ``[p for p in model.parameters() if p.requires_grad]`` of any
``nn.Module`` (for a :class:`~recast.RecastModel`, the active task's coefficients and head), picks
the best epoch on the validation split, and measures test accuracy once, at the end, with that
best state. Every epoch ends with a checkpoint (safetensors for tensors, JSON for counters, each
file written atomically) from which ``resume=True`` continues to the same result, bit for bit on the
CPU: shuffling is a pure function of (seed, epoch), and optimizer, scheduler and RNG states are
restored. Under ``torchrun`` the same loop runs with DistributedDataParallel.
"""

from __future__ import annotations

import csv
import io
import json
import random
import resource
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

from recast.distributed import DistContext
from recast.errors import ConfigError, FileFormatError, RecastError
from recast.io import atomic_write_bytes, atomic_write_json, read_json

PRECISIONS = ("fp32", "bf16", "fp16")
CHECKPOINT_FILE = "checkpoint.json"


class TrainingError(RecastError):
    """Training cannot go on: a non-finite loss, labels the head cannot take, empty data."""


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one task's training (defaults: the paper's, REFERENCE.md section 4).

    Attributes:
        epochs: passes over the training split.
        batch_size: the global batch (split evenly over processes under ``torchrun``).
        lr, weight_decay: AdamW's learning rate and decoupled weight decay.
        step_size, gamma: StepLR, the learning rate times ``gamma`` every ``step_size`` epochs.
        grad_clip: maximum global gradient norm (``None`` disables clipping).
        max_steps: stop after this many optimizer steps in total (``None``: run every epoch).
        seed: seeds shuffling, augmentation and new heads.
        num_workers: DataLoader worker processes.
        precision: ``fp32``, or ``bf16``/``fp16`` autocast (``fp16`` with a GradScaler, GPU only).
        augment: random crops and flips on the training split (off: the evaluation transform).
        eval_batch_size: batch for validation and test (``None``: ``batch_size``).
    """

    epochs: int = 100
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-6
    step_size: int = 33
    gamma: float = 0.1
    grad_clip: float | None = 1.0
    max_steps: int | None = None
    seed: int = 42
    num_workers: int = 0
    precision: str = "fp32"
    augment: bool = True
    eval_batch_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "step_size"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("max_steps", "eval_batch_size"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1)
        _check_int("num_workers", self.num_workers, minimum=0)
        _check_int("seed", self.seed, minimum=0)
        for name in ("lr", "weight_decay", "gamma"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise ConfigError(f"{name} must be a non-negative number, got {value!r}")
        if self.grad_clip is not None and not (isinstance(self.grad_clip, int | float) and self.grad_clip > 0):
            raise ConfigError(f"grad_clip must be a positive number or None, got {self.grad_clip!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a dict; unknown keys are an error (a typo must not be silently ignored)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown training options {unknown}; allowed: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        """Read a ``.json`` or ``.toml`` file of fields (a ``[train]`` table in TOML is also accepted)."""
        return cls.from_dict(read_config_file(path))

    def updated(self, **overrides: Any) -> TrainConfig:
        """A copy with the given fields replaced; ``None`` values leave a field as it is."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The training options in a JSON or TOML file, as a dict."""
    path = Path(path)
    if path.suffix.lower() == ".toml":
        try:
            import tomllib  # Python 3.11+
        except ImportError:
            raise ConfigError("TOML config files need Python 3.11 or newer; use a JSON file") from None
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileFormatError(f"{path}: file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise FileFormatError(f"{path}: not valid TOML ({exc})") from None
        data = data.get("train", data)
    else:
        data = read_json(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a training config must be an object of options")
    return data


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


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


@dataclass
class _LoopState:
    """Counters carried from epoch to epoch (and through a checkpoint)."""

    epoch: int = 0  # completed epochs
    step: int = 0
    best_epoch: int = 0
    best_val: float = -1.0
    train_seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, Tensor] = field(default_factory=dict)


class _Diverged(Exception):
    """Internal: the loss was not finite at some step."""

    def __init__(self, value: float, epoch: int, step: int) -> None:
        super().__init__(value, epoch, step)
        self.value, self.epoch, self.step = value, epoch, step


# ------------------------------------------------------------------------------------ state
def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def state_tensors(model: nn.Module) -> dict[str, Tensor]:
    """What training changes: the trainable parameters and every buffer, by name, copied to the CPU."""
    model = _unwrap(model)
    tensors = {f"param.{n}": p for n, p in model.named_parameters() if p.requires_grad}
    tensors.update({f"buffer.{n}": b for n, b in model.named_buffers()})
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}


def load_state_tensors(model: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Copy tensors saved by :func:`state_tensors` back into ``model``."""
    model = _unwrap(model)
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


# ------------------------------------------------------------------------------ checkpoints
@dataclass
class _Trainer:
    """The objects one run steps together: model, optimizer, scheduler, scaler."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None


def save_checkpoint(directory: Path, trainer: _Trainer, state: _LoopState, config: TrainConfig) -> None:
    """Write the state after a completed epoch: ``epoch-<k>.safetensors`` then ``checkpoint.json``.

    The JSON, written last, names the tensor file; a run killed at any moment leaves the previous
    pair complete, and older tensor files are removed only after the new JSON is in place.
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
    atomic_write_bytes(directory / name, safetensors.torch.save(tensors))
    record = {
        "format": "recast-train-checkpoint", "tensors": name, "config": config.to_dict(),
        "epoch": state.epoch, "step": state.step, "best_epoch": state.best_epoch, "best_val": state.best_val,
        "train_seconds": state.train_seconds, "history": state.history, "rng": rng_plain,
        "optimizer_groups": optim_state["param_groups"], "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
    }
    atomic_write_json(directory / CHECKPOINT_FILE, record)
    for old in directory.glob("epoch-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def load_checkpoint(directory: Path, trainer: _Trainer, config: TrainConfig) -> _LoopState:
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
    return _LoopState(record["epoch"], record["step"], record["best_epoch"], record["best_val"],
                      record["train_seconds"], list(record["history"]), best)


def has_checkpoint(directory: str | Path) -> bool:
    """True when ``directory`` holds a complete training checkpoint."""
    return (Path(directory) / CHECKPOINT_FILE).is_file()


# ------------------------------------------------------------------------------- data, eval
def _check_dataset(dataset: Dataset, split: str) -> None:
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


def _autocast(precision: str, device: str) -> Any:
    """The autocast context for ``precision`` (none for fp32)."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def _check_labels(labels: Tensor, logits: Tensor) -> None:
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
    _check_dataset(dataset, "evaluation")
    dist = dist or DistContext()
    device = device or dist.device
    model = _unwrap(model)
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                        sampler=_Shard(len(dataset), dist.rank, dist.world_size))  # type: ignore[arg-type]
    correct = total = 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        with _autocast(precision, device):
            logits = model(images)
        _check_labels(labels, logits)
        correct += int((logits.argmax(-1) == labels).sum())
        total += int(labels.numel())
    model.train(was_training)
    correct, total = dist.sum([correct, total])
    return correct / total


@torch.no_grad()
def predict_logits(model: nn.Module, dataset: Dataset, *, batch_size: int = 256, device: str = "cpu") -> Tensor:
    """The logits of every sample of ``dataset``, in order, as one ``(N, classes)`` CPU tensor."""
    model = _unwrap(model)
    was_training = model.training
    model.eval()
    out = [model(images.to(device)).float().cpu() for images, _ in DataLoader(dataset, batch_size=batch_size)]
    model.train(was_training)
    return torch.cat(out)


# ---------------------------------------------------------------------------- the loop
class _Progress:
    """A tqdm bar per epoch on a terminal, a plain line per epoch otherwise, nothing when disabled."""

    def __init__(self, enabled: bool, epochs: int) -> None:
        self.enabled, self.epochs = enabled, epochs
        self.tty = enabled and sys.stderr.isatty()
        self.bar: Any = None

    def wrap(self, loader: DataLoader, epoch: int) -> Any:
        if not self.tty:
            return loader
        from tqdm.auto import tqdm

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


def _build_trainer(model: nn.Module, config: TrainConfig, dist: DistContext) -> _Trainer:
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
    return _Trainer(model, optimizer, scheduler, scaler)


def _train_loader(dataset: Dataset, config: TrainConfig, dist: DistContext) -> tuple[DataLoader, DistributedSampler]:
    if config.batch_size % dist.world_size:
        raise ConfigError(f"batch_size {config.batch_size} must divide evenly over {dist.world_size} processes")
    sampler = DistributedSampler(dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                                 seed=config.seed, drop_last=False)
    loader = DataLoader(dataset, batch_size=config.batch_size // dist.world_size, sampler=sampler,
                        num_workers=config.num_workers, pin_memory=dist.device.startswith("cuda"))
    return loader, sampler


def _train_epoch(
    trainer: _Trainer, loader: DataLoader, config: TrainConfig, dist: DistContext, state: _LoopState,
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
        with _autocast(config.precision, dist.device):
            logits = model(images)
        _check_labels(labels, logits)
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


def _backward_step(trainer: _Trainer, loss: Tensor, params: list[Tensor], config: TrainConfig) -> None:
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
        _check_dataset(dataset, split)
    model.to(dist.device)
    if not resume:
        _seed_everything(config.seed + dist.rank)
    trainer = _build_trainer(model, config, dist)
    directory = Path(checkpoint_dir) if checkpoint_dir is not None else None
    state = _LoopState(best=state_tensors(model))
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
    trainer: _Trainer, loader: DataLoader, sampler: DistributedSampler, val_set: Dataset, config: TrainConfig,
    dist: DistContext, state: _LoopState, directory: Path | None, progress: _Progress, log_csv: str | Path | None,
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


def remove_checkpoint(directory: str | Path) -> None:
    """Delete a finished run's checkpoint folder."""
    shutil.rmtree(directory, ignore_errors=True)


# --------------------------------------------------------------------- multi-task inference
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


def json_dumps(obj: Any) -> str:
    """Sorted, indented JSON (the form every result file uses)."""
    return json.dumps(obj, indent=2, sort_keys=True)


# ------------------------------------------------------------------------------ sequences
@dataclass
class SequenceTask:
    """One task of a sequence: its name, data spec and opened splits."""

    name: str
    data: str
    train: Dataset
    val: Dataset
    test: Dataset
    classes: list[str]
    split_info: dict[str, Any] = field(default_factory=dict)


def check_classes(model: Any, task: str, classes: Sequence[str]) -> None:
    """The data must have exactly the task head's classes (same number, and same names where recorded)."""
    info = model.tasks[task]
    if len(classes) != info.num_classes or (info.class_names and list(info.class_names) != list(classes)):
        shown = list(info.class_names)[:10] if info.class_names else f"{info.num_classes} unnamed classes"
        raise ConfigError(
            f"the data has {len(classes)} classes {list(classes)[:10]} but task {task!r} has a head of "
            f"{info.num_classes} classes ({shown}); use the data the task was made for, or a new task name"
        )


def prepare_task(model: Any, name: str, classes: Sequence[str], *, own_bn: bool = False, seed: int = 0) -> None:
    """Add task ``name`` to a RecastModel and activate it; an existing task is retrained from scratch.

    An existing task must have the same classes (its head's size and names). The new head's initial
    values come from ``seed``.
    """
    if name in model.tasks:
        check_classes(model, name, classes)
        model.delete_task(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.add_task(name, len(classes), class_names=list(classes), own_bn=own_bn)
    model.set_task(name)


def learn_sequence(
    model: Any, tasks: Sequence[SequenceTask], config: TrainConfig, *, dist: DistContext | None = None,
    own_bn: bool = False, progress: bool = False, on_task: Callable[[Any, SequenceTask, FitResult], int] | None = None,
) -> dict[str, Any]:
    """Learn ``tasks`` one after another; after each, measure every task learned so far on its test split.

    ``on_task(model, task, result)`` is called after each task is learned and returns its size in
    bytes on disk (e.g. by saving it). Returns ``tasks`` records, the ``accuracy_matrix`` and the
    metrics of :mod:`recast.metrics`.
    """
    from recast import metrics

    dist = dist or DistContext()
    matrix: list[list[float | None]] = []
    records = []
    for i, task in enumerate(tasks):
        prepare_task(model, task.name, task.classes, own_bn=own_bn, seed=config.seed)
        result = fit_task(model, task.train, task.val, task.test, config, dist=dist, progress=progress)
        size = on_task(model, task, result) if on_task is not None else None
        records.append({"name": task.name, "data": task.data, "test_accuracy": result.test_accuracy,
                        "val_accuracy": result.val_accuracy, "best_epoch": result.best_epoch,
                        "params": model.task_parameters(task.name), "bytes": size,
                        "train_seconds": result.train_seconds, "peak_rss_mb": result.peak_rss_mb,
                        "split_info": task.split_info})
        row: list[float | None] = []
        for earlier in tasks[: i + 1]:
            model.set_task(earlier.name)
            row.append(evaluate(model, earlier.test, batch_size=config.eval_batch_size or config.batch_size,
                                precision=config.precision, dist=dist))
        matrix.append(row + [None] * (len(tasks) - i - 1))
    return {"tasks": records, "accuracy_matrix": matrix, "average_accuracy": metrics.average_accuracy(matrix),
            "forgetting": metrics.forgetting(matrix), "bwt": metrics.backward_transfer(matrix)}


def versions() -> dict[str, str]:
    """Versions of the software a result depends on."""
    import platform

    import timm
    import torchvision

    from recast import __version__

    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "recast": __version__}
