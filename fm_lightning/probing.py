"""Where a layer's outputs sit on the model's input, measured from input gradients.

    readings = measure_layouts(model, probe, {"blocks.3": model.blocks[3]})  # once per fit
    readings["blocks.3"]    # Measured(shape=(197, 192), channel=2, cols=1, tokens=(1, 14, 14))
    output = forward_to(model, layer, x)  # under gradients_on(model): a graph from x to output

How a layout is measured. Four copies of the probe's first input (:data:`ROWS`) go through the
model once, for all layers (eval mode, gradients on: batch statistics would mix the rows;
attention does not), then one backward pass per layer from its output asks one question per
row: the input gradient of a random mix of one part of the output. Row 0 asks about the first
quarter along every dim at once, row 1 + i about the same part moved to the last quarter along
the i-th dim. Along a spatial dim the input region moves across the input (the centroid of the
gradient's magnitude, each position at its centre as a fraction of the axis, moves by at least
:data:`MIN_SHIFT` of the input's height or width); along the channel dim it does not (a quarter
of the channels depends on the same field). Each input axis is followed by the dim that moves
furthest along it. A dim following the height of an image in an (N, L, D) output holds tokens,
row by row: the last token's own region (the last row asks about the last element alone) is
one cell of their grid, and the grid (h, w) is the tiling of the input whose last cell holds
that region most sharply (densest inside, against its left and upper neighbours); the
k = L - h * w tokens before the grid are prefix tokens (CLS, registers: no single region). A dim
following one axis and no grid: a 1-D sequence. A layer whose output (or a tensor its gradient
needs) the rest of the forward edits in place (an in-place ReLU after it) gets a pass of its
own that stops at the layer. The input is the probe's first floating-point tensor:
(N, C, H, W) and (N, H, W) are images, anything else a 1-D signal along its last dim.

Chained passes. A backward pass down to the input costs the layer's depth, so layers are
measured in forward order, and where every path from the input to a layer's output goes
through the output of one measured before (the deepest such: walked back on the autograd graph
without crossing that output, the input is not reached; a skip from the input around it is),
the pass stops there. Its gradient's magnitude, summed over that output's channels, stands on
that output's measured positions (rows and columns, 1-D positions, or a token grid with the
prefix tokens' mass spread over it: they depend on all of it), and the same decisions run on
this coarser mass; on the test models they read every layer as the full pass does. A chained
reading that is not Measured or places fewer positions than the input has axes (a pool; a 1-D
reading of an image, as a token grid finer than those positions reads) is measured the full
way: the chain is a shortcut, never another outcome.

Outcomes: :class:`~fm_lightning.layouts.Measured`, or :class:`~fm_lightning.layouts.Fallback`
with the reason the measurement cannot decide (no floating-point input, no gradient from the
input, no dim or two dims following one axis, a forward that raised), read then by the
fallback rules; None for (N, F) features. Nothing here changes the model: every submodule's
mode and the autograd state come back, no ``.grad`` is touched, hooks are removed however the
pass ends.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

from fm_lightning.capture import call_model, eval_mode, first_image, forward_hooks
from fm_lightning.layouts import Fallback, LayoutError, Measured, batch_first, first_tensor

__all__ = [
    "MIN_SHIFT",
    "ROWS",
    "Reading",
    "forward_to",
    "gradients_on",
    "measure_layout",
    "measure_layouts",
]

#: How far (as a fraction of the axis) the input region of an output part moved to a dim's last
#: quarter must lie beyond the part's own (the first quarter along every dim) for the dim to
#: follow that axis. Measured (the models of tests/test_probing.py, test_layouts_models.py and
#: test_timm_dropin.py): positions move 0.15 (MaxVit grid attention, 8 x 8: each position
#: attends to others half the map away) to 0.8, most >= 0.4; channels at most 0.07 (MaxVit
#: with 6 seeds: 0.16 and 0.07 at worst). Tokens in rows of 3 move along the width too, up to
#: 0.16: an (N, L, D) output following the height is tried as tokens first. On a chained pass's
#: coarser mass: positions 0.34 (MaxVit) to 0.83, channels at most 0.05, tokens in rows of 3
#: up to 0.2 along the width.
MIN_SHIFT = 0.12
# A token grid is accepted when its last cell is at least this much denser than its neighbours
# (relative to the cell's own density).
_MIN_CONTRAST = 0.25
#: Rows in the measuring pass: the most questions one output needs (4-D: a part and that part
#: moved along each of the 3 dims; 3-D tokens: 3, and the last element).
ROWS = 4
_SEED = 0
_SLAB = 4  # a dim's first and last quarter are asked about


class _Reached(Exception):
    """Raised by forward_to's hook: the forward pass got as far as it needs."""


