"""``RecastConfig``: which layers become template banks, and how many templates and coefficients."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from recast.errors import ConfigError

PRESET_TARGETS = ("att", "mlp", "att+mlp", "conv", "none")


@dataclass(frozen=True)
class RecastConfig:
    """How to rewrite a model (REFERENCE.md sections 1 and 2).

    Attributes:
        target: ``"att"`` (ViT ``attn.qkv``), ``"mlp"`` (``mlp.fc1``/``fc2``), ``"att+mlp"``,
            ``"conv"`` (in every block but the first of each stage: a ResNet's convolutions, an
            EfficientNet's pointwise ``conv_pw``/``conv_pwl``), or a tuple of module-name
            patterns (``fnmatch`` syntax, e.g. ``"blocks.*.attn.proj"``).
        groups: G, how many consecutive groups the layers of one role are cut into (one bank per
            group and role). ``None`` means the paper's choice: 6 for ViT targets, one group per
            role for ``conv`` and patterns (a conv role is already one stage).
        templates: n, templates per bank. ``None`` means as many as layers per group, which makes
            Neural Mimicry exact. Fewer compresses the backbone; more adds spare directions.
        coef_sets: K, coefficient sets per module, averaged (K > 1 changes optimisation only).
        exclude: module-name patterns never rewritten, on top of the preset's own exclusions.
        depthwise: with target ``"conv"``, also rewrite an EfficientNet's depthwise ``conv_dw``
            (more coefficients per task; ResNets have none, so nothing changes there).
    """

    target: str | tuple[str, ...] = "att"
    groups: int | None = None
    templates: int | None = None
    coef_sets: int = 2
    exclude: tuple[str, ...] = field(default_factory=tuple)
    depthwise: bool = False

    def __post_init__(self) -> None:
        target = self.target
        if isinstance(target, list):
            target = tuple(target)
            object.__setattr__(self, "target", target)
        if isinstance(self.exclude, list | str):
            object.__setattr__(self, "exclude", tuple([self.exclude] if isinstance(self.exclude, str) else self.exclude))
        if isinstance(target, str):
            if target not in PRESET_TARGETS:
                raise ConfigError(
                    f"unknown target {target!r}: use one of {', '.join(PRESET_TARGETS)}, "
                    "or a list of module-name patterns such as ['blocks.*.attn.proj']"
                )
        elif not target or not all(isinstance(p, str) and p for p in target):
            raise ConfigError("target patterns must be a non-empty list of non-empty strings")
        _check_positive("groups", self.groups, optional=True)
        _check_positive("templates", self.templates, optional=True)
        _check_positive("coef_sets", self.coef_sets, optional=False)
        if not isinstance(self.depthwise, bool):
            raise ConfigError(f"depthwise must be true or false, got {self.depthwise!r}")
        if self.depthwise and self.target != "conv":
            raise ConfigError(f"depthwise=True applies to target 'conv' only, not {self.target!r}; "
                              "name depthwise layers in target patterns instead (e.g. 'blocks.*.*.conv_dw')")

    @property
    def is_preset(self) -> bool:
        """True for the named targets, False for user patterns."""
        return isinstance(self.target, str)

    def resolved_groups(self) -> int:
        """G as used: the given value, else the paper's 6 for ViT targets and 1 otherwise."""
        if self.groups is not None:
            return self.groups
        return 6 if self.target in ("att", "mlp", "att+mlp") else 1

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        data = asdict(self)
        data["target"] = self.target if self.is_preset else list(self.target)
        data["exclude"] = list(self.exclude)
        if not self.depthwise:  # written only when set, so files of configs without it stay as they were
            del data["depthwise"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RecastConfig:
        """Inverse of :meth:`to_dict`; unknown keys and ill-typed values are a ``ConfigError``.

        The input may come from a file someone edited, so every field is type-checked here
        before the dataclass sees it: a bad value never surfaces as a ``TypeError``.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"a RECAST config must be a JSON object, got {type(data).__name__}")
        known = {"target", "groups", "templates", "coef_sets", "exclude", "depthwise"}
        unknown = sorted(set(data) - known, key=str)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; allowed: {sorted(known)}")
        target = data.get("target", "att")
        if isinstance(target, list | tuple):
            target = tuple(target)
        elif not isinstance(target, str):
            raise ConfigError(f"target must be a preset name or a list of module-name patterns, got {target!r}")
        exclude = data.get("exclude", ())
        if not isinstance(exclude, list | tuple) or not all(isinstance(p, str) and p for p in exclude):
            raise ConfigError(f"exclude must be a list of module-name patterns (non-empty strings), got {exclude!r}")
        return cls(
            target=target,
            groups=data.get("groups"),
            templates=data.get("templates"),
            coef_sets=data.get("coef_sets", 2),
            exclude=tuple(exclude),
            depthwise=data.get("depthwise", False),
        )

    def to_json(self) -> str:
        """Sorted JSON, as written next to the weights."""
        return json.dumps(self.to_dict(), sort_keys=True)


def _check_positive(name: str, value: Any, *, optional: bool) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "a positive integer" + (" or None (the paper's default)" if optional else "")
        raise ConfigError(f"{name} must be {allowed}, got {value!r}")
