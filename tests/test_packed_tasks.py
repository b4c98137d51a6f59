"""Task files stored in fp16 or int8 load transparently through the same store and checks."""

from __future__ import annotations

import json

import pytest
import torch

from recast import RecastModel
from recast.errors import FileFormatError
from recast.format import ModelStore
from recast.format.records import decode, encode
from recast.format.staging import sha256_hex
from tests.reliability.common import images, tiny_model


@pytest.mark.parametrize(("dtype", "tolerance"), [("fp16", 1e-2), ("int8", 5e-2)])
def test_packed_task_saves_small_and_loads_close_to_fp32(tmp_path, dtype, tolerance) -> None:
    model = tiny_model()
    model.save_pretrained(tmp_path)
    full = model.save_task(tmp_path / "fp32", "a")
    record = model.save_task(tmp_path, "a", dtype=dtype)
    assert record["dtype"] == dtype and record["bytes"] < full["bytes"]
    tensors, header = decode(tmp_path / "tasks" / "a.safetensors", (tmp_path / "tasks" / "a.safetensors").read_bytes())
    assert header["dtype"] == dtype
    assert {v.dtype for v in tensors.values() if v.is_floating_point()} <= {torch.float16, torch.float32}
    loaded = RecastModel.from_pretrained(tmp_path)
    loaded.set_task("a")
    model.set_task("a")
    with torch.no_grad():
        expected, got = model(images()), loaded(images())
    assert not torch.equal(expected, got) or dtype == "fp16"
    assert (expected - got).abs().max() <= tolerance * expected.abs().max()
    assert json.loads((tmp_path / "tasks" / "a.json").read_text())["dtype"] == dtype


def test_packed_file_with_a_missing_scale_is_refused_by_name(tmp_path) -> None:
    model = tiny_model()
    model.save_pretrained(tmp_path)
    model.save_task(tmp_path, "a", dtype="int8")
    path = tmp_path / "tasks" / "a.safetensors"
    tensors, header = decode(path, path.read_bytes())
    broken = {k: v for k, v in tensors.items() if not k.endswith("/scale")}
    data = encode(broken, header)
    path.write_bytes(data)
    config = json.loads((tmp_path / "recast_config.json").read_text())
    config["task_records"]["a"]["sha256"] = sha256_hex(data)
    (tmp_path / "recast_config.json").write_text(json.dumps(config))
    with pytest.raises(FileFormatError, match=r"a\.safetensors: .*has no"):
        RecastModel.from_pretrained(tmp_path)
    assert ModelStore(tmp_path).committed() is not None


def test_unknown_dtype_is_refused() -> None:
    with pytest.raises(Exception, match="dtype"):
        tiny_model().save_task("unused", "a", dtype="int4")
