"""What each channel responds to: streaming top-k validation examples and dead channels.

    rf = receptive_field(model, model.conv2, first_val_inputs)  # once per layer (unwrapped model)
    topk = TopKExamples(k=9, channels=torch.arange(16), rf=rf)  # one per layer and epoch
    for inputs, indices in val_batches:  # maps e.g. from a forward hook
        topk.update(conv2_maps, inputs, indices)  # (B, C, h, w), (B, Cin, H, W), (B,)
    result = TopKExamples.merge(pl_module.all_gather(topk.state()))  # rank zero, under DDP
    save_png(examples_grid(result), "feature_maps/conv2/examples/epoch=003.png")
    dead = DeadChannels()  # one per layer, for the whole run
    dead.update(epoch=3, dead=result.dead)
    if dead.crossed(0.5): warn(...)  # once per crossing

The score of an input for channel c is the maximum of c's map over positions; the argmax position
is kept, and the input crop around it covering the channel's receptive field. The state is
O(drawn channels x k x crop pixels), fixed-shape, on the layer's device. A batch only scores its
maps and pools the entries that reach a channel's current k-th score (their maps and input rows,
copied); the pool is ranked into the state, and crops cut for the winners, when it holds 8 states'
worth of entries or 16 MiB, and at the end. Memory never grows with the validation set. Ties are
broken by the smaller index, so the result is the same for any batching, any order of the stream,
any pool size and any split across processes
(:meth:`TopKExamples.merge`). ``indices`` must identify an input across processes (its dataset
index, or :func:`content_ids`, a hash of its values, which FeatureMapCallback uses whatever the
sampler); the same index seen twice (DistributedSampler's padding) counts once.

Receptive fields come from the model itself (:func:`receptive_field`: the nonzero extent of the
input gradient of one output position), not from the architecture. Token layouts work on their
patch grid: pass ``to_maps`` turning the layer's output into ``(N, C, h, w)`` maps. A token
after global attention sees the whole input, so its field is the whole input and its grid is
taken to tile the input (stride ``H / h``: the patch size). A field can also be set by hand,
e.g. ``ReceptiveField(48, 48, stride=(16, 16), offset=(7.5, 7.5))`` for a 3x3-patch
neighbourhood of a 16-pixel patch grid.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from fm_lightning.capture import forward_hooks, match_layer
from fm_lightning.layouts import LayoutError, interpret
from fm_lightning.probing import Reading, forward_to, gradients_on, measure_layouts
from fm_lightning.rendering import check_cmap, colorize, normalize_maps
from fm_lightning.text import stamp, text_width

__all__ = [
    "MAX_EXAMPLES",
    "DeadChannels",
    "ExampleStream",
    "ExamplesResult",
    "ReceptiveField",
    "TopKExamples",
    "content_ids",
    "crop_at",
    "examples_grid",
    "receptive_field",
]

# Sorts after every real index, so empty slots rank last among equal (-inf) scores.
_EMPTY = torch.iinfo(torch.int64).max
#: The most examples per channel a caller may ask for (FeatureMapCallback(examples=k), the
#: visualizer's --examples): the state holds k crops per drawn channel, the grid k columns.
MAX_EXAMPLES = 100


class ReceptiveField(NamedTuple):
    """Where a position of a layer's ``(h, w)`` grid looks in the ``(H, W)`` input, in pixels.

    The centre of grid position ``(i, j)`` is input pixel ``offset + stride * (i, j)``
    (fractional: between pixels); the crop is ``height x width`` pixels around it.
    """

    height: int
    width: int
    stride: tuple[float, float]  # (y, x) input pixels per grid step
    offset: tuple[float, float]  # (y, x) input pixel at the centre of grid position (0, 0)


@dataclass(frozen=True)
class ExamplesResult:
    """Top-k examples of one layer's drawn channels over a whole validation set."""

    channels: Tensor  # (Cd,) long: the drawn channels, the rows of every field below
    scores: Tensor  # (Cd, k) float32, best first; -inf in empty slots
    indices: Tensor  # (Cd, k) long, the inputs' indices; -1 in empty slots
    positions: Tensor  # (Cd, k, 2) long: (y, x) of the argmax on the layer's grid
    crops: Tensor  # (Cd, k, Cin, h, w) input dtype; NaN (0 for integer inputs) outside the input
    overlays: Tensor | None  # (Cd, k, h, w) float32: the channel's map under each crop, or None
    channel_max: Tensor  # (C,) float32: every channel's maximum over all inputs and positions

    @property
    def dead(self) -> Tensor:
        """(C,) bool: channels never above 0 for any input or position (NaN counts as not)."""
        return ~(self.channel_max > 0)


