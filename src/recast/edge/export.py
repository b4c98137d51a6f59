"""Exporting a RECAST model to an ONNX directory: one graph for every task, or one task's plain graph.

Layout of the directory (read on the device by :mod:`recast.edge.device`)::

    manifest.json              format, kind, fingerprint, graph inputs, tasks, sha256 of every file
    graph.onnx                 the graph (task-generic or plain)
    compose.onnx               task-generic, composing at switch or load: coefficients -> generated weights
    tasks/<name>.safetensors   task-generic only: each task's packed task file (see recast.edge.pack)

The task-generic graph is exported with ``torch.onnx.export(dynamo=False)`` in one of three modes
(:mod:`recast.edge.graph`): ``per-call`` (the default), one graph with inputs ``images`` (dynamic
batch), ``coefficients`` (the task file's packed vector), ``<head>.weight`` and ``<head>.bias``
(dynamic number of classes) that composes the weights in every call; ``at-switch``, where
``compose.onnx`` turns the coefficients into the generated weights once when a task is loaded and
``graph.onnx`` takes ``images``, the head and those weights (``weight.<layer>``); or ``at-load``,
where the generated weights are *initializers* of ``graph.onnx`` whose data is left out (external
data that the device supplies): loading a task composes them and builds a session of its own with
them (ONNX Runtime's ``SessionOptions.add_external_initializers``). Every mode ships the same task files,
and no mode re-exports anything per task. Composing per call costs one small matrix product per
bank and keeps a task switch at feeding a few hundred numbers. Weights that are graph inputs cost
ONNX Runtime's CPU provider its weight pre-packing and, for convolutions, its blocked (NCHWc)
kernels and the folding of BatchNorm and activations into them: on a small CNN that made the
task-generic graph several times slower than the plain one. ``at-load`` keeps the weights constant,
so its graph runs as fast as the plain graph; the price is a session per loaded task (building one
took about 11 ms for the shipped ResNet32) and that session's copy of the weights, while switching
between loaded tasks stays a choice of session. The edge benchmark measures all three. The plain
graph is ``model.export(task)`` with one input ``images``.
Every graph passes ``onnx.checker`` before it is written; the manifest is written last, so a directory whose manifest
is complete has every file it lists.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from pathlib import Path
from typing import Any

import onnx
import onnx.external_data_helper
import onnx.numpy_helper
import torch
from torch import nn

from recast import __version__
from recast.data.transforms import data_config
from recast.edge.device import IMAGES, MANIFEST_FILE, MANIFEST_FORMAT, MANIFEST_VERSION, EdgeError, EdgeRunner
from recast.edge.graph import ComposeGraph, PrecomposedGraph, TaskGraph, task_fits
from recast.edge.pack import packed_task_blob
from recast.errors import ConfigError, FileFormatError, TaskError
from recast.format.quantize import check_dtype
from recast.io import atomic_write_bytes, atomic_write_json
from recast.model import RecastModel

GRAPH_FILE = "graph.onnx"
COMPOSE_FILE = "compose.onnx"
COMPOSE_MODES = ("per-call", "at-switch", "at-load")
TASK_WEIGHTS = "task-weights"  # external-data location of the generated weights composing at load: never a file
LOGITS = "logits"
OPSET = 17


def export_onnx(
    model: RecastModel, out_dir: str | Path, *, task: str | None = None, dtype: str = "fp32", opset: int = OPSET,
    input_size: tuple[int, int, int] | None = None, compose: str = "per-call",
) -> dict[str, Any]:
    """Write ``out_dir`` (see the module docstring) and return its manifest.

    Without ``task``: the task-generic graph plus every task it can serve, packed as ``dtype``
    (tasks it cannot serve are listed under ``skipped`` with the reason). With ``task``: that task's
    plain graph. ``compose`` is ``per-call``, ``at-switch`` or ``at-load`` (see the module docstring). The
    graph's image size is the model's data config's (``input_size`` overrides it, e.g. a CNN at
    another resolution); the batch size is free. ``model`` itself is not changed (the graphs are
    traced from copies, on the CPU). An existing ``out_dir`` is replaced only when it is an earlier
    export.
    """
    check_dtype(dtype)
    if compose not in COMPOSE_MODES:
        raise ConfigError(f"unknown compose mode {compose!r}; use one of: {', '.join(COMPOSE_MODES)}")
    out_dir = Path(out_dir)
    _check_target(out_dir)
    config = data_config(model.net)
    size = tuple(input_size or config["input_size"])
    if task is not None:
        files, manifest = _plain(model, task, size, opset)
    else:
        files, manifest = _task_generic(model, dtype, size, opset, compose)
    manifest.update({
        "format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION, "library_version": __version__,
        "fingerprint": model.fingerprint, "graph": GRAPH_FILE, "opset": opset,
        "input_size": list(size), "mean": list(config["mean"]), "std": list(config["std"]),
        "files": {name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)} for name, data in files.items()},
    })
    previous = _previous_files(out_dir)
    for name, data in files.items():
        atomic_write_bytes(out_dir / name, data)
    atomic_write_json(out_dir / MANIFEST_FILE, manifest)
    for stale in previous - set(files):
        (out_dir / stale).unlink(missing_ok=True)
    return manifest


def _task_generic(
    model: RecastModel, dtype: str, size: tuple[int, ...], opset: int, compose: str
) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The task-generic graph (and compose graph) and every task file it serves."""
    graph = TaskGraph(model).cpu()
    head = model.head_name
    task_inputs = ["coefficients", f"{head}.weight", f"{head}.bias"]
    servable = {name: task_fits(model, name) for name in model.tasks}
    tasks = [name for name, reason in servable.items() if reason is None]
    if not tasks:
        raise TaskError("no task of this model fits a task-generic graph: " + "; ".join(f"{k}: {v}" for k, v in servable.items()))
    example = {k: v.cpu() for k, v in model.task_tensors(tasks[0]).items()}
    args = (torch.zeros(2, *size), *(example[name] for name in task_inputs))
    dynamic = {IMAGES: {0: "batch"}, task_inputs[1]: {0: "classes"}, task_inputs[2]: {0: "classes"},
               LOGITS: {0: "batch", 1: "classes"}}
    if compose == "per-call":
        files = {GRAPH_FILE: onnx_bytes(graph, args, [IMAGES, *task_inputs], dynamic, opset)}
    else:
        weights = tuple(graph.compose(args[1]))
        files = {
            COMPOSE_FILE: onnx_bytes(ComposeGraph(graph), (args[1],), task_inputs[:1], {}, opset, graph.weight_names),
            GRAPH_FILE: onnx_bytes(PrecomposedGraph(graph), (args[0], *args[2:], *weights),
                                   [IMAGES, *task_inputs[1:], *graph.weight_names], dynamic, opset),
        }
        if compose == "at-load":
            files[GRAPH_FILE] = inputs_to_initializers(files[GRAPH_FILE], dict(zip(graph.weight_names, weights, strict=True)))
    records: dict[str, Any] = {}
    for name in tasks:
        file = f"tasks/{name}.safetensors"
        files[file] = packed_task_blob(model, name, dtype)
        info = model.tasks[name]
        records[name] = {"file": file, "num_classes": info.num_classes, "class_names": info.class_names, "dtype": dtype}
    features = example[task_inputs[1]].shape[1]
    manifest = {
        "kind": "task-generic", "task_inputs": task_inputs, "tasks": records, "compose": compose,
        "compose_graph": COMPOSE_FILE if compose != "per-call" else None,
        "weight_inputs": graph.weight_names if compose == "at-switch" else [],
        "weight_initializers": graph.weight_names if compose == "at-load" else [],
        "skipped": {k: v for k, v in servable.items() if v is not None},
        "inputs": {IMAGES: [None, *size], task_inputs[0]: [graph.coefficient_count],
                   task_inputs[1]: [None, features], task_inputs[2]: [None]},
    }
    return files, manifest


