"""Bad data is caught where it enters, and the error names the offending file."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from recast.data import open_data
from recast.data.images import ArrayImages, check_labels
from recast.errors import FileFormatError


@pytest.fixture
def folder(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(6):
            Image.fromarray(np.full((12, 12, 3), 40 * i, dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
    Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8)).save(tmp_path / "b" / "odd.png")
    return tmp_path


def test_image_of_the_wrong_size_is_named(folder):
    no_resize = T.ToTensor()  # keeps each file's own size
    splits = open_data(f"imagefolder:{folder}", train_transform=no_resize, eval_transform=no_resize,
                       input_shape=(3, 12, 12), val_fraction=0.2)
    views = (splits.train, splits.val, splits.test)
    with pytest.raises(FileFormatError, match=r"odd\.png: became a \(3, 20, 30\) tensor after the transform, but the model takes \(3, 12, 12\)"):
        for view in views:
            for i in range(len(view)):
                view[i]


def test_wrong_channel_count_is_named(folder):
    grey = T.Compose([T.Grayscale(), T.Resize((12, 12)), T.ToTensor()])
    splits = open_data(f"imagefolder:{folder}", train_transform=grey, eval_transform=grey, input_shape=(3, 12, 12))
    with pytest.raises(FileFormatError, match=r"\.png: became a \(1, 12, 12\) tensor"):
        splits.train[0]
    fine = T.Compose([T.Resize((12, 12)), T.ToTensor()])
    ok = open_data(f"imagefolder:{folder}", train_transform=fine, eval_transform=fine, input_shape=(3, 12, 12))
    assert isinstance(ok.train[0][0], torch.Tensor) and ok.train[0][0].shape == (3, 12, 12)


def test_labels_outside_the_classes_are_refused_with_the_items_named():
    source = ArrayImages(np.zeros((4, 8, 8), dtype=np.uint8), np.array([0, 1, 7, -1]))
    with pytest.raises(FileFormatError, match=r"2 train item\(s\) have labels outside the 2 classes, e\.g\. image 2 of the built-in arrays \(label 7\)"):
        check_labels(source, 2, "train")
    check_labels(ArrayImages(np.zeros((2, 8, 8), dtype=np.uint8), np.array([0, 1])), 2, "train")
