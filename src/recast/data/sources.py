"""``open_data(spec)``: every data source behind one spec string, with recorded splits.

Specs: ``imagefolder:PATH``, ``csv:PATH``, ``torchvision:NAME:ROOT``, ``builtin:NAME``. A source
gives a train part, and a test part where an official one exists (otherwise a seeded, stratified
test split is carved from train). The validation split is the official one where it exists,
else seeded and carved from train. ``split_info`` records what was done, for the results files.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torchvision.datasets
from torch.utils.data import Dataset

from recast.data.builtin import load_builtin
from recast.data.decode import DEFAULT_MAX_PIXELS, check_max_pixels
from recast.data.images import (
    IMAGE_SUFFIXES,
    ArrayImages,
    FileImages,
    ImageSource,
    SplitView,
    TorchvisionImages,
    check_labels,
    drop_bad_items,
)
from recast.data.splits import stratified_split
from recast.data.transforms import describe_transform
from recast.errors import ConfigError, FileFormatError, RecastError

SPEC_FORMS = "imagefolder:PATH, csv:PATH, torchvision:NAME:ROOT, builtin:NAME"


@dataclass
class DataSplits:
    """Train, validation and test datasets yielding ``(image, int_label)``, class names, split record."""

    train: Dataset
    val: Dataset
    test: Dataset
    classes: list[str]
    split_info: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Parts:
    """What a loader finds: sources per split (``val``/``test`` may be missing) and class names."""

    train: ImageSource
    classes: list[str]
    test: ImageSource | None = None
    val: ImageSource | None = None
    info: dict[str, Any] = field(default_factory=dict)
    test_kind: str = "official"  # how a given test split was made


def open_data(
    spec: str, *, val_fraction: float = 0.1, seed: int = 0, train_transform: Callable | None = None,
    eval_transform: Callable | None = None, skip_bad_images: bool = False, test_fraction: float = 0.2,
    input_shape: tuple[int, ...] | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> DataSplits:
    """Open the data that ``spec`` names and split it (see the module docstring).

    With transforms left ``None`` the datasets yield PIL RGB images. ``test_fraction`` is used
    only for sources without an official test split. ``input_shape`` (e.g. ``(3, 32, 32)``) makes
    every transformed image be checked against what the model takes, naming the offending file.
    Labels outside the class list are refused when the data is opened. Image files are decoded as
    :mod:`recast.data.decode` says: one upright RGB frame, files over ``max_pixels`` pixels
    (``None``: no limit) refused before decoding. ``skip_bad_images`` decodes every image once up
    front and leaves out (and counts) those that cannot be read; without it a bad file raises an
    error naming it when it is reached. ``split_info`` records the splits, the skipped files and
    the transforms (``augment``: the preset of :func:`~recast.data.transforms.transforms_for`).
    """
    check_max_pixels(max_pixels)
    if not isinstance(spec, str) or "\x00" in spec:
        raise ConfigError(f"invalid data spec {spec!r}: it must be text without NUL characters; valid forms: {SPEC_FORMS}")
    kind, _, rest = spec.partition(":")
    loaders = {"imagefolder": _imagefolder, "csv": _csv, "torchvision": _torchvision, "builtin": _builtin}
    if kind not in loaders or not rest:
        raise ConfigError(f"unknown data spec {spec!r}; valid forms: {SPEC_FORMS}")
    try:
        parts = loaders[kind](rest)
    except RecastError:
        raise
    except (OSError, ValueError) as exc:  # unreadable paths, names too long, ...: say which spec, never a traceback
        raise FileFormatError(f"cannot open data {spec!r}: {exc}") from None
    _limit_pixels(parts, max_pixels)
    info: dict[str, Any] = {"spec": spec, "kind": kind, "seed": seed, **parts.info, "max_pixels": max_pixels,
                            **_transform_info(train_transform, eval_transform)}
    info["skip_bad_images"] = bool(skip_bad_images)
    if skip_bad_images:
        parts, bad = _skip_bad(parts)
        info.update(skipped_bad_images=len(bad), bad_images=bad[:10])
    for split, source in (("train", parts.train), ("validation", parts.val), ("test", parts.test)):
        if source is not None:
            check_labels(source, len(parts.classes), split)
    return _assemble(parts, info, val_fraction, test_fraction, seed, train_transform, eval_transform, input_shape)


def _assemble(
    parts: _Parts, info: dict[str, Any], val_fraction: float, test_fraction: float, seed: int,
    train_transform: Callable | None, eval_transform: Callable | None, input_shape: tuple[int, ...] | None = None,
) -> DataSplits:
    """Carve the missing test and validation splits and wrap every split in a ``SplitView``."""
    pool = np.arange(len(parts.train.labels))
    if parts.test is None:
        kept, held = stratified_split(parts.train.labels, test_fraction, seed)
        test = SplitView(parts.train, held, eval_transform, input_shape)
        pool = kept
        info.update(test_split="seeded", test_fraction=test_fraction)
    else:
        test = SplitView(parts.test, np.arange(len(parts.test.labels)), eval_transform, input_shape)
        info.update(test_split=parts.test_kind)
    if parts.val is None:
        kept, held = stratified_split(parts.train.labels[pool], val_fraction, seed + 1)
        val = SplitView(parts.train, pool[held], eval_transform, input_shape)
        pool = pool[kept]
        info.update(val_split="seeded from train", val_fraction=val_fraction)
    else:
        val = SplitView(parts.val, np.arange(len(parts.val.labels)), eval_transform, input_shape)
        info.update(val_split="official")
    train = SplitView(parts.train, pool, train_transform, input_shape)
    info["sizes"] = {"train": len(train), "val": len(val), "test": len(test)}
    info["num_classes"] = len(parts.classes)
    return DataSplits(train, val, test, list(parts.classes), info)


def _transform_info(train: Callable | None, evaluation: Callable | None) -> dict[str, Any]:
    """What the results record about the transforms: each one described, and the training preset."""
    described = {"train": describe_transform(train), "eval": describe_transform(evaluation)}
    preset = described["train"].get("augment", "custom") if train is not None else "none (PIL images)"
    return {"augment": preset, "transforms": described}


def _limit_pixels(parts: _Parts, max_pixels: int | None) -> None:
    """Give every file-backed split the pixel limit."""
    for source in (parts.train, parts.val, parts.test):
        if isinstance(source, FileImages):
            source.max_pixels = max_pixels


def _skip_bad(parts: _Parts) -> tuple[_Parts, list[str]]:
    """Drop unreadable images from every split read from files; returns the new parts and the errors.

    The built-in arrays are known good and are not decoded.
    """
    bad: list[str] = []

    def clean(source: ImageSource | None) -> ImageSource | None:
        if source is None or isinstance(source, ArrayImages):
            return source
        kept, dropped = drop_bad_items(source)
        bad.extend(dropped)
        return kept

    cleaned = _Parts(clean(parts.train), parts.classes, clean(parts.test), clean(parts.val), parts.info,
                     parts.test_kind)
    if len(cleaned.train.labels) == 0:
        raise FileFormatError(f"no readable training image is left after skipping {len(bad)} bad files")
    return cleaned, bad


def _class_folders(root: Path) -> list[Path]:
    """The class sub-folders of ``root``, sorted; an empty class folder is an error."""
    if not root.is_dir():
        raise ConfigError(f"{root}: not a folder; imagefolder:PATH needs PATH/<class>/<image files>")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ConfigError(f"{root}: no class sub-folders; put the images of each class in PATH/<class>/")
    for folder in folders:
        if not _image_files(folder):
            raise ConfigError(
                f"{folder}: class folder has no images (looked for {', '.join(IMAGE_SUFFIXES)}); "
                "add images or remove the folder"
            )
    return folders


def _image_files(folder: Path) -> list[Path]:
    """Image files anywhere under ``folder``, sorted, skipping hidden files."""
    return sorted(p for p in folder.rglob("*")
                  if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())


def _folder_source(root: Path, classes: list[str]) -> FileImages:
    """A ``FileImages`` over ``root/<class>/...``; class folders not in ``classes`` are an error."""
    paths, labels = [], []
    for folder in _class_folders(root):
        if folder.name not in classes:
            raise ConfigError(f"{folder}: class {folder.name!r} is not among the training classes")
        files = _image_files(folder)
        paths += files
        labels += [classes.index(folder.name)] * len(files)
    return FileImages(paths, labels)


def _imagefolder(path: str) -> _Parts:
    """``PATH/<class>/*``, or ``PATH/{train,test[,val]}/<class>/*`` for an official split."""
    root = Path(path).expanduser()
    if (root / "train").is_dir() and (root / "test").is_dir():
        classes = [p.name for p in _class_folders(root / "train")]
        val = _folder_source(root / "val", classes) if (root / "val").is_dir() else None
        return _Parts(_folder_source(root / "train", classes), classes, _folder_source(root / "test", classes),
                      val, {"layout": "train/test folders"})
    classes = [p.name for p in _class_folders(root)]
    return _Parts(_folder_source(root, classes), classes, info={"layout": "class folders"})


def _csv(path: str) -> _Parts:
    """A CSV with columns ``fname,class`` (and optionally ``split``: train/val/test), paths relative to it."""
    csv_path = Path(path).expanduser()
    rows = _read_csv_rows(csv_path)
    classes = sorted({row["class"] for row in rows})
    files = [(csv_path.parent / row["fname"]) for row in rows]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileFormatError(
            f"{csv_path}: {len(missing)} of {len(files)} listed files do not exist, first ones: "
            f"{', '.join(missing[:5])}"
        )
    groups: dict[str, tuple[list[Path], list[int]]] = {}
    for row, file in zip(rows, files, strict=True):
        paths, labels = groups.setdefault(row.get("split") or "train", ([], []))
        paths.append(file)
        labels.append(classes.index(row["class"]))
    unknown = set(groups) - {"train", "val", "test"}
    if unknown or "train" not in groups:
        raise FileFormatError(f"{csv_path}: the split column must hold train, val or test (with some "
                              f"train rows); found {sorted(groups)}")
    sources = {name: FileImages(*group) for name, group in groups.items()}
    return _Parts(sources["train"], classes, sources.get("test"), sources.get("val"),
                  {"layout": "csv" + (" with split column" if len(groups) > 1 else "")})


def _read_csv_rows(csv_path: Path) -> list[dict[str, str]]:
    """The rows of a ``fname,class`` CSV, checked for the required columns and at least one row."""
    try:
        with open(csv_path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns = set(reader.fieldnames or [])
            rows = list(reader)
    except FileNotFoundError:
        raise FileFormatError(f"{csv_path}: file not found") from None
    if not {"fname", "class"} <= columns:
        raise FileFormatError(f"{csv_path}: needs a header with columns fname,class; found {sorted(columns)}")
    if not rows:
        raise FileFormatError(f"{csv_path}: lists no images")
    return rows


def _torchvision_table() -> dict[str, dict[str, dict[str, Any]]]:
    """The constructor arguments of each split of the torchvision datasets that have one."""
    by_flag = {"train": {"train": True}, "test": {"train": False}}

    def by_split(train: str, test: str, val: str | None = None) -> dict[str, dict[str, Any]]:
        table = {"train": {"split": train}, "test": {"split": test}}
        if val:
            table["val"] = {"split": val}
        return table

    return {
        "CIFAR10": by_flag, "CIFAR100": by_flag, "MNIST": by_flag, "FashionMNIST": by_flag, "KMNIST": by_flag,
        "SVHN": by_split("train", "test"), "StanfordCars": by_split("train", "test"),
        "Flowers102": by_split("train", "test", "val"), "FGVCAircraft": by_split("train", "test", "val"),
        "DTD": by_split("train", "test", "val"), "Food101": by_split("train", "test"),
        "OxfordIIITPet": by_split("trainval", "test"), "GTSRB": by_split("train", "test"),
        "STL10": by_split("train", "test"), "Country211": by_split("train", "test", "valid"),
        "EuroSAT": {"train": {}},
    }


def _torchvision(rest: str) -> _Parts:
    """``NAME:ROOT``: a torchvision dataset whose files are already under ROOT (never downloads)."""
    name, _, root = rest.partition(":")
    table = _torchvision_table()
    if name not in table or not root:
        raise ConfigError(f"unknown torchvision data spec 'torchvision:{rest}'; use torchvision:NAME:ROOT "
                          f"with NAME one of {', '.join(sorted(table))}")
    sources, classes = {}, None
    for role, kwargs in table[name].items():
        dataset = _construct(getattr(torchvision.datasets, name), name, root, kwargs)
        sources[role] = TorchvisionImages(dataset, _labels_of(dataset))
        classes = classes or _classes_of(dataset, sources[role].labels)
    return _Parts(sources["train"], classes, sources.get("test"), sources.get("val"),
                  {"torchvision": name, "root": root})


def _construct(cls: type, name: str, root: str, kwargs: dict[str, Any]) -> Any:
    """Construct a torchvision dataset with ``download=False``, explaining missing files."""
    try:
        return cls(root=str(Path(root).expanduser()), download=False, **kwargs)
    except (RuntimeError, FileNotFoundError) as exc:
        raise FileFormatError(
            f"torchvision {name}: files not found or incomplete under {root} ({exc}). recast never downloads: "
            f"fetch them elsewhere with torchvision.datasets.{name}(root, download=True) and copy the folder here"
        ) from None


def _labels_of(dataset: Any) -> np.ndarray:
    """A torchvision dataset's labels, read from its attributes without decoding images when possible."""
    for attribute in ("targets", "labels", "_labels"):
        values = getattr(dataset, attribute, None)
        if values is not None:
            return np.asarray(values, dtype=np.int64)
    for attribute in ("_samples", "samples"):
        values = getattr(dataset, attribute, None)
        if values is not None:
            return np.asarray([label for _, label in values], dtype=np.int64)
    return np.asarray([dataset[i][1] for i in range(len(dataset))], dtype=np.int64)


def _classes_of(dataset: Any, labels: np.ndarray) -> list[str]:
    """A dataset's class names, or the label numbers as strings where it has none."""
    names = getattr(dataset, "classes", None)
    if names:
        return [str(n) for n in names]
    return [str(i) for i in range(int(labels.max()) + 1)] if len(labels) else []


def _builtin(name: str) -> _Parts:
    """A built-in dataset from the cache (built on first use); its split is recorded in its metadata."""
    arrays, meta = load_builtin(name)
    train = ArrayImages(arrays["train_x"], arrays["train_y"])
    test = ArrayImages(arrays["test_x"], arrays["test_y"])
    split = meta.get("split", {})
    info = {"builtin_test_split": split, "builtin_sha256": meta.get("sha256")}
    kind = "official" if split.get("official") else "seeded when the built-in dataset was built"
    return _Parts(train, [str(c) for c in arrays["classes"]], test, None, info, kind)
