"""The task-generic network: one module whose task comes in as inputs, ready for ``torch.onnx.export``.

``TaskGraph(model)`` is the model's network with every generated layer reading a weight composed,
inside the forward, from the stored templates and the task's packed ``coefficients`` vector, and the
classifier reading the task's ``head.weight`` / ``head.bias`` (names as in the task file). Its forward
is ``(images, coefficients, head weight, head bias) -> logits``: the task is data, so one exported
graph serves every task with the same backbone, whatever its number of classes.

Per bank the composition is one gather, one mean and one matrix product
(``W[l] = mean_k alpha[l, k] @ T``, REFERENCE 1, as :func:`recast.bank.compose`). Linear templates are
stored transposed, so the generated weight multiplies the input directly without a transpose.

Composing can also happen once per task switch instead of in every call: :class:`ComposeGraph`
(coefficients in, generated weights out) runs when a task is loaded and :class:`PrecomposedGraph`
(the same network, fed those weights) runs per batch. Which is faster depends on the model: composing
reads every template per call, while weights that arrive as inputs lose ONNX Runtime's ahead-of-time
weight packing (and, for convolutions, its blocked kernels with BatchNorm and activations folded
in). Exporting with ``compose="at-load"`` turns the weight inputs of :class:`PrecomposedGraph` into
constants supplied per task (:mod:`recast.edge.export`), which keeps all of that; the edge benchmark
measures every mode.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recast.errors import SurgeryError
from recast.layers import GeneratedConv2d, GeneratedLinear, GeneratedWeight
from recast.model import RecastModel
from recast.tasks import TaskBatchNorm, TaskHead


class InputLinear(nn.Module):
    """A Linear layer whose transposed weight ``(in, out)`` is handed over before each forward."""

    def __init__(self, bias: Tensor | None) -> None:
        super().__init__()
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.weight_t: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        out = x.matmul(self.weight_t)
        return out if self.bias is None else out + self.bias


class InputConv2d(nn.Module):
    """A Conv2d whose weight is handed over before each forward; geometry from the generated layer."""

    def __init__(self, layer: GeneratedConv2d) -> None:
        super().__init__()
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())
        self.stride, self.padding, self.dilation, self.groups = layer.stride, layer.padding, layer.dilation, layer.groups
        self.weight: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class InputHead(nn.Module):
    """The classifier ``x @ W.T + b`` with the task's ``W`` ``(classes, features)`` and ``b`` handed over."""

    def __init__(self) -> None:
        super().__init__()
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


@dataclass
class _BankSlots:
    """One bank's layers: where each layer's ``(K, n)`` coefficients sit in the packed vector."""

    buffer: str  # name of the templates buffer, (n, weight numel)
    names: list[str]  # the layers' module names inside the network
    modules: list[nn.Module]
    shapes: list[tuple[int, ...]]
    index: Tensor  # (L*K*n,) positions in the packed vector, layer by layer
    coef_sets: int
    templates: int


