"""Linear and Conv2d layers whose weight is generated from a shared template bank.

Each layer points to a ``TemplateBank`` it does not own and keeps, per task, a ``(K, n)`` tensor of
coefficients; its weight is ``compose(bank.templates, coefficients)``. Biases stay the pretrained
ones, frozen. When no gradient can flow (evaluation), the generated weight is cached until the
task, the coefficients or the templates change.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recast.bank import TemplateBank, compose
from recast.errors import TaskError
from recast.tasks import TaskModule, TaskSpec


class GeneratedWeight(TaskModule):
    """Shared part of the generated layers: bank reference, coefficients per task, weight cache."""

    kind = "coefficients"

    def __init__(self, bank: TemplateBank, coefficients: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        if coefficients.dim() != 2 or coefficients.shape[1] != bank.size:
            raise ValueError(f"coefficients must be (K, {bank.size}), got {tuple(coefficients.shape)}")
        self.__dict__["bank"] = bank  # shared by reference; owned and saved by RecastModel.banks
        self.register_buffer("mimicry", coefficients.detach().clone())  # (K, n) fitted start values
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._cache: dict[str, tuple[Any, Tensor]] = {}

    def make_task_state(self, spec: TaskSpec) -> nn.Module:
        return nn.ParameterDict({"coefficients": nn.Parameter(self.mimicry.detach().clone())})

    def coefficients(self, task: str | None = None) -> Tensor:
        """The ``(K, n)`` coefficients of ``task`` (default: the active one)."""
        state = self.per_task[task] if task is not None else self.state()
        return state["coefficients"]

    def task_weight(self, task: str) -> Tensor:
        """The weight generated for ``task`` (differentiable)."""
        return compose(self.bank.templates, self.coefficients(task))

    @property
    def weight(self) -> Tensor:
        """The active task's generated weight."""
        if self.active is None:
            raise TaskError("no task is active: call set_task(name) first")
        return self.weight_for(self.active)

    def weight_for(self, task: str) -> Tensor:
        """Task ``task``'s weight; cached while nothing can need its gradient (evaluation)."""
        templates, coefficients = self.bank.templates, self.coefficients(task)
        if torch.is_grad_enabled() and (coefficients.requires_grad or templates.requires_grad):
            return compose(templates, coefficients)
        key = (coefficients._version, templates._version, coefficients.data_ptr(), templates.data_ptr())
        cached = self._cache.get(task)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = self._cache[task] = (key, compose(templates, coefficients))
        return cached[1]

    def delete_task(self, name: str) -> None:
        self._cache.pop(name, None)
        super().delete_task(name)

    def _filled(self, plain: nn.Linear | nn.Conv2d, task: str) -> nn.Module:
        """``plain`` (a freshly made layer of the same shape) holding ``task``'s weight and the bias."""
        plain = plain.to(device=self.bank.templates.device, dtype=self.bank.templates.dtype)
        with torch.no_grad():
            plain.weight.copy_(self.task_weight(task))
            if self.bias is not None:
                plain.bias.copy_(self.bias)
        return plain

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)  # copies and pickles never carry the cache
        state["_cache"] = {}
        return state


class GeneratedLinear(GeneratedWeight):
    """``nn.Linear`` with a generated weight ``(out_features, in_features)``."""

    def __init__(self, bank: TemplateBank, coefficients: Tensor, bias: Tensor | None) -> None:
        super().__init__(bank, coefficients, bias)
        self.out_features, self.in_features = bank.weight_shape

    def forward_task(self, x: Tensor, task: str) -> Tensor:  # (..., in) -> (..., out)
        return F.linear(x, self.weight_for(task), self.bias)

    def to_plain(self, task: str) -> nn.Linear:
        return self._filled(nn.Linear(self.in_features, self.out_features, bias=self.bias is not None), task)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, templates={self.bank.size}"


class GeneratedConv2d(GeneratedWeight):
    """``nn.Conv2d`` (zero padding) with a generated weight ``(out, in/groups, kh, kw)``."""

    def __init__(self, bank: TemplateBank, coefficients: Tensor, bias: Tensor | None, conv: nn.Conv2d) -> None:
        super().__init__(bank, coefficients, bias)
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("only zero padding with explicit sizes is supported for generated convolutions")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation, self.groups = conv.padding, conv.dilation, conv.groups

    def forward_task(self, x: Tensor, task: str) -> Tensor:  # (B, in, H, W) -> (B, out, H', W')
        return F.conv2d(x, self.weight_for(task), self.bias, self.stride, self.padding, self.dilation, self.groups)

    def to_plain(self, task: str) -> nn.Conv2d:
        plain = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
            self.dilation, self.groups, bias=self.bias is not None,
        )
        return self._filled(plain, task)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, templates={self.bank.size}"
        )


def generated_layer(original: nn.Module, bank: TemplateBank, coefficients: Tensor) -> GeneratedWeight:
    """The generated counterpart of a plain ``nn.Linear`` or ``nn.Conv2d``, keeping its bias."""
    if isinstance(original, nn.Linear):
        return GeneratedLinear(bank, coefficients, original.bias)
    if isinstance(original, nn.Conv2d):
        return GeneratedConv2d(bank, coefficients, original.bias, original)
    raise TypeError(f"cannot generate the weight of a {type(original).__name__}")
