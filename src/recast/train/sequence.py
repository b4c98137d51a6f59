"""Learning tasks one after another: the accuracy matrix, the run record, resumable progress.

:func:`learn_sequence` learns a list of opened tasks in order and, after each, measures every task
learned so far on its test split. With a ``state_dir`` it records its progress after each task
(and each task's epoch checkpoints inside it), so that ``resume=True`` continues from the last
finished task, and inside a task from its last epoch, to the same accuracy matrix bit for bit.
:func:`run_record` is the one record of a run that ``recast train --sequence`` and ``recast bench``
both write.
"""

from __future__ import annotations

import platform
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import torchvision
from torch.utils.data import Dataset, Subset

from recast import metrics
from recast.data import open_data
from recast.data.transforms import data_config, transforms_for
from recast.distributed import DistContext
from recast.errors import ConfigError, FileFormatError
from recast.format import check_task_name
from recast.io import atomic_write_json, read_json
from recast.train.checkpoint import has_checkpoint, remove_checkpoint
from recast.train.config import TrainConfig
from recast.train.directory import is_model_directory, load_model
from recast.train.evaluate import evaluate
from recast.train.loop import FitResult, fit_task
from recast.version import __version__

PROGRESS_FILE = "progress.json"
OFFLINE_TASKS: tuple[tuple[str, str, float], ...] = (  # (name, data spec, flip probability), in order
    ("mnist", "builtin:mnist", 0.0),
    ("emoji-google", "builtin:emoji-google", 0.5),
    ("chars", "builtin:chars", 0.0),
    ("optdigits", "builtin:optdigits", 0.0),
    ("emoji-twitter", "builtin:emoji-twitter", 0.5),
    ("faces", "builtin:faces", 0.5),
)


@dataclass(frozen=True)
class SequenceEntry:
    """One task of a sequence before its data is opened: a name, a data spec, a flip probability.

    ``hflip`` is 0 where mirroring changes the class (digits, characters).
    """

    name: str
    data: str
    hflip: float = 0.5


@dataclass
class SequenceTask:
    """One task of a sequence: its name, data spec and opened splits."""

    name: str
    data: str
    train: Dataset
    val: Dataset
    test: Dataset
    classes: list[str]
    split_info: dict[str, Any] = field(default_factory=dict)


def offline_entries() -> list[SequenceEntry]:
    """The built-in offline tasks, in the order ``recast bench`` and ``--sequence offline`` learn them."""
    return [SequenceEntry(*task) for task in OFFLINE_TASKS]


def read_sequence(path: str | Path) -> tuple[str, list[SequenceEntry]]:
    """A suite name (``offline``: the built-in tasks), or a sequence file.

    The file is ``{"name": SUITE, "tasks": [{"name": ..., "data": SPEC}, ...]}`` or just the list;
    an entry may add ``"hflip": 0`` where mirroring changes the class.
    """
    if str(path) == "offline":
        return "offline", offline_entries()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--sequence {path}: no such file or suite; use 'offline' (the built-in tasks) or a JSON "
                          'file listing the tasks ({"name": "my-suite", "tasks": [{"name": "t1", "data": "imagefolder:..."}, ...]})')
    data = read_json(path)
    suite, entries = (data.get("name", path.stem), data.get("tasks")) if isinstance(data, dict) else (path.stem, data)
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: lists no tasks; expected a list of {{\"name\": ..., \"data\": SPEC}}")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not isinstance(entry.get("data"), str):
            raise ConfigError(f"{path}: task {i} needs a string 'name' and a string 'data' spec, got {entry!r}")
        check_task_name(entry["name"])
        hflip = entry.get("hflip", 0.5)
        if isinstance(hflip, bool) or not isinstance(hflip, int | float) or not 0 <= hflip <= 1:
            raise ConfigError(f"{path}: task {i}: 'hflip' must be a probability in [0, 1], got {hflip!r}")
    names = [e["name"] for e in entries]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: task names repeat: {names}")
    return str(suite), [SequenceEntry(e["name"], e["data"], float(e.get("hflip", 0.5))) for e in entries]


def open_task(
    entry: SequenceEntry, net: torch.nn.Module, config: TrainConfig, *, val_fraction: float = 0.1, data_seed: int = 0,
    max_train_images: int | None = None,
) -> SequenceTask:
    """Open ``entry``'s splits with ``net``'s own transforms (its input size, after any ``set_image_size``).

    Both pipelines follow the preset ``config.augment`` names (``reference`` also evaluates with
    the reference's resize and statistics); ``max_train_images`` keeps a random subset (seeded
    with ``data_seed``) of the training split.
    """
    splits = open_data(entry.data, val_fraction=val_fraction, seed=data_seed,
                       train_transform=transforms_for(net, True, augment=config.augment, hflip=entry.hflip, data=entry.data),
                       eval_transform=eval_transform(net, config.augment, entry.data),
                       input_shape=tuple(data_config(net)["input_size"]),
                       skip_bad_images=config.skip_bad_images, max_pixels=config.max_pixels)
    train = subsample(splits.train, max_train_images, data_seed)
    info = {**splits.split_info, **({"train_used": len(train)} if max_train_images is not None else {})}
    return SequenceTask(entry.name, entry.data, train, splits.val, splits.test, list(splits.classes), info)


def eval_transform(net: torch.nn.Module, augment: str, data: str | None = None) -> Any:
    """The evaluation pipeline that matches training under preset ``augment`` (``default`` and ``none`` share one)."""
    return transforms_for(net, False, augment=augment, data=data)


def subsample(dataset: Dataset, limit: int | None, seed: int) -> Dataset:
    """A seeded random subset of at most ``limit`` items (the whole dataset when ``limit`` is None)."""
    if limit is None or len(dataset) <= limit:  # type: ignore[arg-type]
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:limit]  # type: ignore[arg-type]
    return Subset(dataset, order.tolist())


