"""Linear and Conv2d layers whose weight is generated from a shared template bank.

Each layer points to a ``TemplateBank`` it does not own and reads, per task, a ``(K, n)`` slice of
coefficients from a :class:`CoefficientTable` it does not own either (one flat tensor per task for
every generated layer of the model); its weight is ``compose(bank.templates, coefficients)``.
Biases stay the pretrained ones, frozen. When no gradient can flow (evaluation), the generated
weight is cached until the task, the coefficients or the templates change, for the active task and
at most ``cache_limit`` tasks in all (a composed weight is megabytes, a task's coefficients bytes).

A batch whose samples belong to different tasks (``RecastModel.forward_tasks``) takes one of two
paths in each generated layer, chosen per layer and per batch by :func:`prefer_templates`:

- *group*: one ordinary forward per task group (gather, task weight, scatter back);
- *template space*: since ``W_t x = sum_i beta[t, i] (T_i x)`` with ``beta`` the K-averaged
  coefficients, every sample is scaled into ``n`` copies ``beta[t, i] x`` and one layer with the
  ``n`` templates side by side (``[T_1 ... T_n]``, ``n`` times the input width) computes them all:
  a single dense call for the whole batch whatever the number of distinct tasks.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recast.bank import TemplateBank, compose, generated_conv2d, generated_linear, needs_grad
from recast.errors import TaskError
from recast.tasks import Routing, TaskModule, TaskParameters, TaskSpec

# The fixed price of one extra task group in the grouped path (gather, a small layer call, scatter:
# a few kernel launches and copies), as the multiply-adds the device could have done meanwhile.
# CPU: measured 130-250 us per group for the recast-vit32 qkv (17 rows per group) on a 2-core x86
# CPU doing ~44 GMAC/s on one thread. GPU: an estimate, ~30 us of launches and syncs per group at
# ~50 TMAC/s (not measured here).
GROUP_OVERHEAD_MACS = {"cpu": 5e6, "cuda": 1.5e9}


def prefer_templates(
    dense_macs: int, input_numel: int, templates: int, distinct: int, uncached: int, weight_numel: int, device: str
) -> bool:
    """The cost model: is the template-space path cheaper than grouping for this layer and batch?

    Args:
        dense_macs: multiply-adds of the layer with one weight over the whole batch.
        input_numel: elements of the layer's input (the template path scales each n times).
        templates: n, the bank's templates.
        distinct: d, the distinct tasks in the batch.
        uncached: how many of those tasks have no generated weight cached yet.
        weight_numel: elements of one weight.
        device: ``"cpu"``, ``"cuda"``, ... (the overhead per group differs).

    Template space costs ``n * dense`` plus spreading the input (``n * input_numel``); grouping
    costs ``dense`` plus, per task group, a fixed overhead and, for tasks not cached, generating
    their weight (``n * weight_numel``). So the template path wins when many distinct tasks share
    a batch of few rows (the per-group overhead adds up, as on a GPU), grouping wins when the batch
    has few tasks or many rows per task (ViT tokens on a CPU: the extra template products cost
    more than the groups).
    """
    if distinct < 2:
        return False
    overhead = GROUP_OVERHEAD_MACS.get(device, GROUP_OVERHEAD_MACS["cuda"])
    template_cost = templates * dense_macs + templates * input_numel
    group_cost = dense_macs + distinct * overhead + uncached * templates * weight_numel
    return template_cost < group_cost


class CoefficientTable(nn.Module):
    """Every task's coefficients for all generated layers of a model: one flat ``Parameter`` per task.

    A RECAST task is a few dozen numbers; a ``Parameter`` (let alone a module) per layer and task
    would cost far more Python memory than the numbers. Each generated layer reserves its slice
    once, when the model is assembled, and reads it as a view; gradients of the views add up in
    the task's one tensor, which is what the optimiser trains.
    """

    def __init__(self) -> None:
        super().__init__()
        self.per_task = TaskParameters()
        self.size = 0
        self.active: str | None = None

    def reserve(self, numel: int) -> int:
        """Room for ``numel`` more numbers per task; returns where they start."""
        if len(self.per_task):
            raise TaskError("generated layers must be created before any task")
        offset, self.size = self.size, self.size + numel
        return offset

    def ensure(self, name: str, like: Tensor) -> Tensor:
        """Task ``name``'s flat tensor, created (zeros, frozen, like ``like``) if it does not exist yet."""
        if name not in self.per_task:
            self.per_task[name] = nn.Parameter(like.new_zeros(self.size), requires_grad=False)
        return self.per_task[name]

    def discard(self, name: str) -> None:
        """Forget task ``name`` (nothing happens when it is not here)."""
        if name in self.per_task:
            del self.per_task[name]
        if self.active == name:
            self.active = None

    def activate(self, name: str) -> None:
        """Only task ``name``'s tensor requires grad (the previous one is frozen again)."""
        if self.active is not None and self.active != name and self.active in self.per_task:
            self.per_task[self.active].requires_grad_(False)
        self.per_task[name].requires_grad_(True)
        self.active = name

    def view(self, name: str, offset: int, shape: torch.Size) -> Tensor:
        """The slice of task ``name`` at ``offset`` as a (differentiable) view of ``shape``."""
        if name not in self.per_task:
            raise TaskError(f"no coefficients for task {name!r}")
        return self.per_task[name].narrow(0, offset, shape.numel()).view(shape)


