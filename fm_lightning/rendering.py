"""Turn layer activations into images.

Example::

    act = torch.randn(4, 16, 24, 24)             # (N, C, H, W), e.g. from a forward hook
    grid = feature_grid(act, max_channels=8)     # (H_out, W_out, 3) uint8: rows = images
    save_png(grid, "feature_maps/conv1.png")      # fm_lightning.files
    stats = activation_stats(act)                # {"mean": ..., "dead_channels_probe": ...}

Everything here is a pure function of its inputs (no Lightning, no logger), so it can be
tested without a Trainer. Tensor functions run on whatever device their input is on;
the callback selects channels on the accelerator with :func:`select_channels` and moves
only those to the CPU before rendering.
"""

from __future__ import annotations

import difflib
import functools
import math

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.utils import make_grid

from fm_lightning.text import stamp, text_width

__all__ = [
    "MAX_FEATURES",
    "UnsupportedActivationError",
    "activation_stats",
    "colorbar",
    "colorize",
    "feature_grid",
    "feature_picture",
    "image_grid",
    "normalize_maps",
    "select_channels",
]

#: Most features drawn for a 2-D (N, F) activation; wider layers keep the first (or most
#: active) ``MAX_FEATURES`` so the heatmap stays a sensible width.
MAX_FEATURES = 1024

ORDERS = ("index", "activation")
NORMALIZE_MODES = ("channel", "layer")
# Smallest side a feature map is drawn at; smaller maps are enlarged by an integer factor.
_MIN_MAP_PX = 16
# A 2-D activation row is drawn this tall, and the heatmap at least this wide.
_HEATMAP_ROW_PX = 8
_HEATMAP_MIN_WIDTH_PX = 256
# White: outside the perceptual colormaps (viridis, magma, ...), so it reads as a separator.
_PAD_VALUE = 1.0
_COMMON_CMAPS = ("viridis", "magma", "inferno", "plasma", "cividis", "gray")
# A flat map (constant, or of a channel never above 0 on the drawn inputs) is drawn in this grey
# rather than stretched over the colormap: a neutral grey is in none of the perceptual colormaps.
FLAT_GREY = 0.6
#: Labels: 10 px text on 12 px lines; dead channels' numbers in red (as in the examples grids).
FONT_PX = 10
LINE_PX = 12
TEXT_RGB = (0, 0, 0)
DEAD_RGB = (214, 39, 40)
COLORBAR_PX = (8, 64)  # (height, width) of a colour scale


class UnsupportedActivationError(ValueError):
    """An activation whose shape cannot be drawn as a feature grid."""


@torch.no_grad()
def select_channels(act: Tensor, max_channels: int, order: str = "index") -> Tensor:
    """Choose which channels of an activation to draw.

    Args:
        act: Activation of shape (N, C, ...); channels are dim 1.
        max_channels: Most channels to return (at least 1).
        order: ``"index"`` for the first channels in order, or ``"activation"`` for the
            channels with the largest mean absolute activation over all probe images and
            positions, most active first. Non-finite values count as 0, so one overflowing
            value cannot make a channel win.

    Returns:
        LongTensor of at most ``max_channels`` channel indices, on ``act``'s device.
    """
    check_tensor(act, "act")
    _check_choice("order", order, ORDERS)
    if act.dim() < 2:
        raise ValueError(f"expected an (N, C, ...) activation, got shape {tuple(act.shape)}")
    if max_channels < 1:
        raise ValueError(f"expected max_channels >= 1, got {max_channels}")
    k = min(act.shape[1], max_channels)
    if order == "index":
        return torch.arange(k, device=act.device)
    not_channel = [0, *range(2, act.dim())]
    score = act.float().nan_to_num(0.0, 0.0, 0.0).abs().mean(dim=not_channel)  # (C,)
    # A stable sort breaks ties by channel index, so the selection is deterministic.
    return torch.sort(score, descending=True, stable=True).indices[:k]


