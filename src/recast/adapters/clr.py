"""CLR (channel-wise lightweight reprogramming): a depthwise 3x3 conv after every conv of a ConvNet.

Per conv and task: a ``(C, 1, 3, 3)`` depthwise kernel initialised to the identity (a 1 at the
centre), so a new task starts exactly at the wrapped conv's output. ResNet-18 has 4,800 conv output
channels, so 43,200 numbers per task (under 0.4% of its 11.2M weights).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recast.adapters.base import CONV_TYPES, AdapterModule, architecture, install, matching, register_adapter
from recast.tasks import TaskSpec

if TYPE_CHECKING:
    from recast.model import RecastModel


class Reprogrammed(nn.Sequential):
    """``depthwise(conv(x))``: what a CLR conv is once exported."""


class ClrConv(AdapterModule):
    """A conv (plain or generated) followed by one identity-initialised depthwise conv per task."""

    def __init__(self, inner: nn.Module, kernel_size: int = 3) -> None:
        super().__init__(inner)
        self.channels, self.kernel_size = inner.out_channels, kernel_size

    def make_task_state(self, spec: TaskSpec) -> nn.Module:
        k = self.kernel_size
        kernel = torch.zeros(self.channels, 1, k, k, **self.factory())
        kernel[:, 0, k // 2, k // 2] = 1.0  # identity
        return nn.ParameterDict({"kernel": nn.Parameter(kernel)})

    def forward_task(self, x: Tensor, task: str) -> Tensor:  # (B, C, H, W) -> (B, C, H, W)
        return F.conv2d(x, self.per_task[task]["kernel"], padding=self.kernel_size // 2, groups=self.channels)

    def forward(self, x: Tensor) -> Tensor:
        """The wrapped conv on the whole batch, then each sample's task reprogramming."""
        return super().forward(self.inner(x))

    def to_plain(self, task: str) -> nn.Module:
        k = self.kernel_size
        depthwise = nn.Conv2d(self.channels, self.channels, k, padding=k // 2, groups=self.channels, bias=False)
        depthwise = depthwise.to(**self.factory())
        with torch.no_grad():
            depthwise.weight.copy_(self.per_task[task]["kernel"])
        return Reprogrammed(self.plain_inner(task), depthwise)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}"


DEFAULT_PATTERNS = {  # every conv: stem, blocks (and downsample), head conv
    "resnet": ("conv1", "layer*"),
    "effnet": ("conv_stem", "blocks.*", "conv_head"),
}


@register_adapter("clr", fits=tuple(DEFAULT_PATTERNS), recast_target="conv")
def attach(model: RecastModel, kernel_size: int = 3, patterns: tuple[str, ...] | None = None) -> None:
    """Follow every conv of a ResNet or EfficientNet (plain or generated) by CLR.

    ``patterns`` (module-name patterns) default to every conv of the architecture.
    """
    names = matching(model.net, patterns or DEFAULT_PATTERNS[architecture(model.net)], CONV_TYPES)
    names = [n for n in names if not any(n.startswith(other + ".") for other in names)]  # outermost only
    install(model, names, lambda inner: ClrConv(inner, kernel_size))
