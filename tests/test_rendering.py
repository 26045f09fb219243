"""Tests for fm_lightning.rendering: real tensors in, pixels and numbers out."""

import math

import matplotlib
import numpy as np
import pytest
import torch

from fm_lightning.rendering import (
    FLAT_GREY,
    MAX_FEATURES,
    UnsupportedActivationError,
    activation_stats,
    colorbar,
    colorize,
    feature_grid,
    feature_picture,
    header_height,
    image_grid,
    normalize_maps,
    select_channels,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def grid_size(rows, cols, h, w, padding=1):
    """Expected (H_out, W_out) of a grid of rows x cols tiles of h x w pixels."""
    return rows * (h + padding) + padding, cols * (w + padding) + padding


# ----------------------------------------------------------------------------- feature_grid


@pytest.mark.parametrize(
    ("n", "c", "max_channels", "shown"),
    [(3, 10, 4, 4), (2, 3, 32, 3), (4, 16, 16, 16), (1, 5, 1, 1)],
)
def test_feature_grid_rows_are_images_and_columns_are_channels(n, c, max_channels, shown):
    grid = feature_grid(torch.randn(n, c, 20, 20), max_channels=max_channels)
    assert grid.dtype == torch.uint8
    assert grid.shape == (*grid_size(n, shown, 20, 20), 3)


def test_feature_grid_padding_draws_separators():
    grid = feature_grid(torch.randn(2, 3, 20, 20), padding=2)
    assert grid.shape == (*grid_size(2, 3, 20, 20, padding=2), 3)
    # Border and the line between the two image rows are white separators.
    assert (grid[:2] == 255).all()
    assert (grid[22:24] == 255).all()
    assert (grid[:, 22:24] == 255).all()
    assert not (grid[2:22, 2:22] == 255).all()


@pytest.mark.parametrize(("side", "scaled"), [(1, 16), (4, 16), (5, 20), (8, 16), (16, 16)])
def test_feature_grid_enlarges_tiny_maps_by_integer_factor(side, scaled):
    act = torch.randn(2, 3, side, side)
    grid = feature_grid(act)
    assert grid.shape == (*grid_size(2, 3, scaled, scaled), 3)
    # Nearest neighbour: each source pixel becomes a uniform block.
    factor = scaled // side
    tile = grid[1 : 1 + scaled, 1 : 1 + scaled]
    assert torch.equal(
        tile, tile[::factor, ::factor].repeat_interleave(factor, 0).repeat_interleave(factor, 1)
    )


def test_feature_grid_2d_is_heatmap_with_one_row_per_image():
    grid = feature_grid(torch.randn(4, 10), max_channels=2)  # max_channels must not truncate
    cell_w = math.ceil(256 / 10)
    assert grid.dtype == torch.uint8
    assert grid.shape == (*grid_size(4, 1, 8, 10 * cell_w), 3)


def test_feature_grid_2d_caps_huge_feature_counts():
    grid = feature_grid(torch.randn(2, MAX_FEATURES + 500))
    assert grid.shape == (*grid_size(2, 1, 8, MAX_FEATURES), 3)


def test_feature_grid_2d_rows_are_normalised_independently():
    act = torch.stack([torch.linspace(0, 1, 300), torch.linspace(0, 1000, 300)])  # (2, 300)
    grid = feature_grid(act)
    row0, row1 = grid[1:9], grid[10:18]
    assert torch.equal(row0, row1)  # same pattern, 1000x the scale
    assert row0[:, 1:-1].float().std() > 0


def test_feature_grid_3d_is_drawn_as_height_one_maps():
    grid = feature_grid(torch.randn(2, 3, 50))
    assert grid.shape == (*grid_size(2, 3, 16, 50), 3)


def test_feature_grid_of_random_data_is_not_blank():
    grid = feature_grid(torch.randn(4, 16, 24, 24)).float()
    assert grid.std() > 20
    assert len(torch.unique(grid.reshape(-1, 3), dim=0)) > 100


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64, torch.int64])
def test_feature_grid_accepts_other_dtypes(dtype):
    act = (torch.randn(2, 4, 8, 8) * 10).to(dtype)
    grid = feature_grid(act)
    assert grid.dtype == torch.uint8
    assert grid.shape == (*grid_size(2, 4, 16, 16), 3)
    assert grid.float().std() > 0


