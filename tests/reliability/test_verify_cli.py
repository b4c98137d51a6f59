"""``recast verify DIR``: a per-file report, non-zero exit with the reason when a file is bad, ``--json``."""

from __future__ import annotations

import json

from recast.cli import main
from tests.reliability.common import flip_byte, tiny_model


def test_verify_reports_every_file_and_fails_on_a_bad_one(tmp_path, capsys):
    tiny_model().save_pretrained(tmp_path)
    assert main(["verify", str(tmp_path)]) == 0
    report = capsys.readouterr().out
    for name in ("recast_config.json", "backbone.safetensors", "a.safetensors", "base.json"):
        assert name in report
    assert "all files good" in report

    flip_byte(tmp_path / "tasks" / "a.safetensors")
    (tmp_path / "tasks" / ".a.json.x1y2z3ab.tmp").write_text("{")
    assert main(["verify", str(tmp_path), "--json"]) == 1
    summary = json.loads(capsys.readouterr().out)
    assert summary["ok"] is False
    by_file = {f["path"].rsplit("/", 1)[-1]: f for f in summary["files"]}
    assert by_file["a.safetensors"]["status"] == "error" and "checksum mismatch" in by_file["a.safetensors"]["message"]
    assert by_file[".a.json.x1y2z3ab.tmp"]["status"] == "warning"
    assert by_file["backbone.safetensors"]["status"] == "ok"

    assert main(["verify", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "ERROR" in captured.out and "1 bad file(s)" in captured.err


def test_verify_a_missing_or_broken_directory(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "nope")]) == 1
    assert "not a directory" in capsys.readouterr().out
    (tmp_path / "recast_config.json").write_text("{not json")
    assert main(["verify", str(tmp_path)]) == 1
    assert "not valid JSON" in capsys.readouterr().out
