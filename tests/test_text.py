"""fm_lightning.text: labels stamped from cached glyphs look as PIL draws them."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from fm_lightning.text import stamp, text_width, visible


def pil_drawn(text: str, color: tuple[int, int, int], size: int, xy=(3, 2), shape=(20, 90)):
    canvas = Image.new("RGB", (shape[1], shape[0]), (255, 255, 255))
    ImageDraw.Draw(canvas).text(xy, text, fill=color, font=ImageFont.load_default(size=size))
    return np.asarray(canvas)


@pytest.mark.parametrize(
    "text", ["74.6", "-0.0123", "1.23e+03", "ch 12", "dead", "nan", "-inf", "none"]
)
@pytest.mark.parametrize("color", [(0, 0, 0), (214, 39, 40)])
def test_stamp_draws_what_pil_draws(text, color):
    pixels = np.full((20, 90, 3), 255, dtype=np.uint8)
    stamp(pixels, (3, 2), text, color, size=10)
    expected = pil_drawn(text, color, 10)
    assert (pixels != 255).any()  # something was drawn
    # The same glyphs at the same places: at most a rounding step apart anywhere.
    assert np.abs(pixels.astype(int) - expected.astype(int)).max() <= 1


def test_stamp_keeps_the_darker_pixel_and_clips_at_the_edges():
    pixels = np.full((12, 30, 3), 255, dtype=np.uint8)
    pixels[:, :5] = 0  # a black band the text runs over
    stamp(pixels, (-4, -3), "8888888", (200, 0, 0), size=10)  # starts and ends off the canvas
    assert (pixels[:, :5] == 0).all()  # black stays black under red ink
    assert ((pixels[:, 5:, 0] == 200) | (pixels[:, 5:, 1] > 0)).all()  # red ink, or lighter
    assert (pixels[:, 5:, 1] < 255).any()


def test_every_character_the_grids_write_has_a_glyph():
    # A character missing from the font draws as the same box as any other missing one (PIL's
    # default font has no en dash, for one): scores, labels and "none" must not.
    from fm_lightning.text import _glyph

    missing = _glyph("\ue000", 10, (0, 0, 0))[0]  # a private-use character: never in a font
    for ch in "0123456789.-+e chdeadnoneinf":
        if ch != " ":
            glyph = _glyph(ch, 10, (0, 0, 0))[0]
            assert glyph.shape != missing.shape or not np.array_equal(glyph, missing), ch


def test_text_width_is_the_pens_advance():
    assert text_width("") == 0
    assert text_width("00") == 2 * text_width("0") > 0
    font = ImageFont.load_default(size=10)
    assert abs(text_width("-0.0123") - font.getlength("-0.0123")) <= 1


def test_stamp_rejects_what_is_not_rgb_uint8():
    with pytest.raises(ValueError, match=r"expected \(H, W, 3\) uint8 pixels, got \(4, 4\) uint8"):
        stamp(np.zeros((4, 4), np.uint8), (0, 0), "x", (0, 0, 0))
    with pytest.raises(ValueError, match=r"got \(4, 4, 3\) float32"):
        stamp(np.zeros((4, 4, 3), np.float32), (0, 0), "x", (0, 0, 0))


def _stamped(text: str, shape=(20, 160)) -> np.ndarray:
    pixels = np.full((*shape, 3), 255, dtype=np.uint8)
    stamp(pixels, (3, 2), text, (0, 0, 0), size=10)
    return pixels


def test_text_the_font_lacks_is_drawn_from_a_fallback_or_escaped_never_as_a_box():
    # what the default font draws for any character it lacks: the box to never see
    box = pil_drawn("\ue000", (0, 0, 0), 10)[:, :12]
    assert (box != 255).any()
    assert visible("conv 中 😀\tx\ny") == "conv \\u4e2d 😀\\tx\\ny"  # 😀: DejaVu has one
    for text, escaped in (("中", "\\u4e2d"), ("\t", "\\t"), ("\n", "\\n"), ("\u200b", "\\u200b")):
        assert np.array_equal(_stamped(text), _stamped(escaped)), text
        assert text_width(text) == text_width(escaped) > 0
    for ch in "é→😀–":  # in DejaVu Sans: drawn, and not as the box
        drawn = _stamped(ch)
        assert visible(ch) == ch and (drawn != 255).any(), ch
        assert not np.array_equal(drawn[:, :12], box), ch
        assert not np.array_equal(drawn, _stamped("\ue000")), ch
    assert np.array_equal(_stamped("ch 12"), pil_drawn("ch 12", (0, 0, 0), 10, shape=(20, 160)))