class TopKExamples:
    """Streaming top-k inputs per drawn channel of one layer, for one validation run.

    Args:
        k: examples kept per channel (>= 1).
        channels: (Cd,) indices of the channels to keep examples for (the drawn ones).
            ``channel_max`` covers all channels whatever this is.
        rf: the layer's receptive field, from :func:`receptive_field`.
        overlay: also keep each crop's activation map (``ExamplesResult.overlays``).

    The state is allocated at the first :meth:`update`, on the activations' device, with the
    inputs' dtype for the crops.
    """

    #: Device types where update() may read values on the host (free there) to skip work.
    host_read_devices: frozenset[str] = frozenset({"cpu"})
    #: Candidates wait in a pool, ranked in bulk (with their crops cut) once they number this
    #: many times the state's Cd x k slots, or hold ``pool_bytes``, and when the state is read.
    #: Per batch only the scoring, a filter and two copies run. Where the host is not read
    #: (accelerators) every entry is a candidate: a batch pools all its drawn maps and a copy of
    #: its inputs, so the pool peaks at ``pool_bytes`` plus one such batch.
    pool_factor: int = 8
    pool_bytes: int = 16 * 2**20

    def __init__(self, k: int, channels: Tensor, rf: ReceptiveField, overlay: bool = True) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"expected k to be an int >= 1, got {k!r}")
        if not isinstance(channels, Tensor) or channels.dim() != 1 or channels.is_floating_point():
            raise ValueError(f"expected channels to be a 1-D integer tensor, got {channels!r}")
        if not isinstance(rf, ReceptiveField):
            raise TypeError(f"expected rf to be a ReceptiveField, got {type(rf).__name__}")
        self.k = k
        self.channels = channels.long()
        self.rf = rf
        self.overlay = overlay
        self._state: dict[str, Tensor] | None = None
        self._floor: Tensor | None = None  # (Cd,) each channel's k-th score at the last ranking
        self._pool = _Pool()
        self._windows_key: tuple | None = None
        self._windows_cache: _Windows | None = None

    @torch.no_grad()
    def update(self, act: Tensor, inputs: Tensor, indices: Tensor) -> None:
        """Add one batch to the top-k.

        Args:
            act: (B, C, h, w) the layer's maps for this batch, all channels.
            inputs: (B, Cin, H, W) the batch's model input.
            indices: (B,) integer index of each input (its dataset index), for ties and
                :meth:`merge`.
        """
        if not isinstance(act, Tensor) or act.dim() != 4:
            raise ValueError(f"expected act of shape (B, C, h, w), got {_shape(act)}")
        if not isinstance(inputs, Tensor) or inputs.dim() != 4:
            raise ValueError(f"expected inputs of shape (B, Cin, H, W), got {_shape(inputs)}")
        b, c, h, w = act.shape
        if not isinstance(indices, Tensor) or indices.shape != (b,) or indices.is_floating_point():
            raise ValueError(
                f"expected indices to be a ({b},) integer tensor, got {_shape(indices)}"
            )
        if len(inputs) != b:
            raise ValueError(f"expected inputs for the {b} maps of act, got {len(inputs)}")
        if b == 0:
            return  # an empty batch changes nothing (and has no maximum to take)
        if self._state is None:
            if int(self.channels.max()) >= c:  # checked once: a host read of the indices
                raise ValueError(
                    f"expected channels < {c} (act has {c}), got {self.channels.tolist()}"
                )
            self._state = self._empty(c, inputs, act.device)
            self.channels = self.channels.to(act.device)
            self._floor = self._state["scores"][:, -1]
        elif self._state["channel_max"].shape != (c,):
            raise ValueError(
                f"expected act with {len(self._state['channel_max'])} channels, got {c}"
            )
        s, channels, device = self._state, self.channels, act.device
        act, inputs = act.detach(), inputs.detach()
        # Each map's best value; a map holding NaN scores -inf: it never wins and never keeps
        # its channel alive. (amax: several times faster than max with indices, which only the
        # candidates that make it need, when the pool is ranked.)
        best = act.amax(dim=(2, 3)).float().nan_to_num(nan=-math.inf)  # (B, C)
        s["channel_max"] = torch.maximum(s["channel_max"], best.amax(dim=0))
        scores = best.index_select(1, channels)  # (B, Cd)
        if device.type in self.host_read_devices:
            # Reading the host is free here: only entries reaching a channel's k-th score (as of
            # the last ranking; it only rises) can enter its top k.
            images, rows = (scores >= self._floor).nonzero(as_tuple=True)  # (S,) each
            if len(images) == 0:
                return
        else:
            # A host read would wait for the device: every entry is a candidate (S = B x Cd).
            cd = len(channels)
            images = torch.arange(b, device=device).repeat_interleave(cd)
            rows = torch.arange(cd, device=device).repeat(b)
        shape = (inputs.shape[-2:], (h, w))
        if self._pool.shape not in (None, shape):
            self._rank_pool()  # another input size: crops of the pooled ones use their own
        # Copies, not views: later layers (in-place ReLUs) and later batches may overwrite both.
        self._pool.add(
            shape,
            rows=rows,
            scores=scores[images, rows],
            indices=indices.to(device).long()[images],
            maps=act.flatten(2)[images, channels[rows]],  # (S, h*w) the candidates' maps
            images=images,
            inputs=inputs,
        )
        if len(self._pool) >= self.pool_factor * s["scores"].numel() or (
            self._pool.nbytes >= self.pool_bytes
        ):
            self._rank_pool()

    def _rank_pool(self) -> None:
        """Rank the state's slots and the pooled candidates together; keep each channel's k best.

        Only the candidates that make it get a position, a crop and an overlay.
        """
        pool = self._pool.take()
        if pool is None:
            return
        s, k = self._state, self.k
        input_hw, (h, w) = pool.pop("shape")
        cd, device = len(s["scores"]), s["scores"].device
        slots = cd * k
        rows = torch.cat([torch.arange(cd, device=device).repeat_interleave(k), pool["rows"]])
        scores = torch.cat([s["scores"].flatten(), pool["scores"]])  # (Cd*k + P,)
        indices = torch.cat([s["indices"].flatten(), pool["indices"]])
        # Grouped by channel; within one, score descending, then index ascending (stable sorts,
        # last key first).
        order = indices.argsort(stable=True)
        order = order[scores[order].argsort(descending=True, stable=True)]
        order = order[rows[order].argsort(stable=True)]
        # Every channel has at least its k slots, so its k best are the first k of its group.
        # (not bincount: on CUDA it reads the maximum on the host)
        counts = torch.zeros(cd, dtype=torch.long, device=device).scatter_add_(
            0, rows, torch.ones_like(rows)
        )
        starts = counts.cumsum(0) - counts  # (Cd,)
        keep = order[starts[:, None] + torch.arange(k, device=device)].flatten()  # (Cd*k,)
        # Each kept slot is an old slot (keep < Cd*k) or a candidate: fixed shapes, no host read.
        old, new = keep.clamp(max=slots - 1), (keep - slots).clamp(min=0)
        from_pool = keep >= slots  # (Cd*k,)
        maps = pool["maps"][new].view(slots, 1, h, w)  # (Cd*k, 1, h, w)
        where = maps.flatten(1).argmax(dim=1)  # (Cd*k,)
        py, px = where // w, where % w
        win = self._windows_of(input_hw, (h, w), device)
        every = torch.arange(slots, device=device)
        fresh = {
            "positions": torch.stack([py, px], dim=-1),
            "crops": _crop(pool["inputs"], pool["images"][new], win, py, px),
        }
        if self.overlay:
            fresh["overlays"] = _overlay_at(maps, every, torch.zeros_like(every), win, py, px)
        s["scores"], s["indices"] = scores[keep].view(cd, k), indices[keep].view(cd, k)
        for key, values in fresh.items():
            kept = s[key].flatten(0, 1)[old]  # (Cd*k, ...)
            pick = from_pool.view(-1, *[1] * (kept.dim() - 1))
            s[key] = torch.where(pick, values, kept).view(cd, k, *kept.shape[1:])
        self._floor = s["scores"][:, -1]

    def _windows_of(
        self, input_hw: tuple[int, int], grid_hw: tuple[int, int], device: torch.device
    ) -> _Windows:
        """The crop windows of every grid row and column, made once per shape (not per batch)."""
        key = (*input_hw, *grid_hw, device)
        if self._windows_key != key:
            self._windows_cache = _grid_windows(self.rf, input_hw, grid_hw, device)
            self._windows_key = key
        return self._windows_cache

    def state(self) -> dict[str, Tensor]:
        """Fixed-shape tensors for ``LightningModule.all_gather`` (same shapes on every rank).

        Keys: ``channels``, ``scores`` (empty slots -inf), ``indices``, ``positions``,
        ``crops``, ``overlays`` (when kept) and ``channel_max``.
        """
        if self._state is None:
            raise RuntimeError("TopKExamples.state() before any update(): no batch was seen")
        self._rank_pool()
        return {"channels": self.channels.to(self._state["scores"].device), **self._state}

    def nbytes(self) -> int:
        """Bytes held by the state: bounded by the layer's shape, never by the batches seen."""
        return sum(t.numel() * t.element_size() for t in (self._state or {}).values())

    def pool_nbytes(self) -> int:
        """Bytes of the candidates waiting to be ranked: under ``pool_bytes`` plus one batch."""
        return self._pool.nbytes

    def result(self) -> ExamplesResult:
        """This process's top-k (under DDP, :meth:`merge` the ranks' :meth:`state` instead)."""
        return TopKExamples.merge([self.state()])

    @staticmethod
    @torch.no_grad()
    def merge(states: Sequence[Mapping[str, Tensor]] | Mapping[str, Tensor]) -> ExamplesResult:
        """Merge per-process states into the top-k of all their inputs.

        Args:
            states: a list of :meth:`state` dicts, or one dict as ``all_gather`` returns it
                (every tensor with a leading world-size dimension).

        Returns:
            The same result one process would get from all the inputs: ranked by score
            (descending), then index (ascending); an index seen on several ranks counts once.
        """
        if isinstance(states, Mapping):
            gathered = states["scores"].dim() == 3  # (world, Cd, k); a single process: (Cd, k)
            states = [
                {key: t[i] for key, t in states.items()} if gathered else states
                for i in range(len(states["scores"]) if gathered else 1)
            ]
        if not states:
            raise ValueError("expected at least one state to merge, got none")
        first = states[0]
        k = first["scores"].shape[1]
        per_slot = [key for key in first if key not in ("channels", "channel_max")]
        cat = {key: torch.cat([s[key] for s in states], dim=1) for key in per_slot}
        order = _rank(cat["scores"], cat["indices"])
        scores, indices = cat["scores"].gather(1, order), cat["indices"].gather(1, order)
        # Drop later copies of an index (the same input on two ranks): after a stable sort by
        # index each copy follows its better-ranked twin.
        by_index = indices.argsort(dim=1, stable=True)
        sorted_idx = indices.gather(1, by_index)
        repeat = torch.zeros_like(sorted_idx, dtype=torch.bool)
        repeat[:, 1:] = sorted_idx[:, 1:] == sorted_idx[:, :-1]
        repeat = torch.zeros_like(repeat).scatter(1, by_index, repeat)
        scores = scores.masked_fill(repeat, -math.inf)
        indices = indices.masked_fill(repeat, _EMPTY)
        keep = order.gather(1, _rank(scores, indices)[:, :k])  # (Cd, k) columns of `cat`
        rows = torch.arange(len(keep), device=keep.device)[:, None]
        picked = {key: t[rows, keep] for key, t in cat.items()}
        empty = picked["indices"] == _EMPTY
        return ExamplesResult(
            channels=first["channels"],
            scores=picked["scores"],
            indices=picked["indices"].masked_fill(empty, -1),
            positions=picked["positions"],
            crops=picked["crops"],
            overlays=picked.get("overlays"),
            channel_max=torch.stack([s["channel_max"] for s in states]).amax(dim=0),
        )

    def _empty(self, c: int, inputs: Tensor, device: torch.device) -> dict[str, Tensor]:
        cd, k, rf = len(self.channels), self.k, self.rf
        state = {
            "scores": torch.full((cd, k), -math.inf, device=device),
            "indices": torch.full((cd, k), _EMPTY, dtype=torch.long, device=device),
            "positions": torch.zeros(cd, k, 2, dtype=torch.long, device=device),
            "crops": torch.full(
                (cd, k, inputs.shape[1], rf.height, rf.width),
                _fill(inputs.dtype),
                dtype=inputs.dtype,
                device=device,
            ),
            "channel_max": torch.full((c,), -math.inf, device=device),
        }
        if self.overlay:
            state["overlays"] = torch.zeros(cd, k, rf.height, rf.width, device=device)
        return state


