import json

import pytest

from recast.bench.report import load_runs, summarise, write_report
from recast.errors import FileFormatError


def run_record(method: str, seed: int, accuracy: float) -> dict:
    tasks = [
        {"name": n, "test_accuracy": accuracy, "val_accuracy": accuracy, "params": {"coefficients": 48, "head": 50, "other": 0},
         "bytes": 600, "train_seconds": 2.0, "peak_rss_mb": 900.0}
        for n in ("a", "b")
    ]
    return {"method": method, "backbone": "vit", "suite": "tiny", "seed": seed, "tasks": tasks,
            "average_accuracy": accuracy, "forgetting": 0.0, "bwt": 0.0, "versions": {},
            "accuracy_matrix": [[accuracy, None], [accuracy, accuracy]]}


def write_runs(directory, runs):
    (directory / "runs").mkdir(parents=True)
    for i, run in enumerate(runs):
        (directory / "runs" / f"{run['method']}_{i}.json").write_text(json.dumps(run))


def test_table_is_made_from_the_files_and_follows_an_edit(tmp_path):
    write_runs(tmp_path, [run_record("recast", 42, 0.8), run_record("recast", 1998, 0.6), run_record("linear", 42, 0.5)])
    text = write_report(tmp_path).read_text()
    assert "| recast | vit | 48 / 50 / 0 | 600 | 0.700 ± 0.100 |" in text
    assert (tmp_path / "accuracy_vs_bytes.png").stat().st_size > 1000
    assert (tmp_path / "matrix_recast_vit_42.png").exists()
    edited = run_record("linear", 42, 0.9)
    (tmp_path / "runs" / "linear_2.json").write_text(json.dumps(edited))
    text = write_report(tmp_path).read_text()
    assert "| linear | vit | 48 / 50 / 0 | 600 | 0.900 ± 0.000 |" in text
    rows = summarise(load_runs(tmp_path))
    assert [r["method"] for r in rows] == ["linear", "recast"]  # best first


def test_missing_fields_and_empty_dirs_are_reported(tmp_path):
    with pytest.raises(FileFormatError, match="no result files; run `recast bench` first"):
        write_report(tmp_path)
    bad = run_record("recast", 42, 0.8)
    del bad["forgetting"]
    write_runs(tmp_path, [bad])
    with pytest.raises(FileFormatError, match=r"missing fields \['forgetting'\]"):
        load_runs(tmp_path)
