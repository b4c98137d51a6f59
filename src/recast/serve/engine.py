"""The model behind the server: loaded once, its tasks kept in step with the directory's commits.

A task saved into the directory while the server runs (``recast train``, ``save_task``) is
committed when ``recast_config.json`` is replaced (the config lists the tasks and pins each file's
sha256). :meth:`Engine.refresh` notices a new config by its stat stamp, loads tasks whose pinned
sha256 is new and forgets tasks the config no longer lists: nothing half-written is ever read.
"""

from __future__ import annotations

import io
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from recast.data.transforms import transforms_for
from recast.errors import ConfigError, FileFormatError, RecastError, TaskError
from recast.format import ModelStore, is_model_directory
from recast.methods import load_method
from recast.tasks import BATCHING_MODES, routed

LOG = logging.getLogger("recast.serve")
MODES = ("mixed", "per-request")


@dataclass
class ServeOptions:
    """How the server batches and what it accepts.

    Attributes:
        max_batch: most images in one forward (requests are gathered up to it).
        max_wait_ms: how long the first request of a batch waits for others.
        max_upload_bytes: largest request body accepted (413 above it).
        max_images: most images in one request.
        reload_interval_s: how often the directory's config is checked for committed tasks.
        mode: ``mixed`` (requests of all tasks in one ``forward_tasks`` call) or ``per-request``
            (``set_task`` and a forward per task of each micro-batch, never mixing tasks: the
            baseline the load test compares against).
        batching: how generated layers mix tasks (``auto``, ``template``, ``group``).
        threads: torch threads for the forwards (0: leave torch's default).
    """

    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_upload_bytes: int = 8 * 1024 * 1024
    max_images: int = 32
    reload_interval_s: float = 0.5
    mode: str = "mixed"
    batching: str = "auto"
    threads: int = 0

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_upload_bytes", "max_images"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0 or self.reload_interval_s <= 0:
            raise ConfigError("max_wait_ms must be >= 0 and reload_interval_s > 0")
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.batching not in BATCHING_MODES:
            raise ConfigError(f"batching must be one of {', '.join(BATCHING_MODES)}, got {self.batching!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class BadImage(RecastError):
    """An uploaded file that is not a decodable image."""


class Engine:
    """One model with all its committed tasks; every call runs on the one batching thread."""

    def __init__(self, directory: str | Path, options: ServeOptions | None = None) -> None:
        self.directory = Path(directory)
        self.options = options or ServeOptions()
        if not is_model_directory(self.directory):
            raise FileFormatError(f"{self.directory}: not a recast model directory (it has no model config)")
        if self.options.threads:
            torch.set_num_threads(self.options.threads)
        self._stamp: tuple[int, int, int] | None = None
        self._pinned: dict[str, str | None] = {}
        self.store = ModelStore(self.directory)
        self.model: nn.Module = load_method(self.directory).eval()
        self.served: frozenset[str] = frozenset(self.model.tasks)  # replaced whole, so other threads read it safely
        self.transform = transforms_for(self.model.net, train=False)
        self.refresh()

    # ------------------------------------------------------------------------------------- tasks
    def task_names(self) -> list[str]:
        """The tasks that can be asked for now (call on the batching thread)."""
        return list(self.model.tasks)

    def describe(self, name: str) -> dict[str, Any]:
        """Task ``name``'s classes, for ``GET /v1/tasks``."""
        info = self.model.tasks[name]
        return {"name": name, "num_classes": info.num_classes, "class_names": info.class_names}

    def unknown_task_message(self, name: str) -> str:
        """What to say when ``name`` is not a task: a few known ones and where to see all."""
        known = sorted(self.served)
        shown = ", ".join(known[:5]) + (f" and {len(known) - 5} more" if len(known) > 5 else "")
        return f"no task named {name!r}; known tasks: {shown or 'none'} (GET /v1/tasks lists all)"

    def refresh(self) -> bool:
        """Follow the directory's last commit: load new or changed tasks, forget removed ones.

        Cheap when nothing changed (one ``stat``). Returns whether the task list changed. A task
        that fails to load is logged and tried again at the next commit; the others still load.
        """
        try:
            stat = self.store.config_path.stat()
        except FileNotFoundError:
            return False
        stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if stamp == self._stamp:
            return False
        try:
            records = self.store.task_records()
        except FileFormatError as exc:
            LOG.warning("cannot read the tasks of %s: %s", self.directory, exc)
            return False
        self._stamp = stamp
        pinned = {name: rec.get("sha256") if isinstance(rec, dict) else None for name, rec in records.items()}
        before = set(self.model.tasks)
        for name in [t for t in self.model.tasks if t not in pinned]:
            self.model.delete_task(name)
            self._pinned.pop(name, None)
        for name, sha in pinned.items():
            if name in self.model.tasks and self._pinned.get(name, sha) == sha:
                self._pinned[name] = sha
                continue
            try:
                self.model.load_task(self.directory, name, replace=True)
                self._pinned[name] = sha
            except RecastError as exc:
                LOG.warning("task %r not loaded: %s", name, exc)
        self.served = frozenset(self.model.tasks)
        return self.served != before

    # ----------------------------------------------------------------------------------- images
    def decode(self, data: bytes, filename: str) -> Tensor:
        """An uploaded file as the model's input tensor, with the transforms ``recast predict`` uses."""
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                rgb = image.convert("RGB")
        except Exception as exc:  # PIL raises many types for bad data; every one means the same here
            reason = "not an image format PIL reads" if "cannot identify" in str(exc) else f"{type(exc).__name__}: {exc}"
            raise BadImage(f"image {filename!r} cannot be decoded ({reason}); send PNG, JPEG, WebP, ...") from None
        return self.transform(rgb)

    # ---------------------------------------------------------------------------------- forward
    @torch.no_grad()
    def forward_mixed(self, x: Tensor, tasks: list[str]) -> Tensor:
        """Logits of a batch whose samples name their tasks (padded with -inf to the widest head)."""
        return mixed_forward(self.model, x, tasks, self.options.batching)

    @torch.no_grad()
    def forward_one(self, x: Tensor, task: str) -> Tensor:
        """Logits of a batch of one task, through ``set_task`` (the per-request baseline)."""
        self.model.set_task(task)
        return self.model(x)

    def probabilities(self, logits: Tensor, tasks: list[str]) -> list[Tensor]:
        """Per sample, the softmax over its own task's classes."""
        return [logits[i, : self.model.tasks[t].num_classes].softmax(-1) for i, t in enumerate(tasks)]


def mixed_forward(model: nn.Module, x: Tensor, tasks: list[str], batching: str = "auto") -> Tensor:
    """A mixed-task batch through a RECAST model (``forward_tasks``) or PEFT LoRA (``adapter_names``)."""
    if hasattr(model, "forward_tasks"):
        return model.forward_tasks(x, tasks, batching=batching)
    if hasattr(model, "adapter_name") and hasattr(model.net, "peft_config"):
        missing = [t for t in dict.fromkeys(tasks) if t not in model.tasks]
        if missing:
            raise TaskError(f"no task named {missing[0]!r}")
        with routed([model.head], tasks, x.device):  # PEFT mixes its adapters per sample, the head routes
            return model.net(x, adapter_names=[model.adapter_name(t) for t in tasks])
    raise TaskError(f"{type(model).__name__} cannot mix tasks in one batch; serve it with mode='per-request'")


def top_k(probs: Tensor, class_names: list[str] | None, k: int) -> list[dict[str, Any]]:
    """The ``k`` most probable classes as ``{"label", "index", "probability"}`` (as ``recast predict``)."""
    values, indices = probs.topk(min(k, probs.shape[-1]))
    return [{"label": class_names[int(i)] if class_names else str(int(i)), "index": int(i), "probability": float(v)}
            for v, i in zip(values, indices, strict=True)]
