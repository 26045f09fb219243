"""fm_lightning.pictures.similarity: the CKA heatmap's cells, labels, scale and n/a, read back."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fm_lightning.pictures import similarity
from fm_lightning.pictures.similarity import NA_RGB, similarity_picture
from fm_lightning.rendering import COLORBAR_PX, colorbar, colorize

NAMES = ["conv1", "relu1", "layer1.0.conv2"]
VALUES = torch.tensor([[1.0, 0.82, 0.1], [0.82, 1.0, 0.0], [0.1, 0.0, 1.0]])


def cell(img, i, j, values=VALUES, rows=NAMES, cols=NAMES):
    """The pixels of cell (i, j), found from the corner of the picture's first cell."""
    first = first_cell(img, values)
    y, x = first[0] + i * similarity._CELL_H, first[1] + j * similarity._CELL_W
    return img[y : y + similarity._CELL_H - 1, x : x + similarity._CELL_W - 1]


def first_cell(img, values):
    """(y, x) of the top-left pixel of cell (0, 0): the first pixel of its colour."""
    rgb = colorize(values[:1, :1].clamp(0, 1), similarity.CMAP).mul(255).round()
    rgb = rgb.flatten().to(torch.uint8)
    ys, xs = np.nonzero((img.numpy() == rgb.numpy()).all(axis=2))
    return int(ys.min()), int(xs[ys == ys.min()].min())


def test_each_cell_is_coloured_by_its_value_on_a_fixed_0_to_1_scale_with_its_value_written():
    img = similarity_picture(VALUES, NAMES, NAMES, "linear CKA between layers, epoch 3")
    assert img.dtype == torch.uint8 and img.shape[2] == 3
    for i in range(3):
        for j in range(3):
            expected = colorize(VALUES[i : i + 1, j : j + 1], "viridis").mul(255).round()
            corner = cell(img, i, j)[1, 1]  # no text in a corner
            assert torch.equal(corner, expected.flatten().to(torch.uint8)), (i, j)
    # The value is written: 0.8245 and 0.8251 are one colour (the same of 256 levels), but one
    # cell reads 0.82 and the other 0.83.
    drawn = []
    for value in (0.8245, 0.8251):
        values = VALUES.clone()
        values[0, 1] = value
        drawn.append(cell(similarity_picture(values, NAMES, NAMES, "t"), 0, 1))
    assert torch.equal(drawn[0][1, 1], drawn[1][1, 1])
    assert not torch.equal(drawn[0], drawn[1])
    # Dark cells get light text: a value on dark purple has pixels brighter than its cell.
    assert cell(img, 1, 2).float().mean(dim=2).max() > 200
    # The colour scale, 0 to 1, is drawn whole.
    bar = torch.from_numpy(colorbar("viridis", *COLORBAR_PX))
    found = any(
        torch.equal(img[y : y + COLORBAR_PX[0], x : x + COLORBAR_PX[1]], bar)
        for y in range(img.shape[0] - COLORBAR_PX[0])
        for x in range(40)
    )
    assert found


def test_undefined_cells_are_grey_n_a_and_nan_never_reaches_the_picture():
    values = VALUES.clone()
    defined = torch.ones(3, 3, dtype=torch.bool)
    defined[2, :] = defined[:, 2] = False
    values[2, 2] = math.nan  # what an undefined cell holds does not matter
    img = similarity_picture(values, NAMES, NAMES, "t", defined=defined)
    na = cell(img, 2, 0)
    assert tuple(na[1, 1].tolist()) == NA_RGB
    assert torch.equal(cell(img, 0, 2), na) and torch.equal(cell(img, 2, 2), na)  # all "n/a"
    with pytest.raises(
        ValueError, match=r"expected finite values where defined, got nan at \(2, 2\)"
    ):
        similarity_picture(values, NAMES, NAMES, "t")


def test_rows_and_columns_are_labelled_and_bad_arguments_are_named():
    short = similarity_picture(VALUES[:2, :2], ["a", "b"], ["c", "d"], "t")
    long_rows = similarity_picture(VALUES[:2, :2], ["a" * 90, "b"], ["c", "d"], "t")
    long_cols = similarity_picture(VALUES[:2, :2], ["a", "b"], ["c" * 30, "d"], "t")
    assert long_rows.shape[1] > short.shape[1] and long_cols.shape[0] > short.shape[0]
    # Rows and columns differ (another run's layers): a 2 x 3 matrix.
    assert similarity_picture(VALUES[:2], ["a", "b"], NAMES, "t").shape[2] == 3
    with pytest.raises(ValueError, match=r"expected values of shape .* = \(2, 3\), .*got \(3, 3\)"):
        similarity_picture(VALUES, ["a", "b"], NAMES, "t")
    with pytest.raises(ValueError, match=r"expected defined as a bool tensor of shape \(3, 3\)"):
        similarity_picture(VALUES, NAMES, NAMES, "t", defined=torch.ones(3, 3))