class LayerCoefficients(dict):
    """One task's state in one generated layer: ``{"coefficients": (K, n) view into its table row}``."""

    def named_parameters(self) -> Iterator[tuple[str, Tensor]]:
        return iter(self.items())

    def parameters(self) -> Iterator[Tensor]:
        return iter(self.values())


class _LayerTasks(Mapping):
    """A generated layer's ``per_task``: task name -> :class:`LayerCoefficients` (read only)."""

    def __init__(self, layer: GeneratedWeight) -> None:
        self.layer = layer

    def __getitem__(self, name: str) -> LayerCoefficients:
        if name not in self.layer.table.per_task:
            raise KeyError(name)
        return LayerCoefficients(coefficients=self.layer.coefficients(name))

    def __iter__(self) -> Iterator[str]:
        return iter(list(self.layer.table.per_task.keys()))

    def __len__(self) -> int:
        return len(self.layer.table.per_task)


class GeneratedWeight(TaskModule):
    """Shared part of the generated layers: bank and table references, its slice, weight cache."""

    kind = "coefficients"
    cache_limit = 4  # composed weights kept per layer (the active task's always among them)
    # Training keeps each composed weight for backward (fastest). True: backward composes it again
    # and keeps only the coefficients: 1.8 MB less per ViT-S qkv layer, a few % slower per step.
    recompute_in_backward = False

    def __init__(self, bank: TemplateBank, coefficients: Tensor, bias: Tensor | None, table: CoefficientTable) -> None:
        super().__init__(_LayerTasks(self))
        if coefficients.dim() != 2 or coefficients.shape[1] != bank.size:
            raise ValueError(f"coefficients must be (K, {bank.size}), got {tuple(coefficients.shape)}")
        self.__dict__["bank"] = bank  # shared by reference; owned and saved by RecastModel.banks
        self.__dict__["table"] = table  # shared by reference; owned by RecastModel.coefficient_table
        self.register_buffer("mimicry", coefficients.detach().clone())  # (K, n) fitted start values
        self.offset = table.reserve(coefficients.numel())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._cache: dict[str, tuple[Any, Tensor]] = {}

    def coefficients(self, task: str | None = None) -> Tensor:
        """The ``(K, n)`` coefficients of ``task`` (default: the active one), a view into its table row."""
        if task is None:
            if self.active is None:
                raise TaskError("no task is active: call set_task(name) first")
            task = self.active
        return self.table.view(task, self.offset, self.mimicry.shape)

    # ------------------------------------------------------------------ per-task state in the table
    def has_task(self, name: str) -> bool:
        return name in self.table.per_task

    def add_task(self, name: str, spec: TaskSpec) -> None:
        """Fill this layer's slice of task ``name`` with the fitted values (or ``init_from``'s)."""
        source = self.mimicry if spec.init_from is None else self.coefficients(spec.init_from)
        self.table.ensure(name, self.mimicry)
        with torch.no_grad():
            self.coefficients(name).copy_(source)

    def parameters_of(self, name: str) -> list[Tensor]:
        return [self.table.per_task[name]]

    def activate(self, name: str) -> None:
        if not self.has_task(name):
            raise TaskError(f"{type(self).__name__} has no state for task {name!r}")
        self.active = name
        self.table.activate(name)

    def task_tensors(self, name: str) -> dict[str, Tensor]:
        return {"coefficients": self.coefficients(name).detach()}

    def load_task_tensors(self, name: str, tensors: dict[str, Tensor]) -> None:
        if set(tensors) != {"coefficients"} or tensors["coefficients"].shape != self.mimicry.shape:
            raise TaskError(f"coefficients of task {name!r} must be one tensor of shape {tuple(self.mimicry.shape)}")
        with torch.no_grad():
            self.coefficients(name).copy_(tensors["coefficients"])

    def task_numel(self, name: str) -> int:
        return self.mimicry.numel()

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
        cached = self._cache.pop(task, None)  # re-inserted last: the dict is in least-recent-first order
        if cached is None or cached[0] != key:
            self._evict(keep=self.cache_limit - 1)
            with torch.no_grad():
                cached = (key, compose(templates, coefficients, out=self._take_spare(templates)))
        self._cache[task] = cached
        return cached[1]

    def _evict(self, keep: int) -> None:
        """Drop the least recently used weights until ``keep`` remain (never the active task's).

        Without autograd (serving, evaluation) a dropped weight's buffer is reused by the next one
        composed; with autograd on, it may still be saved for a backward pass, so it is left alone.
        """
        for task in [t for t in self._cache if t != self.active][: max(0, len(self._cache) - max(keep, 0))]:
            weight = self._cache.pop(task)[1]
            if not torch.is_grad_enabled():
                self.__dict__["_spare"] = weight

    def _take_spare(self, templates: Tensor) -> Tensor | None:
        """The buffer a deleted task's cached weight left behind, when it fits (else ``None``).

        A task switch from a file deletes the old state and composes the new one: writing into
        the freed weight's memory instead of a fresh allocation spares the page faults that
        dominated the switch (about 0.4 ms of 0.5 ms per ViT-S qkv weight on a CPU).
        """
        spare = self.__dict__.pop("_spare", None)
        if spare is None or spare.shape != templates.shape[1:] or spare.dtype != templates.dtype:
            return None
        return spare if spare.device == templates.device else None

    def delete_task(self, name: str) -> None:
        cached = self._cache.pop(name, None)
        if cached is not None:  # its buffer is reused by the next weight composed (see _take_spare)
            self.__dict__["_spare"] = cached[1]
        self.table.discard(name)
        if self.active == name:
            self.active = None

    def forward(self, x: Tensor) -> Tensor:
        """As ``TaskModule.forward``; a mixed-task batch takes the template path or groups (see module doc)."""
        if self.routing is None:
            return super().forward(x)
        routing = Routing.of(self.routing)
        if routing.batching == "group" or len(routing.names) == 1 or not self.template_path_possible():
            return self.forward_grouped(x, routing)
        if routing.batching == "template" or self._prefers_templates(x, routing):
            return self.forward_templates(x, self.sample_mix(routing))
        return self.forward_grouped(x, routing)

    def _prefers_templates(self, x: Tensor, routing: Routing) -> bool:
        uncached = sum(1 for t in routing.names if t not in self._cache)
        weight_numel = self.bank.templates[0].numel()
        return prefer_templates(
            self.batch_macs(x), x.numel(), self.bank.size, len(routing.names), uncached, weight_numel, x.device.type
        )

    def sample_mix(self, routing: Routing) -> Tensor:
        """``(B, n)``: each sample's task's K-averaged coefficients (differentiable)."""
        mixes = torch.stack([self.coefficients(task).mean(0) for task in routing.names])
        return mixes.index_select(0, routing.index)

    def stacked_templates(self) -> Tensor:
        """The n templates side by side along the input dimension: ``(out, n * in, ...)``.

        Cached while the templates cannot need a gradient (they are frozen in every RECAST method).
        """
        templates = self.bank.templates
        if torch.is_grad_enabled() and templates.requires_grad:
            return _side_by_side(templates)
        key = (templates._version, templates.data_ptr())
        cached = self.__dict__.get("_stacked")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = self.__dict__["_stacked"] = (key, _side_by_side(templates))
        return cached[1]

    def template_path_possible(self) -> bool:
        """Whether this layer can take the template-space path (subclasses may refuse)."""
        return True

    def batch_macs(self, x: Tensor) -> int:
        """Multiply-adds of this layer over batch ``x`` with one weight."""
        raise NotImplementedError

    def forward_templates(self, x: Tensor, mix: Tensor) -> Tensor:
        """The template-space path: sample ``b`` gets ``sum_i mix[b, i] T_i x_b`` (plus the bias)."""
        raise NotImplementedError

    def _filled(self, plain: nn.Linear | nn.Conv2d, task: str) -> nn.Module:
        """``plain`` (a freshly made layer of the same shape) holding ``task``'s weight and the bias."""
        plain = plain.to(device=self.bank.templates.device, dtype=self.bank.templates.dtype)
        with torch.no_grad():
            plain.weight.copy_(self.task_weight(task))
            if self.bias is not None:
                plain.bias.copy_(self.bias)
        return plain

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)  # copies and pickles never carry the caches
        state["_cache"] = {}
        state.pop("_stacked", None)
        state.pop("_spare", None)
        return state