def test_feature_grid_order_activation_matches_preselected_channels():
    act = torch.randn(2, 16, 6, 6) * 0.1
    act[:, 7] *= 100
    auto = feature_grid(act, max_channels=1, order="activation")
    idx = select_channels(act, 1, order="activation")
    pre = feature_grid(act.index_select(1, idx), channels=idx)
    assert idx.tolist() == [7]
    assert torch.equal(auto, pre)
    assert not torch.equal(auto, feature_grid(act, max_channels=1, order="index"))


def test_feature_grid_rejects_channels_that_do_not_match_act():
    with pytest.raises(ValueError, match="expected act to hold the 2 given channels, got 3"):
        feature_grid(torch.randn(1, 3, 4, 4), channels=torch.tensor([0, 1]))


@pytest.mark.parametrize("shape", [(), (5,), (1, 2, 3, 4, 5), (0, 3, 4, 4)])
def test_unsupported_shapes_raise(shape):
    with pytest.raises(UnsupportedActivationError) as info:
        feature_grid(torch.randn(shape))
    msg = str(info.value)
    assert msg == f"expected a (N, C, H, W) or (N, F) activation, got shape {shape}"
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"normalize": "global"}, "expected normalize to be one of .*, got 'global'"),
        ({"order": "random"}, "expected order to be one of .*, got 'random'"),
        ({"cmap": "no-such-map"}, "got 'no-such-map'"),
    ],
)
def test_feature_grid_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        feature_grid(torch.randn(1, 2, 4, 4), **kwargs)


def test_feature_grid_rejects_non_tensor():
    with pytest.raises(TypeError, match="expected act to be a Tensor, got list"):
        feature_grid([[1.0, 2.0]])


def test_feature_grid_draws_dead_and_flat_maps_flat_grey():
    act = torch.randn(2, 4, 8, 8)
    act[:, 1] = -act[:, 1].abs() - 0.1  # dead: never above 0, yet it varies
    act[1, 2] = 3.0  # one flat map of a live channel
    grid = feature_grid(act)  # 8x8 maps enlarged to 16x16
    grey = round(FLAT_GREY * 255)

    def tile(row, col):
        return grid[1 + 17 * row : 17 + 17 * row, 1 + 17 * col : 17 + 17 * col]

    for row in range(2):
        assert (tile(row, 1) == grey).all()  # the dead channel, in every image
        assert tile(row, 0).float().std() > 10 and tile(row, 3).float().std() > 10
    assert (tile(1, 2) == grey).all() and tile(0, 2).float().std() > 10
    # In "layer" mode a constant map has a place on the shared scale: only the dead are grey.
    layer = feature_grid(act, normalize="layer")
    assert (layer[18:34, 18:34] == grey).all()
    assert not (layer[18:34, 35:51] == grey).all()


def _ink(block: torch.Tensor) -> torch.Tensor:
    """Pixels of a white label area that text was drawn on, (h, w) bool."""
    return (block < 200).any(dim=-1)


def _red(block: torch.Tensor) -> torch.Tensor:
    """(h, w) bool: pixels of red text (DEAD_RGB, anti-aliased on white)."""
    r, g, b = block.int().unbind(dim=-1)
    return (r - g > 60) & (r - b > 60)


