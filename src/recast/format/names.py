"""The names of a model directory's files and the one rule every task name follows.

A model directory (``docs/ARCHITECTURE.md``, "File format")::

    recast_config.json         the commit point: config, recipe, fingerprint, every file's sha256
    backbone.safetensors       what all tasks share (banks once + frozen weights)
    tasks/<name>.safetensors   one task's tensors
    tasks/<name>.json          that task's record (a copy of the one the config pins)

Task names become file names, so every name that comes from outside (API, command line, sequence
files, records read from disk) passes :func:`check_task_name` before anything uses it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from recast.errors import TaskError

CONFIG_FILE = "recast_config.json"
BACKBONE_FILE = "backbone.safetensors"
TASKS_DIR = "tasks"
FORMAT_VERSION = "1"

MODEL_FORMAT = "recast-model"  # a RECAST model (banks, adapters, linear probe)
BASELINE_FORMAT = "recast-baseline"  # PEFT LoRA / VeRA or full fine-tuning
BACKBONE_FORMAT = "recast-backbone"
TASK_FORMAT = "recast-task"

TASK_NAME_RULE = "1 to 64 characters: ASCII letters, digits, '_' or '-', the first a letter or digit"
_TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def is_task_name(name: Any) -> bool:
    """True when ``name`` follows the task-name rule (so it is safe as a file name)."""
    return isinstance(name, str) and _TASK_NAME.fullmatch(name) is not None


def check_task_name(name: Any) -> str:
    """``name`` itself when it follows the rule; otherwise a ``TaskError`` that states the rule."""
    if not is_task_name(name):
        raise TaskError(f"invalid task name {name!r}: use {TASK_NAME_RULE}")
    return name


def task_path(directory: str | Path, name: str, suffix: str) -> Path:
    """``DIR/tasks/<name><suffix>`` for a name that passes the rule (never outside ``tasks/``)."""
    return Path(directory) / TASKS_DIR / f"{check_task_name(name)}{suffix}"
