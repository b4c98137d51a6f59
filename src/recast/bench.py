"""The comparison harness: suites of tasks, one run per (method, backbone, seed), result files.

A run learns a suite's tasks in order with one method on one backbone and writes
``runs/<method>__<backbone>__<seed>.json`` (DESIGN.md's result fields plus the accuracy matrix);
``recast.report`` then makes ``RESULTS.md`` and the plots from those files alone.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recast.errors import ConfigError
from recast.io import atomic_write_json

PAPER_SEEDS = (42, 1998, 3142592)


@dataclass(frozen=True)
class BenchTask:
    """One task of a suite: a name and a data spec (``builtin:mnist``, ``torchvision:Flowers102:ROOT``)."""

    name: str
    data: str
    hflip: float = 0.5  # 0 where mirroring changes the class (digits, characters)


@dataclass(frozen=True)
class BenchBackbone:
    """A backbone of a suite, the methods run on it, and per-method options (e.g. RECAST's target)."""

    key: str
    spec: str
    methods: tuple[str, ...]
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    loader: Callable[[], Any] | None = None  # builds the base instead of ``load_backbone(spec)``

    def load(self) -> Any:
        """The pretrained base model."""
        from recast.backbones import load_backbone

        return self.loader() if self.loader is not None else load_backbone(self.spec)


@dataclass(frozen=True)
class Suite:
    """Tasks, backbones and training settings of one comparison."""

    name: str
    tasks: tuple[BenchTask, ...]
    backbones: tuple[BenchBackbone, ...]
    train: dict[str, Any]
    seeds: tuple[int, ...] = PAPER_SEEDS
    max_train_images: int | None = None  # subsample each task's training split (quick runs)


def _vit_methods(coefs: str) -> dict[str, dict[str, Any]]:
    """RECAST variants of a 6-block ViT: 3 groups of 2 blocks, 2 templates, 2 coefficient sets."""
    shared = {"groups": 3, "templates": 2, "coef_sets": 2}
    return {f"recast:{t}": {"target": t, **shared} for t in coefs.split(",")}


def offline_suite(quick: bool = False) -> Suite:
    """Built-in datasets on the shipped 32-px ViT and ResNet, plus EfficientNet-Lite0 (ImageNet).

    ``quick`` keeps the task list but trains for a few hundred steps on a subsample, one seed.
    """
    tasks = (
        BenchTask("mnist", "builtin:mnist", hflip=0.0),
        BenchTask("emoji-google", "builtin:emoji-google"),
        BenchTask("chars", "builtin:chars", hflip=0.0),
        BenchTask("optdigits", "builtin:optdigits", hflip=0.0),
        BenchTask("emoji-twitter", "builtin:emoji-twitter"),
        BenchTask("faces", "builtin:faces"),
    )
    vit_options = _vit_methods("att,mlp,att+mlp")
    if quick:  # the comparisons the issue asks about, within about 15 minutes on 2 CPU cores
        vit_methods: tuple[str, ...] = ("recast:att", "recast:att+mlp", "linear", "lora", "melo", "recast+melo",
                                        "adaptformer", "recast+adaptformer")
        resnet_methods: tuple[str, ...] = ("recast", "linear", "clr", "recast+clr")
        effnet_methods: tuple[str, ...] = ()  # 224 px: about 45 s an epoch here even for a linear probe
    else:
        vit_methods = (*vit_options, "linear", "lora", "vera", "melo", "recast+melo", "adaptformer",
                       "recast+adaptformer", "full")
        resnet_methods = ("recast", "linear", "clr", "recast+clr", "piggyback", "recast+piggyback", "full")
        effnet_methods = ("linear", "piggyback", "full")
    backbones = (
        BenchBackbone("vit32", "recast-vit32", vit_methods, vit_options),
        BenchBackbone("resnet32", "recast-resnet32", resnet_methods),
        *([BenchBackbone("effnet-lite0", "effnet-lite0", effnet_methods)] if effnet_methods else []),
    )
    train = {"epochs": 4, "step_size": 3, "batch_size": 64, "lr": 2e-3} if quick else \
        {"epochs": 15, "step_size": 10, "batch_size": 128, "lr": 2e-3}
    return Suite("offline-quick" if quick else "offline", tasks, backbones, train,
                 seeds=(42,) if quick else PAPER_SEEDS, max_train_images=1000 if quick else None)


def paper_suite(data_root: str | Path) -> Suite:
    """The paper's protocol: ViT-S/16 and ResNet-34 with hub weights, six datasets, 224 px, 100 epochs.

    ``data_root`` holds the torchvision roots (``DATA_ROOT/flowers102`` ...) or image folders.
    """
    root = Path(data_root)
    tasks = (
        BenchTask("cars", f"torchvision:StanfordCars:{root / 'stanford_cars'}"),
        BenchTask("aircraft", f"torchvision:FGVCAircraft:{root / 'fgvc_aircraft'}"),
        BenchTask("flowers", f"torchvision:Flowers102:{root / 'flowers102'}"),
        BenchTask("scenes", f"imagefolder:{root / 'mit67'}"),
        BenchTask("chars74k", f"imagefolder:{root / 'chars74k'}", hflip=0.0),
        BenchTask("cifar100", f"torchvision:CIFAR100:{root / 'cifar100'}"),
    )
    vit_methods = ("recast", "recast:mlp", "recast:att+mlp", "linear", "lora", "vera", "melo", "recast+melo",
                   "adaptformer", "recast+adaptformer", "full")
    options = {"recast:mlp": {"target": "mlp"}, "recast:att+mlp": {"target": "att+mlp"}}
    backbones = (
        BenchBackbone("vit_small", "timm:vit_small_patch16_224", vit_methods, options),
        BenchBackbone("resnet34", "timm:resnet34", ("recast", "linear", "clr", "recast+clr", "piggyback",
                                                    "recast+piggyback", "full")),
    )
    return Suite("paper", tasks, backbones, {"epochs": 100, "step_size": 33, "batch_size": 128, "lr": 2e-3})


def method_name(entry: str) -> str:
    """``recast:att`` -> ``recast`` (the registry name); plain names stay."""
    return entry.split(":", 1)[0]


@dataclass(frozen=True)
class Run:
    """One (method entry, backbone, seed) of a suite."""

    method: str
    backbone: BenchBackbone
    seed: int

    @property
    def file_name(self) -> str:
        """``runs/`` file name: safe characters only."""
        return re.sub(r"[^A-Za-z0-9_.+-]", "-", f"{self.method}__{self.backbone.key}__{self.seed}") + ".json"


def plan(suite: Suite, methods: list[str] | None = None, seeds: list[int] | None = None,
         backbones: list[str] | None = None) -> list[Run]:
    """Every run of a suite, optionally only some methods (entries or registry names), seeds, backbones."""
    known = {b.key for b in suite.backbones}
    for key in backbones or []:
        if key not in known:
            raise ConfigError(f"unknown backbone {key!r} in suite {suite.name}; choose from {sorted(known)}")
    runs = []
    for backbone in suite.backbones:
        if backbones and backbone.key not in backbones:
            continue
        for entry in backbone.methods:
            if methods and entry not in methods and method_name(entry) not in methods:
                continue
            runs.extend(Run(entry, backbone, seed) for seed in (seeds or suite.seeds))
    if not runs:
        raise ConfigError(f"nothing to run: no method of {methods} runs on the chosen backbones of suite {suite.name}")
    return runs


def missing_data(suite: Suite) -> list[str]:
    """Data specs of the suite whose local roots do not exist (for ``--dry-run``)."""
    missing = []
    for task in suite.tasks:
        kind, _, rest = task.data.partition(":")
        path = rest.rsplit(":", 1)[-1] if kind == "torchvision" else rest
        if kind in ("imagefolder", "csv", "torchvision") and not Path(path).exists():
            missing.append(f"{task.name}: {task.data}")
    return missing


def describe(suite: Suite, runs: list[Run]) -> str:
    """A human-readable plan: tasks, backbones, methods, seeds, training settings, missing data."""
    lines = [f"suite {suite.name}: {len(runs)} runs, tasks in order: " + ", ".join(t.name for t in suite.tasks)]
    for backbone in suite.backbones:
        chosen = sorted({r.method for r in runs if r.backbone.key == backbone.key})
        if chosen:
            lines.append(f"  {backbone.key} ({backbone.spec}): {', '.join(chosen)}")
    lines.append(f"  seeds: {sorted({r.seed for r in runs})}; training: {suite.train}")
    missing = missing_data(suite)
    lines += [f"  MISSING data root -> {m}" for m in missing] or ["  all data roots present"]
    return "\n".join(lines)


def _open_tasks(suite: Suite, base: Any, seed: int) -> list[Any]:
    """Open every task's splits with the backbone's own transforms (split seeded with ``seed``)."""
    from recast.data import open_data
    from recast.data.transforms import data_config, transforms_for
    from recast.train import SequenceTask

    opened = []
    shape = tuple(data_config(base)["input_size"])
    for task in suite.tasks:
        splits = open_data(task.data, seed=seed, train_transform=transforms_for(base, True, hflip=task.hflip),
                           eval_transform=transforms_for(base, False), input_shape=shape)
        train = _subsample(splits.train, suite.max_train_images, seed)
        opened.append(SequenceTask(task.name, task.data, train, splits.val, splits.test, list(splits.classes),
                                   {**splits.split_info, "train_used": len(train)}))
    return opened


def _subsample(dataset: Any, limit: int | None, seed: int) -> Any:
    """A seeded random subset of at most ``limit`` items (the whole dataset when ``limit`` is None)."""
    import torch
    from torch.utils.data import Subset

    if limit is None or len(dataset) <= limit:
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:limit]
    return Subset(dataset, order.tolist())


