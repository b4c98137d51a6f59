"""Every method of the comparison, by name: one registry for ``recast train --method`` and the benchmark.

``build_method(name, base, **options)`` returns a model with the task protocol (``add_task``,
``set_task``, ``delete_task``, ``task_parameters``, ``save_task``, ``load_task``, ``forward``) and
``param_groups(lr)`` for the optimiser. RECAST, the adapters (alone on target ``"none"``, or on a
RECAST target) and the linear probe are :class:`MethodModel` (a ``RecastModel``); LoRA, VeRA and
full fine-tuning come from :mod:`recast.baselines`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from recast.adapters import FITS
from recast.adapters.base import architecture
from recast.config import RecastConfig
from recast.errors import ConfigError
from recast.io import read_json
from recast.model import CONFIG_FILE, RecastModel


@dataclass(frozen=True)
class MethodSpec:
    """What a method is made of: a RECAST target (``"auto"``: by architecture), an adapter, or a baseline."""

    target: str | None = None
    adapter: str | None = None
    baseline: str | None = None
    fits: tuple[str, ...] = ("vit", "resnet", "other")


def _specs() -> dict[str, MethodSpec]:
    """The registry (a function, so nothing is built at import time)."""
    return {
        "recast": MethodSpec(target="auto", fits=("vit", "resnet")),
        "melo": MethodSpec(target="none", adapter="melo", fits=FITS["melo"]),
        "recast+melo": MethodSpec(target="mlp", adapter="melo", fits=FITS["melo"]),
        "adaptformer": MethodSpec(target="none", adapter="adaptformer", fits=FITS["adaptformer"]),
        "recast+adaptformer": MethodSpec(target="att", adapter="adaptformer", fits=FITS["adaptformer"]),
        "clr": MethodSpec(target="none", adapter="clr", fits=FITS["clr"]),
        "recast+clr": MethodSpec(target="conv", adapter="clr", fits=FITS["clr"]),
        "piggyback": MethodSpec(target="none", adapter="piggyback"),
        "recast+piggyback": MethodSpec(target="conv", adapter="piggyback", fits=("resnet",)),
        "lora": MethodSpec(baseline="lora", fits=("vit",)),
        "vera": MethodSpec(baseline="vera", fits=("vit",)),
        "linear": MethodSpec(target="none"),
        "full": MethodSpec(baseline="full"),
    }


METHOD_NAMES: tuple[str, ...] = (
    "recast", "melo", "recast+melo", "adaptformer", "recast+adaptformer", "clr", "recast+clr",
    "piggyback", "recast+piggyback", "lora", "vera", "linear", "full",
)
CONFIG_KEYS = ("target", "groups", "templates", "coef_sets", "exclude")
LR_KEYS = {"head_lr": "head", "coef_lr": "coefficients", "adapter_lr": "adapter", "mask_lr": "adapter"}


def methods_for(net: nn.Module) -> list[str]:
    """The methods that fit ``net``'s architecture."""
    arch = architecture(net)
    specs = _specs()
    return [m for m in METHOD_NAMES if arch in specs[m].fits]