@contextmanager
def gradients_on(model: nn.Module) -> Iterator[None]:
    """Gradients on (also inside ``torch.no_grad`` / ``inference_mode``), ``model`` in eval mode.

    Eval mode, since batch statistics would spread one row's gradient over the others; every
    submodule's own mode comes back afterwards.
    """
    with torch.inference_mode(False), torch.enable_grad(), eval_mode(model):
        yield


def forward_to(model: nn.Module, layer: nn.Module, inputs: Any, call: int = 1) -> object:
    """What ``layer`` returns in its ``call``-th call when ``model`` is called on ``inputs``.

    The rest of the forward pass is not run. Run it under :func:`gradients_on` with ``inputs``
    requiring gradients to get a graph from the input to the output. Raises ValueError if
    ``layer`` does not run that often.
    """
    captured: list[object] = []

    def hook(module: nn.Module, args: Any, output: object) -> None:
        captured.append(output)
        if len(captured) == call:
            raise _Reached

    handle = layer.register_forward_hook(hook)
    try:
        with torch.compiler.set_stance("force_eager"):  # compiled code would skip the hook
            call_model(model, inputs)
    except _Reached:
        pass
    finally:
        handle.remove()
    if len(captured) < call:
        raise ValueError(f"expected the layer to run {call} time(s), got {len(captured)}")
    return captured[call - 1]


Reading = Measured | Fallback | None


def measure_layouts(
    model: nn.Module,
    probe: Any,
    modules: Mapping[str, nn.Module],
    known: Mapping[str, Reading] | None = None,
    chain: bool = True,
) -> dict[str, Reading]:
    """How every call of ``modules`` not in ``known`` lays out its output, keyed as
    :func:`fm_lightning.capture.forward_hooks` names them (``pool``, ``pool@2``).

    One forward pass of :data:`ROWS` copies of the probe's first input, hooks on ``modules``,
    then one backward pass per call from its output to the input, or to an earlier measured
    output that every path from the input goes through (see the module docstring).

    Args:
        model: The model (unwrapped) whose forward takes ``probe``.
        probe: The probe as the model takes it (Tensor, tuple or dict of (N, ...) tensors).
        modules: ``{name: submodule of model}``.
        known: Readings already taken; their keys are not measured again.
        chain: Whether a backward pass may stop at an earlier measured output (False: every
            pass goes down to the input; the readings are the same, the cost is not).

    Returns:
        Per call: :class:`Measured`; :class:`Fallback` saying why the measurement cannot decide
        (a forward that raises on the measuring rows gives one to each module it did not
        reach); None for (N, F) features.

    Raises:
        Exception: Whatever the model's forward raises on the probe's first row without
            gradients too: it cannot run the probe at all (the caller's failure policy decides).
    """
    known = known or {}
    found = _differentiable_input(probe)
    x, axes = found if found is not None else (None, ())
    image = len(axes) == 2
    outputs: dict[str, tuple[nn.Module, Tensor | LayoutError, int]] = {}

    def record(key: str, module: nn.Module, output: object) -> None:
        try:
            y, _ = first_tensor(output)
        except LayoutError as err:
            outputs[key] = (module, err, 0)
        else:  # its version tells whether the rest of the forward edits it in place
            outputs[key] = (module, y, y._version)

    readings: dict[str, Reading] = {}
    links: list[_Link] = []  # outputs measured in the shared pass, deepest first
    with gradients_on(model):  # the rows are made here: not inference tensors
        xs = _first_rows(x).requires_grad_(True) if x is not None else None
        inputs = apply_to_collection(probe, Tensor, lambda t: xs if t is x else _first_rows(t))
        try:
            with forward_hooks(modules, record), torch.compiler.set_stance("force_eager"):
                call_model(model, inputs)  # eagerly: compiled code would skip the hooks
        except Exception as err:  # the model's forward failed on the measuring rows
            _plain_forward(model, probe)  # raises if it fails without gradients as well
            why = f"{type(err).__name__}: {err}"
            readings = {name: Fallback(why, image) for name in modules if name not in known}
        for key, (layer, y, version) in outputs.items():
            if key in known:
                continue
            if xs is None:
                readings[key] = Fallback("no floating-point input to take gradients from", False)
                continue
            try:
                if isinstance(y, LayoutError):
                    raise _Undecided(str(y))
                try:
                    if y._version != version:  # edited in place further on (ReLU(inplace=True))
                        raise _EditedLater
                    readings[key] = _measure(y, layer, xs, axes, links if chain else [])
                    if _places_every_axis(readings[key], image):  # later ones may stop here
                        links.insert(0, _Link(y, layer, readings[key]))
                except (_EditedLater, RuntimeError):  # or a tensor its gradient needs was:
                    call = int(key.partition("@")[2] or 1)  # a pass that stops at the layer
                    y, _ = first_tensor(forward_to(model, layer, inputs, call))
                    readings[key] = _measure(y, layer, xs, axes, [])
            except _Undecided as err:
                readings[key] = Fallback(str(err), image)
            except Exception as err:  # the model's own forward failed on these rows: never fatal
                readings[key] = Fallback(f"{type(err).__name__}: {err}", image)
    return readings