class _Pool:
    """A TopKExamples' candidates since its last ranking: per batch, the entries that may enter
    the top k, with their maps and copies of the input rows their crops will come from (one row
    per entry, or the whole batch once when that is fewer)."""

    def __init__(self) -> None:
        self._batches: list[dict[str, Tensor]] = []
        self.shape: tuple | None = None  # (input (H, W), grid (h, w)) of every pooled batch
        self.nbytes = 0
        self._entries = 0
        self._rows = 0  # input rows pooled so far

    def __len__(self) -> int:
        return self._entries

    def add(self, shape: tuple, images: Tensor, inputs: Tensor, **entries: Tensor) -> None:
        """Pool the (S,) entries of one batch; ``images`` are their rows of ``inputs``."""
        if len(images) < len(inputs):
            copied, images = inputs[images], torch.arange(len(images), device=images.device)
        else:
            copied = inputs.clone()  # at most one copy of the batch, however many candidates
        kept = {**entries, "images": images + self._rows, "inputs": copied}
        self._batches.append(kept)
        self.shape = shape
        self.nbytes += sum(t.numel() * t.element_size() for t in kept.values())
        self._entries += len(images)
        self._rows += len(copied)

    def take(self) -> dict | None:
        """Everything pooled, concatenated (and ``shape``), emptying the pool; None if empty."""
        if not self._batches:
            return None
        out = {key: torch.cat([e[key] for e in self._batches]) for key in self._batches[0]}
        out["shape"] = self.shape
        self.__init__()
        return out


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
            f"expected example_input of shape (B, Cin, H, W), got {_shape(example_input)}"
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
                f"expected the layer's maps as (N, C, h, w), got {_shape(maps)}; pass to_maps"
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
        raise ValueError(f"expected positions of shape ({len(images)}, 2), got {_shape(positions)}")
    positions, images = positions.to(inputs.device), images.to(inputs.device)
    # One window per crop (any position, even off the grid); no overlay, so no grid size.
    win = _windows_at(rf, inputs.shape[-2:], positions[:, 0], positions[:, 1], (1, 1))
    each = torch.arange(len(images), device=inputs.device)
    return _crop(inputs, images, win, each, each)


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
            f"expected dead of shape {tuple(result.channel_max.shape)}, got {_shape(dead)}"
        )
    crops = result.crops.cpu().float()  # (Cd, k, Cin, h, w)
    cd, k, cin, h, w = crops.shape
    crops = crops[:, :, :3] if cin == 3 else crops[:, :, :1].expand(-1, -1, 3, -1, -1)
    pad = crops.isnan()  # outside the input
    # One range for the layer: normalize_maps over a single "image" holding every crop.
    rgb = normalize_maps(crops.reshape(1, -1, h, w), "layer").view(cd, k, 3, h, w)
    if overlay:
        heat = colorize(
            normalize_maps(result.overlays.cpu().float(), "layer"), cmap
        )  # (Cd, k, 3, h, w)
        rgb = (1 - _OVERLAY_ALPHA) * rgb + _OVERLAY_ALPHA * heat
    rgb = rgb.masked_fill(pad, _OUTSIDE)
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
        color = _DEAD_RGB if dead[channels[r]] else (0, 0, 0)
        stamp(pixels, (2, top + 2), f"ch {channels[r]}", color, _FONT_PX)
        if dead[channels[r]]:
            stamp(pixels, (2, top + 2 + _FONT_PX + 2), "dead", _DEAD_RGB, _FONT_PX)
            # a 2-pixel frame around the row's tiles and captions
            y0, y1 = top - 2, top + th + _CAPTION_PX + 1
            x0, x1 = _LABEL_PX - 2, _LABEL_PX + k * cell_w - _GAP + 2
            for ys, xs in (
                (slice(y0, y0 + 2), slice(x0, x1)),
                (slice(y1 - 2, y1), slice(x0, x1)),
                (slice(y0, y1), slice(x0, x0 + 2)),
                (slice(y0, y1), slice(x1 - 2, x1)),
            ):
                pixels[ys, xs] = _DEAD_RGB
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
            raise ValueError(f"expected dead to be a (C,) bool tensor, got {_shape(dead)}")
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
_DEAD_RGB = (214, 39, 40)
_FONT_PX = 10
_CAPTION_PX = 12
_LABEL_PX = 36
_GAP = 3


