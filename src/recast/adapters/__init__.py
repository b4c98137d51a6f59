"""Adapters that keep their weights per task, usable alone or on top of RECAST's generated layers.

Each adapter module registers its ``attach`` with :func:`~recast.adapters.base.register_adapter`;
importing this package imports them all, so :data:`ADAPTERS` is complete. ``attach(model, kind,
**options)`` inserts one (``RecastModel.add_adapter`` calls it). Each adapter starts as the
identity for every existing task, and future tasks get their own state automatically. Alone, an
adapter runs on ``RecastModel.from_base(base, RecastConfig(target="none"))``.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

from recast.adapters import adaptformer, clr, melo, piggyback
from recast.adapters.base import ADAPTERS, AdapterEntry, architecture, register_adapter
from recast.errors import ConfigError

if TYPE_CHECKING:
    from recast.model import RecastModel

__all__ = [
    "ADAPTERS", "AdapterEntry", "adaptformer", "architecture", "attach", "clr", "fitting", "full_options", "melo", "options_of",
    "piggyback", "register_adapter", "saved_options",
]

ARCH_WORDS = {"vit": "a ViT", "resnet": "a ResNet", "effnet": "an EfficientNet", "other": "this architecture"}


def fitting(arch: str) -> list[str]:
    """The adapters that fit an architecture (``"vit"``, ``"resnet"``, ``"effnet"`` or ``"other"``)."""
    return [name for name, entry in ADAPTERS.items() if arch in entry.fits]


def options_of(kind: str) -> list[str]:
    """The option names adapter ``kind`` takes (its ``attach`` keyword arguments)."""
    return [p for p in inspect.signature(ADAPTERS[kind].attach).parameters if p != "model"]


def full_options(kind: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with every option adapter ``kind`` takes filled in from its defaults (what a file records)."""
    defaults = {name: p.default for name, p in inspect.signature(ADAPTERS[kind].attach).parameters.items()
                if name != "model" and p.default is not inspect.Parameter.empty}
    return {**defaults, **options}


def saved_options(kind: str, recorded: dict[str, Any]) -> dict[str, Any]:
    """The options a model file's adapter entry was written with (its omissions mean the old defaults)."""
    entry = ADAPTERS.get(kind)
    return {**(entry.unrecorded if entry else {}), **recorded}


def attach(model: RecastModel, kind: str, **options: Any) -> None:
    """Insert adapter ``kind`` into ``model`` with ``options`` (rank, alpha, scale, threshold, ...).

    Fails with a ``ConfigError`` naming the adapters that fit when ``kind`` does not fit the
    architecture, is unknown, is already attached, or gets an option it does not take.
    """
    if kind not in ADAPTERS:
        raise ConfigError(f"unknown adapter {kind!r}; adapters: {', '.join(ADAPTERS)}")
    arch = architecture(model.net)
    if arch not in ADAPTERS[kind].fits:
        raise ConfigError(
            f"adapter {kind!r} does not fit {ARCH_WORDS.get(arch, arch)} ({type(model.net).__name__}); "
            f"adapters that fit it: {', '.join(fitting(arch)) or 'none'}"
        )
    if any(a.get("kind") == kind for a in getattr(model, "adapters", [])):
        raise ConfigError(f"adapter {kind!r} is already attached to this model")
    unknown = sorted(set(options) - set(options_of(kind)))
    if unknown:
        raise ConfigError(f"adapter {kind!r} has no option(s) {unknown}; its options: {options_of(kind)}")
    ADAPTERS[kind].attach(model, **options)