class TaskGraph(nn.Module):
    """``model``'s network as ``(images, coefficients, head_weight, head_bias) -> logits``.

    Per-task state other than coefficients and a linear head (adapters, task-owned BatchNorm
    statistics) cannot come in this way: adapters are refused here, and BatchNorm runs on the
    pretrained statistics (:func:`task_fits` says which tasks the graph serves).
    """

    def __init__(self, model: RecastModel) -> None:
        super().__init__()
        if not isinstance(model, RecastModel):
            raise SurgeryError(
                f"a task-generic ONNX graph needs a RECAST model, not a {type(model).__name__}; "
                "export a single task's plain graph instead (--task NAME)"
            )
        memo = {id(bank): bank for bank in model.banks.values()}  # read, never copied
        self.net = copy.deepcopy(model.net, memo)
        self.head_name = model.head_name
        bank_keys = {id(bank): key for key, bank in model.banks.items()}
        layers: dict[str, list[tuple[str, nn.Module, GeneratedWeight, int]]] = {}
        offset = 0
        for name, module in list(model.task_modules()):
            if isinstance(module, GeneratedWeight):
                replacement: nn.Module = InputLinear(module.bias) if isinstance(module, GeneratedLinear) else InputConv2d(module)
                layers.setdefault(bank_keys[id(module.bank)], []).append((name, replacement, module, offset))
                offset += module.mimicry.numel()
            elif isinstance(module, TaskHead):
                replacement = InputHead()
            elif isinstance(module, TaskBatchNorm):
                replacement = copy.deepcopy(module.bn).eval()
            else:
                raise SurgeryError(
                    f"{name}: a {type(module).__name__} keeps per-task state that a task-generic graph cannot "
                    "take as input; export each task's plain graph instead (--task NAME)"
                )
            self.net.set_submodule(name, replacement)
        if not offset:
            raise SurgeryError(
                "this model generates no layer (target 'none'): its tasks differ only in their heads; "
                "export each task's plain graph instead (--task NAME)"
            )
        self.coefficient_count = offset
        self.banks: list[_BankSlots] = [self._bank_slots(i, model, key, entries) for i, (key, entries) in enumerate(layers.items())]
        self.net.requires_grad_(False).eval()

    def _bank_slots(
        self, position: int, model: RecastModel, key: str, entries: list[tuple[str, nn.Module, GeneratedWeight, int]]
    ) -> _BankSlots:
        templates = model.banks[key].templates.detach().to(torch.float32)
        if templates.dim() == 3:  # linear (n, out, in) -> (n, in, out): the weight multiplies directly
            templates = templates.transpose(1, 2)
        buffer = f"templates_{position}"
        self.register_buffer(buffer, templates.reshape(templates.shape[0], -1).contiguous())
        k, n = entries[0][2].mimicry.shape
        index = torch.cat([torch.arange(start, start + k * n) for *_, start in entries])
        shapes = [tuple(templates.shape[1:])] * len(entries)
        return _BankSlots(buffer, [e[0] for e in entries], [e[1] for e in entries], shapes, index, k, n)

    @property
    def weight_names(self) -> list[str]:
        """Names of the generated weights, in the order :meth:`compose` returns them (``weight.<layer>``)."""
        return [f"weight.{name}" for slots in self.banks for name in slots.names]

    def compose(self, coefficients: Tensor) -> list[Tensor]:
        """Every generated weight of the task whose packed coefficients are given (linear ones transposed)."""
        out = []
        for slots in self.banks:
            mix = coefficients[slots.index].reshape(len(slots.modules), slots.coef_sets, slots.templates).mean(dim=1)
            weights = mix.matmul(getattr(self, slots.buffer))  # (L, weight numel)
            out += [weights[j].reshape(shape) for j, shape in enumerate(slots.shapes)]
        return out

    def run_with(self, images: Tensor, weights: list[Tensor], head_weight: Tensor, head_bias: Tensor) -> Tensor:
        """Logits for ``images`` with the generated ``weights`` (as :meth:`compose` gives them) and the head."""
        modules = [module for slots in self.banks for module in slots.modules]
        for module, weight in zip(modules, weights, strict=True):
            if isinstance(module, InputLinear):
                module.weight_t = weight
            else:
                module.weight = weight
        head = self.net.get_submodule(self.head_name)
        head.weight, head.bias = head_weight, head_bias
        return self.net(images)

    def forward(self, images: Tensor, coefficients: Tensor, head_weight: Tensor, head_bias: Tensor) -> Tensor:
        """Logits of the task whose packed coefficients and head are given, for a batch of images."""
        return self.run_with(images, self.compose(coefficients), head_weight, head_bias)


class ComposeGraph(nn.Module):
    """``coefficients -> generated weights``: run once per task switch when composing ahead of time."""

    def __init__(self, graph: TaskGraph) -> None:
        super().__init__()
        self.graph = graph

    def forward(self, coefficients: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.graph.compose(coefficients))


class PrecomposedGraph(nn.Module):
    """``(images, head weight, head bias, *generated weights) -> logits``: the backbone fed composed weights."""

    def __init__(self, graph: TaskGraph) -> None:
        super().__init__()
        self.graph = graph

    def forward(self, images: Tensor, head_weight: Tensor, head_bias: Tensor, *weights: Tensor) -> Tensor:
        return self.graph.run_with(images, list(weights), head_weight, head_bias)


def task_fits(model: RecastModel, name: str) -> str | None:
    """Why task ``name`` cannot run on the task-generic graph, or ``None`` when it can."""
    keys = set(model.task_tensors(name))
    expected = {f"{model.head_name}.weight", f"{model.head_name}.bias"}
    if model.effective_coefficients():
        expected.add("coefficients")
    if keys == expected:
        return None
    if not expected - {"coefficients"} <= keys:
        return "its head is not a linear layer with a bias"
    return "it keeps per-task state besides coefficients and head (" + ", ".join(sorted(keys - expected)) + ")"
