"""Template banks and the one formula that turns templates and coefficients into a weight.

Training a task runs its generated layers through :func:`generated_linear` / :func:`generated_conv2d`:
the same result as composing the weight and calling the plain layer, but autograd keeps the small
coefficients instead of the composed weight (megabytes per layer) and composes it again in
backward (one memory-bound pass over the templates, a fraction of a percent of the step).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable


def compose(templates: Tensor, coefficients: Tensor, out: Tensor | None = None) -> Tensor:
    """Generate a weight from a bank: ``W = (1/K) sum_k sum_i alpha[k, i] T[i]`` (REFERENCE 1).

    Args:
        templates: ``(n, *shape)``, the bank's templates.
        coefficients: ``(K, n)`` coefficient sets of one module, or ``(B, K, n)`` for a batch of
            modules / tasks sharing the bank.

        out: optional contiguous tensor of the result's shape to write into (no gradient):
            reusing a buffer spares the page faults of a fresh multi-megabyte allocation.

    Returns:
        ``(*shape)`` or ``(B, *shape)``. Averaging over K first is the same sum, done once.
    """
    mix = coefficients.mean(dim=-2)  # (n,) or (B, n)
    shape = templates.shape[1:]
    # One matrix-vector product over the flattened templates: a memory-bound pass that reads each
    # template once. (tensordot took ~3.5x longer here: it reshuffles its operands first.)
    flat_templates = templates.reshape(templates.shape[0], -1)
    if out is not None:
        if mix.dim() == 1:
            torch.mv(flat_templates.t(), mix, out=out.view(-1))
        else:
            torch.mm(mix, flat_templates, out=out.view(mix.shape[0], -1))
        return out
    return (mix @ flat_templates).reshape(*mix.shape[:-1], *shape)


def needs_grad(templates: Tensor, coefficients: Tensor) -> bool:
    """Whether a layer composed from these tensors is being trained (a gradient can reach them)."""
    return torch.is_grad_enabled() and (coefficients.requires_grad or templates.requires_grad)


def _bank_grads(
    ctx: Any, templates: Tensor, coefficients: Tensor, weight_grad: Tensor
) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of templates ``(n, ...)`` and coefficients ``(K, n)`` from the weight's gradient.

    The backward of :func:`compose` written out (same operations, same order): ``W = mix @ T``
    with ``mix`` the K-mean of the coefficients.
    """
    flat_grad = weight_grad.reshape(1, -1).to(templates.dtype)
    templates_grad = coefficients_grad = None
    if ctx.needs_input_grad[1]:
        mix = coefficients.mean(dim=-2)
        templates_grad = mix.unsqueeze(1).mm(flat_grad).reshape(templates.shape)
    if ctx.needs_input_grad[2]:
        mix_grad = flat_grad.mm(templates.reshape(templates.shape[0], -1).t()).squeeze(0)
        coefficients_grad = mix_grad.expand(coefficients.shape) / coefficients.shape[-2]
    return templates_grad, coefficients_grad


