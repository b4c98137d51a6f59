"""Model directories as training sees them: open one for a method, list its task records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from recast.backbones import load_backbone
from recast.errors import ConfigError, FileFormatError
from recast.format import BACKBONE_FILE, is_model_directory
from recast.format import task_records as committed_task_records
from recast.methods import build_method, load_method
from recast.train.resolution import set_image_size


def create_directory(
    directory: str | Path, model: str, *, method: str | None = None, options: dict[str, Any] | None = None,
    weights: str | None = None,
) -> None:
    """Make a model directory for ``method`` (default ``recast``) from the backbone spec ``model``."""
    base = load_backbone(model, weights=weights)
    build_method(method or "recast", base, **(options or {})).save_pretrained(directory)


def load_model(directory: str | Path, *, method: str | None = None, image_size: int | None = None) -> Any:
    """The model of ``directory`` (any method), its network set to ``image_size`` when given.

    ``method``, when given, must be the directory's: another method is an error, not a silent switch.
    """
    if not is_model_directory(directory):
        raise FileFormatError(f"{directory}: not a recast model directory (it has no model config); "
                              "create one with `recast train DIR --model SPEC --target T ...` or `recast mimic`")
    model = load_method(directory)
    current = getattr(model, "method", "recast")
    if method and method != current:
        raise ConfigError(f"{directory} was made for method {current!r}, not {method!r}; "
                          "use another directory for another method")
    set_image_size(model.net, image_size)
    return model


def recorded_image_size(model: Any, task: str) -> int | None:
    """The input size task ``task`` was trained at, as its record states (``None``: the backbone's own)."""
    meta = model.tasks[task].meta or {}
    size = (meta.get("train_config") or {}).get("image_size")
    return int(size) if isinstance(size, int) and not isinstance(size, bool) else None


def recorded_augment(model: Any, task: str) -> str:
    """The augmentation preset task ``task`` was trained with, as its record states (``default`` when unstated)."""
    meta = model.tasks[task].meta or {}
    augment = (meta.get("train_config") or {}).get("augment")
    if augment is True or augment is None:  # records made before the presets
        return "default"
    return "none" if augment is False else str(augment)


def task_records(directory: str | Path) -> list[dict[str, Any]]:
    """The task records of a model directory, as its committed config lists them, without loading any weights."""
    directory = Path(directory)
    if not is_model_directory(directory):
        raise FileFormatError(f"{directory}: not a recast model directory (it has no model config)")
    rows = []
    for name, record in committed_task_records(directory).items():
        record = record if isinstance(record, dict) else {}
        metrics = record.get("metrics") or {}
        rows.append({
            "task": record.get("task", name), "num_classes": record.get("num_classes"),
            "params": record.get("params", {}), "bytes": record.get("bytes"),
            "test_accuracy": metrics.get("test_accuracy"), "val_accuracy": metrics.get("val_accuracy"),
            "method": record.get("method"), "seed": record.get("seed"),
            "image_size": (record.get("train_config") or {}).get("image_size"),
        })
    return rows


def backbone_bytes(directory: str | Path) -> int | None:
    """Size on disk of the directory's backbone file (``None`` when it has none)."""
    path = Path(directory) / BACKBONE_FILE
    return path.stat().st_size if path.is_file() else None