@torch.no_grad()
def normalize_maps(act: Tensor, mode: str = "channel") -> Tensor:
    """Min-max normalise feature maps to [0, 1].

    Min and max are taken over finite values only. Then NaN is drawn as 0 (the map's
    minimum), +inf as 1 and -inf as 0, so a few bad values neither blank the map nor
    poison the image. Maps that are constant (or have no finite value) are drawn flat at 0.

    Args:
        act: Activations of shape (N, C, H, W), any real dtype.
        mode: ``"channel"`` normalises each (image, channel) map on its own, showing the
            pattern inside every map; ``"layer"`` uses one min/max per image over all its
            channels, so channel magnitudes stay comparable. 1x1 maps (a global pool's
            (N, C, 1, 1) embedding) always use one min/max per image: a single value
            normalised on its own would be drawn flat.

    Returns:
        float32 tensor of shape (N, C, H, W) with values in [0, 1].
    """
    check_tensor(act, "act")
    _check_choice("mode", mode, NORMALIZE_MODES)
    if act.dim() != 4:
        raise ValueError(f"expected a (N, C, H, W) tensor, got shape {tuple(act.shape)}")
    x = act.float()
    per_map = mode == "channel" and x.shape[-2:] != (1, 1)
    dims = (-2, -1) if per_map else (-3, -2, -1)
    finite = x.isfinite()
    lo = x.masked_fill(~finite, math.inf).amin(dim=dims, keepdim=True)  # (N, C|1, 1, 1)
    hi = x.masked_fill(~finite, -math.inf).amax(dim=dims, keepdim=True)
    # Maps without any finite value get lo = hi = 0 and so come out flat.
    lo = lo.nan_to_num(0.0, 0.0, 0.0)
    hi = hi.nan_to_num(0.0, 0.0, 0.0)
    x = torch.where(x.isnan(), lo, x).clamp(lo, hi)  # NaN -> min, +-inf -> max/min
    span = hi - lo
    return (x - lo) / torch.where(span > 0, span, 1.0)


@torch.no_grad()
def colorize(x01: Tensor, cmap: str = "viridis") -> Tensor:
    """Map values in [0, 1] to RGB through a matplotlib colormap.

    Values are quantised to 256 levels and looked up in a table, so the cost is one
    indexing op whatever the image size. Values outside [0, 1] are clamped, NaN drawn as 0.

    Args:
        x01: Tensor of shape (..., H, W) with values in [0, 1].
        cmap: Name of a matplotlib colormap, e.g. ``"viridis"`` or ``"gray"``.

    Returns:
        float32 tensor of shape (..., 3, H, W) with values in [0, 1].
    """
    check_tensor(x01, "x01")
    if x01.dim() < 2:
        raise ValueError(f"expected a (..., H, W) tensor, got shape {tuple(x01.shape)}")
    lut = _lut(cmap).to(x01.device)  # (256, 3)
    # Indexing with a uint8 tensor would be read as a boolean mask, hence the long indices.
    idx = x01.float().nan_to_num(0.0).clamp(0, 1).mul(255).round().long()  # (..., H, W)
    return lut[idx].movedim(-1, -3)  # (..., 3, H, W)


