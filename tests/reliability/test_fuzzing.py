"""Property-based tests: every malformed input ends in a ``RecastError`` with a message.

Config dicts, data specs, task files (arbitrary bytes, mutated valid files, mutated records) and
model configs. A refused task load leaves the model in memory exactly as it was.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recast import RecastConfig, RecastModel
from recast.errors import RecastError
from tests.reliability.common import same, state, tiny_model

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
CONFIG_KEYS = st.sampled_from(["target", "groups", "templates", "coef_sets", "exclude"])
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _refused_or_fine(call: Any) -> Any:
    """Run ``call``; a ``RecastError`` with a message is fine, any other exception fails the test."""
    try:
        return call()
    except RecastError as exc:
        assert str(exc).strip(), "an error without a message"
        return exc


@FUZZ
@given(st.one_of(JSON, st.dictionaries(CONFIG_KEYS | st.text(max_size=6), JSON, max_size=5)))
def test_config_from_dict(data):
    result = _refused_or_fine(lambda: RecastConfig.from_dict(data))
    if isinstance(result, RecastConfig):
        assert RecastConfig.from_dict(json.loads(result.to_json())) == result


SAFE_TEXT = st.text(alphabet=st.characters(blacklist_characters="/~\\", blacklist_categories=("Cs",)), max_size=20)


@FUZZ
@given(spec=st.one_of(
    st.text(max_size=30).filter(lambda s: "/" not in s and "~" not in s),
    st.builds("{}:{}".format, st.sampled_from(["imagefolder", "csv", "torchvision", "builtin", "x", ""]), SAFE_TEXT),
))
def test_data_specs(spec, tmp_path, monkeypatch):
    open_data = pytest.importorskip("recast.data").open_data
    monkeypatch.chdir(tmp_path)  # relative paths land in an empty folder
    monkeypatch.setenv("RECAST_DATA", str(tmp_path / "cache"))
    _refused_or_fine(lambda: open_data(spec))


@pytest.fixture(scope="module")
def model_and_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[RecastModel, bytes, dict[str, Any], dict]:
    """A tiny model, one valid task file of it, its record, and the model's state."""
    model = tiny_model()
    directory = tmp_path_factory.mktemp("valid")
    record = model.save_task(directory, "a")
    return model, (directory / "tasks" / "a.safetensors").read_bytes(), record, state(model)


def _try_load(model_and_file: tuple, data: bytes, record: Any, record_bytes: bytes | None = None) -> None:
    """Write a task ``x`` from ``data`` and ``record``, load it; refused means unchanged."""
    model, _, _, before = model_and_file
    with tempfile.TemporaryDirectory() as folder:
        tasks = Path(folder) / "tasks"
        tasks.mkdir()
        (tasks / "x.safetensors").write_bytes(data)
        (tasks / "x.json").write_bytes(record_bytes if record_bytes is not None else json.dumps(record).encode())
        result = _refused_or_fine(lambda: model.load_task(folder, "x"))
    if isinstance(result, RecastError):
        assert same(state(model), before)
    else:
        model.delete_task("x")
        model.set_task(before["active"])


def _pinned(record: dict[str, Any], data: bytes) -> dict[str, Any]:
    """``record`` with the sha256 of ``data``, so the bytes get past the checksum to the parser."""
    return {**record, "sha256": hashlib.sha256(data).hexdigest()}


@FUZZ
@given(st.binary(max_size=3000), st.booleans())
def test_task_file_of_arbitrary_bytes(model_and_file, data, pin):
    record = model_and_file[2]
    _try_load(model_and_file, data, _pinned(record, data) if pin else record)


MUTATION = st.tuples(st.sampled_from(["flip", "set", "delete", "insert", "truncate"]), st.integers(0, 10**6),
                     st.integers(0, 255))


@FUZZ
@given(st.lists(MUTATION, min_size=1, max_size=4), st.booleans())
def test_mutated_task_file(model_and_file, mutations, pin):
    data = bytearray(model_and_file[1])
    for op, position, value in mutations:
        at = position % max(len(data), 1)
        if op == "flip" and data:
            data[at] ^= 1 << (value % 8)
        elif op == "set" and data:
            data[at] = value
        elif op == "delete" and data:
            del data[at]
        elif op == "insert":
            data.insert(at, value)
        else:
            del data[at:]
    record = model_and_file[2]
    _try_load(model_and_file, bytes(data), _pinned(record, bytes(data)) if pin else record)


RECORD_KEYS = st.sampled_from(["num_classes", "class_names", "own_bn", "sha256", "fingerprint", "format_version",
                               "task", "bytes", "params", "format"])


@FUZZ
@given(st.one_of(JSON, st.dictionaries(RECORD_KEYS, JSON, min_size=1, max_size=4)), st.binary(max_size=40))
def test_mutated_task_record(model_and_file, changes, raw):
    _, data, record = model_and_file[:3]
    if isinstance(changes, dict) and set(changes) <= set(record):
        _try_load(model_and_file, data, {**record, **changes})
    else:
        _try_load(model_and_file, data, changes)
    _try_load(model_and_file, data, None, record_bytes=raw)


CONFIG_FIELDS = st.sampled_from(["config", "recipe", "banks", "adapters", "tasks", "task_records", "backbone_file",
                                 "fingerprint", "active", "mimicry_report", "format_version", "head"])


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(CONFIG_FIELDS, JSON, min_size=1, max_size=3))
def test_mutated_model_config(saved_model_dir, changes):
    with tempfile.TemporaryDirectory() as folder:
        directory = Path(folder) / "m"
        shutil.copytree(saved_model_dir, directory)
        config = json.loads((directory / "recast_config.json").read_text())
        (directory / "recast_config.json").write_text(json.dumps({**config, **changes}))
        _refused_or_fine(lambda: RecastModel.from_pretrained(directory))
        from recast.format import verify_model_dir

        verify_model_dir(directory)  # never raises


@pytest.fixture(scope="module")
def saved_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("saved")
    tiny_model().save_pretrained(directory)
    return directory
