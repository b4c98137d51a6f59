"""Indexable image sources and the dataset views the splits hand out.

A *source* knows its labels without decoding images and returns image ``i`` as a PIL RGB image
(files are decoded by :mod:`recast.data.decode`).
A :class:`SplitView` is a torch ``Dataset`` over some indices of a source with one transform, so
train and validation can share a source yet use different transforms.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from recast.data.decode import DECODE_ERRORS, DEFAULT_MAX_PIXELS, SKIP_HINT, check_max_pixels, load_image, to_rgb
from recast.errors import FileFormatError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class ImageSource(Protocol):
    """What a split needs from a data source."""

    labels: np.ndarray

    def image(self, index: int) -> Image.Image:
        """Image ``index`` as a PIL RGB image."""
        ...

    def where(self, index: int) -> str:
        """Where item ``index`` comes from (a file path where there is one), for error messages."""
        ...


class ArrayImages:
    """Images held as a uint8 array ``(N, H, W)`` (grey) or ``(N, H, W, 3)`` (colour)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)

    def image(self, index: int) -> Image.Image:
        """Image ``index`` converted to RGB."""
        return Image.fromarray(self.images[index]).convert("RGB")

    def where(self, index: int) -> str:
        return f"image {index} of the built-in arrays"


class FileImages:
    """Images read from files on demand (see :mod:`recast.data.decode`); a bad file raises an error naming it."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int], *,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.max_pixels = check_max_pixels(max_pixels)

    def image(self, index: int) -> Image.Image:
        """Decode file ``index`` fully (so truncation is caught here): its first frame, upright, as RGB."""
        return load_image(self.paths[index], max_pixels=self.max_pixels)

    def where(self, index: int) -> str:
        return str(self.paths[index])


class SubsetImages:
    """The items ``indices`` of another source, renumbered from 0 (what is left after skipping bad files)."""

    def __init__(self, source: ImageSource, indices: Sequence[int]) -> None:
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = np.asarray(source.labels)[self.indices]

    def image(self, index: int) -> Image.Image:
        return self.source.image(int(self.indices[index]))

    def where(self, index: int) -> str:
        return self.source.where(int(self.indices[index]))


def drop_bad_items(source: ImageSource) -> tuple[ImageSource, list[str]]:
    """Decode every item once; returns the source without the unreadable ones, and their error messages."""
    good, bad = [], []
    for index in range(len(source.labels)):
        try:
            source.image(index)
            good.append(index)
        except FileFormatError as exc:
            bad.append(str(exc))
    return (source if not bad else SubsetImages(source, good)), bad


class TorchvisionImages:
    """A torchvision dataset (constructed without a transform) seen as a source.

    torchvision decodes its files itself; what it hands over is normalised like any file
    (:func:`~recast.data.decode.to_rgb`), and a decoding failure becomes an error naming the item
    (its file, where the dataset lists them).
    """

    def __init__(self, dataset: Any, labels: np.ndarray) -> None:
        self.dataset = dataset
        self.labels = np.asarray(labels, dtype=np.int64)

    def image(self, index: int) -> Image.Image:
        """The dataset's image ``index`` as RGB (MNIST-like sets give grey images)."""
        try:
            image = self.dataset[index][0]
            if not isinstance(image, Image.Image):
                image = Image.fromarray(np.asarray(image))
            return to_rgb(image)
        except DECODE_ERRORS as exc:
            raise FileFormatError(f"{self.where(index)}: cannot read image ({exc}); {SKIP_HINT}") from None

    def where(self, index: int) -> str:
        path = _listed_file(self.dataset, index)
        name = f"item {index} of {type(self.dataset).__name__}"
        return f"{path} ({name})" if path else name


def _listed_file(dataset: Any, index: int) -> str | None:
    """The file of item ``index`` where a torchvision dataset keeps a list of them, else ``None``."""
    for attribute in ("_image_files", "_images", "imgs", "samples", "_samples"):
        items = getattr(dataset, attribute, None)
        if isinstance(items, (list, tuple)) and 0 <= index < len(items):
            item = items[index]
            item = item[0] if isinstance(item, (list, tuple)) else item
            if isinstance(item, (str, Path)):
                return str(item)
    return None


class SplitView(Dataset):
    """The images ``indices`` of ``source`` as ``(transform(image), label)`` pairs."""

    def __init__(self, source: ImageSource, indices: np.ndarray, transform: Callable | None,
                 input_shape: tuple[int, ...] | None = None) -> None:
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform
        self.input_shape = tuple(input_shape) if input_shape is not None else None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[Any, int]:
        index = int(self.indices[position])
        image = self.source.image(index)
        if self.transform is not None:
            image = self.transform(image)
        shape = tuple(getattr(image, "shape", ()))
        if self.input_shape is not None and shape != self.input_shape:
            raise FileFormatError(
                f"{self.source.where(index)}: became a {shape} tensor after the transform, but the model takes "
                f"{self.input_shape} (channels, height, width); use the backbone's transforms (transforms_for)"
            )
        return image, int(self.source.labels[index])

    @property
    def targets(self) -> list[int]:
        """The labels of this split, in order, without decoding any image."""
        return self.source.labels[self.indices].tolist()


def check_labels(source: ImageSource, num_classes: int, split: str) -> None:
    """Every label of ``source`` must name one of the ``num_classes`` classes; the error names the items."""
    labels = np.asarray(source.labels)
    bad = np.nonzero((labels < 0) | (labels >= num_classes))[0]
    if bad.size:
        shown = ", ".join(f"{source.where(int(i))} (label {int(labels[i])})" for i in bad[:3])
        raise FileFormatError(
            f"{bad.size} {split} item(s) have labels outside the {num_classes} classes, e.g. {shown}; "
            "fix the labels or the class list"
        )