def test_feature_picture_numbers_columns_and_shows_the_colour_scale():
    act = torch.randn(3, 12, 8, 8)
    act[:, 9] = -0.1  # dead, and too weak to be drawn
    picture = feature_picture(act, max_channels=6, order="activation", normalize="channel")
    channels = [int(c) for c in torch.sort(act.abs().mean(dim=(0, 2, 3)), descending=True)[1][:6]]
    assert 9 not in channels
    top = header_height([str(c) for c in channels], 17)
    grid = feature_grid(act, max_channels=6, order="activation")
    assert picture.dtype == torch.uint8 and picture.shape[0] > top + grid.shape[0]
    # The grid sits under the header, unchanged.
    assert torch.equal(picture[top : top + grid.shape[0], : grid.shape[1]], grid)
    header = picture[:top]
    for j in range(6):  # a number above every column, within it
        assert _ink(header[:, 1 + 17 * j : 17 + 17 * j]).any(), j
    # The numbers are the channels drawn: another choice of channels writes another header.
    other = feature_picture(act, max_channels=6, order="index")
    assert not torch.equal(other[:top], header)
    # Below: the colour scale, the colormap from its lowest to its highest colour.
    legend = picture[top + grid.shape[0] :].reshape(-1, 3)
    bar = torch.from_numpy(colorbar("viridis", 1, 64))[0]
    for color in (bar[0], bar[-1]):
        assert (legend == color).all(dim=1).any()
    assert not _red(header).any()  # no dead channel drawn, none marked


def test_feature_picture_marks_dead_channels_red_and_names_wide_numbers_without_overlap():
    act = torch.randn(2, 1200, 4, 4)
    act[:, 1003] = -2.0
    channels = torch.tensor([1001, 1002, 1003, 1004])
    picture = feature_picture(act[:, channels], channels=channels)
    lines = header_height([str(c) for c in channels.tolist()], 17) // 12
    assert lines == 2  # four digits are wider than a 16 px tile: two staggered lines
    red = _red(picture)  # (H, W)
    top = header_height([str(c) for c in channels.tolist()], 17)
    cols = red[:top].any(dim=0).nonzero().flatten()
    assert len(cols) and cols.min() >= 2 * 17 - 8 and cols.max() < 3 * 17 + 8  # over column 2
    assert red[top:].any()  # the legend's line on red numbers


def test_feature_picture_of_features_says_what_its_columns_are():
    picture = feature_picture(torch.randn(3, 100))
    grid = feature_grid(torch.randn(3, 100))
    assert picture.shape[1] >= grid.shape[1] and _ink(picture[:14]).any()


# ---------------------------------------------------------------------------- normalize_maps


def test_channel_mode_maps_each_map_to_exact_zero_one():
    scale = torch.tensor([1e-3, 1.0, 50.0, 1e4]).view(1, 4, 1, 1)
    act = torch.randn(3, 4, 7, 5) * scale + 3 * scale
    out = normalize_maps(act, "channel")
    assert out.dtype == torch.float32 and out.shape == act.shape
    assert torch.equal(out.amin(dim=(-2, -1)), torch.zeros(3, 4))
    assert torch.equal(out.amax(dim=(-2, -1)), torch.ones(3, 4))


def test_layer_mode_keeps_relative_channel_magnitudes():
    base = torch.rand(1, 1, 6, 6).repeat(2, 1, 1, 1)  # the same picture for both images
    base[:, :, 0, 0] = 0.0
    base[:, :, 0, 1] = 1.0
    act = torch.cat([base, 10 * base], dim=1)  # channel 1 is 10x channel 0
    act[1] *= 1000  # a different scale for image 1 must not matter
    out = normalize_maps(act, "layer")
    torch.testing.assert_close(out[:, 1], 10 * out[:, 0])
    torch.testing.assert_close(out[:, 0].amax(dim=(-2, -1)), torch.full((2,), 0.1))
    torch.testing.assert_close(out[0], out[1])
    # Per-channel mode would have stretched both channels to the same picture.
    torch.testing.assert_close(normalize_maps(act, "channel")[:, 0], out[:, 1])


@pytest.mark.parametrize("mode", ["channel", "layer"])
@pytest.mark.parametrize("value", [0.0, 5.0, -1e30])
def test_constant_maps_are_flat_zero(mode, value):
    out = normalize_maps(torch.full((2, 3, 4, 4), value), mode)
    assert torch.equal(out, torch.zeros_like(out))


