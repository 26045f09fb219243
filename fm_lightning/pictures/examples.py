"""The examples picture kind: each drawn channel's top validation inputs, and dead channels.

    kind = ExamplesKind(k=9, dead_warn=0.5, max_channels=32, cmap="viridis", order="index")
    kind.start(run)                            # a captured validation starts (every rank)
    with kind.observe(run, inputs):            # each validation batch: its maps are streamed
        model(inputs)
    kind.finish(run)                           # every rank's top-k merged (all_gather)
    drawn = kind.draw(run, shot)               # rank zero: <layer>/examples/epoch=003.png

On a captured validation the chosen layers are also observed on every validation batch: for each
drawn channel (the channels the maps draw) the inputs that excite it most
(:class:`fm_lightning.topk.TopKExamples`), cropped to its receptive field
(:mod:`fm_lightning.receptive_field`), and the channels dead over the whole validation set
(:class:`DeadChannels`, kept across epochs). Inputs are told apart by content
(:func:`fm_lightning.topk.content_ids`), whatever sampler gave them to a rank: DistributedSampler's
strided shards padded with the first inputs again, a custom one, each rank its own data. So all
ranks' candidates merge as one process's would, and an input seen twice counts once. At most as
many examples as the validation set holds are kept. With ``order="activation"`` under DDP and no
sanity check, epoch 0's rows are the first channels: no probe exists yet to choose them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fm_lightning.capture import forward_hooks, read_output
from fm_lightning.gallery import EXAMPLES_DIR
from fm_lightning.layouts import LayoutError
from fm_lightning.pictures import Drawn, Picture, PictureKind, Run, Shot
from fm_lightning.pictures.maps import ranges
from fm_lightning.probing import Reading, measure_layouts
from fm_lightning.receptive_field import ReceptiveField, receptive_field
from fm_lightning.rendering import DEAD_RGB, check_cmap, colorize, describe, normalize_maps
from fm_lightning.text import stamp, text_width
from fm_lightning.topk import MAX_EXAMPLES, ExamplesResult, TopKExamples, content_ids


def check_examples(k: object, dead_warn: object) -> None:
    """FeatureMapCallback's ``examples`` and ``dead_warn``, or a ValueError naming the bound."""
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_EXAMPLES:
        raise ValueError(f"expected `examples` to be an int in [0, {MAX_EXAMPLES}], got {k!r}")
    if dead_warn is not None and (
        isinstance(dead_warn, bool)
        or not isinstance(dead_warn, (int, float))
        or not 0 <= dead_warn <= 1
    ):
        raise ValueError(f"expected `dead_warn` in [0, 1] or None, got {dead_warn!r}")


