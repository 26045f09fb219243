"""Read one layer's output as drawable maps, and say how it was read.

Example::

    reading = probing.measure_layout(model, model.blocks[3], probe)  # once per layer and fit
    maps = interpret(output, module=model.blocks[3], model=model, num_rows=8, reading=reading)
    maps.act    # (8, 192, 14, 14): a ViT block's tokens on their patch grid, CLS dropped
    maps.note   # "measured: tokens 14x14 +1 prefix, 192 channels": for captions and the gallery
    interpret(output, module=m, model=model, num_rows=8, layout="nhwc")  # force a reading
    grid = lambda t: t[:, 1:].mT.unflatten(2, (14, 14))  # (N, 197, D) -> (N, D, 14, 14)
    interpret(output, module=m, model=model, num_rows=8, layout=grid)  # the escape hatch

``output`` is whatever a forward hook received; its first tensor (depth first in tuples, dicts,
dataclasses, HF ``ModelOutput``) is read, named in the note ("[0] of tuple"). With
``layout="auto"`` the reading is the one measured on the model (:class:`Measured`, from
:mod:`fm_lightning.probing`). Where the measurement could not decide (:class:`Fallback`), the
rules of :mod:`fm_lightning.fallback_layouts` read it, and the note starts with "fallback
(why):". (L, N, D) outputs (dim 1 is N and dim 0 is not, or the module says
``batch_first=False``) are transposed first.

Explicit layouts force one reading and raise :class:`LayoutError` ("expected X, got Y") when
the shape cannot be read that way: ``"nchw"`` (N, C, H, W), or (N, C, L) as 1-D maps;
``"nhwc"`` (N, H, W, C); ``"tokens"`` (N, L, D) on the grid the model states, or a square
(:func:`~fm_lightning.fallback_layouts.token_grid`); ``"sequence"``
(N, L, D) as a 1-D sequence; ``"sequence_first"`` (L, N, ...) transposed, then read as with
``"auto"``; ``"features"`` (N, ...) flattened to (N, F). A callable gets the tensor (the first
one in the output) and must return (N, C, H, W) or (N, F).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import Tensor, nn

from fm_lightning.fallback_layouts import fallback_reading, token_grid

__all__ = [
    "LAYOUTS",
    "Fallback",
    "LayoutError",
    "Maps",
    "Measured",
    "batch_first",
    "check_layout",
    "first_tensor",
    "interpret",
]

LAYOUTS = ("auto", "nchw", "nhwc", "tokens", "sequence", "sequence_first", "features")

Layout = str | Callable[[Tensor], Tensor]

# How deep output containers are searched for a tensor (LSTM: (out, (h, c)) is depth 2).
_MAX_DEPTH = 4


class LayoutError(ValueError):
    """An output that must not be drawn as read; the message says why and how to override."""


@dataclass(frozen=True)
class Maps:
    """One layer's output, ready for ``rendering.feature_grid``.

    Attributes:
        act: (N, C, H, W) maps or (N, F) features: a view of the hooked output where a view
            can do (same device and dtype, not detached).
        note: How it was read, for captions and the gallery: ``""`` for plain (N, C, H, W)
            or (N, F), else e.g. ``"channels-last -> NCHW"``,
            ``"tokens 8x8 +1 prefix, 192 channels"``, ``"[0] of tuple; sequence-first ->
            batch-first; sequence of 28 steps, 64 channels"``.
        layout: The reading applied: ``"nchw"``, ``"nhwc"``, ``"tokens"``, ``"sequence"``,
            ``"conv1d"``, ``"features"`` or ``"custom"``.
    """

    act: Tensor
    note: str
    layout: str


@dataclass(frozen=True)
class Measured:
    """How a layer's output lies on the model's input, measured (see :mod:`fm_lightning.probing`).

    Dims index the batch-first output (dim 0 is N).

    Attributes:
        shape: The output's shape without N, as measured; another shape is not read this way.
        channel: The dim whose slices all depend on the same input region: channels, features.
        rows: The dim following the input's height, or None (1-D, tokens).
        cols: The dim following the input's width (or its one axis); with ``tokens``, the dim
            holding the tokens.
        tokens: (k, h, w): k prefix tokens (no single input region) then an h x w grid, row by
            row; None when the positions are not tokens.
    """

    shape: tuple[int, ...]
    channel: int
    rows: int | None
    cols: int
    tokens: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class Fallback:
    """Why a layout could not be measured; the fallback rules read the output instead.

    Attributes:
        reason: For the caption and the warning, e.g. "no gradient from the input reaches the
            output".
        image_input: The model's input is an image (two positional axes): only then may a
            sequence of tokens be read on a grid.
    """

    reason: str
    image_input: bool = True


def check_layout(value: object) -> Layout:
    """Returns ``value`` if it is a layout :func:`interpret` accepts, else a ValueError.

    Args:
        value: One of :data:`LAYOUTS`, or a function ``Tensor -> Tensor`` returning
            (N, C, H, W) or (N, F), like grad-cam's ``reshape_transform``.
    """
    if isinstance(value, str) and value in LAYOUTS:
        return value
    if callable(value) and not isinstance(value, (str, type)):
        return value
    raise ValueError(
        f"expected a layout, one of {LAYOUTS} or a callable Tensor -> (N, C, H, W) or (N, F) "
        f"tensor, got {value!r}"
    )


def check_layouts(layouts: object) -> dict[str, Layout]:
    """FeatureMapCallback's ``layouts``: None or ``{pattern: layout}`` (see :func:`check_layout`);
    a ValueError naming the pattern otherwise."""
    if layouts is not None and not isinstance(layouts, Mapping):
        raise ValueError(
            f"expected `layouts` to be a dict {{pattern: layout}}, got {type(layouts).__name__}"
        )
    checked = {}
    for pattern, layout in (layouts or {}).items():
        try:
            checked[pattern] = check_layout(layout)
        except ValueError as err:
            raise ValueError(f"layouts[{pattern!r}]: {err}") from None
    return checked


def interpret(
    output: object,
    *,
    module: nn.Module,
    model: nn.Module,
    num_rows: int,
    layout: Layout = "auto",
    reading: Measured | Fallback | None = None,
) -> Maps:
    """Reads what a forward hook received as (N, C, H, W) maps or (N, F) features.

    Args:
        output: The hooked module's output: a Tensor, or a tuple, list, dict, dataclass or
            HF ``ModelOutput`` holding one (the first tensor is drawn, depth first).
        module: The module that produced ``output`` (the fallback rules read its kinds).
        model: The root module, searched (from ``module`` up) by the fallback rules.
        num_rows: The probe size N; the drawn rows must be the N probe inputs.
        layout: ``"auto"`` (see the module docstring), an explicit layout from
            :data:`LAYOUTS`, or a callable. An explicit layout wins over ``reading``.
        reading: What was measured for this layer (``"auto"`` only); None: the fallback rules,
            without a reason in the note.

    Returns:
        :class:`Maps` with the drawable tensor and how it was read.

    Raises:
        LayoutError: If the output holds no tensor, or cannot be read as ``layout`` with
            one row per probe input.
    """
    check_layout(layout)
    x, where = first_tensor(output)
    notes = [where] if where else []
    if callable(layout):
        return _custom(layout, x, num_rows, notes)
    if layout == "sequence_first":
        x = x.transpose(0, 1) if x.dim() >= 2 else x  # (L, N, ...) -> (N, L, ...)
        notes.append("sequence-first -> batch-first")
        layout = "auto"
    elif layout == "auto":
        x, note = batch_first(x, module, num_rows)
        notes += [note] if note else []
    if x.shape[0] != num_rows:
        raise LayoutError(
            f"expected the leading dim to be the probe size {num_rows} (one row per probe "
            f"input), got shape {tuple(x.shape)}; {_OVERRIDE_HINT}"
        )
    if layout == "auto" and isinstance(reading, Measured) and x.dim() > 2:
        act, note, read_as = _measured(x, reading)
    else:
        image_input = not isinstance(reading, Fallback) or reading.image_input
        if layout != "auto":
            reader = _READERS[layout]
        else:
            reader = _AUTO_READERS[fallback_reading(x, module, model, image_input)]
        act, note, read_as = reader(x, module, model)
        if layout == "auto" and isinstance(reading, Fallback) and x.dim() > 2:
            note = f"fallback ({reading.reason}): {note or read_as}"
    return Maps(act=act, note="; ".join([*notes, note] if note else notes), layout=read_as)


def batch_first(x: Tensor, module: nn.Module, num_rows: int) -> tuple[Tensor, str]:
    """``x`` with the batch first, and a note if it was transposed; LayoutError for bad shapes.

    (L, N, D) outputs are transposed: the module says ``batch_first=False``, or only dim 1 is N.
    """
    if x.numel() == 0 or not 2 <= x.dim() <= 4:
        raise LayoutError(
            f"expected a non-empty 2-D to 4-D output, (N, C, H, W), (N, L, D) or (N, F), got "
            f"shape {tuple(x.shape)}; {_OVERRIDE_HINT}"
        )
    if _is_sequence_first(x, module, num_rows):
        return x.transpose(0, 1), "sequence-first -> batch-first"  # (L, N, ...) -> (N, L, ...)
    return x, ""


_OVERRIDE_HINT = (
    f"it is not drawn. Give this layer a layout: one of {LAYOUTS[1:]}, or a function "
    "returning (N, C, H, W) or (N, F)"
)


# ----------------------------------------------------------------------------- finding the tensor


def first_tensor(output: object, depth: int = 0) -> tuple[Tensor, str]:
    """The first tensor in ``output``, depth first, and where it was: ``"[0] of tuple"``."""
    found = _search(output, depth)
    if found is None:
        raise LayoutError(
            "expected a Tensor, or a tuple, list, dict or dataclass holding one, got "
            f"{type(output).__name__} without any tensor; {_OVERRIDE_HINT}"
        )
    x, path = found
    return x, (f"{path.lstrip('.')} of {type(output).__name__}" if path else "")


def _search(obj: object, depth: int) -> tuple[Tensor, str] | None:
    if isinstance(obj, Tensor):
        return obj, ""
    if depth >= _MAX_DEPTH:
        return None
    for key, item in _items(obj):
        found = _search(item, depth + 1)
        if found is not None:
            return found[0], key + found[1]
    return None


def _items(obj: object) -> list[tuple[str, object]]:
    """(path segment, item) pairs of a container, in order; [] for anything else."""
    if isinstance(obj, Mapping):  # dict, and HF ModelOutput (an OrderedDict of set fields)
        plain = type(obj) is dict
        return [(f"[{k!r}]" if plain else f".{k}", v) for k, v in obj.items()]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [(f".{f.name}", getattr(obj, f.name)) for f in dataclasses.fields(obj)]
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple: torch.return_types
        return [(f".{name}", item) for name, item in zip(obj._fields, obj, strict=True)]
    if isinstance(obj, (tuple, list)):
        return [(f"[{i}]", item) for i, item in enumerate(obj)]
    return []


# -------------------------------------------------------------------------- deciding the reading


def _is_sequence_first(x: Tensor, module: nn.Module, num_rows: int) -> bool:
    """(L, N, D) outputs: the module says so (``batch_first=False``), or only dim 1 fits N."""
    if x.dim() != 3:
        return False
    batch_first = getattr(module, "batch_first", None)  # nn.RNNBase, nn.MultiheadAttention
    if batch_first is None:  # nn.TransformerEncoderLayer keeps it on its attention
        batch_first = getattr(getattr(module, "self_attn", None), "batch_first", None)
    if isinstance(batch_first, bool):
        return not batch_first
    return x.shape[1] == num_rows and x.shape[0] != num_rows


# ------------------------------------------------------------------------------------ readers


def _measured(x: Tensor, m: Measured) -> tuple[Tensor, str, str]:
    """The reading measured on the model: channels, then the positions on the input."""
    if tuple(x.shape[1:]) != m.shape:
        raise LayoutError(
            f"expected the shape the layout was measured for, (N, {', '.join(map(str, m.shape))})"
            f", got {tuple(x.shape)}; {_OVERRIDE_HINT}"
        )
    n, d, length = x.shape[0], x.shape[m.channel], x.shape[m.cols]
    rest = [i for i in range(1, x.dim()) if i not in (m.channel, m.rows, m.cols)]  # size 1
    if m.tokens is not None:
        k, h, w = m.tokens
        seq = x.permute(0, m.cols, m.channel, *rest).reshape(n, length, d)  # (N, L, D)
        act = seq[:, k:].unflatten(1, (h, w)).permute(0, 3, 1, 2)  # (N, D, h, w)
        prefix = f" +{k} prefix" if k else ""
        return act, f"measured: tokens {h}x{w}{prefix}, {d} channels", "tokens"
    if m.rows is None:  # positions along one input axis: (N, C, 1, L)
        act = x.permute(0, m.channel, *rest, m.cols).reshape(n, d, 1, length)
        return act, f"measured: 1-D, {length} positions, {d} channels", "sequence"
    act = x.permute(0, m.channel, m.rows, m.cols)  # (N, C, H, W)
    if (m.channel, m.rows, m.cols) == (1, 2, 3):
        return act, "measured: NCHW", "nchw"
    if (m.rows, m.cols, m.channel) == (1, 2, 3):
        return act, "measured: channels-last -> NCHW", "nhwc"
    return act, f"measured: dims {(m.channel, m.rows, m.cols)} -> NCHW", "nchw"


def _nchw(x: Tensor, module: nn.Module, model: nn.Module) -> tuple[Tensor, str, str]:
    if x.dim() == 4:
        return x, "", "nchw"
    if x.dim() == 3:
        return x.unsqueeze(2), "1-D maps", "conv1d"  # (N, C, L) -> (N, C, 1, L)
    raise LayoutError(f"expected (N, C, H, W) or (N, C, L) for 'nchw', got {tuple(x.shape)}")


def _nhwc(x: Tensor, module: nn.Module, model: nn.Module) -> tuple[Tensor, str, str]:
    if x.dim() != 4:
        raise LayoutError(f"expected (N, H, W, C) for 'nhwc', got shape {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2), "channels-last -> NCHW", "nhwc"  # (N, C, H, W)


def _tokens(x: Tensor, module: nn.Module, model: nn.Module) -> tuple[Tensor, str, str]:
    if x.dim() != 3:
        raise LayoutError(f"expected (N, L, D) for 'tokens', got shape {tuple(x.shape)}")
    _, length, d = x.shape
    try:
        h, w, k, how = token_grid(length, module, model)
    except ValueError as err:
        raise LayoutError(str(err)) from None
    act = x[:, k:].unflatten(1, (h, w)).permute(0, 3, 1, 2)  # (N, L, D) -> (N, D, h, w)
    prefix = f" +{k} prefix" if k else ""
    return act, f"tokens {h}x{w}{prefix}{how}, {d} channels", "tokens"


def _tokens_or_sequence(x: Tensor, module: nn.Module, model: nn.Module) -> tuple[Tensor, str, str]:
    """The automatic reading of (N, L, D): a grid where one is found, else a 1-D sequence."""
    try:
        return _tokens(x, module, model)
    except LayoutError:
        act, _, read_as = _sequence(x, module, model)
        _, length, d = x.shape
        return act, f"{length} tokens as a sequence (no h x w grid), {d} channels", read_as


def _sequence(x: Tensor, module: nn.Module, model: nn.Module) -> tuple[Tensor, str, str]:
    if x.dim() != 3:
        raise LayoutError(f"expected (N, L, D) for 'sequence', got shape {tuple(x.shape)}")
    _, length, d = x.shape
    act = x.transpose(1, 2).unsqueeze(2)  # (N, D, 1, L)
    return act, f"sequence of {length} steps, {d} channels", "sequence"


def _features(x: Tensor, module: nn.Module, model: nn.Module) -> tuple[Tensor, str, str]:
    if x.dim() == 2:
        return x, "", "features"
    return x.flatten(1), f"{tuple(x.shape[1:])} flattened to {x[0].numel()} features", "features"


def _custom(fn: Callable[[Tensor], Tensor], x: Tensor, num_rows: int, notes: list[str]) -> Maps:
    """A user function's reading, checked: it must give num_rows (N, C, H, W) or (N, F)."""
    name = getattr(fn, "__name__", type(fn).__name__)
    try:
        act = fn(x)
    except Exception as err:
        raise LayoutError(
            f"layout function {name} failed on an output of shape {tuple(x.shape)}: {err!r}"
        ) from err
    shape = tuple(act.shape) if isinstance(act, Tensor) else type(act).__name__
    if (
        not isinstance(act, Tensor)
        or act.dim() not in (2, 4)
        or act.shape[0] != num_rows
        or act.numel() == 0
    ):
        raise LayoutError(
            f"expected layout function {name} to return a non-empty ({num_rows}, C, H, W) or "
            f"({num_rows}, F) tensor for an output of shape {tuple(x.shape)}, got {shape}"
        )
    return Maps(act=act, note="; ".join([*notes, f"layout function {name}"]), layout="custom")


_Reader = Callable[[Tensor, nn.Module, nn.Module], tuple[Tensor, str, str]]
_READERS: dict[str, _Reader] = {
    "nchw": _nchw,
    "nhwc": _nhwc,
    "tokens": _tokens,
    "sequence": _sequence,
    "features": _features,
}
_AUTO_READERS: dict[str, _Reader] = {**_READERS, "tokens_or_sequence": _tokens_or_sequence}
