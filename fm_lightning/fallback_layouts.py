"""The fallback rules: how an output is read where its layout could not be measured.

    fallback_reading(x, module, model, image_input=True)  # "nhwc": only Linear inside, 4-D
    token_grid(197, module, model)  # (14, 14, 1, ""): timm's patch_embed.grid_size, 1 CLS token

:mod:`fm_lightning.probing` measures how each output lies on the input; where it cannot decide
(integer ids into an embedding, a detached or ``no_grad`` branch, an output that does not
depend on the input), :func:`fm_lightning.layouts.interpret` asks these rules, and the caption
says so ("fallback (why): ..."). They read the output's shape and the kinds of the modules that
made it: (N, C, L) from 1-D layers (Conv1d, BatchNorm1d) is 1-D maps; 4-D from layers acting on
the last dim (Linear, LayerNorm) is channels-last; (N, L, D) of an image model goes on the grid
the model states (timm ``patch_embed.grid_size``, HF ``config.image_size // patch_size``) or a
square, and of a model whose input is not an image is a 1-D sequence. The explicit layout
``"tokens"`` uses the same grid rule.
"""

from __future__ import annotations

import math
import re
from typing import Literal

from torch import Tensor, nn

__all__ = ["MAX_GUESSED_PREFIX", "fallback_reading", "token_grid"]

#: Most prefix tokens (CLS, distillation, registers) guessed when the model does not say.
MAX_GUESSED_PREFIX = 8

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

Reading = Literal["nchw", "nhwc", "sequence", "features", "tokens_or_sequence"]


def fallback_reading(x: Tensor, module: nn.Module, model: nn.Module, image_input: bool) -> Reading:
    """How to read ``module``'s batch-first output ``x``, by its shape and the kinds of the
    modules that made it; ``"tokens_or_sequence"``: on a grid (:func:`token_grid`) where one is
    found, else a 1-D sequence. ``image_input``: the model's input is an image."""
    if x.dim() == 2:
        return "features"
    kinds = _kinds(module, model)
    if x.dim() == 4:
        return "nhwc" if _output_fmt(module) == "NHWC" or kinds == {_LAST} else "nchw"
    if isinstance(module, nn.modules.rnn.RNNBase):
        return "sequence"
    # (N, C, L) needs 1-D layers: a Conv2d-made 3-D output is flattened patches (timm PatchEmbed)
    if _CF1 in kinds and _LAST not in kinds:
        return "nchw"
    return "tokens_or_sequence" if image_input else "sequence"


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


def token_grid(length: int, module: nn.Module, model: nn.Module) -> tuple[int, int, int, str]:
    """(h, w, k, how) with length == k + h * w, the k prefix tokens first; ValueError if none.

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
    raise ValueError(
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
