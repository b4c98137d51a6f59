"""The edge benchmark: ONNX Runtime latency, task switch, bytes and packed accuracy, in one run.

:func:`edge_bench` exports a model twice (the task-generic graph and one task's plain graph) and
measures, on this CPU with the same thread count for every contestant:

- latency of the task-generic graph in every compose mode (``per-call``: composed inside every
  call; ``at-switch``: composed once per task load and fed; ``at-load``: composed once per task load
  into a session of the task's own), the plain graph (all ONNX Runtime) and the PyTorch eval
  forward, per batch size, as medians. The ONNX Runtime graphs run interleaved (each in turn, so
  drifts in machine load hit all alike), each turn one untimed call then one timed call: the
  untimed call wakes the session's threads, which the other sessions' calls left idle. A timed
  sample repeats the call for at least 20 ms, and each ratio to the plain graph is the median of
  the per-round ratios, with their interquartile range (``iqr``). PyTorch
  runs in a block of its own after them: its OpenMP threads keep spinning after a call and would
  slow whichever session ran next;
- the task switch in ONNX Runtime, per compose mode: loading a delivered task file (parse, checks,
  dequantise, the compose graph when composing at switch or load, and the task's session when
  composing at load) and the extra time of the first run on another loaded task over a run on the
  same task (both medians);
- the bytes of both graphs and of every task file in every packed dtype;
- with datasets: every task's test accuracy after a round trip through each packed dtype.

:func:`size_comparison` gives the bytes of a RECAST-Att ViT-S task file (int8 head) against a PEFT
LoRA r=8 adapter (``get_peft_model_state_dict`` saved with safetensors) plus its head.
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import nn

from recast.config import RecastConfig
from recast.edge.device import EdgeRunner
from recast.edge.export import COMPOSE_MODES, export_onnx
from recast.edge.pack import packed_accuracy, packed_task_blob
from recast.format.quantize import DTYPES
from recast.io import atomic_write_json
from recast.model import RecastModel

MIN_SAMPLE_S = 0.02  # each timed sample of a latency lasts at least this long (see _interleaved)


def edge_bench(
    model: RecastModel,
    *,
    tasks: list[str] | None = None,
    batch_sizes: tuple[int, ...] = (1, 8),
    repeats: int = 20,
    threads: int | None = None,
    datasets: dict[str, Any] | None = None,
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Measure ``model`` at the edge (see the module docstring); writes JSON to ``out`` when given.

    ``tasks`` (default: every task) are the tasks measured; ``datasets`` maps task names to test
    datasets for the packed-accuracy table. ``threads`` (default: every core) is used by ONNX
    Runtime and by PyTorch alike.
    """
    tasks = list(tasks or model.tasks)
    threads = threads or os.cpu_count() or 1
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            runners = {}
            for mode in COMPOSE_MODES:
                export_onnx(model, Path(tmp, mode), compose=mode)
                runners[mode] = EdgeRunner(Path(tmp, mode), threads)
            export_onnx(model, Path(tmp, "plain"), task=tasks[0])
            plain = EdgeRunner(Path(tmp, "plain"), threads)
            result: dict[str, Any] = {
                "threads": threads, "repeats": repeats, "tasks": tasks,
                "latency": {str(b): _latency(model, runners, plain, tasks[0], b, repeats) for b in batch_sizes},
                "switch": {mode: _switch(model, runner, repeats) for mode, runner in runners.items()},
                "bytes": {
                    **{f"graphs_{mode}": _graph_bytes(Path(tmp, mode)) for mode in COMPOSE_MODES},
                    "graph_plain": _graph_bytes(Path(tmp, "plain")),
                    "task_files": {t: {d: len(packed_task_blob(model, t, d)) for d in DTYPES} for t in tasks},
                },
            }
    finally:
        torch.set_num_threads(previous_threads)
    if datasets:
        result["accuracy"] = {t: packed_accuracy(model, t, datasets[t]) for t in tasks if t in datasets}
    if out is not None:
        atomic_write_json(out, result)
    return result


def _graph_bytes(directory: Path) -> int:
    """Bytes of the ONNX graphs in an exported directory (graph, and compose graph when there is one)."""
    return sum(p.stat().st_size for p in directory.glob("*.onnx"))


