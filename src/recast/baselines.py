"""Baselines with the same task protocol as ``RecastModel``: LoRA and VeRA (through PEFT), full fine-tuning.

(The linear probe is ``RecastModel`` with target ``"none"``: only per-task heads; see
``recast.methods``.) Each class keeps the pretrained weights frozen as the backbone and, per task,
its own state plus a classifier head (a :class:`~recast.tasks.TaskHead`):

- ``PeftTasks``: one PEFT adapter per task (``add_adapter`` / ``set_adapter``). On timm ViTs the
  default target is the fused ``attn.qkv``, so LoRA r=8 there adapts q, k *and* v (PEFT cannot
  adapt part of a fused layer): 147,456 numbers per task on ViT-S. VeRA's shared random
  projections are regenerated from ``projection_prng_key`` and not stored; per task only its
  scaling vectors are.
- ``FullFineTune``: every backbone weight (and BatchNorm statistics) per task. Each task starts
  from the pretrained weights and its task file holds the whole backbone, so earlier tasks stay
  bit-identical however later ones train.

Files follow ``RecastModel``'s layout (``tasks/<name>.safetensors`` + ``.json``, written
atomically; ``backbone.safetensors`` + ``recast_config.json`` with format ``recast-baseline``).
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor, nn

from recast.bank import fingerprint
from recast.errors import FileFormatError, TaskError
from recast.io import atomic_write_bytes, atomic_write_json, read_json
from recast.model import BACKBONE_FILE, CONFIG_FILE, FORMAT_VERSION, TASKS_DIR, TaskInfo
from recast.recipe import build_from_recipe, recipe_of
from recast.surgery import find_head, install_head
from recast.tasks import COUNT_KINDS, TaskHead, TaskSpec

BASELINE_FORMAT = "recast-baseline"


class TaskNetwork(nn.Module):
    """The task protocol over a network with a ``TaskHead`` and some per-task state of kind ``kind``.

    Subclasses implement ``_create``, ``_activate``, ``_remove``, ``_tensors`` and ``_load`` for
    their own per-task state; heads, names, counts, files and optimiser groups are handled here.
    """

    kind = "adapter"

    def __init__(self, net: nn.Module, method: str, options: dict[str, Any]) -> None:
        super().__init__()
        head_name = find_head(net)
        self.pretrained = {k: v.detach().to("cpu").clone() for k, v in net.state_dict().items()
                           if not k.startswith(head_name + ".")}  # the frozen backbone, stored once
        self.recipe = recipe_of(net)
        head = install_head(net, head_name)
        self.method, self.options = method, dict(options)
        self.lrs: dict[str, float | None] = {}
        self.tasks: dict[str, TaskInfo] = {"base": TaskInfo(num_classes=head.num_classes("base"))}
        self.active_task: str | None = None
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

    # ------------------------------------------------------------------------------------ tasks
    @property
    def head(self) -> TaskHead:
        """The task-head module (wherever the wrapping put it)."""
        return next(m for m in self.net.modules() if isinstance(m, TaskHead))

    @property
    def fingerprint(self) -> str:
        """sha256 of the frozen pretrained backbone; task files are refused by another backbone."""
        return self._fingerprint

    def _require_task(self, name: str) -> None:
        if name not in self.tasks:
            raise TaskError(f"no task named {name!r}; existing tasks: {', '.join(sorted(self.tasks)) or 'none'}")

    def add_task(
        self, name: str, num_classes: int, *, class_names: list[str] | None = None, own_bn: bool = False,
        init_from: str | None = None, meta: dict[str, Any] | None = None,
    ) -> None:
        """Add task ``name`` (fresh state and head, not activated). ``own_bn`` is recorded only."""
        if name in self.tasks:
            raise TaskError(f"task {name!r} already exists; delete_task({name!r}) first or pick another name")
        if not name or "." in name or isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise TaskError(f"invalid task {name!r} with num_classes={num_classes!r}")
        if class_names is not None and len(class_names) != num_classes:
            raise TaskError(f"{len(class_names)} class names given for {num_classes} classes")
        if init_from is not None:
            raise TaskError(f"init_from is not supported by method {self.method!r}")
        self._create(name)
        self.head.add_task(name, TaskSpec(num_classes=num_classes))
        if self.active_task is not None:  # creating an adapter may have frozen the active task
            self.set_task(self.active_task)
        info_meta = {"method": self.method, "method_options": self.recorded_options(), **(meta or {})}
        self.tasks[name] = TaskInfo(num_classes, list(class_names) if class_names else None, own_bn, info_meta)

    def recorded_options(self) -> dict[str, Any]:
        """The method's options and learning rates per group, as written to task files."""
        return {**self.options, "lrs": dict(self.lrs)}

    def set_task(self, name: str) -> None:
        """Activate ``name``: its state and head are used and are the only trainable tensors."""
        self._require_task(name)
        self._activate(name)
        self.head.activate(name)
        self.active_task = name

    def delete_task(self, name: str) -> None:
        """Forget task ``name`` (in memory)."""
        self._require_task(name)
        self._remove(name)
        self.head.delete_task(name)
        del self.tasks[name]
        if self.active_task == name:
            self.active_task = None

    def task_parameters(self, name: str) -> dict[str, int]:
        """Numbers stored for task ``name``, by kind (this method's ``kind`` and ``head``)."""
        self._require_task(name)
        counts = dict.fromkeys(COUNT_KINDS, 0)
        counts[self.kind] = sum(t.numel() for t in self._tensors(name).values() if t.is_floating_point())
        counts["head"] = self.head.task_numel(name)
        return counts

    def task_tensors(self, name: str) -> dict[str, Tensor]:
        """Task ``name``'s tensors as stored: ``<kind>.<key>`` and ``head.<key>``."""
        self._require_task(name)
        tensors = {f"{self.kind}.{k}": v for k, v in self._tensors(name).items()}
        tensors.update({f"head.{k}": v for k, v in self.head.task_tensors(name).items()})
        return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimiser groups of the active task: its own state and its head, each with its own lr."""
        head_ids = {id(p) for p in self.head.parameters()}
        trainable = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"name": self.kind, "params": [p for p in trainable if id(p) not in head_ids]},
            {"name": "head", "params": [p for p in trainable if id(p) in head_ids]},
        ]
        return [{**g, "lr": self.lrs.get(g["name"]) or lr} for g in groups if g["params"]]

    def forward(self, x: Tensor) -> Tensor:
        """Logits of the active task."""
        if self.active_task is None:
            raise TaskError(f"no task is active; call set_task(name) with one of: {', '.join(self.tasks) or 'none'}")
        return self.net(x)

    # ------------------------------------------------------------------------------------ files
    def save_task(self, directory: str | Path, name: str, meta: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write ``tasks/<name>.safetensors`` and ``tasks/<name>.json`` atomically; returns the record."""
        self._require_task(name)
        info = self.tasks[name]
        info.meta.update(meta or {})
        header = {"format": "recast-task", "format_version": FORMAT_VERSION, "fingerprint": self.fingerprint, "task": name}
        data = safetensors.torch.save(self.task_tensors(name), header)
        record = {
            **info.meta, "task": name, "format_version": FORMAT_VERSION, "num_classes": info.num_classes,
            "class_names": info.class_names, "own_bn": info.own_bn, "params": self.task_parameters(name),
            "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "fingerprint": self.fingerprint,
        }
        atomic_write_bytes(Path(directory) / TASKS_DIR / f"{name}.safetensors", data)
        atomic_write_json(Path(directory) / TASKS_DIR / f"{name}.json", record)
        return record

    def load_task(self, directory: str | Path, name: str, *, replace: bool = False) -> None:
        """Read task ``name``; a file that does not fit (checksum, backbone, tensors) is refused."""
        path = Path(directory) / TASKS_DIR / f"{name}.safetensors"
        record = read_json(path.with_suffix(".json"))
        tensors = self._read_task_file(path, record)
        if name in self.tasks and not replace:
            raise TaskError(f"task {name!r} is already loaded; pass replace=True to overwrite it")
        num_classes, meta = int(record["num_classes"]), {k: v for k, v in record.items() if k not in _RECORD_KEYS}
        if name in self.tasks and self.tasks[name].num_classes != num_classes:
            self.delete_task(name)
        if name in self.tasks:  # same shapes: overwrite in place
            self.tasks[name] = TaskInfo(num_classes, record.get("class_names"), bool(record.get("own_bn", False)), meta)
        else:
            with torch.random.fork_rng(devices=[]):
                self.add_task(name, num_classes, class_names=record.get("class_names"),
                              own_bn=bool(record.get("own_bn", False)), meta=meta)
        try:
            self._fill(name, tensors, path)
        except BaseException:
            self.delete_task(name)
            raise
        if self.active_task in (name, None):
            self.set_task(name)

    def _read_task_file(self, path: Path, record: dict[str, Any]) -> dict[str, Tensor]:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise FileFormatError(f"{path}: file not found") from None
        if record.get("sha256") and hashlib.sha256(data).hexdigest() != record["sha256"]:
            raise FileFormatError(f"{path}: checksum mismatch (the file is corrupt or was changed after saving)")
        if record.get("fingerprint") != self.fingerprint:
            raise FileFormatError(f"{path}: made for another backbone; load it with the backbone it was trained on")
        return safetensors.torch.load(data)

    def _fill(self, name: str, tensors: dict[str, Tensor], path: Path) -> None:
        expected = self.task_tensors(name)
        wrong = sorted(set(expected) ^ set(tensors)) + [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
        if wrong:
            raise FileFormatError(f"{path}: does not fit this model: {wrong[:10]}")
        prefix = self.kind + "."
        self._load(name, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        self.head.load_task_tensors(name, {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")})

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the frozen backbone, every task, and ``recast_config.json`` (last)."""
        directory = Path(directory)
        header = {"format": "recast-backbone", "format_version": FORMAT_VERSION, "fingerprint": self.fingerprint}
        atomic_write_bytes(directory / BACKBONE_FILE, safetensors.torch.save(self.pretrained, header))
        for name in self.tasks:
            self.save_task(directory, name)
        atomic_write_json(directory / CONFIG_FILE, {
            "format": BASELINE_FORMAT, "format_version": FORMAT_VERSION, "method": self.method,
            "options": self.options, "lrs": self.lrs, "recipe": self.recipe, "fingerprint": self.fingerprint,
            "tasks": list(self.tasks), "active": self.active_task,
        })


_RECORD_KEYS = frozenset({"task", "format_version", "num_classes", "class_names", "own_bn", "params", "bytes",
                          "sha256", "fingerprint"})


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
        net = copy.deepcopy(base)
        super().__init__(net, method, options if method == "lora" else {k: v for k, v in options.items() if k != "alpha"})
        from peft import get_peft_model

        net.requires_grad_(False)
        self.net = get_peft_model(net, self.peft_config(), adapter_name=self.adapter_name("base"))
        self.set_task("base")

    def peft_config(self) -> Any:
        """A fresh PEFT config for one task's adapter."""
        from peft import LoraConfig, VeraConfig

        o = self.options
        if self.method == "lora":
            return LoraConfig(r=o["rank"], lora_alpha=o["alpha"], target_modules=o["targets"], lora_dropout=o["dropout"])
        return VeraConfig(r=o["rank"], target_modules=o["targets"], vera_dropout=o["dropout"],
                          projection_prng_key=o["projection_prng_key"], save_projection=False)

    @staticmethod
    def adapter_name(task: str) -> str:
        """PEFT's name for a task's adapter (never a substring of PEFT's parameter prefixes)."""
        return f"task__{task}"

    def _create(self, name: str) -> None:
        import warnings

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
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.net, adapter_name=self.adapter_name(name))
        return {k: v.detach() for k, v in state.items()}

    def _load(self, name: str, tensors: dict[str, Tensor]) -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.net, tensors, adapter_name=self.adapter_name(name))
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise FileFormatError(f"PEFT did not accept {len(unexpected)} tensors, e.g. {unexpected[:3]}")

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

    def train(self, mode: bool = True) -> PeftTasks:
        """Like ``nn.Module.train``, but pretrained BatchNorm statistics never drift (no hidden state)."""
        super().train(mode)
        for module in self.net.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self


class FullFineTune(TaskNetwork):
    """Every backbone weight per task; the live network holds the active task's, the others wait on the CPU."""

    kind = "backbone"

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
            self.net.load_state_dict(tensors, strict=False)
        else:
            self._stash[name] = self._copy(tensors)


def build_baseline(method: str, base: nn.Module, **options: Any) -> TaskNetwork:
    """``lora`` / ``vera`` (``PeftTasks``) or ``full`` (``FullFineTune``) around a copy of ``base``."""
    if method == "full":
        if options:
            raise TaskError(f"full fine-tuning takes no options, got {sorted(options)}")
        return FullFineTune(base)
    return PeftTasks(base, method, **options)


def load_baseline(directory: str | Path, base: nn.Module | None = None) -> TaskNetwork:
    """Load a directory written by ``TaskNetwork.save_pretrained`` (architecture from its recipe or ``base``)."""
    directory = Path(directory)
    record = read_json(directory / CONFIG_FILE)
    if not isinstance(record, dict) or record.get("format") != BASELINE_FORMAT:
        raise FileFormatError(f"{directory / CONFIG_FILE}: not a recast baseline directory")
    if base is None:
        if not record.get("recipe"):
            raise FileFormatError(f"{directory}: the base architecture is unknown; pass base=<an instance of it>")
        base = build_from_recipe(record["recipe"])
    try:
        weights = safetensors.torch.load((directory / BACKBONE_FILE).read_bytes())
    except FileNotFoundError:
        raise FileFormatError(f"{directory / BACKBONE_FILE}: file not found") from None
    base.load_state_dict(weights, strict=False)
    model = build_baseline(record["method"], base, **record.get("options", {}))
    model.lrs = dict(record.get("lrs") or {})
    if model.fingerprint != record.get("fingerprint"):
        raise FileFormatError(f"{directory}: backbone fingerprint does not match {CONFIG_FILE}")
    for name in record.get("tasks", []):
        model.load_task(directory, name, replace=True)
    if record.get("active") in model.tasks:
        model.set_task(record["active"])
    return model
