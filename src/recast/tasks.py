"""Per-task state inside a network: the base class, task heads and task BatchNorm.

Every module that keeps something per task (generated layers keep coefficients, heads keep a
classifier, BatchNorm may keep statistics, adapters keep their weights) is a ``TaskModule``. It holds
one small sub-module per task in ``per_task`` and exactly one task is active. ``RecastModel`` adds,
activates, saves and deletes tasks by walking these modules, so a new kind of per-task state only
has to subclass ``TaskModule``.
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

    def __init__(self) -> None:
        super().__init__()
        self.per_task = nn.ModuleDict()
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

    def activate(self, name: str) -> None:
        """Make ``name`` the active task: only its parameters require grad."""
        if name not in self.per_task:
            raise TaskError(f"{type(self).__name__} has no state for task {name!r}")
        self.active = name
        for task, state in self.per_task.items():
            state.requires_grad_(task == name)

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


class TaskHead(TaskModule):
    """The classifier: a separate ``Linear(in_features, num_classes)`` per task."""

    kind = "head"

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.in_features = in_features

    def adopt(self, name: str, head: nn.Module) -> None:
        """Take an existing head (the base model's own) as the state of task ``name``."""
        head.requires_grad_(False)
        self.per_task[name] = head

    def add_task(self, name: str, spec: TaskSpec) -> None:
        """A new head; copied from ``spec.init_from`` only when that head has the same size."""
        source = self.per_task[spec.init_from] if spec.init_from is not None else None
        if source is not None and self.num_classes(spec.init_from) == spec.num_classes:
            super().add_task(name, spec)
        else:
            super().add_task(name, TaskSpec(spec.num_classes, spec.own_bn, None, spec.options))

    def make_task_state(self, spec: TaskSpec) -> nn.Module:
        ref = next(iter(self.per_task.values()), None)
        device = next(ref.parameters()).device if ref is not None and any(True for _ in ref.parameters()) else None
        head = nn.Linear(self.in_features, spec.num_classes, device=device)
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
        return head

    def num_classes(self, name: str) -> int:
        """Output size of task ``name``'s head."""
        head = self.per_task[name]
        return int(head.out_features) if isinstance(head, nn.Linear) else self.in_features

    def forward_task(self, x: Tensor, task: str) -> Tensor:  # (..., in_features) -> (..., num_classes)
        return self.per_task[task](x)

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
        plain = copy.deepcopy(self.per_task[task])
        plain.requires_grad_(True)
        return plain


class TaskBatchNorm(TaskModule):
    """BatchNorm frozen on pretrained statistics, unless the active task keeps its own.

    The affine weights stay the pretrained ones; a task with ``own_bn`` stores running mean and
    variance (and updates them while it trains), which fixes the reference release's hidden drift.
    A wrapped timm ``BatchNormAct2d`` keeps its dropout and activation after the normalisation.
    """

    def __init__(self, bn: nn.BatchNorm1d | nn.BatchNorm2d) -> None:
        super().__init__()
        bn.requires_grad_(False)
        self.bn = bn.eval()

    def make_task_state(self, spec: TaskSpec) -> nn.Module:
        state = nn.Module()
        if spec.own_bn:
            state.register_buffer("running_mean", self.bn.running_mean.detach().clone())
            state.register_buffer("running_var", self.bn.running_var.detach().clone())
        return state

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
