"""Running a suite: one run per (method, backbone, seed), one result file per run, then the report.

A run learns the suite's tasks in order with one method on one backbone and writes
``runs/<method>__<backbone>__<seed>.json``: the record of :func:`recast.train.run_record` (the
same one ``recast train --sequence`` writes); :mod:`recast.bench.report` then makes
``RESULTS.md`` and the plots from those files alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from recast.bench.report import write_report
from recast.bench.suites import Run, Suite, method_name
from recast.io import atomic_write_json
from recast.methods import build_method
from recast.train import (
    SequenceTask,
    TrainConfig,
    learn_sequence,
    open_task,
    run_record,
    set_image_size,
    task_meta,
)


def run_config(suite: Suite, run: Run, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The training options of one run: the suite's, then ``overrides``, with the run's seed."""
    return TrainConfig.from_dict({**suite.train, **(overrides or {}), "seed": run.seed})


def load_base(run: Run, config: TrainConfig) -> nn.Module:
    """The run's pretrained backbone at the run's input size."""
    return set_image_size(run.backbone.load(), config.image_size)


def open_tasks(suite: Suite, base: nn.Module, seed: int, config: TrainConfig) -> list[SequenceTask]:
    """Every task's splits with the backbone's own transforms (splits and subsample seeded with ``seed``)."""
    return [open_task(task, base, config, data_seed=seed, max_train_images=suite.max_train_images)
            for task in suite.tasks]


def run_one(
    suite: Suite, run: Run, out: Path, progress: bool = False, log: Callable[[str], None] = print,
    *, options: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Learn the suite's tasks with one method on one backbone; write and return the run record.

    ``options`` are added to the method's options of the suite (e.g. learning rates), ``overrides``
    to its training options; ``extra`` fields go into the record (e.g. the tuning that chose them).
    """
    config = run_config(suite, run, overrides)
    base = load_base(run, config)
    model = build_method(method_name(run.method), base, **{**run.backbone.options.get(run.method, {}), **(options or {})})
    tasks = open_tasks(suite, base, run.seed, config)
    model_dir = out / "models" / run.file_name.removesuffix(".json")

    def save(model: Any, task: SequenceTask, result: Any) -> int:
        record = model.save_task(model_dir, task.name, task_meta(model, task, result, run.seed))
        log(f"  {run.method} / {run.backbone.key} / {task.name}: test {result.test_accuracy:.3f} "
            f"(val {result.val_accuracy:.3f}), {record['bytes']} bytes")
        return int(record["bytes"])

    model.save_pretrained(model_dir)  # the backbone once; each task file is added as it is learned
    start = time.perf_counter()
    outcome = learn_sequence(model, tasks, config, progress=progress, on_task=save)
    record = run_record(model, outcome, method=run.method, backbone=run.backbone.key, suite=suite.name, config=config,
                        seconds=time.perf_counter() - start, backbone_spec=run.backbone.spec, **(extra or {}))
    atomic_write_json(out / "runs" / run.file_name, record)
    return record


def run_suite(suite: Suite, runs: list[Run], out: str | Path, progress: bool = False, resume: bool = True,
              log: Callable[[str], None] = print) -> Path:
    """Every run (skipping those whose result file exists when ``resume``), then the report."""
    out = Path(out)
    for index, run in enumerate(runs, 1):
        if resume and (out / "runs" / run.file_name).exists():
            log(f"[{index}/{len(runs)}] {run.file_name}: already done, kept")
            continue
        log(f"[{index}/{len(runs)}] {run.method} on {run.backbone.key}, seed {run.seed}")
        run_one(suite, run, out, progress=progress, log=log)
    return write_report(out)