def check_classes(model: Any, task: str, classes: Sequence[str]) -> None:
    """The data must have exactly the task head's classes (same number, and same names where recorded)."""
    info = model.tasks[task]
    if len(classes) != info.num_classes or (info.class_names and list(info.class_names) != list(classes)):
        shown = list(info.class_names)[:10] if info.class_names else f"{info.num_classes} unnamed classes"
        raise ConfigError(
            f"the data has {len(classes)} classes {list(classes)[:10]} but task {task!r} has a head of "
            f"{info.num_classes} classes ({shown}); use the data the task was made for, or a new task name"
        )


def prepare_task(model: Any, name: str, classes: Sequence[str], *, own_bn: bool = False, seed: int = 0) -> None:
    """Add task ``name`` to a model and activate it; an existing task is retrained from scratch.

    An existing task must have the same classes (its head's size and names). The new head's initial
    values come from ``seed``.
    """
    if name in model.tasks:
        check_classes(model, name, classes)
        model.delete_task(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.add_task(name, len(classes), class_names=list(classes), own_bn=own_bn)
    model.set_task(name)


def task_meta(model: Any, task: SequenceTask, result: FitResult, seed: int) -> dict[str, Any]:
    """What a task file records about how the task was learned (the model's own method name)."""
    return {"method": getattr(model, "method", "recast"), "seed": seed, "data": task.data,
            "split_info": task.split_info, **result.to_meta()}


def learn_sequence(
    model: Any, tasks: Sequence[SequenceTask], config: TrainConfig, *, dist: DistContext | None = None,
    own_bn: bool = False, progress: bool = False, on_task: Callable[[Any, SequenceTask, FitResult], int] | None = None,
    state_dir: str | Path | None = None, resume: bool = False,
) -> dict[str, Any]:
    """Learn ``tasks`` one after another; after each, measure every task learned so far on its test split.

    The best epoch of each task is chosen on its validation split; test splits are read only by
    the measurement after each task (a task's ``test_accuracy`` is the matrix's diagonal).
    ``on_task(model, task, result)`` is called after each task is learned and returns its size in
    bytes on disk (e.g. by saving it). With ``state_dir``, the records and matrix rows of the
    finished tasks go to ``state_dir/progress.json`` after each task and each task's epoch
    checkpoints to ``state_dir/epochs/<name>/``; ``resume=True`` skips the finished tasks (which
    ``model`` must already hold, e.g. loaded from where ``on_task`` saved them) and continues the
    interrupted one from its last epoch. Returns ``tasks`` records, the ``accuracy_matrix`` and
    the metrics of :mod:`recast.metrics`.
    """
    dist = dist or DistContext()
    state = Path(state_dir) if state_dir is not None else None
    records, matrix = _read_progress(state, config, tasks, model) if resume and state is not None else ([], [])
    for i, task in enumerate(tasks[len(records):], start=len(records)):
        prepare_task(model, task.name, task.classes, own_bn=own_bn, seed=config.seed)
        checkpoints = state / "epochs" / task.name if state is not None else None
        result = fit_task(model, task.train, task.val, None, config, dist=dist, progress=progress,
                          checkpoint_dir=checkpoints, resume=resume and checkpoints is not None and has_checkpoint(checkpoints))
        row = _test_row(model, tasks[: i + 1], config, dist)  # the test splits, once, after the task is learned
        matrix.append(row + [None] * (len(tasks) - i - 1))
        result.test_accuracy = row[i]
        size = on_task(model, task, result) if on_task is not None else None
        records.append({"name": task.name, "data": task.data, "test_accuracy": result.test_accuracy,
                        "val_accuracy": result.val_accuracy, "best_epoch": result.best_epoch,
                        "params": model.task_parameters(task.name), "bytes": size,
                        "train_seconds": result.train_seconds, "peak_rss_mb": result.peak_rss_mb,
                        "split_info": task.split_info})
        if state is not None and dist.is_main:
            atomic_write_json(state / PROGRESS_FILE, {"format": "recast-sequence-progress", "config": config.to_dict(),
                                                      "tasks": [t.name for t in tasks], "records": records,
                                                      "matrix": matrix})
            remove_checkpoint(checkpoints)  # type: ignore[arg-type]
    return {"tasks": records, "accuracy_matrix": matrix, "average_accuracy": metrics.average_accuracy(matrix),
            "forgetting": metrics.forgetting(matrix), "bwt": metrics.backward_transfer(matrix)}


def _test_row(model: Any, learned: Sequence[SequenceTask], config: TrainConfig, dist: DistContext) -> list[float | None]:
    """Test accuracy of every task learned so far; the last one stays active."""
    row: list[float | None] = []
    for task in learned:
        model.set_task(task.name)
        row.append(evaluate(model, task.test, batch_size=config.eval_batch_size or config.batch_size,
                            precision=config.precision, dist=dist))
    return row


def _read_progress(
    state: Path, config: TrainConfig, tasks: Sequence[SequenceTask], model: Any,
) -> tuple[list[dict[str, Any]], list[list[float | None]]]:
    """The finished tasks' records and matrix rows, checked against this run (none when nothing was saved)."""
    path = state / PROGRESS_FILE
    if not path.is_file():
        return [], []
    progress = read_json(path)
    if not isinstance(progress, dict) or progress.get("format") != "recast-sequence-progress":
        raise FileFormatError(f"{path}: not the progress file of a sequence; remove it or start without --resume")
    if progress.get("config") != config.to_dict() or progress.get("tasks") != [t.name for t in tasks]:
        raise ConfigError(f"{path}: the interrupted run learned other tasks or used other training options; "
                          "resume with the same sequence and options, or start again without --resume")
    records, matrix = list(progress["records"]), [list(row) for row in progress["matrix"]]
    missing = [r["name"] for r in records if r["name"] not in model.tasks]
    if missing:
        raise FileFormatError(f"{path}: finished tasks {missing} are not in the model; start again without --resume")
    return records, matrix


def run_record(
    model: Any, outcome: dict[str, Any], *, method: str, backbone: str | None, suite: str, config: TrainConfig,
    seconds: float, **extra: Any,
) -> dict[str, Any]:
    """The record of one run (a sequence with one method, one backbone, one seed), as result files hold it.

    ``method`` is the name the run is reported under (``recast:att`` in a suite); ``extra`` adds
    fields (``backbone_spec``, ``tuning``). The options come from the model itself, learning rates
    included.
    """
    options = model.recorded_options() if hasattr(model, "recorded_options") else {}
    return {
        "method": method, "backbone": backbone, "suite": suite, "seed": config.seed,
        "model_method": getattr(model, "method", "recast"), "method_options": options,
        "recast_config": model.config.to_dict() if hasattr(model, "config") else None,
        "train_config": config.to_dict(), "image_size": config.image_size, "augment": config.augment,
        "seconds": seconds, "versions": versions(), **extra, **outcome,
    }


def versions() -> dict[str, str]:
    """Versions of the software a result depends on."""
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "recast": __version__}


