"""Piggyback: a learned binary mask per weight, trained through real values with a straight-through step.

Per wrapped layer and task: a real-valued mask of the weight's shape, initialised to ``init``
(above ``threshold``, so the first mask keeps every weight). The forward pass uses
``weight * (mask > threshold)``; the gradient passes straight through the threshold to the real
values. At rest only the binary mask is kept: 1 bit per weight, packed 8 to a byte (``uint8``).
Loading sets the real values back to ``init`` (kept) or ``0`` (dropped), which binarises the same.

Learning rates. The reference release trains masks at 1e-4, coefficients at 5e-4 and the head at
3e-2 (separate Adam optimisers); :data:`REFERENCE_LRS` holds those as method options and they are
the defaults of ``piggyback`` and ``recast+piggyback`` (rates given with ``--opt`` win; masks never
get weight decay). With the common rate (2e-3) instead, masks starting 5e-3 above the threshold can
flip within a few steps: in a one-seed comparison on the quick offline suite (ResNet32,
``results/presets/``) recast+piggyback averaged 0.590 that way against 0.713 at the reference's rates. The reference also draws its masks and threshold at random near
zero; here the threshold is fixed and every mask starts full, so a new task starts exactly at the
shared model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recast.adapters.base import CONV_TYPES, LINEAR_TYPES, AdapterModule, install, outside_task_state, register_adapter
from recast.errors import ConfigError
from recast.layers import GeneratedWeight
from recast.surgery import has_plain_forward
from recast.tasks import TaskSpec

if TYPE_CHECKING:
    from recast.model import RecastModel

SCOPES = ("auto", "generated", "all")
REFERENCE_LRS = {"mask_lr": 1e-4, "coef_lr": 5e-4, "head_lr": 3e-2}  # the reference release's Adam rates


def pack_bits(bits: Tensor) -> Tensor:
    """Booleans of any shape -> ``uint8`` of ``ceil(numel / 8)`` bytes (first element = high bit)."""
    flat = bits.reshape(-1).to(torch.uint8)
    flat = F.pad(flat, (0, (-flat.numel()) % 8)).reshape(-1, 8)  # (bytes, 8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=bits.device)
    return (flat * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Inverse of :func:`pack_bits`: ``uint8`` bytes -> booleans of ``shape``."""
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    bits = (packed.reshape(-1, 1) >> shifts) & 1  # (bytes, 8)
    numel = int(torch.Size(shape).numel())
    return bits.reshape(-1)[:numel].reshape(shape).bool()


class PiggybackLayer(AdapterModule):
    """A Linear/Conv2d (plain or generated) whose weight is multiplied by a per-task binary mask."""

    def __init__(self, inner: nn.Module, threshold: float = 5e-3, init: float = 1e-2) -> None:
        super().__init__(inner)
        if not init > threshold:
            raise ConfigError(f"Piggyback init ({init}) must exceed threshold ({threshold}) so masks start full")
        self.threshold, self.init = threshold, init
        self.weight_shape = tuple(self.inner_weight_shape())

    def inner_weight_shape(self) -> torch.Size:
        """Shape of the wrapped weight, without composing it."""
        if isinstance(self.inner, GeneratedWeight):
            return self.inner.bank.templates.shape[1:]
        return self.inner.weight.shape

    def make_task_state(self, spec: TaskSpec) -> nn.Module:
        mask = torch.full(self.weight_shape, self.init, **self.factory())
        return nn.ParameterDict({"mask": nn.Parameter(mask)})

    def binary_mask(self, task: str) -> Tensor:
        """The 0/1 mask of ``task``; its gradient goes straight to the real values."""
        real = self.per_task[task]["mask"]
        hard = (real > self.threshold).to(real.dtype)
        return hard + (real - real.detach())  # forward: exactly ``hard``

    def masked_weight(self, task: str) -> Tensor:
        """The weight ``task`` uses: the wrapped (generated or plain) weight times its mask."""
        return self.inner_weight(task) * self.binary_mask(task)

    def forward_task(self, x: Tensor, task: str) -> Tensor:
        weight, inner = self.masked_weight(task), self.inner
        if not isinstance(inner, GeneratedWeight) and not has_plain_forward(inner):
            # a layer with its own forward (timm's Conv2dSame pads at run time): run it on the masked weight
            return torch.func.functional_call(inner, {"weight": weight}, (x,))
        if isinstance(inner, CONV_TYPES):  # (B, in, H, W) -> (B, out, H', W')
            return F.conv2d(x, weight, inner.bias, inner.stride, inner.padding, inner.dilation, inner.groups)
        return F.linear(x, weight, inner.bias)  # (..., in) -> (..., out)

    def to_plain(self, task: str) -> nn.Module:
        plain = self.plain_inner(task)
        with torch.no_grad():
            plain.weight.mul_((self.per_task[task]["mask"] > self.threshold).to(plain.weight.dtype))
        return plain

    def task_tensors(self, name: str) -> dict[str, Tensor]:
        """The mask at rest: 1 bit per weight, packed into ``uint8``."""
        return {"mask_bits": pack_bits(self.per_task[name]["mask"].detach() > self.threshold)}

    def load_task_tensors(self, name: str, tensors: dict[str, Tensor]) -> None:
        bits = unpack_bits(tensors["mask_bits"].to(self.per_task[name]["mask"].device), self.weight_shape)
        with torch.no_grad():
            real = self.per_task[name]["mask"]
            real.copy_(torch.where(bits, torch.full_like(real, self.init), torch.zeros_like(real)))

    def task_numel(self, name: str) -> int:
        """Mask entries (binary: 1 bit each at rest)."""
        return self.per_task[name]["mask"].numel()

    def extra_repr(self) -> str:
        return f"weight={tuple(self.weight_shape)}, threshold={self.threshold}"


def targets(model: RecastModel, scope: str) -> list[str]:
    """The layers to mask: generated ones (``scope="generated"``, or ``"auto"`` with banks), or all.

    ``"all"`` is every Linear/Conv2d of the backbone; the task heads are never masked.
    """
    if scope not in SCOPES:
        raise ConfigError(f"Piggyback scope must be one of {SCOPES}, got {scope!r}")
    generated_only = scope == "generated" or (scope == "auto" and len(model.banks) > 0)
    types = (GeneratedWeight,) if generated_only else LINEAR_TYPES + CONV_TYPES
    head = model.head_name
    return [
        name for name, module in model.net.named_modules()
        if isinstance(module, types) and outside_task_state(name) and name != head and not name.startswith(head + ".")
    ]


@register_adapter("piggyback", fits=("vit", "resnet", "effnet", "other"), recast_target="conv", lrs=REFERENCE_LRS)
def attach(model: RecastModel, threshold: float = 5e-3, init: float = 1e-2, scope: str = "auto") -> None:
    """Mask every targeted weight with Piggyback (see :func:`targets` for ``scope``)."""
    names = targets(model, scope)
    if not names:
        raise ConfigError("Piggyback found no Linear or Conv2d weight to mask")
    install(model, names, lambda inner: PiggybackLayer(inner, float(threshold), float(init)))
