"""The demo: what it says first, its table (every task's accuracy), its picture, on a tiny suite."""

import re

import numpy as np
from PIL import Image

from recast import bench
from recast.demo import DemoSettings, demo_suite, demo_tasks, estimate_seconds, run_demo
from tests.helpers import tiny_vit


def colour_folder(root, classes=3, per_class=10, seed=0):
    """An image folder whose classes differ in colour."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(255 * np.eye(3)[c] * 0.7 + rng.normal(0, 30, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"c{c}" / f"{i}.png")
    return root


def test_demo_prints_intro_table_and_names_its_picture(tmp_path, capsys):
    tasks = tuple(bench.BenchTask(f"t{k}", f"imagefolder:{colour_folder(tmp_path / f'd{k}', seed=k)}")
                  for k in range(2))
    backbone = bench.BenchBackbone("tiny", "tiny-vit", ("recast", "linear"), {"recast": {"groups": 1}},
                                   loader=lambda: tiny_vit(depth=2))
    suite = bench.Suite("tiny", tasks, (backbone,), {"epochs": 1, "batch_size": 8, "step_size": 1, "lr": 0.05},
                        seeds=(42,))
    picture = run_demo(tmp_path / "demo", suite=suite)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("recast demo:") and "tasks learned in order: t0, t1" in lines[0]
    assert re.search(r"About \d+ minutes? on 2 CPU cores", lines[2])
    header = next(line for line in lines if line.startswith("method"))
    assert header.split()[-3:] == ["t0", "t1", "average"]
    rows = {line.split()[0]: line.split() for line in lines if line.startswith(("recast ", "linear "))}
    assert set(rows) == {"recast", "linear"}
    for row in rows.values():
        accuracies = [float(v) for v in row[-3:]]
        assert all(0.0 <= a <= 1.0 for a in accuracies)
        assert abs(accuracies[2] - (accuracies[0] + accuracies[1]) / 2) < 2e-3  # average of the final row
    assert rows["recast"][1] == "8" and rows["linear"][1] == "0"  # coefficients: 2 layers x 2 templates x K=2
    assert picture.is_file() and picture.stat().st_size > 10_000
    assert any(str(picture) in line for line in lines)


def test_demo_suite_runs_effnet_at_the_chosen_size_with_mnist_first():
    suite = demo_suite(DemoSettings(train_images=100, epochs=2, image_size=64))
    (backbone,) = suite.backbones
    assert backbone.spec == "effnet-lite0" and backbone.methods == ("recast", "linear", "lora")
    assert suite.tasks[0].data == "builtin:mnist" and suite.max_train_images == 100
    assert suite.train["epochs"] == 2
    with_full = demo_suite(DemoSettings(full=True))
    assert with_full.backbones[0].methods[-1] == "full"
    quick, slow = (estimate_seconds(DemoSettings(image_size=s), demo_tasks(), ("recast", "linear", "lora"))
                   for s in (64, 128))
    assert 0 < quick < slow < 15 * 60
    assert estimate_seconds(DemoSettings(), demo_tasks(), ("recast", "linear", "lora")) < 10 * 60
