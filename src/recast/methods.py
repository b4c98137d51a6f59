"""Every method of the comparison, by name: one registry for ``recast train --method`` and the benchmark.

``build_method(name, base, **options)`` returns a :class:`~recast.protocol.TaskModel`: RECAST,
each registered adapter alone (on target ``"none"``) and as ``recast+<adapter>`` (on the RECAST
target its registration names), and the linear probe are :class:`~recast.model.RecastModel` s;
LoRA, VeRA and full fine-tuning come from :mod:`recast.baselines`. The registry is derived from
the adapters' registrations, so a new adapter needs no edit here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from recast.adapters import ADAPTERS, architecture
from recast.baselines import build_baseline, load_baseline
from recast.config import RecastConfig
from recast.errors import ConfigError
from recast.format import BASELINE_FORMAT, ModelStore, consistent_read
from recast.model import RecastModel
from recast.protocol import TaskModel
from recast.surgery import pointwise_convs

ALL_ARCHS = ("vit", "resnet", "effnet", "other")
TARGET_FITS = {"att": ("vit",), "mlp": ("vit",), "att+mlp": ("vit",), "conv": ("resnet", "effnet")}
AUTO_TARGET = {"vit": "att", "resnet": "conv", "effnet": "conv"}  # method "recast", by architecture
CONFIG_KEYS = ("target", "groups", "templates", "coef_sets", "exclude", "depthwise")
LR_KEYS = {"head_lr": "head", "coef_lr": "coefficients", "adapter_lr": "adapter", "mask_lr": "adapter"}


@dataclass(frozen=True)
class MethodSpec:
    """What a method is made of: a RECAST target (``"auto"``: by architecture), an adapter, or a baseline."""

    target: str | None = None
    adapter: str | None = None
    baseline: str | None = None
    fits: tuple[str, ...] = ALL_ARCHS


def method_specs() -> dict[str, MethodSpec]:
    """The registry, in the order methods are listed (built on demand from the adapter registry)."""
    specs = {"recast": MethodSpec(target="auto", fits=tuple(AUTO_TARGET))}
    for name, entry in ADAPTERS.items():
        specs[name] = MethodSpec(target="none", adapter=name, fits=entry.fits)
        both = tuple(a for a in entry.fits if a in TARGET_FITS[entry.recast_target])
        specs[f"recast+{name}"] = MethodSpec(target=entry.recast_target, adapter=name, fits=both)
    specs["lora"] = MethodSpec(baseline="lora", fits=("vit", "effnet"))
    specs["vera"] = MethodSpec(baseline="vera", fits=("vit",))
    specs["linear"] = MethodSpec(target="none")
    specs["full"] = MethodSpec(baseline="full")
    return specs


METHOD_NAMES: tuple[str, ...] = tuple(method_specs())


def methods_for(net: nn.Module) -> list[str]:
    """The methods that fit ``net``'s architecture."""
    arch = architecture(net)
    return [name for name, spec in method_specs().items() if arch in spec.fits]


def _split_lrs(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, float | None]]:
    """Options without the learning rates, and the learning rates by kind of state."""
    rest = {k: v for k, v in options.items() if k not in LR_KEYS}
    return rest, {LR_KEYS[k]: v for k, v in options.items() if k in LR_KEYS}


def build_method(method: str, base: nn.Module, **options: Any) -> TaskModel:
    """The model for ``method`` around a copy of ``base`` (``base`` is not changed).

    Options: RECAST's ``target`` / ``groups`` / ``templates`` / ``coef_sets`` / ``exclude`` /
    ``depthwise`` and ``mimicry``; ``own_bn`` (every task keeps its own BatchNorm statistics); the adapter's own (``rank``, ``alpha``, ``scale``, ``threshold``, ``init``,
    ``scope``, ``kernel_size``); learning rates ``head_lr``, ``coef_lr``, ``adapter_lr`` (alias
    ``mask_lr``); for ``lora`` / ``vera``: ``rank``, ``alpha``, ``targets``, ``dropout``,
    ``projection_prng_key``. All are recorded in every task file.
    """
    specs = method_specs()
    if method not in specs:
        raise ConfigError(f"unknown method {method!r}; methods: {', '.join(specs)}")
    spec, arch = specs[method], architecture(base)
    if arch not in spec.fits:
        raise ConfigError(
            f"method {method!r} does not fit this {type(base).__name__} ({arch}); "
            f"methods that fit it: {', '.join(methods_for(base))}"
        )
    if spec.adapter is not None:
        options = {**ADAPTERS[spec.adapter].lrs, **options}  # the adapter's default rates; the user's win
    options, lrs = _split_lrs(options)
    if spec.baseline is not None:
        if spec.baseline == "lora" and "targets" not in options and arch == "effnet":
            options["targets"] = pointwise_convs(base)  # PEFT adapts 1x1 convs; ViTs keep the default qkv
        model = build_baseline(spec.baseline, base, **options)
        model.lrs = {("backbone" if spec.baseline == "full" and k == "adapter" else k): v for k, v in lrs.items()}
        return model
    return _build_recast(method, spec, arch, base, options, lrs)


def _build_recast(
    method: str, spec: MethodSpec, arch: str, base: nn.Module, options: dict[str, Any], lrs: dict[str, float | None]
) -> RecastModel:
    """A ``RecastModel`` for a method of RECAST, an adapter, or the linear probe."""
    fields = {k: options.pop(k) for k in CONFIG_KEYS if k in options}
    mimicry = options.pop("mimicry", "svd")
    own_bn = _own_bn_option(options.pop("own_bn", False), base)
    if spec.target == "none" and "target" in fields:
        instead = f"'recast+{spec.adapter}'" if spec.adapter else "'recast'"
        raise ConfigError(f"method {method!r} uses no RECAST target; use {instead} to combine it with one")
    if options and spec.adapter is None:
        raise ConfigError(f"method {method!r} has no option(s) {sorted(options)}; "
                          f"its options: {', '.join(CONFIG_KEYS)}, mimicry and learning rates {', '.join(LR_KEYS)}")
    target = fields.pop("target", spec.target)
    if target == "auto":
        target = AUTO_TARGET[arch]
    model = RecastModel.from_base(base, RecastConfig(target=target, **fields), mimicry=mimicry)
    if spec.adapter is not None:
        model.add_adapter(spec.adapter, **options)
    model.method, model.lrs = method, lrs
    model.method_options = {"target": target, **fields, "mimicry": mimicry, **options,
                            **({"own_bn": True} if own_bn else {})}
    return model


def _own_bn_option(value: Any, base: nn.Module) -> bool:
    """The ``own_bn`` option checked: a bool, and BatchNorm layers to keep per task when true."""
    if not isinstance(value, bool):
        raise ConfigError(f"own_bn must be true or false, got {value!r}")
    if value and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in base.modules()):
        raise ConfigError(f"own_bn=true needs BatchNorm layers, and this {type(base).__name__} has none")
    return value


@consistent_read
def load_method(directory: str | Path, base: nn.Module | None = None) -> TaskModel:
    """Load any method's model directory (RECAST-based or baseline) written by ``save_pretrained``."""
    if ModelStore(directory).read_config()["format"] == BASELINE_FORMAT:
        return load_baseline(directory, base)
    return RecastModel.from_pretrained(directory, base)
