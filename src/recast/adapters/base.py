"""What every adapter shares: the wrapper base class, architecture detection and installation.

An adapter wraps one module of the network (a plain or generated Linear/Conv2d, or a ViT MLP) and
keeps its own weights per task, so it is a :class:`~recast.tasks.TaskModule` of kind ``adapter``.
The wrapped module stays reachable as ``inner`` and keeps its own per-task state (coefficients),
so adapters combine with RECAST by wrapping generated layers.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from recast.layers import GeneratedConv2d, GeneratedLinear
from recast.tasks import TaskModule, TaskSpec

if TYPE_CHECKING:
    from recast.model import RecastModel

LINEAR_TYPES = (nn.Linear, GeneratedLinear)
CONV_TYPES = (nn.Conv2d, GeneratedConv2d)


@dataclass(frozen=True)
class AdapterEntry:
    """A registered adapter: how to attach it, which architectures it fits, and the RECAST target
    it is combined with in the method ``recast+<name>``."""

    name: str
    attach: Callable[..., None]
    fits: tuple[str, ...]
    recast_target: str
    lrs: dict[str, float] = field(default_factory=dict)  # default learning-rate options (``mask_lr`` ...)
    unrecorded: dict[str, Any] = field(default_factory=dict)  # what files that omit an option meant (old defaults)


ADAPTERS: dict[str, AdapterEntry] = {}


def register_adapter(
    name: str, *, fits: tuple[str, ...], recast_target: str, lrs: dict[str, float] | None = None,
    unrecorded: dict[str, Any] | None = None,
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register an adapter's ``attach(model, **options)`` under ``name`` (as timm registers models).

    Its keyword arguments are the adapter's options; the method registry builds ``name`` and
    ``recast+name`` from this entry. ``lrs`` are default learning-rate options of both methods
    (``head_lr``, ``coef_lr``, ``adapter_lr``, ``mask_lr``); rates given by the user win.
    ``unrecorded`` keeps a changed default loadable: the value a model file that does not record
    the option was written with (new files record every option).
    """

    def decorate(attach: Callable[..., None]) -> Callable[..., None]:
        ADAPTERS[name] = AdapterEntry(name, attach, tuple(fits), recast_target, dict(lrs or {}), dict(unrecorded or {}))
        return attach

    return decorate


class AdapterModule(TaskModule):
    """A ``TaskModule`` that wraps ``inner`` and adds one adapter state per task.

    Subclasses compute ``inner`` on the whole batch (it routes mixed-task batches itself) and send
    only their own contribution through ``TaskModule.forward`` (which routes per task).
    """

    kind = "adapter"

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def factory(self) -> dict[str, Any]:
        """``device`` and ``dtype`` of the wrapped module, for new per-task tensors."""
        ref = next(itertools.chain(self.inner.parameters(), self.inner.buffers()))
        return {"device": ref.device, "dtype": ref.dtype}

    def plain_inner(self, task: str) -> nn.Module:
        """The wrapped module as an ordinary module for ``task``.

        ``RecastModel.export`` converts the deepest modules first, so ``inner`` may already be plain.
        """
        if isinstance(self.inner, TaskModule):
            return self.inner.to_plain(task)
        return copy.deepcopy(self.inner)

    def inner_weight(self, task: str) -> torch.Tensor:
        """The wrapped layer's weight for ``task`` (generated per task, or the plain frozen one)."""
        weight_for = getattr(self.inner, "weight_for", None)
        return weight_for(task) if weight_for is not None else self.inner.weight


def architecture(net: nn.Module) -> str:
    """The family of ``net``, which decides the methods and adapters that fit it.

    ``"vit"`` (timm-style ``blocks.*.attn.qkv``), ``"resnet"`` (``layer*.*.conv*``), ``"effnet"``
    (timm's EfficientNet/MobileNet blocks: ``blocks.STAGE.BLOCK.conv_pw``) or ``"other"``.
    """
    names = [name for name, _ in net.named_modules()]
    if any(fnmatchcase(n, "blocks.*.attn.qkv") for n in names):
        return "vit"
    if any(fnmatchcase(n, "layer*.*.conv*") for n in names):
        return "resnet"
    if any(fnmatchcase(n, "blocks.*.*.conv_pw") for n in names):
        return "effnet"
    return "other"


def outside_task_state(name: str) -> bool:
    """True for modules that are part of the network, not of some task's state."""
    return "per_task" not in name.split(".")


def matching(net: nn.Module, patterns: Iterable[str], types: tuple[type, ...]) -> list[str]:
    """Names of modules of ``types`` matching any of ``patterns`` (``fnmatch``), in module order."""
    patterns = tuple(patterns)
    return [
        name for name, module in net.named_modules()
        if isinstance(module, types) and outside_task_state(name) and any(fnmatchcase(name, p) for p in patterns)
    ]


def install(model: RecastModel, names: list[str], wrap: Callable[[nn.Module], AdapterModule]) -> list[AdapterModule]:
    """Replace each named module of ``model.net`` by ``wrap(module)`` and give it every task's state.

    New states are identity-initialised by the adapters, so no existing task's output changes.
    """
    wrappers = []
    for name in names:
        wrapper = wrap(model.net.get_submodule(name))
        model.net.set_submodule(name, wrapper)
        for task, info in model.tasks.items():
            wrapper.add_task(task, TaskSpec(num_classes=info.num_classes, own_bn=info.own_bn))
        if model.active_task is not None:
            wrapper.activate(model.active_task)
        wrappers.append(wrapper)
    return wrappers
