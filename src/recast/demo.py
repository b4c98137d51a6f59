"""The embedded default run (``recast demo``, ``make demo``): RECAST against its peers, end to end.

On the shipped 32-px ViT: Neural Mimicry (closed form), four offline tasks learned one after
another with RECAST, linear probing and LoRA (PEFT) under the same training settings, the
results table, the plots, and a few predictions of a saved RECAST task on its test images.
Everything comes from the benchmark harness (``recast.bench``), so the demo's numbers are
measured in the run that prints them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from recast import bench


def demo_suite(train_images: int = 3000, epochs: int = 6) -> bench.Suite:
    """Four built-in tasks whose sources install from PyPI; RECAST-Att+MLP, linear probe, LoRA r=8."""
    tasks = (
        bench.BenchTask("mnist", "builtin:mnist", hflip=0.0),
        bench.BenchTask("chars", "builtin:chars", hflip=0.0),
        bench.BenchTask("optdigits", "builtin:optdigits", hflip=0.0),
        bench.BenchTask("faces", "builtin:faces"),
    )
    options = {"recast:att+mlp": {"target": "att+mlp", "groups": 3, "templates": 2, "coef_sets": 2}}
    backbone = bench.BenchBackbone("vit32", "recast-vit32", ("recast:att+mlp", "linear", "lora"), options)
    train = {"epochs": epochs, "step_size": max(1, epochs - 1), "batch_size": 64, "lr": 2e-3}
    return bench.Suite("demo", tasks, (backbone,), train, seeds=(42,), max_train_images=train_images)


def show_predictions(model_dir: Path, task: bench.BenchTask, base: Any, count: int = 6) -> list[str]:
    """Predicted vs true class of the first ``count`` test images of ``task`` with the saved RECAST model."""
    from recast.data import open_data
    from recast.data.transforms import transforms_for
    from recast.methods import load_method

    model = load_method(model_dir).eval()
    model.set_task(task.name)
    splits = open_data(task.data, seed=42, eval_transform=transforms_for(base, False))
    names = model.tasks[task.name].class_names or [str(i) for i in range(model.tasks[task.name].num_classes)]
    lines = []
    spread = torch.linspace(0, len(splits.test) - 1, min(count, len(splits.test))).long().tolist()  # several classes
    with torch.no_grad():
        for index in spread:
            image, label = splits.test[index]
            predicted = int(model(image[None]).argmax(1))
            mark = "ok " if predicted == label else "MISS"
            lines.append(f"  [{mark}] {task.name} test image {index}: predicted {names[predicted]!r}, true {names[label]!r}")
    return lines


def run_demo(out: str | Path = "runs/demo", suite: bench.Suite | None = None, restart: bool = False) -> Path:
    """Run the demo suite into ``out`` and print the table, predictions and where the files are."""
    out = Path(out)
    suite = suite or demo_suite()
    runs = bench.plan(suite)
    print(bench.describe(suite, runs))
    report = bench.run_suite(suite, runs, out, progress=True, resume=not restart)
    print("\n" + report.read_text().split("\n\n")[2])  # the table
    recast_run = next(r for r in runs if r.method.startswith("recast"))
    model_dir = out / "models" / recast_run.file_name.removesuffix(".json")
    print("A few predictions of the saved RECAST model (task file + shared backbone):")
    print("\n".join(show_predictions(model_dir, suite.tasks[0], recast_run.backbone.load())))
    print(f"\nFiles: results table {report}, plots {out}/*.png, run records {out}/runs/, "
          f"model directories {out}/models/ (try `recast tasks {model_dir}`)")
    return report
