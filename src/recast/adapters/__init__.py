"""Adapters that keep their weights per task, usable alone or on top of RECAST's generated layers.

``attach(model, kind, **options)`` inserts one (``RecastModel.add_adapter`` calls it). Each adapter
starts as the identity for every existing task and future tasks get their own state automatically.
Alone, an adapter runs on ``RecastModel.from_base(base, RecastConfig(target="none"))``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from recast.errors import ConfigError

if TYPE_CHECKING:
    from recast.model import RecastModel

ADAPTERS = ("melo", "adaptformer", "clr", "piggyback")
FITS: dict[str, tuple[str, ...]] = {  # adapter -> architectures it fits
    "melo": ("vit",),
    "adaptformer": ("vit",),
    "clr": ("resnet",),
    "piggyback": ("vit", "resnet", "other"),
}
ARCH_WORDS = {"vit": "a ViT", "resnet": "a ResNet", "other": "this architecture"}


def fitting(arch: str) -> list[str]:
    """The adapters that fit an architecture (``"vit"``, ``"resnet"`` or ``"other"``)."""
    return [name for name in ADAPTERS if arch in FITS[name]]


def attach(model: RecastModel, kind: str, **options: Any) -> None:
    """Insert adapter ``kind`` into ``model`` with ``options`` (rank, alpha, scale, threshold, ...).

    Fails with a ``ConfigError`` naming the adapters that fit when ``kind`` does not fit the
    architecture, is unknown, is already attached, or gets an option it does not take.
    """
    import inspect

    from recast.adapters import adaptformer, clr, melo, piggyback
    from recast.adapters.base import architecture

    modules = {"melo": melo, "adaptformer": adaptformer, "clr": clr, "piggyback": piggyback}
    if kind not in modules:
        raise ConfigError(f"unknown adapter {kind!r}; adapters: {', '.join(ADAPTERS)}")
    arch = architecture(model.net)
    if arch not in FITS[kind]:
        raise ConfigError(
            f"adapter {kind!r} does not fit {ARCH_WORDS[arch]} ({type(model.net).__name__}); "
            f"adapters that fit it: {', '.join(fitting(arch))}"
        )
    if any(a.get("kind") == kind for a in getattr(model, "adapters", [])):
        raise ConfigError(f"adapter {kind!r} is already attached to this model")
    allowed = [p for p in inspect.signature(modules[kind].attach).parameters if p != "model"]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"adapter {kind!r} has no option(s) {unknown}; its options: {allowed}")
    modules[kind].attach(model, **options)
