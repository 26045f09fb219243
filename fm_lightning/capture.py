"""What chosen layers output for a fixed probe: layer names, hooks, the probe pass, its inputs.

    modules = resolve_layers(model, ["conv1", "features.*", "**.fc1"])   # {name: module}
    readings = probing.measure_layouts(model, probe, modules)  # how each output lies, once
    captured, output = capture(model, probe, modules, max_channels=32, readings=readings)
    captured["conv1"].act           # (N, C', H, W) float32 on the CPU: only the channels to draw
    captured["blocks.0"].note       # how it was read, e.g. "measured: tokens 8x8 +1 prefix, ..."

Used by :class:`~fm_lightning.FeatureMapCallback` during training and by ``fm_lightning.visualize``
for checkpoints, so both draw the same thing. Nothing here knows about Lightning.

Names. Layers are named as in ``model.named_modules()``, with two conveniences: ``torch.compile``'s
``_orig_mod.`` is invisible (``conv1`` finds ``net._orig_mod.conv1`` and is reported as
``net.conv1``), and a pattern that matches no full name is tried relative to a direct child (a
LightningModule's ``self.net``): ``conv1`` finds ``net.conv1`` and is reported as ``conv1``.
In patterns ``*`` matches within one name part and ``**`` across parts: ``features.*`` is a
MobileNet's 13 blocks, ``**.conv1`` every ``conv1`` at any depth. A pattern that matches more than
:data:`MAX_MATCHES` modules is refused, since drawing hundreds of layers is never what was meant.

The probe pass runs the model once in eval mode, without gradients and eagerly (compiled code is
bypassed, so hooks fire whatever shapes it was compiled for), on a copy of the probe (a forward that
edits its input in place cannot change the stored probe), and restores every submodule's mode.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

from fm_lightning import layouts, rendering
from fm_lightning.rendering import describe

#: Most modules one pattern may select.
MAX_MATCHES = 64
_COMPILED = "_orig_mod"


# ----------------------------------------------------------------------------- layer names


def layer_names(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: module}`` of ``model``'s submodules, without ``torch.compile``'s ``_orig_mod.``.

    A compiled module and the module it wraps then share a name; the wrapped one is kept, since it
    is the one that runs eagerly in the probe pass.
    """
    named: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        clean = _without_compiled(name)
        if clean:
            named[clean] = module  # the inner module of a compiled wrapper comes later and wins
    return named


def glob_to_regex(pattern: str) -> re.Pattern[str]:
    """``*`` and ``?`` within one dotted name part, ``**`` for any number of whole parts."""
    parts = []
    for part in _without_compiled(pattern).split("."):
        if part == "**":
            parts.append(None)
            continue
        body = "".join(
            "[^.]*" if ch == "*" else "[^.]" if ch == "?" else re.escape(ch) for ch in part
        )
        parts.append(body)
    regex = ""
    for i, part in enumerate(parts):
        if part is None:  # zero or more parts, with their dots
            regex += r"(?:[^.]+\.)*" if i < len(parts) - 1 else r"(?:[^.]+(?:\.[^.]+)*)?"
            continue
        regex += part + (r"\." if i < len(parts) - 1 else "")
    return re.compile(regex)


def resolve_layers(model: nn.Module, patterns: Sequence[str]) -> dict[str, nn.Module]:
    """Map exact names and glob patterns to ``{name: module}``, in ``named_modules()`` order.

    Raises:
        ValueError: a pattern matches nothing (the message lists the layers and the closest names),
            or more than :data:`MAX_MATCHES` modules (the message gives the count and a narrower
            pattern).
    """
    named = layer_names(model)
    relative = {name.split(".", 1)[1]: m for name, m in named.items() if "." in name}
    chosen: dict[str, nn.Module] = {}
    for pattern in patterns:
        regex = glob_to_regex(pattern)
        hits = {name: m for name, m in named.items() if regex.fullmatch(name)}
        if not hits:  # relative to a direct child: "net.conv1" -> "conv1"
            hits = {name: m for name, m in relative.items() if regex.fullmatch(name)}
        if not hits:
            close = difflib.get_close_matches(pattern, [*named, *relative], n=3, cutoff=0.5)
            hint = f" Closest: {', '.join(close)}." if close else ""
            raise ValueError(
                f"layer {pattern!r} matches nothing in {type(model).__name__}."
                f"{hint} Available layers: {', '.join(named) or '(none)'}."
            )
        if len(hits) > MAX_MATCHES:
            raise ValueError(
                f"expected layer pattern {pattern!r} to match at most {MAX_MATCHES} modules, got "
                f"{len(hits)} ({', '.join(list(hits)[:4])}, ...); narrow it, e.g. "
                f"{_narrower(pattern)!r} ('*' stays within one name part, '**' crosses parts)"
            )
        chosen.update(hits)
    order = {module: i for i, module in enumerate(named.values())}
    return dict(sorted(chosen.items(), key=lambda item: order[item[1]]))


