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
import hashlib
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
from recast.errors import FileFormatError, TaskError
from recast.io import atomic_write_bytes, atomic_write_json, read_json
from recast.layers import generated_layer
from recast.mimicry import FitProblem, fidelity, fit
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

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def from_base(
        cls, base: nn.Module, config: RecastConfig | None = None, mimicry: str = "svd", **options: Any
    ) -> RecastModel:
        """Rewrite a copy of ``base`` as banks fitted to its weights by Neural Mimicry.

        ``options`` go to the mimicry method (e.g. ``steps``, ``lr`` for ``iterative``). The base
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

        attach(self, kind, **options)
        self.adapters.append({"kind": kind, "options": dict(options)})

    # ------------------------------------------------------------------------------------ tasks
    def task_modules(self) -> Iterator[tuple[str, TaskModule]]:
        """Every module that keeps per-task state, with its name inside ``net``."""
        for name, module in self.net.named_modules():
            if isinstance(module, TaskModule):
                yield name, module

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
        """Write the backbone, every task and the config (each file atomically; config last)."""
        directory = Path(directory)
        (directory / TASKS_DIR).mkdir(parents=True, exist_ok=True)
        meta = {"format": "recast-backbone", "format_version": FORMAT_VERSION, "fingerprint": self.fingerprint}
        atomic_write_bytes(directory / BACKBONE_FILE, safetensors.torch.save(self.backbone_tensors(), meta))
        for name in self.tasks:
            self.save_task(directory, name)
        atomic_write_json(directory / CONFIG_FILE, self._config_record())

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
        """Write ``tasks/<name>.safetensors`` and ``tasks/<name>.json``; returns the JSON record."""
        info = self.tasks.get(name)
        self._require_task(name)
        if meta:
            info.meta.update(meta)
        header = {"format": "recast-task", "format_version": FORMAT_VERSION, "fingerprint": self.fingerprint, "task": name}
        data = safetensors.torch.save(self.task_tensors(name), header)
        record = {
            **info.meta,
            "task": name,
            "format_version": FORMAT_VERSION,
            "num_classes": info.num_classes,
            "class_names": info.class_names,
            "own_bn": info.own_bn,
            "params": self.task_parameters(name),
            "effective_coefficients": self.effective_coefficients(),
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "fingerprint": self.fingerprint,
        }
        tasks_dir = Path(directory) / TASKS_DIR
        atomic_write_bytes(tasks_dir / f"{name}.safetensors", data)
        atomic_write_json(tasks_dir / f"{name}.json", record)
        return record

    def load_task(self, directory: str | Path, name: str, *, replace: bool = False) -> None:
        """Read task ``name`` from a model directory; on any error the model is left unchanged."""
        tasks_dir = Path(directory) / TASKS_DIR
        record = read_json(tasks_dir / f"{name}.json")
        tensor_path = tasks_dir / f"{name}.safetensors"
        data = _read_bytes(tensor_path)
        tensors = self._check_task_file(tensor_path, record, data)
        if name in self.tasks and not replace:
            raise TaskError(f"task {name!r} is already loaded; pass replace=True to overwrite it")
        info = TaskInfo(
            num_classes=int(record["num_classes"]),
            class_names=record.get("class_names"),
            own_bn=bool(record.get("own_bn", False)),
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

    def _check_task_file(self, path: Path, record: dict[str, Any], data: bytes) -> dict[str, Tensor]:
        if not isinstance(record, dict) or "num_classes" not in record:
            raise FileFormatError(f"{path.with_suffix('.json')}: not a recast task record")
        if record.get("sha256") and hashlib.sha256(data).hexdigest() != record["sha256"]:
            raise FileFormatError(f"{path}: checksum mismatch (the file is corrupt or was changed after saving)")
        try:
            tensors = safetensors.torch.load(data)
            header = _safetensors_metadata(data)
        except Exception as exc:  # safetensors raises several types for corrupt input
            raise FileFormatError(f"{path}: not a readable safetensors file ({exc})") from None
        if header.get("format") != "recast-task":
            raise FileFormatError(f"{path}: not a recast task file")
        if header.get("format_version") != FORMAT_VERSION:
            raise FileFormatError(f"{path}: format version {header.get('format_version')!r}, this library reads {FORMAT_VERSION}")
        if header.get("fingerprint") != self.fingerprint:
            raise FileFormatError(
                f"{path}: made for another backbone (bank fingerprint {str(header.get('fingerprint'))[:12]}..., "
                f"this model's is {self.fingerprint[:12]}...); load it with the backbone it was trained on"
            )
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
        problems = [f"missing {k}" for k in expected if k not in tensors]
        problems += [f"unexpected {k}" for k in tensors if k not in expected]
        problems += [
            f"{k}: shape {tuple(tensors[k].shape)} in file, {tuple(v.shape)} here"
            for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape
        ]
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
        model that is neither from timm nor torchvision); its weights are not used.
        """
        directory = Path(directory)
        record = read_json(directory / CONFIG_FILE)
        if not isinstance(record, dict) or record.get("format") != "recast-model":
            raise FileFormatError(f"{directory / CONFIG_FILE}: not a recast model config")
        if record.get("format_version") != FORMAT_VERSION:
            raise FileFormatError(f"{directory}: format version {record.get('format_version')!r}, expected {FORMAT_VERSION}")
        config = RecastConfig.from_dict(record["config"])
        if base is None:
            if not record.get("recipe"):
                raise FileFormatError(f"{directory}: the base architecture is unknown; pass base=<an instance of it>")
            base = build_from_recipe(record["recipe"])
        net = copy.deepcopy(base)
        plans = plan_banks(net, config)
        stored = [tuple(b["layers"]) for b in record.get("banks", [])]
        if stored != [p.layers for p in plans]:
            raise FileFormatError(
                f"{directory}: its layers do not fit the base model rebuilt from its recipe {record.get('recipe')}; "
                "pass base=<a model of the architecture it was made from>"
            )
        empty = [_empty_fit(net, p, config.coef_sets) for p in plans]
        model = cls._assemble(net, config, plans, empty, record.get("recipe"))
        for adapter in record.get("adapters", []):
            model.add_adapter(adapter["kind"], **adapter.get("options", {}))
        model._load_backbone(directory / BACKBONE_FILE, record["fingerprint"])
        model.mimicry_report = dict(record.get("mimicry_report") or {})
        model._load_all_tasks(directory, record)
        return model

    def _load_backbone(self, path: Path, expected_fingerprint: str) -> None:
        data = _read_bytes(path)
        try:
            tensors = safetensors.torch.load(data)
            header = _safetensors_metadata(data)
        except Exception as exc:
            raise FileFormatError(f"{path}: not a readable safetensors file ({exc})") from None
        expected = self.backbone_tensors()
        problems = [f"missing {k}" for k in expected if k not in tensors]
        problems += [f"unexpected {k}" for k in tensors if k not in expected]
        problems += [
            f"{k}: {tuple(tensors[k].shape)} in file, {tuple(v.shape)} here"
            for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape
        ]
        if problems:
            raise FileFormatError(f"{path}: does not fit the base model: " + "; ".join(problems[:10]))
        with torch.no_grad():
            for key, bank in self.banks.items():
                bank.templates.copy_(tensors[f"banks.{key}.templates"])
            net_state = {k[len("net."):]: v for k, v in tensors.items() if k.startswith("net.")}
            self.net.load_state_dict(net_state, strict=False)
        if not (self.fingerprint == expected_fingerprint == header.get("fingerprint")):
            raise FileFormatError(f"{path}: bank fingerprint does not match recast_config.json (corrupt or mixed files)")

    def _load_all_tasks(self, directory: Path, record: dict[str, Any]) -> None:
        on_disk = sorted(p.stem for p in (directory / TASKS_DIR).glob("*.json"))
        order = [t for t in record.get("tasks", []) if t in on_disk] + [t for t in on_disk if t not in record.get("tasks", [])]
        for name in order:
            self.load_task(directory, name, replace=True)
        for name in [t for t in self.tasks if t not in order]:
            self.delete_task(name)
        active = record.get("active")
        if active in self.tasks:
            self.set_task(active)
        elif self.tasks:
            self.set_task(next(iter(self.tasks)))


_RECORD_KEYS = frozenset(
    {"task", "format_version", "num_classes", "class_names", "own_bn", "params", "effective_coefficients",
     "bytes", "sha256", "fingerprint"}
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
    """The ``__metadata__`` of a safetensors blob (header length, then JSON)."""
    import json

    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    return header.get("__metadata__", {}) or {}