class ExamplesKind(PictureKind):
    def __init__(
        self, k: int, dead_warn: float | None, max_channels: int, cmap: str, order: str
    ) -> None:
        self.k = k
        self.dead_warn = dead_warn
        self.max_channels = max_channels
        self.cmap = cmap
        self.order = order
        self.dead: dict[str, DeadChannels] = {}  # across epochs, in checkpoints
        self.fields: dict[str, ReceptiveField] = {}  # measured once per layer and fit
        self._stream: ExampleStream | None = None
        self._choose_at_first_batch = False  # order="activation" before any probe exists
        self._results: dict[str, ExamplesResult] = {}

    def start(self, run: Run) -> None:
        """Open a stream for this validation, keeping the channels the maps will draw."""
        self._results, self._stream = {}, None
        channels: dict[str, Tensor] = {}
        self._choose_at_first_batch = False
        try:
            if self.order == "activation":
                # The maps' channels come from the probe, on the same weights as at the end of
                # this validation.
                probe = run.shared_probe()
                if probe is not None:
                    channels = run.channels_for(probe)
                elif run.world_size == 1:
                    # No probe yet (the first validation, without a sanity check): it will be
                    # this run's first inputs, so they choose, before any batch is streamed.
                    # Under DDP rank zero's inputs are not known to the others: the first
                    # channels are kept.
                    self._choose_at_first_batch = True
            self._stream = ExampleStream(
                run.model,
                run.modules,
                k=self._kept(run),
                max_channels=self.max_channels,
                channels=channels,
                fields=self.fields,
                layouts_by_layer=run.layouts,
                readings=run.readings,
            )
        except Exception as err:
            run.fail("examples", err)

    def _kept(self, run: Run) -> int:
        """``k``, or fewer when the validation set holds fewer inputs (all ranks': a state's
        slots have one shape on every rank, for all_gather)."""
        size = run.validation_inputs
        local = torch.tensor(self.k if size is None else min(size, self.k))
        device = getattr(run.model, "device", "cpu")
        return int(run.all_gather(local.to(device)).sum().clamp(1, self.k))

    def observe(self, run: Run, inputs: Any) -> AbstractContextManager:
        if self._stream is None:
            return nullcontext()
        try:
            if not isinstance(inputs, Tensor) or inputs.ndim != 4:
                raise TypeError(
                    "expected the model input to be one (N, C, H, W) tensor for examples, got "
                    f"{describe(inputs)}"
                )
            if len(inputs) == 0:
                return nullcontext()  # nothing to stream, and the next batch may choose
            indices = content_ids(inputs)
            if self._choose_at_first_batch:
                self._choose_at_first_batch = False
                if len(inputs) >= run.num_images:  # the probe will be these inputs
                    self._stream.channels = run.channels_for(inputs[: run.num_images])
            return self._stream.batch(inputs, indices)
        except Exception as err:
            self._stream = None
            run.fail("examples", err)
            return nullcontext()

    def finish(self, run: Run) -> None:
        """Every rank's candidates, merged (Lightning's all_gather, on every rank)."""
        stream, self._stream, self._results = self._stream, None, {}
        # A rank whose stream failed, or saw other layers, must not leave the others waiting
        # in all_gather: all ranks agree first, and gather only if every one can.
        layers = None if stream is None else sorted(stream.topk)
        ok = layers is not None and layers == run.broadcast(layers)
        if not run.all_agree(ok) or stream is None:
            return
        for layer, error in stream.errors.items():
            run.warn_once(f"examples:{layer}", f"no examples for {layer!r}: {error}.")
        try:
            self._results = {
                layer: TopKExamples.merge(run.all_gather(state))
                for layer, state in stream.states().items()
            }
        except Exception as err:
            run.fail("examples", err)

    def draw(self, run: Run, shot: Shot) -> Drawn:
        """One examples grid per layer; dead channels over the whole validation set."""
        drawn, epoch = Drawn(), shot.frame.epoch
        for layer, result in self._results.items():
            dead = self.dead.setdefault(layer, DeadChannels())
            dead.update(epoch, result.dead.cpu())
            folder = shot.folders[layer]
            drawn.scalars[f"feature_stats/{layer}/dead_channels_val"] = dead.fraction
            drawn.stats[folder] = {"dead_channels_val": dead.fraction}  # beside the probe's
            drawn.dead[folder] = dict(dead.since)
            if dead.crossed(self.dead_warn):
                run.warn(
                    f"{dead.fraction:.0%} of {layer!r}'s channels are dead (never above 0 on the "
                    f"validation set) at epoch {epoch}, over dead_warn={self.dead_warn}: "
                    f"channels {dead.channels}."
                )
            try:
                grid = examples_grid(result, cmap=self.cmap)
            except Exception as err:
                run.fail("render", err)
                continue
            caption = f"{shot.frame.text}: {examples_caption(result, 'validation', dead.channels)}"
            path = f"{folder}/{EXAMPLES_DIR}/{shot.frame.stem}.png"
            drawn.pictures.append(Picture(f"feature_examples/{layer}", path, grid, caption))
        self._results = {}
        return drawn

    def layer_keys(self) -> list[str]:
        return list(self._results)

    def state_dict(self) -> dict[str, Any]:
        return {"dead": {layer: dead.state_dict() for layer, dead in self.dead.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.dead = {}
        for layer, dead_state in (state.get("dead") or {}).items():
            self.dead[layer] = DeadChannels()
            self.dead[layer].load_state_dict(dead_state)

    def teardown(self) -> None:
        """No reference to the model outlives a fit."""
        self._stream, self._results = None, {}


def examples_caption(result: ExamplesResult, source: str, dead: list[int]) -> str:
    """What an examples grid shows, e.g. ``top 9 validation inputs of channels 0-31, ...``."""
    return (
        f"top {result.scores.shape[1]} {source} inputs of channels "
        f"{ranges(result.channels.tolist())}, cropped to the receptive field; dead over the "
        f"whole {source} set: {ranges(dead) or 'none'}"
    )


@torch.no_grad()
def examples_grid(
    result: ExamplesResult,
    cmap: str = "inferno",
    overlay: bool = True,
    dead: Tensor | None = None,
    min_tile_px: int = 40,
) -> Tensor:
    """Draw a layer's top-k examples: one row per drawn channel, its k crops best first.

    Each tile is the crop (grayscale from the first channel, or RGB for 3 channels; one range
    for the whole layer, so brightness compares), with the channel's activation blended over it
    when ``overlay`` (one range per row), and the score written under it. Rows are labelled
    ``ch N``; dead channels get a red label and frame. Outside the input is light grey, and so
    is an empty slot (fewer inputs than k), captioned ``none``.

    Args:
        result: from :meth:`TopKExamples.result` or :meth:`TopKExamples.merge`.
        cmap: matplotlib colormap of the overlay.
        overlay: blend the activation over the crops (needs ``result.overlays``).
        dead: (C,) bool, the channels to mark; default ``result.dead``.
        min_tile_px: tiles are enlarged by an integer factor to at least this size; a column
            is widened where a score's caption is wider than its tiles.

    Returns:
        (H, W, 3) uint8 tensor on the CPU.
    """
    check_cmap(cmap)
    if overlay and result.overlays is None:
        raise ValueError("expected a result with overlays for overlay=True; use overlay=False")
    dead = (result.dead if dead is None else dead).cpu()
    if dead.shape != result.channel_max.shape:
        raise ValueError(
            f"expected dead of shape {tuple(result.channel_max.shape)}, got {describe(dead)}"
        )
    crops = result.crops.cpu().float()  # (Cd, k, Cin, h, w)
    cd, k, cin, h, w = crops.shape
    # RGB, or grey from the first channel, kept at 1 channel until the colours are blended in
    # (the layer grids of a large receptive field hold millions of values).
    crops = crops[:, :, :3] if cin == 3 else crops[:, :, :1]  # (Cd, k, 3 | 1, h, w)
    pad = crops.isnan()  # outside the input
    # One range for the layer: normalize_maps over a single "image" holding every crop.
    rgb = normalize_maps(crops.reshape(1, -1, h, w), "layer").view(crops.shape)
    if overlay:
        heat = colorize(
            normalize_maps(result.overlays.cpu().float(), "layer"), cmap
        )  # (Cd, k, 3, h, w)
        rgb = (1 - _OVERLAY_ALPHA) * rgb + _OVERLAY_ALPHA * heat
    rgb = rgb.masked_fill(pad, _OUTSIDE).expand(cd, k, 3, h, w)
    empty = result.indices.cpu() < 0  # (Cd, k)
    rgb = rgb.masked_fill(empty[:, :, None, None, None].expand_as(rgb), _OUTSIDE)
    tiles = rgb.mul(255).round().to(torch.uint8).permute(0, 1, 3, 4, 2).numpy()  # (Cd, k, h, w, 3)
    zoom = max(1, math.ceil(min_tile_px / max(h, w)))
    th, tw = h * zoom, w * zoom
    scores, channels = result.scores.cpu().tolist(), result.channels.cpu().tolist()
    captions = [
        ["none" if gone else f"{score:.3g}" for score, gone in zip(row, gone_row, strict=True)]
        for row, gone_row in zip(scores, empty.tolist(), strict=True)
    ]
    # A cell is widened where a caption (say -1.23e+03) is wider than the tile above it.
    widest = max(text_width(c, _FONT_PX) for row in captions for c in row)
    cell_w, cell_h = max(tw, widest + 2) + _GAP, th + _CAPTION_PX + _GAP
    pixels = np.full((cd * cell_h + _GAP, _LABEL_PX + k * cell_w + _GAP, 3), 255, dtype=np.uint8)
    # Every tile in one copy, enlarged on the way: the cells' grid as a view of the canvas,
    # (Cd, h, zoom, k, w, zoom, 3), each tile's pixel broadcast over its zoom x zoom block.
    cells = pixels[_GAP : _GAP + cd * cell_h, _LABEL_PX : _LABEL_PX + k * cell_w]
    blocks = cells.reshape(cd, cell_h, k, cell_w, 3)[:, :th, :, :tw]
    blocks = blocks.reshape(cd, h, zoom, k, w, zoom, 3)
    blocks[...] = tiles.transpose(0, 2, 1, 3, 4)[:, :, None, :, :, None]
    dead = dead.tolist()
    for r in range(cd):
        top = _GAP + r * cell_h
        color = DEAD_RGB if dead[channels[r]] else (0, 0, 0)
        stamp(pixels, (2, top + 2), f"ch {channels[r]}", color, _FONT_PX)
        if dead[channels[r]]:
            stamp(pixels, (2, top + 2 + _FONT_PX + 2), "dead", DEAD_RGB, _FONT_PX)
            # a 2-pixel frame around the row's tiles and captions
            y0, y1 = top - 2, top + th + _CAPTION_PX + 1
            x0, x1 = _LABEL_PX - 2, _LABEL_PX + k * cell_w - _GAP + 2
            for ys, xs in (
                (slice(y0, y0 + 2), slice(x0, x1)),
                (slice(y1 - 2, y1), slice(x0, x1)),
                (slice(y0, y1), slice(x0, x0 + 2)),
                (slice(y0, y1), slice(x1 - 2, x1)),
            ):
                pixels[ys, xs] = DEAD_RGB
        for j, caption in enumerate(captions[r]):
            stamp(pixels, (_LABEL_PX + j * cell_w + 1, top + th), caption, color, _FONT_PX)
    return torch.from_numpy(pixels)


class DeadChannels:
    """One layer's dead channels across epochs: which, since when, and when to warn.

    A channel is dead at an epoch when its maximum over all validation inputs and positions is
    <= 0 (``ExamplesResult.dead``); it has been dead since the first epoch of its current
    unbroken dead run (a channel that comes back to life starts over).

        dead = DeadChannels()
        dead.update(epoch, result.dead)
        if dead.crossed(0.5):   # True once each time the fraction rises above 0.5
            warnings.warn(f"conv2: {dead.fraction:.0%} of channels dead at epoch {epoch}")
    """

    def __init__(self) -> None:
        self.since: dict[int, int] = {}  # channel -> epoch it has been dead since
        self.num_channels = 0
        self._above = False  # was the fraction above the threshold at the last crossed()?

    def update(self, epoch: int, dead: Tensor) -> None:
        """Record one epoch's (C,) bool dead mask."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"expected epoch to be an int >= 0, got {epoch!r}")
        if not isinstance(dead, Tensor) or dead.dim() != 1 or dead.dtype != torch.bool:
            raise ValueError(f"expected dead to be a (C,) bool tensor, got {describe(dead)}")
        now = dead.nonzero().flatten().tolist()
        self.since = {c: self.since.get(c, epoch) for c in now}
        self.num_channels = len(dead)

    @property
    def fraction(self) -> float:
        """Fraction of the layer's channels dead at the last update (0.0 before any)."""
        return len(self.since) / self.num_channels if self.num_channels else 0.0

    @property
    def channels(self) -> list[int]:
        """The dead channels, ascending."""
        return sorted(self.since)

    def crossed(self, threshold: float | None) -> bool:
        """True when the dead fraction is above ``threshold`` and was not at the previous call.

        ``None`` disables (always False). Call once per update.
        """
        if threshold is None:
            return False
        above = self.fraction > threshold
        fire, self._above = above and not self._above, above
        return fire

    def state_dict(self) -> dict:
        return {"since": dict(self.since), "num_channels": self.num_channels, "above": self._above}

    def load_state_dict(self, state: Mapping) -> None:
        try:
            since = {int(c): int(e) for c, e in state["since"].items()}
            num_channels, above = int(state["num_channels"]), bool(state["above"])
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(
                f"expected a DeadChannels.state_dict() (since, num_channels, above), got {state!r}"
            ) from err
        self.since, self.num_channels, self._above = since, num_channels, above


_FIELD_INPUTS = 8  # inputs of the first batch that receptive_field() measures a layer with
_OVERLAY_ALPHA = 0.45
_OUTSIDE = 0.85  # light grey: outside the input, or an empty slot
_FONT_PX = 10
_CAPTION_PX = 12
_LABEL_PX = 36
_GAP = 3


class ExampleStream:
    """Feeds one validation run's batches to one :class:`TopKExamples` per layer, through hooks.

        stream = ExampleStream(model, {"conv2": model.net.conv2}, k=9, max_channels=32)
        with stream.batch(inputs, indices):      # hooks on the layers for this forward only
            model(inputs)                         # (B, Cin, H, W) -> each layer's maps streamed
        states = stream.states()                  # {layer: TopKExamples.state()}

    A layer's receptive field is measured once (:func:`receptive_field`, on the first 8 inputs of
    the first batch) and kept in ``fields`` (pass the same dict again next epoch); so is its
    output's layout, in ``readings`` (:func:`fm_lightning.probing.measure_layouts`). Outputs are
    read with :func:`fm_lightning.layouts.interpret`; a layer whose output is not (B, C, h, w)
    maps gets an entry in ``errors`` instead. Only a module's first call in a forward is streamed
    (the field belongs to it). ``channels`` gives the drawn channels per layer; else the first
    ``max_channels``.
    """

    def __init__(
        self,
        model: nn.Module,
        modules: Mapping[str, nn.Module],
        k: int,
        max_channels: int,
        channels: Mapping[str, Tensor] | None = None,
        fields: dict[str, ReceptiveField] | None = None,
        layouts_by_layer: Mapping[str, object] | None = None,
        readings: dict[str, Reading] | None = None,
    ) -> None:
        self.model = model
        self.modules = dict(modules)
        self.k = k
        self.max_channels = max_channels
        self.channels = dict(channels or {})
        self.fields = fields if fields is not None else {}
        self.layouts_by_layer = layouts_by_layer or {}
        self.readings = readings if readings is not None else {}
        self.topk: dict[str, TopKExamples] = {}
        self.errors: dict[str, str] = {}

    def _maps(self, name: str, output: object, rows: int) -> Tensor:
        module = self.modules[name]
        act = read_output(
            output, name, module, self.model, rows, self.layouts_by_layer, self.readings
        ).act
        if act.dim() != 4:
            raise LayoutError(f"expected (N, C, h, w) maps for examples, got {describe(act)}")
        return act

    @contextmanager
    def batch(self, inputs: Tensor, indices: Tensor) -> Iterator[None]:
        """Hooks that stream this batch's maps, for the body of the ``with`` only.

        The body runs eagerly (``torch.compiler.set_stance("force_eager")``): compiled code
        would skip the hooks.
        """
        if len(inputs) == 0:  # an empty batch has no maps to stream (nor a field to measure)
            yield
            return
        with torch.compiler.set_stance("force_eager"):
            with self._hooked(inputs, indices):
                yield

    @contextmanager
    def _hooked(self, inputs: Tensor, indices: Tensor) -> Iterator[None]:
        live = {}
        # The first validation: no probe was measured yet. One measuring pass for all layers.
        unread = {n: m for n, m in self.modules.items() if n not in self.readings}
        if unread:
            self.readings.update(measure_layouts(self.model, inputs, unread))
        for name, module in self.modules.items():
            if name in self.errors:
                continue
            if name not in self.fields:
                # A few inputs (and their noisy copies) find the field as well as a whole batch,
                # in the model's own dtype (bf16-true, 16-true), or as floats for integer inputs.
                sample = inputs[:_FIELD_INPUTS]
                if not sample.is_floating_point():
                    sample = sample.to(_float_dtype(self.model))
                rows = 2 * len(sample)  # receptive_field() adds a noisy copy of each input
                try:
                    self.fields[name] = receptive_field(
                        self.model,
                        module,
                        sample,
                        to_maps=lambda out, name=name, rows=rows: self._maps(name, out, rows),
                    )
                except (LayoutError, ValueError) as err:
                    self.errors[name] = str(err)
                    continue
            live[name] = module

        def record(key: str, module: nn.Module, output: object) -> None:
            if "@" in key or key in self.errors:
                return  # a second call of a shared module: the field is the first call's
            try:
                act = self._maps(key, output, len(inputs)).detach()
            except LayoutError as err:
                self.errors[key] = str(err)
                return
            if key not in self.topk:
                drawn = self.channels.get(key)
                if drawn is None:
                    drawn = torch.arange(min(act.shape[1], self.max_channels))
                self.topk[key] = TopKExamples(self.k, drawn.to(act.device), self.fields[key])
            self.topk[key].update(act, inputs, indices)

        with forward_hooks(live, record):
            yield

    def states(self) -> dict[str, dict[str, Tensor]]:
        return {name: topk.state() for name, topk in self.topk.items()}

    def nbytes(self) -> int:
        return sum(topk.nbytes() for topk in self.topk.values())


def _float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 without one)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
