"""Compact task files: a task's tensors in fp16 or int8, and back to fp32.

Pure functions over a task's tensor dict (the dict ``RecastModel.task_tensors`` returns: the packed
``coefficients`` vector, the head's weight and bias, any other per-task state):

- ``fp32``: every floating tensor as float32 (the normal task file).
- ``fp16``: every floating tensor cast to float16.
- ``int8``: floating tensors of two or more dimensions (head weights, convolution-shaped state)
  become int8 with one symmetric scale per output row (the first dimension), stored as float32
  under ``NAME + SCALE_SUFFIX``; each row's scale is the one of :data:`CLIP_RATIOS` that minimises
  the row's squared rounding error. 1-D tensors (biases, BatchNorm statistics) are cast to
  float16, since a per-tensor int8 scale would cost them precision for a few bytes.

In every dtype the :data:`FULL_PRECISION` tensors (the packed ``coefficients``) stay float32: each
coefficient scales a whole template, so its rounding moves every weight of the layers it generates,
through every later layer. Rounding only them to fp16 flipped test predictions that rounding the head
did not, and keeping them costs two bytes per coefficient (under 250 bytes at 114 coefficients).

Non-floating tensors pass unchanged. :func:`dequantize_tensors` reverses any of them to float32, so a
reader needs no other information than the tensor names: a tensor with a ``/scale`` partner is int8.
The suffix contains ``/``, which never occurs in a module path, so it cannot collide with a real name.
"""

from __future__ import annotations

import torch
from torch import Tensor

from recast.errors import ConfigError, FileFormatError

DTYPES = ("fp32", "fp16", "int8")
SCALE_SUFFIX = "/scale"
INT8_MAX = 127
FULL_PRECISION = frozenset({"coefficients"})
CLIP_RATIOS = tuple(1.0 - k / 100 for k in range(51))  # the row's max |value| times 1.00, 0.99, ..., 0.50


def check_dtype(dtype: str) -> str:
    """``dtype`` itself when it is one of :data:`DTYPES`; otherwise a ``ConfigError`` saying which are."""
    if dtype not in DTYPES:
        raise ConfigError(f"unknown task file dtype {dtype!r}; use one of: {', '.join(DTYPES)}")
    return dtype


def quantize_tensors(tensors: dict[str, Tensor], dtype: str) -> dict[str, Tensor]:
    """``tensors`` stored as ``dtype`` (see the module docstring); the input is not changed."""
    check_dtype(dtype)
    out: dict[str, Tensor] = {}
    for name, value in tensors.items():
        if name.endswith(SCALE_SUFFIX):
            raise ConfigError(f"tensor name {name!r} ends with the reserved suffix {SCALE_SUFFIX!r}")
        value = value.detach().to("cpu")
        if not value.is_floating_point():
            out[name] = value.contiguous()
        elif dtype == "fp32" or name in FULL_PRECISION:
            out[name] = value.to(torch.float32).contiguous()
        elif dtype == "fp16" or value.dim() < 2:
            out[name] = value.to(torch.float16).contiguous()
        else:
            out[name], out[name + SCALE_SUFFIX] = quantize_rows(value)
    return out


def quantize_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 with one float32 scale per row (first dimension): ``weight ~ q * scale``.

    Each row's scale is ``ratio * max|row| / 127`` for the ratio of :data:`CLIP_RATIOS` with the
    least squared error: clipping a few large values buys a finer step for all the others. Ratio 1
    is among them, so no row is worse than plain max-abs scaling. A row of zeros gets scale 0 (and
    stays exactly zero).
    """
    rows = weight.detach().to(torch.float32).reshape(weight.shape[0], -1)
    peak = rows.abs().amax(dim=1)
    best_scale = peak / INT8_MAX
    best_error = _rounding_error(rows, best_scale)
    for ratio in CLIP_RATIOS[1:]:
        scale = peak * ratio / INT8_MAX
        error = _rounding_error(rows, scale)
        better = error < best_error
        best_scale = torch.where(better, scale, best_scale)
        best_error = torch.where(better, error, best_error)
    q = _round(rows, best_scale).to(torch.int8)
    return q.reshape(weight.shape).contiguous(), best_scale.contiguous()


def _round(rows: Tensor, scale: Tensor) -> Tensor:
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(rows / safe[:, None]).clamp_(-INT8_MAX, INT8_MAX)


def _rounding_error(rows: Tensor, scale: Tensor) -> Tensor:
    """Each row's squared error after rounding to int8 with ``scale``."""
    return (_round(rows, scale) * scale[:, None] - rows).square().sum(dim=1)


def dequantize_tensors(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Float32 tensors from a dict written by :func:`quantize_tensors` (any dtype); scales are consumed.

    Raises ``FileFormatError`` for a scale without its tensor, an int8 tensor without its scale, or a
    scale of the wrong length.
    """
    out: dict[str, Tensor] = {}
    for name, value in tensors.items():
        if name.endswith(SCALE_SUFFIX):
            if name[: -len(SCALE_SUFFIX)] not in tensors:
                raise FileFormatError(f"scale {name!r} has no tensor {name[: -len(SCALE_SUFFIX)]!r}")
            continue
        scale = tensors.get(name + SCALE_SUFFIX)
        if scale is not None:
            out[name] = dequantize_rows(name, value, scale)
        elif value.dtype == torch.int8:
            raise FileFormatError(f"int8 tensor {name!r} has no {name + SCALE_SUFFIX!r}")
        elif value.is_floating_point():
            out[name] = value.to(torch.float32)
        else:
            out[name] = value
    return out


def dequantize_rows(name: str, q: Tensor, scale: Tensor) -> Tensor:
    """``q * scale`` per row as float32, after checking that they fit each other."""
    if q.dtype != torch.int8 or q.dim() < 1 or scale.shape != (q.shape[0],):
        raise FileFormatError(
            f"{name!r}: expected int8 rows with one scale per row, got {q.dtype} {tuple(q.shape)} "
            f"and scales {tuple(scale.shape)}"
        )
    view = (-1,) + (1,) * (q.dim() - 1)
    return q.to(torch.float32) * scale.to(torch.float32).reshape(view)


def stored_dtype(tensors: dict[str, Tensor]) -> str:
    """Which of :data:`DTYPES` a tensor dict is stored in (by its floating tensors and scales)."""
    if any(name.endswith(SCALE_SUFFIX) for name in tensors):
        return "int8"
    floats = {v.dtype for v in tensors.values() if v.is_floating_point()}
    return "fp16" if torch.float16 in floats else "fp32"
