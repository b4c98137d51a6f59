"""Image files from the outside world: every awkward kind made here with Pillow, each handled or refused by name."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from recast.data import open_data
from recast.data.decode import DEFAULT_MAX_PIXELS, load_image
from recast.data.images import TorchvisionImages, drop_bad_items
from recast.errors import ConfigError, FileFormatError, RecastError
from recast.train import SequenceEntry, TrainConfig, open_task
from tests.data.conftest import write_png
from tests.helpers import tiny_vit

RED, BLUE = (220, 20, 30), (20, 30, 220)


def close_to(pixel: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 12) -> bool:
    return all(abs(int(a) - int(b)) <= tolerance for a, b in zip(pixel, expected, strict=True))


def bomb_png(path: Path, width: int, height: int) -> Path:
    """A PNG whose header announces ``width x height`` pixels but that holds almost no data."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # IHDR checksum over type + data
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))
    return path


def two_colour(size: tuple[int, int] = (20, 10)) -> Image.Image:
    """Left half red, right half blue."""
    image = Image.new("RGB", size, RED)
    image.paste(BLUE, (size[0] // 2, 0, size[0], size[1]))
    return image


def test_decompression_bomb_is_refused_from_its_header_before_decoding(tmp_path: Path) -> None:
    path = bomb_png(tmp_path / "bomb.png", 12_000, 12_000)  # 144 M pixels; its pixel data is 1 byte
    with pytest.raises(FileFormatError, match=r"bomb\.png: 12000 x 12000 = 144,000,000 pixels is over the limit "
                       r"of 89,478,485.*not decoded.*max_pixels.*skip-bad-images"):
        load_image(path)
    huge = bomb_png(tmp_path / "huge.png", 20_000, 20_000)  # over Pillow's own hard limit (twice its warning's)
    for limit in (DEFAULT_MAX_PIXELS, None):
        with pytest.raises(FileFormatError, match=r"huge\.png: refused without decoding.*400000000 pixels"):
            load_image(huge, max_pixels=limit)
    assert 9_000 * 9_000 < DEFAULT_MAX_PIXELS < 10_000 * 10_000


def test_pixel_limit_is_an_option(tmp_path: Path) -> None:
    path = write_png(tmp_path / "ok.png", 7, size=16)
    with pytest.raises(FileFormatError, match=r"ok\.png: 16 x 16 = 256 pixels is over the limit of 255"):
        load_image(path, max_pixels=255)
    assert load_image(path, max_pixels=256).size == (16, 16)
    for bad in (0, -5, 1.5, True, "many"):
        with pytest.raises(ConfigError, match="max_pixels must be a positive integer"):
            open_data(f"imagefolder:{tmp_path}", max_pixels=bad)


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257 * 64, 257 * 128, 65535]], dtype=np.uint16).repeat(4, axis=0)
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as raw:
        assert raw.mode.startswith("I")  # stored and read back as 16-bit
    image = load_image(tmp_path / "deep.png")
    assert image.mode == "RGB" and image.size == (4, 4)
    row = np.asarray(image)[0]
    assert row[:, 0].tolist() == [0, 64, 128, 255] and (row == row[:, :1]).all()  # grey: R = G = B


def test_cmyk_jpeg_keeps_its_colours(tmp_path: Path) -> None:
    two_colour().convert("CMYK").save(tmp_path / "print.jpg", quality=95)
    with Image.open(tmp_path / "print.jpg") as raw:
        assert raw.mode == "CMYK"
    image = load_image(tmp_path / "print.jpg")
    assert image.mode == "RGB"
    assert close_to(image.getpixel((2, 5)), RED) and close_to(image.getpixel((17, 5)), BLUE)


def test_transparent_pixels_become_white(tmp_path: Path) -> None:
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, *RED] + [0] * 762)  # index 0 black (transparent), index 1 red
    palette.paste(1, (2, 0, 4, 4))
    palette.save(tmp_path / "palette.png", transparency=0)
    image = load_image(tmp_path / "palette.png")
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 255, 255) and image.getpixel((3, 0)) == RED
    rgba = Image.new("RGBA", (4, 4), (10, 10, 10, 0))
    rgba.paste((*BLUE, 255), (0, 0, 2, 4))
    rgba.save(tmp_path / "alpha.png")
    image = load_image(tmp_path / "alpha.png")
    assert image.getpixel((3, 3)) == (255, 255, 255) and image.getpixel((0, 0)) == BLUE


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    two_colour((20, 10)).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    image = load_image(tmp_path / "phone.jpg")
    assert image.size == (10, 20)  # upright: the left (red) half is now on top
    assert close_to(image.getpixel((5, 2)), RED) and close_to(image.getpixel((5, 17)), BLUE)


