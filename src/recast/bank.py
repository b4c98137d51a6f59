"""Template banks and the one formula that turns templates and coefficients into a weight."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
from torch import Tensor, nn


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