def _rank(scores: Tensor, indices: Tensor) -> Tensor:
    """(Cd, n) column order: score descending, then index ascending (two stable sorts)."""
    by_index = indices.argsort(dim=1, stable=True)
    by_score = scores.gather(1, by_index).argsort(dim=1, descending=True, stable=True)
    return by_index.gather(1, by_score)


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


class _Windows(NamedTuple):
    """Where the crops of a layer's grid rows and columns lie in the input (see _grid_windows)."""

    rows: Tensor  # (h, height) input rows of grid row i's crops, clamped into the input
    rows_in: Tensor  # (h, height) bool: the row is inside the input
    cols: Tensor  # (w, width)
    cols_in: Tensor  # (w, width)
    cell_rows: Tensor  # (h, height): the grid row whose centre is nearest each crop row
    cell_cols: Tensor  # (w, width)


def _grid_windows(
    rf: ReceptiveField, input_hw: tuple[int, int], grid_hw: tuple[int, int], device: torch.device
) -> _Windows:
    """The input pixels of the crops around every row and column of an (h, w) grid.

    A crop is separable (its rows depend on the grid row only, its columns on the grid column),
    so these small tables give any position's window by two lookups.
    """
    h, w = grid_hw
    ys, xs = torch.arange(h, device=device), torch.arange(w, device=device)
    return _windows_at(rf, input_hw, ys, xs, grid_hw)


