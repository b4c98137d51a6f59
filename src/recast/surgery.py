"""Choosing the layers to rewrite, grouping them into banks, and swapping modules in place.

Layers are selected by stable module names (``blocks.*.attn.qkv``), never by position. A layer's
*role* is its name with block indices replaced by ``*`` (a stage index stays: ``blocks.2.1.conv_pw``
has role ``blocks.2.*.conv_pw``); layers of one role and shape are cut into G consecutive groups,
and each (group, role) gets one bank.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from fnmatch import fnmatchcase

from timm.layers import BatchNormAct2d
from torch import nn

from recast.config import RecastConfig
from recast.errors import ConfigError, SurgeryError
from recast.tasks import TaskBatchNorm, TaskHead

PRESET_PATTERNS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # target: (include patterns, exclude patterns)
    "att": (("blocks.*.attn.qkv",), ()),
    "mlp": (("blocks.*.mlp.fc1", "blocks.*.mlp.fc2"), ()),
    "att+mlp": (("blocks.*.attn.qkv", "blocks.*.mlp.fc1", "blocks.*.mlp.fc2"), ()),
    # Every block but the first of each stage (it changes width or stride); stem, downsample, head
    # stay plain. ResNet: the block's convs. EfficientNet (timm ``blocks.STAGE.BLOCK``): the
    # pointwise expansion and projection convs (``depthwise=True`` adds ``conv_dw``).
    "conv": (("layer*.*.conv*", "blocks.*.*.conv_pw", "blocks.*.*.conv_pwl"), ("layer*.0.*", "blocks.*.0.*")),
    "none": ((), ()),
}
DEPTHWISE_PATTERNS = ("blocks.*.*.conv_dw",)
POINTWISE_PATTERNS = ("blocks.*.*.conv_pw", "blocks.*.*.conv_pwl")
HEAD_NAMES = ("head", "fc", "classifier", "head.fc", "last_linear")


@dataclass(frozen=True)
class BankPlan:
    """One bank: its key, the role it serves, the layers that share it (in block order), n."""

    key: str
    role: str
    layers: tuple[str, ...]
    templates: int


def role_of(name: str) -> str:
    """``blocks.3.attn.qkv`` -> ``blocks.*.attn.qkv``: the name with block indices replaced by ``*``.

    A number followed directly by another number is a stage index (timm's EfficientNets name
    layers ``blocks.STAGE.BLOCK.conv_pw``) and stays, so each stage has roles of its own:
    ``blocks.2.1.conv_pw`` -> ``blocks.2.*.conv_pw``.
    """
    parts = name.split(".")
    stage = [p.isdigit() and i + 1 < len(parts) and parts[i + 1].isdigit() for i, p in enumerate(parts)]
    return ".".join("*" if part.isdigit() and not keep else part for part, keep in zip(parts, stage, strict=True))


def _bank_key(role: str, shape_tag: str, group: int) -> str:
    base = re.sub(r"[^0-9A-Za-z]+", "_", role).strip("_")
    return f"{base}{shape_tag}__g{group}"


def target_patterns(config: RecastConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Include and exclude patterns for a config (presets expand to their patterns)."""
    if config.is_preset:
        include, exclude = PRESET_PATTERNS[config.target]
        if config.depthwise:
            include = include + DEPTHWISE_PATTERNS
    else:
        include, exclude = config.target, ()
    return tuple(include), tuple(exclude) + tuple(config.exclude)


def pointwise_convs(net: nn.Module) -> list[str]:
    """Names of an EfficientNet's pointwise convs (``conv_pw``, ``conv_pwl`` of every block).

    LoRA targets these on EfficientNets: they hold most of the weights, and PEFT adapts 1x1
    convs exactly like linear layers.
    """
    return [name for name, module in net.named_modules()
            if isinstance(module, nn.Conv2d) and any(fnmatchcase(name, p) for p in POINTWISE_PATTERNS)]


def candidates(net: nn.Module) -> list[str]:
    """Names of every Linear/Conv2d module, summarised by role (what a target can name)."""
    counts: OrderedDict[str, int] = OrderedDict()
    for name, module in net.named_modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            role = role_of(name)
            counts[role] = counts.get(role, 0) + 1
    return [f"{role} ({count})" if count > 1 else role for role, count in counts.items()]


def select_layers(net: nn.Module, config: RecastConfig) -> list[str]:
    """Names of the Linear/Conv2d modules the config targets, in module order."""
    include, exclude = target_patterns(config)
    chosen = []
    for name, module in net.named_modules():
        if not any(fnmatchcase(name, p) for p in include) or any(fnmatchcase(name, p) for p in exclude):
            continue
        if not isinstance(module, nn.Linear | nn.Conv2d):
            continue
        _check_generatable(name, module)
        chosen.append(name)
    if not chosen and include:
        listing = ", ".join(candidates(net)[:40]) or "none"
        raise SurgeryError(
            f"target {config.target!r} matches no Linear or Conv2d module of this "
            f"{type(net).__name__}. Candidate names: {listing}"
        )
    return chosen


