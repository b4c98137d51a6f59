"""The device side: run RECAST tasks from an exported ONNX directory with numpy and ONNX Runtime only.

This module imports no torch and nothing else from ``recast`` (importing the ``recast`` package
loads torch), so a device can carry this one file: it needs ``numpy``, ``onnxruntime`` and
``safetensors`` (its numpy part). Load it by path, or as ``recast.edge.device`` where torch is at hand.

An exported directory (``recast export DIR --onnx OUT``) holds ``manifest.json``, ``graph.onnx`` and,
for the task-generic graph, ``tasks/<name>.safetensors``. The manifest lists every file with its
sha256: :class:`EdgeRunner` refuses a directory with a missing or altered file before it builds a
session. A task file (from the directory or delivered later, written by ``recast pack``) is checked
against the graph: format, backbone fingerprint, and the shape of every array the graph takes.
Running a task is feeding its arrays; switching tasks is picking other arrays. When the export
composes at switch (``compose.onnx`` in the manifest), loading a task also runs that small graph
once to turn its coefficients into the generated weights, which are then fed like the head. When it
composes at load (``weight_initializers`` in the manifest), the graph file leaves those weights
out and each task gets a session built with its own when it is loaded; switching between loaded
tasks is then picking another session (and feeding its head).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import safetensors.numpy

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "recast-onnx"
MANIFEST_VERSION = "1"
TASK_FORMAT = "recast-task"
SCALE_SUFFIX = "/scale"  # as recast.format.quantize.SCALE_SUFFIX (a test keeps the two equal)
IMAGES = "images"


class EdgeError(Exception):
    """A missing, altered or mismatched file on the device; the message says which and what to do."""


@dataclass
class EdgeTask:
    """One task: its file's float32 arrays, what the graph is fed (``feeds``), and what it is.

    ``feeds`` equals ``arrays`` when the graph composes the weights itself; with a compose graph it
    holds the head and the generated weights composed once when the task was loaded. ``session``
    is the task's own session when the export composes at load (its weights are the graph's
    external initializers; ``initializers`` keeps their buffers alive, as ONNX Runtime requires),
    else ``None``.
    """

    name: str
    arrays: dict[str, np.ndarray]
    num_classes: int
    class_names: list[str] | None
    dtype: str
    file_bytes: int
    feeds: dict[str, np.ndarray] = field(default_factory=dict)
    session: Any = None
    initializers: list[Any] = field(default_factory=list)


def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes as hex."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of an exported directory, after checking every file it lists by size and sha256."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EdgeError(f"{path}: not found; export the model again with `recast export DIR --onnx {directory}`") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EdgeError(f"{path}: not valid JSON ({exc}); export the model again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise EdgeError(f"{path}: not a recast ONNX manifest")
    if manifest.get("format_version") != MANIFEST_VERSION:
        raise EdgeError(f"{path}: manifest version {manifest.get('format_version')!r}, this reader knows {MANIFEST_VERSION}")
    files = manifest.get("files")
    if not isinstance(files, dict) or manifest.get("graph") not in files:
        raise EdgeError(f"{path}: the manifest lists no graph file")
    for name, entry in files.items():
        _check_listed_file(directory, name, entry)
    return manifest


def _check_listed_file(directory: Path, name: str, entry: Any) -> None:
    """Refuse a listed file that is outside the directory, missing, or not the bytes listed."""
    file = directory / name
    if Path(name).is_absolute() or ".." in Path(name).parts or not isinstance(entry, dict):
        raise EdgeError(f"{directory / MANIFEST_FILE}: bad entry for {name!r}")
    if not file.is_file():
        raise EdgeError(f"{file}: missing (the manifest lists it); copy the whole exported directory again")
    if file.stat().st_size != entry.get("bytes") or sha256_file(file) != entry.get("sha256"):
        raise EdgeError(f"{file}: altered or corrupt (size or sha256 differs from the manifest); copy it again")


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` strings of a safetensors blob (8-byte header length, then JSON)."""
    if len(data) < 8:
        raise EdgeError("not a safetensors file (shorter than its header length)")
    length = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8:8 + length])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise EdgeError("not a safetensors file (unreadable header)") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return {k: v for k, v in metadata.items() if isinstance(v, str)} if isinstance(metadata, dict) else {}


