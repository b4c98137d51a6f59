"""What the files of a model directory must contain, checked in one place.

Every reader (loading a model or a task, ``recast verify``, the server) goes through these
checks, so a file is judged the same way wherever it is read: config records, task records,
safetensors headers, and tensors against the shapes a model expects.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import safetensors.torch
from torch import Tensor

from recast.errors import FileFormatError
from recast.format.names import (
    BACKBONE_FORMAT,
    BASELINE_FORMAT,
    FORMAT_VERSION,
    MODEL_FORMAT,
    TASK_FORMAT,
    is_task_name,
)

MODEL_FORMATS = (MODEL_FORMAT, BASELINE_FORMAT)

# Keys of a task record that the format owns; everything else is the task's free-form metadata.
RECORD_KEYS = frozenset(
    {"task", "format_version", "num_classes", "class_names", "own_bn", "params", "effective_coefficients",
     "bytes", "sha256", "fingerprint", "format", "dtype"}
)


def is_sha256(value: Any) -> bool:
    """True for 64 lowercase hex digits."""
    return isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) is not None


def encode(tensors: dict[str, Tensor], header: dict[str, str]) -> bytes:
    """Safetensors bytes of ``tensors`` (moved to the CPU, contiguous) with ``header`` as metadata.

    The same tensors and header always give the same bytes (so the same sha256): safetensors
    writes its metadata in hash-map order, which changes from call to call, so the metadata is
    put in sorted order here (same length, so offsets and padding are unchanged).
    """
    data = safetensors.torch.save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, header)
    return _sorted_metadata(data)


def _sorted_metadata(data: bytes) -> bytes:
    """``data`` with the ``__metadata__`` of its header in sorted key order (else unchanged)."""
    length = int.from_bytes(data[:8], "little")
    text = data[8:8 + length].decode("utf-8")
    header = json.loads(text)
    if not isinstance(header.get("__metadata__"), dict):
        return data
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    canonical = json.dumps(header, separators=(",", ":"), ensure_ascii=False)
    padded = canonical + " " * (len(text.encode("utf-8")) - len(canonical.encode("utf-8")))
    if len(padded.encode("utf-8")) != length or json.loads(padded) != json.loads(text):
        return data
    return data[:8] + padded.encode("utf-8") + data[8 + length:]


def decode(path: Path, data: bytes) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors blob; anything unreadable is a ``FileFormatError``."""
    try:
        return safetensors.torch.load(data), _metadata(data)
    except Exception as exc:  # safetensors raises several types for corrupt input
        raise FileFormatError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None


def _metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (header length, then JSON); {} when absent."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return {k: v for k, v in metadata.items() if isinstance(v, str)} if isinstance(metadata, dict) else {}


# ------------------------------------------------------------------------------------- config records
def check_config_record(path: Path, record: Any) -> None:
    """Refuse a ``recast_config.json`` that is not this format and version, or has ill-typed fields."""
    if not isinstance(record, dict) or record.get("format") not in MODEL_FORMATS:
        raise FileFormatError(f"{path}: not a recast model config")
    if record.get("format_version") != FORMAT_VERSION:
        raise FileFormatError(
            f"{path.parent}: format version {record.get('format_version')!r}, expected {FORMAT_VERSION}; "
            "use the recast version that wrote it"
        )
    problems = [f"'{key}' must be {kind}" for key, (kind, ok) in _config_field_checks(record).items() if not ok]
    if problems:
        raise FileFormatError(f"{path}: not a valid recast model config: " + "; ".join(problems))


def is_pinned(record: dict[str, Any]) -> bool:
    """True when a config pins every file by sha256 (the current layout; older ones do not)."""
    return "task_records" in record and "backbone_file" in record