def test_non_finite_values_render_finite_and_finite_parts_still_vary():
    act = torch.arange(16.0).view(1, 1, 4, 4).repeat(1, 2, 1, 1)
    act[0, 0, 0, 0] = math.nan
    act[0, 0, 0, 1] = math.inf
    act[0, 0, 0, 2] = -math.inf
    act[0, 1] = math.nan  # no finite value at all
    out = normalize_maps(act, "channel")
    assert out.isfinite().all()
    assert out[0, 0, 0, :3].tolist() == [0.0, 1.0, 0.0]  # NaN -> 0, +inf -> 1, -inf -> 0
    finite_part = out[0, 0].flatten()[3:]
    assert finite_part.min() == 0.0 and finite_part.max() == 1.0
    assert torch.equal(finite_part, torch.sort(finite_part).values)  # order preserved
    assert torch.equal(out[0, 1], torch.zeros(4, 4))

    grid = feature_grid(act)
    assert grid[1:17, 1:17].float().std() > 0  # the finite map is still drawn


@pytest.mark.parametrize("mode", ["channel", "layer"])
def test_one_by_one_maps_share_one_range_per_image_whatever_the_mode(mode):
    # A global pool's (N, C, 1, 1) output: per-map min-max would draw every tile at 0.
    act = torch.tensor([[1.0, 3.0, 2.0], [-50.0, 50.0, 0.0]]).view(2, 3, 1, 1)
    out = normalize_maps(act, mode)
    assert out.flatten(1).tolist() == [[0.0, 1.0, 0.5], [0.0, 1.0, 0.5]]

    grid = feature_grid(act, normalize=mode)  # 1x1 tiles enlarged to 16x16
    tiles = [grid[1:17, 1 + 17 * c : 17 + 17 * c] for c in range(3)]
    assert len({tuple(t[0, 0].tolist()) for t in tiles}) == 3  # three distinct colours
    assert all((t == t[0, 0]).all() for t in tiles)  # each tile is one flat colour


def test_normalize_maps_rejects_non_4d():
    with pytest.raises(ValueError, match=r"expected a \(N, C, H, W\) tensor, got shape \(2, 3\)"):
        normalize_maps(torch.randn(2, 3))


# --------------------------------------------------------------------------- select_channels


def test_select_channels_index_order():
    idx = select_channels(torch.randn(2, 10, 3, 3), 4)
    assert idx.dtype == torch.long
    assert idx.tolist() == [0, 1, 2, 3]
    assert select_channels(torch.randn(2, 3, 3, 3), 8).tolist() == [0, 1, 2]


def test_select_channels_activation_order_most_active_first():
    act = torch.randn(4, 16, 5, 5) * 0.1
    act[:, 7] = 10.0
    act[:, 3] = -5.0  # large magnitude, negative sign
    act[:, 0] = math.nan  # non-finite counts as 0, not as "most active"
    act[0, 1, 0, 0] = math.inf
    idx = select_channels(act, 3, order="activation")
    assert idx[:2].tolist() == [7, 3]
    assert 0 not in idx.tolist() and 1 not in idx.tolist()


def test_select_channels_works_on_2d_features():
    act = torch.zeros(3, 20)
    act[:, 12] = 1.0
    assert select_channels(act, 1, order="activation").tolist() == [12]


def test_select_channels_rejects_bad_max_channels():
    with pytest.raises(ValueError, match="expected max_channels >= 1, got 0"):
        select_channels(torch.randn(1, 3, 2, 2), 0)


# ---------------------------------------------------------------------------------- colorize


def test_gray_colormap_gives_equal_rgb():
    x = torch.rand(2, 3, 5, 6)
    rgb = colorize(x, "gray")
    assert rgb.shape == (2, 3, 3, 5, 6)
    assert torch.equal(rgb[..., 0, :, :], rgb[..., 1, :, :])
    assert torch.equal(rgb[..., 1, :, :], rgb[..., 2, :, :])
    torch.testing.assert_close(rgb[..., 0, :, :], x, atol=1 / 255, rtol=0)


def test_viridis_matches_matplotlib_and_differs_from_gray():
    x = torch.tensor([[0.0, 0.5, 1.0]])  # (H=1, W=3)
    rgb = colorize(x, "viridis")
    assert rgb.shape == (3, 1, 3)
    expected = matplotlib.colormaps["viridis"](np.linspace(0, 1, 256))[[0, 128, 255], :3]
    torch.testing.assert_close(rgb[:, 0].T, torch.from_numpy(expected).float())
    assert not torch.allclose(rgb, colorize(x, "gray"))


