import json

import numpy as np
import pytest
from PIL import Image

from recast import bench
from recast.errors import ConfigError
from tests.helpers import tiny_vit


def colour_folder(root, classes=3, per_class=12, seed=0):
    """An image folder whose classes differ in colour: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            base = np.zeros((16, 16, 3)) + 255 * np.eye(3)[c]
            pixels = np.clip(base * 0.7 + rng.normal(0, 30, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"c{c}" / f"{i}.png")
    return root


@pytest.fixture
def tiny_suite(tmp_path):
    tasks = tuple(bench.BenchTask(f"t{k}", f"imagefolder:{colour_folder(tmp_path / f'd{k}', seed=k)}") for k in range(2))
    backbone = bench.BenchBackbone("tiny", "tiny-vit", ("recast:att", "linear"),
                                   {"recast:att": {"target": "att", "groups": 1}}, loader=lambda: tiny_vit(depth=2))
    return bench.Suite("tiny", tasks, (backbone,), {"epochs": 2, "batch_size": 8, "step_size": 1, "lr": 0.05},
                       seeds=(42,))


def test_harness_runs_end_to_end_and_reports(tiny_suite, tmp_path):
    out = tmp_path / "results"
    runs = bench.plan(tiny_suite)
    report = bench.run_suite(tiny_suite, runs, out, log=lambda _: None)
    record = json.loads((out / "runs" / "recast-att__tiny__42.json").read_text())
    assert record["forgetting"] == 0.0
    assert len(record["accuracy_matrix"]) == 2 and record["accuracy_matrix"][0][1] is None
    assert record["tasks"][0]["params"]["coefficients"] == 2 * 2 * 2
    assert record["tasks"][0]["bytes"] == (out / "models" / "recast-att__tiny__42" / "tasks" / "t0.safetensors").stat().st_size
    assert all(0.0 <= t["test_accuracy"] <= 1.0 for t in record["tasks"])
    text = report.read_text()
    assert "| recast:att | tiny |" in text and "| linear | tiny |" in text
    # a finished run is kept, not rerun
    logs = []
    bench.run_suite(tiny_suite, runs, out, log=logs.append)
    assert sum("already done" in line for line in logs) == 2


def test_plan_filters_and_errors(tiny_suite):
    assert [r.method for r in bench.plan(tiny_suite, methods=["recast"])] == ["recast:att"]
    with pytest.raises(ConfigError, match="unknown backbone 'vit'"):
        bench.plan(tiny_suite, backbones=["vit"])
    with pytest.raises(ConfigError, match="nothing to run"):
        bench.plan(tiny_suite, methods=["lora"])


def test_paper_suite_dry_run_names_missing_roots(tmp_path):
    (tmp_path / "flowers102").mkdir()
    suite = bench.paper_suite(tmp_path)
    missing = bench.missing_data(suite)
    assert len(missing) == 5 and not any(m.startswith("flowers") for m in missing)
    text = bench.describe(suite, bench.plan(suite))
    assert "MISSING data root -> cars" in text and "timm:vit_small_patch16_224" in text


def test_demo_prints_table_predictions_and_files(tiny_suite, tmp_path, capsys):
    from recast.demo import run_demo

    report = run_demo(tmp_path / "demo", tiny_suite)
    printed = capsys.readouterr().out
    assert report.exists() and "| recast:att | tiny |" in printed
    assert "predicted" in printed and "true" in printed
    assert f"Files: results table {report}" in printed