def _plain(model: RecastModel, task: str, size: tuple[int, ...], opset: int) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Task ``task``'s plain graph (the exported model): images in, logits out."""
    if task not in model.tasks:
        raise TaskError(f"no task named {task!r}; existing tasks: {', '.join(sorted(model.tasks)) or 'none'}")
    net = model.export(task).cpu().eval()
    graph = onnx_bytes(net, (torch.zeros(2, *size),), [IMAGES], {IMAGES: {0: "batch"}, LOGITS: {0: "batch"}}, opset)
    info = model.tasks[task]
    manifest = {
        "kind": "plain", "task": task, "task_inputs": [], "skipped": {},
        "tasks": {task: {"file": None, "num_classes": info.num_classes, "class_names": info.class_names}},
        "inputs": {IMAGES: [None, *size]},
    }
    return {GRAPH_FILE: graph}, manifest


def onnx_bytes(
    module: nn.Module, args: tuple[torch.Tensor, ...], input_names: list[str], dynamic_axes: dict[str, dict[int, str]],
    opset: int = OPSET, output_names: list[str] | None = None,
) -> bytes:
    """``module`` exported by the TorchScript-based ONNX exporter and checked by ``onnx.checker``."""
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # timm's shape assertions are constant for a fixed image size: the trace stays correct
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            module, args, buffer, input_names=input_names, output_names=output_names or [LOGITS], dynamic_axes=dynamic_axes,
            opset_version=opset, dynamo=False, do_constant_folding=True,
        )
    data = buffer.getvalue()
    onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    return data


