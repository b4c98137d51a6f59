"""Running a suite: one run per (method, backbone, seed), one result file per run, then the report.

A run learns the suite's tasks in order with one method on one backbone and writes
``runs/<method>__<backbone>__<seed>.json``: the record of :func:`recast.train.run_record` (the
same one ``recast train --sequence`` writes); :mod:`recast.bench.report` then makes
``RESULTS.md`` and the plots from those files alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from recast.bench.report import write_report
from recast.bench.suites import Run, Suite, load_base, method_name, open_tasks, run_config
from recast.bench.tuning import seeds_label, tune, tuning_seeds
from recast.distributed import DistContext
from recast.io import atomic_write_json, read_json
from recast.methods import build_method
from recast.train import (
    SequenceTask,
    is_model_directory,
    learn_sequence,
    load_model,
    remove_checkpoint,
    run_record,
    task_meta,
)


def run_one(
    suite: Suite, run: Run, out: Path, progress: bool = False, log: Callable[[str], None] = print,
    *, options: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None, resume: bool = False, device: str = "cpu",
) -> dict[str, Any]:
    """Learn the suite's tasks with one method on one backbone; write and return the run record.

    ``options`` are added to the method's options of the suite (e.g. learning rates), ``overrides``
    to its training options; ``extra`` fields go into the record (e.g. the tuning that chose them).
    Progress is kept in ``out/state/<run>/`` until the record is written; with ``resume`` an
    interrupted run continues from its last finished task and epoch (its model directory holds
    the finished tasks). ``device`` is where training and evaluation run (``cpu``, ``cuda``, ...).
    """
    config = run_config(suite, run, overrides)
    base = load_base(run, config)
    model_dir = out / "models" / run.file_name.removesuffix(".json")
    state = out / "state" / run.file_name.removesuffix(".json")
    if resume and state.is_dir() and is_model_directory(model_dir):
        log(f"  {run.method} / {run.backbone.key}: resuming the interrupted run from {state}")
        model = load_model(model_dir, image_size=config.image_size)
    else:
        remove_checkpoint(state)
        model = build_method(method_name(run.method), base,
                             **{**run.backbone.options.get(run.method, {}), **(options or {})})
        model.save_pretrained(model_dir)  # the backbone once; each task file is added as it is learned
    tasks = open_tasks(suite, base, run.seed, config)

    def save(model: Any, task: SequenceTask, result: Any) -> int:
        record = model.save_task(model_dir, task.name, task_meta(model, task, result, run.seed))
        log(f"  {run.method} / {run.backbone.key} / {task.name}: test {result.test_accuracy:.3f} "
            f"(val {result.val_accuracy:.3f}), {record['bytes']} bytes")
        return int(record["bytes"])

    start = time.perf_counter()
    outcome = learn_sequence(model, tasks, config, dist=DistContext(device=device), progress=progress, on_task=save,
                             state_dir=state, resume=resume)
    record = run_record(model, outcome, method=run.method, backbone=run.backbone.key, suite=suite.name, config=config,
                        seconds=time.perf_counter() - start, backbone_spec=run.backbone.spec, device=device_label(device),
                        **(extra or {}))
    atomic_write_json(out / "runs" / run.file_name, record)
    remove_checkpoint(state)
    return record


def _trained_with(path: Path, tuning: dict[str, Any] | None) -> bool:
    """Whether the finished run at ``path`` used the learning rates ``tuning`` chose."""
    record = read_json(path)
    earlier = record.get("tuning") if isinstance(record, dict) else None
    return tuning is None or (isinstance(earlier, dict) and earlier.get("chosen") == tuning["chosen"])


def device_label(device: str) -> str:
    """What a run file records as its device: ``cpu``, or the GPU's name (e.g. ``cuda (NVIDIA H200)``)."""
    if device == "cpu":
        return "cpu"
    return f"{device} ({torch.cuda.get_device_name(device)})"


def run_suite(
    suite: Suite, runs: list[Run], out: str | Path, progress: bool = False, resume: bool = True,
    log: Callable[[str], None] = print, *, tune_lrs: bool = False, grid: Mapping[str, Sequence[float]] | None = None,
    device: str = "cpu", tune_seeds: int = 1,
) -> Path:
    """Every run (skipping those whose result file exists when ``resume``), then the report.

    Under ``tune_lrs`` a finished run is kept only when it used the learning rates chosen now: a
    widened grid that chooses other rates reruns it.

    With ``tune_lrs`` each (method, backbone) first has its learning rates chosen from ``grid``
    by validation accuracy on the suite's first seed (by the mean over its first ``tune_seeds``),
    also when only later seeds run (:mod:`recast.bench.tuning`); its runs then use them.
    """
    tune_on = tuning_seeds(suite, tune_seeds)
    out = Path(out)
    chosen: dict[tuple[str, str], dict[str, Any]] = {}
    for index, run in enumerate(runs, 1):
        key = (run.method, run.backbone.key)
        done = out / "runs" / run.file_name
        if resume and done.exists() and not tune_lrs:
            log(f"[{index}/{len(runs)}] {run.file_name}: already done, kept")
            continue
        if tune_lrs and key not in chosen:
            first = Run(run.method, run.backbone, suite.seeds[0])  # the suite's first seed, even with --seeds
            log(f"tuning {run.method} on {run.backbone.key}: learning rates by validation accuracy, "
                f"{seeds_label(tune_on)}")
            chosen[key] = tune(suite, first, out, grid=grid, resume=resume, log=log, device=device, seeds=tune_on)
        tuning = chosen.get(key)
        if resume and done.exists():
            if _trained_with(done, tuning):
                log(f"[{index}/{len(runs)}] {run.file_name}: already done with these learning rates, kept")
                continue
            log(f"[{index}/{len(runs)}] {run.file_name}: done with other learning rates than {tuning['chosen']}, rerun")
        log(f"[{index}/{len(runs)}] {run.method} on {run.backbone.key}, seed {run.seed}"
            + (f", learning rates {tuning['chosen']}" if tuning else ""))
        run_one(suite, run, out, progress=progress, log=log, options=tuning["options"] if tuning else None,
                extra={"tuning": tuning} if tuning else None, resume=resume, device=device)
    return write_report(out)