def _recomposed(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The saved ``x``, templates and coefficients, and the weight composed again, in ``grad``'s precision.

    Composing again is cheaper than keeping the weight; under autocast the forward ran in a lower
    precision, so ``x`` and the weight are taken to the gradient's.
    """
    x, templates, coefficients = ctx.saved_tensors
    return x.to(grad.dtype), templates, coefficients, compose(templates, coefficients).to(grad.dtype)


class _GeneratedLinear(torch.autograd.Function):
    """``F.linear(x, compose(T, c), b)`` saving ``x`` and ``c``, not the composed weight."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, templates: Tensor, coefficients: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, templates, coefficients)
        return F.linear(x, compose(templates, coefficients), bias)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, templates, coefficients, weight = _recomposed(ctx, grad)
        grad_2d = grad.reshape(-1, grad.shape[-1])
        x_grad = bias_grad = None
        if ctx.needs_input_grad[0]:
            x_grad = grad_2d.mm(weight).view(x.shape)
        if ctx.needs_input_grad[3]:
            bias_grad = grad_2d.sum(0)
        templates_grad = coefficients_grad = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            # (out, in) computed in that layout: the transpose of addmm's (in, out) product would be
            # copied by the flattening in _bank_grads (a weight-sized copy per layer and step).
            weight_grad = grad_2d.t().mm(x.reshape(-1, x.shape[-1]))
            templates_grad, coefficients_grad = _bank_grads(ctx, templates, coefficients, weight_grad)
        return x_grad, templates_grad, coefficients_grad, bias_grad


class _GeneratedConv2d(torch.autograd.Function):
    """``F.conv2d(x, compose(T, c), b, ...)`` saving ``x`` and ``c``, not the composed weight."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, templates: Tensor, coefficients: Tensor, bias: Tensor | None,
        geometry: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int],
    ) -> Tensor:
        ctx.save_for_backward(x, templates, coefficients)
        ctx.geometry, ctx.has_bias = geometry, bias is not None
        stride, padding, dilation, groups = geometry
        return F.conv2d(x, compose(templates, coefficients), bias, stride, padding, dilation, groups)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, templates, coefficients, weight = _recomposed(ctx, grad)
        stride, padding, dilation, groups = ctx.geometry
        needs_weight = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        mask = [ctx.needs_input_grad[0], needs_weight, ctx.has_bias and ctx.needs_input_grad[3]]
        x_grad, weight_grad, bias_grad = torch.ops.aten.convolution_backward(
            grad, x, weight, [weight.shape[0]] if ctx.has_bias else None,
            list(stride), list(padding), list(dilation), False, [0, 0], groups, mask,
        )
        templates_grad = coefficients_grad = None
        if needs_weight:
            templates_grad, coefficients_grad = _bank_grads(ctx, templates, coefficients, weight_grad)
        return x_grad, templates_grad, coefficients_grad, bias_grad, None


def generated_linear(x: Tensor, templates: Tensor, coefficients: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(x, compose(templates, coefficients), bias)`` for training: the composed weight is
    not kept for backward (see the module docstring). ``coefficients`` is one ``(K, n)`` set."""
    return _GeneratedLinear.apply(x, templates, coefficients, bias)


def generated_conv2d(
    x: Tensor, templates: Tensor, coefficients: Tensor, bias: Tensor | None,
    stride: tuple[int, ...], padding: tuple[int, ...], dilation: tuple[int, ...], groups: int,
) -> Tensor:
    """``F.conv2d`` with ``compose(templates, coefficients)``, for training, as :func:`generated_linear`."""
    geometry = (tuple(stride), tuple(padding), tuple(dilation), groups)
    return _GeneratedConv2d.apply(x, templates, coefficients, bias, geometry)


class TemplateBank(nn.Module):
    """``n`` frozen templates shared by reference by every layer of one (group, role).

    The bank is owned once (by ``RecastModel.banks``) and saved once; layers only point to it.
    """

    def __init__(self, templates: Tensor) -> None:
        super().__init__()
        # Contiguous whatever the fit produced (an SVD gives transposed strides): composing
        # flattens the templates, and a strided bank would be copied on every composition.
        self.templates = nn.Parameter(templates.detach().clone(memory_format=torch.contiguous_format),
                                      requires_grad=False)

    @property
    def size(self) -> int:
        """Number of templates n."""
        return self.templates.shape[0]

    @property
    def weight_shape(self) -> torch.Size:
        """Shape of one generated weight."""
        return self.templates.shape[1:]

    def extra_repr(self) -> str:
        return f"templates={self.size}, shape={tuple(self.weight_shape)}"


def fingerprint(named_tensors: Iterable[tuple[str, Tensor]]) -> str:
    """sha256 over tensors' names, shapes and float32 bytes, in name order.

    Given the banks' templates it identifies a backbone: a task file records it and is refused by
    a backbone whose banks differ.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        data = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(data.shape)).encode())
        digest.update(data.numpy().tobytes())
    return digest.hexdigest()
