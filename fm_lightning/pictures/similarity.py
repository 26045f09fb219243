"""The layer x layer CKA heatmap: one cell per pair of layers, its value written in it.

    values, defined = cka_matrix(grams, grams)          # fm_lightning.cka: (La, Lb), (La, Lb)
    img = similarity_picture(values, names, names, "linear CKA between layers, epoch 3",
                             defined=defined, notes=["n = 512 validation inputs"])
    save_png(img, "feature_maps/similarity/epoch=003.png")   # (H, W, 3) uint8

Rows are labelled on the left, columns above (written bottom to top), every cell holds its value
to two decimals, or "n/a" on grey where the CKA is undefined (a constant or dead layer). Colours
run over CKA's whole range, 0 to 1, whatever the values, so pictures of different epochs and
runs read alike; the scale and what a cell means are written under the matrix. A pure function of
its inputs, drawn with :mod:`fm_lightning.rendering`'s colormaps and :mod:`fm_lightning.text`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from fm_lightning.rendering import COLORBAR_PX, FONT_PX, LINE_PX, TEXT_RGB, colorbar, colorize
from fm_lightning.text import stamp, text_width

__all__ = ["similarity_picture"]

CMAP = "viridis"
NA_RGB = (221, 221, 221)  # light grey: outside viridis, and dark text stays readable on it
_CELL_H = LINE_PX + 8
_CELL_W = text_width("0.00", FONT_PX) + 12
_PAD = 4  # around the picture and between labels and cells
# Text goes white on cells darker than this (viridis' lower half), dark on the others.
_DARK_LUMA = 0.5
LEGEND = (
    "cell: linear CKA (Kornblith et al. 2019) of the row's and the column's layer on the same",
    "inputs; 1 = the same representation up to rotation and scale, near 0 = unrelated",
    "n/a: no CKA, a layer constant (dead) on these inputs or with non-finite values",
)


@torch.no_grad()
def similarity_picture(
    values: Tensor,
    row_names: Sequence[str],
    col_names: Sequence[str],
    title: str,
    defined: Tensor | None = None,
    notes: Sequence[str] = (),
) -> Tensor:
    """Draw a CKA matrix as a labelled heatmap.

    Args:
        values: (La, Lb) CKA of row layer i and column layer j, in [0, 1]; finite wherever
            ``defined`` is True (NaN is refused, so it can never be drawn).
        row_names, col_names: The La and Lb layer names.
        title: First line, e.g. ``"linear CKA between layers, epoch 3"``.
        defined: (La, Lb) bool, False where there is no CKA (see ``fm_lightning.cka.cka_matrix``);
            None for all defined.
        notes: More lines under the title, e.g. which runs the rows and columns are.

    Returns:
        (H, W, 3) uint8 on the CPU.
    """
    values, defined = _checked(values, defined, row_names, col_names)
    rows, cols = len(row_names), len(col_names)
    label_w = max(text_width(name, FONT_PX) for name in row_names) + _PAD
    label_h = max(text_width(name, FONT_PX) for name in col_names) + _PAD
    header = [title, *notes]
    top = _PAD + LINE_PX * len(header) + _PAD  # the matrix's column labels start here
    grid_x, grid_y = _PAD + label_w, top + label_h  # the first cell's corner
    scale_y = grid_y + rows * _CELL_H + _PAD
    width = max(
        grid_x + cols * _CELL_W + _PAD,
        *(text_width(line, FONT_PX) + 2 * _PAD for line in (*header, *LEGEND)),
    )
    height = scale_y + LINE_PX * (1 + len(LEGEND)) + 2 * _PAD
    pixels = np.full((height, width, 3), 255, dtype=np.uint8)
    for i, line in enumerate(header):
        stamp(pixels, (_PAD, _PAD + i * LINE_PX), line, TEXT_RGB, FONT_PX)

    colors = colorize(values.clamp(0, 1), CMAP)  # (3, La, Lb) in [0, 1]
    luma = (colors * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(0)  # (La, Lb)
    rgb = colors.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()  # (La, Lb, 3)
    for i, name in enumerate(row_names):
        y = grid_y + i * _CELL_H
        x = grid_x - _PAD - text_width(name, FONT_PX)  # right-aligned beside its row
        stamp(pixels, (x, y + (_CELL_H - LINE_PX) // 2), name, TEXT_RGB, FONT_PX)
        for j in range(cols):
            x = grid_x + j * _CELL_W
            cell = pixels[y : y + _CELL_H - 1, x : x + _CELL_W - 1]  # 1 px white separators
            text = f"{values[i, j].item():.2f}" if defined[i, j] else "n/a"
            cell[:] = rgb[i, j] if defined[i, j] else NA_RGB
            light = bool(defined[i, j]) and luma[i, j].item() < _DARK_LUMA
            _write_centred(cell, text, light)
    for j, name in enumerate(col_names):
        # Written on its side, reading upwards, its end just above its column.
        strip = np.full((LINE_PX, text_width(name, FONT_PX)), 255, dtype=np.uint8)[..., None]
        strip = np.repeat(strip, 3, axis=2)
        stamp(strip, (0, 0), name, TEXT_RGB, FONT_PX)
        upright = np.rot90(strip)  # (w, LINE_PX, 3)
        x = grid_x + j * _CELL_W + (_CELL_W - LINE_PX) // 2
        pixels[grid_y - _PAD - upright.shape[0] : grid_y - _PAD, x : x + LINE_PX] = upright

    bar_h, bar_w = COLORBAR_PX
    stamp(pixels, (_PAD, scale_y), "0", TEXT_RGB, FONT_PX)
    bar_x = _PAD + text_width("0 ", FONT_PX)
    pixels[scale_y + 2 : scale_y + 2 + bar_h, bar_x : bar_x + bar_w] = colorbar(CMAP, bar_h, bar_w)
    stamp(pixels, (bar_x + bar_w + 2, scale_y), "1  colour: CKA, 0 to 1", TEXT_RGB, FONT_PX)
    for i, line in enumerate(LEGEND, start=1):
        stamp(pixels, (_PAD, scale_y + i * LINE_PX), line, TEXT_RGB, FONT_PX)
    return torch.from_numpy(pixels)


def _write_centred(cell: np.ndarray, text: str, light: bool) -> None:
    """Write ``text`` in the middle of ``cell`` (h, w, 3): dark, or white on a dark cell."""
    h, w = cell.shape[:2]
    xy = ((w - text_width(text, FONT_PX)) // 2, (h - LINE_PX) // 2 + 1)
    if not light:
        stamp(cell, xy, text, TEXT_RGB, FONT_PX)
        return
    # stamp writes dark on light: write on white, then lighten the cell by the glyphs' coverage.
    ink = np.full_like(cell, 255)
    stamp(ink, xy, text, TEXT_RGB, FONT_PX)
    coverage = 1 - ink[..., :1].astype(np.float32) / 255  # (h, w, 1)
    cell[:] = np.round(cell + coverage * (255 - cell.astype(np.float32))).astype(np.uint8)


def _checked(
    values: Tensor, defined: Tensor | None, row_names: Sequence[str], col_names: Sequence[str]
) -> tuple[Tensor, Tensor]:
    """``values`` as float32 on the CPU and ``defined`` as bool, checked ("expected X, got Y")."""
    if not isinstance(values, Tensor):
        raise TypeError(f"expected values to be a Tensor, got {type(values).__name__}")
    shape = (len(row_names), len(col_names))
    if tuple(values.shape) != shape or 0 in shape:
        raise ValueError(
            f"expected values of shape (rows, columns) = {shape}, both >= 1, "
            f"got {tuple(values.shape)}"
        )
    if not all(isinstance(name, str) for name in (*row_names, *col_names)):
        raise TypeError("expected row_names and col_names to be strings")
    values = values.detach().float().cpu()
    if defined is None:
        defined = torch.ones(shape, dtype=torch.bool)
    if not isinstance(defined, Tensor) or defined.dtype != torch.bool or defined.shape != shape:
        got = f"{defined.dtype} {tuple(defined.shape)}" if isinstance(defined, Tensor) else defined
        raise ValueError(f"expected defined as a bool tensor of shape {shape}, got {got}")
    defined = defined.cpu()
    bad = ~values.isfinite() & defined
    if bad.any():
        i, j = torch.nonzero(bad)[0].tolist()
        raise ValueError(
            f"expected finite values where defined, got {values[i, j].item()} at ({i}, {j}) "
            "(mark a missing CKA with defined=False: it is drawn as n/a)"
        )
    return values.masked_fill(~defined, 0.0), defined
