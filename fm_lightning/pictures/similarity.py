"""The similarity picture kind: how each layer's representation changes over training (linear CKA
with itself at the previous and the first captured validation), and a layer x layer CKA heatmap
with one cell per pair of layers, its value written in it.

    kind = SimilarityKind(n=512)            # FeatureMapCallback(similarity=512) makes one
    kind.start(run); with kind.observe(run, x): model(x)   # the first n validation inputs
    kind.finish(run)                        # every rank's rows merged, Grams computed
    drawn = kind.draw(run, shot)            # rank zero: similarity/epoch=003.{png,pt}, scalars

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

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fm_lightning.capture import forward_hooks, read_output
from fm_lightning.cka import (
    SimilarityRecord,
    SimilarityRecorder,
    cka_matrix,
    linear_cka,
    save_record,
)
from fm_lightning.gallery import SIMILARITY_DIR
from fm_lightning.pictures import Drawn, Picture, PictureKind, Run, Shot
from fm_lightning.rendering import COLORBAR_PX, FONT_PX, LINE_PX, TEXT_RGB, colorbar, colorize
from fm_lightning.text import stamp, text_width

__all__ = ["SimilarityKind", "similarity_picture"]

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


def check_similarity(n: object) -> bool:
    """FeatureMapCallback's ``similarity``: True for a count of inputs (an int >= 2), False for 0
    (off); a ValueError otherwise (``False``, ``1``, ``0.0``, ``None`` ... are no count)."""
    if type(n) is not int or n == 1 or n < 0:
        raise ValueError(
            f"expected `similarity` to be 0 (off) or the number of inputs compared, an int "
            f">= 2, got {n!r}"
        )
    return n != 0


class SimilarityKind(PictureKind):
    """Linear CKA of the chosen layers on the first ``n`` validation inputs (dataset order),
    every captured validation: each layer against itself at the previous and the first captured
    validation (scalars), every layer against every other (a heatmap), and the centred Grams
    kept in ``similarity/<frame>.pt`` to compare runs later (``python -m fm_lightning.similarity``).
    """

    def __init__(self, n: int) -> None:
        check_similarity(n)
        self.n = n
        self.first: dict[str, Tensor] = {}  # {layer: (n, n) centred Gram} at the first frame
        self.previous: dict[str, Tensor] = {}  # ... at the previous captured validation
        self._order: list[int] | None = None  # this rank's dataset indices, batch after batch
        self._position = 0
        self._recorder: SimilarityRecorder | None = None
        self._record: SimilarityRecord | None = None

    def start(self, run: Run) -> None:
        self._recorder, self._record, self._position = None, None, 0
        self._order = run.validation_order
        if self._order is None:
            run.warn_once(
                "similarity:order",
                "similarity needs a validation set read in a fixed order (a map-style dataset, "
                "no shuffling), to compare the same inputs every epoch; none is measured.",
            )

    def observe(self, run: Run, inputs: Any) -> AbstractContextManager:
        if self._order is None or not isinstance(inputs, Tensor):
            return nullcontext()
        start, self._position = self._position, self._position + len(inputs)
        indices = torch.tensor(self._order[start : self._position], dtype=torch.long)
        if len(indices) != len(inputs) or not bool((indices < self.n).any()):
            return nullcontext()  # past the n (or the sampler's order no longer holds)
        return self._observed(run, inputs, indices)

    @contextmanager
    def _observed(self, run: Run, inputs: Tensor, indices: Tensor) -> Iterator[None]:
        acts: dict[str, Tensor] = {}  # {layer: (B, ...)} this batch's outputs

        def record(key: str, module: nn.Module, output: Any) -> None:
            if "@" in key:
                return  # a module called twice: its first call is the layer's representation
            maps = read_output(
                output, key, module, run.model, len(inputs), run.layouts, run.readings
            )
            acts[key] = maps.act.detach()

        with torch.compiler.set_stance("force_eager"), forward_hooks(run.modules, record):
            yield
        try:
            if self._recorder is None:
                features = {key: act[0].numel() for key, act in acts.items()}
                device = next(iter(acts.values())).device if acts else "cpu"
                self._recorder = SimilarityRecorder(self.n, features, device=device)
            self._recorder.observe_inputs(indices, inputs)
            for key, act in acts.items():
                self._recorder.observe(key, indices, act)
        except Exception as err:
            self._order = None  # nothing more this validation
            run.fail("similarity", err)

    def finish(self, run: Run) -> None:
        """Every rank's rows merged (Lightning's all_gather), and the Grams on every rank."""
        recorder, self._recorder, self._record = self._recorder, None, None
        # Ranks agree on the layers and their widths first, as the examples do.
        layers = None if recorder is None else sorted(recorder.features.items())
        ok = layers is not None and layers == run.broadcast(layers)
        if not run.all_agree(ok) or recorder is None:
            return
        try:
            recorder.merge(run.all_gather(recorder.state()))
            self._record = recorder.record()
        except Exception as err:
            run.fail("similarity", err)

    def draw(self, run: Run, shot: Shot) -> Drawn:
        record, self._record = self._record, None
        if record is None:
            return Drawn()
        drawn, grams = Drawn(), record.grams
        layers = list(grams)
        for layer, gram in grams.items():
            first = self.first.setdefault(layer, gram)
            values = {"to_first": linear_cka(gram, first)}
            if layer in self.previous:
                values["to_previous"] = linear_cka(gram, self.previous[layer])
            drawn.similarity[layer] = {key: values.get(key) for key in ("to_previous", "to_first")}
            for key, value in values.items():
                if value is not None:
                    drawn.scalars[f"feature_similarity/{layer}/{key}"] = value
        self.previous = dict(grams)
        matrix, defined = cka_matrix(grams, grams)
        caption = (
            f"{shot.when}: linear CKA between layers on the first {self.n} validation inputs "
            "(1: the same representation up to rotation and scale)"
        )
        try:
            title = f"linear CKA between layers, {shot.frame.text}"
            notes = [f"on the first {self.n} validation inputs (dataset order)"]
            image = similarity_picture(matrix, layers, layers, title, defined=defined, notes=notes)
            save_record(record, os.path.join(shot.root, SIMILARITY_DIR, f"{shot.frame.stem}.pt"))
        except Exception as err:
            run.fail("similarity", err)
            return drawn
        path = f"{SIMILARITY_DIR}/{shot.frame.stem}.png"
        drawn.pictures.append(Picture("feature_similarity/layers", path, image, caption))
        return drawn

    def state_dict(self) -> dict[str, Any]:
        return {"similarity": {"first": dict(self.first), "previous": dict(self.previous)}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        kept = state.get("similarity") or {}
        self.first = dict(kept.get("first") or {})
        self.previous = dict(kept.get("previous") or {})

    def teardown(self) -> None:
        self._recorder, self._record, self._order = None, None, None
