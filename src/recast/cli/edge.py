"""``recast pack``, ``recast export --onnx`` and ``recast edge-bench``: tasks for devices.

- ``pack``: one task as a compact task file (fp16, or int8 head with per-row scales; coefficients fp32).
- ``export --onnx``: one ONNX graph for every task plus the task files, or one task's plain graph.
- ``edge-bench``: ONNX Runtime latency, task switch, bytes and packed accuracy, JSON under results/edge/.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import timm

from recast import train
from recast.data import open_data
from recast.data.transforms import data_config, transforms_for
from recast.edge.bench import edge_bench, markdown_table, size_comparison
from recast.edge.export import check_export, export_onnx
from recast.edge.pack import packed_task_blob, write_packed_task
from recast.errors import ConfigError
from recast.io import atomic_write_json
from recast.model import RecastModel


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``pack``, ``export`` and ``edge-bench`` subcommands."""
    _register_pack(subparsers)
    _register_export(subparsers)
    _register_bench(subparsers)


def _register_pack(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pack", help="write one task as a compact task file (fp16 or int8)",
        description="Write task NAME of model directory DIR as one safetensors task file with its tensors in "
        "fp16, or int8 with one scale per row for 2-D tensors (the head; each scale chosen for the least "
        "rounding error) and fp16 for the rest (biases). The coefficients stay fp32 in every dtype: a few "
        "hundred bytes at most, and their rounding would move every generated weight. The file keeps the task file's metadata (format, version, backbone "
        "fingerprint, task) and adds its dtype; devices and recast dequantise it to float32 on load.",
    )
    parser.add_argument("directory", metavar="DIR", help="the model directory")
    parser.add_argument("--task", required=True, help="the task to pack")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "int8"), required=True)
    parser.add_argument("--out", type=Path, required=True, metavar="FILE", help="the task file to write (.safetensors)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=_cmd_pack)


def _register_export(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export", help="export to ONNX: one graph for every task, or one task's plain graph",
        description="Write OUT_DIR with graph.onnx, manifest.json (sha256 of every file) and, without --task, "
        "tasks/<name>.safetensors: the graph takes images (any batch size), the task's packed "
        "coefficients and its head as inputs and composes the generated weights from the templates it "
        "stores, so one graph runs every task. With --task NAME: that task's plain graph (images in, "
        "logits out). Both pass onnx.checker; --check compares ONNX Runtime with PyTorch.",
    )
    parser.add_argument("directory", metavar="DIR", help="the model directory")
    parser.add_argument("--onnx", type=Path, required=True, metavar="OUT_DIR", help="the folder to write")
    parser.add_argument("--task", help="export only this task's plain graph")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "int8"), default="fp32", help="task files' dtype (default: %(default)s)")
    parser.add_argument("--compose", choices=("per-call", "at-switch", "at-load"), default="per-call",
                        help="compose the generated weights inside every call of the graph, once per task load "
                        "with a small compose.onnx and feed them, or once per task load into a session of the task's "
                        "own whose weights are constants (fastest for CNNs) (default: %(default)s; recast edge-bench "
                        "measures all three)")
    parser.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), help="image size (default: the model's)")
    parser.add_argument("--check", action="store_true", help="compare ONNX Runtime logits with PyTorch's for every task")
    parser.add_argument("--json", action="store_true", help="print the manifest (and check) as JSON")
    parser.set_defaults(func=_cmd_export)


BENCH_DESCRIPTION = (
    "In one run on this CPU: latency of the task-generic ONNX graph, the plain exported graph and the PyTorch "
    "eval forward (medians of interleaved repeats), the task switch in ONNX Runtime, graph and task file bytes, "
    "and with --data each task's accuracy in fp32, fp16 and int8. With --sizes, also the bytes of a RECAST-Att "
    "ViT-S 10-class task file against a PEFT LoRA r=8 adapter with its head."
)


