"""open_data on image folders, CSV lists and a fake torchvision root, made by the tests."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from recast.data import DataSplits, open_data
from recast.errors import ConfigError, FileFormatError
from tests.data.conftest import write_png


def _labels(dataset) -> list[int]:
    return [label for _, label in dataset]


def test_imagefolder_splits_cover_every_image_once(image_folder: Path) -> None:
    splits = open_data(f"imagefolder:{image_folder}", val_fraction=0.2, seed=3)
    assert isinstance(splits, DataSplits)
    assert splits.classes == ["a", "b", "c"]
    sizes = splits.split_info["sizes"]
    assert sizes == {"train": 18, "val": 6, "test": 6}
    assert splits.split_info["test_split"] == "seeded" and splits.split_info["seed"] == 3
    pixels = sorted(int(np.asarray(img)[0, 0, 0]) for part in (splits.train, splits.val, splits.test)
                    for img, _ in part)
    assert pixels == sorted(10 * c + i for c in range(3) for i in range(10))
    for image, label in splits.test:
        assert image.mode == "RGB" and int(np.asarray(image)[0, 0, 0]) // 10 == label
    assert sorted(_labels(splits.val)) == [0, 0, 1, 1, 2, 2]  # stratified


def test_seeded_split_is_deterministic_and_depends_on_seed(image_folder: Path) -> None:
    first = open_data(f"imagefolder:{image_folder}", seed=1)
    again = open_data(f"imagefolder:{image_folder}", seed=1)
    other = open_data(f"imagefolder:{image_folder}", seed=2)
    assert list(first.test.indices) == list(again.test.indices)
    assert list(first.val.indices) == list(again.val.indices)
    assert list(first.test.indices) != list(other.test.indices)


def test_imagefolder_official_train_test_layout(tmp_path: Path) -> None:
    for split, count in (("train", 6), ("test", 2)):
        for name in ("x", "y"):
            for i in range(count):
                write_png(tmp_path / split / name / f"{i}.png", i)
    splits = open_data(f"imagefolder:{tmp_path}", val_fraction=0.5)
    assert splits.split_info["test_split"] == "official"
    assert splits.split_info["sizes"] == {"train": 6, "val": 6, "test": 4}
    assert _labels(splits.test) == [0, 0, 1, 1]


def test_transforms_apply_per_split(image_folder: Path) -> None:
    splits = open_data(f"imagefolder:{image_folder}", train_transform=lambda im: "train",
                       eval_transform=lambda im: "eval")
    assert splits.train[0][0] == "train" and splits.val[0][0] == "eval" and splits.test[0][0] == "eval"


def test_csv_with_relative_paths_and_split_column(tmp_path: Path) -> None:
    rows = ["fname,class,split"]
    for i in range(8):
        write_png(tmp_path / "img" / f"{i}.png", i)
        rows.append(f"img/{i}.png,{'cat' if i % 2 else 'dog'},{'test' if i >= 6 else 'train'}")
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    splits = open_data(f"csv:{tmp_path / 'list.csv'}", val_fraction=0.34)
    assert splits.classes == ["cat", "dog"]
    assert splits.split_info["test_split"] == "official"
    assert _labels(splits.test) == [1, 0]
    assert splits.split_info["sizes"] == {"train": 4, "val": 2, "test": 2}


def test_csv_missing_files_lists_count_and_first_ones(tmp_path: Path) -> None:
    write_png(tmp_path / "ok.png", 1)
    names = ["ok.png"] + [f"gone{i}.png" for i in range(7)]
    (tmp_path / "list.csv").write_text("fname,class\n" + "".join(f"{n},a\n" for n in names))
    with pytest.raises(FileFormatError, match=r"7 of 8 listed files do not exist") as info:
        open_data(f"csv:{tmp_path / 'list.csv'}")
    assert "gone0.png" in str(info.value) and "gone4.png" in str(info.value)
    assert "gone6.png" not in str(info.value)


def test_csv_without_required_columns(tmp_path: Path) -> None:
    (tmp_path / "list.csv").write_text("path,label\na.png,x\n")
    with pytest.raises(FileFormatError, match="fname,class"):
        open_data(f"csv:{tmp_path / 'list.csv'}")


def test_empty_class_folder_is_named(image_folder: Path) -> None:
    (image_folder / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"empty: class folder has no images"):
        open_data(f"imagefolder:{image_folder}")


def test_truncated_image_raises_error_naming_the_file(image_folder: Path) -> None:
    bad = image_folder / "a" / "0.png"
    bad.write_bytes(bad.read_bytes()[:30])
    splits = open_data(f"imagefolder:{image_folder}", val_fraction=0.0, test_fraction=0.0)
    position = [splits.train.source.paths[i] for i in splits.train.indices].index(bad)
    with pytest.raises(FileFormatError, match=r"0\.png: cannot read image.*skip_bad_images"):
        splits.train[position]


def test_skip_bad_images_counts_and_skips(image_folder: Path) -> None:
    (image_folder / "a" / "0.png").write_bytes(b"not an image at all")
    (image_folder / "c" / "3.png").write_bytes((image_folder / "c" / "4.png").read_bytes()[:40])
    splits = open_data(f"imagefolder:{image_folder}", skip_bad_images=True)
    assert splits.split_info["skipped_bad_images"] == 2
    assert sum(splits.split_info["sizes"].values()) == 28
    assert any("0.png: " in p for p in splits.split_info["bad_images"])


def test_unknown_specs_list_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"imagefolder:PATH, csv:PATH, torchvision:NAME:ROOT, builtin:NAME"):
        open_data("hdf5:/data")
    with pytest.raises(ConfigError, match=r"CIFAR10.*Flowers102"):
        open_data(f"torchvision:NoSuchSet:{tmp_path}")
    with pytest.raises(ConfigError, match=r"valid names: .*chars.*mnist"):
        open_data("builtin:nope")


def _write_idx(path: Path, array: np.ndarray) -> None:
    """An MNIST IDX file (big-endian header, uint8 data): torchvision's own MNIST reader parses it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_torchvision_mnist_from_a_fake_root(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    for prefix, count in (("train", 20), ("t10k", 5)):
        labels = np.arange(count) % 10
        images = np.stack([np.full((28, 28), 20 * d, dtype=np.uint8) for d in labels])
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    splits = open_data(f"torchvision:MNIST:{tmp_path}", val_fraction=0.5)
    assert splits.split_info["test_split"] == "official"
    assert splits.split_info["sizes"] == {"train": 10, "val": 10, "test": 5}
    assert splits.classes[0].startswith("0")
    for image, label in splits.test:
        assert image.mode == "RGB" and image.size == (28, 28)
        assert int(np.asarray(image)[0, 0, 0]) == 20 * label


def test_torchvision_missing_files_explain_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(FileFormatError, match=r"never downloads.*download=True"):
        open_data(f"torchvision:CIFAR10:{tmp_path}")


def test_grey_and_palette_images_come_out_rgb(tmp_path: Path) -> None:
    write_png(tmp_path / "k" / "grey.png", 5, mode="L")
    Image.new("P", (4, 4)).save(tmp_path / "k" / "palette.png")
    write_png(tmp_path / "m" / "x.png", 9)
    write_png(tmp_path / "m" / "y.png", 9)
    splits = open_data(f"imagefolder:{tmp_path}", val_fraction=0.0, test_fraction=0.0)
    assert {img.mode for img, _ in splits.train} == {"RGB"}
