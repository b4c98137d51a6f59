"""``RecastModel``: a pretrained network whose chosen layers are generated from template banks.

It owns the banks, wraps the base network (rewritten in place of a copy), keeps one classifier
head and one set of coefficients per task, switches tasks, counts and saves per-task state, and
exports any task as an ordinary ``nn.Module``. File layout (DESIGN.md, "Files")::

    recast_config.json         config, library version, base recipe, bank plan, fingerprint
    backbone.safetensors       banks (once) + frozen non-generated weights
    tasks/<name>.safetensors   that task's coefficients (one packed tensor), head, other state
    tasks/<name>.json          class names, counts by kind, bytes, fingerprint, metrics, ...
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor, nn

from recast import __version__
from recast.bank import TemplateBank, fingerprint
from recast.config import RecastConfig
from recast.errors import ConfigError, FileFormatError, RecastError, TaskError
from recast.integrity import leftover_files
from recast.io import atomic_write_json, promote, read_checked, read_json, sha256_hex, write_staged
from recast.layers import generated_layer
from recast.locking import lock_directory
from recast.mimicry import FitProblem, fidelity, fit, refine_with_data
from recast.recipe import build_from_recipe, recipe_of
from recast.surgery import BankPlan, find_head, install_head, plan_banks, wrap_batchnorms
from recast.tasks import COUNT_KINDS, TaskBatchNorm, TaskHead, TaskModule, TaskSpec

CONFIG_FILE = "recast_config.json"
BACKBONE_FILE = "backbone.safetensors"
TASKS_DIR = "tasks"
FORMAT_VERSION = "1"
_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


@dataclass
class TaskInfo:
    """What a task is, beyond its tensors: written to ``tasks/<name>.json``."""

    num_classes: int
    class_names: list[str] | None = None
    own_bn: bool = False
    meta: dict[str, Any] = field(default_factory=dict)  # method, seed, metrics, options, ...


class RecastModel(nn.Module):
    """A base network rewritten as template banks + per-task coefficients and heads."""

    def __init__(
        self,
        net: nn.Module,
        config: RecastConfig,
        plans: list[BankPlan],
        banks: dict[str, TemplateBank],
        head_name: str,
        recipe: dict[str, Any] | None = None,
        mimicry_report: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.banks = nn.ModuleDict(banks)
        self.config = config
        self.plans = plans
        self.head_name = head_name
        self.recipe = recipe
        self.mimicry_report: dict[str, Any] = mimicry_report or {}
        self.tasks: dict[str, TaskInfo] = {}
        self.active_task: str | None = None
        self.adapters: list[dict[str, Any]] = []  # [{"kind": ..., "options": {...}}], in order applied
        self._fingerprint: tuple[tuple[int, ...], str] | None = None
        self._task_module_list: list[tuple[str, TaskModule]] | None = None

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def from_base(
        cls, base: nn.Module, config: RecastConfig | None = None, mimicry: str = "svd",
        refine_images: Tensor | None = None, **options: Any
    ) -> RecastModel:
        """Rewrite a copy of ``base`` as banks fitted to its weights by Neural Mimicry.

        ``options`` go to the mimicry method (e.g. ``steps``, ``lr`` for ``iterative``). With
        ``refine_images`` (unlabelled ``(N, C, H, W)``), the fit is then refined to match the
        base's block outputs on them (useful with fewer templates than layers per group). The base
        head becomes task ``base``, active on return; ``base`` itself is left untouched.
        """
        config = config or RecastConfig()
        net = copy.deepcopy(base)
        plans = plan_banks(net, config)
        problems = [
            FitProblem(
                key=p.key, role=p.role, layers=p.layers, templates=p.templates, coef_sets=config.coef_sets,
                targets=torch.stack([net.get_submodule(name).weight.detach() for name in p.layers]),
            )
            for p in plans
        ]
        if problems:
            results, seconds = fit(problems, mimicry, **options)
            report = {"method": mimicry, "seconds": seconds, "options": dict(options), **fidelity(problems, results)}
        else:  # target "none": nothing to fit
            results, report = [], {"method": "none", "seconds": 0.0}
        original_numel = _numel(base.state_dict(), exclude_prefix=find_head(base))
        model = cls._assemble(net, config, plans, [(r.templates, r.coefficients) for r in results], recipe_of(base))
        report["original_bytes"] = original_numel * 4
        report["backbone_bytes"] = _numel(model.backbone_tensors()) * 4
        model.mimicry_report = report
        if refine_images is not None:
            refine_with_data(model, base, refine_images)
        return model

    @classmethod
    def _assemble(
        cls,
        net: nn.Module,
        config: RecastConfig,
        plans: list[BankPlan],
        fitted: list[tuple[Tensor, Tensor]],
        recipe: dict[str, Any] | None,
    ) -> RecastModel:
        """Swap in generated layers, task heads and task BatchNorm; register task ``base``."""
        net.requires_grad_(False)
        banks = {}
        for plan, (templates, coefficients) in zip(plans, fitted, strict=True):
            bank = banks[plan.key] = TemplateBank(templates)
            for index, name in enumerate(plan.layers):
                net.set_submodule(name, generated_layer(net.get_submodule(name), bank, coefficients[index]))
        head_name = find_head(net)
        head = install_head(net, head_name)
        wrap_batchnorms(net)
        model = cls(net, config, plans, banks, head_name, recipe)
        spec = TaskSpec(num_classes=head.num_classes("base"))
        for _, module in model.task_modules():
            if module is not head:
                module.add_task("base", spec)
        model.tasks["base"] = TaskInfo(num_classes=spec.num_classes)
        model.set_task("base")
        return model

    def add_adapter(self, kind: str, **options: Any) -> None:
        """Insert an adapter (``recast.adapters``) whose state is kept per task, for every task.

        Adapters start as the identity (zero or identity initialised), so existing tasks' outputs
        do not change. The choice and its options are saved with the model and re-applied on load.
        """
        from recast.adapters import attach

        self._task_module_list = None
        try:
            attach(self, kind, **options)
        finally:
            self._task_module_list = None  # the module tree changed
        self.adapters.append({"kind": kind, "options": dict(options)})

    # ------------------------------------------------------------------------------------ tasks
    def task_modules(self) -> Iterator[tuple[str, TaskModule]]:
        """Every module that keeps per-task state, with its name inside ``net``.

        The list is found once (walking a ViT-S's module tree costs about half a millisecond, and
        a task switch visits it several times) and found again after ``add_adapter`` rewires it.
        """
        if self._task_module_list is None:
            self._task_module_list = [(n, m) for n, m in self.net.named_modules() if isinstance(m, TaskModule)]
        return iter(self._task_module_list)

    @property
    def head(self) -> TaskHead:
        """The task-head module."""
        return self.net.get_submodule(self.head_name)

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
        """Add a task: coefficients from the mimicry values (or ``init_from``), a new head.

        The task is not activated; call :meth:`set_task`.
        """
        self._check_new_task(name, num_classes, class_names, own_bn, init_from)
        spec = TaskSpec(num_classes=num_classes, own_bn=own_bn, init_from=init_from)
        for _, module in self.task_modules():
            module.add_task(name, spec)
        self.tasks[name] = TaskInfo(num_classes, list(class_names) if class_names else None, own_bn, dict(meta or {}))

    def _check_new_task(
        self, name: str, num_classes: int, class_names: list[str] | None, own_bn: bool, init_from: str | None
    ) -> None:
        if not isinstance(name, str) or not _TASK_NAME.match(name):
            raise TaskError(
                f"invalid task name {name!r}: use 1-64 letters, digits, '_' or '-', starting with a letter or digit"
            )
        if name in self.tasks:
            raise TaskError(f"task {name!r} already exists; delete_task({name!r}) first or pick another name")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise TaskError(f"num_classes must be a positive integer, got {num_classes!r}")
        if class_names is not None and len(class_names) != num_classes:
            raise TaskError(f"{len(class_names)} class names given for {num_classes} classes")
        if own_bn and not any(isinstance(m, TaskBatchNorm) for _, m in self.task_modules()):
            raise TaskError("own_bn=True needs BatchNorm layers, and this model has none")
        if init_from is not None:
            self._require_task(init_from)

    def _require_task(self, name: str) -> None:
        if name not in self.tasks:
            known = ", ".join(sorted(self.tasks)) or "none"
            raise TaskError(f"no task named {name!r}; existing tasks: {known}")

    def set_task(self, name: str) -> None:
        """Activate task ``name``: its coefficients and head are used and are the only trainable tensors."""
        self._require_task(name)
        for _, module in self.task_modules():
            module.activate(name)
        self.active_task = name

    def delete_task(self, name: str) -> None:
        """Forget task ``name`` (in memory; its files, if any, stay until overwritten)."""
        self._require_task(name)
        for _, module in self.task_modules():
            module.delete_task(name)
        del self.tasks[name]
        if self.active_task == name:
            self.active_task = None

    def task_parameters(self, name: str) -> dict[str, int]:
        """Numbers stored for task ``name``, by kind: ``coefficients``, ``head``, ``other``."""
        self._require_task(name)
        counts = dict.fromkeys(COUNT_KINDS, 0)
        for _, module in self.task_modules():
            counts[module.kind] = counts.get(module.kind, 0) + module.task_numel(name)
        return counts

    def effective_coefficients(self) -> int:
        """Coefficients per task after averaging the K sets: n per generated module."""
        return sum(len(p.layers) * p.templates for p in self.plans)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters that require grad (the active task's)."""
        return [p for p in self.parameters() if p.requires_grad]

    # ---------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        """Logits of the active task."""
        if self.active_task is None:
            raise TaskError(f"no task is active; call set_task(name) with one of: {', '.join(self.tasks) or 'none'}")
        return self.net(x)

    def forward_tasks(self, x: Tensor, tasks: Sequence[str]) -> Tensor:
        """One forward over a batch whose samples belong to different tasks.

        ``tasks[i]`` names sample ``i``'s task. Every task module sends each sample through its
        own task's state, so the logits equal per-task forwards; heads of different sizes are
        padded with ``-inf`` up to the largest.
        """
        if len(tasks) != x.shape[0]:
            raise TaskError(f"{len(tasks)} task names for a batch of {x.shape[0]} samples")
        names = list(dict.fromkeys(tasks))
        for name in names:
            self._require_task(name)
        index = torch.tensor([names.index(t) for t in tasks], device=x.device)
        modules = [m for _, m in self.task_modules()]
        for module in modules:
            module.routing = (names, index)
        try:
            return self.net(x)
        finally:
            for module in modules:
                module.routing = None

    def train(self, mode: bool = True) -> RecastModel:
        """Like ``nn.Module.train``, but pretrained BatchNorm statistics never drift."""
        super().train(mode)
        for module in self.net.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def export(self, name: str) -> nn.Module:
        """An ordinary copy of the base architecture with task ``name``'s generated weights and head."""
        self._require_task(name)
        memo = {id(bank): bank for bank in self.banks.values()}  # read, never copied
        net = copy.deepcopy(self.net, memo)
        names = [n for n, _ in self.task_modules()]
        for module_name in sorted(names, key=lambda n: n.count("."), reverse=True):
            net.set_submodule(module_name, net.get_submodule(module_name).to_plain(name))
        if hasattr(net, "num_classes"):
            net.num_classes = self.tasks[name].num_classes
        return net.requires_grad_(True)

    # ---------------------------------------------------------------------------------- files
    @property
    def fingerprint(self) -> str:
        """sha256 of the banks (of the whole frozen backbone when there are none).

        Recorded in every file and checked on load, so a task never runs on a backbone it was not
        trained for.
        """
        if not self.banks:
            return fingerprint(self.backbone_tensors().items())
        versions = tuple(b.templates._version for b in self.banks.values())
        if self._fingerprint is None or self._fingerprint[0] != versions:
            self._fingerprint = (versions, fingerprint((k, b.templates) for k, b in self.banks.items()))
        return self._fingerprint[1]

    def _per_task_prefixes(self) -> tuple[str, ...]:
        return tuple(f"{name}.per_task." for name, _ in self.task_modules())

    def backbone_tensors(self) -> dict[str, Tensor]:
        """What ``backbone.safetensors`` holds: banks once, plus every frozen non-task tensor."""
        prefixes = self._per_task_prefixes()
        tensors = {f"banks.{key}.templates": bank.templates for key, bank in self.banks.items()}
        for key, value in self.net.state_dict().items():
            if not key.startswith(prefixes):
                tensors[f"net.{key}"] = value
        return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the backbone, every task and the config, so that a crash leaves the old or the new state.

        New file versions go under staged names (``NAME.<sha12>.safetensors``, see
        :func:`recast.io.staged_path`); then the config, which names every file by its sha256, is
        replaced in one rename: that is the commit point. Only then do the staged files replace
        the old ones. A SIGKILL before the commit leaves the previous state; after it, the new one
        (readers find staged files by checksum). The directory is locked meanwhile. Tasks in the
        directory that this model does not hold are kept when they fit its backbone.
        """
        directory = Path(directory)
        with lock_directory(directory):
            previous = _committed_record(directory)
            if previous is not None:
                _settle(directory, previous)
            backbone = self._backbone_blob()
            pinned = {"name": BACKBONE_FILE, "sha256": write_staged(directory / BACKBONE_FILE, backbone),
                      "bytes": len(backbone)}
            records: dict[str, dict[str, Any]] = {}
            for name in self.tasks:
                data, records[name] = self._task_blob(name)
                write_staged(directory / TASKS_DIR / f"{name}.safetensors", data)
            kept = _kept_records(directory, previous, self.fingerprint)
            records.update({k: v for k, v in kept.items() if k not in records})
            record = {**self._config_record(), "tasks": list(records), "backbone_file": pinned, "task_records": records}
            atomic_write_json(directory / CONFIG_FILE, record)
            _settle(directory, record)

    def _backbone_blob(self) -> bytes:
        """``backbone.safetensors`` as bytes, its metadata naming format, version and fingerprint."""
        meta = {"format": "recast-backbone", "format_version": FORMAT_VERSION, "fingerprint": self.fingerprint,
                "library_version": __version__}
        return safetensors.torch.save(self.backbone_tensors(), meta)

    def _config_record(self) -> dict[str, Any]:
        return {
            "format": "recast-model",
            "format_version": FORMAT_VERSION,
            "library_version": __version__,
            "config": self.config.to_dict(),
            "recipe": self.recipe,
            "fingerprint": self.fingerprint,
            "banks": [{"key": p.key, "role": p.role, "layers": list(p.layers), "templates": p.templates} for p in self.plans],
            "head": self.head_name,
            "tasks": list(self.tasks),
            "active": self.active_task,
            "adapters": self.adapters,
            "mimicry_report": {k: v for k, v in self.mimicry_report.items() if k != "layers"},
        }

    def task_tensors(self, name: str) -> dict[str, Tensor]:
        """Task ``name``'s tensors as stored: all coefficients packed into one flat tensor."""
        self._require_task(name)
        return self._packed_tensors(name)

    def _packed_tensors(self, name: str) -> dict[str, Tensor]:
        tensors: dict[str, Tensor] = {}
        packed = []
        for module_name, module in self.task_modules():
            for key, value in module.task_tensors(name).items():
                if module.kind == "coefficients":
                    packed.append(value.reshape(-1))
                else:
                    tensors[f"{module_name}.{key}"] = value
        if packed:
            tensors["coefficients"] = torch.cat(packed)
        return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}

    def save_task(self, directory: str | Path, name: str, meta: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write ``tasks/<name>.safetensors`` and ``tasks/<name>.json``; returns the JSON record.

        In a model directory the task is committed by rewriting ``recast_config.json`` (which pins
        every file's sha256), under the directory lock, so concurrent writers each add their task
        and a crash leaves the previous version. Without a config, the task's JSON is the commit
        point. Refused when the directory holds another backbone: the task could never load there.
        """
        self._require_task(name)
        directory = Path(directory)
        with lock_directory(directory):
            if meta:
                self.tasks[name].meta.update(meta)
            data, record = self._task_blob(name)
            path = directory / TASKS_DIR / f"{name}.safetensors"
            committed = _committed_record(directory)
            if committed is None:
                write_staged(path, data)
                atomic_write_json(path.with_suffix(".json"), record)
                promote(path, record["sha256"])
                return record
            _settle(directory, committed)
            if committed.get("fingerprint") != self.fingerprint:
                raise FileFormatError(
                    f"{directory / CONFIG_FILE}: this directory holds another backbone (fingerprint "
                    f"{str(committed.get('fingerprint'))[:12]}..., this model's is {self.fingerprint[:12]}...); "
                    "save the task next to the backbone it was trained on, or save_pretrained to a new directory"
                )
            write_staged(path, data)
            committed["task_records"][name] = record
            committed["tasks"] = [*[t for t in committed.get("tasks", []) if t != name], name]
            atomic_write_json(directory / CONFIG_FILE, committed)
            _settle(directory, committed)
        return record

    def _task_blob(self, name: str) -> tuple[bytes, dict[str, Any]]:
        """Task ``name``'s safetensors bytes and its JSON record (which pins their sha256)."""
        info = self.tasks[name]
        header = {"format": "recast-task", "format_version": FORMAT_VERSION, "fingerprint": self.fingerprint, "task": name}
        data = safetensors.torch.save(self.task_tensors(name), header)
        record = {
            **info.meta,
            "format": "recast-task",
            "task": name,
            "format_version": FORMAT_VERSION,
            "num_classes": info.num_classes,
            "class_names": info.class_names,
            "own_bn": info.own_bn,
            "params": self.task_parameters(name),
            "effective_coefficients": self.effective_coefficients(),
            "bytes": len(data),
            "sha256": sha256_hex(data),
            "fingerprint": self.fingerprint,
        }
        return data, record

    def load_task(self, directory: str | Path, name: str, *, replace: bool = False) -> None:
        """Read task ``name`` from a model directory; on any error the model is left unchanged.

        The record comes from ``recast_config.json`` when it lists the task, else from
        ``tasks/<name>.json``; the tensor file must have the recorded sha256, format, version and
        this model's bank fingerprint.
        """
        directory = Path(directory)
        if not isinstance(name, str) or not _TASK_NAME.match(name):
            raise TaskError(f"invalid task name {name!r}: use letters, digits, '_' and '-' (at most 64)")
        record, source = _task_record(directory, name)
        self._load_task_record(directory, name, record, source, replace=replace)

    def _load_task_record(
        self, directory: Path, name: str, record: Any, source: Path, *, replace: bool
    ) -> None:
        """Check ``record`` and its tensor file, then install the task (all or nothing)."""
        tensor_path = directory / TASKS_DIR / f"{name}.safetensors"
        self._check_task_record(source, record)
        data = read_checked(tensor_path, record["sha256"])
        tensors = self._check_task_file(tensor_path, record, data)
        if name in self.tasks and not replace:
            raise TaskError(f"task {name!r} is already loaded; pass replace=True to overwrite it")
        info = TaskInfo(
            num_classes=record["num_classes"],
            class_names=record.get("class_names"),
            own_bn=record.get("own_bn", False),
            meta={k: v for k, v in record.items() if k not in _RECORD_KEYS},
        )
        staging = f"{name}~loading"
        self._add_staging(staging, info)
        try:
            self._load_task_tensors(staging, tensors, tensor_path)
        except BaseException:
            self._drop_staging(staging)
            raise
        if name in self.tasks:
            self.delete_task(name)
        for _, module in self.task_modules():
            module.per_task[name] = module.per_task.pop(staging)
        self.tasks[name] = info
        if self.active_task in (name, None):
            self.set_task(name)

    def _check_task_record(self, source: Path, record: Any) -> None:
        """Refuse a task record with missing or ill-typed fields, another version or another backbone."""
        if not isinstance(record, dict):
            raise FileFormatError(f"{source}: not a recast task record (expected a JSON object)")
        problems = _task_record_problems(record)
        if problems:
            raise FileFormatError(f"{source}: not a valid recast task record: " + "; ".join(problems))
        if record.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
            raise FileFormatError(
                f"{source}: task format version {record.get('format_version')!r}, this library reads "
                f"{FORMAT_VERSION}; use the recast version that wrote it"
            )
        fingerprint = record.get("fingerprint", self.fingerprint)
        if fingerprint != self.fingerprint:
            raise FileFormatError(
                f"{source}: made for another backbone (bank fingerprint {str(fingerprint)[:12]}..., "
                f"this model's is {self.fingerprint[:12]}...); load it with the backbone it was trained on"
            )

    def _check_task_file(self, path: Path, record: dict[str, Any], data: bytes) -> dict[str, Tensor]:
        """The tensors of a task file whose metadata says: recast task, this version, this backbone."""
        tensors, header = _read_safetensors(path, data)
        if header.get("format") != "recast-task":
            raise FileFormatError(f"{path}: not a recast task file (its metadata has no format 'recast-task')")
        if header.get("format_version") != FORMAT_VERSION:
            raise FileFormatError(
                f"{path}: format version {header.get('format_version')!r}, this library reads {FORMAT_VERSION}; "
                "use the recast version that wrote it"
            )
        if header.get("fingerprint") != self.fingerprint:
            raise FileFormatError(
                f"{path}: made for another backbone (bank fingerprint {str(header.get('fingerprint'))[:12]}..., "
                f"this model's is {self.fingerprint[:12]}...); load it with the backbone it was trained on"
            )
        head = tensors.get(f"{self.head_name}.weight")
        rows = head.shape[0] if head is not None and head.dim() > 0 else self.head.in_features
        if rows != record["num_classes"]:
            raise FileFormatError(f"{path}: its head has {rows} outputs but its record says {record['num_classes']} classes")
        return tensors

    def _add_staging(self, staging: str, info: TaskInfo) -> None:
        spec = TaskSpec(num_classes=info.num_classes, own_bn=info.own_bn)
        with torch.random.fork_rng(devices=[]):  # loading must not move the caller's random stream
            for _, module in self.task_modules():
                module.add_task(staging, spec)

    def _drop_staging(self, staging: str) -> None:
        for _, module in self.task_modules():
            if staging in module.per_task:
                module.delete_task(staging)

    def _load_task_tensors(self, task: str, tensors: dict[str, Tensor], path: Path) -> None:
        expected = self._packed_tensors(task)
        problems = _tensor_problems(tensors, expected)
        if problems:
            raise FileFormatError(f"{path}: does not fit this model: " + "; ".join(problems[:10]))
        packed = tensors.get("coefficients")
        offset = 0
        for module_name, module in self.task_modules():
            own = module.task_tensors(task)
            if module.kind == "coefficients":
                values = {}
                for key, value in own.items():
                    values[key] = packed[offset:offset + value.numel()].reshape(value.shape)
                    offset += value.numel()
            else:
                values = {key: tensors[f"{module_name}.{key}"] for key in own}
            module.load_task_tensors(task, values)

    @classmethod
    def from_pretrained(cls, directory: str | Path, base: nn.Module | None = None) -> RecastModel:
        """Load a model directory written by :meth:`save_pretrained` (on the CPU).

        ``base`` is only needed when the directory's recipe cannot rebuild the architecture (a
        model that is neither from timm nor torchvision); its weights are not used. Every file is
        checked against the sha256 and fingerprint the config pins; any problem raises
        ``FileFormatError`` naming the file.
        """
        directory = Path(directory)
        path = directory / CONFIG_FILE
        record = read_json(path)
        _check_config_record(path, record)
        try:
            config = RecastConfig.from_dict(record["config"])
        except ConfigError as exc:
            raise FileFormatError(f"{path}: invalid config ({exc})") from None
        net = copy.deepcopy(base if base is not None else _rebuild(path, record))
        plans = plan_banks(net, config)
        stored = [tuple(b["layers"]) for b in record.get("banks", [])]
        if stored != [p.layers for p in plans]:
            raise FileFormatError(
                f"{directory}: its layers do not fit the base model rebuilt from its recipe {record.get('recipe')}; "
                "pass base=<a model of the architecture it was made from>"
            )
        empty = [_empty_fit(net, p, config.coef_sets) for p in plans]
        model = cls._assemble(net, config, plans, empty, record.get("recipe"))
        model._add_recorded_adapters(path, record.get("adapters", []))
        model._load_backbone(directory, record)
        model.mimicry_report = dict(record.get("mimicry_report") or {})
        model._load_all_tasks(directory, record)
        return model

    def _add_recorded_adapters(self, path: Path, adapters: list[dict[str, Any]]) -> None:
        """Re-apply the adapters the config lists; a bad entry is a file error naming the config."""
        for adapter in adapters:
            try:
                self.add_adapter(adapter["kind"], **adapter.get("options", {}))
            except (RecastError, TypeError, ValueError, KeyError) as exc:
                raise FileFormatError(f"{path}: cannot re-apply adapter {adapter.get('kind')!r} ({exc})") from None

    def _load_backbone(self, directory: Path, record: dict[str, Any]) -> None:
        """Fill banks and frozen weights from ``backbone.safetensors`` after checking sha256 and metadata."""
        path = directory / BACKBONE_FILE
        pinned = record.get("backbone_file")
        data = read_checked(path, pinned["sha256"]) if pinned else _read_bytes(path)
        tensors, header = _read_safetensors(path, data)
        _check_backbone_header(path, header, record["fingerprint"])
        problems = _tensor_problems(tensors, self.backbone_tensors())
        if problems:
            raise FileFormatError(f"{path}: does not fit the base model: " + "; ".join(problems[:10]))
        with torch.no_grad():
            for key, bank in self.banks.items():
                bank.templates.copy_(tensors[f"banks.{key}.templates"])
            net_state = {k[len("net."):]: v for k, v in tensors.items() if k.startswith("net.")}
            self.net.load_state_dict(net_state, strict=False)
        if self.fingerprint != record["fingerprint"]:
            raise FileFormatError(f"{path}: bank fingerprint does not match recast_config.json (corrupt or mixed files)")

    def _load_all_tasks(self, directory: Path, record: dict[str, Any]) -> None:
        """Load the tasks the config pins (or, for older directories, every ``tasks/*.json``)."""
        records = record.get("task_records")
        if records is None:
            on_disk = sorted(p.stem for p in (directory / TASKS_DIR).glob("*.json"))
            order = [t for t in record.get("tasks", []) if t in on_disk]
            order += [t for t in on_disk if t not in order]
            for name in order:
                self.load_task(directory, name, replace=True)
        else:
            order = list(records)
            for name, task_record in records.items():
                self._load_task_record(directory, name, task_record, directory / CONFIG_FILE, replace=True)
        for name in [t for t in self.tasks if t not in order]:
            self.delete_task(name)
        active = record.get("active")
        if active in self.tasks:
            self.set_task(active)
        elif self.tasks:
            self.set_task(next(iter(self.tasks)))

_RECORD_KEYS = frozenset(
    {"task", "format_version", "num_classes", "class_names", "own_bn", "params", "effective_coefficients",
     "bytes", "sha256", "fingerprint", "format"}
)


def _empty_fit(net: nn.Module, plan: BankPlan, coef_sets: int) -> tuple[Tensor, Tensor]:
    """Zero templates and coefficients of the right shapes (filled from a file afterwards)."""
    weight = net.get_submodule(plan.layers[0]).weight
    templates = torch.zeros(plan.templates, *weight.shape, dtype=weight.dtype)
    return templates, torch.zeros(len(plan.layers), coef_sets, plan.templates, dtype=weight.dtype)


def _numel(state: dict[str, Tensor], exclude_prefix: str | None = None) -> int:
    """Floating-point numbers in a state dict, optionally without one module's entries."""
    return sum(
        v.numel() for k, v in state.items()
        if v.is_floating_point() and not (exclude_prefix and k.startswith(exclude_prefix + "."))
    )


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise FileFormatError(f"{path}: file not found") from None


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (header length, then JSON); {} when absent."""
    import json

    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return {k: v for k, v in metadata.items() if isinstance(v, str)} if isinstance(metadata, dict) else {}


def _committed_record(directory: Path) -> dict[str, Any] | None:
    """The directory's config when it pins its files by sha256 (this format), else ``None``."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        record = read_json(path)
        _check_config_record(path, record)
    except FileFormatError:
        return None
    return record if "task_records" in record and "backbone_file" in record else None


def _settle(directory: Path, record: dict[str, Any]) -> None:
    """Finish a committed write: promote staged files, refresh task JSONs, drop leftovers.

    Safe to repeat: a writer runs it after its commit, and the next writer runs it again first
    in case the previous one was killed half-way through it.
    """
    promote(directory / BACKBONE_FILE, record["backbone_file"]["sha256"])
    for name, task_record in record["task_records"].items():
        path = directory / TASKS_DIR / f"{name}.safetensors"
        promote(path, task_record["sha256"])
        json_path = path.with_suffix(".json")
        try:
            current = read_json(json_path)
        except FileFormatError:
            current = None
        if current != task_record:
            atomic_write_json(json_path, task_record)
    for leftover in leftover_files(directory):
        leftover.unlink(missing_ok=True)


def _kept_records(directory: Path, previous: dict[str, Any] | None, fingerprint: str) -> dict[str, dict[str, Any]]:
    """Task records already in the directory that fit the backbone ``fingerprint`` (kept on save)."""
    if previous is not None:
        candidates = previous["task_records"]
    else:
        candidates = {}
        for path in sorted((directory / TASKS_DIR).glob("*.json")):
            try:
                candidates[path.stem] = read_json(path)
            except FileFormatError:
                continue
    return {
        name: record for name, record in candidates.items()
        if _TASK_NAME.match(name) and isinstance(record, dict) and not _task_record_problems(record)
        and record.get("fingerprint") == fingerprint
    }


def _task_record(directory: Path, name: str) -> tuple[Any, Path]:
    """Task ``name``'s record and the file it came from (the config when it pins the task)."""
    committed = _committed_record(directory)
    if committed is not None and name in committed["task_records"]:
        return committed["task_records"][name], directory / CONFIG_FILE
    path = directory / TASKS_DIR / f"{name}.json"
    return read_json(path), path


def _task_record_problems(record: dict[str, Any]) -> list[str]:
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
    if not _is_sha256(record.get("sha256")):
        problems.append("sha256 of the tensor file is missing or malformed")
    return problems


def _is_sha256(value: Any) -> bool:
    """True for 64 lowercase hex digits."""
    return isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) is not None


def _tensor_problems(tensors: dict[str, Tensor], expected: dict[str, Tensor]) -> list[str]:
    """Differences in names, shapes and dtypes between tensors read from a file and the model's."""
    problems = [f"missing {k}" for k in expected if k not in tensors]
    problems += [f"unexpected {k}" for k in tensors if k not in expected]
    for key, value in expected.items():
        if key in tensors and tensors[key].shape != value.shape:
            problems.append(f"{key}: shape {tuple(tensors[key].shape)} in file, {tuple(value.shape)} here")
        elif key in tensors and tensors[key].dtype != value.dtype:
            problems.append(f"{key}: dtype {tensors[key].dtype} in file, {value.dtype} here")
    return problems


def _check_config_record(path: Path, record: Any) -> None:
    """Refuse a ``recast_config.json`` that is not this format and version, or has ill-typed fields."""
    if not isinstance(record, dict) or record.get("format") != "recast-model":
        raise FileFormatError(f"{path}: not a recast model config")
    if record.get("format_version") != FORMAT_VERSION:
        raise FileFormatError(
            f"{path.parent}: format version {record.get('format_version')!r}, expected {FORMAT_VERSION}; "
            "use the recast version that wrote it"
        )
    problems = [f"'{key}' must be {kind}" for key, (kind, ok) in _config_field_checks(record).items() if not ok]
    if problems:
        raise FileFormatError(f"{path}: not a valid recast model config: " + "; ".join(problems))


def _config_field_checks(record: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """Each field of a model config with (what it must be, whether it is)."""
    banks, adapters, tasks = record.get("banks", []), record.get("adapters", []), record.get("tasks", [])
    records, pinned = record.get("task_records", {}), record.get("backbone_file", {"sha256": "0" * 64})
    return {
        "config": ("an object", isinstance(record.get("config"), dict)),
        "fingerprint": ("a sha256", _is_sha256(record.get("fingerprint"))),
        "recipe": ("null or an object", record.get("recipe") is None or isinstance(record.get("recipe"), dict)),
        "banks": ("a list of objects with 'layers' (strings)", isinstance(banks, list) and all(
            isinstance(b, dict) and isinstance(b.get("layers"), list) and all(isinstance(x, str) for x in b["layers"])
            for b in banks)),
        "adapters": ("a list of objects with 'kind' and 'options'", isinstance(adapters, list) and all(
            isinstance(a, dict) and isinstance(a.get("kind"), str) and isinstance(a.get("options", {}), dict)
            for a in adapters)),
        "active": ("null or a task name", record.get("active") is None or isinstance(record.get("active"), str)),
        "tasks": ("a list of task names", isinstance(tasks, list) and all(isinstance(t, str) for t in tasks)),
        "task_records": ("an object from task names to objects", isinstance(records, dict) and all(
            isinstance(k, str) and _TASK_NAME.match(k) and isinstance(v, dict) for k, v in records.items())),
        "backbone_file": ("an object with the sha256 of backbone.safetensors",
                          isinstance(pinned, dict) and _is_sha256(pinned.get("sha256"))),
        "mimicry_report": ("null or an object", isinstance(record.get("mimicry_report") or {}, dict)),
    }


def _check_backbone_header(path: Path, header: dict[str, str], fingerprint: str) -> None:
    """Refuse a backbone file whose metadata names another format, version or model."""
    if header.get("format", "recast-backbone") != "recast-backbone":
        raise FileFormatError(f"{path}: not a recast backbone file (metadata format {header.get('format')!r})")
    if header.get("format_version") != FORMAT_VERSION:
        raise FileFormatError(
            f"{path}: format version {header.get('format_version')!r}, this library reads {FORMAT_VERSION}; "
            "use the recast version that wrote it"
        )
    if header.get("fingerprint") != fingerprint:
        raise FileFormatError(
            f"{path}: belongs to another model (bank fingerprint {str(header.get('fingerprint'))[:12]}..., "
            f"recast_config.json says {fingerprint[:12]}...); keep each backbone with its own config"
        )


def _rebuild(path: Path, record: dict[str, Any]) -> nn.Module:
    """The base architecture from the config's recipe (random weights), or a file error saying why not."""
    if not record.get("recipe"):
        raise FileFormatError(f"{path.parent}: the base architecture is unknown; pass base=<an instance of it>")
    try:
        return build_from_recipe(record["recipe"])
    except RecastError:
        raise
    except Exception as exc:  # timm and torchvision raise many types for bad names or options
        raise FileFormatError(f"{path}: cannot rebuild the base model from its recipe ({type(exc).__name__}: {exc})") from None


def _read_safetensors(path: Path, data: bytes) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors blob; anything unreadable is a ``FileFormatError``."""
    try:
        return safetensors.torch.load(data), _safetensors_metadata(data)
    except Exception as exc:  # safetensors raises several types for corrupt input
        raise FileFormatError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