def has_plain_forward(module: nn.Linear | nn.Conv2d) -> bool:
    """Whether ``module`` runs ``nn.Linear``'s or ``nn.Conv2d``'s own forward (timm's ``Conv2dSame``,
    which pads at run time, does not): only then does ``F.linear`` / ``F.conv2d`` with its attributes
    compute the same thing."""
    plain = nn.Linear if isinstance(module, nn.Linear) else nn.Conv2d
    return type(module).forward is plain.forward


def _check_generatable(name: str, module: nn.Linear | nn.Conv2d) -> None:
    """Refuse layers whose forward is not the plain one (timm's ``Conv2dSame`` pads at run time, ...)."""
    if not has_plain_forward(module):
        plain = nn.Linear if isinstance(module, nn.Linear) else nn.Conv2d
        raise SurgeryError(
            f"{name} is a {type(module).__name__}, whose forward differs from {plain.__name__}'s; its weight "
            "cannot be generated faithfully. Exclude it (RecastConfig(exclude=[...])) or target other layers"
        )
    if isinstance(module, nn.Conv2d) and (module.padding_mode != "zeros" or isinstance(module.padding, str)):
        raise SurgeryError(f"{name}: only zero-padded Conv2d with explicit padding can be generated")


def plan_banks(net: nn.Module, config: RecastConfig) -> list[BankPlan]:
    """Group the targeted layers by role and shape, then into G consecutive groups per role."""
    modules = dict(net.named_modules())
    by_role: OrderedDict[tuple[str, tuple[int, ...]], list[str]] = OrderedDict()
    for name in select_layers(net, config):
        by_role.setdefault((role_of(name), tuple(modules[name].weight.shape)), []).append(name)
    roles_with_shapes: dict[str, int] = {}
    for role, _ in by_role:
        roles_with_shapes[role] = roles_with_shapes.get(role, 0) + 1
    groups = config.resolved_groups()
    plans = []
    for (role, shape), names in by_role.items():
        if len(names) % groups:
            divisors = [d for d in range(1, len(names) + 1) if len(names) % d == 0]
            raise ConfigError(
                f"groups={groups} does not divide the {len(names)} layers of {role}; "
                f"allowed values: {divisors}"
            )
        per_group = len(names) // groups
        shape_tag = "__" + "x".join(map(str, shape)) if roles_with_shapes[role] > 1 else ""
        for g in range(groups):
            members = tuple(names[g * per_group:(g + 1) * per_group])
            plans.append(BankPlan(_bank_key(role, shape_tag, g), role, members, config.templates or per_group))
    return plans


def find_head(net: nn.Module) -> str:
    """Name of the classifier module (timm's ``pretrained_cfg['classifier']`` or a usual name)."""
    modules = dict(net.named_modules())
    cfg = getattr(net, "pretrained_cfg", None)
    names = ([cfg.get("classifier")] if isinstance(cfg, dict) and cfg.get("classifier") else []) + list(HEAD_NAMES)
    for name in names:
        if isinstance(modules.get(name), nn.Linear | nn.Identity):
            return name
    raise SurgeryError(
        f"cannot find the classifier of this {type(net).__name__}: expected a Linear module named one of "
        f"{list(HEAD_NAMES)}"
    )


def head_in_features(net: nn.Module, head_name: str) -> int:
    """Width of the features the head receives."""
    head = net.get_submodule(head_name)
    if isinstance(head, nn.Linear):
        return head.in_features
    width = getattr(net, "num_features", None)
    if not isinstance(width, int):
        raise SurgeryError(f"cannot tell the feature width: {head_name} is not Linear and the model has no num_features")
    return width


def install_head(net: nn.Module, head_name: str) -> TaskHead:
    """Replace the classifier by a ``TaskHead`` that keeps the original one as task ``base``."""
    original = net.get_submodule(head_name)
    head = TaskHead(head_in_features(net, head_name))
    head.adopt("base", original)
    net.set_submodule(head_name, head)
    return head


def wrap_batchnorms(net: nn.Module) -> int:
    """Wrap every plain BatchNorm1d/2d (and timm's BatchNormAct2d) in a ``TaskBatchNorm``; returns how many."""
    kinds = (nn.BatchNorm1d, nn.BatchNorm2d, BatchNormAct2d)
    names = [n for n, m in net.named_modules() if type(m) in kinds]
    for name in names:
        net.set_submodule(name, TaskBatchNorm(net.get_submodule(name)))
    return len(names)