def measure_layout(model: nn.Module, layer: nn.Module, probe: Any, call: int = 1) -> Reading:
    """:func:`measure_layouts` of one layer's ``call``-th call in a forward pass (a shared pool
    runs twice); a :class:`Fallback` if it does not run that often."""
    readings = measure_layouts(model, probe, {"layer": layer})
    key = "layer" if call == 1 else f"layer@{call}"
    calls = len(readings)
    return readings.get(key, Fallback(f"expected the layer to run {call} time(s), got {calls}"))


def _plain_forward(model: nn.Module, probe: Any) -> None:
    """The model on the probe's first row, without gradients, as a capture runs it."""
    one_row = apply_to_collection(probe, Tensor, lambda t: t[:1].clone())
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        call_model(model, one_row)


class _Undecided(Exception):
    """The measurement ran but cannot decide the layout; the message says why."""


class _EditedLater(Exception):
    """The rest of the forward pass edited the layer's output in place."""


def _differentiable_input(probe: Any) -> tuple[Tensor, tuple[int, ...]] | None:
    """The probe's first floating-point tensor and its positional axes (dims after N)."""
    found: list[Tensor] = []
    apply_to_collection(probe, Tensor, found.append)
    x = next((t for t in found if t.is_floating_point() and t.dim() >= 2 and t.numel()), None)
    if x is None:
        return None
    if first_image(x) is not None:  # (N, C, H, W), or (N, H, W) of a grey image
        return x, (x.dim() - 2, x.dim() - 1)
    return x, (x.dim() - 1,)  # a 1-D signal: (N, T), (N, C, T)


def _first_rows(t: Tensor) -> Tensor:
    """ROWS copies of ``t``'s first row: (ROWS, ...)."""
    return t[:1].detach().expand(ROWS, *t.shape[1:]).clone()


class _Link(NamedTuple):  # an output measured in the shared pass: later passes may stop there
    y: Tensor  # as its hook saw it, in the shared graph
    layer: nn.Module
    reading: Measured


