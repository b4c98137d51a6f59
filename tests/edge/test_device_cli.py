"""The device side runs without torch; the example, the commands and the benchmark work on tiny inputs."""

import json
import subprocess
import sys
import time
from pathlib import Path

import safetensors
import torch

from recast import RecastConfig
from recast.cli import main
from recast.edge.bench import _interleaved, _paired_ratios, edge_bench, markdown_table, size_comparison
from recast.edge.export import export_onnx
from recast.edge.pack import write_packed_task
from tests.edge.common import vit_model
from tests.helpers import tiny_vit

ROOT = Path(__file__).resolve().parents[2]
DEVICE = ROOT / "src" / "recast" / "edge" / "device.py"

DEVICE_SCRIPT = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("device", sys.argv[1])
device = importlib.util.module_from_spec(spec)
sys.modules["device"] = device
spec.loader.exec_module(device)
import numpy as np
runner = device.EdgeRunner(sys.argv[2], threads=1)
task = runner.load_task(open(sys.argv[3], "rb").read())
logits = runner.run(np.zeros((2, 3, 16, 16), dtype=np.float32), task)
print(task.name, task.dtype, logits.shape, "torch" in sys.modules)
"""


def test_the_device_module_runs_a_delivered_task_without_importing_torch(tmp_path):
    model = vit_model("att")
    export_onnx(model, tmp_path / "onnx")
    write_packed_task(model, "b", "int8", tmp_path / "b.safetensors")
    result = subprocess.run([sys.executable, "-c", DEVICE_SCRIPT, str(DEVICE), str(tmp_path / "onnx"), str(tmp_path / "b.safetensors")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["b", "int8", "(2,", "7)", "False"]


def test_the_edge_example_switches_three_task_files_on_the_device(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "edge_onnx.py"), "--out", str(tmp_path), "--steps", "2"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("task ")]
    assert len(lines) == 3 and all("delivered" in line and "bytes (int8)" in line for line in lines)
    assert "torch imported: False" in result.stdout


def test_pack_and_export_commands(tmp_path, capsys):
    model = vit_model("att")
    model.save_pretrained(tmp_path / "model")
    out = tmp_path / "a.int8.safetensors"
    assert main(["pack", str(tmp_path / "model"), "--task", "a", "--dtype", "int8", "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["bytes"] == out.stat().st_size < printed["fp32_bytes"]
    with safetensors.safe_open(str(out), framework="pt") as handle:
        assert handle.metadata()["dtype"] == "int8" and handle.metadata()["task"] == "a"
    assert main(["export", str(tmp_path / "model"), "--onnx", str(tmp_path / "onnx"), "--check", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["manifest"]["kind"] == "task-generic" and max(printed["max_abs_diff"].values()) < 1e-4
    assert main(["pack", str(tmp_path / "model"), "--task", "nope", "--dtype", "fp16", "--out", str(out)]) == 2
    assert "no task named 'nope'" in capsys.readouterr().err
    bench = tmp_path / "edge.json"
    assert main(["edge-bench", str(tmp_path / "model"), "--tasks", "a", "--repeats", "1", "--batch-sizes", "1",
                 "--threads", "1", "--out", str(bench)]) == 0
    assert "| a | " in capsys.readouterr().out and json.loads(bench.read_text())["model"] == str(tmp_path / "model")


def test_edge_bench_measures_everything_in_one_run(tmp_path):
    model = vit_model("att")
    dataset = torch.utils.data.TensorDataset(torch.randn(8, 3, 16, 16), torch.zeros(8, dtype=torch.long))
    result = edge_bench(model, tasks=["a", "b"], batch_sizes=(1, 2), repeats=2, threads=1, datasets={"a": dataset},
                        out=tmp_path / "edge.json")
    assert json.loads((tmp_path / "edge.json").read_text()) == json.loads(json.dumps(result))
    for batch in ("1", "2"):
        medians = result["latency"][batch]["median_s"]
        assert set(medians) == {"onnx_compose_at_switch", "onnx_compose_at_load", "onnx_compose_per_call", "onnx_plain",
                                "torch_eval"}
        assert min(medians.values()) > 0
        latency = result["latency"][batch]
        low, high = latency["iqr"]["onnx_compose_at_switch_over_plain"]
        assert 0 < low <= latency["onnx_compose_at_switch_over_plain"] <= high and latency["repeats"] == 2
    assert set(result["switch"]) == {"at-switch", "at-load", "per-call"}
    assert all(s["load_task_file_s"] > 0 for s in result["switch"].values())
    files = result["bytes"]["task_files"]["a"]
    assert files["int8"] < files["fp16"] < files["fp32"] < result["bytes"]["graph_plain"]
    assert set(result["accuracy"]["a"]) == {"fp32", "fp16", "int8"}
    table = markdown_table(result)
    assert f"{files['int8']:,} B, acc {result['accuracy']['a']['int8']['accuracy']:.4f}" in table
    assert table.count("\n| ") >= 2 + 3 + 2  # two batch sizes, three compose modes, two tasks
    assert "ONNX, compose at load" in table


def test_size_comparison_against_lora_with_its_head():
    sizes = size_comparison(tiny_vit(num_classes=10), num_classes=10, config=RecastConfig(target="att", groups=2))
    recast_bytes = sizes["recast_att_task_file_bytes"]
    assert recast_bytes["int8"] < recast_bytes["fp16"] < recast_bytes["fp32"]
    assert sizes["lora_adapter_with_head_bytes"] > recast_bytes["fp32"]
    assert sizes["lora_over_recast_int8"] == sizes["lora_adapter_with_head_bytes"] / recast_bytes["int8"]


def test_latency_samples_last_long_enough_and_ratios_are_paired():
    counts = {"fast": 0, "slow": 0}

    def call(name: str, seconds: float):
        def run():
            counts[name] += 1
            time.sleep(seconds)
        return run

    times = _interleaved({"fast": call("fast", 0.001), "slow": call("slow", 0.02)}, repeats=3, min_sample_s=0.008)
    # the slow call already lasts a sample: warm-up and calibration, then per round one untimed call and one timed
    assert counts["slow"] == 2 + 3 * 2 and counts["fast"] >= counts["slow"]
    assert all(len(v) == 3 for v in times.values()) and min(times["slow"]) >= 0.02
    ratios = _paired_ratios({"plain": [1.0, 2.0, 4.0, 8.0], "other": [2.0, 4.0, 8.0, 32.0]}, "plain")
    assert set(ratios) == {"other"} and ratios["other"]["median"] == 2.0  # per round, not of the medians (3.0)
    assert ratios["other"]["iqr"] == [2.0, 2.5]  # inclusive quartiles stay inside the observed ratios