def _side_by_side(templates: Tensor) -> Tensor:
    """``(n, out, in, ...)`` -> ``(out, n * in, ...)``: template ``i`` fills input block ``i``."""
    n, out, width = templates.shape[:3]
    return templates.transpose(0, 1).reshape(out, n * width, *templates.shape[3:]).contiguous()


class GeneratedLinear(GeneratedWeight):
    """``nn.Linear`` with a generated weight ``(out_features, in_features)``."""

    def __init__(self, bank: TemplateBank, coefficients: Tensor, bias: Tensor | None, table: CoefficientTable) -> None:
        super().__init__(bank, coefficients, bias, table)
        self.out_features, self.in_features = bank.weight_shape

    def forward_task(self, x: Tensor, task: str) -> Tensor:  # (..., in) -> (..., out)
        if self.recompute_in_backward:  # opt-in: training keeps no composed weight
            templates, coefficients = self.bank.templates, self.coefficients(task)
            if needs_grad(templates, coefficients):
                return generated_linear(x, templates, coefficients, self.bias)
        return F.linear(x, self.weight_for(task), self.bias)

    def batch_macs(self, x: Tensor) -> int:
        return x.numel() * self.out_features

    def forward_templates(self, x: Tensor, mix: Tensor) -> Tensor:
        n = mix.shape[1]
        scale = mix.view(mix.shape[0], *([1] * (x.dim() - 2)), n, 1)  # (B, 1.., n, 1)
        spread = (x.unsqueeze(-2) * scale).flatten(-2)  # (B, ..., n * in): block i is mix[b, i] * x
        return F.linear(spread, self.stacked_templates(), self.bias)

    def to_plain(self, task: str) -> nn.Linear:
        return self._filled(nn.Linear(self.in_features, self.out_features, bias=self.bias is not None), task)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, templates={self.bank.size}"