def test_colorize_clamps_out_of_range_and_nan():
    rgb = colorize(torch.tensor([[-3.0, math.nan, 7.0]]), "gray")
    assert rgb[0, 0].tolist() == [0.0, 0.0, 1.0]


def test_unknown_colormap_error_lists_valid_names():
    with pytest.raises(ValueError, match="expected a matplotlib colormap name") as info:
        colorize(torch.rand(2, 2), "not-a-cmap")
    assert "'viridis'" in str(info.value) and "got 'not-a-cmap'" in str(info.value)


# -------------------------------------------------------------------------------- image_grid


def test_image_grid_grayscale_replicated_to_rgb():
    grid = image_grid(torch.randn(2, 1, 10, 12))
    assert grid.dtype == torch.uint8
    assert grid.shape == (*grid_size(1, 2, 10, 12), 3)
    assert torch.equal(grid[..., 0], grid[..., 1]) and torch.equal(grid[..., 1], grid[..., 2])
    assert grid.float().std() > 0


def test_image_grid_rgb_normalises_each_image_independently():
    images = torch.rand(2, 3, 8, 8)
    images[1] = images[1] * 2000 - 1000  # normalised inputs can have any range
    grid = image_grid(images)
    assert grid.shape == (*grid_size(1, 2, 8, 8), 3)
    for tile in (grid[1:9, 1:9], grid[1:9, 10:18]):
        assert tile.min() == 0 and tile.max() == 255
    assert not torch.equal(grid[..., 0], grid[..., 1])  # real colour, not gray


def test_image_grid_other_channel_counts_and_nan():
    images = torch.randn(1, 4, 6, 6)
    images[0, 0, 0, 0] = math.nan
    grid = image_grid(images)
    assert grid.shape == (*grid_size(1, 1, 6, 6), 3)
    assert torch.equal(grid[..., 0], grid[..., 2])
    assert grid[1, 1].tolist() == [0, 0, 0]
    assert grid[1:7, 1:7].float().std() > 0


def test_image_grid_rejects_non_4d():
    with pytest.raises(ValueError, match=r"expected images of shape \(N, C, H, W\), got shape"):
        image_grid(torch.randn(3, 8, 8))


# -------------------------------------------------------------------------- activation_stats


def test_activation_stats_on_hand_built_tensor():
    act = torch.tensor(
        [
            # image 0: channels 0, 1 never positive (dead), 2, 3 alive
            [[[0.0, -1.0]], [[0.0, 0.0]], [[2.0, 0.0]], [[0.0, 0.0]]],
            [[[-1.0, -1.0]], [[0.0, -2.0]], [[0.0, 0.0]], [[4.0, 0.0]]],
        ]
    )  # (N=2, C=4, H=1, W=2)
    stats = activation_stats(act)
    assert set(stats) == {"mean", "std", "frac_zero", "dead_channels_probe"}
    assert all(type(v) is float for v in stats.values())
    assert stats["dead_channels_probe"] == 0.5
    assert stats["frac_zero"] == 10 / 16
    assert stats["mean"] == pytest.approx(act.mean().item())
    assert stats["std"] == pytest.approx(act.std(correction=0).item())


def test_activation_stats_ignores_non_finite_values():
    act = torch.tensor([[1.0, 3.0, math.nan, -math.inf], [0.0, 0.0, math.nan, 2.0]])  # (N, F)
    stats = activation_stats(act)
    finite = torch.tensor([1.0, 3.0, 0.0, 0.0, 2.0])
    assert stats["mean"] == pytest.approx(finite.mean().item())
    assert stats["std"] == pytest.approx(finite.std(correction=0).item())
    assert stats["frac_zero"] == 2 / 8
    assert stats["dead_channels_probe"] == 0.25  # only feature 2 (all NaN) is never positive
    assert not any(math.isnan(v) for v in stats.values())


def test_activation_stats_rejects_1d():
    with pytest.raises(UnsupportedActivationError, match=r"got shape \(5,\)"):
        activation_stats(torch.randn(5))