def inputs_to_initializers(data: bytes, values: dict[str, torch.Tensor]) -> bytes:
    """The ONNX model ``data`` with the graph inputs named in ``values`` turned into initializers
    whose data is external (location :data:`TASK_WEIGHTS`, a file that is never written).

    A device supplies each task's composed weights for them when it builds the task's session
    (``SessionOptions.add_external_initializers``); ONNX Runtime then treats them as constants: it
    pre-packs them and folds BatchNorm and activations into the convolutions. (Overriding ordinary
    initializers with ``add_initializer`` does not work here: the graph optimiser folds the values
    stored in the file.) ``values`` gives the shapes and types.
    """
    model = onnx.load_from_string(data)
    kept = [i for i in model.graph.input if i.name not in values]
    if len(kept) != len(model.graph.input) - len(values):
        raise ValueError("every value must name a graph input")
    del model.graph.input[:]
    model.graph.input.extend(kept)
    tensors = [onnx.numpy_helper.from_array(value.detach().cpu().numpy(), name) for name, value in values.items()]
    model.graph.initializer.extend(tensors)
    onnx.checker.check_model(model, full_check=True)  # checked with the data in place (the checker looks for the file)
    offset = 0
    for tensor in model.graph.initializer[len(model.graph.initializer) - len(tensors):]:
        length = len(tensor.raw_data)
        onnx.external_data_helper.set_external_data(tensor, location=TASK_WEIGHTS, offset=offset, length=length)
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        offset += length
    return model.SerializeToString()


def _check_target(out_dir: Path) -> None:
    """Refuse to write into a non-empty directory that is not an earlier export (it may hold other files)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FileFormatError(f"{out_dir}: exists and is not a directory; pick another output directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_FILE).is_file():
        raise FileFormatError(f"{out_dir}: not empty and not an ONNX export of recast; pick an empty or new directory")


def _previous_files(out_dir: Path) -> set[str]:
    """Files an earlier export in ``out_dir`` listed (removed when the new one no longer has them)."""
    try:
        files = json.loads((out_dir / MANIFEST_FILE).read_text(encoding="utf-8")).get("files", {})
    except (FileNotFoundError, ValueError, AttributeError):
        return set()
    return {name for name in files if isinstance(name, str) and ".." not in Path(name).parts and not Path(name).is_absolute()}


def check_export(model: RecastModel, out_dir: str | Path, batch_sizes: tuple[int, ...] = (1, 3), seed: int = 0) -> dict[str, float]:
    """Largest absolute difference, per task, between ONNX Runtime on ``out_dir`` and ``model``'s forward.

    Random images of the graph's size, at every batch size in ``batch_sizes``, through the model in
    evaluation mode on its own device; its active task and training mode are restored afterwards.
    """
    try:
        runner = EdgeRunner(out_dir)
    except EdgeError as exc:
        raise FileFormatError(str(exc)) from None
    generator = torch.Generator().manual_seed(seed)
    active, was_training = model.active_task, model.training
    device = next(model.parameters()).device
    diffs: dict[str, float] = {}
    model.eval()
    try:
        for task in runner.task_names:
            model.set_task(task)
            for batch in batch_sizes:
                images = torch.randn(batch, *runner.manifest["input_size"], generator=generator)
                with torch.no_grad():
                    expected = model(images.to(device)).cpu().numpy()
                got = runner.run(images.numpy(), task)
                diffs[task] = max(diffs.get(task, 0.0), float(abs(got - expected).max()))
    finally:
        model.train(was_training)
        if active is not None:
            model.set_task(active)
    return diffs