def _config_field_checks(record: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """Each field of a model config with (what it must be, whether it is)."""
    tasks, records = record.get("tasks", []), record.get("task_records", {})
    pinned = record.get("backbone_file", {"sha256": "0" * 64})
    checks = {
        "fingerprint": ("a sha256", is_sha256(record.get("fingerprint"))),
        "recipe": ("null or an object", record.get("recipe") is None or isinstance(record.get("recipe"), dict)),
        "active": ("null or a task name", record.get("active") is None or isinstance(record.get("active"), str)),
        "tasks": ("a list of task names", isinstance(tasks, list) and all(is_task_name(t) for t in tasks)),
        "task_records": ("an object from task names to objects", isinstance(records, dict) and all(
            is_task_name(k) and isinstance(v, dict) for k, v in records.items())),
        "backbone_file": ("an object with the sha256 of backbone.safetensors",
                          isinstance(pinned, dict) and is_sha256(pinned.get("sha256"))),
    }
    if record["format"] == BASELINE_FORMAT:
        return {**checks, "method": ("a method name", isinstance(record.get("method"), str)),
                "options": ("an object", isinstance(record.get("options", {}), dict))}
    banks, adapters = record.get("banks", []), record.get("adapters", [])
    return {
        **checks,
        "config": ("an object", isinstance(record.get("config"), dict)),
        "banks": ("a list of objects with 'layers' (strings)", isinstance(banks, list) and all(
            isinstance(b, dict) and isinstance(b.get("layers"), list) and all(isinstance(x, str) for x in b["layers"])
            for b in banks)),
        "adapters": ("a list of objects with 'kind' and 'options'", isinstance(adapters, list) and all(
            isinstance(a, dict) and isinstance(a.get("kind"), str) and isinstance(a.get("options", {}), dict)
            for a in adapters)),
        "mimicry_report": ("null or an object", isinstance(record.get("mimicry_report") or {}, dict)),
        "method": ("null or an object", isinstance(record.get("method") or {}, dict)),
    }


# --------------------------------------------------------------------------------------- task records
def task_record_problems(record: dict[str, Any]) -> list[str]:
    """What is missing or ill-typed in a task record (empty when it is usable)."""
    problems = []
    num_classes = record.get("num_classes")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        problems.append(f"num_classes must be a positive integer, got {num_classes!r}")
    names = record.get("class_names")
    if names is not None and not (
        isinstance(names, list) and all(isinstance(n, str) for n in names) and len(names) == num_classes
    ):
        problems.append("class_names must be null or one string per class")
    if not isinstance(record.get("own_bn", False), bool):
        problems.append("own_bn must be true or false")
    if not is_sha256(record.get("sha256")):
        problems.append("sha256 of the tensor file is missing or malformed")
    return problems


def check_task_record(source: Path, record: Any, fingerprint: str) -> dict[str, Any]:
    """``record`` when it is a usable task record for the backbone ``fingerprint``; else a file error."""
    if not isinstance(record, dict):
        raise FileFormatError(f"{source}: not a recast task record (expected a JSON object)")
    problems = task_record_problems(record)
    if problems:
        raise FileFormatError(f"{source}: not a valid recast task record: " + "; ".join(problems))
    if record.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise FileFormatError(
            f"{source}: task format version {record.get('format_version')!r}, this library reads "
            f"{FORMAT_VERSION}; use the recast version that wrote it"
        )
    recorded = record.get("fingerprint", fingerprint)
    if recorded != fingerprint:
        raise FileFormatError(
            f"{source}: made for another backbone (fingerprint {str(recorded)[:12]}..., "
            f"this model's is {fingerprint[:12]}...); load it with the backbone it was trained on"
        )
    return record


# ----------------------------------------------------------------------------------- file headers
def task_header(name: str, fingerprint: str, dtype: str = "fp32") -> dict[str, str]:
    """The metadata every task file carries."""
    header = {"format": TASK_FORMAT, "format_version": FORMAT_VERSION, "fingerprint": fingerprint, "task": name}
    return header if dtype == "fp32" else {**header, "dtype": dtype}


def backbone_header(fingerprint: str, library_version: str) -> dict[str, str]:
    """The metadata of ``backbone.safetensors``."""
    return {"format": BACKBONE_FORMAT, "format_version": FORMAT_VERSION, "fingerprint": fingerprint,
            "library_version": library_version}


def check_task_header(path: Path, header: dict[str, str], fingerprint: str) -> None:
    """Refuse a task file whose metadata names another format, version or backbone."""
    if header.get("format") != TASK_FORMAT:
        raise FileFormatError(f"{path}: not a recast task file (its metadata has no format '{TASK_FORMAT}')")
    _check_version(path, header)
    if header.get("fingerprint") != fingerprint:
        raise FileFormatError(
            f"{path}: made for another backbone (fingerprint {str(header.get('fingerprint'))[:12]}..., "
            f"this model's is {fingerprint[:12]}...); load it with the backbone it was trained on"
        )


def check_backbone_header(path: Path, header: dict[str, str], fingerprint: str) -> None:
    """Refuse a backbone file whose metadata names another format, version or model."""
    if header.get("format", BACKBONE_FORMAT) != BACKBONE_FORMAT:
        raise FileFormatError(f"{path}: not a recast backbone file (metadata format {header.get('format')!r})")
    _check_version(path, header)
    if header.get("fingerprint") != fingerprint:
        raise FileFormatError(
            f"{path}: belongs to another model (fingerprint {str(header.get('fingerprint'))[:12]}..., "
            f"recast_config.json says {fingerprint[:12]}...); keep each backbone with its own config"
        )


def _check_version(path: Path, header: dict[str, str]) -> None:
    if header.get("format_version") != FORMAT_VERSION:
        raise FileFormatError(
            f"{path}: format version {header.get('format_version')!r}, this library reads {FORMAT_VERSION}; "
            "use the recast version that wrote it"
        )


def tensor_problems(tensors: dict[str, Tensor], expected: dict[str, Tensor]) -> list[str]:
    """Differences in names, shapes and dtypes between tensors read from a file and the model's."""
    problems = [f"missing {k}" for k in expected if k not in tensors]
    problems += [f"unexpected {k}" for k in tensors if k not in expected]
    for key, value in expected.items():
        if key in tensors and tensors[key].shape != value.shape:
            problems.append(f"{key}: shape {tuple(tensors[key].shape)} in file, {tuple(value.shape)} here")
        elif key in tensors and tensors[key].dtype != value.dtype:
            problems.append(f"{key}: dtype {tensors[key].dtype} in file, {value.dtype} here")
    return problems
