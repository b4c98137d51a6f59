"""The comparisons the harness runs: suites of tasks and backbones, and the plan of runs.

A suite names its tasks in order, its backbones with the methods run on each, and the training
settings (any :class:`~recast.train.TrainConfig` field, ``image_size`` and ``augment`` included);
:func:`plan` lists its runs, one per (method, backbone, seed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn

from recast.adapters.adaptformer import REFERENCE as ADAPTFORMER_REFERENCE
from recast.adapters.piggyback import REFERENCE_LRS as PIGGYBACK_REFERENCE_LRS
from recast.backbones import load_backbone
from recast.bench.report import file_stem
from recast.errors import ConfigError
from recast.train import SequenceTask, TrainConfig, open_task, set_image_size
from recast.train.sequence import SequenceEntry, offline_entries

PAPER_SEEDS = (42, 1998, 3142592)


BenchTask = SequenceEntry  # one task of a suite: a name, a data spec, a flip probability


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
    tasks = tuple(offline_entries())
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


def effnet_suite() -> Suite:
    """The six built-in tasks on EfficientNet-Lite0's ImageNet weights, sized for a 2-core CPU.

    96 px, at most 1,000 training images per task, 10 epochs. ``recast`` is the conv preset (76
    coefficients per task); ``recast:dw`` also generates the depthwise convs (114 coefficients);
    ``recast:dw3`` gives every one of those banks three templates, spare directions where a stage has
    fewer layers (162 coefficients); ``recast:bn`` adds per-task BatchNorm statistics (counted as
    "other").
    """
    methods = ("recast", "recast:dw", "recast:dw3", "recast:bn", "linear", "lora", "full", "clr", "recast+clr", "piggyback",
               "recast+piggyback")
    options = {"recast:dw": {"depthwise": True}, "recast:dw3": {"depthwise": True, "templates": 3},
               "recast:bn": {"own_bn": True}}
    backbone = BenchBackbone("effnet-lite0", "effnet-lite0", methods, options)
    train = {"epochs": 10, "step_size": 7, "batch_size": 64, "lr": 2e-3, "image_size": 96}
    return Suite("effnet", tuple(offline_entries()), (backbone,), train, max_train_images=1000)


def presets_suite() -> Suite:
    """The reference release's presets against recast's former defaults, one seed, the quick offline settings.

    ``adaptformer`` reads ``norm2(x)`` and scales by 0.1 and ``recast+piggyback`` trains everything
    at the common 2e-3 (recast's defaults when this was run); ``adaptformer:reference`` reads the
    residual stream before ``norm2`` and scales by 2, ``recast+piggyback:reference`` trains masks,
    coefficients and head at the reference's rates. The reference's won both comparisons and are
    the defaults now. The augmentation preset is compared by running this suite with ``--augment
    reference`` into another folder.
    """
    quick = offline_suite(quick=True)
    former_piggyback = {"mask_lr": 2e-3, "coef_lr": 2e-3, "head_lr": 2e-3}
    vit_options = {**_vit_methods("att+mlp"), "adaptformer": {"input": "post_norm", "scale": 0.1},
                   "adaptformer:reference": dict(ADAPTFORMER_REFERENCE)}
    vit = BenchBackbone("vit32", "recast-vit32", ("recast:att+mlp", "adaptformer", "adaptformer:reference"),
                        vit_options)
    resnet = BenchBackbone("resnet32", "recast-resnet32", ("recast", "recast+piggyback", "recast+piggyback:reference"),
                           {"recast+piggyback": former_piggyback,
                            "recast+piggyback:reference": dict(PIGGYBACK_REFERENCE_LRS)})
    return replace(quick, name="presets", backbones=(vit, resnet))


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
        return file_stem(f"{self.method}__{self.backbone.key}__{self.seed}") + ".json"


def plan(suite: Suite, methods: list[str] | None = None, seeds: list[int] | None = None,
         backbones: list[str] | None = None) -> list[Run]:
    """Every run of a suite, optionally only some methods, seeds, backbones.

    A method names a suite entry exactly (``recast``, ``recast:bn``) or, when no entry of a backbone
    is called that, every entry of that registry name (``recast`` -> ``recast:att``, ``recast:mlp``).
    """
    known = {b.key for b in suite.backbones}
    for key in backbones or []:
        if key not in known:
            raise ConfigError(f"unknown backbone {key!r} in suite {suite.name}; choose from {sorted(known)}")
    runs = []
    for backbone in suite.backbones:
        if backbones and backbone.key not in backbones:
            continue
        for entry in backbone.methods:
            if methods and entry not in methods and (method_name(entry) not in methods
                                                     or method_name(entry) in backbone.methods):
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
    images = "every image" if suite.max_train_images is None else f"at most {suite.max_train_images} images"
    lines.append(f"  training split: {images} per task")
    missing = missing_data(suite)
    lines += [f"  MISSING data root -> {m}" for m in missing] or ["  all data roots present"]
    return "\n".join(lines)


def with_training(suite: Suite, **overrides: Any) -> Suite:
    """``suite`` with training options replaced (``None`` values leave an option as it is)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    return replace(suite, train={**suite.train, **given}) if given else suite


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
