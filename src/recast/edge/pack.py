"""Packed task files (fp16 / int8) written from a model, read back, and measured for accuracy.

A packed task file is a normal task file (safetensors; metadata ``format`` = ``recast-task``, the
format version, the backbone ``fingerprint``, the ``task`` name) whose tensors went through
:func:`recast.format.quantize.quantize_tensors`, with ``dtype`` added to the metadata (and the
``num_classes`` / ``class_names`` a device needs to print labels). Reading one back dequantises it
to float32 tensors with exactly the names and shapes of ``RecastModel.task_tensors``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from torch import Tensor

from recast.errors import FileFormatError
from recast.format.quantize import DTYPES, check_dtype, dequantize_tensors, quantize_tensors
from recast.format.records import check_task_header, decode, encode, task_header
from recast.io import atomic_write_bytes
from recast.model import RecastModel
from recast.train import evaluate


def packed_task_blob(model: RecastModel, name: str, dtype: str) -> bytes:
    """Task ``name``'s file as bytes, its tensors stored as ``dtype`` (``fp32``, ``fp16`` or ``int8``)."""
    check_dtype(dtype)
    model.require_task(name)
    info = model.tasks[name]
    header = {**task_header(name, model.fingerprint, dtype), "dtype": dtype, "num_classes": str(info.num_classes)}
    if info.class_names:
        header["class_names"] = json.dumps(info.class_names)
    return encode(quantize_tensors(model.task_tensors(name), dtype), header)


def write_packed_task(model: RecastModel, name: str, dtype: str, out: str | Path) -> dict[str, Any]:
    """Write task ``name`` packed as ``dtype`` to ``out`` atomically; returns what was written."""
    data = packed_task_blob(model, name, dtype)
    atomic_write_bytes(out, data)
    return {"task": name, "dtype": dtype, "file": str(out), "bytes": len(data)}


def read_packed_task(model: RecastModel, data: bytes, source: str = "task file") -> tuple[str, dict[str, Tensor]]:
    """``(task name, float32 tensors)`` of a task file of any dtype, checked against ``model``.

    Refused with a ``FileFormatError`` naming ``source``: not a task file, another format version,
    another backbone (fingerprint), tensors that do not dequantise.
    """
    tensors, header = decode(Path(source), data)
    check_task_header(Path(source), header, model.fingerprint)
    try:
        return header.get("task", ""), dequantize_tensors(tensors)
    except FileFormatError as exc:
        raise FileFormatError(f"{source}: {exc}") from None


def with_task_tensors(model: RecastModel, name: str, tensors: dict[str, Tensor]) -> RecastModel:
    """A copy of ``model`` whose task ``name`` holds ``tensors`` (names and shapes of ``task_tensors``).

    ``model`` is not changed; the copy shares nothing with it that the swap writes to.
    """
    copied = copy.deepcopy(model)
    copied.set_task_tensors(name, tensors, f"tensors for task {name!r}")
    return copied


def packed_copy(model: RecastModel, name: str, dtype: str) -> RecastModel:
    """A copy of ``model`` whose task ``name`` went through a ``dtype`` task file and back."""
    _, tensors = read_packed_task(model, packed_task_blob(model, name, dtype))
    return with_task_tensors(model, name, tensors)


def packed_accuracy(
    model: RecastModel, name: str, dataset: Any, dtypes: tuple[str, ...] = DTYPES, batch_size: int = 256
) -> dict[str, dict[str, float | int]]:
    """Test accuracy of task ``name`` after a round trip through each packed dtype, with file bytes.

    ``{dtype: {"accuracy": ..., "bytes": ...}}``; ``fp32`` is the reference (identical to the
    model's own accuracy, as its round trip is exact).
    """
    results: dict[str, dict[str, float | int]] = {}
    for dtype in dtypes:
        copied = packed_copy(model, name, dtype)
        copied.set_task(name)
        accuracy = evaluate(copied, dataset, batch_size=batch_size, device="cpu")
        results[dtype] = {"accuracy": accuracy, "bytes": len(packed_task_blob(model, name, dtype))}
    return results
