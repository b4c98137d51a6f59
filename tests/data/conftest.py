"""Small image files made by the tests themselves (no network, no npm)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_png(path: Path, value: int, size: int = 8, mode: str = "RGB") -> Path:
    """A tiny solid image whose pixel value encodes where it came from."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.full((size, size, 3) if mode == "RGB" else (size, size), value, dtype=np.uint8)
    Image.fromarray(array).save(path)
    return path


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """``root/<class>/*.png``: 3 classes x 10 images (class ``b`` is greyscale)."""
    root = tmp_path / "folder"
    for label, name in enumerate(["a", "b", "c"]):
        for i in range(10):
            write_png(root / name / f"{i}.png", 10 * label + i, mode="L" if name == "b" else "RGB")
    return root


@pytest.fixture(autouse=True)
def data_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test builds built-in datasets into its own empty cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("RECAST_DATA", str(cache))
    return cache