def _latency(
    model: RecastModel, runners: dict[str, EdgeRunner], plain: EdgeRunner, task: str, batch: int, repeats: int
) -> dict[str, Any]:
    """Median seconds per call of every contestant at one batch size, interleaved, and ratios to the plain graph."""
    size = plain.manifest["input_size"]
    images = np.random.default_rng(0).standard_normal((batch, *size), dtype=np.float32)
    tensor = torch.from_numpy(images)
    model.eval().set_task(task)

    def torch_forward() -> None:
        with torch.no_grad():
            model(tensor)

    calls: dict[str, Callable[[], Any]] = {
        f"onnx_compose_{mode.replace('-', '_')}": _bound(runner, images, runner.task(task)) for mode, runner in runners.items()
    }
    calls["onnx_plain"] = lambda: plain.run(images)
    times = _interleaved(calls, repeats)
    paired = _paired_ratios(times, "onnx_plain")
    times.update(_interleaved({"torch_eval": torch_forward}, repeats))  # apart: ORT's spinning threads would slow torch
    medians = {name: statistics.median(values) for name, values in times.items()}
    over_plain = {f"{name}_over_plain": ratio["median"] for name, ratio in paired.items()}
    over_plain["torch_eval_over_plain"] = medians["torch_eval"] / medians["onnx_plain"]
    spread = {f"{name}_over_plain": ratio["iqr"] for name, ratio in paired.items()}
    return {"median_s": medians, **over_plain, "iqr": spread, "repeats": repeats}


def _bound(runner: EdgeRunner, images: np.ndarray, task: Any) -> Callable[[], Any]:
    """A call of ``runner`` on fixed images and task (a closure per runner, not per loop variable)."""
    return lambda: runner.run(images, task)


def _interleaved(calls: dict[str, Callable[[], Any]], repeats: int, min_sample_s: float = MIN_SAMPLE_S) -> dict[str, list[float]]:
    """Seconds per call of each call over ``repeats`` rounds, after a warm-up; in each round every call
    has its turn: one untimed call (waking its threads), then one timed sample.

    A sample repeats the call enough times to last about ``min_sample_s`` (counted once, from the
    warm-up): a graph that runs in a millisecond is otherwise timed at the clock's and the
    scheduler's resolution, and its ratios move by 20% between runs.
    """
    loops = {name: _loops_for(call, min_sample_s) for name, call in calls.items()}
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            call()
            start = time.perf_counter()
            for _ in range(loops[name]):
                call()
            times[name].append((time.perf_counter() - start) / loops[name])
    return times


def _loops_for(call: Callable[[], Any], min_sample_s: float) -> int:
    """How many calls make one timed sample of at least ``min_sample_s`` (after one warm-up call)."""
    call()
    start = time.perf_counter()
    call()
    once = time.perf_counter() - start
    return max(1, math.ceil(min_sample_s / max(once, 1e-6)))


def _paired_ratios(times: dict[str, list[float]], reference: str) -> dict[str, dict[str, float]]:
    """Per contestant, the median and interquartile range of its per-round ratio to ``reference``
    (the rounds are interleaved, so a slow moment of the machine hits both sides of a pair)."""
    out = {}
    for name, values in times.items():
        if name == reference:
            continue
        ratios = sorted(a / b for a, b in zip(values, times[reference], strict=True))
        q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else (ratios[0],) * 3
        out[name] = {"median": statistics.median(ratios), "iqr": [q1, q3]}
    return out


