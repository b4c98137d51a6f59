"""MeLo: low-rank updates (LoRA) on the query and value parts of a ViT's fused ``attn.qkv``.

Per block and task: ``A_q, A_v`` of shape ``(r, d)`` and ``B_q, B_v`` of shape ``(d, r)``; the
update ``(alpha / r) * B @ A`` is added to the q and v rows of the qkv weight, the k rows are left
alone. ``B`` starts at zero, so a new task starts exactly at the wrapped layer's output. On ViT-S
(d = 384, 12 blocks) r = 1 gives 12 x 2 x 1 x (384 + 384) = 18,432 numbers per task.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from recast.adapters.base import LINEAR_TYPES, AdapterModule, install, matching, register_adapter
from recast.errors import ConfigError
from recast.tasks import TaskSpec

if TYPE_CHECKING:
    from recast.model import RecastModel


class MeloQKV(AdapterModule):
    """A fused ``qkv`` Linear (plain or generated) plus per-task LoRA on its q and v outputs."""

    def __init__(self, inner: nn.Module, rank: int = 1, alpha: float = 4.0) -> None:
        super().__init__(inner)
        if inner.out_features % 3:
            raise ConfigError(f"MeLo needs a fused qkv layer (out = 3 x dim), got out_features={inner.out_features}")
        self.rank, self.alpha = rank, alpha
        self.dim, self.in_features = inner.out_features // 3, inner.in_features

    @property
    def scale(self) -> float:
        """LoRA's ``alpha / r``."""
        return self.alpha / self.rank

    def make_task_state(self, spec: TaskSpec) -> nn.Module:
        kw = self.factory()
        state = nn.ParameterDict()
        for part in ("q", "v"):
            a = torch.empty(self.rank, self.in_features, **kw)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            state[f"A_{part}"] = nn.Parameter(a)  # (r, in)
            state[f"B_{part}"] = nn.Parameter(torch.zeros(self.dim, self.rank, **kw))  # (d, r), zero: no change
        return state

    def delta_weight(self, task: str) -> Tensor:
        """The ``(3d, in)`` update of the qkv weight for ``task`` (zero rows for k)."""
        s = self.per_task[task]
        dq, dv = s["B_q"] @ s["A_q"], s["B_v"] @ s["A_v"]  # (d, in) each
        return self.scale * torch.cat([dq, torch.zeros_like(dq), dv], dim=0)

    def forward_task(self, x: Tensor, task: str) -> Tensor:  # (..., in) -> (..., 3d): only the update
        s = self.per_task[task]
        dq = (x @ s["A_q"].T) @ s["B_q"].T  # (..., d)
        dv = (x @ s["A_v"].T) @ s["B_v"].T
        return self.scale * torch.cat([dq, torch.zeros_like(dq), dv], dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        """Wrapped qkv on the whole batch, plus each sample's task update."""
        return self.inner(x) + super().forward(x)

    def to_plain(self, task: str) -> nn.Linear:
        """The qkv Linear with the update merged into its weight."""
        plain = self.plain_inner(task)
        with torch.no_grad():
            plain.weight.add_(self.delta_weight(task))
        return plain

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


@register_adapter("melo", fits=("vit",), recast_target="mlp")
def attach(model: RecastModel, rank: int = 1, alpha: float = 4.0, patterns: tuple[str, ...] = ("blocks.*.attn.qkv",)) -> None:
    """Wrap every fused qkv layer of a ViT with MeLo (r=1, alpha=4 by default, as in REFERENCE 5)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"MeLo rank must be a positive integer, got {rank!r}")
    names = matching(model.net, patterns, LINEAR_TYPES)
    install(model, names, lambda inner: MeloQKV(inner, rank, float(alpha)))
