"""``recast data list``, ``recast models list`` and ``recast pretrain --help``."""

from __future__ import annotations

import json

import pytest

from recast.cli import main


def test_data_list_json_names_every_builtin(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = {row["name"] for row in rows}
    assert {"mnist", "optdigits", "emoji-google", "emoji-twitter", "chars", "faces", "glyphs"} <= names
    assert all(row["licence"] and row["source"] for row in rows)


def test_data_list_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["name", "classes", "train/test"] and "not built" in out


def test_models_list_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "list", "--json"]) == 0
    specs = {row["spec"] for row in json.loads(capsys.readouterr().out)}
    assert {"recast-vit32", "recast-resnet32", "effnet-lite0", "timm:NAME"} <= specs


def test_pretrain_help_and_unknown_backbone(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    assert "disjoint from every benchmark task" in " ".join(capsys.readouterr().out.split())
    assert main(["pretrain", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown shipped backbone 'nope'" in capsys.readouterr().err
