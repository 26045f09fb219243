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
fallback rules read the shape from the kinds of the modules inside ``module`` (Conv1d: (N, C, L);
Linear, LayerNorm: (N, L, D) and (N, H, W, C)) and a grid the model states (timm
``patch_embed.grid_size``, HF ``config.image_size // patch_size``) or a square, and the note
starts with "fallback (why):". A sequence (a model whose input is not an image) is never folded
into a grid. (L, N, D) outputs (dim 1 is N and dim 0 is not, or the module says
``batch_first=False``) are transposed first.

Explicit layouts force one reading and raise :class:`LayoutError` ("expected X, got Y") when
the shape cannot be read that way: ``"nchw"`` (N, C, H, W), or (N, C, L) as 1-D maps;
``"nhwc"`` (N, H, W, C); ``"tokens"`` (N, L, D) on a grid found as above; ``"sequence"``
(N, L, D) as a 1-D sequence; ``"sequence_first"`` (L, N, ...) transposed, then read as with
``"auto"``; ``"features"`` (N, ...) flattened to (N, F). A callable gets the tensor (the first
one in the output) and must return (N, C, H, W) or (N, F).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import Tensor, nn

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

#: Most prefix tokens (CLS, distillation, registers) guessed when the model does not say.
MAX_GUESSED_PREFIX = 8
# How deep output containers are searched for a tensor (LSTM: (out, (h, c)) is depth 2).
_MAX_DEPTH = 4

# Channels-first layers of any rank (N, C, ...); ranked ones are also told by name below.
_CHANNELS_FIRST = (
    nn.modules.conv._ConvNd,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.Upsample,
)
# Layers acting on the last dim: their 3-D and 4-D outputs are (N, L, D) and (N, H, W, C).
_LAST_DIM = (
    nn.Linear,
    nn.Bilinear,
    nn.LayerNorm,
    nn.RMSNorm,
    nn.MultiheadAttention,
    nn.Embedding,
    nn.modules.rnn.RNNBase,
)
# PyTorch and timm name channels-first layers by their spatial rank: Conv1d, BatchNorm1d,
# Conv2dSame, LayerNorm2d (a channels-first subclass of nn.LayerNorm), SelectAdaptivePool2d.
_RANK_1D = re.compile(r"1d(?![a-z])")
_RANK_ND = re.compile(r"[23]d(?![a-z])")
# Last-dim norms that are not nn.LayerNorm subclasses: timm RmsNorm/SimpleNorm, HF *RMSNorm.
_NORM_NAME = re.compile(r"(layer|rms|simple)_?norm", re.IGNORECASE)
# Layer kinds: acts on the last dim; channels-first 1-D (N, C, L); channels-first otherwise.
_LAST, _CF1, _CF = "last", "channels-first 1-D", "channels-first"


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
        module: The module that produced ``output``; its type decides ambiguous shapes.
        model: The root module, searched (from ``module`` up) for the token grid.
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
            reader = _auto_reader(x, module, model, image_input)
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


def _auto_reader(x: Tensor, module: nn.Module, model: nn.Module, image_input: bool) -> _Reader:
    """The fallback rules: the output's shape and the kinds of the modules that made it."""
    if x.dim() == 2:
        return _features
    kinds = _kinds(module, model)
    if x.dim() == 4:
        return _nhwc if _output_fmt(module) == "NHWC" or kinds == {_LAST} else _nchw
    if isinstance(module, nn.modules.rnn.RNNBase):
        return _sequence
    # (N, C, L) needs 1-D layers: a Conv2d-made 3-D output is flattened patches (timm PatchEmbed)
    if _CF1 in kinds and _LAST not in kinds:
        return _nchw
    return _tokens_or_sequence if image_input else _sequence


def _output_fmt(module: nn.Module) -> str:
    """timm's PatchEmbed (``dynamic_img_size=True``) states its layout: Format.NHWC."""
    fmt = getattr(module, "output_fmt", "")
    return str(getattr(fmt, "value", fmt)).upper()


def _kinds(module: nn.Module, model: nn.Module) -> set[str]:
    """The layer kinds that decide ``module``'s output layout; empty when nothing is known.

    A known layer answers for itself; a container by the kinds of its known layers (timm
    ``Mlp``: Linear only); an element-wise module (GELU, Dropout, Identity, LayerScale) by
    the nearest enclosing module that has known layers (timm ``Mlp.act``).
    """
    own = _layer_kind(module)
    if own is not None:
        return {own}
    for scope in [module, *_ancestors(module, model)]:
        kinds = {_layer_kind(m) for m in scope.modules() if m is not module} - {None}
        if kinds:
            return kinds
    return set()


def _layer_kind(module: nn.Module) -> str | None:
    """What one layer's type says about its output layout, or None (element-wise, unknown)."""
    name = type(module).__name__
    if _RANK_1D.search(name):
        return _CF1
    if _RANK_ND.search(name) or getattr(module, "data_format", None) == "channels_first":
        return _CF  # the second: HF ConvNextLayerNorm
    if isinstance(module, _CHANNELS_FIRST):
        return _CF
    if isinstance(module, _LAST_DIM) or _NORM_NAME.search(name):
        return _LAST
    return None


def _ancestors(module: nn.Module, model: nn.Module) -> list[nn.Module]:
    """The modules enclosing ``module`` in ``model``, nearest first, ``model`` last."""
    name = next((n for n, m in model.named_modules() if m is module), None)
    if name is None:
        return [] if module is model else [model]
    parts = name.split(".") if name else []
    return [model.get_submodule(".".join(parts[:i])) for i in range(len(parts) - 1, -1, -1)]


# -------------------------------------------------------------------------------- token grids


def _token_grid(length: int, module: nn.Module, model: nn.Module) -> tuple[int, int, int, str]:
    """(h, w, k, how) with length == k + h * w, the k prefix tokens first; LayoutError if none.

    The model's grid wins where one encloses ``module``; else a square after the model's
    stated prefix count; else the smallest k in 0..MAX_GUESSED_PREFIX leaving a square.
    """
    stated = None
    for owner in [module, *_ancestors(module, model)]:
        grid, prefix = _stated_grid(owner)
        stated = stated if stated is not None else prefix
        if grid is None:
            continue
        h, w = grid
        k = length - h * w
        if 0 <= k <= max(MAX_GUESSED_PREFIX, prefix or 0):
            return h, w, k, ""
    tries = [stated] if stated is not None else range(MAX_GUESSED_PREFIX + 1)
    for k in tries:
        side = math.isqrt(max(length - k, 0))
        if side >= 2 and side * side == length - k:
            return side, side, k, " (square grid guessed)"
    if stated is None:
        wanted = f"k <= {MAX_GUESSED_PREFIX} prefix tokens + an h x w grid (the model's or square)"
    else:
        wanted = f"the model's {stated} prefix tokens + a square grid"
    raise LayoutError(
        f"expected L = {wanted}, got L = {length}; give this layer the layout 'sequence' or a "
        "function returning (N, C, H, W)"
    )


def _stated_grid(module: nn.Module) -> tuple[tuple[int, int] | None, int | None]:
    """The patch grid and prefix count a module states: timm ViTs, HF-style configs."""
    prefix = getattr(module, "num_prefix_tokens", None)
    prefix = prefix if isinstance(prefix, int) else None
    grid = getattr(getattr(module, "patch_embed", None), "grid_size", None)
    if _is_pair(grid):
        return (int(grid[0]), int(grid[1])), prefix
    config = getattr(module, "config", None)
    image, patch = getattr(config, "image_size", None), getattr(config, "patch_size", None)
    if image is not None and patch is not None:
        image, patch = _pair(image), _pair(patch)
        if image and patch and all(p > 0 for p in patch):
            return (image[0] // patch[0], image[1] // patch[1]), prefix
    return None, prefix


def _pair(value: object) -> tuple[int, int] | None:
    if isinstance(value, int):
        return value, value
    return (int(value[0]), int(value[1])) if _is_pair(value) else None


def _is_pair(value: object) -> bool:
    return (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, int) for v in value)
    )


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
    h, w, k, how = _token_grid(length, module, model)
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
