"""The options of one task's training, read from defaults, a JSON/TOML file and flags."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from recast.data.decode import DEFAULT_MAX_PIXELS, check_max_pixels
from recast.data.transforms import AUGMENT_PRESETS, check_augment
from recast.errors import ConfigError, FileFormatError, RecastError
from recast.io import read_json

try:
    import tomllib
except ImportError:  # Python 3.10: TOML config files are refused with a clear message
    tomllib = None  # type: ignore[assignment]

PRECISIONS = ("fp32", "bf16", "fp16")
AUGMENTS = AUGMENT_PRESETS


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
        augment: the training split's augmentation: ``default`` (random resized crops and flips),
            ``reference`` (the reference release's preset), ``none`` (the evaluation transform);
            ``True``/``False`` are read as ``default``/``none``.
        eval_batch_size: batch for validation and test (``None``: ``batch_size``).
        image_size: the input side length the model and the transforms were set to (``None``: the
            backbone's own); recorded here so that every result file states it.
        skip_bad_images: skip image files that do not decode (counted in the split info) instead
            of stopping at the first one.
        max_pixels: image files with more pixels are refused before decoding (``None``: no limit).
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
    augment: str = "default"
    eval_batch_size: int | None = None
    image_size: int | None = None
    skip_bad_images: bool = False
    max_pixels: int | None = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "step_size"):
            _check_int(name, getattr(self, name), minimum=1)
        if isinstance(self.augment, bool):  # the older boolean form
            object.__setattr__(self, "augment", "default" if self.augment else "none")
        check_augment(self.augment)
        check_max_pixels(self.max_pixels)
        for name in ("max_steps", "eval_batch_size", "image_size"):
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
        if tomllib is None:
            raise ConfigError("TOML config files need Python 3.11 or newer; use a JSON file")
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