def test_animated_gif_gives_its_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 6), colour) for colour in (RED, BLUE, (20, 200, 20))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(tmp_path / "anim.gif") as raw:
        assert raw.n_frames == 3
    image = load_image(tmp_path / "anim.gif")
    assert image.mode == "RGB" and image.size == (8, 6)
    assert close_to(image.getpixel((4, 3)), RED, tolerance=8)


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".gif"])
def test_truncated_files_are_refused_by_name(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    path = tmp_path / f"cut{suffix}"
    noise.save(path)
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(FileFormatError, match=rf"cut\{suffix}: cannot read image .*skip_bad_images"):
        load_image(path)


def test_not_an_image_and_empty_files_are_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "text.png").write_text("hello")
    (tmp_path / "empty.jpg").write_bytes(b"")
    for name in ("text.png", "empty.jpg"):
        with pytest.raises(FileFormatError, match=rf"{name.replace('.', '[.]')}: cannot read image"):
            load_image(tmp_path / name)


def test_every_kind_through_open_data_with_bad_files_skipped_and_counted(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for i in range(4):
        write_png(root / "plain" / f"{i}.png", 30 * i)
    odd = root / "odd"
    odd.mkdir()
    Image.fromarray(np.full((6, 6), 40000, dtype=np.uint16)).save(odd / "deep.png")
    two_colour().convert("CMYK").save(odd / "print.jpg")
    Image.new("P", (5, 5), 3).save(odd / "palette.gif", transparency=3)
    frames = [Image.new("RGB", (5, 5), c) for c in (RED, BLUE)]
    frames[0].save(odd / "anim.gif", save_all=True, append_images=frames[1:])
    bomb_png(odd / "bomb.png", 12_000, 12_000)
    write_png(odd / "cut.png", 9, size=32)
    (odd / "cut.png").write_bytes((odd / "cut.png").read_bytes()[:50])
    with pytest.raises(FileFormatError, match=r"(bomb|cut)\.png"):
        strict = open_data(f"imagefolder:{root}", val_fraction=0.0, test_fraction=0.0)
        for i in range(len(strict.train)):
            strict.train[i]
    splits = open_data(f"imagefolder:{root}", val_fraction=0.0, test_fraction=0.0, skip_bad_images=True)
    info = splits.split_info
    assert info["skip_bad_images"] is True and info["skipped_bad_images"] == 2
    assert sorted(Path(m.split(": ")[0]).name for m in info["bad_images"]) == ["bomb.png", "cut.png"]
    assert info["sizes"]["train"] == 8
    images = [image for image, _ in splits.train]
    assert all(image.mode == "RGB" for image in images)
    deep = next(image for image in images if image.size == (6, 6))
    assert deep.getpixel((0, 0)) == (156, 156, 156)  # 40000 / 257, not clipped to 255


class BrokenDataset:
    """A stand-in for a torchvision dataset over files, whose item 1 cannot be decoded."""

    def __init__(self, files: list[str]) -> None:
        self._image_files = files

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        if index == 1:
            raise OSError("image file is truncated (3 bytes not processed)")
        return Image.new("LA", (4, 4), (90, 0)), 0


def test_torchvision_items_are_normalised_and_named_when_bad() -> None:
    source = TorchvisionImages(BrokenDataset(["/data/a.jpg", "/data/b.jpg", "/data/c.jpg"]), np.zeros(3))
    assert source.image(0).getpixel((0, 0)) == (255, 255, 255)  # fully transparent grey -> white
    with pytest.raises(FileFormatError, match=r"/data/b\.jpg \(item 1 of BrokenDataset\): cannot read image "
                       r"\(image file is truncated"):
        source.image(1)
    kept, bad = drop_bad_items(source)
    assert len(kept.labels) == 2 and kept.where(1) == "/data/c.jpg (item 2 of BrokenDataset)"
    assert len(bad) == 1 and "b.jpg" in bad[0]


def test_training_config_skips_bad_images_and_counts_them(tmp_path) -> None:
    """``--skip-bad-images`` / ``--max-pixels`` reach the data layer through the training config."""
    for label in ("a", "b"):
        folder = tmp_path / "train" / label
        folder.mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(folder / f"{i}.png")
    (tmp_path / "train" / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    entry = SequenceEntry("t", f"imagefolder:{tmp_path / 'train'}")
    task = open_task(entry, tiny_vit(depth=1), TrainConfig(skip_bad_images=True, max_pixels=10_000), val_fraction=0.25)
    assert task.split_info["skipped_bad_images"] == 1 and task.split_info["max_pixels"] == 10_000
    plain = open_task(entry, tiny_vit(depth=1), TrainConfig(), val_fraction=0.25)
    with pytest.raises(RecastError, match="broken.png"):  # without the option the bad file stops the run
        for split in (plain.train, plain.val):
            for i in range(len(split)):
                split[i]