@torch.no_grad()
def feature_grid(
    act: Tensor,
    max_channels: int = 32,
    normalize: str = "channel",
    cmap: str = "viridis",
    order: str = "index",
    padding: int = 1,
    channels: Tensor | None = None,
) -> Tensor:
    """Draw one layer's activations as a single RGB image.

    Layout: one row per probe image, one column per channel shown, separated by white
    lines ``padding`` pixels wide. Maps smaller than 16 px are enlarged by an integer
    factor (nearest neighbour) so deep layers with 1x1 or 4x4 maps stay readable.

    Supported shapes:

    - (N, C, H, W): convolutional feature maps. 1x1 maps are normalised across the drawn
      channels of each image, whichever ``normalize`` mode, so their values show.
    - (N, C, L): 1-D feature maps, drawn as maps of height 1 (then enlarged).
    - (N, F): e.g. a Linear layer, drawn as one heatmap with a row (8 px tall) per image
      and a column per feature. Each row (image) has its own min/max, whichever
      ``normalize`` mode. ``max_channels`` does not apply; at most :data:`MAX_FEATURES`
      features are drawn.

    Args:
        act: Activations of one layer; half, bfloat16 and integer dtypes are accepted.
        max_channels: Most channels (columns) to draw.
        normalize: ``"channel"`` or ``"layer"``, see :func:`normalize_maps`.
        cmap: Matplotlib colormap name, see :func:`colorize`.
        order: Channel selection order, see :func:`select_channels`.
        padding: Separator width in pixels.
        channels: Indices of the channels ``act`` holds, when the caller already selected
            them (e.g. on the GPU, to move less data). ``act`` is then drawn as is.

    Returns:
        uint8 tensor of shape (H_out, W_out, 3) on ``act``'s device, ready for PIL.

    Raises:
        UnsupportedActivationError: If ``act`` is empty or not 2-, 3- or 4-D.
    """
    check_tensor(act, "act")
    _check_choice("normalize", normalize, NORMALIZE_MODES)
    if act.dim() not in (2, 3, 4) or act.numel() == 0:
        raise UnsupportedActivationError(
            f"expected a (N, C, H, W) or (N, F) activation, got shape {tuple(act.shape)}"
        )
    if channels is None:
        limit = MAX_FEATURES if act.dim() == 2 else max_channels
        act = act.index_select(1, select_channels(act, limit, order))
    elif act.shape[1] != len(channels):
        raise ValueError(
            f"expected act to hold the {len(channels)} given channels, got {act.shape[1]}"
        )

    if act.dim() == 2:
        # (N, 1, 1, F): each image's row is one map, so both modes normalise per row
        maps = act[:, None, None, :]
        min_h, min_w = _HEATMAP_ROW_PX, _HEATMAP_MIN_WIDTH_PX
    else:
        maps = act if act.dim() == 4 else act.unsqueeze(2)  # (N, C, H, W)
        min_h = min_w = _MIN_MAP_PX
    n, c = maps.shape[:2]
    flat = _flat_maps(maps, normalize) if act.dim() > 2 else None  # (N, C)
    maps = upscale(normalize_maps(maps, normalize), min_h, min_w)  # (N, C, h, w)
    tiles = colorize(maps, cmap)  # (N, C, 3, h, w)
    if flat is not None:
        tiles = tiles.masked_fill(flat[:, :, None, None, None], FLAT_GREY)
    return tile_grid(tiles.flatten(0, 1), nrow=c, padding=padding)  # image-major tiles


@torch.no_grad()
def feature_picture(
    act: Tensor,
    max_channels: int = 32,
    normalize: str = "channel",
    cmap: str = "viridis",
    order: str = "index",
    padding: int = 1,
    channels: Tensor | None = None,
) -> Tensor:
    """:func:`feature_grid` with what it takes to read it without the code that drew it.

    Above the grid, each column's channel number (in red for a dead channel: never above 0 on
    these inputs; staggered over several lines where the numbers are wider than the tiles).
    Below it, the colour scale and what it spans (each map's own min..max, or each row's), the
    range of the values drawn, and what grey tiles and red numbers mean.
    For an (N, F) activation the header says how many features the columns are.

    Arguments as :func:`feature_grid`. Returns an (H, W, 3) uint8 tensor on the CPU; the grid
    is its top-left block below a header of :func:`header_height` pixels.
    """
    check_tensor(act, "act")
    if channels is None and act.dim() in (2, 3, 4) and act.numel():
        channels = select_channels(act, MAX_FEATURES if act.dim() == 2 else max_channels, order)
        act = act.index_select(1, channels)
    grid = feature_grid(act, max_channels, normalize, cmap, order, padding, channels).cpu()
    n, c = act.shape[:2]
    x = act.detach().float().cpu()
    dead = None  # (C,) bool, for maps
    if act.dim() > 2:
        dead = _dead_channels(x if x.dim() == 4 else x.unsqueeze(2))
    numbers = [str(ch) for ch in channels.tolist()]
    col_w = (grid.shape[1] - padding) // c  # a tile and its separator
    header = [] if dead is None else _column_labels(numbers, col_w)
    top = header_height(numbers, col_w) if dead is not None else LINE_PX + 2
    finite = x[x.isfinite()]
    lo, hi = (finite.min().item(), finite.max().item()) if finite.numel() else (math.nan,) * 2
    per_map = normalize == "channel" and dead is not None and tuple(x.shape[2:]) not in ((1, 1),)
    scale = "of each map" if per_map else "of each row (image), over its columns"
    columns = "channels" if dead is not None else f"{c} features"
    legend = [
        (f"values drawn: {lo:.3g} to {hi:.3g}; rows: {n} inputs, columns: {columns}", TEXT_RGB)
    ]
    if dead is not None:  # always said, so that every epoch's picture has the same size
        legend.append(("grey tile: a flat map (constant, or its channel dead)", TEXT_RGB))
        legend.append(("red number: a dead channel, never above 0 on these inputs", DEAD_RGB))
    bar_h, bar_w = COLORBAR_PX
    low_w = text_width("min ", FONT_PX)
    scale_text = f" max {scale}"
    width = max(
        grid.shape[1],
        low_w + bar_w + text_width(scale_text, FONT_PX) + 4,
        *(text_width(line, FONT_PX) + 4 for line, _ in legend),
    )
    height = top + grid.shape[0] + LINE_PX * (len(legend) + 1) + 4
    pixels = np.full((height, width, 3), 255, dtype=np.uint8)
    pixels[top : top + grid.shape[0], : grid.shape[1]] = grid.numpy()
    if dead is None:
        stamp(pixels, (padding, 1), f"{c} features, one column each", TEXT_RGB, FONT_PX)
    for j, (x0, y0, text) in enumerate(header):
        stamp(pixels, (x0 + padding, y0), text, DEAD_RGB if dead[j] else TEXT_RGB, FONT_PX)
    y = top + grid.shape[0] + 2
    stamp(pixels, (2, y), "min", TEXT_RGB, FONT_PX)
    pixels[y + 2 : y + 2 + bar_h, 2 + low_w : 2 + low_w + bar_w] = colorbar(cmap, bar_h, bar_w)
    stamp(pixels, (2 + low_w + bar_w, y), scale_text, TEXT_RGB, FONT_PX)
    for i, (line, color) in enumerate(legend, start=1):
        stamp(pixels, (2, y + i * LINE_PX), line, color, FONT_PX)
    return torch.from_numpy(pixels)


