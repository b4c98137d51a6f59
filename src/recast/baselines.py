"""Baselines with RECAST's task protocol: LoRA and VeRA (through PEFT) and full fine-tuning.

(The linear probe is a ``RecastModel`` with target ``"none"``: only per-task heads; see
:mod:`recast.methods`.) Each class keeps the pretrained weights frozen as the backbone and, per
task, its own state plus a classifier head (a :class:`~recast.tasks.TaskHead`):

- ``PeftTasks``: one PEFT adapter per task (``add_adapter`` / ``set_adapter``). On timm ViTs the
  default target is the fused ``attn.qkv``, so LoRA r=8 there adapts q, k *and* v (PEFT cannot
  adapt part of a fused layer): 147,456 numbers per task on ViT-S. VeRA's shared random
  projections are regenerated from ``projection_prng_key`` and not stored; per task only its
  scaling vectors are.
- ``FullFineTune``: every backbone weight (and BatchNorm statistics) per task. Each task starts
  from the pretrained weights and its task file holds the whole backbone, so earlier tasks stay
  bit-identical however later ones train.

Tasks, names, records and files come from :class:`recast.protocol.TaskModel`, exactly as for
RECAST (the config's format is ``recast-baseline``).
"""

from __future__ import annotations

import copy
import inspect
import types
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from recast.bank import fingerprint
from recast.errors import ConfigError, FileFormatError, TaskError
from recast.format import BASELINE_FORMAT, FORMAT_VERSION, ModelStore, consistent_read
from recast.protocol import TaskInfo, TaskModel
from recast.recipe import build_from_recipe, recipe_of
from recast.surgery import find_head, install_head
from recast.tasks import TaskHead, TaskSpec


def _peft() -> types.ModuleType:
    """The ``peft`` package, imported on first use: with transformers it costs about 70 MB and 1.4 s,
    which a process that never builds a LoRA or VeRA baseline (training RECAST, serving) should not pay."""
    import peft  # deferred: heavy optional dependency of the LoRA/VeRA baselines only

    return peft


