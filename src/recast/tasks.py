"""Per-task state inside a network: the base class, task heads and task BatchNorm.

Every module that keeps something per task (generated layers keep coefficients, heads keep a
classifier, BatchNorm may keep statistics, adapters keep their weights) is a ``TaskModule``. By
default it holds one small sub-module per task in ``per_task`` and exactly one task is active.
``RecastModel`` adds, activates, saves and deletes tasks by walking these modules, so a new kind of
per-task state only has to subclass ``TaskModule``.

Modules that every task of a served model has (heads, generated layers) keep their state without a
module per task: a module object costs ~2 KB of Python memory, more than a RECAST task's numbers.
The head keeps plain weight and bias tensors per task (:class:`HeadTable`), and BatchNorm keeps
nothing for tasks that use the pretrained statistics.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import skip_init

from recast.errors import TaskError

COUNT_KINDS = ("coefficients", "head", "other")
BATCHING_MODES = ("auto", "template", "group")


class Routing:
    """Which task each sample of a mixed batch belongs to, worked out once for every module.

    Attributes:
        names: the distinct tasks, in order of first appearance.
        index: ``(B,)`` long tensor, position of each sample's task in ``names``.
        groups: per task in ``names``, the ``(b,)`` sample positions that belong to it.
        batching: how generated layers mix tasks: ``"auto"`` (their cost model decides per layer
            and batch), ``"template"`` (always the template-space path) or ``"group"`` (one
            forward per task group); other task modules always group.
    """

    def __init__(self, tasks: list[str], device: torch.device | str | None = None, batching: str = "auto") -> None:
        if batching not in BATCHING_MODES:
            raise TaskError(f"batching must be one of {', '.join(BATCHING_MODES)}, got {batching!r}")
        self.names = list(dict.fromkeys(tasks))
        position = {name: i for i, name in enumerate(self.names)}
        self.index = torch.tensor([position[t] for t in tasks], dtype=torch.long, device=device)
        members: list[list[int]] = [[] for _ in self.names]
        for sample, task in enumerate(tasks):
            members[position[task]].append(sample)
        self.groups = [torch.tensor(m, dtype=torch.long, device=device) for m in members]
        self.batch_size = len(tasks)
        self.batching = batching

    def __iter__(self) -> Iterator[Any]:  # unpacks as the former ``(names, index)`` pair
        return iter((self.names, self.index))

    @classmethod
    def of(cls, value: Routing | tuple[list[str], Tensor]) -> Routing:
        """``value`` as a ``Routing`` (a plain ``(names, index)`` pair is converted)."""
        if isinstance(value, Routing):
            return value
        names, index = value
        return cls([names[int(i)] for i in index.tolist()], index.device)


@contextmanager
def routed(modules: Iterable[TaskModule], tasks: list[str], device: torch.device, batching: str = "auto") -> Iterator[Routing]:
    """Route a batch through ``modules``: sample ``i`` uses task ``tasks[i]`` until the block ends."""
    routing = Routing(tasks, device, batching)
    modules = list(modules)
    for module in modules:
        module.routing = routing
    try:
        yield routing
    finally:
        for module in modules:
            module.routing = None


@dataclass
class TaskSpec:
    """What a new task needs from each ``TaskModule``.

    Attributes:
        num_classes: size of the task's head.
        own_bn: keep this task's own BatchNorm statistics (saved with it, counted as ``other``);
            otherwise BatchNorm stays frozen on the pretrained statistics.
        init_from: copy the initial state of another task instead of the mimicry/initial values.
        options: free-form options for adapter modules (rank, alpha, ...), recorded with the task.
    """

    num_classes: int
    own_bn: bool = False
    init_from: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


class TaskModule(nn.Module):
    """A module with one state per task in ``per_task``; the ``active`` task's state is used.

    Subclasses set ``kind`` (which count a task's tensors go to) and implement
    :meth:`make_task_state`, :meth:`forward_task` and :meth:`to_plain`. ``routing`` (set by
    ``RecastModel.forward_tasks``) sends each sample of a batch through its own task's state.
    """

    kind: str = "other"

    def __init__(self, per_task: Any = None) -> None:
        super().__init__()
        self.per_task = nn.ModuleDict() if per_task is None else per_task  # task name -> its state
        self.active: str | None = None
        self.routing: Routing | None = None  # set while a mixed-task batch runs (see ``routed``)

    def forward_task(self, x: Tensor, task: str) -> Tensor:
        """This module's output for a batch that belongs entirely to ``task``."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """The active task's output, or each sample's own task's output while routing."""
        if self.routing is None:
            if self.active is None:
                raise TaskError("no task is active: call set_task(name) first")
            return self.forward_task(x, self.active)
        return self.forward_grouped(x, Routing.of(self.routing))

    def forward_grouped(self, x: Tensor, routing: Routing) -> Tensor:
        """One ``forward_task`` per task group of the batch, scattered back into batch order."""
        if len(routing.names) == 1:
            return self.forward_task(x, routing.names[0])
        parts = [self.forward_task(x.index_select(0, rows), task) for task, rows in zip(routing.names, routing.groups, strict=True)]
        out = parts[0].new_empty((x.shape[0], *parts[0].shape[1:]))
        for part, rows in zip(parts, routing.groups, strict=True):
            out.index_copy_(0, rows, part)
        return out

    def make_task_state(self, spec: TaskSpec) -> nn.Module:
        """A fresh state for a new task (parameters and buffers), on this module's device."""
        raise NotImplementedError

    def to_plain(self, task: str) -> nn.Module:
        """An ordinary module that computes what this one computes with ``task`` active."""
        raise NotImplementedError

    def add_task(self, name: str, spec: TaskSpec) -> None:
        """Create the state of task ``name``; it starts frozen until activated."""
        if spec.init_from is not None:
            state = copy.deepcopy(self.per_task[spec.init_from])
        else:
            state = self.make_task_state(spec)
        state.requires_grad_(False)
        self.per_task[name] = state

    def delete_task(self, name: str) -> None:
        """Forget task ``name``'s state."""
        del self.per_task[name]
        if self.active == name:
            self.active = None

    def has_task(self, name: str) -> bool:
        """Whether this module holds a state for task ``name``."""
        return name in self.per_task

    def parameters_of(self, name: str) -> list[Tensor]:
        """Task ``name``'s trainable tensors here (for the optimiser's groups)."""
        return list(self.per_task[name].parameters())

    def activate(self, name: str) -> None:
        """Make ``name`` the active task: only its parameters require grad.

        Only the previously active state and the new one change (a new state starts frozen), so
        activating costs the same with 10 tasks or 10,000.
        """
        if not self.has_task(name):
            raise TaskError(f"{type(self).__name__} has no state for task {name!r}")
        previous, self.active = self.active, name
        if previous is not None and previous != name and self.has_task(previous):
            self._set_trainable(previous, False)
        self._set_trainable(name, True)

    def _set_trainable(self, name: str, flag: bool) -> None:
        for tensor in self.parameters_of(name):
            tensor.requires_grad_(flag)

    def state(self) -> nn.Module:
        """The active task's state."""
        if self.active is None:
            raise TaskError("no task is active: call set_task(name) first")
        return self.per_task[self.active]

    def task_tensors(self, name: str) -> dict[str, Tensor]:
        """The tensors that make up task ``name``'s state (what its task file stores)."""
        return {key: value.detach() for key, value in self.per_task[name].state_dict().items()}

    def load_task_tensors(self, name: str, tensors: dict[str, Tensor]) -> None:
        """Set task ``name``'s state from saved tensors (shapes must match exactly)."""
        self.per_task[name].load_state_dict(tensors, strict=True)

    def task_numel(self, name: str) -> int:
        """How many floating-point numbers task ``name`` stores here."""
        return sum(t.numel() for t in self.task_tensors(name).values() if t.is_floating_point())


class TaskParameters(nn.Module):
    """Parameters keyed by task name, registered so they move, save and train like any parameter.

    Kept in the module's own parameter dict under the bare task name: every valid task name works
    (a ``ParameterDict`` refuses names of its own methods, such as ``copy`` or ``keys``), and
    ``named_parameters`` reads ``<prefix>.<task>``.
    """

    def __setitem__(self, name: str, value: nn.Parameter) -> None:
        if not isinstance(value, nn.Parameter):
            raise TypeError(f"task {name!r}: expected an nn.Parameter, got {type(value).__name__}")
        self._parameters[name] = value

    def __getitem__(self, name: str) -> nn.Parameter:
        return self._parameters[name]

    def __delitem__(self, name: str) -> None:
        del self._parameters[name]

    def __contains__(self, name: object) -> bool:
        return name in self._parameters

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._parameters))

    def __len__(self) -> int:
        return len(self._parameters)

    def keys(self) -> list[str]:
        return list(self._parameters)

    def get(self, name: str) -> nn.Parameter | None:
        return self._parameters.get(name)

    def values(self) -> list[nn.Parameter]:
        return list(self._parameters.values())