def run_one(suite: Suite, run: Run, out: Path, progress: bool = False,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Learn the suite's tasks with one method on one backbone; write and return the run record."""
    from recast.methods import build_method
    from recast.train import TrainConfig, learn_sequence, versions

    base = run.backbone.load()
    options = dict(run.backbone.options.get(run.method, {}))
    model = build_method(method_name(run.method), base, **options)
    tasks = _open_tasks(suite, base, run.seed)
    config = TrainConfig.from_dict({**suite.train, "seed": run.seed})
    model_dir = out / "models" / run.file_name.removesuffix(".json")

    def save(model: Any, task: Any, result: Any) -> int:
        record = model.save_task(model_dir, task.name, {"seed": run.seed, "method": run.method, **result.to_meta()})
        log(f"  {run.method} / {run.backbone.key} / {task.name}: test {result.test_accuracy:.3f} "
            f"(val {result.val_accuracy:.3f}), {record['bytes']} bytes")
        return int(record["bytes"])

    model.save_pretrained(model_dir)  # the backbone once; each task file is added as it is learned
    start = time.perf_counter()
    outcome = learn_sequence(model, tasks, config, progress=progress, on_task=save)
    record = {"method": run.method, "backbone": run.backbone.key, "backbone_spec": run.backbone.spec,
              "suite": suite.name, "seed": run.seed, "method_options": options, "train_config": config.to_dict(),
              "seconds": time.perf_counter() - start, "versions": versions(), **outcome}
    atomic_write_json(out / "runs" / run.file_name, record)
    return record


def run_suite(suite: Suite, runs: list[Run], out: str | Path, progress: bool = False, resume: bool = True,
              log: Callable[[str], None] = print) -> Path:
    """Every run (skipping those whose result file exists when ``resume``), then the report."""
    from recast.report import write_report

    out = Path(out)
    for index, run in enumerate(runs, 1):
        if resume and (out / "runs" / run.file_name).exists():
            log(f"[{index}/{len(runs)}] {run.file_name}: already done, kept")
            continue
        log(f"[{index}/{len(runs)}] {run.method} on {run.backbone.key}, seed {run.seed}")
        run_one(suite, run, out, progress=progress, log=log)
    return write_report(out)
