"""Where a layer's grid position looks in the input: receptive fields measured from the model,
and the crops they cut.

    rf = receptive_field(model, model.conv2, first_val_inputs)  # once per layer (unwrapped model)
    crops = crop_at(inputs, positions, rf)  # (N, Cin, rf.height, rf.width)

Receptive fields come from the model itself (:func:`receptive_field`: the nonzero extent of the
input gradient of one output position), not from the architecture. Token layouts work on their
patch grid: pass ``to_maps`` turning the layer's output into ``(N, C, h, w)`` maps. A token
after global attention sees the whole input, so its field is the whole input and its grid is
taken to tile the input (stride ``H / h``: the patch size). A field can also be set by hand,
e.g. ``ReceptiveField(48, 48, stride=(16, 16), offset=(7.5, 7.5))`` for a 3x3-patch
neighbourhood of a 16-pixel patch grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from fm_lightning.probing import forward_to, gradients_on
from fm_lightning.rendering import describe


class ReceptiveField(NamedTuple):
    """Where a position of a layer's ``(h, w)`` grid looks in the ``(H, W)`` input, in pixels.

    The centre of grid position ``(i, j)`` is input pixel ``offset + stride * (i, j)``
    (fractional: between pixels); the crop is ``height x width`` pixels around it.
    """

    height: int
    width: int
    stride: tuple[float, float]  # (y, x) input pixels per grid step
    offset: tuple[float, float]  # (y, x) input pixel at the centre of grid position (0, 0)


def receptive_field(
    model: nn.Module,
    layer: nn.Module,
    example_input: Tensor,
    position: tuple[int, int] | None = None,
    to_maps: Callable[[object], Tensor] | None = None,
) -> ReceptiveField:
    """A layer's receptive field, from the input gradient of one of its output positions.

    The gradient of the layer's output at ``position`` (all channels) with respect to the
    input is taken for ``example_input`` and a noisy copy of it (so max-pool ties and dead
    ReLUs in one input don't hide part of the field); its nonzero extent is the field. A second
    position, one grid step further, gives the stride. The model runs in eval mode (batch
    statistics would spread the gradient across the batch) up to ``layer`` only.

    Works inside ``torch.inference_mode()`` and on inference tensors; restores every
    submodule's train/eval mode, never touches any ``.grad``, removes its hook on return.

    Args:
        model: the model (or LightningModule, not its DDP wrapper: the pass stops at `layer`)
            whose forward takes ``example_input``.
        layer: a submodule of ``model``.
        example_input: (B, Cin, H, W) floating-point inputs, e.g. a validation batch.
        position: (y, x) on the layer's grid; default the centre, least clipped by borders.
        to_maps: turns what the layer returns into (N, C, h, w) maps (tokens -> patch grid);
            default: the output must already be (N, C, h, w).

    Returns:
        The field; height and width are clipped to the input (a field larger than the input
        is the whole input, and then the grid is taken to tile the input evenly).
    """
    if not isinstance(example_input, Tensor) or example_input.dim() != 4:
        raise ValueError(
            f"expected example_input of shape (B, Cin, H, W), got {describe(example_input)}"
        )
    if not example_input.is_floating_point():
        raise ValueError(f"expected a floating-point example_input, got {example_input.dtype}")
    with gradients_on(model):
        x = example_input.clone()  # a normal tensor, even from an inference tensor
        g = torch.Generator(device=x.device).manual_seed(0)
        spread = x.float().std().nan_to_num(1.0).clamp(min=1e-3).item()
        noise = torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype) * spread
        x = torch.cat([x, x + noise]).requires_grad_(True)  # (2B, Cin, H, W)
        output = forward_to(model, layer, x)  # the rest of the forward pass is not needed
        maps = to_maps(output) if to_maps is not None else output
        if not isinstance(maps, Tensor) or maps.dim() != 4:
            raise ValueError(
                f"expected the layer's maps as (N, C, h, w), got {describe(maps)}; pass to_maps"
            )
        h, w = maps.shape[-2:]
        py, px = position if position is not None else (h // 2, w // 2)
        if not (0 <= py < h and 0 <= px < w):
            raise ValueError(f"expected position inside the {h}x{w} grid, got {(py, px)}")
        qy = py + 1 if py + 1 < h else max(py - 1, 0)  # a neighbour, for the stride
        qx = px + 1 if px + 1 < w else max(px - 1, 0)
        box_a = _extent(maps, x, py, px, retain=True)
        box_b = _extent(maps, x, qy, qx, retain=False)
    height_in, width_in = example_input.shape[-2:]
    size_y, stride_y, offset_y = _axis(box_a[0], box_b[0], py, qy, height_in, h)
    size_x, stride_x, offset_x = _axis(box_a[1], box_b[1], px, qx, width_in, w)
    return ReceptiveField(size_y, size_x, (stride_y, stride_x), (offset_y, offset_x))


@torch.no_grad()
def crop_at(
    inputs: Tensor, positions: Tensor, rf: ReceptiveField, images: Tensor | None = None
) -> Tensor:
    """Crops of ``inputs`` centred on layer-grid positions, padded outside the input.

    Args:
        inputs: (B, Cin, H, W).
        positions: (N, 2) long (y, x) on the layer's grid, mapped to input pixels by ``rf``.
        images: (N,) long: which input each crop comes from; default ``arange(B)`` (N == B).

    Returns:
        (N, Cin, rf.height, rf.width) in the inputs' dtype and device; outside the input NaN
        (0 for integer dtypes).
    """
    if images is None:
        images = torch.arange(len(inputs), device=inputs.device)
    if positions.dim() != 2 or positions.shape[1] != 2 or len(positions) != len(images):
        raise ValueError(
            f"expected positions of shape ({len(images)}, 2), got {describe(positions)}"
        )
    positions, images = positions.to(inputs.device), images.to(inputs.device)
    # One window per crop (any position, even off the grid); no overlay, so no grid size.
    win = windows_at(rf, inputs.shape[-2:], positions[:, 0], positions[:, 1], (1, 1))
    each = torch.arange(len(images), device=inputs.device)
    return cut_crops(inputs, images, win, each, each)


def _extent(maps: Tensor, x: Tensor, py: int, px: int, retain: bool) -> tuple[tuple[int, int], ...]:
    """((top, bottom), (left, right)) of the input pixels with a gradient from maps[..., py, px]."""
    (grad,) = torch.autograd.grad(maps[:, :, py, px].sum(), x, retain_graph=retain)
    support = grad.abs().sum(dim=(0, 1)) > 0  # (H, W)
    if not support.any():
        raise ValueError(f"the layer's position {(py, px)} has no gradient from the input")
    ys = support.any(dim=1).nonzero().flatten()
    xs = support.any(dim=0).nonzero().flatten()
    return (int(ys[0]), int(ys[-1])), (int(xs[0]), int(xs[-1]))


def _axis(a: tuple[int, int], b: tuple[int, int], pa: int, pb: int, n_in: int, n_grid: int):
    """(size, stride, offset) along one axis from the extents a, b of grid positions pa, pb."""
    clipped_lo = a[0] == 0 and b[0] == 0
    clipped_hi = a[1] == n_in - 1 and b[1] == n_in - 1
    if pa == pb or (clipped_lo and clipped_hi):
        # The field covers the whole input: take the grid to tile it (a patch grid's stride).
        stride = n_in / n_grid
        return n_in, stride, (stride - 1) / 2
    # An edge the input border did not cut moves by exactly one stride per grid step.
    edge = 1 if clipped_lo else 0
    stride = (b[edge] - a[edge]) / (pb - pa)
    if stride <= 0:
        stride = n_in / n_grid
    return a[1] - a[0] + 1, stride, (a[0] + a[1]) / 2 - stride * pa


class Windows(NamedTuple):
    """Where the crops of a layer's grid rows and columns lie in the input (see grid_windows)."""

    rows: Tensor  # (h, height) input rows of grid row i's crops, clamped into the input
    rows_in: Tensor  # (h, height) bool: the row is inside the input
    cols: Tensor  # (w, width)
    cols_in: Tensor  # (w, width)
    cell_rows: Tensor  # (h, height): the grid row whose centre is nearest each crop row
    cell_cols: Tensor  # (w, width)


def grid_windows(
    rf: ReceptiveField, input_hw: tuple[int, int], grid_hw: tuple[int, int], device: torch.device
) -> Windows:
    """The input pixels of the crops around every row and column of an (h, w) grid.

    A crop is separable (its rows depend on the grid row only, its columns on the grid column),
    so these small tables give any position's window by two lookups.
    """
    h, w = grid_hw
    ys, xs = torch.arange(h, device=device), torch.arange(w, device=device)
    return windows_at(rf, input_hw, ys, xs, grid_hw)


def windows_at(
    rf: ReceptiveField, input_hw: tuple[int, int], ys: Tensor, xs: Tensor, grid_hw: tuple[int, int]
) -> Windows:
    """The crop windows around grid rows ``ys`` and grid columns ``xs``, in their order."""
    (height, width), (h, w) = input_hw, grid_hw

    def axis(at: Tensor, n_grid: int, size: int, stride: float, offset: float, n_in: int):
        # floor(v + 0.5): halves round up everywhere (torch.round's half-to-even would not)
        start = torch.floor(at.double() * stride + (offset - (size - 1) / 2 + 0.5)).long()
        pixels = start[:, None] + torch.arange(size, device=at.device)  # (len(at), size)
        inside = (pixels >= 0) & (pixels < n_in)
        pixels = pixels.clamp(0, n_in - 1)
        # the grid cell whose centre is nearest each pixel: the overlay's value there
        cells = torch.floor((pixels.double() - offset) / stride + 0.5).long().clamp(0, n_grid - 1)
        return pixels, inside, cells

    rows, rows_in, cell_rows = axis(ys, h, rf.height, rf.stride[0], rf.offset[0], height)
    cols, cols_in, cell_cols = axis(xs, w, rf.width, rf.stride[1], rf.offset[1], width)
    return Windows(rows, rows_in, cols, cols_in, cell_rows, cell_cols)


def cut_crops(inputs: Tensor, images: Tensor, win: Windows, py: Tensor, px: Tensor) -> Tensor:
    """(N, Cin, height, width) crops of inputs[images] around grid positions (py, px)."""
    _, cin, height, width = inputs.shape
    rows, cols = win.rows[py], win.cols[px]  # (N, height), (N, width)
    chans = torch.arange(cin, device=inputs.device)
    # Flat indices into the contiguous batch: one 1-D gather, much faster than four index tensors.
    base = (images[:, None] * cin + chans) * height  # (N, Cin)
    idx = (base[:, :, None, None] + rows[:, None, :, None]) * width + cols[:, None, None, :]
    crops = inputs.contiguous().view(-1)[idx]  # (N, Cin, height, width)
    outside = ~(win.rows_in[py][:, :, None] & win.cols_in[px][:, None])  # (N, height, width)
    return crops.masked_fill(outside[:, None], pad_value(inputs.dtype))


def overlay_at(
    act: Tensor, images: Tensor, channels: Tensor, win: Windows, py: Tensor, px: Tensor
) -> Tensor:
    """(N, height, width) float32: each crop pixel gets act[image, channel] at its nearest cell."""
    _, c, h, w = act.shape
    base = (images * c + channels) * h  # (N,) start of each map in the flat activation
    gy, gx = win.cell_rows[py], win.cell_cols[px]  # (N, height), (N, width)
    idx = (base[:, None, None] + gy[:, :, None]) * w + gx[:, None, :]  # (N, height, width)
    return act.contiguous().view(-1)[idx].float()


def pad_value(dtype: torch.dtype) -> float:
    return math.nan if dtype.is_floating_point else 0
