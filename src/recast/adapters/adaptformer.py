"""AdaptFormer: a bottleneck ``Linear(d->r) -> ReLU -> Linear(r->d)`` beside each block's MLP.

The adapter's output, times ``scale``, is added to the MLP's output. What it reads is an option:

- ``input="pre_norm"`` (default): the block's residual stream before ``norm2``, as the reference
  release does. The block's ``norm2`` then moves inside the wrapper (``mlp(norm(x)) + scale *
  adapter(x)``) and the block keeps an ``Identity`` in its place, so the block computes the same
  function;
- ``input="post_norm"``: the MLP's own input, the tokens after the block's ``norm2`` (for blocks
  that are not timm's pre-norm ``Block``).

The scale defaults to the reference's ``alpha // r = 4 // 2 = 2`` (:data:`REFERENCE`). Both were
``post_norm`` and 0.1 before a one-seed comparison on the quick offline suite (vit32,
``results/presets/``) gave 0.620 for those against 0.647 for the reference's; model files that do
not record the options were written with the old values and load with them. The
up-projection starts at zero, so a new task starts exactly at the wrapped MLP's output, whichever
the input. On ViT-S (d = 384, 12 blocks) r = 2 gives 12 x (384*2 + 2 + 2*384 + 384) = 23,064
numbers per task.
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from recast.adapters.base import AdapterModule, install, outside_task_state, register_adapter
from recast.errors import ConfigError
from recast.tasks import TaskSpec

if TYPE_CHECKING:
    from recast.model import RecastModel

INPUTS = ("post_norm", "pre_norm")
REFERENCE = {"input": "pre_norm", "scale": 2.0}  # the reference release's placement and alpha // r
PRE_NORM_BLOCKS = ("Block",)  # timm ViT blocks that compute x + mlp(norm2(x)); others (ResPostBlock) differ


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
    """``mlp(norm(x)) + scale * adapter(x)``: what an AdaptFormer block's MLP is once exported.

    ``norm`` is the block's ``norm2`` for ``input="pre_norm"``, an ``Identity`` otherwise.
    """

    def __init__(self, mlp: nn.Module, adapter: nn.Module, scale: float, norm: nn.Module | None = None) -> None:
        super().__init__()
        self.mlp, self.adapter, self.scale = mlp, adapter, scale
        self.norm = norm if norm is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:  # (..., d) -> (..., d)
        return self.mlp(self.norm(x)) + self.scale * self.adapter(x)


class AdaptFormerMLP(AdapterModule):
    """A ViT block's MLP (with plain or generated layers) plus one bottleneck adapter per task.

    With ``norm`` (the block's ``norm2``, for ``input="pre_norm"``) it takes the un-normalised
    residual stream: the MLP sees ``norm(x)``, the adapter sees ``x``.
    """

    def __init__(self, inner: nn.Module, rank: int = 2, scale: float = 2.0, norm: nn.Module | None = None) -> None:
        super().__init__(inner)
        self.dim, self.rank, self.scale = inner.fc1.in_features, rank, scale
        self.norm = norm

    def make_task_state(self, spec: TaskSpec) -> nn.Module:
        return Bottleneck(self.dim, self.rank, **self.factory())

    def forward_task(self, x: Tensor, task: str) -> Tensor:  # (..., d) -> (..., d): only the adapter
        return self.scale * self.per_task[task](x)

    def forward(self, x: Tensor) -> Tensor:
        """The wrapped MLP on the whole batch, plus each sample's task adapter."""
        return self.inner(x if self.norm is None else self.norm(x)) + super().forward(x)

    def to_plain(self, task: str) -> nn.Module:
        adapter = Bottleneck(self.dim, self.rank, **self.factory())
        adapter.load_state_dict(self.per_task[task].state_dict())
        norm = copy.deepcopy(self.norm) if self.norm is not None else None
        return ParallelAdapter(self.plain_inner(task), adapter, self.scale, norm)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale}, input={'pre_norm' if self.norm is not None else 'post_norm'}"


@register_adapter("adaptformer", fits=("vit",), recast_target="att", unrecorded={"input": "post_norm", "scale": 0.1})
def attach(model: RecastModel, rank: int = 2, scale: float = 2.0, input: str = "pre_norm") -> None:
    """Put an AdaptFormer adapter beside the MLP of every ViT block (``blocks.<i>.mlp``).

    ``input`` says what the adapter reads (see the module docstring); ``scale`` multiplies its output.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"AdaptFormer rank must be a positive integer, got {rank!r}")
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
        raise ConfigError(f"AdaptFormer scale must be a finite number, got {scale!r} (the reference uses 2)")
    if input not in INPUTS:
        raise ConfigError(f"AdaptFormer input must be one of {', '.join(INPUTS)}, got {input!r}")
    names = [
        name for name, module in model.net.named_modules()
        if outside_task_state(name) and name.startswith("blocks.") and name.endswith(".mlp") and hasattr(module, "fc1")
    ]
    if input == "post_norm":
        install(model, names, lambda inner: AdaptFormerMLP(inner, rank, float(scale)))
        return
    blocks = [model.net.get_submodule(name.rpartition(".")[0]) for name in names]
    for block in blocks:
        if type(block).__name__ not in PRE_NORM_BLOCKS or not isinstance(getattr(block, "norm2", None), nn.Module):
            raise ConfigError(f"AdaptFormer input='pre_norm' needs timm ViT blocks computing x + mlp(norm2(x)); "
                              f"{type(block).__name__} is not one: use input='post_norm'")
    for name, block in zip(names, blocks, strict=True):
        norm = block.norm2
        install(model, [name], lambda inner, norm=norm: AdaptFormerMLP(inner, rank, float(scale), norm))
        block.norm2 = nn.Identity()  # now applied inside the wrapper, to the MLP's input only