def _measure(
    y: Tensor, layer: nn.Module, xs: Tensor, axes: tuple[int, ...], links: list[_Link]
) -> Measured | None:
    """The reading of ``layer``'s output ``y`` (ROWS rows), from its gradients with respect to
    ``xs``, or to the output of the deepest of ``links`` that every path from ``xs`` to ``y``
    goes through; None for outputs that are not 3-D or 4-D ((N, F) features, never drawn)."""
    if not 3 <= y.dim() <= 4:
        return None
    try:
        y, _ = batch_first(y, layer, ROWS)
    except LayoutError as err:
        raise _Undecided(str(err)) from None
    if y.shape[0] != ROWS:
        raise _Undecided(f"expected the output's leading dim to be the batch, got {tuple(y.shape)}")
    dims = [d for d in range(1, y.dim()) if y.shape[d] > 1]
    if not dims:
        raise _Undecided("the output has no dim longer than 1")
    if not y.requires_grad:  # detached, computed under no_grad, or from integer ids only
        raise _Undecided("no gradient from the input reaches the output")
    # Row 0 asks about the first quarter along every dim, row 1 + i the same part moved to the
    # last quarter along dims[i] (a quarter of the channels averages out what single channels
    # prefer); for tokens of an image, row 3 asks about the last element alone: a grid cell.
    first = [slice(0, max(1, n // _SLAB)) for n in y.shape[1:]]
    questions = [tuple(first)]
    for d in dims:
        moved = list(first)
        moved[d - 1] = slice(y.shape[d] - max(1, y.shape[d] // _SLAB), None)
        questions.append(tuple(moved))
    if y.dim() == 3 and len(axes) == 2:
        questions.append((-1, -1))
    gen = torch.Generator(device=y.device).manual_seed(_SEED)
    cotangent = torch.zeros_like(y)
    for row, where in enumerate(questions):  # a random mix of the asked part of the output
        piece = cotangent[row][where]
        noise = torch.randn(piece.shape, generator=gen, device=y.device, dtype=y.dtype)
        cotangent[row][where] = noise
    link = next((link for link in links if _only_through(y, link.y, xs)), None)
    try:
        reading = link and _chained(y, dims, cotangent, link, image=len(axes) == 2)
    except Exception:  # a shortcut, never a failure of its own: the full pass decides
        reading = None
    if reading is not None:
        return reading
    (grad,) = torch.autograd.grad(y, xs, cotangent, retain_graph=True, allow_unused=True)
    if grad is None or not grad.any():
        raise _Undecided("no gradient from the input reaches the output")
    # (ROWS, *positions): |gradient| summed over the input's non-positional dims
    other = [d for d in range(1, grad.dim()) if d not in axes]
    mass = grad.detach().float().abs().sum(dim=other) if other else grad.detach().float().abs()
    return _reading(y.shape[1:], dims, _follows(mass, dims), mass, image=len(axes) == 2)


def _only_through(y: Tensor, via: Tensor, xs: Tensor) -> bool:
    """Whether every path from ``xs`` to ``y`` in the autograd graph goes through ``via``: the
    walk back from ``y`` that does not cross ``via`` never reaches ``xs``'s AccumulateGrad
    node (a skip connection from the input around ``via`` does)."""
    stop = (via.grad_fn, via.output_nr)  # an edge: a node's other outputs are not ``via``
    seen: set[object] = set()
    todo = [(y.grad_fn, y.output_nr)]
    while todo:
        edge = todo.pop()
        node = edge[0]
        if node is None or edge == stop or node in seen:
            continue
        if getattr(node, "variable", None) is xs:
            return False
        seen.add(node)
        todo.extend(node.next_functions)
    return True


def _chained(
    y: Tensor, dims: list[int], cotangent: Tensor, link: _Link, image: bool
) -> Measured | None:
    """The reading of ``y`` from its gradient down to ``link``'s output only, placed on the
    input by ``link``'s reading; None where that does not decide it as the full pass would
    (then the full pass runs): no gradient, undecided, or positions coarser than the input's."""
    (grad,) = torch.autograd.grad(y, link.y, cotangent, retain_graph=True, allow_unused=True)
    if grad is None or not grad.any():
        return None
    grad, _ = batch_first(grad, link.layer, ROWS)  # as link's reading reads its output
    mass = _on_positions(grad.float().abs(), link.reading)
    try:
        reading = _reading(y.shape[1:], dims, _follows(mass, dims), mass, image)
    except _Undecided:
        return None
    return reading if _places_every_axis(reading, image) else None


def _on_positions(mass: Tensor, m: Measured) -> Tensor:
    """|gradient| ``mass`` of an output read as ``m``, summed over its channels, on its
    positions: (ROWS, h, w), or (ROWS, L) for 1-D. Prefix tokens depend on no single input
    region (a CLS token, on all of it): their mass is spread evenly over the grid."""
    if m.tokens is not None:
        k, h, w = m.tokens
        rest = [d for d in range(1, mass.dim()) if d != m.cols]
        seq = mass.sum(dim=rest)  # (ROWS, L)
        spread = seq[:, :k].sum(1)[:, None, None] / (h * w)  # (ROWS, 1, 1)
        return seq[:, k:].unflatten(1, (h, w)) + spread  # (ROWS, h, w)
    positions = [m.cols] if m.rows is None else [m.rows, m.cols]
    moved = mass.movedim(positions, list(range(1, len(positions) + 1)))  # (ROWS, *pos, ...)
    return moved.flatten(len(positions) + 1).sum(-1)  # (ROWS, h, w) or (ROWS, L)


def _places_every_axis(reading: Reading, image: bool) -> bool:
    """Whether ``reading`` has more than one position along each of the input's positional
    axes (a global pool and a 1-D reading of an image have not)."""
    if not isinstance(reading, Measured):
        return False
    if reading.tokens is not None:  # a grid of at least 2 x 2 (_token_grid)
        return image
    sizes = [reading.shape[d - 1] for d in (reading.rows, reading.cols) if d is not None]
    return len(sizes) == 1 + image and min(sizes) > 1


def _follows(mass: Tensor, dims: list[int]) -> dict[int, set[int]]:
    """{output dim: the input axes (0: first positional axis, ...) along which it moves}.

    ``mass``: (ROWS, *positions), on the input or on an earlier output's positions; row 0 the
    region of the output's first quarter along every dim, row 1 + i that of the same part moved
    to dims[i]'s last quarter. Each axis is followed by the dim whose region moves furthest
    along it, if that is at least MIN_SHIFT. A part without any gradient (dead channels)
    places nothing.
    """
    total = mass.flatten(1).sum(1)  # (ROWS,)
    follows: dict[int, set[int]] = {d: set() for d in dims}
    for axis in range(1, mass.dim()):
        other = [a for a in range(1, mass.dim()) if a != axis]
        profile = mass.sum(dim=other) if other else mass  # (ROWS, n)
        n = profile.shape[1]
        # Each position at its centre, as a fraction of the axis: pixels and the coarser cells of
        # a chained mass alike (cell i of n covers [i / n, (i + 1) / n) of the input).
        where = (torch.arange(n, dtype=profile.dtype, device=profile.device) + 0.5) / n
        centroid = (profile * where).sum(1) / total.clamp_min(1e-30)  # (ROWS,) in (0, 1)
        moved = [
            float(centroid[1 + i] - centroid[0]) if total[0] and total[1 + i] else 0.0
            for i in range(len(dims))
        ]
        best = max(range(len(dims)), key=moved.__getitem__)  # one dim per axis: the one moving most
        if moved[best] >= MIN_SHIFT:
            follows[dims[best]].add(axis - 1)
    return follows


def _reading(
    shape: torch.Size,
    dims: list[int],
    follows: dict[int, set[int]],
    mass: Tensor,
    image: bool,
) -> Measured:
    """The Measured reading of a batch-first output (``shape`` without N) from the dims' axes."""
    spatial = [d for d in dims if follows[d]]
    channels = [d for d in dims if not follows[d]]
    ones = [d for d in range(1, len(shape) + 1) if d not in dims]
    if not channels and len(ones) == 1:  # one channel: (N, 1, H, W) grey maps
        channels = ones
    found = ", ".join(f"dim {d}: {sorted(follows[d]) or 'none'}" for d in dims)
    if len(channels) != 1:
        raise _Undecided(
            f"expected one output dim not following the input (channels), got {len(channels)} "
            f"(input axes followed per dim: {found})"
        )
    (channel,) = channels
    if not spatial:  # a global pool, (N, C, 1, 1): its positions are the dims of size 1
        ones = [d for d in ones if d != channel]
        if len(ones) == 2:
            return Measured(shape=tuple(shape), channel=channel, rows=ones[0], cols=ones[1])
        return Measured(shape=tuple(shape), channel=channel, rows=None, cols=ones[0])
    if image and len(spatial) == 1 and len(shape) == 2:
        # (N, L, D) following an image's height (and, by a row's part, its width): tokens, row
        # by row, if the last token's region is one cell of a grid (the region of the last
        # element, asked about last); else 1-D.
        (dim,) = spatial
        grid = _token_grid(mass[len(dims) + 1], shape[dim - 1])
        if grid is not None:
            return Measured(shape=tuple(shape), channel=channel, rows=None, cols=dim, tokens=grid)
    both = [d for d in spatial if len(follows[d]) == 2]
    if both:
        raise _Undecided(f"expected one output dim per input axis, got {found}")
    by_axis: dict[int, int] = {}
    for d in spatial:
        (axis,) = follows[d]
        if axis in by_axis:
            raise _Undecided(f"expected one output dim per input axis, got {found}")
        by_axis[axis] = d
    if not image or len(by_axis) == 1:  # 1-D: positions along one axis
        (dim,) = by_axis.values()
        return Measured(shape=tuple(shape), channel=channel, rows=None, cols=dim, tokens=None)
    return Measured(shape=tuple(shape), channel=channel, rows=by_axis[0], cols=by_axis[1])


def _token_grid(mass: Tensor, length: int) -> tuple[int, int, int] | None:
    """(k, h, w): the tiling of the input whose last cell holds the last token's region.

    ``mass``: (H, W) |gradient| of the last token. Every (h, w) with h * w <= length is tried;
    a cell's score is its mean density minus the larger of its left and upper neighbours'. None
    when no cell stands out, or the best grid is one row or column (a 1-D sequence).
    """
    height, width = mass.shape
    total = mass.double().cumsum(0).cumsum(1)
    integral = torch.nn.functional.pad(total, (1, 0, 1, 0))  # (H + 1, W + 1)

    def mass_below(y: Tensor, x: Tensor) -> Tensor:
        """Mass of [0, y) x [0, x) at fractional y, x: a pixel counts by the area covered."""
        y0, x0 = y.floor().long().clamp(0, height - 1), x.floor().long().clamp(0, width - 1)
        fy, fx = y - y0, x - x0
        top = integral[y0, x0] * (1 - fx) + integral[y0, x0 + 1] * fx
        bottom = integral[y0 + 1, x0] * (1 - fx) + integral[y0 + 1, x0 + 1] * fx
        return top * (1 - fy) + bottom * fy

    def density(top: Tensor, bottom: Tensor, left: Tensor, right: Tensor) -> Tensor:
        s = mass_below(bottom, right) - mass_below(top, right) - mass_below(bottom, left)
        return (s + mass_below(top, left)) / ((bottom - top) * (right - left))

    hs, ws = [], []
    for h in range(1, min(height, length) + 1):
        for w in range(max(1, (length + 1) // 2 // h), min(width, length // h) + 1):
            hs.append(h)
            ws.append(w)
    if not hs:
        return None
    h, w = torch.tensor(hs, dtype=torch.float64), torch.tensor(ws, dtype=torch.float64)
    # The last cell spans [H - H/h, H) x [W - W/w, W) (fractions of pixels count by area); its
    # left and upper neighbours are one cell over.
    cell_h, cell_w = height / h, width / w
    bottom, right = torch.full_like(h, float(height)), torch.full_like(w, float(width))
    top, left = bottom - cell_h, right - cell_w
    inside = density(top, bottom, left, right)
    left_cell = torch.where(w > 1, density(top, bottom, (left - cell_w).clamp_min(0), left), 0)
    upper_cell = torch.where(h > 1, density((top - cell_h).clamp_min(0), top, left, right), 0)
    score = inside - torch.maximum(left_cell, upper_cell)
    best = int(score.argmax())
    h_best, w_best = int(h[best]), int(w[best])
    if score[best] < _MIN_CONTRAST * inside[best] or min(h_best, w_best) == 1:
        return None
    return length - h_best * w_best, h_best, w_best
