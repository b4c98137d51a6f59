"""Rendering characters from real TrueType fonts into small images.

Two built-in datasets come from here: ``chars`` (Latin letters and digits, a benchmark task in the
spirit of Chars74K's font subset) and ``glyphs`` (symbols of non-Latin scripts, arrows and
mathematical operators: the pretraining data of the shipped backbones, disjoint from every task).
The fonts are the ones matplotlib ships (DejaVu and STIX, both freely licensed), so every machine
with the same matplotlib and Pillow renders the same pixels.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import matplotlib
import numpy as np
from fontTools.ttLib import TTFont
from PIL import Image, ImageDraw, ImageFont

from recast.errors import RecastError

# Greek and Cyrillic letters that look like Latin ones (and so could leak the ``chars`` task into
# pretraining) are left out of ``glyphs``.
_LATIN_LOOKALIKES = set("αικνορτυχωΑΒΕΖΗΙΚΜΝΟΡΤΥΧаеорсухьАВЕКМНОРСТХЗзЬбвгпикнтшщБГПИКНТШЩ")

# Arrows that are also emoji (``emoji-*`` tasks) are left out of ``glyphs``.
_EMOJI_ARROWS = {0x2194, 0x2195, 0x2196, 0x2197, 0x2198, 0x2199, 0x21A9, 0x21AA}


def matplotlib_fonts() -> list[Path]:
    """The text fonts matplotlib ships (DejaVu and STIX families), sorted by file name.

    Computer Modern files use TeX encodings and STIX size/non-Unicode variants hold no ordinary
    characters, so they are left out.
    """
    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    skip = ("cm", "STIXSiz", "STIXNonUni", "LastResort")
    return sorted(p for p in folder.glob("*.ttf") if not p.name.startswith(skip))


def font_charset(path: Path) -> set[int]:
    """The Unicode code points a font has glyphs for."""
    with TTFont(path, lazy=True) as font:
        return set(font.getBestCmap() or {})


def latin_alphanumerics() -> list[str]:
    """The 62 classes of ``chars``: digits, upper-case and lower-case Latin letters."""
    return [chr(c) for c in range(ord("0"), ord("9") + 1)] + [
        chr(c) for c in range(ord("A"), ord("Z") + 1)
    ] + [chr(c) for c in range(ord("a"), ord("z") + 1)]


def pretraining_symbols(fonts: Sequence[Path], min_fonts: int) -> list[str]:
    """Characters for ``glyphs``: non-Latin letters, arrows, math operators in >= ``min_fonts`` fonts."""
    ranges = [
        (0x3B1, 0x3CA),  # Greek small letters
        (0x410, 0x450),  # Cyrillic capital and small letters
        (0x531, 0x557),  # Armenian capital letters
        (0x10D0, 0x10F1),  # Georgian Mkhedruli letters
        (0x2190, 0x2200),  # arrows
        (0x2200, 0x2300),  # mathematical operators
    ]
    charsets = [font_charset(f) for f in fonts]
    chosen = []
    for start, stop in ranges:
        for code in range(start, stop):
            if chr(code) in _LATIN_LOOKALIKES or code in _EMOJI_ARROWS:
                continue
            if sum(code in cs for cs in charsets) >= min_fonts:
                chosen.append(chr(code))
    return chosen


def render_glyph(
    font: ImageFont.FreeTypeFont, char: str, size: int, rng: np.random.Generator, colour: bool
) -> np.ndarray:
    """One ``size`` x ``size`` image of ``char``, jittered in position, scale and rotation.

    Grey images are dark ink on a light page (``(size, size)`` uint8); colour ones draw a random
    ink colour on a random, contrasting background (``(size, size, 3)`` uint8).
    """
    canvas = 2 * size
    if colour:
        ink, paper = _contrasting_colours(rng)
    else:
        ink, paper = (int(rng.integers(0, 60)),) * 3, (int(rng.integers(200, 256)),) * 3
    mask = Image.new("L", (canvas, canvas), 0)
    ImageDraw.Draw(mask).text((canvas / 2, canvas / 2), char, font=font, fill=255, anchor="mm")
    mask = mask.rotate(float(rng.uniform(-10, 10)), resample=Image.BILINEAR)
    box = mask.getbbox() or (0, 0, canvas, canvas)
    mask = mask.crop(box)
    scale = float(rng.uniform(0.6, 0.85)) * size / max(mask.size)
    mask = mask.resize((max(1, round(mask.width * scale)), max(1, round(mask.height * scale))), Image.LANCZOS)
    page = Image.new("RGB", (size, size), paper)
    slack_x, slack_y = size - mask.width, size - mask.height
    x = int(rng.integers(0, slack_x + 1)) if slack_x > 0 else 0
    y = int(rng.integers(0, slack_y + 1)) if slack_y > 0 else 0
    page.paste(Image.new("RGB", mask.size, ink), (x, y), mask)
    array = np.asarray(page, dtype=np.uint8)
    return array if colour else array[..., 0].copy()


def _contrasting_colours(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A random ink and background colour whose brightness differs by at least 100 of 255."""
    while True:
        ink, paper = rng.integers(0, 256, size=3), rng.integers(0, 256, size=3)
        if abs(float(ink.mean()) - float(paper.mean())) >= 100:
            return tuple(int(v) for v in ink), tuple(int(v) for v in paper)


def render_set(
    fonts: Sequence[Path], chars: Iterable[str], *, renders: int, size: int, colour: bool, seed: int
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Render every character each font has, ``renders`` times; returns ``(images, labels, fonts)``.

    Fonts are taken in the given order and characters in class order, and one seeded generator
    drives all the jitter, so the result is deterministic.
    """
    chars = list(chars)
    rng = np.random.default_rng(seed)
    images, labels, used = [], [], []
    for path in fonts:
        charset = font_charset(path)
        font = ImageFont.truetype(str(path), size=2 * size)
        covered = [i for i, ch in enumerate(chars) if ord(ch) in charset]
        if covered:
            used.append(path.name)
        for label in covered:
            for _ in range(renders):
                images.append(render_glyph(font, chars[label], size, rng, colour))
                labels.append(label)
    if not images:
        raise RecastError("no font has any of the requested characters; check the font files")
    return np.stack(images), np.asarray(labels, dtype=np.int64), used