def _windows_at(
    rf: ReceptiveField, input_hw: tuple[int, int], ys: Tensor, xs: Tensor, grid_hw: tuple[int, int]
) -> _Windows:
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
    return _Windows(rows, rows_in, cols, cols_in, cell_rows, cell_cols)


def _crop(inputs: Tensor, images: Tensor, win: _Windows, py: Tensor, px: Tensor) -> Tensor:
    """(N, Cin, height, width) crops of inputs[images] around grid positions (py, px)."""
    _, cin, height, width = inputs.shape
    rows, cols = win.rows[py], win.cols[px]  # (N, height), (N, width)
    chans = torch.arange(cin, device=inputs.device)
    # Flat indices into the contiguous batch: one 1-D gather, much faster than four index tensors.
    base = (images[:, None] * cin + chans) * height  # (N, Cin)
    idx = (base[:, :, None, None] + rows[:, None, :, None]) * width + cols[:, None, None, :]
    crops = inputs.contiguous().view(-1)[idx]  # (N, Cin, height, width)
    outside = ~(win.rows_in[py][:, :, None] & win.cols_in[px][:, None])  # (N, height, width)
    return crops.masked_fill(outside[:, None], _fill(inputs.dtype))


def _overlay_at(
    act: Tensor, images: Tensor, channels: Tensor, win: _Windows, py: Tensor, px: Tensor
) -> Tensor:
    """(N, height, width) float32: each crop pixel gets act[image, channel] at its nearest cell."""
    _, c, h, w = act.shape
    base = (images * c + channels) * h  # (N,) start of each map in the flat activation
    gy, gx = win.cell_rows[py], win.cell_cols[px]  # (N, height), (N, width)
    idx = (base[:, None, None] + gy[:, :, None]) * w + gx[:, None, :]  # (N, height, width)
    return act.contiguous().view(-1)[idx].float()