def header_height(labels: list[str], col_w: int) -> int:
    """Pixels above a grid that :func:`feature_picture` gives column labels of this width."""
    return LINE_PX * _label_lines(labels, col_w) + 2


def colorbar(cmap: str, height: int, width: int) -> np.ndarray:
    """(height, width, 3) uint8: ``cmap`` from 0 (left) to 1 (right)."""
    ramp = torch.linspace(0, 1, width).expand(height, width)
    return colorize(ramp, cmap).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def _label_lines(labels: list[str], col_w: int) -> int:
    # As many lines as it takes for the labels of neighbouring columns not to overlap.
    widest = max((text_width(s, FONT_PX) for s in labels), default=0)
    return max(1, math.ceil((widest + 2) / max(col_w, 1)))


def _column_labels(labels: list[str], col_w: int) -> list[tuple[int, int, str]]:
    """(x, y, text) of each column's label, centred on it, staggered over lines as needed."""
    lines = _label_lines(labels, col_w)
    tile_w = col_w - 1
    return [
        (j * col_w + (tile_w - text_width(s, FONT_PX)) // 2, (j % lines) * LINE_PX + 1, s)
        for j, s in enumerate(labels)
    ]


def _dead_channels(maps: Tensor) -> Tensor:
    """(C,) bool: channels of (N, C, H, W) maps never above 0 (NaN counts as not above)."""
    return ~(maps > 0).flatten(2).any(dim=2).any(dim=0)


def _flat_maps(maps: Tensor, normalize: str) -> Tensor:
    """(N, C) bool: maps drawn flat grey. Every map of a dead channel; in ``"channel"`` mode also
    a map of more than one pixel whose finite values are all equal (its own range is empty).
    Stretched to the colormap, such maps would look as alive as any other."""
    flat = _dead_channels(maps)[None].expand(maps.shape[0], -1)
    if normalize == "channel" and maps.shape[-2] * maps.shape[-1] > 1:
        x = maps.float().flatten(2)
        finite = x.isfinite()
        hi = x.masked_fill(~finite, -math.inf).amax(dim=2)
        lo = x.masked_fill(~finite, math.inf).amin(dim=2)
        flat = flat | ~(hi > lo)
    return flat


@torch.no_grad()
def image_grid(images: Tensor, padding: int = 1) -> Tensor:
    """Draw the probe input images side by side.

    Each image is min-max normalised on its own over all its channels, so normalised
    inputs (any range) display with their colour balance intact. NaN is drawn as black.

    Args:
        images: Tensor of shape (N, C, H, W). C == 3 is drawn as RGB; any other C is
            drawn as grayscale from the first channel.
        padding: Separator width in pixels.

    Returns:
        uint8 tensor of shape (H_out, W_out, 3): one row of N images.
    """
    check_tensor(images, "images")
    if images.dim() != 4 or images.numel() == 0:
        raise ValueError(f"expected images of shape (N, C, H, W), got shape {tuple(images.shape)}")
    if images.shape[1] != 3:
        images = images[:, :1]
    rgb = normalize_maps(images, "layer").expand(-1, 3, -1, -1)  # (N, 3, H, W)
    return tile_grid(rgb, nrow=len(rgb), padding=padding)


@torch.no_grad()
def activation_stats(act: Tensor) -> dict[str, float]:
    """Summary statistics of one layer's activations.

    Args:
        act: Activations of shape (N, C, ...); for (N, F) the features are the channels.

    Returns:
        ``mean`` and ``std`` (population std) of the finite values (NaN if there are
        none); ``frac_zero``, the fraction of all values that are exactly 0; and
        ``dead_channels_probe``, the fraction of channels that are <= 0 (or NaN) for every
        image and position of ``act``, i.e. dead ReLU units on these inputs alone (the
        callback's probe; ``dead_channels_val`` is the callback's count over the whole
        validation set). All are Python floats.
    """
    check_tensor(act, "act")
    if act.dim() < 2 or act.numel() == 0:
        raise UnsupportedActivationError(
            f"expected a non-empty (N, C, ...) activation, got shape {tuple(act.shape)}"
        )
    x = act.float()
    finite = x.isfinite()
    # Masked sums instead of x[finite] avoid a host sync on GPU tensors.
    count = finite.sum()
    mean = torch.where(finite, x, 0.0).sum() / count
    std = (torch.where(finite, (x - mean).square(), 0.0).sum() / count).sqrt()
    frac_zero = (x == 0).float().mean()
    alive = (x > 0).movedim(1, 0).reshape(x.shape[1], -1).any(dim=1)  # (C,)
    dead = (~alive).float().mean()
    # One transfer for all four numbers.
    values = torch.stack([mean, std, frac_zero, dead]).tolist()
    return dict(zip(("mean", "std", "frac_zero", "dead_channels_probe"), values, strict=True))


def describe(x: object) -> str:
    """What ``x`` is, for "expected X, got Y" errors: ``shape (N, C)`` or its type's name."""
    return f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


def check_tensor(x: object, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"expected {name} to be a Tensor, got {type(x).__name__}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"expected {name} to be one of {choices}, got {value!r}")


@functools.cache
def check_cmap(cmap: str) -> str:
    """Returns ``cmap`` if matplotlib knows it; else a ValueError naming the closest names."""
    if cmap in matplotlib.colormaps:
        return cmap
    close = difflib.get_close_matches(str(cmap), list(matplotlib.colormaps), n=3)
    names = ", ".join(repr(n) for n in close or _COMMON_CMAPS)
    raise ValueError(
        f"expected a matplotlib colormap name such as {names} "
        f"(see matplotlib.colormaps), got {cmap!r}"
    )


def _lut(cmap: str) -> Tensor:
    """The 256-entry RGB table of a matplotlib colormap, (256, 3) float32 on the CPU."""
    rgba = matplotlib.colormaps[check_cmap(cmap)](np.linspace(0.0, 1.0, 256))  # (256, 4)
    return torch.from_numpy(rgba[:, :3]).float()


def upscale(maps: Tensor, min_h: int, min_w: int) -> Tensor:
    """Repeat pixels of (..., H, W) maps by integer factors until they are >= min_h x min_w."""
    fh = math.ceil(min_h / maps.shape[-2])
    fw = math.ceil(min_w / maps.shape[-1])
    if fh > 1:
        maps = maps.repeat_interleave(fh, dim=-2)
    if fw > 1:
        maps = maps.repeat_interleave(fw, dim=-1)
    return maps


def tile_grid(tiles: Tensor, nrow: int, padding: int) -> Tensor:
    """Lay (B, 3, h, w) tiles in [0, 1] out with separators; returns (H, W, 3) uint8."""
    grid = make_grid(tiles, nrow=nrow, padding=padding, pad_value=_PAD_VALUE)  # (3, H, W)
    if len(tiles) == 1:
        # make_grid returns a lone tile without its border; add it for a consistent layout.
        grid = F.pad(grid, (padding,) * 4, value=_PAD_VALUE)
    return grid.mul(255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
