"""Short labels stamped into (H, W, 3) uint8 pixel arrays, fast enough for hundreds per picture.

    pixels = np.full((40, 200, 3), 255, dtype=np.uint8)   # (H, W, 3), white
    stamp(pixels, (2, 3), "ch 12", color=(0, 0, 0))       # top-left corner (x, y)

PIL's ``ImageDraw.text`` lays out and rasterises every string anew (~50 us each), and an examples
grid writes a score under each of its hundreds of tiles every epoch. Here each character is
rasterised once per size and colour (PIL's default font, as ``ImageDraw.text`` would draw it)
and pasted at its advance, so a label costs a few small array copies. Text is dark on a light
background: a pixel keeps the darker of itself and the glyph, per channel.

PIL's default font covers ASCII only. A character it lacks is drawn from DejaVu Sans (bundled
with matplotlib: accents, Greek, arrows, many symbols); one neither has (CJK, most emoji) and
control characters (tabs, newlines) are written as their Python escape, ``\u4e2d``, ``\n``
(:func:`visible`), never as the font's missing-glyph box.
"""

from __future__ import annotations

import functools
import os
import unicodedata

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["stamp", "text_width", "visible"]

# A private-use code point no font here draws: what a missing glyph looks like in each font.
_NO_GLYPH = "\U0010fffd"


def stamp(
    pixels: np.ndarray, xy: tuple[int, int], text: str, color: tuple[int, int, int], size: int = 10
) -> None:
    """Draw ``text`` into ``pixels`` (H, W, 3) uint8 in place, its top-left corner at ``xy``.

    Whatever falls outside ``pixels`` is cut off.
    """
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"expected (H, W, 3) uint8 pixels, got {pixels.shape} {pixels.dtype}")
    x0, y = xy
    height, width = pixels.shape[:2]
    pen = float(x0)
    for ch in visible(text, size):
        glyph, advance = _glyph(ch, size, tuple(color))  # (gh, gw, 3), pixels
        x = round(pen)
        pen += advance
        top, left = max(y, 0), max(x, 0)
        bottom, right = min(y + glyph.shape[0], height), min(x + glyph.shape[1], width)
        if bottom <= top or right <= left:
            continue
        region = pixels[top:bottom, left:right]
        np.minimum(region, glyph[top - y : bottom - y, left - x : right - x], out=region)


def text_width(text: str, size: int = 10) -> int:
    """Pixels ``stamp`` advances over ``text``."""
    return round(sum(_glyph(ch, size, (0, 0, 0))[1] for ch in visible(text, size)))


def visible(text: str, size: int = 10) -> str:
    """``text`` with every character that would be drawn as a missing-glyph box, or not at all
    (tabs, newlines, other control and format characters), replaced by its Python escape:
    ``"a\tb 中"`` -> ``"a\\tb \\u4e2d"``. What it returns, :func:`stamp` draws as it is."""
    return "".join(
        ch if _drawable(ch, size) else ch.encode("unicode_escape").decode() for ch in text
    )


@functools.cache
def _drawable(ch: str, size: int) -> bool:
    if unicodedata.category(ch)[0] == "C" and ch != " ":
        return False
    return _font_with(ch, size) is not None


@functools.cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


@functools.cache
def _fallback(size: int) -> ImageFont.FreeTypeFont | None:
    try:
        import matplotlib

        return ImageFont.truetype(
            os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf"), size
        )
    except (ImportError, OSError):
        return None


def _font_with(ch: str, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont | None:
    """The first of the default font and the fallback that has a glyph for ``ch``, or None."""
    for font in (_font(size), _fallback(size)):
        if font is not None and (ch == " " or _looks(font, ch) != _looks(font, _NO_GLYPH)):
            return font
    return None


def _looks(font: ImageFont.FreeTypeFont | ImageFont.ImageFont, ch: str) -> tuple:
    """A glyph's bitmap and advance: equal to the missing glyph's when the font lacks ``ch``."""
    mask = font.getmask(ch)
    return mask.size, bytes(mask) if 0 not in mask.size else b"", font.getlength(ch)


@functools.cache
def _glyph(ch: str, size: int, color: tuple[int, int, int]) -> tuple[np.ndarray, float]:
    """(line height, glyph width, 3) uint8 of ``ch`` in ``color`` on white, and its advance."""
    font = _font_with(ch, size) or _font(size)
    ascent, descent = _font(size).getmetrics()  # one line height, whichever font draws
    right = font.getbbox(ch)[2]
    mask = Image.new("L", (max(int(right), 1), ascent + descent), 0)
    ImageDraw.Draw(mask).text((0, 0), ch, fill=255, font=font)
    alpha = np.asarray(mask, dtype=np.float32)[:, :, None] / 255  # (gh, gw, 1) coverage
    ink = np.asarray(color, dtype=np.float32)
    glyph = np.round(255 - alpha * (255 - ink)).astype(np.uint8)  # white blended toward ink
    return glyph, font.getlength(ch)
