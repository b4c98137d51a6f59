"""Packed task files: the task file's header plus dtype, read back dequantised, accuracy re-measured."""

import json

import pytest
import safetensors
import torch
from torch.utils.data import TensorDataset

from recast.edge.pack import (
    packed_accuracy,
    packed_copy,
    packed_task_blob,
    read_packed_task,
    with_task_tensors,
    write_packed_task,
)
from recast.errors import ConfigError, FileFormatError, TaskError
from recast.train import evaluate
from tests.edge.common import vit_model


@pytest.fixture(scope="module")
def vit():
    return vit_model("att")


def header_of(path) -> dict:
    with safetensors.safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


def test_packed_file_has_the_task_file_header_plus_dtype(vit, tmp_path):
    written = write_packed_task(vit, "a", "int8", tmp_path / "a.safetensors")
    meta = header_of(tmp_path / "a.safetensors")
    assert meta["format"] == "recast-task" and meta["format_version"] == "1" and meta["task"] == "a"
    assert meta["fingerprint"] == vit.fingerprint and meta["dtype"] == "int8"
    assert json.loads(meta["class_names"]) == ["x", "y", "z"] and meta["num_classes"] == "3"
    sizes = {d: len(packed_task_blob(vit, "a", d)) for d in ("fp32", "fp16", "int8")}
    assert written["bytes"] == sizes["int8"] == (tmp_path / "a.safetensors").stat().st_size
    assert sizes["int8"] < sizes["fp16"] < sizes["fp32"]


def test_reading_back_gives_the_task_tensors_in_fp32(vit):
    expected = vit.task_tensors("b")
    for dtype, tolerance in (("fp32", 0.0), ("fp16", 1e-2), ("int8", 2e-2)):
        name, tensors = read_packed_task(vit, packed_task_blob(vit, "b", dtype))
        assert name == "b" and set(tensors) == set(expected)
        for key, value in expected.items():
            assert tensors[key].dtype == torch.float32 and tensors[key].shape == value.shape
            assert float((tensors[key] - value).abs().max()) <= tolerance * float(value.abs().max())


def test_foreign_or_broken_files_are_refused(vit):
    other = vit_model("att", seed=5)
    with pytest.raises(FileFormatError, match="another backbone"):
        read_packed_task(vit, packed_task_blob(other, "a", "fp16"), "other.safetensors")
    with pytest.raises(FileFormatError, match="not a readable safetensors"):
        read_packed_task(vit, b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(ConfigError, match="int8"):
        packed_task_blob(vit, "a", "int3")
    with pytest.raises(TaskError, match="no task named"):
        packed_task_blob(vit, "zzz", "fp16")


def test_swapping_tensors_into_a_copy_leaves_the_model_alone(vit):
    images = torch.randn(4, 3, 16, 16)
    vit.set_task("a")
    with torch.no_grad():
        before = vit(images)
    zeros = {k: torch.zeros_like(v) for k, v in vit.task_tensors("a").items()}
    copied = with_task_tensors(vit, "a", zeros)
    copied.set_task("a")
    with torch.no_grad():
        assert torch.equal(copied(images), torch.zeros(4, 3))  # zero head
        assert torch.equal(vit(images), before)
    with pytest.raises(FileFormatError, match="missing head.bias"):
        with_task_tensors(vit, "a", {k: v for k, v in zeros.items() if k != "head.bias"})


def test_packed_accuracy_reports_every_dtype_next_to_fp32(vit):
    images = torch.randn(40, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    vit.set_task("b")
    with torch.no_grad():
        labels = vit(images).argmax(1)  # the fp32 model is right on every image by construction
    dataset = TensorDataset(images, labels)
    table = packed_accuracy(vit, "b", dataset, batch_size=16)
    assert set(table) == {"fp32", "fp16", "int8"}
    assert table["fp32"]["accuracy"] == evaluate(vit, dataset) == 1.0
    assert table["fp16"]["accuracy"] >= 0.95 and table["int8"]["accuracy"] >= 0.9
    assert table["int8"]["bytes"] < table["fp32"]["bytes"]
    fp16 = packed_copy(vit, "b", "fp16")
    fp16.set_task("b")
    with torch.no_grad():
        assert float((fp16(images) - vit(images)).abs().max()) < 1e-2