def _register_bench(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "edge-bench", help="measure ONNX Runtime latency, task switch, bytes and packed accuracy (= bench --edge)",
        description=BENCH_DESCRIPTION,
    )
    add_bench_arguments(parser)


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``recast edge-bench`` (also ``recast bench --edge``)."""
    parser.add_argument("directory", metavar="DIR", help="the model directory")
    parser.add_argument("--tasks", nargs="+", help="tasks to measure (default: every task)")
    parser.add_argument("--data", nargs="+", default=[], metavar="TASK=SPEC", help="test data per task, e.g. mnist=builtin:mnist")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=20, help="interleaved rounds per batch size (default: %(default)s)")
    parser.add_argument("--threads", type=int, help="threads for ONNX Runtime and PyTorch alike (default: every core)")
    parser.add_argument("--sizes", action="store_true", help="add the ViT-S task file vs LoRA byte comparison")
    parser.add_argument("--out", type=Path, help="JSON file (default: results/edge/<DIR name>.json)")
    parser.set_defaults(func=run_bench)


def _load(directory: str) -> Any:
    """A RECAST model directory; baselines (no templates) have no task-generic graph or packed files."""
    model = train.load_model(directory)
    if not isinstance(model, RecastModel):
        raise ConfigError(f"{directory} holds a {type(model).__name__} baseline; pack and export work on RECAST models")
    sizes = {train.recorded_image_size(model, task) for task in model.tasks} - {None}
    if len(sizes) == 1:  # the tasks were trained at another input size than the backbone's own
        train.set_image_size(model.net, sizes.pop())
    return model


def _cmd_pack(args: argparse.Namespace) -> int:
    model = _load(args.directory)
    model.require_task(args.task)
    written = write_packed_task(model, args.task, args.dtype, args.out)
    written["fp32_bytes"] = len(packed_task_blob(model, args.task, "fp32"))
    if args.json:
        print(json.dumps(written, indent=2, sort_keys=True))
    else:
        print(f"wrote {args.out}: task {args.task} in {args.dtype}, {written['bytes']:,} bytes "
              f"(fp32: {written['fp32_bytes']:,})")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    model = _load(args.directory)
    size = (3, *args.input_size) if args.input_size else None
    manifest = export_onnx(model, args.onnx, task=args.task, dtype=args.dtype, input_size=size, compose=args.compose)
    diffs = check_export(model, args.onnx) if args.check else None
    if args.json:
        print(json.dumps({"manifest": manifest, "max_abs_diff": diffs}, indent=2, sort_keys=True))
        return 0
    graph = manifest["files"][manifest["graph"]]["bytes"]
    print(f"wrote {args.onnx}: {manifest['kind']} graph ({graph:,} bytes), tasks: {', '.join(manifest['tasks'])}")
    for name, reason in manifest["skipped"].items():
        print(f"skipped task {name}: {reason}")
    for name, diff in (diffs or {}).items():
        print(f"task {name}: ONNX Runtime vs PyTorch max abs difference {diff:.2e}")
    return 0


def run_bench(args: argparse.Namespace) -> int:
    """Run the edge benchmark with parsed ``edge-bench`` arguments."""
    model = _load(args.directory)
    datasets = _datasets(model, args.data)
    out = args.out or Path("results", "edge", f"{Path(args.directory).resolve().name}.json")
    result = edge_bench(model, tasks=args.tasks, batch_sizes=tuple(args.batch_sizes), repeats=args.repeats,
                        threads=args.threads, datasets=datasets)
    result["model"] = args.directory
    if args.sizes:
        result["sizes"] = size_comparison(timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=10))
    atomic_write_json(out, result)
    print(json.dumps(result, indent=2, sort_keys=True))
    print(markdown_table(result))
    print(f"wrote {out}")
    return 0


def _datasets(model: Any, pairs: list[str]) -> dict[str, Any]:
    """``TASK=SPEC`` pairs opened as each task's test split with the model's evaluation transform."""
    datasets = {}
    for pair in pairs:
        task, sep, spec = pair.partition("=")
        if not sep or task not in model.tasks:
            raise ConfigError(f"--data {pair!r}: write TASK=SPEC with one of the tasks: {', '.join(model.tasks)}")
        transform = transforms_for(model.net, train=False)
        splits = open_data(spec, train_transform=transform, eval_transform=transform,
                           input_shape=tuple(data_config(model.net)["input_size"]))
        train.check_classes(model, task, splits.classes)
        datasets[task] = splits.test
    return datasets
