"""Truncated, bit-flipped, wrong-backbone and wrong-version files are refused, naming file and reason."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import safetensors.torch

import recast.format.records
import recast.format.store
from recast import FileFormatError, RecastModel
from recast.format import ModelStore, verify_model_dir
from tests.reliability.common import flip_byte, nudge, outputs, same, snapshot, tiny_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A model directory with tasks base and a, and the outputs it must load with."""
    directory = tmp_path_factory.mktemp("model")
    model = tiny_model()
    model.save_pretrained(directory)
    return directory, outputs(model)


def _copy(saved: tuple[Path, dict], tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "m"
    shutil.copytree(saved[0], target)
    return target


def _pin(directory: Path, relative: str, data: bytes) -> None:
    """Write ``data`` to a file and make the config pin it (a consistent but foreign file)."""
    (directory / relative).write_bytes(data)
    config = json.loads((directory / "recast_config.json").read_text())
    digest = hashlib.sha256(data).hexdigest()
    if relative == "backbone.safetensors":
        config["backbone_file"]["sha256"] = digest
    else:
        config["task_records"][Path(relative).stem]["sha256"] = digest
    (directory / "recast_config.json").write_text(json.dumps(config))


def _with_metadata(path: Path, **changes: str) -> bytes:
    """The tensors of ``path`` re-saved with changed metadata."""
    data = path.read_bytes()
    meta = {**recast.format.records._metadata(data), **changes}
    return safetensors.torch.save(safetensors.torch.load(data), meta)


def test_good_directory_loads_and_verifies(saved):
    assert same(outputs(RecastModel.from_pretrained(saved[0])), saved[1])
    assert verify_model_dir(saved[0]) == []


@pytest.mark.parametrize("damage, reason", [
    ("truncate", "checksum mismatch"), ("flip", "checksum mismatch"), ("delete", "file not found"),
    ("version", "format version '2'"), ("foreign", "belongs to another model"),
])
def test_bad_backbone_is_refused(saved, tmp_path, damage, reason):
    directory = _copy(saved, tmp_path)
    path = directory / "backbone.safetensors"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "flip":
        flip_byte(path, len(path.read_bytes()) // 2)
    elif damage == "delete":
        path.unlink()
    elif damage == "version":
        _pin(directory, "backbone.safetensors", _with_metadata(path, format_version="2"))
    else:
        other = tmp_path / "other"
        tiny_model(seed=3).save_pretrained(other)
        _pin(directory, "backbone.safetensors", (other / "backbone.safetensors").read_bytes())
    with pytest.raises(FileFormatError, match=f"backbone.safetensors: {reason}"):
        RecastModel.from_pretrained(directory)
    assert any(p.status == "error" and p.path.endswith("backbone.safetensors") for p in verify_model_dir(directory))


@pytest.mark.parametrize("damage, reason", [
    ("truncate", "a.safetensors: checksum mismatch"), ("flip", "a.safetensors: checksum mismatch"),
    ("empty", "a.safetensors: checksum mismatch"), ("version", "a.safetensors: format version '2'"),
    ("foreign", "a.safetensors: made for another backbone"), ("garbage", "a.safetensors: not a readable safetensors"),
    ("record", "recast_config.json: not a valid recast task record: num_classes"),
])
def test_bad_task_file_is_refused_and_the_model_is_unchanged(saved, tmp_path, damage, reason):
    directory = _copy(saved, tmp_path)
    path = directory / "tasks" / "a.safetensors"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-10])
    elif damage == "flip":
        flip_byte(path, 20)
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "version":
        _pin(directory, "tasks/a.safetensors", _with_metadata(path, format_version="2"))
    elif damage == "foreign":
        _pin(directory, "tasks/a.safetensors", _with_metadata(path, fingerprint="0" * 64))
    elif damage == "garbage":
        _pin(directory, "tasks/a.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}xx")
    else:
        config = json.loads((directory / "recast_config.json").read_text())
        config["task_records"]["a"]["num_classes"] = "three"
        (directory / "recast_config.json").write_text(json.dumps(config))
    model = tiny_model()
    nudge(model, "a", seed=99)  # differs from the file, so a partial load would show
    before = snapshot(model)
    with pytest.raises(FileFormatError, match=reason):
        model.load_task(directory, "a", replace=True)
    assert same(snapshot(model), before)
    with pytest.raises(FileFormatError, match=reason):
        RecastModel.from_pretrained(directory)
    assert verify_model_dir(directory)


def test_legacy_task_json_is_checked_too(tmp_path):
    """A task saved without a model config: its JSON pins the tensor file."""
    model = tiny_model()
    record = model.save_task(tmp_path, "a")
    assert json.loads((tmp_path / "tasks" / "a.json").read_text())["sha256"] == record["sha256"]
    flip_byte(tmp_path / "tasks" / "a.safetensors")
    with pytest.raises(FileFormatError, match="a.safetensors: checksum mismatch"):
        tiny_model().load_task(tmp_path, "a", replace=True)


def test_task_for_another_backbone_is_not_written_into_a_model_directory(saved, tmp_path):
    directory = _copy(saved, tmp_path)
    other = tiny_model(seed=4)
    with pytest.raises(FileFormatError, match="holds another backbone"):
        other.save_task(directory, "a")
    assert same(outputs(RecastModel.from_pretrained(directory)), saved[1])


def test_crash_after_commit_loads_the_new_state_and_next_save_settles(saved, tmp_path, monkeypatch):
    """Killed between the config commit and moving staged files into place: the new state loads."""
    directory = _copy(saved, tmp_path)
    model = tiny_model()
    nudge(model, "a", seed=5)
    model.add_task("b", 2)
    real, calls = ModelStore._settle, []

    def crash_on_second(*args):  # the first call finishes the previous save, the second follows the commit
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(*args)

    monkeypatch.setattr(ModelStore, "_settle", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(directory)
    monkeypatch.undo()
    assert sorted(p.name for p in (directory / "tasks").glob("a.*.safetensors"))  # the staged file waits
    assert same(outputs(RecastModel.from_pretrained(directory)), outputs(model))
    problems = verify_model_dir(directory)
    assert problems and all(p.status == "warning" for p in problems)
    model.save_task(directory, "b")  # the next writer finishes the interrupted one first
    assert verify_model_dir(directory) == []
    assert same(outputs(RecastModel.from_pretrained(directory)), outputs(model))


def test_crash_before_commit_keeps_the_old_state(saved, tmp_path, monkeypatch):
    directory = _copy(saved, tmp_path)
    model = tiny_model()
    nudge(model, "a", seed=6)
    real = recast.format.store.atomic_write_json

    def crash_on_config(path, obj):
        if Path(path).name == "recast_config.json":
            raise KeyboardInterrupt
        real(path, obj)

    monkeypatch.setattr(recast.format.store, "atomic_write_json", crash_on_config)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(directory)
    with pytest.raises(KeyboardInterrupt):
        model.save_task(directory, "a")
    monkeypatch.undo()
    assert same(outputs(RecastModel.from_pretrained(directory)), saved[1])
    assert {p.status for p in verify_model_dir(directory)} == {"warning"}  # leftovers only