def _float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 without one)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


@torch.no_grad()
def content_ids(inputs: Tensor) -> Tensor:
    """(B,) int64 in [0, 2**62): a hash of each input's bits, to tell inputs apart by content.

    The same input gives the same id in any batch, order, process or device (a sum of its
    values' bit patterns times fixed odd multipliers, modulo 2**64: exact integer arithmetic);
    two different inputs share one with probability about 2**-62. For the callback's top-k,
    whose processes see inputs through samplers it cannot know (DDP without DistributedSampler,
    a custom sampler, each rank its own shard): an input repeated (DistributedSampler's padding)
    counts once, and distinct ones never merge.
    """
    if not isinstance(inputs, Tensor) or inputs.dim() < 1:
        raise ValueError(f"expected (B, ...) inputs, got {_shape(inputs)}")
    flat = inputs.detach().reshape(len(inputs), -1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    bits = flat.contiguous().view(_INT_OF_SIZE[flat.element_size()])  # same shape, same bits
    weights = _id_weights(bits.shape[1], bits.device)  # (D,) odd int64
    # Rows in chunks of at most 2**23 values: the int64 products stay under 64 MiB.
    rows = max(1, 2**23 // max(bits.shape[1], 1))
    ids = torch.cat(
        [(chunk.long() * weights).sum(dim=1) for chunk in bits.split(rows)]
        or [torch.zeros(0, dtype=torch.long, device=bits.device)]
    )
    ids = ids ^ (ids >> 29)  # mix the high bits into the low ones (arithmetic shift: still exact)
    return ids & (2**62 - 1)


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@functools.cache
def _id_weights(length: int, device: torch.device) -> Tensor:
    g = torch.Generator().manual_seed(0x5EED)  # on the CPU: the same numbers on every device
    odd = torch.randint(-(2**62), 2**62, (length,), generator=g, dtype=torch.int64) * 2 + 1
    return odd.to(device)


def _fill(dtype: torch.dtype) -> float:
    return math.nan if dtype.is_floating_point else 0


def _shape(x: object) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


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
        layout = match_layer(self.layouts_by_layer, name) or "auto"
        module = self.modules[name]
        reading = self.readings.get(name)
        act = interpret(
            output, module=module, model=self.model, num_rows=rows, layout=layout, reading=reading
        ).act
        if act.dim() != 4:
            raise LayoutError(f"expected (N, C, h, w) maps for examples, got {_shape(act)}")
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
        for name, module in self.modules.items():
            if name in self.errors:
                continue
            if name not in self.readings:  # the first validation: no probe was measured yet
                self.readings.update(measure_layouts(self.model, inputs, {name: module}))
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
