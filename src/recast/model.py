"""``RecastModel``: a pretrained network whose chosen layers are generated from template banks.

It owns the banks and the coefficient table (one flat tensor per task for every generated
layer), wraps the base network (rewritten in a copy), keeps per-task state in the network's
:class:`~recast.tasks.TaskModule` s (coefficients, heads, BatchNorm statistics, adapters), and
exports any task as an ordinary ``nn.Module``. The task protocol (records, names,
saving and loading) comes from :class:`recast.protocol.TaskModel`; the files from
:mod:`recast.format`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from recast.adapters import attach, full_options, saved_options
from recast.bank import TemplateBank, fingerprint
from recast.config import RecastConfig
from recast.errors import ConfigError, FileFormatError, RecastError, TaskError
from recast.format import FORMAT_VERSION, MODEL_FORMAT, ModelStore, consistent_read
from recast.format.records import tensor_problems
from recast.layers import CoefficientTable, generated_layer
from recast.mimicry import FitProblem, fidelity, fit, refine_with_data
from recast.protocol import TaskInfo, TaskModel
from recast.recipe import build_from_recipe, recipe_of
from recast.surgery import BankPlan, find_head, install_head, plan_banks, wrap_batchnorms
from recast.tasks import TaskBatchNorm, TaskHead, TaskModule, TaskSpec, routed


class RecastModel(TaskModel):
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
        coefficient_table: CoefficientTable | None = None,
    ) -> None:
        super().__init__(method="recast")
        self.net = net
        self.banks = nn.ModuleDict(banks)
        # Every task's coefficients (the generated layers of ``net`` hold references and offsets).
        self.coefficient_table = coefficient_table if coefficient_table is not None else CoefficientTable()
        self.config = config
        self.plans = plans
        self.head_name = head_name
        self.recipe = recipe
        self.mimicry_report: dict[str, Any] = mimicry_report or {}
        self.adapters: list[dict[str, Any]] = []  # [{"kind": ..., "options": {...}}], in order applied
        self._fingerprint: tuple[tuple[int, ...], str] | None = None
        self._task_module_list: list[tuple[str, TaskModule]] | None = None

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def from_base(
        cls, base: nn.Module, config: RecastConfig | None = None, mimicry: str = "svd",
        refine_images: Tensor | None = None, inplace: bool = False, **options: Any
    ) -> RecastModel:
        """Rewrite a copy of ``base`` (or ``base`` itself) as banks fitted to its weights by Neural Mimicry.

        ``options`` go to the mimicry method (e.g. ``steps``, ``lr`` for ``iterative``). With
        ``refine_images`` (unlabelled ``(N, C, H, W)``), the fit is then refined to match the
        base's block outputs on them (useful with fewer templates than layers per group). The base
        head becomes task ``base``, active on return. ``base`` itself is left untouched, unless
        ``inplace``: then it becomes the model's network (as PEFT's ``get_peft_model`` does), which
        spares a second copy of every pretrained weight while building (a ViT-S: 88 MB that a
        process rarely gets back from the allocator once freed); do not use ``base`` afterwards.
        """
        config = config or RecastConfig()
        if inplace and refine_images is not None:
            raise ConfigError("refine_images compares against the untouched base: use inplace=False with it")
        original_numel = _numel(base.state_dict(), exclude_prefix=find_head(base))
        recipe = recipe_of(base)
        net = base if inplace else copy.deepcopy(base)
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
        model = cls._assemble(net, config, plans, [(r.templates, r.coefficients) for r in results], recipe)
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
        banks, table = {}, CoefficientTable()
        for plan, (templates, coefficients) in zip(plans, fitted, strict=True):
            bank = banks[plan.key] = TemplateBank(templates)
            for index, name in enumerate(plan.layers):
                net.set_submodule(name, generated_layer(net.get_submodule(name), bank, coefficients[index], table))
        head_name = find_head(net)
        head = install_head(net, head_name)
        wrap_batchnorms(net)
        model = cls(net, config, plans, banks, head_name, recipe, coefficient_table=table)
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
        self._task_module_list = None
        try:
            attach(self, kind, **options)
        finally:
            self._task_module_list = None  # the module tree changed
        self.adapters.append({"kind": kind, "options": full_options(kind, options)})  # defaults may change

    # ------------------------------------------------------------------------ per-task state hooks
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

    @property
    def head_key(self) -> str:
        """The head's weight in a task file."""
        return f"{self.head_name}.weight"

    def _check_new_task(self, spec: TaskSpec) -> None:
        if spec.own_bn and not any(isinstance(m, TaskBatchNorm) for _, m in self.task_modules()):
            raise TaskError("own_bn=True needs BatchNorm layers, and this model has none")

    def _add_state(self, name: str, spec: TaskSpec) -> None:
        for _, module in self.task_modules():
            module.add_task(name, spec)

    def _activate_state(self, name: str) -> None:
        for _, module in self.task_modules():
            module.activate(name)

    def _delete_state(self, name: str) -> None:
        holders = [module for _, module in self.task_modules() if module.has_task(name)]  # before any forgets:
        for module in holders:  # generated layers share one table, so the first delete empties it for all
            module.delete_task(name)

    def _state_counts(self, name: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        for _, module in self.task_modules():
            counts[module.kind] = counts.get(module.kind, 0) + module.task_numel(name)
        return counts

    def _state_parameters(self, name: str) -> dict[str, list[nn.Parameter]]:
        by_kind: dict[str, list[nn.Parameter]] = {}
        for _, module in self.task_modules():
            by_kind.setdefault(module.kind, []).extend(module.parameters_of(name))
        return by_kind

    def _group_options(self, kind: str) -> dict[str, Any]:
        """Piggyback's masks get no weight decay (it would pull them under the threshold)."""
        if kind == "adapter" and any(a["kind"] == "piggyback" for a in self.adapters):
            return {"weight_decay": 0.0}
        return {}

    def _state_tensors(self, name: str) -> dict[str, Tensor]:
        """Every task module's tensors, the coefficients packed into one flat tensor."""
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
        return tensors

    def _load_state(self, name: str, tensors: dict[str, Tensor]) -> None:
        packed = tensors.get("coefficients")
        offset = 0
        for module_name, module in self.task_modules():
            own = module.task_tensors(name)
            if module.kind == "coefficients":
                values = {}
                for key, value in own.items():
                    values[key] = packed[offset:offset + value.numel()].reshape(value.shape)
                    offset += value.numel()
            else:
                values = {key: tensors[f"{module_name}.{key}"] for key in own}
            module.load_task_tensors(name, values)

    def _record_extras(self) -> dict[str, Any]:
        return {"effective_coefficients": self.effective_coefficients()}

    def effective_coefficients(self) -> int:
        """Coefficients per task after averaging the K sets: n per generated module."""
        return sum(len(p.layers) * p.templates for p in self.plans)

    # ---------------------------------------------------------------------------------- forward
    def forward_tasks(self, x: Tensor, tasks: Sequence[str], batching: str = "auto") -> Tensor:
        """One forward over a batch whose samples belong to different tasks.

        ``tasks[i]`` names sample ``i``'s task. Every task module sends each sample through its
        own task's state, so the logits equal per-task forwards; heads of different sizes are
        padded with ``-inf`` up to the largest. ``batching`` (``auto``, ``template``, ``group``)
        is how generated layers mix tasks (see :mod:`recast.layers`).
        """
        if len(tasks) != x.shape[0]:
            raise TaskError(f"{len(tasks)} task names for a batch of {x.shape[0]} samples")
        for name in dict.fromkeys(tasks):
            self.require_task(name)
        with routed((m for _, m in self.task_modules()), list(tasks), x.device, batching):
            return self.net(x)

    def export(self, name: str) -> nn.Module:
        """An ordinary copy of the base architecture with task ``name``'s generated weights and head."""
        self.require_task(name)
        memo = {id(bank): bank for bank in self.banks.values()}  # read, never copied
        memo[id(self.coefficient_table)] = self.coefficient_table
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

    def backbone_tensors(self) -> dict[str, Tensor]:
        """What ``backbone.safetensors`` holds: banks once, plus every frozen non-task tensor."""
        prefixes = tuple(f"{name}.per_task." for name, _ in self.task_modules())
        tensors = {f"banks.{key}.templates": bank.templates for key, bank in self.banks.items()}
        for key, value in self.net.state_dict().items():
            if not key.startswith(prefixes):
                tensors[f"net.{key}"] = value
        return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}

    def config_record(self) -> dict[str, Any]:
        """The fields of ``recast_config.json`` that describe this model."""
        return {
            "format": MODEL_FORMAT,
            "format_version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "recipe": self.recipe,
            "fingerprint": self.fingerprint,
            "banks": [{"key": p.key, "role": p.role, "layers": list(p.layers), "templates": p.templates} for p in self.plans],
            "head": self.head_name,
            "adapters": self.adapters,
            "mimicry_report": {k: v for k, v in self.mimicry_report.items() if k != "layers"},
            "method": {"name": self.method, "options": self.method_options, "lrs": self.lrs},
        }

    @classmethod
    @consistent_read
    def from_pretrained(cls, directory: str | Path, base: nn.Module | None = None) -> RecastModel:
        """Load a model directory written by :meth:`save_pretrained` (on the CPU).

        ``base`` is only needed when the directory's recipe cannot rebuild the architecture (a
        model that is neither from timm nor torchvision); its weights are not used. Every file is
        checked against the sha256 and fingerprint the config pins; any problem raises
        ``FileFormatError`` naming the file.
        """
        store = ModelStore(directory)
        record = store.read_config()
        path = store.config_path
        if record["format"] != MODEL_FORMAT:
            raise FileFormatError(f"{path}: a {record.get('method')!r} baseline, not a RECAST model; "
                                  "load it with recast.methods.load_method")
        try:
            config = RecastConfig.from_dict(record["config"])
        except ConfigError as exc:
            raise FileFormatError(f"{path}: invalid config ({exc})") from None
        # A network rebuilt from the recipe is ours already: copying it would hold every weight twice.
        net = _rebuild(path, record) if base is None else copy.deepcopy(base)
        plans = plan_banks(net, config)
        stored = [tuple(b["layers"]) for b in record.get("banks", [])]
        if stored != [p.layers for p in plans]:
            raise FileFormatError(
                f"{store.directory}: its layers do not fit the base model rebuilt from its recipe {record.get('recipe')}; "
                "pass base=<a model of the architecture it was made from>"
            )
        empty = [_empty_fit(net, p, config.coef_sets) for p in plans]
        model = cls._assemble(net, config, plans, empty, record.get("recipe"))
        model._add_recorded_adapters(path, record.get("adapters", []))
        model._load_backbone(store, record)
        model.mimicry_report = dict(record.get("mimicry_report") or {})
        method = record.get("method") or {}
        model.method = method.get("name", "recast")
        model.method_options = dict(method.get("options") or {})
        model.lrs = dict(method.get("lrs") or {})
        model._load_all_tasks(store, record)
        return model

    def _add_recorded_adapters(self, path: Path, adapters: list[dict[str, Any]]) -> None:
        """Re-apply the adapters the config lists; a bad entry is a file error naming the config."""
        for adapter in adapters:
            try:
                self.add_adapter(adapter["kind"], **saved_options(adapter["kind"], adapter.get("options", {})))
            except (RecastError, TypeError, ValueError, KeyError) as exc:
                raise FileFormatError(f"{path}: cannot re-apply adapter {adapter.get('kind')!r} ({exc})") from None

    def _load_backbone(self, store: ModelStore, record: dict[str, Any]) -> None:
        """Fill banks and frozen weights from ``backbone.safetensors`` (checked by the store)."""
        path = store.backbone_path
        tensors = store.read_backbone(record)
        problems = tensor_problems(tensors, self.backbone_tensors())
        if problems:
            raise FileFormatError(f"{path}: does not fit the base model: " + "; ".join(problems[:10]))
        with torch.no_grad():
            for key, bank in self.banks.items():
                bank.templates.copy_(tensors[f"banks.{key}.templates"])
            net_state = {k[len("net."):]: v for k, v in tensors.items() if k.startswith("net.")}
            self.net.load_state_dict(net_state, strict=False)
        if self.fingerprint != record["fingerprint"]:
            raise FileFormatError(f"{path}: bank fingerprint does not match recast_config.json (corrupt or mixed files)")


def _empty_fit(net: nn.Module, plan: BankPlan, coef_sets: int) -> tuple[Tensor, Tensor]:
    """Zero templates and coefficients of the right shapes (filled from a file afterwards)."""
    weight = net.get_submodule(plan.layers[0]).weight
    templates = torch.zeros(plan.templates, *weight.shape, dtype=weight.dtype, device=weight.device)
    return templates, torch.zeros(len(plan.layers), coef_sets, plan.templates, dtype=weight.dtype, device=weight.device)


def _numel(state: dict[str, Tensor], exclude_prefix: str | None = None) -> int:
    """Floating-point numbers in a state dict, optionally without one module's entries."""
    return sum(
        v.numel() for k, v in state.items()
        if v.is_floating_point() and not (exclude_prefix and k.startswith(exclude_prefix + "."))
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