def match_layer(patterns: Mapping[str, Any], name: str) -> Any | None:
    """The value of the first pattern in ``patterns`` matching layer ``name`` (``@2`` ignored)."""
    base = name.split("@", 1)[0]
    for pattern, value in patterns.items():
        if glob_to_regex(pattern).fullmatch(base):
            return value
    return None


def _without_compiled(name: str) -> str:
    return ".".join(part for part in name.split(".") if part != _COMPILED)


def _narrower(pattern: str) -> str:
    return pattern.replace("**", "*") if "**" in pattern else pattern + ".conv*"


# ----------------------------------------------------------------------------- probe inputs
# A probe is what the model is called with: a Tensor (model(x)), a tuple (model(*x)) or a dict
# (model(**x)), every tensor in it holding the same N rows.


# Keys tried, in order, when a batch is a dict and no input_key/input_fn was given.
DICT_INPUT_KEYS = ("image", "images", "img", "x", "input", "inputs", "pixel_values")
DICT_TARGET_KEYS = ("label", "labels", "target", "targets", "y")


@dataclass(frozen=True)
class BatchReader:
    """Where the model input and the true classes are in a batch of a validation dataloader.

    ``input_key``: a dict key or tuple index; ``input_fn``: ``batch -> model input`` (a Tensor,
    a tuple for ``model(*x)`` or a dict for ``model(**x)``); neither: the batch itself, its
    first element, or a usual dict key (:data:`DICT_INPUT_KEYS`). ``target_fn``: ``batch ->
    (N,) classes``; default the second element of an ``(x, y)`` batch or a usual dict key.
    """

    input_key: str | int | None = None
    input_fn: Callable[[Any], Any] | None = None
    target_fn: Callable[[Any], Tensor] | None = None

    def __post_init__(self) -> None:
        if self.input_key is not None and self.input_fn is not None:
            raise ValueError("expected at most one of `input_key` and `input_fn`, got both")
        for arg in ("input_fn", "target_fn"):
            fn = getattr(self, arg)
            if fn is not None and not callable(fn):
                raise ValueError(f"expected `{arg}` to be callable, got {type(fn).__name__}")

    def inputs(self, batch: Any) -> Any:
        """The model input of ``batch``; a TypeError or KeyError naming the fix otherwise."""
        if self.input_fn is not None:
            x = self.input_fn(batch)
        elif self.input_key is not None:
            x = batch[self.input_key]
        elif isinstance(batch, Tensor):
            x = batch
        elif isinstance(batch, (tuple, list)) and batch:
            x = batch[0]
        elif isinstance(batch, Mapping):
            key = next((k for k in DICT_INPUT_KEYS if k in batch), None)
            if key is None:
                raise KeyError(
                    f"expected the batch dict to hold one of {DICT_INPUT_KEYS}, got keys "
                    f"{list(batch)}; pass FeatureMapCallback(input_key=...) or input_fn=..."
                )
            x = batch[key]
        else:
            raise TypeError(
                "expected a batch that is a Tensor, tuple, list or dict, got "
                f"{type(batch).__name__}; pass FeatureMapCallback(input_fn=...) to pick the input"
            )
        if not isinstance(x, (Tensor, tuple, list, Mapping)):
            raise TypeError(
                f"expected the model input to be a Tensor, tuple or dict, got {describe(x)}"
            )
        num_rows(x)  # raises for inputs without a common batch size
        return x

    def targets(self, batch: Any, n: int) -> Tensor | None:
        """(n,) integer classes of a batch, for the CAM's true-class maps; None without them."""
        if self.target_fn is not None:
            y = self.target_fn(batch)
        elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
            y = batch[1]
        elif isinstance(batch, Mapping):
            y = next((batch[k] for k in DICT_TARGET_KEYS if k in batch), None)
        else:
            y = None
        is_classes = isinstance(y, Tensor) and y.shape == (n,) and not y.is_floating_point()
        if self.target_fn is not None and not is_classes:
            raise TypeError(
                f"expected target_fn to return ({n},) integer classes, got {describe(y)}"
            )
        return y.detach() if is_classes else None


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(x)``, ``model(*x)`` or ``model(**x)``, by the type of ``inputs``."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def num_rows(inputs: Any) -> int:
    """N of a probe: the leading size of its first tensor.

    Raises:
        TypeError: ``inputs`` holds no tensor, or tensors with different leading sizes.
    """
    sizes = {len(t) for t in _tensors(inputs)}
    if len(sizes) != 1:
        found = "no tensor" if not sizes else f"leading sizes {sorted(sizes)}"
        raise TypeError(
            f"expected model inputs holding tensors with the same batch size N, got {found}"
        )
    return sizes.pop()


