"""AdaptFormer: a bottleneck ``Linear(d->r) -> ReLU -> Linear(r->d)`` beside each block's MLP.

The adapter reads the MLP's input (the normalised tokens) and its output, times ``scale``, is added
to the MLP's output. The up-projection starts at zero, so a new task starts exactly at the wrapped
MLP's output. On ViT-S (d = 384, 12 blocks) r = 2 gives 12 x (384*2 + 2 + 2*384 + 384) = 23,064
numbers per task.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from recast.adapters.base import AdapterModule, install, outside_task_state, register_adapter
from recast.errors import ConfigError
from recast.tasks import TaskSpec

if TYPE_CHECKING:
    from recast.model import RecastModel


class Bottleneck(nn.Module):
    """``up(relu(down(x)))``: the adapter of one task."""

    def __init__(self, dim: int, rank: int, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.down = nn.Linear(dim, rank, device=device, dtype=dtype)
        self.up = nn.Linear(rank, dim, device=device, dtype=dtype)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)  # zero output at the start: the model is unchanged
            nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:  # (..., d) -> (..., d)
        return self.up(torch.relu(self.down(x)))


class ParallelAdapter(nn.Module):
    """``mlp(x) + scale * adapter(x)``: what an AdaptFormer block's MLP is once exported."""

    def __init__(self, mlp: nn.Module, adapter: nn.Module, scale: float) -> None:
        super().__init__()
        self.mlp, self.adapter, self.scale = mlp, adapter, scale

    def forward(self, x: Tensor) -> Tensor:  # (..., d) -> (..., d)
        return self.mlp(x) + self.scale * self.adapter(x)


class AdaptFormerMLP(AdapterModule):
    """A ViT block's MLP (with plain or generated layers) plus one bottleneck adapter per task."""

    def __init__(self, inner: nn.Module, rank: int = 2, scale: float = 0.1) -> None:
        super().__init__(inner)
        self.dim, self.rank, self.scale = inner.fc1.in_features, rank, scale

    def make_task_state(self, spec: TaskSpec) -> nn.Module:
        return Bottleneck(self.dim, self.rank, **self.factory())

    def forward_task(self, x: Tensor, task: str) -> Tensor:  # (..., d) -> (..., d): only the adapter
        return self.scale * self.per_task[task](x)

    def forward(self, x: Tensor) -> Tensor:
        """The wrapped MLP on the whole batch, plus each sample's task adapter."""
        return self.inner(x) + super().forward(x)

    def to_plain(self, task: str) -> nn.Module:
        adapter = Bottleneck(self.dim, self.rank, **self.factory())
        adapter.load_state_dict(self.per_task[task].state_dict())
        return ParallelAdapter(self.plain_inner(task), adapter, self.scale)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale}"


@register_adapter("adaptformer", fits=("vit",), recast_target="att")
def attach(model: RecastModel, rank: int = 2, scale: float = 0.1) -> None:
    """Put an AdaptFormer adapter beside the MLP of every ViT block (``blocks.<i>.mlp``)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"AdaptFormer rank must be a positive integer, got {rank!r}")
    names = [
        name for name, module in model.net.named_modules()
        if outside_task_state(name) and name.startswith("blocks.") and name.endswith(".mlp") and hasattr(module, "fc1")
    ]
    install(model, names, lambda inner: AdaptFormerMLP(inner, rank, float(scale)))