def _switch(model: RecastModel, runner: EdgeRunner, repeats: int) -> dict[str, Any]:
    """Task switch in ONNX Runtime over every task the graph serves: loading a task file, and the first
    run on another loaded task over a run on the same one (batch 1)."""
    tasks = runner.task_names
    blobs = {t: packed_task_blob(model, t, "int8") for t in tasks}
    loads = []
    for i in range(repeats):
        data = blobs[tasks[i % len(tasks)]]
        start = time.perf_counter()
        runner.load_task(data)
        loads.append(time.perf_counter() - start)
    images = np.random.default_rng(1).standard_normal((1, *runner.manifest["input_size"]), dtype=np.float32)
    loaded = [runner.task(t) for t in tasks]
    same, other = [], []
    runner.run(images, loaded[0])
    for i in range(repeats):
        for sink, task in ((same, loaded[i % len(loaded)]), (other, loaded[(i + 1) % len(loaded)])):
            start = time.perf_counter()
            runner.run(images, task)
            sink.append(time.perf_counter() - start)
    return {
        "load_task_file_s": statistics.median(loads),
        "run_same_task_s": statistics.median(same),
        "run_after_switch_s": statistics.median(other),
        "switch_overhead_s": max(0.0, statistics.median(other) - statistics.median(same)),
        "note": "loading reads, checks and dequantises the file (composes the weights when composing at switch "
                "or load, and builds the task's session when composing at load); switching between loaded tasks "
                "is feeding other arrays (and, composing at load, running the task's own session); nothing is re-exported",
    }


def size_comparison(
    base: nn.Module, num_classes: int = 10, rank: int = 8, config: RecastConfig | None = None
) -> dict[str, Any]:
    """Bytes of a RECAST-Att task file (fp32, fp16, int8) vs a PEFT LoRA adapter on ``qkv`` with its head.

    ``base`` is a timm ViT (ViT-S for the figure in the issue; weights do not change any size);
    ``config`` defaults to RECAST-Att with the default groups.
    """
    model = RecastModel.from_base(base, config or RecastConfig(target="att"))
    model.add_task("task", num_classes)
    recast_bytes = {d: len(packed_task_blob(model, "task", d)) for d in DTYPES}
    plain = model.export("task")  # the base architecture with a num_classes head, as LoRA would use it
    # Deferred: PEFT (and the transformers it loads, about a second) is needed by this comparison
    # only, not by every command whose module imports the edge benchmark.
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["qkv"], modules_to_save=[model.head_name])
    state = get_peft_model_state_dict(get_peft_model(plain, config))
    lora_bytes = len(safetensors.torch.save({k: v.contiguous() for k, v in state.items()}))
    return {
        "num_classes": num_classes, "lora_rank": rank, "lora_tensors": len(state),
        "recast_att_task_file_bytes": recast_bytes,
        "lora_adapter_with_head_bytes": lora_bytes,
        "lora_over_recast_int8": lora_bytes / recast_bytes["int8"],
    }


def markdown_table(result: dict[str, Any]) -> str:
    """The latency, switch, bytes and accuracy of an :func:`edge_bench` result as Markdown tables."""
    modes = [key.removeprefix("onnx_compose_") for key in next(iter(result["latency"].values()))["median_s"]
             if key.startswith("onnx_compose_")]
    lines = ["| batch | " + " | ".join(f"ONNX, compose {m.replace('_', ' ')}" for m in modes) + " | ONNX plain | PyTorch eval | "
             + " | ".join(f"{m.replace('_', ' ')} / plain" for m in modes) + " |",
             "|---:|" + "---:|" * (2 * len(modes) + 2)]
    for batch, row in result["latency"].items():
        m = row["median_s"]
        times = [m[f"onnx_compose_{k}"] for k in modes] + [m["onnx_plain"], m["torch_eval"]]
        ratios = [row[f"onnx_compose_{k}_over_plain"] for k in modes]
        lines.append(f"| {batch} | " + " | ".join(f"{1000 * t:.2f} ms" for t in times) + " | "
                     + " | ".join(f"{r:.2f}" for r in ratios) + " |")
    lines += ["", "| compose | load a task file | first run after a switch, over a run on the same task |", "|---|---:|---:|"]
    for mode, row in result["switch"].items():
        lines.append(f"| {mode} | {1000 * row['load_task_file_s']:.3f} ms | {1000 * row['switch_overhead_s']:.3f} ms |")
    lines += ["", "| task | fp32 | fp16 | int8 |", "|---|---:|---:|---:|"]
    accuracy = result.get("accuracy", {})
    for task, sizes in result["bytes"]["task_files"].items():
        cells = []
        for dtype in DTYPES:
            text = f"{sizes[dtype]:,} B"
            if task in accuracy:
                text += f", acc {accuracy[task][dtype]['accuracy']:.4f}"
            cells.append(text)
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