def take_rows(inputs: Any, n: int) -> Any:
    """The first ``n`` rows of every tensor, detached copies (not views of a batch)."""
    return apply_to_collection(inputs, Tensor, lambda t: t[:n].detach().clone())


def concat_rows(parts: Sequence[Any]) -> Any:
    """Rows of several probes of the same structure, concatenated tensor by tensor."""
    first = parts[0]
    if isinstance(first, Tensor):
        return torch.cat(list(parts))
    if isinstance(first, Mapping):
        return {key: concat_rows([p[key] for p in parts]) for key in first}
    if isinstance(first, (tuple, list)):
        return type(first)(concat_rows(items) for items in zip(*parts, strict=True))
    return first  # a constant argument (a flag, None): the same in every batch


def to_device(inputs: Any, device: torch.device | str) -> Any:
    return apply_to_collection(inputs, Tensor, lambda t: t.to(device))


def first_image(inputs: Any) -> Tensor | None:
    """The first image-like tensor of a probe, as (N, C, H, W): 4-D, or 3-D read as (N, H, W)."""
    for t in _tensors(inputs):
        if t.ndim == 4 and t.numel():
            return t
        if t.ndim == 3 and min(t.shape[1:]) >= 8 and t.is_floating_point():
            return t.unsqueeze(1)
    return None


def _tensors(inputs: Any) -> list[Tensor]:
    found: list[Tensor] = []
    apply_to_collection(inputs, Tensor, found.append)
    return found


# ----------------------------------------------------------------------------- hooks and pass