class TaskNetwork(TaskModel):
    """A frozen pretrained network with a ``TaskHead`` and per-task state of kind ``kind``.

    Subclasses implement ``_create``, ``_activate``, ``_remove``, ``_tensors``, ``_load`` and
    ``_parameters_of`` for their own per-task state; the head is handled here.
    """

    kind = "adapter"
    head_key = "head.weight"

    def __init__(self, net: nn.Module, method: str, options: dict[str, Any]) -> None:
        super().__init__(method, options)
        head_name = find_head(net)
        self.pretrained = {k: v.detach().to("cpu").clone() for k, v in net.state_dict().items()
                           if not k.startswith(head_name + ".")}  # the frozen backbone, stored once
        self.recipe = recipe_of(net)
        head = install_head(net, head_name)
        self.tasks["base"] = TaskInfo(num_classes=head.num_classes("base"))
        self._fingerprint = fingerprint(self.pretrained.items())

    # ---------------------------------------------------------------------------- subclass hooks
    def _create(self, name: str) -> None:
        raise NotImplementedError

    def _activate(self, name: str) -> None:
        raise NotImplementedError

    def _remove(self, name: str) -> None:
        raise NotImplementedError

    def _tensors(self, name: str) -> dict[str, Tensor]:
        raise NotImplementedError

    def _load(self, name: str, tensors: dict[str, Tensor]) -> None:
        raise NotImplementedError

    def _parameters_of(self, name: str) -> list[nn.Parameter]:
        raise NotImplementedError

    # ------------------------------------------------------------------------ TaskModel's hooks
    @property
    def head(self) -> TaskHead:
        """The task-head module (wherever the wrapping put it)."""
        return next(m for m in self.net.modules() if isinstance(m, TaskHead))

    @property
    def fingerprint(self) -> str:
        """sha256 of the frozen pretrained backbone; task files are refused by another backbone."""
        return self._fingerprint

    def backbone_tensors(self) -> dict[str, Tensor]:
        return self.pretrained

    def config_record(self) -> dict[str, Any]:
        return {"format": BASELINE_FORMAT, "format_version": FORMAT_VERSION, "method": self.method,
                "options": self.method_options, "lrs": self.lrs, "recipe": self.recipe, "fingerprint": self.fingerprint}

    def _check_new_task(self, spec: TaskSpec) -> None:
        if spec.init_from is not None:
            raise TaskError(f"init_from is not supported by method {self.method!r}")

    def _add_state(self, name: str, spec: TaskSpec) -> None:
        self._create(name)
        self.head.add_task(name, TaskSpec(num_classes=spec.num_classes))

    def _activate_state(self, name: str) -> None:
        self._activate(name)
        self.head.activate(name)

    def _delete_state(self, name: str) -> None:
        self._remove(name)
        if name in self.head.per_task:
            self.head.delete_task(name)

    def _state_tensors(self, name: str) -> dict[str, Tensor]:
        tensors = {f"{self.kind}.{k}": v for k, v in self._tensors(name).items()}
        tensors.update({f"head.{k}": v for k, v in self.head.task_tensors(name).items()})
        return tensors

    def _load_state(self, name: str, tensors: dict[str, Tensor]) -> None:
        prefix = self.kind + "."
        self._load(name, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        self.head.load_task_tensors(name, {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")})

    def _state_counts(self, name: str) -> dict[str, int]:
        own = sum(t.numel() for t in self._tensors(name).values() if t.is_floating_point())
        return {self.kind: own, "head": self.head.task_numel(name)}

    def _state_parameters(self, name: str) -> dict[str, list[nn.Parameter]]:
        return {self.kind: self._parameters_of(name), "head": list(self.head.per_task[name].parameters())}


class PeftTasks(TaskNetwork):
    """LoRA or VeRA through Hugging Face PEFT, one named adapter per task, plus a head per task."""

    kind = "adapter"

    def __init__(
        self,
        base: nn.Module,
        method: str = "lora",
        rank: int | None = None,
        alpha: float | None = None,
        targets: tuple[str, ...] | list[str] = ("qkv",),
        dropout: float = 0.0,
        projection_prng_key: int = 0,
    ) -> None:
        if method not in ("lora", "vera"):
            raise TaskError(f"PeftTasks supports 'lora' and 'vera', not {method!r}")
        rank = rank if rank is not None else (8 if method == "lora" else 256)  # PEFT's own defaults
        options = {"rank": rank, "alpha": alpha if alpha is not None else float(rank), "targets": list(targets),
                   "dropout": dropout, "projection_prng_key": projection_prng_key}
        if method == "vera":
            del options["alpha"]
        net = copy.deepcopy(base)
        super().__init__(net, method, options)
        net.requires_grad_(False)
        self.net = _peft().get_peft_model(net, self.peft_config(), adapter_name=self.adapter_name("base"))
        self.set_task("base")

    def peft_config(self) -> Any:
        """A fresh PEFT config for one task's adapter."""
        o = self.method_options
        if self.method == "lora":
            return _peft().LoraConfig(r=o["rank"], lora_alpha=o["alpha"], target_modules=o["targets"], lora_dropout=o["dropout"])
        return _peft().VeraConfig(r=o["rank"], target_modules=o["targets"], vera_dropout=o["dropout"],
                          projection_prng_key=o["projection_prng_key"], save_projection=False)

    @staticmethod
    def adapter_name(task: str) -> str:
        """PEFT's name for a task's adapter (never a substring of PEFT's parameter prefixes)."""
        return f"task__{task}"

    def _create(self, name: str) -> None:
        adapter = self.adapter_name(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # VeRA warns that projections are not saved
            if adapter not in self.net.peft_config:
                self.net.add_adapter(adapter, self.peft_config())
                return
            # kept by _remove as PEFT's last adapter: re-initialise it through a fresh one
            self.net.add_adapter("task__~fresh", self.peft_config())
            self._load(name, self._tensors("~fresh"))
            self.net.delete_adapter("task__~fresh")

    def _activate(self, name: str) -> None:
        self.net.set_adapter(self.adapter_name(name))

    def _remove(self, name: str) -> None:
        if len(self.net.peft_config) == 1:  # PEFT cannot delete its last adapter: keep it, unused
            return
        self.net.delete_adapter(self.adapter_name(name))

    def _tensors(self, name: str) -> dict[str, Tensor]:
        state = _peft().get_peft_model_state_dict(self.net, adapter_name=self.adapter_name(name))
        return {k: v.detach() for k, v in state.items()}

    def _load(self, name: str, tensors: dict[str, Tensor]) -> None:
        result = _peft().set_peft_model_state_dict(self.net, tensors, adapter_name=self.adapter_name(name))
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise FileFormatError(f"PEFT did not accept {len(unexpected)} tensors, e.g. {unexpected[:3]}")

    def _parameters_of(self, name: str) -> list[nn.Parameter]:
        marker = f".{self.adapter_name(name)}."
        return [p for n, p in self.net.named_parameters() if marker in f".{n}."]

    def peft_trainable_count(self) -> int:
        """What PEFT's ``get_nb_trainable_parameters`` reports for the active adapter alone."""
        head = list(self.head.parameters())
        saved = [p.requires_grad for p in head]
        for p in head:
            p.requires_grad_(False)
        try:
            return int(self.net.get_nb_trainable_parameters()[0])
        finally:
            for p, flag in zip(head, saved, strict=True):
                p.requires_grad_(flag)


class FullFineTune(TaskNetwork):
    """Every backbone weight per task; the live network holds the active task's, the others wait on the CPU."""

    kind = "backbone"
    freeze_norms = False  # each task has its own copy of every BatchNorm, statistics included

    def __init__(self, base: nn.Module) -> None:
        net = copy.deepcopy(base)
        super().__init__(net, "full", {})
        self.net = net
        self._stash: dict[str, dict[str, Tensor]] = {"base": self._copy(self.pretrained)}
        self._live: str | None = None
        self.set_task("base")

    @staticmethod
    def _copy(state: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: v.detach().to("cpu").clone() for k, v in state.items()}

    def _live_state(self) -> dict[str, Tensor]:
        state = self.net.state_dict()
        return {k: state[k] for k in self.pretrained}

    def _create(self, name: str) -> None:
        self._stash[name] = self._copy(self.pretrained)  # every task starts from the pretrained weights

    def _activate(self, name: str) -> None:
        if name != self._live:
            if self._live is not None:
                self._stash[self._live] = self._copy(self._live_state())
            self.net.load_state_dict(self._stash.pop(name), strict=False)
            self._live = name
        for key, param in self.net.named_parameters():
            param.requires_grad_(key in self.pretrained)

    def _remove(self, name: str) -> None:
        self._stash.pop(name, None)
        if self._live == name:
            self._live = None

    def _tensors(self, name: str) -> dict[str, Tensor]:
        return self._live_state() if name == self._live else self._stash[name]

    def _load(self, name: str, tensors: dict[str, Tensor]) -> None:
        if name == self._live:
            with torch.no_grad():
                self.net.load_state_dict(tensors, strict=False)
        else:
            self._stash[name] = self._copy(tensors)

    def _parameters_of(self, name: str) -> list[nn.Parameter]:
        if name != self._live:
            return []
        return [p for key, p in self.net.named_parameters() if key in self.pretrained]


def baseline_options(method: str) -> list[str]:
    """The options a baseline takes (``full`` takes none)."""
    if method == "full":
        return []
    return [p for p in inspect.signature(PeftTasks.__init__).parameters if p not in ("self", "base", "method")]


def build_baseline(method: str, base: nn.Module, **options: Any) -> TaskNetwork:
    """``lora`` / ``vera`` (``PeftTasks``) or ``full`` (``FullFineTune``) around a copy of ``base``."""
    unknown = sorted(set(options) - set(baseline_options(method)))
    if unknown:
        allowed = ", ".join(baseline_options(method)) or "none"
        raise ConfigError(f"method {method!r} has no option(s) {unknown}; its options: {allowed}")
    if method == "full":
        return FullFineTune(base)
    return PeftTasks(base, method, **options)


@consistent_read
def load_baseline(directory: str | Path, base: nn.Module | None = None) -> TaskNetwork:
    """Load a directory written by ``TaskNetwork.save_pretrained`` (architecture from its recipe or ``base``)."""
    store = ModelStore(directory)
    record = store.read_config()
    if record["format"] != BASELINE_FORMAT:
        raise FileFormatError(f"{store.config_path}: not a recast baseline directory")
    if base is None:
        if not record.get("recipe"):
            raise FileFormatError(f"{store.directory}: the base architecture is unknown; pass base=<an instance of it>")
        base = build_from_recipe(record["recipe"])
    weights = store.read_backbone(record)
    base.load_state_dict(weights, strict=False)
    model = build_baseline(record["method"], base, **record.get("options", {}))
    model.lrs = dict(record.get("lrs") or {})
    if model.fingerprint != record.get("fingerprint"):
        raise FileFormatError(f"{store.directory}: backbone fingerprint does not match {store.config_path.name}")
    model._load_all_tasks(store, record)
    return model
