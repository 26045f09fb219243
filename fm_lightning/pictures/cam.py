"""The class-activation picture kind: where the model looks on the probe, for its predicted class
and the true one (or the runner-up), every captured validation.

    kind = CamKind("GradCAM", "relu2", cmap="viridis")   # checks the method at once
    kind.resolve(model)                                   # when fitting starts
    drawn = kind.draw(run, shot)                          # rank zero: cam/epoch=003.png
    grid, caption = cam_picture(model, x, "GradCAM", ("relu2", model.relu2), reading, targets)

The maps come from :func:`fm_lightning.cam.class_activation_maps` (torchcam); this module draws
them (:func:`cam_grid`, pure tensor code) and says what they show (:func:`cam_caption`).
FeatureMapCallback and ``python -m fm_lightning.visualize`` both draw through
:func:`cam_picture`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fm_lightning.cam import CamResult, check_cam_method, class_activation_maps
from fm_lightning.capture import match_layer, resolve_layers
from fm_lightning.gallery import CAM_DIR
from fm_lightning.layouts import interpret
from fm_lightning.pictures import Drawn, Picture, PictureKind, Run, Shot
from fm_lightning.rendering import (
    COLORBAR_PX,
    DEAD_RGB,
    FONT_PX,
    LINE_PX,
    TEXT_RGB,
    check_tensor,
    colorbar,
    colorize,
    describe,
    normalize_maps,
    tile_grid,
    upscale,
)
from fm_lightning.text import stamp, text_width


def resolve_cam_layer(
    model: nn.Module, pattern: str | None, what: str = "`cam_layer`"
) -> tuple[str, nn.Module] | None:
    """``(name, module)`` of the one module ``pattern`` matches, or None for None (torchcam's
    choice). ``what`` names the argument in the ValueError (no match, or several)."""
    if pattern is None:
        return None
    found = resolve_layers(model, [pattern])
    if len(found) != 1:
        raise ValueError(
            f"expected {what} {pattern!r} to match one module, got {len(found)}: "
            f"{', '.join(found)}; name one of them"
        )
    return next(iter(found.items()))


class CamKind(PictureKind):
    """``method`` (any case, ``++`` for ``pp``: :func:`fm_lightning.cam.check_cam_method`) at
    the module ``pattern`` matches, or None for torchcam's choice; ValueErrors at once."""

    def __init__(self, method: str, pattern: str | None, cmap: str) -> None:
        if pattern is not None and (not isinstance(pattern, str) or not pattern):
            raise ValueError(f"expected `cam_layer` to be a layer name or None, got {pattern!r}")
        self.method = check_cam_method(method)  # its canonical name: "gradcam++" -> "GradCAMpp"
        self.pattern = pattern
        self.cmap = cmap
        self.layer: tuple[str, nn.Module] | None = None  # (name, module), once resolved

    def resolve(self, model: nn.Module) -> None:
        """Find the CAM layer in ``model`` (when fitting starts); ValueError as resolve_layers."""
        self.layer = resolve_cam_layer(model, self.pattern)

    def teardown(self) -> None:
        self.layer = None  # no reference to the model outlives the fit

    def draw(self, run: Run, shot: Shot) -> Drawn:
        probe = shot.probe
        if not isinstance(probe, Tensor) or probe.ndim != 4:
            run.warn_once(
                "cam:input",
                "cam needs a model called with one (N, C, H, W) tensor, got "
                f"{describe(probe)}; no class-activation maps are drawn.",
            )
            return Drawn()
        reading, layout = None, "auto"
        if self.layer is not None:
            reading = run.readings.get(self.layer[0])  # measured with the layers
            layout = match_layer(run.layouts, self.layer[0]) or "auto"
        try:
            with torch.compiler.set_stance("force_eager"), run.forward_context():
                grid, caption, result = cam_picture(
                    run.model,
                    probe,
                    self.method,
                    self.layer,
                    reading,
                    shot.targets,
                    cmap=self.cmap,
                    layout=layout,
                )
        except Exception as err:
            run.fail("cam", err)
            return Drawn()
        if result.target_is_class is not None and not bool(result.target_is_class.all()):
            labels = sorted(set(result.target[~result.target_is_class].tolist()))
            run.warn_once(
                "cam:labels",
                f"probe labels {labels} are not classes of the model (not a column of its "
                "logits: an ignore_index?); those rows get no true-class map, the others are "
                "drawn.",
            )
        path = f"{CAM_DIR}/{shot.frame.stem}.png"
        caption = f"{shot.frame.text}: {caption}"
        return Drawn(pictures=[Picture(f"class_activation/{result.layer}", path, grid, caption)])