class MethodModel(RecastModel):
    """A ``RecastModel`` that knows its method, its options and its learning rate per kind of state."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.method = "recast"
        self.method_options: dict[str, Any] = {}
        self.lrs: dict[str, float | None] = {}

    def add_task(self, name: str, num_classes: int, **kwargs: Any) -> None:
        """``RecastModel.add_task``, recording the method and its options in the task's metadata."""
        meta = {"method": self.method, "method_options": self.recorded_options(), **(kwargs.pop("meta", None) or {})}
        super().add_task(name, num_classes, meta=meta, **kwargs)

    def recorded_options(self) -> dict[str, Any]:
        """The method's options and learning rates per group, as written to task files."""
        return {**self.method_options, "lrs": dict(self.lrs)}

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimiser groups of the active task, one per kind (coefficients, head, adapter, other).

        Each uses ``self.lrs[kind]`` when set, else ``lr``; Piggyback's masks get no weight decay
        (it would pull them under the threshold).
        """
        by_kind: dict[str, list[nn.Parameter]] = {}
        seen: set[int] = set()
        for _, module in self.task_modules():
            for p in module.per_task[self.active_task].parameters() if self.active_task else ():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    by_kind.setdefault(module.kind, []).append(p)
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in seen]
        if rest:
            by_kind.setdefault("other", []).extend(rest)
        groups = []
        for kind, params in by_kind.items():
            group: dict[str, Any] = {"name": kind, "params": params, "lr": self.lrs.get(kind) or lr}
            if kind == "adapter" and any(a["kind"] == "piggyback" for a in self.adapters):
                group["weight_decay"] = 0.0
            groups.append(group)
        return groups

    def _config_record(self) -> dict[str, Any]:
        return {**super()._config_record(), "method": {"name": self.method, "options": self.method_options,
                                                         "lrs": self.lrs}}


def _split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, float | None], str]:
    """Options -> (RecastConfig fields, adapter options, lrs by kind, mimicry method)."""
    options = dict(options)
    config = {k: options.pop(k) for k in CONFIG_KEYS if k in options}
    lrs = {LR_KEYS[k]: options.pop(k) for k in list(options) if k in LR_KEYS}
    mimicry = options.pop("mimicry", "svd")
    return config, options, lrs, mimicry


def build_method(method: str, base: nn.Module, **options: Any) -> nn.Module:
    """The model for ``method`` around a copy of ``base`` (``base`` is not changed).

    Options: RECAST's ``target`` / ``groups`` / ``templates`` / ``coef_sets`` / ``exclude`` and
    ``mimicry``; the adapter's own (``rank``, ``alpha``, ``scale``, ``threshold``, ``init``,
    ``scope``, ``kernel_size``); learning rates ``head_lr``, ``coef_lr``, ``adapter_lr`` (alias
    ``mask_lr``); for ``lora`` / ``vera``: ``rank``, ``alpha``, ``targets``, ``dropout``,
    ``projection_prng_key``. All are recorded in every task file.
    """
    specs = _specs()
    if method not in specs:
        raise ConfigError(f"unknown method {method!r}; methods: {', '.join(METHOD_NAMES)}")
    spec, arch = specs[method], architecture(base)
    if arch not in spec.fits:
        raise ConfigError(
            f"method {method!r} does not fit this {type(base).__name__} ({arch}); "
            f"methods that fit it: {', '.join(methods_for(base))}"
        )
    if spec.baseline is not None:
        return _build_baseline(spec.baseline, base, options)
    config_fields, adapter_options, lrs, mimicry = _split_options(options)
    if spec.target != "auto" and "target" in config_fields and spec.target == "none":
        raise ConfigError(f"method {method!r} uses no RECAST target; use 'recast+{spec.adapter}' for one")
    target = config_fields.pop("target", spec.target)
    if target == "auto":
        target = "conv" if arch == "resnet" else "att"
    if adapter_options and spec.adapter is None:
        raise ConfigError(f"method {method!r} has no option(s) {sorted(adapter_options)}")
    model = MethodModel.from_base(base, RecastConfig(target=target, **config_fields), mimicry=mimicry)
    if spec.adapter is not None:
        model.add_adapter(spec.adapter, **adapter_options)
    model.method, model.lrs = method, lrs
    model.method_options = {"target": target, **config_fields, "mimicry": mimicry, **adapter_options}
    return model


def _build_baseline(name: str, base: nn.Module, options: dict[str, Any]) -> nn.Module:
    from recast.baselines import build_baseline

    options = dict(options)
    lrs = {LR_KEYS[k]: options.pop(k) for k in list(options) if k in LR_KEYS}
    model = build_baseline(name, base, **options)
    model.lrs = {("backbone" if name == "full" and k == "adapter" else k): v for k, v in lrs.items()}
    return model


def load_method(directory: str | Path, base: nn.Module | None = None) -> nn.Module:
    """Load any method's model directory (RECAST-based or baseline) written by ``save_pretrained``."""
    record = read_json(Path(directory) / CONFIG_FILE)
    if isinstance(record, dict) and record.get("format") == "recast-baseline":
        from recast.baselines import load_baseline

        return load_baseline(directory, base)
    model = MethodModel.from_pretrained(directory, base)
    method = record.get("method") or {}
    model.method = method.get("name", "recast")
    model.method_options = dict(method.get("options") or {})
    model.lrs = dict(method.get("lrs") or {})
    return model