@dataclass(frozen=True)
class SequenceRun:
    """What ``recast train --sequence`` runs: a suite of tasks into a model directory, once per seed.

    Attributes:
        directory: the model directory; the first seed's tasks are saved into it.
        suite, entries: the suite's name and its tasks in order.
        seeds: one run per seed, mean and std over them.
        out: where the per-seed result files and the summary go.
        backbone: the backbone spec the directory was made from (recorded).
        method: the method asked for (must be the directory's; ``None``: whatever it is).
        resume: continue from the last finished task (and epoch) of an interrupted run.
    """

    directory: Path
    suite: str
    entries: tuple[SequenceEntry, ...]
    seeds: tuple[int, ...]
    out: Path
    backbone: str | None = None
    method: str | None = None
    own_bn: bool = False
    val_fraction: float = 0.1
    data_seed: int = 0
    progress: bool = True
    resume: bool = False


def run_sequence(run: SequenceRun, config: TrainConfig, dist: DistContext | None = None) -> dict[str, Any]:
    """Learn the sequence once per seed; write one result JSON per seed and a summary (main process only).

    Progress is kept under ``DIRECTORY/checkpoints/sequence-<suite>/seed<seed>/`` (seeds after the
    first learn into a copy of the model there) and removed when the seed's result file is written;
    with ``run.resume`` finished seeds are read back from their result files and an interrupted
    seed continues where it stopped.
    """
    dist = dist or DistContext()
    model = load_model(run.directory, method=run.method, image_size=config.image_size)
    method = getattr(model, "method", "recast")
    tasks = [open_task(entry, model.net, config, val_fraction=run.val_fraction, data_seed=run.data_seed)
             for entry in run.entries]
    stem = _file_stem(f"{run.suite}-{method}")
    states = run.directory / "checkpoints" / _file_stem(f"sequence-{run.suite}")
    runs, files = [], []
    for index, seed in enumerate(run.seeds):
        path, state = run.out / f"{stem}-seed{seed}.json", states / f"seed{seed}"
        if run.resume and path.is_file():
            runs.append(read_json(path))
            continue
        if not run.resume and dist.is_main:
            remove_checkpoint(state)
        seeded = config.updated(seed=seed)
        workdir = run.directory if index == 0 else state / "model"
        model = _seed_model(run, workdir, config, dist)
        started = time.perf_counter()
        outcome = learn_sequence(model, tasks, seeded, dist=dist, own_bn=run.own_bn, progress=run.progress,
                                 on_task=_task_saver(workdir, seed, dist), state_dir=state, resume=run.resume)
        record = run_record(model, outcome, method=method, backbone=run.backbone or _backbone_name(model),
                            suite=run.suite, config=seeded, seconds=time.perf_counter() - started)
        runs.append(record)
        if dist.is_main:
            atomic_write_json(path, record)
            files.append(str(path))
            remove_checkpoint(state)
    summary = {key: metrics.mean_std([r[key] for r in runs]) for key in ("average_accuracy", "forgetting", "bwt")}
    summary["tasks"] = {t.name: metrics.mean_std([r["tasks"][i]["test_accuracy"] for r in runs])
                        for i, t in enumerate(tasks)}
    result = {"method": method, "suite": run.suite, "seeds": list(run.seeds), "summary": summary,
              "image_size": config.image_size, "augment": config.augment, "versions": versions()}
    if dist.is_main:
        path = run.out / f"{stem}-summary.json"
        atomic_write_json(path, result)
        files.append(str(path))
    return {**result, "files": files}


