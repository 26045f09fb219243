"""Streaming top-k validation inputs per channel of one layer, merged across processes.

    topk = TopKExamples(k=9, channels=torch.arange(16), rf=rf)  # one per layer and epoch
    for inputs, indices in val_batches:  # maps e.g. from a forward hook
        topk.update(conv2_maps, inputs, indices)  # (B, C, h, w), (B, Cin, H, W), (B,)
    result = TopKExamples.merge(pl_module.all_gather(topk.state()))  # rank zero, under DDP

The score of an input for channel c is the maximum of c's map over positions; the argmax position
is kept, and the input crop around it covering the channel's receptive field
(:mod:`fm_lightning.receptive_field`). The state is O(drawn channels x k x crop pixels),
fixed-shape, on the layer's device. A batch only scores its maps and pools the entries that reach
a channel's current k-th score (their maps and input rows, copied); the pool is ranked into the
state, and crops cut for the winners, when it holds 8 states' worth of entries or 16 MiB, and at
the end. Memory never grows with the validation set. Ties are broken by the smaller index, so the
result is the same for any batching, any order of the stream, any pool size and any split across
processes (:meth:`TopKExamples.merge`). ``indices`` must identify an input across processes (its
dataset index, or :func:`content_ids`, a hash of its values, which FeatureMapCallback uses
whatever the sampler); the same index seen twice (DistributedSampler's padding) counts once.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fm_lightning.receptive_field import (
    ReceptiveField,
    Windows,
    cut_crops,
    grid_windows,
    overlay_at,
    pad_value,
)
from fm_lightning.rendering import describe

# Sorts after every real index, so empty slots rank last among equal (-inf) scores.
_EMPTY = torch.iinfo(torch.int64).max
#: The most examples per channel a caller may ask for (FeatureMapCallback(examples=k), the
#: visualizer's --examples): the state holds k crops per drawn channel, the grid k columns.
MAX_EXAMPLES = 100


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
        self._windows_cache: Windows | None = None

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
            raise ValueError(f"expected act of shape (B, C, h, w), got {describe(act)}")
        if not isinstance(inputs, Tensor) or inputs.dim() != 4:
            raise ValueError(f"expected inputs of shape (B, Cin, H, W), got {describe(inputs)}")
        b, c, h, w = act.shape
        if not isinstance(indices, Tensor) or indices.shape != (b,) or indices.is_floating_point():
            raise ValueError(
                f"expected indices to be a ({b},) integer tensor, got {describe(indices)}"
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
            "crops": cut_crops(pool["inputs"], pool["images"][new], win, py, px),
        }
        if self.overlay:
            fresh["overlays"] = overlay_at(maps, every, torch.zeros_like(every), win, py, px)
        s["scores"], s["indices"] = scores[keep].view(cd, k), indices[keep].view(cd, k)
        for key, values in fresh.items():
            kept = s[key].flatten(0, 1)[old]  # (Cd*k, ...)
            pick = from_pool.view(-1, *[1] * (kept.dim() - 1))
            s[key] = torch.where(pick, values, kept).view(cd, k, *kept.shape[1:])
        self._floor = s["scores"][:, -1]

    def _windows_of(
        self, input_hw: tuple[int, int], grid_hw: tuple[int, int], device: torch.device
    ) -> Windows:
        """The crop windows of every grid row and column, made once per shape (not per batch)."""
        key = (*input_hw, *grid_hw, device)
        if self._windows_key != key:
            self._windows_cache = grid_windows(self.rf, input_hw, grid_hw, device)
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
                pad_value(inputs.dtype),
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


def _rank(scores: Tensor, indices: Tensor) -> Tensor:
    """(Cd, n) column order: score descending, then index ascending (two stable sorts)."""
    by_index = indices.argsort(dim=1, stable=True)
    by_score = scores.gather(1, by_index).argsort(dim=1, descending=True, stable=True)
    return by_index.gather(1, by_score)


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
        raise ValueError(f"expected (B, ...) inputs, got {describe(inputs)}")
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
