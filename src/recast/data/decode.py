"""Decoding image files from the outside world into one RGB frame, or refusing them by name.

Files met in real datasets are not all clean 8-bit RGB. What each case becomes:

- huge pixel counts (decompression bombs): refused from the header, before any pixel is decoded,
  when ``width * height`` exceeds ``max_pixels`` (default: Pillow's own warning threshold);
- 16-bit greyscale (``I;16`` and friends): scaled to 8 bits (``value / 257``), not clipped to
  white as a plain ``convert("RGB")`` would;
- CMYK (and YCbCr, 1-bit, ...): converted by Pillow;
- transparency (RGBA, LA, palette images with a transparent index): composited on white, so
  the colour hidden under transparent pixels never reaches the model;
- EXIF orientation (phone JPEGs): applied, so the image is seen upright;
- animations (GIF, APNG, WebP): the first frame only;
- truncated or corrupt files: refused.

Every refusal is a :class:`~recast.errors.FileFormatError` that names the file and says what to do.
"""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from recast.errors import ConfigError, FileFormatError

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's Image.MAX_IMAGE_PIXELS: ~ a 9,459 x 9,459 image, 268 MB as RGB
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
# What Pillow's decoders raise on broken input; anything else is a bug, not a bad file.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, TypeError, KeyError, IndexError, struct.error,
                 Image.DecompressionBombError)
SKIP_HINT = "fix or delete it, or pass skip_bad_images=True (--skip-bad-images) to skip bad files and count them"


def check_max_pixels(max_pixels: int | None) -> int | None:
    """``max_pixels`` itself when it is a positive integer or ``None`` (no limit), else a ``ConfigError``."""
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1):
        raise ConfigError(f"max_pixels must be a positive integer, or None for no limit; got {max_pixels!r}")
    return max_pixels


def load_image(path: str | Path, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open ``path`` and decode its first frame as upright RGB, or raise ``FileFormatError`` naming it.

    The pixel count is checked from the header before decoding; the whole frame is then decoded
    here, so a truncated file is caught now rather than halfway through an epoch.
    """
    try:
        with warnings.catch_warnings():  # the limit is ours (checked below); Pillow's warning adds nothing
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                refuse_if_too_large(image, path, max_pixels)
                image.seek(0)  # the first frame of an animation (a no-op for still images)
                image.load()
                return to_rgb(ImageOps.exif_transpose(image))
    except FileFormatError:
        raise
    except Image.DecompressionBombError as exc:
        raise FileFormatError(f"{path}: refused without decoding: {exc}; {SKIP_HINT}") from None
    except DECODE_ERRORS as exc:
        raise FileFormatError(f"{path}: cannot read image ({exc}); {SKIP_HINT}") from None


def refuse_if_too_large(image: Image.Image, path: str | Path, max_pixels: int | None) -> None:
    """Raise ``FileFormatError`` when the header announces more than ``max_pixels`` pixels."""
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise FileFormatError(
            f"{path}: {width} x {height} = {width * height:,} pixels is over the limit of {max_pixels:,} "
            "(a decompression bomb, or a very large image); it was not decoded. Shrink it, raise the limit "
            "(max_pixels) if you trust the file, or pass skip_bad_images=True (--skip-bad-images) to skip "
            "bad files and count them"
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """One decoded frame of any Pillow mode as 8-bit RGB (see the module docstring for each case)."""
    if image.mode == "RGB":
        return image
    if image.mode in SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_rgb(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ALPHA_MODES:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    """A 16-bit (or 32-bit integer) greyscale image scaled from 0..65535 to 0..255, as RGB."""
    values = np.asarray(image, dtype=np.float64)  # (H, W)
    grey = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")