@dataclass
class LinearHead:
    """One task's classifier as its two tensors (a view into a :class:`HeadTable`, no module of its own)."""

    weight: nn.Parameter
    bias: nn.Parameter | None

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        yield "weight", self.weight
        if self.bias is not None:
            yield "bias", self.bias

    def parameters(self) -> Iterator[nn.Parameter]:
        for _, tensor in self.named_parameters():
            yield tensor


class HeadTable(nn.Module):
    """Every task's head: weights and biases keyed by task, plus any head that is not a ``Linear``.

    Reads like a mapping from task name to :class:`LinearHead` (or the module itself for a head
    adopted from a base model that is not a ``Linear``, e.g. ``Identity``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.weight = TaskParameters()
        self.bias = TaskParameters()
        self.other = nn.ModuleDict()  # heads adopted from a base model that are not a Linear

    def put(self, name: str, weight: Tensor, bias: Tensor | None) -> None:
        """Store a linear head for task ``name`` (frozen until its task is activated)."""
        self.weight[name] = nn.Parameter(weight.detach(), requires_grad=False)
        if bias is not None:
            self.bias[name] = nn.Parameter(bias.detach(), requires_grad=False)

    def __contains__(self, name: object) -> bool:
        return name in self.weight or name in self.other

    def __iter__(self) -> Iterator[str]:
        yield from self.weight.keys()
        yield from self.other.keys()

    def __len__(self) -> int:
        return len(self.weight) + len(self.other)

    def __getitem__(self, name: str) -> LinearHead | nn.Module:
        if name in self.other:
            return self.other[name]
        if name not in self.weight:
            raise KeyError(name)
        return LinearHead(self.weight[name], self.bias.get(name))

    def __delitem__(self, name: str) -> None:
        for table in (self.weight, self.bias, self.other):
            if name in table:
                del table[name]

    def keys(self) -> list[str]:
        return list(self)


class TaskHead(TaskModule):
    """The classifier: a ``Linear(in_features, num_classes)`` per task, kept as plain tensors."""

    kind = "head"

    def __init__(self, in_features: int) -> None:
        super().__init__(HeadTable())
        self.in_features = in_features

    def adopt(self, name: str, head: nn.Module) -> None:
        """Take an existing head (the base model's own) as the state of task ``name``."""
        if isinstance(head, nn.Linear):
            self.per_task.put(name, head.weight, head.bias)
        else:
            head.requires_grad_(False)
            self.per_task.other[name] = head

    def add_task(self, name: str, spec: TaskSpec) -> None:
        """A new head; copied from ``spec.init_from`` only when that head has the same size."""
        source = spec.init_from
        if source is not None and self.num_classes(source) == spec.num_classes:
            if source in self.per_task.other:
                self.per_task.other[name] = copy.deepcopy(self.per_task.other[source]).requires_grad_(False)
                return
            head = self.per_task[source]
            self.per_task.put(name, head.weight.detach().clone(), None if head.bias is None else head.bias.detach().clone())
            return
        # A throw-away Linear gives the same random stream as before (its own init, then ours).
        head = nn.Linear(self.in_features, spec.num_classes, device=self._device())
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
        self.per_task.put(name, head.weight, head.bias)

    def _device(self) -> torch.device | None:
        tensor = next(iter(self.per_task.weight.values()), None)
        if tensor is None:
            tensor = next((p for m in self.per_task.other.values() for p in m.parameters()), None)
        return None if tensor is None else tensor.device

    def num_classes(self, name: str) -> int:
        """Output size of task ``name``'s head."""
        head = self.per_task[name]
        if isinstance(head, LinearHead):
            return head.out_features
        return int(head.out_features) if isinstance(head, nn.Linear) else self.in_features

    def parameters_of(self, name: str) -> list[Tensor]:
        return list(self.per_task[name].parameters())

    def task_tensors(self, name: str) -> dict[str, Tensor]:
        head = self.per_task[name]
        if not isinstance(head, LinearHead):
            return super().task_tensors(name)
        tensors = {"weight": head.weight.detach()}
        if head.bias is not None:
            tensors["bias"] = head.bias.detach()
        return tensors

    def load_task_tensors(self, name: str, tensors: dict[str, Tensor]) -> None:
        head = self.per_task[name]
        if not isinstance(head, LinearHead):
            super().load_task_tensors(name, tensors)
            return
        own = self.task_tensors(name)
        if set(tensors) != set(own) or any(tensors[k].shape != v.shape for k, v in own.items()):
            raise TaskError(f"head of task {name!r} needs {sorted(own)} with shapes "
                            f"{[tuple(v.shape) for v in own.values()]}")
        with torch.no_grad():
            for key, value in own.items():
                value.copy_(tensors[key])

    def forward_task(self, x: Tensor, task: str) -> Tensor:  # (..., in_features) -> (..., num_classes)
        head = self.per_task[task]
        if isinstance(head, LinearHead):
            return F.linear(x, head.weight, head.bias)
        return head(x)

    def forward(self, x: Tensor) -> Tensor:
        """Logits; while routing, heads of different sizes are padded with -inf to the largest."""
        if self.routing is None:
            return super().forward(x)
        routing = Routing.of(self.routing)
        widths = [self.num_classes(t) for t in routing.names]
        if len(routing.names) == 1:
            return self.forward_task(x, routing.names[0])
        out = x.new_full((x.shape[0], max(widths)), float("-inf"))
        for task, rows, width in zip(routing.names, routing.groups, widths, strict=True):
            logits = self.forward_task(x.index_select(0, rows), task)
            out[:, :width].index_copy_(0, rows, logits)
        return out

    def to_plain(self, task: str) -> nn.Module:
        head = self.per_task[task]
        if not isinstance(head, LinearHead):
            return copy.deepcopy(head).requires_grad_(True)
        plain = skip_init(nn.Linear, self.in_features, head.out_features, bias=head.bias is not None,
                          device=head.weight.device, dtype=head.weight.dtype)  # no init: no random numbers drawn
        with torch.no_grad():
            plain.weight.copy_(head.weight)
            if head.bias is not None:
                plain.bias.copy_(head.bias)
        return plain


class TaskBatchNorm(TaskModule):
    """BatchNorm frozen on pretrained statistics, unless the active task keeps its own.

    The affine weights stay the pretrained ones; a task with ``own_bn`` stores running mean and
    variance (and updates them while it trains), which fixes the reference release's hidden drift.
    Every other task's entry is one shared empty module (a module each would cost kilobytes per
    task and layer for nothing). A wrapped timm ``BatchNormAct2d`` keeps its dropout and activation
    after the normalisation.
    """

    def __init__(self, bn: nn.BatchNorm1d | nn.BatchNorm2d) -> None:
        super().__init__()
        bn.requires_grad_(False)
        self.bn = bn.eval()
        self.__dict__["no_state"] = nn.Module()  # the entry of every task on the pretrained statistics

    def make_task_state(self, spec: TaskSpec) -> nn.Module:
        if not spec.own_bn:
            return self.no_state
        state = nn.Module()
        state.register_buffer("running_mean", self.bn.running_mean.detach().clone())
        state.register_buffer("running_var", self.bn.running_var.detach().clone())
        return state

    def add_task(self, name: str, spec: TaskSpec) -> None:
        if spec.init_from is not None and self.per_task[spec.init_from] is self.no_state:
            self.per_task[name] = self.no_state  # nothing to copy
            return
        super().add_task(name, spec)

    def _stats(self, task: str) -> tuple[Tensor, Tensor, bool]:
        state = self.per_task[task]
        if hasattr(state, "running_mean"):
            return state.running_mean, state.running_var, True
        return self.bn.running_mean, self.bn.running_var, False

    def forward(self, x: Tensor) -> Tensor:
        """While routing, tasks on the shared pretrained statistics run as one batch."""
        if self.routing is not None:
            routing = Routing.of(self.routing)
            if not any(hasattr(self.per_task[t], "running_mean") for t in routing.names):
                return self.forward_task(x, routing.names[0])
        return super().forward(x)

    def forward_task(self, x: Tensor, task: str) -> Tensor:
        mean, var, own = self._stats(task)
        momentum = 0.1 if self.bn.momentum is None else self.bn.momentum
        out = F.batch_norm(
            x, mean, var, self.bn.weight, self.bn.bias, self.training and own, momentum, self.bn.eps
        )
        for after in (getattr(self.bn, "drop", None), getattr(self.bn, "act", None)):  # BatchNormAct2d only
            if after is not None:
                out = after(out)
        return out

    def to_plain(self, task: str) -> nn.Module:
        plain = copy.deepcopy(self.bn)
        mean, var, _ = self._stats(task)
        with torch.no_grad():
            plain.running_mean.copy_(mean)
            plain.running_var.copy_(var)
        plain.requires_grad_(True)
        return plain