def _file_stem(text: str) -> str:
    """``text`` with every character but letters, digits and ``_.+-`` replaced: a safe file name."""
    return re.sub(r"[^A-Za-z0-9_.+-]", "-", text).lstrip(".") or "-"


def _seed_model(run: SequenceRun, workdir: Path, config: TrainConfig, dist: DistContext) -> Any:
    """The model a seed learns into: the directory itself (first seed), else a copy of it kept in ``workdir``."""
    if workdir != run.directory and not (run.resume and is_model_directory(workdir)):
        if dist.is_main:
            remove_checkpoint(workdir)
            load_model(run.directory).save_pretrained(workdir)
        dist.barrier()
    return load_model(workdir, image_size=config.image_size)


def _task_saver(directory: Path, seed: int, dist: DistContext) -> Callable[[Any, SequenceTask, FitResult], int]:
    """``on_task`` for :func:`learn_sequence`: saves the task into ``directory`` and returns its size in bytes."""

    def on_task(model: Any, task: SequenceTask, result: FitResult) -> int:
        meta = task_meta(model, task, result, seed)
        if dist.is_main:
            return int(model.save_task(directory, task.name, meta=meta)["bytes"])
        with tempfile.TemporaryDirectory() as scratch:  # other processes only measure the size
            return int(model.save_task(scratch, task.name, meta=meta)["bytes"])

    return on_task


def _backbone_name(model: Any) -> str | None:
    """The backbone's name as its recipe records it (``None`` when it has none)."""
    recipe = getattr(model, "recipe", None)
    return recipe.get("name") if isinstance(recipe, dict) else None
