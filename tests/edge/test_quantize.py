"""Packed task tensors: fp32 is exact, fp16 and int8 stay within their rounding bounds, bad input is refused."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from recast.edge import device
from recast.errors import ConfigError, FileFormatError
from recast.format.quantize import (
    SCALE_SUFFIX,
    dequantize_tensors,
    quantize_rows,
    quantize_tensors,
    stored_dtype,
)


def task_tensors(seed: int = 0, classes: int = 5) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "coefficients": torch.randn(24, generator=generator),
        "head.weight": torch.randn(classes, 16, generator=generator) * 0.05,
        "head.bias": torch.randn(classes, generator=generator) * 0.01,
        "bn.num_batches_tracked": torch.tensor(7),
    }


def test_fp32_round_trip_is_exact_and_names_are_kept():
    tensors = task_tensors()
    packed = quantize_tensors(tensors, "fp32")
    back = dequantize_tensors(packed)
    assert set(back) == set(tensors) and stored_dtype(packed) == "fp32"
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_fp16_casts_every_float_but_the_coefficients_and_keeps_integers():
    tensors = task_tensors()
    packed = quantize_tensors(tensors, "fp16")
    assert {packed[k].dtype for k in ("head.weight", "head.bias")} == {torch.float16}
    assert packed["coefficients"].dtype == torch.float32
    assert packed["bn.num_batches_tracked"].dtype == torch.int64 and stored_dtype(packed) == "fp16"
    back = dequantize_tensors(packed)
    for key in ("coefficients", "head.weight", "head.bias"):
        assert back[key].dtype == torch.float32
        assert torch.allclose(back[key], tensors[key], rtol=1e-3, atol=1e-7)


def test_int8_quantises_2d_rows_keeps_1d_state_in_fp16_and_the_coefficients_in_fp32():
    tensors = task_tensors()
    packed = quantize_tensors(tensors, "int8")
    assert packed["head.weight"].dtype == torch.int8 and packed["head.weight" + SCALE_SUFFIX].shape == (5,)
    assert packed["coefficients"].dtype == torch.float32 and packed["head.bias"].dtype == torch.float16
    assert stored_dtype(packed) == "int8"
    back = dequantize_tensors(packed)
    assert set(back) == set(tensors) and torch.equal(back["coefficients"], tensors["coefficients"])
    step = tensors["head.weight"].abs().amax(dim=1, keepdim=True) / 127
    assert bool(((back["head.weight"] - tensors["head.weight"]).abs() <= step + 1e-9).all())


@given(st.integers(1, 6), st.integers(1, 40), st.floats(1e-6, 1e3), st.integers(0, 2**16))
def test_int8_rows_never_round_worse_than_max_abs_scaling(rows, cols, magnitude, seed):
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * magnitude
    q, scale = quantize_rows(weight)
    error = (q.float() * scale[:, None] - weight).square().sum(dim=1)
    plain = weight.abs().amax(dim=1) / 127
    plain_error = ((weight / plain[:, None]).round() * plain[:, None] - weight).square().sum(dim=1)
    assert bool((error <= plain_error * (1 + 1e-5) + 1e-30).all())
    assert int(q.abs().max()) <= 127 and bool((scale <= plain * (1 + 1e-6)).all())


def test_int8_clips_a_heavy_tailed_row_for_a_finer_step_on_the_rest():
    generator = torch.Generator().manual_seed(0)
    weight = (torch.rand(1, 4096, generator=generator) - 0.5).sign() * torch.empty(1, 4096).exponential_(generator=generator)
    q, scale = quantize_rows(weight)  # Laplace-distributed: a few values far out, most near zero
    plain = weight.abs().amax() / 127
    assert float(scale[0]) < float(plain)
    error = float((q.float() * scale[:, None] - weight).square().sum())
    assert error < float(((weight / plain).round() * plain - weight).square().sum())


def test_zero_rows_and_conv_shaped_state_round_trip():
    weight = torch.randn(3, 2, 3, 3)
    weight[1] = 0
    back = dequantize_tensors(quantize_tensors({"w": weight}, "int8"))["w"]
    assert back.shape == weight.shape and bool((back[1] == 0).all())
    assert torch.allclose(back, weight, atol=float(weight.abs().max()) / 127)


def test_bad_input_is_refused_with_a_clear_error():
    with pytest.raises(ConfigError, match="fp32, fp16, int8"):
        quantize_tensors(task_tensors(), "int4")
    with pytest.raises(ConfigError, match="reserved suffix"):
        quantize_tensors({"x" + SCALE_SUFFIX: torch.ones(2)}, "fp16")
    packed = quantize_tensors(task_tensors(), "int8")
    scale = packed.pop("head.weight" + SCALE_SUFFIX)
    with pytest.raises(FileFormatError, match="has no"):
        dequantize_tensors(packed)
    with pytest.raises(FileFormatError, match="one scale per row"):
        dequantize_tensors({**packed, "head.weight" + SCALE_SUFFIX: scale[:2]})
    with pytest.raises(FileFormatError, match="has no tensor"):
        dequantize_tensors({"ghost" + SCALE_SUFFIX: scale})


def test_the_device_reads_the_same_convention_without_torch():
    assert device.SCALE_SUFFIX == SCALE_SUFFIX
    for dtype in ("fp32", "fp16", "int8"):
        packed = quantize_tensors(task_tensors(), dtype)
        arrays = device.dequantize({k: v.numpy() for k, v in packed.items() if k != "bn.num_batches_tracked"})
        expected = dequantize_tensors(packed)
        assert all(np.array_equal(arrays[k], expected[k].numpy()) for k in arrays)
        assert all(a.dtype == np.float32 for a in arrays.values())