@contextmanager
def forward_hooks(
    modules: Mapping[str, nn.Module], record: Callable[[str, nn.Module, Any], None]
) -> Iterator[None]:
    """Forward hooks on ``modules`` for the body of the ``with`` only, removed however it ends.

    Each output goes to ``record(key, module, output)``; ``key`` is the module's name, or
    ``name@2``, ``name@3``... when a module runs again in the same pass (SimpleCNN's shared pool).
    """
    calls: dict[str, int] = {}

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            calls[name] = calls.get(name, 0) + 1
            record(name if calls[name] == 1 else f"{name}@{calls[name]}", module, output)

        return hook

    handles = [module.register_forward_hook(make_hook(name)) for name, module in modules.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` for the body only; every submodule gets its own mode back (frozen too)."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        yield
    finally:
        for module, training in modes.items():
            module.train(training)


def probe_pass(
    model: nn.Module,
    inputs: Any,
    modules: Mapping[str, nn.Module],
    record: Callable[[str, nn.Module, Any], None],
    forward_context: AbstractContextManager | None = None,
) -> Any:
    """One forward of a copy of ``inputs`` in eval mode, eagerly, without gradients, hooks on.

    ``forward_context`` wraps the call, e.g. Lightning's precision plugin's ``forward_context()``.
    Returns the model's output.
    """
    inputs = apply_to_collection(inputs, Tensor, torch.clone)  # forward may edit its input
    with (
        eval_mode(model),
        forward_hooks(modules, record),
        torch.no_grad(),
        torch.compiler.set_stance("force_eager"),  # compiled code would skip the hooks
        forward_context or nullcontext(),
    ):
        return call_model(model, inputs)


def read_output(
    output: Any,
    key: str,
    module: nn.Module,
    model: nn.Module,
    num_rows: int,
    overrides: Mapping[str, Any] | None = None,
    readings: Mapping[str, Any] | None = None,
) -> layouts.Maps:
    """One hooked layer's output as maps or features, read as every picture kind reads it: its
    ``layouts=`` override if one matches ``key``, else its measured reading (else the fallback
    rules). Raises :class:`fm_lightning.layouts.LayoutError` for outputs that cannot be read."""
    return layouts.interpret(
        output,
        module=module,
        model=model,
        num_rows=num_rows,
        layout=match_layer(overrides or {}, key) or "auto",
        reading=(readings or {}).get(key),
    )


@dataclass
class Captured:
    """One layer's output from a probe pass, ready to draw."""

    act: Tensor | None = None  # (N, C', H, W) drawn channels or (N, F), float32 on the CPU
    channels: Tensor | None = None  # indices of the drawn channels; None for (N, F)
    total_channels: int = 0  # C of the layer (or F), before selection
    stats: dict[str, float] = field(default_factory=dict)
    note: str = ""  # how the output was read (layouts.Maps.note)
    error: str | None = None  # why this layer is not drawn


def capture(
    model: nn.Module,
    inputs: Any,
    modules: Mapping[str, nn.Module],
    *,
    max_channels: int = 32,
    order: str = "index",
    layouts_by_layer: Mapping[str, Any] | None = None,
    readings: Mapping[str, Any] | None = None,
    stats: bool = True,
    forward_context: AbstractContextManager | None = None,
    channels: Mapping[str, Tensor] | None = None,
) -> tuple[dict[str, Captured], Any]:
    """Run the probe pass and keep, per layer, the channels that will be drawn.

    Channels are chosen on the model's device and only those are moved to the CPU.

    Args:
        model: the whole model (hooks go on ``modules``; token grids are looked up here).
        inputs: the probe (see :func:`call_model`).
        modules: ``{name: module}``, as from :func:`resolve_layers`.
        max_channels, order: see :func:`fm_lightning.rendering.select_channels`.
        layouts_by_layer: ``{pattern: layout}`` overrides, see :mod:`fm_lightning.layouts`.
        readings: ``{key: reading}`` measured layouts, from
            :func:`fm_lightning.probing.measure_layouts`; a key without one is read by the
            fallback rules.
        stats: also compute :func:`fm_lightning.rendering.activation_stats` per layer.
        forward_context: see :func:`probe_pass`.
        channels: ``{key: (C',) indices}`` to draw instead of choosing them (e.g. the channels
            chosen at an earlier epoch); ignored for a layer where they do not fit (an index
            beyond its channels, or not ``min(C, max_channels)`` of them).

    Returns:
        ``({key: Captured}, model output)``; keys are as :func:`forward_hooks` gives them. A
        module that did not run in the pass has no key.
    """
    n = num_rows(inputs)
    overrides = layouts_by_layer or {}
    given = channels or {}
    captured: dict[str, Captured] = {}

    def record(key: str, module: nn.Module, output: Any) -> None:
        try:
            maps = read_output(output, key, module, model, n, overrides, readings)
        except layouts.LayoutError as err:
            captured[key] = Captured(error=str(err))
            return
        act = maps.act.detach()
        chosen = None
        drawn = act  # (N, F) is small enough to move whole
        if act.ndim == 4:  # pick the drawn channels here, on the device
            chosen = given.get(key)
            fits = chosen is not None and len(chosen) == min(act.shape[1], max_channels)
            if fits and int(chosen.max()) < act.shape[1]:
                chosen = chosen.to(act.device)
            else:
                chosen = rendering.select_channels(act, max_channels, order)
            drawn = act.index_select(1, chosen)
        captured[key] = Captured(
            act=drawn.float().cpu(),
            channels=None if chosen is None else chosen.cpu(),
            total_channels=act.shape[1],
            stats=rendering.activation_stats(act) if stats else {},
            note=maps.note,
        )

    output = probe_pass(model, inputs, modules, record, forward_context)
    return captured, output


def not_run(modules: Mapping[str, nn.Module], captured: Mapping[str, Any]) -> list[str]:
    """Names in ``modules`` that no hook saw in a pass (``captured`` keyed as ``capture`` gives)."""
    seen = {key.split("@", 1)[0] for key in captured}
    return [name for name in modules if name not in seen]