def cam_picture(
    model: nn.Module,
    x: Tensor,
    method: str,
    layer: tuple[str, nn.Module] | None,
    reading: Any,
    targets: Tensor | None,
    cmap: str = "viridis",
    layout: Any = "auto",
) -> tuple[Tensor, str, CamResult]:
    """The CAM picture of ``x`` (N, C, H, W), its caption and the maps.

    ``layer``: ``(name as the user named it, module)``, its output read with ``reading`` (its
    measured layout, :mod:`fm_lightning.probing`) or ``layout``, so tokens and channels-last
    outputs become maps; None: torchcam's choice. ``targets`` (N,) adds the true classes.
    """
    reshape, name = None, None
    if layer is not None:
        key, module = layer
        name = next(n for n, m in model.named_modules() if m is module)

        def reshape(t: Tensor) -> Tensor:
            return interpret(
                t, module=module, model=model, num_rows=len(x), layout=layout, reading=reading
            ).act

    result = class_activation_maps(model, x, method, layer=name, targets=targets, reshape=reshape)
    if layer is not None:  # named as the user named it (conv2, not net.conv2), like the maps
        result = dataclasses.replace(result, layer=key)
    return cam_grid(x.float(), result, cmap=cmap), cam_caption(result), result


# Smallest side of a drawn tile: 28x28 MNIST tiles are enlarged x3 so the overlay is readable.
_MIN_TILE_PX = 64
_PAD_PX = 2  # white between tiles
_ROW_MARK_PX = 4  # the red bar beside a wrong prediction's row
#: Pixels above :func:`cam_grid`'s tiles: the column names.
CAM_HEADER_PX = LINE_PX + 2


@torch.no_grad()
def cam_grid(
    images: Tensor, result: CamResult, cmap: str = "viridis", alpha: float = 0.5
) -> Tensor:
    """Draws the maps over their images, one row per image, labelled to be read on its own.

    Columns, under a header naming them: the input; the predicted-class map over it; the second
    map over it (the true class where the prediction is wrong, else the runner-up class), when
    the model has more than one class. Right of each row: the predicted class and its
    probability, the true class (when known; a wrong prediction in red, with a red bar beside
    the row; a label that is not a class says so), and the second map's class and probability.
    Below: the colour scale. Tiles smaller than 64 px are enlarged by an integer factor
    (nearest neighbour).

    Args:
        images: (N, C, H, W) the inputs the maps were computed for, any range (each image is
            min-max scaled); C == 3 drawn as RGB, else the first channel as grey.
        result: From :func:`class_activation_maps` for these images.
        cmap: Matplotlib colormap for the maps.
        alpha: Weight of the map in the overlay, in [0, 1] (0: the image alone).

    Returns:
        (H', W', 3) uint8 on the CPU; the tiles are its top-left block below a header of
        ``CAM_HEADER_PX`` pixels.
    """
    check_tensor(images, "images")
    if images.dim() != 4 or images.shape[0] != len(result.pred_maps):
        raise ValueError(
            f"expected images of shape ({len(result.pred_maps)}, C, H, W), one per map, "
            f"got shape {tuple(images.shape)}"
        )
    if images.shape[-2:] != result.pred_maps.shape[-2:]:
        raise ValueError(
            f"expected images of the maps' size {tuple(result.pred_maps.shape[-2:])}, "
            f"got {tuple(images.shape[-2:])}"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"expected alpha in [0, 1], got {alpha}")
    images = images.detach().cpu()
    if images.shape[1] != 3:
        images = images[:, :1]
    base = normalize_maps(images, "layer").expand(-1, 3, -1, -1)  # (N, 3, H, W)
    columns = [base, _overlay(base, result.pred_maps, cmap, alpha)]
    if result.second_maps is not None:
        columns.append(_overlay(base, result.second_maps, cmap, alpha))
    tiles = torch.stack(columns, dim=1).flatten(0, 1)  # (N * columns, 3, H, W), image-major
    tiles = upscale(tiles, _MIN_TILE_PX, _MIN_TILE_PX)
    grid = tile_grid(tiles, nrow=len(columns), padding=_PAD_PX).numpy()
    return torch.from_numpy(_labelled(grid, result, tiles.shape[-2:], len(columns), cmap))


