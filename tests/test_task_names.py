"""One rule for task names, for every method and every entry point: bad names write nothing anywhere."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from recast.cli import main
from recast.errors import FileFormatError, TaskError
from recast.format import TASK_NAME_RULE
from recast.methods import METHOD_NAMES, build_method, load_method
from tests.helpers import narrow_resnet, tiny_vit

BAD_NAMES = ["/abs/path/pwned", "a/b", "..", ".hidden", "", "x" * 65, "nul\x00byte", "trailing\n"]
RESNET_ONLY = {"clr", "recast+clr", "recast+piggyback"}


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture(scope="module", params=METHOD_NAMES)
def model(request):
    method = request.param
    base = narrow_resnet() if method in RESNET_ONLY else tiny_vit(depth=2)
    options = {"groups": 1} if method in ("recast", "recast+melo", "recast+adaptformer") else {}
    return build_method(method, base, **options)


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_bad_task_names_are_refused_with_the_rule_and_nothing_is_written(model, name, tmp_path) -> None:
    directory = tmp_path / "model"
    model.save_pretrained(directory)
    before = _listing(tmp_path)
    with pytest.raises(TaskError, match="use " + TASK_NAME_RULE.split(":")[0]):
        model.add_task(name, 2)
    with pytest.raises(TaskError, match="invalid task name"):
        model.save_task(directory, name)
    with pytest.raises(TaskError, match="invalid task name"):
        model.load_task(directory, name)
    assert name not in model.tasks
    assert _listing(tmp_path) == before
    assert not os.path.exists("/abs/path/pwned.safetensors")


def test_a_config_naming_a_bad_task_is_refused(tmp_path) -> None:
    """A record read from disk goes through the same rule (here: a task record keyed '../x')."""
    model = build_method("lora", tiny_vit(depth=2))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "recast_config.json").read_text())
    config["task_records"]["../x"] = config["task_records"]["base"]
    (tmp_path / "recast_config.json").write_text(json.dumps(config))
    with pytest.raises(FileFormatError, match="task_records"):
        load_method(tmp_path)


@pytest.mark.parametrize("name", ["/abs/path/pwned", "a/b", ".."], ids=repr)
def test_the_command_line_refuses_a_bad_name_before_writing_anything(tmp_path, name, capsys) -> None:
    """``recast train DIR --model ... --method lora --task /abs/path`` creates nothing, not even DIR."""
    before = _listing(tmp_path)
    code = main(["train", str(tmp_path / "m"), "--model", "recast-vit32", "--method", "lora", "--task", name,
                 "--data", "builtin:faces"])
    assert code == 2 and "invalid task name" in capsys.readouterr().err
    assert _listing(tmp_path) == before


def test_a_sequence_file_with_a_bad_name_is_refused_before_writing(tmp_path, capsys) -> None:
    sequence = tmp_path / "seq.json"
    sequence.write_text(json.dumps([{"name": "../escape", "data": "builtin:faces"}]))
    before = _listing(tmp_path)
    assert main(["train", str(tmp_path / "m"), "--model", "recast-vit32", "--sequence", str(sequence)]) == 2
    assert "invalid task name" in capsys.readouterr().err
    assert _listing(tmp_path) == before