def dequantize(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Float32 arrays from fp32, fp16 or int8-with-row-scales arrays (``NAME/scale`` per int8 ``NAME``)."""
    out: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        scale = arrays.get(name + SCALE_SUFFIX)
        if scale is not None:
            if value.dtype != np.int8 or value.ndim < 1 or scale.shape != (value.shape[0],):
                raise EdgeError(f"{name}: int8 rows and scales do not fit ({value.shape}, {scale.shape})")
            value = value.astype(np.float32) * scale.astype(np.float32).reshape((-1,) + (1,) * (value.ndim - 1))
        elif value.dtype == np.int8:
            raise EdgeError(f"{name}: int8 without its {name + SCALE_SUFFIX}")
        out[name] = np.ascontiguousarray(value, dtype=np.float32)
    return out


def read_task(data: bytes, manifest: dict[str, Any], source: str = "task file") -> EdgeTask:
    """A task file's arrays, dequantised and checked against the graph the manifest describes."""
    try:
        meta = safetensors_metadata(data)
    except EdgeError as exc:
        raise EdgeError(f"{source}: {exc}") from None
    if meta.get("format") != TASK_FORMAT:
        raise EdgeError(f"{source}: not a recast task file (its metadata has no format {TASK_FORMAT!r})")
    if meta.get("fingerprint") != manifest.get("fingerprint"):
        raise EdgeError(
            f"{source}: made for another backbone (fingerprint {str(meta.get('fingerprint'))[:12]}..., this graph's "
            f"is {str(manifest.get('fingerprint'))[:12]}...); use the graph exported from its backbone"
        )
    try:
        arrays = dequantize(safetensors.numpy.load(data))
    except EdgeError as exc:
        raise EdgeError(f"{source}: {exc}") from None
    except Exception as exc:  # safetensors raises several types for corrupt input
        raise EdgeError(f"{source}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    _check_shapes(source, arrays, manifest["inputs"], manifest["task_inputs"])
    name = meta.get("task", "")
    num_classes = int(arrays[manifest["task_inputs"][-1]].shape[0])
    recorded = manifest.get("tasks", {}).get(name, {})
    try:
        class_names = json.loads(meta["class_names"]) if "class_names" in meta else recorded.get("class_names")
    except json.JSONDecodeError:
        raise EdgeError(f"{source}: its class_names metadata is not JSON") from None
    return EdgeTask(name, arrays, num_classes, class_names, meta.get("dtype", "fp32"), len(data))


def _check_shapes(source: str, arrays: dict[str, np.ndarray], inputs: dict[str, list[Any]], needed: list[str]) -> None:
    """Every graph input the task feeds is present with the graph's shape (``None`` = any size)."""
    missing = [n for n in needed if n not in arrays]
    if missing:
        raise EdgeError(f"{source}: lacks {', '.join(missing)} (the graph takes them as inputs)")
    extra = [n for n in arrays if n not in needed]
    if extra:
        raise EdgeError(f"{source}: holds {', '.join(extra)}, which this graph cannot take; export that task's plain graph")
    for name in needed:
        shape, want = arrays[name].shape, inputs[name]
        if len(shape) != len(want) or any(w is not None and s != w for s, w in zip(shape, want, strict=True)):
            raise EdgeError(f"{source}: {name} has shape {list(shape)}, the graph takes {want} (None: any size)")
    rows = {arrays[n].shape[0] for n in needed if n != "coefficients"}
    if len(rows) > 1:
        raise EdgeError(f"{source}: the head's weight and bias disagree on the number of classes")


class EdgeRunner:
    """An exported graph in one ONNX Runtime session, and the tasks it serves.

    ``threads`` sets ONNX Runtime's intra-op threads (``None``: its default). ``spinning`` lets
    those threads busy-wait for work after a run; it is off by default: a runner holds several
    sessions (the compose graph, one per task when composing at load), each with its own threads,
    and their spinning takes the cores from whichever session runs next (on a 2-core CPU the plain
    ResNet32 graph ran twice as fast without it) and burns a phone's battery while idle.
    """

    def __init__(self, directory: str | Path, threads: int | None = None, spinning: bool = False) -> None:
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        self.threads = threads
        self.spinning = spinning
        self.graph = (self.directory / self.manifest["graph"]).read_bytes()
        self.session: ort.InferenceSession | None = None  # composing at load, each task has its own
        if not self.manifest.get("weight_initializers"):
            self.session = ort.InferenceSession(self.graph, self._options(), providers=["CPUExecutionProvider"])
        compose = self.manifest.get("compose_graph")
        self.composer = None
        if compose:
            data = (self.directory / compose).read_bytes()
            self.composer = ort.InferenceSession(data, self._options(), providers=["CPUExecutionProvider"])
        self._tasks: dict[str, EdgeTask] = {}

    def _options(self) -> ort.SessionOptions:
        """Session options with this runner's thread count and spinning."""
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        if self.threads is not None:
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
        return options

    @property
    def task_generic(self) -> bool:
        """True when the graph takes the task as inputs (False: one plain task)."""
        return self.manifest.get("kind") == "task-generic"

    @property
    def task_names(self) -> list[str]:
        """Tasks shipped in the directory."""
        return list(self.manifest.get("tasks", {}))

    def task(self, name: str) -> EdgeTask:
        """A task shipped in the directory (read, checked and kept on first use)."""
        if name not in self._tasks:
            entry = self.manifest.get("tasks", {}).get(name)
            if entry is None:
                raise EdgeError(f"no task {name!r} in {self.directory}; it has: {', '.join(self.task_names) or 'none'}")
            if not self.task_generic:
                self._tasks[name] = EdgeTask(name, {}, entry["num_classes"], entry.get("class_names"), "fp32", 0)
            else:
                path = self.directory / entry["file"]
                self._tasks[name] = self._prepare(read_task(path.read_bytes(), self.manifest, str(path)))
        return self._tasks[name]

    def load_task(self, data: bytes, source: str = "task file") -> EdgeTask:
        """A delivered task file (bytes), checked against this graph."""
        if not self.task_generic:
            raise EdgeError(f"{self.directory} holds one plain task's graph; task files need a task-generic export")
        return self._prepare(read_task(data, self.manifest, source))

    def _prepare(self, task: EdgeTask) -> EdgeTask:
        """Fill ``task.feeds``: its arrays, or its head plus the weights the compose graph makes of them
        (composing at load, those weights go into a session of the task's own instead)."""
        if self.composer is None:
            task.feeds = task.arrays
            return task
        weights = self.composer.run(None, {"coefficients": task.arrays["coefficients"]})
        task.feeds = {k: v for k, v in task.arrays.items() if k != "coefficients"}
        constants = self.manifest.get("weight_initializers") or []
        if not constants:
            task.feeds.update(zip(self.manifest["weight_inputs"], weights, strict=True))
            return task
        options = self._options()
        if not hasattr(options, "add_external_initializers"):
            raise EdgeError(f"onnxruntime {ort.__version__} cannot supply weights at load; upgrade it, or export "
                            "with --compose at-switch")
        task.initializers = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(w)) for w in weights]
        options.add_external_initializers(list(constants), task.initializers)
        task.session = ort.InferenceSession(self.graph, options, providers=["CPUExecutionProvider"])
        return task

    def run(self, images: np.ndarray, task: EdgeTask | str | None = None) -> np.ndarray:
        """Logits ``(B, classes)`` of ``task`` for float32 images ``(B, C, H, W)`` (already normalised)."""
        want = self.manifest["inputs"][IMAGES][1:]
        if np.ndim(images) != 4 or list(np.shape(images)[1:]) != want:
            raise EdgeError(f"images must be (batch, {', '.join(map(str, want))}), got {list(np.shape(images))}")
        feeds = {IMAGES: np.ascontiguousarray(images, dtype=np.float32)}
        if self.task_generic:
            if task is None:
                raise EdgeError("name the task to run: this graph serves several")
            task = task if isinstance(task, EdgeTask) else self.task(task)
            feeds.update(task.feeds)
            return (task.session or self.session).run(None, feeds)[0]
        return self.session.run(None, feeds)[0]

    def preprocess(self, pixels: np.ndarray) -> np.ndarray:
        """``(B, H, W, 3)`` uint8 pixels of the graph's input size -> normalised ``(B, 3, H, W)`` float32."""
        mean = np.asarray(self.manifest["mean"], dtype=np.float32).reshape(1, 3, 1, 1)
        std = np.asarray(self.manifest["std"], dtype=np.float32).reshape(1, 3, 1, 1)
        images = pixels.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
        return (images - mean) / std