class GeneratedConv2d(GeneratedWeight):
    """``nn.Conv2d`` (zero padding) with a generated weight ``(out, in/groups, kh, kw)``."""

    def __init__(
        self, bank: TemplateBank, coefficients: Tensor, bias: Tensor | None, table: CoefficientTable, conv: nn.Conv2d
    ) -> None:
        super().__init__(bank, coefficients, bias, table)
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("only zero padding with explicit sizes is supported for generated convolutions")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation, self.groups = conv.padding, conv.dilation, conv.groups

    def forward_task(self, x: Tensor, task: str) -> Tensor:  # (B, in, H, W) -> (B, out, H', W')
        if self.recompute_in_backward:  # opt-in: training keeps no composed weight
            templates, coefficients = self.bank.templates, self.coefficients(task)
            if needs_grad(templates, coefficients):
                return generated_conv2d(x, templates, coefficients, self.bias, self.stride, self.padding, self.dilation,
                                        self.groups)
        return F.conv2d(x, self.weight_for(task), self.bias, self.stride, self.padding, self.dilation, self.groups)

    def template_path_possible(self) -> bool:
        return self.groups == 1  # grouped convolutions would need the blocks interleaved per group

    def batch_macs(self, x: Tensor) -> int:
        pixels = 1
        for extent, k, s, p, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.padding, self.dilation, strict=True):
            pixels *= (extent + 2 * p - d * (k - 1) - 1) // s + 1
        return x.shape[0] * pixels * self.in_channels * self.kernel_size[0] * self.kernel_size[1] * self.out_channels

    def forward_templates(self, x: Tensor, mix: Tensor) -> Tensor:
        spread = (x.unsqueeze(1) * mix.view(*mix.shape, 1, 1, 1)).flatten(1, 2)  # (B, n * in, H, W)
        return F.conv2d(spread, self.stacked_templates(), self.bias, self.stride, self.padding, self.dilation)

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


def generated_layer(original: nn.Module, bank: TemplateBank, coefficients: Tensor, table: CoefficientTable) -> GeneratedWeight:
    """The generated counterpart of a plain ``nn.Linear`` or ``nn.Conv2d``, keeping its bias; its
    coefficients live in ``table``."""
    if isinstance(original, nn.Linear):
        return GeneratedLinear(bank, coefficients, original.bias, table)
    if isinstance(original, nn.Conv2d):
        return GeneratedConv2d(bank, coefficients, original.bias, table, original)
    raise TypeError(f"cannot generate the weight of a {type(original).__name__}")
