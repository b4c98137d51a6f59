"""``TaskModel``: the one task protocol that every method (RECAST, adapters, LoRA, full) follows.

A task model wraps a network whose backbone is frozen and shared, and keeps some state per task
(coefficients, a head, adapter weights, a whole fine-tuned backbone). This base class owns
everything that does not depend on what that state is: task records and the name rule,
add/set/delete, the active task, counts, optimiser groups with per-kind learning rates, the
method's recorded options, the frozen-BatchNorm ``train()``, and saving/loading through
:class:`recast.format.ModelStore`. It plays the part PEFT's ``BaseTuner`` plays for its tuners.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from recast.errors import FileFormatError, TaskError
from recast.format import FORMAT_VERSION, ModelStore, check_task_name, consistent_read
from recast.format.names import TASK_FORMAT
from recast.format.quantize import check_dtype, quantize_tensors
from recast.format.records import RECORD_KEYS, backbone_header, encode, task_header, tensor_problems
from recast.format.staging import sha256_hex
from recast.tasks import COUNT_KINDS, TaskHead, TaskSpec
from recast.version import __version__


@dataclass
class TaskInfo:
    """What a task is, beyond its tensors: written to its record (``tasks/<name>.json``)."""

    num_classes: int
    class_names: list[str] | None = None
    own_bn: bool = False
    meta: dict[str, Any] = field(default_factory=dict)  # method, seed, metrics, options, ...


class TaskModel(nn.Module):
    """A frozen shared backbone plus per-task state; exactly one task is active.

    A subclass provides:

    - ``net``: the wrapped network; ``net(x)`` gives the active task's logits;
    - ``head``: its :class:`~recast.tasks.TaskHead`; ``head_key``: the name of the head's weight
      in a task file;
    - ``fingerprint``: sha256 that identifies the backbone its task files fit;
    - ``backbone_tensors()``: what ``backbone.safetensors`` holds; ``config_record()``: the
      fields of ``recast_config.json`` that describe this kind of model;
    - per-task state hooks: ``_add_state(name, spec)``, ``_activate_state(name)``,
      ``_delete_state(name)``, ``_state_tensors(name)`` (as stored in the task file),
      ``_load_state(name, tensors)`` (the inverse, after the shapes were checked),
      ``_state_counts(name)`` (numbers stored, by kind: coefficients, head, adapter, other, ...)
      and ``_state_parameters(name)`` (the task's parameters by kind, for the optimiser).
    """

    head_key: str
    freeze_norms = True  # pretrained BatchNorm statistics are shared, so they must not drift

    def __init__(self, method: str, options: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.tasks: dict[str, TaskInfo] = {}
        self.active_task: str | None = None
        self.method = method
        self.method_options: dict[str, Any] = dict(options or {})
        self.lrs: dict[str, float | None] = {}

    # ------------------------------------------------------------------------------ subclass hooks
    @property
    def head(self) -> TaskHead:
        raise NotImplementedError

    @property
    def fingerprint(self) -> str:
        raise NotImplementedError

    def backbone_tensors(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def config_record(self) -> dict[str, Any]:
        raise NotImplementedError

    def _add_state(self, name: str, spec: TaskSpec) -> None:
        raise NotImplementedError

    def _activate_state(self, name: str) -> None:
        raise NotImplementedError

    def _delete_state(self, name: str) -> None:
        raise NotImplementedError

    def _state_tensors(self, name: str) -> dict[str, Tensor]:
        raise NotImplementedError

    def _load_state(self, name: str, tensors: dict[str, Tensor]) -> None:
        raise NotImplementedError

    def _state_counts(self, name: str) -> dict[str, int]:
        raise NotImplementedError

    def _state_parameters(self, name: str) -> dict[str, list[nn.Parameter]]:
        raise NotImplementedError

    def _check_new_task(self, spec: TaskSpec) -> None:
        """Refuse what this kind of model cannot do for a new task (e.g. ``own_bn`` without BatchNorm)."""

    def _group_options(self, kind: str) -> dict[str, Any]:
        """Extra optimiser settings for one kind of state (e.g. no weight decay on masks)."""
        return {}

    def _record_extras(self) -> dict[str, Any]:
        """Extra fields for every task record of this kind of model."""
        return {}

    # -------------------------------------------------------------------------------------- tasks
    def require_task(self, name: str) -> None:
        """Raise a ``TaskError`` listing the existing tasks unless ``name`` is one of them (a name
        that breaks the task-name rule is refused with the rule)."""
        if name not in self.tasks:
            check_task_name(name)
            raise TaskError(f"no task named {name!r}; existing tasks: {', '.join(sorted(self.tasks)) or 'none'}")

    def add_task(
        self,
        name: str,
        num_classes: int,
        *,
        class_names: list[str] | None = None,
        own_bn: bool = False,
        init_from: str | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        """Add a task with fresh state (or a copy of ``init_from``'s) and a new head; not activated.

        The method option ``own_bn`` (see ``recast.methods``) gives every task its own BatchNorm statistics.
        """
        own_bn = bool(own_bn) or bool(self.method_options.get("own_bn", False))
        check_task_name(name)
        if name in self.tasks:
            raise TaskError(f"task {name!r} already exists; delete_task({name!r}) first or pick another name")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise TaskError(f"num_classes must be a positive integer, got {num_classes!r}")
        if class_names is not None and len(class_names) != num_classes:
            raise TaskError(f"{len(class_names)} class names given for {num_classes} classes")
        if init_from is not None:
            self.require_task(init_from)
        spec = TaskSpec(num_classes=num_classes, own_bn=own_bn, init_from=init_from)
        self._check_new_task(spec)
        self._add_state(name, spec)
        if self.active_task is not None:  # creating state may have changed what is trainable
            self._activate_state(self.active_task)
        recorded = {"method": self.method, "method_options": self.recorded_options(), **(meta or {})}
        self.tasks[name] = TaskInfo(num_classes, list(class_names) if class_names else None, own_bn, recorded)

    def set_task(self, name: str) -> None:
        """Activate ``name``: its state and head are used and are the only trainable tensors."""
        self.require_task(name)
        self._activate_state(name)
        self.active_task = name

    def delete_task(self, name: str) -> None:
        """Forget task ``name`` (in memory; its files stay until the directory is saved again)."""
        self.require_task(name)
        self._delete_state(name)
        del self.tasks[name]
        if self.active_task == name:
            self.active_task = None

    def task_parameters(self, name: str) -> dict[str, int]:
        """Numbers stored for task ``name``, by kind (``coefficients``, ``head``, ``other``, ...)."""
        self.require_task(name)
        return {**dict.fromkeys(COUNT_KINDS, 0), **self._state_counts(name)}

    def task_tensors(self, name: str) -> dict[str, Tensor]:
        """Task ``name``'s tensors exactly as its file stores them (on the CPU)."""
        self.require_task(name)
        return {k: v.detach().to("cpu").contiguous() for k, v in self._state_tensors(name).items()}

    def set_task_tensors(self, name: str, tensors: dict[str, Tensor], source: str = "tensors") -> None:
        """Replace task ``name``'s state by ``tensors`` as a task file stores them.

        Names and shapes are checked against :meth:`task_tensors` first (a ``FileFormatError``
        naming ``source`` when they do not fit), so a refused set leaves the task as it was.
        """
        self.require_task(name)
        problems = tensor_problems(tensors, self._state_tensors(name))
        if problems:
            raise FileFormatError(f"{source}: does not fit this model: " + "; ".join(problems[:10]))
        self._load_state(name, tensors)

    def recorded_options(self) -> dict[str, Any]:
        """The method's options and learning rates per kind, as written to task records."""
        return {**self.method_options, "lrs": dict(self.lrs)}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters that require grad (the active task's)."""
        return [p for p in self.parameters() if p.requires_grad]

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimiser groups of the active task, one per kind; each at ``self.lrs[kind]`` or ``lr``."""
        if self.active_task is None:
            raise TaskError("no task is active; call set_task(name) before training")
        seen: set[int] = set()
        by_kind: dict[str, list[nn.Parameter]] = {}
        for kind, params in self._state_parameters(self.active_task).items():
            for p in params:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    by_kind.setdefault(kind, []).append(p)
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in seen]
        if rest:
            by_kind.setdefault("other", []).extend(rest)
        return [
            {"name": kind, "params": params, "lr": self.lrs.get(kind) or lr, **self._group_options(kind)}
            for kind, params in by_kind.items()
        ]

    # ------------------------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        """Logits of the active task."""
        if self.active_task is None:
            raise TaskError(f"no task is active; call set_task(name) with one of: {', '.join(self.tasks) or 'none'}")
        return self.net(x)

    def train(self, mode: bool = True) -> TaskModel:
        """Like ``nn.Module.train``, but pretrained BatchNorm statistics never drift.

        Per-task BatchNorm statistics (``own_bn``) live in task modules and do update in training.
        """
        super().train(mode)
        if self.freeze_norms:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    # -------------------------------------------------------------------------------------- files
    def save_pretrained(self, directory: str | Path) -> None:
        """Write the backbone, every task and the config; a crash leaves the old or the new state."""
        blobs = {name: self._task_blob(name) for name in self.tasks}
        backbone = encode(self.backbone_tensors(), backbone_header(self.fingerprint, __version__))
        config = {**self.config_record(), "active": self.active_task, "library_version": __version__}
        ModelStore(directory).write_model(backbone, blobs, config)

    def save_task(
        self, directory: str | Path, name: str, meta: dict[str, Any] | None = None, *, dtype: str = "fp32"
    ) -> dict[str, Any]:
        """Write task ``name`` into ``directory`` (committed atomically); returns its record.

        ``dtype`` ``"fp16"`` or ``"int8"`` stores a compact file (int8: per-row scales for
        matrices, fp16 for vectors); it loads transparently, dequantised to float32.
        """
        self.require_task(name)
        check_dtype(dtype)
        if meta:
            self.tasks[name].meta.update(meta)
        blob = self._task_blob(name, dtype)
        ModelStore(directory).write_task(name, blob, self.fingerprint)
        return blob[1]

    def _task_blob(self, name: str, dtype: str = "fp32") -> tuple[bytes, dict[str, Any]]:
        """Task ``name``'s file bytes (stored in ``dtype``) and the record that pins their sha256."""
        info = self.tasks[name]
        tensors = self.task_tensors(name)
        if dtype != "fp32":
            tensors = quantize_tensors(tensors, dtype)
        data = encode(tensors, task_header(name, self.fingerprint, dtype))
        record = {
            **info.meta,
            **self._record_extras(),
            "format": TASK_FORMAT,
            "task": name,
            "format_version": FORMAT_VERSION,
            "num_classes": info.num_classes,
            "class_names": info.class_names,
            "own_bn": info.own_bn,
            "params": self.task_parameters(name),
            "bytes": len(data),
            "sha256": sha256_hex(data),
            "fingerprint": self.fingerprint,
            **({"dtype": dtype} if dtype != "fp32" else {}),
        }
        return data, record

    @consistent_read
    def load_task(self, directory: str | Path, name: str, *, replace: bool = False) -> None:
        """Read task ``name`` from a model directory; on any error the model is left unchanged.

        The record comes from ``recast_config.json`` when it lists the task, else from
        ``tasks/<name>.json``; the task file must have the recorded sha256, format, version and
        this model's backbone fingerprint.
        """
        store = ModelStore(directory)
        record, source = store.task_record(name)
        self._install_task(store, name, record, source, replace=replace)

    def _load_all_tasks(self, store: ModelStore, config: dict[str, Any]) -> None:
        """Load every task the directory holds (replacing the in-memory ones) and its active task."""
        records = store.task_records(config)
        for name, record in records.items():
            self._install_task(store, check_task_name(name), record, store.config_path, replace=True)
        for name in [t for t in self.tasks if t not in records]:
            self.delete_task(name)
        active = config.get("active")
        if active in self.tasks:
            self.set_task(active)
        elif self.tasks:
            self.set_task(next(iter(self.tasks)))

    def _install_task(self, store: ModelStore, name: str, record: Any, source: Path, *, replace: bool) -> None:
        """Check ``record`` and its file, then install the task (all or nothing)."""
        record, tensors, _ = store.read_task(name, record, source, self.fingerprint)
        path = store.task_file(name)
        head = tensors.get(self.head_key)
        rows = head.shape[0] if head is not None and head.dim() > 0 else None
        if rows is not None and rows != record["num_classes"]:
            raise FileFormatError(f"{path}: its head has {rows} outputs but its record says {record['num_classes']} classes")
        if name in self.tasks and not replace:
            raise TaskError(f"task {name!r} is already loaded; pass replace=True to overwrite it")
        info = TaskInfo(record["num_classes"], record.get("class_names"), record.get("own_bn", False),
                        {k: v for k, v in record.items() if k not in RECORD_KEYS})
        previous = (self.tasks[name], self.task_tensors(name)) if name in self.tasks else None
        was_active = self.active_task == name
        if previous is not None:
            self.delete_task(name)
        try:
            self._add_filled(name, info, tensors, path)
        except BaseException:
            if previous is not None:
                self._add_filled(name, *previous, path)
                if was_active:
                    self.set_task(name)
            raise
        if was_active or self.active_task is None:
            self.set_task(name)

    def _add_filled(self, name: str, info: TaskInfo, tensors: dict[str, Tensor], path: Path) -> None:
        """Create task ``name``'s state and fill it from ``tensors``; nothing is left on failure."""
        with torch.random.fork_rng(devices=[]):  # loading must not move the caller's random stream
            self._add_state(name, TaskSpec(num_classes=info.num_classes, own_bn=info.own_bn))
        self.tasks[name] = info
        try:
            self.set_task_tensors(name, tensors, str(path))
        except BaseException:
            self._delete_state(name)
            del self.tasks[name]
            raise
        if self.active_task is not None:
            self._activate_state(self.active_task)