def _labelled(
    grid: np.ndarray, result: CamResult, tile: torch.Size, ncols: int, cmap: str
) -> np.ndarray:
    """``grid`` (the tiles, (H, W, 3) uint8) with its header, row labels and colour scale."""
    th, tw = tile
    rows = _row_labels(result)
    text_w = max(text_width(line, FONT_PX) for row in rows for line, _ in row)
    legend = [f"{result.method} at {result.layer}: each map scaled to its own max"]
    if result.second is not None:
        legend.append(f"second: {_second_meaning(result)}")
    bar_h, bar_w = COLORBAR_PX
    left = grid.shape[1] + _ROW_MARK_PX + 2
    width = max(left + text_w + 4, *(text_width(t, FONT_PX) + 4 for t in legend))
    height = CAM_HEADER_PX + grid.shape[0] + LINE_PX * (len(legend) + 1) + 4
    pixels = np.full((height, width, 3), 255, dtype=np.uint8)
    pixels[CAM_HEADER_PX : CAM_HEADER_PX + grid.shape[0], : grid.shape[1]] = grid
    for j, name in enumerate(("input", "predicted", "second")[:ncols]):
        x = _PAD_PX + j * (tw + _PAD_PX) + (tw - text_width(name, FONT_PX)) // 2
        stamp(pixels, (x, 1), name, TEXT_RGB, FONT_PX)
    wrong = _wrong(result)
    for i, row in enumerate(rows):
        top = CAM_HEADER_PX + _PAD_PX + i * (th + _PAD_PX)
        if wrong[i]:  # a red bar beside the row
            pixels[top : top + th, grid.shape[1] : grid.shape[1] + _ROW_MARK_PX] = DEAD_RGB
        for k, (line, color) in enumerate(row):
            stamp(pixels, (left, top + k * LINE_PX), line, color, FONT_PX)
    y = CAM_HEADER_PX + grid.shape[0] + 2
    low_w = text_width("0 ", FONT_PX)
    stamp(pixels, (2, y), "0", TEXT_RGB, FONT_PX)
    pixels[y + 2 : y + 2 + bar_h, 2 + low_w : 2 + low_w + bar_w] = colorbar(cmap, bar_h, bar_w)
    stamp(pixels, (2 + low_w + bar_w, y), " max", TEXT_RGB, FONT_PX)
    for k, line in enumerate(legend, start=1):
        stamp(pixels, (2, y + k * LINE_PX), line, TEXT_RGB, FONT_PX)
    return pixels


def _row_labels(result: CamResult) -> list[list[tuple[str, tuple[int, int, int]]]]:
    """Per image, the lines written beside its row and their colours."""
    n = len(result.pred)
    pred, prob = result.pred.tolist(), result.prob.tolist()
    target = [None] * n if result.target is None else result.target.tolist()
    second = [None] * n if result.second is None else result.second.tolist()
    second_prob = [None] * n if result.second_prob is None else result.second_prob.tolist()
    rows = []
    for p, q, t, s, sq, w in zip(
        pred, prob, target, second, second_prob, _wrong(result), strict=True
    ):
        lines = [(f"pred {p}, p={q:.2f}", TEXT_RGB)]
        if t is not None and t == p:
            lines.append((f"true {t}", TEXT_RGB))
        elif t is not None:
            lines.append(
                (f"true {t}: WRONG", DEAD_RGB) if w else (f"label {t}: no class", TEXT_RGB)
            )
        if s is not None:
            lines.append((f"second: {'true' if w else 'runner-up'} {s}, p={sq:.2f}", TEXT_RGB))
        rows.append(lines)
    return rows


def _wrong(result: CamResult) -> list[bool]:
    """Per image: its label is one of the model's classes and not the predicted one."""
    if result.target is None:
        return [False] * len(result.pred)
    wrong = result.pred != result.target
    if result.target_is_class is not None:
        wrong &= result.target_is_class
    return wrong.tolist()


def cam_caption(result: CamResult) -> str:
    """One line describing a :func:`cam_grid` picture, rows numbered from 1.

    E.g. ``"GradCAM on relu2; columns: input, predicted, second (the true class if wrong, else
    the runner-up). 1: pred 7 (p=0.98), true 7, runner-up 3 (p=0.01); 2: pred 3 (p=0.61),
    true 5 WRONG"``.
    """
    columns = "input, predicted"
    if result.second is not None:
        columns += f", second ({_second_meaning(result)})"
    rows = []
    pred, prob = result.pred.tolist(), result.prob.tolist()
    target = result.target.tolist() if result.target is not None else [None] * len(pred)
    second = result.second.tolist() if result.second is not None else [None] * len(pred)
    second_prob = result.second_prob.tolist() if result.second is not None else second
    is_class = [True] * len(pred)
    if result.target_is_class is not None:
        is_class = result.target_is_class.tolist()
    for i, (p, q, t, s, sq, ok) in enumerate(
        zip(pred, prob, target, second, second_prob, is_class, strict=True), start=1
    ):
        row = f"{i}: pred {p} (p={q:.2f})"
        if t is not None and not ok:
            row += f", label {t} is not a class: no true-class map"
        elif t is not None:
            row += f", true {t}" + (" WRONG" if t != p else "")
        if s is not None and (t is None or t == p or not ok):
            row += f", runner-up {s} (p={sq:.2f})"
        rows.append(row)
    return f"{result.method} on {result.layer}; columns: {columns}. " + "; ".join(rows)


def _second_meaning(result: CamResult) -> str:
    if result.target is None:
        return "the runner-up class"
    return "the true class if the prediction is wrong, else the runner-up"


def _overlay(base: Tensor, maps: Tensor, cmap: str, alpha: float) -> Tensor:
    """(N, 3, H, W) images in [0, 1] blended with (N, H, W) maps drawn through ``cmap``."""
    heat = colorize(maps.detach().cpu(), cmap)  # (N, 3, H, W)
    return base.lerp(heat, alpha)
