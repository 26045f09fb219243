"""Picture kinds: what each observes, what it keeps, and what it draws for a captured validation.

    class MyKind(PictureKind):
        def draw(self, run: Run, shot: Shot) -> Drawn:   # rank zero, after the probe pass
            return Drawn(pictures=[Picture("my_tag", "my_kind/epoch=003.png", image, "caption")])

FeatureMapCallback owns the schedule, the hooks' lifetimes, the failure policy (carried out by
``fm_lightning.failures``, reached through ``Run``), DDP and publishing; each kind (``maps``,
``examples``, ``cam``, ``similarity``) is one module here implementing these steps of one
captured validation, in this order (all optional but ``draw``):

1. ``start(run)``: the validation starts (every rank).
2. ``observe(run, inputs)``: a context manager around one validation batch's forward (every rank),
   e.g. hooks that stream the batch's maps. Closed when the batch ends, however it ends.
3. ``finish(run)``: the validation ended (every rank, in the same order: collectives go here).
4. ``draw(run, shot)``: rank zero draws, from the probe pass every kind shares (``shot``).

``state_dict``/``load_state_dict`` keep what a kind carries across epochs in checkpoints. The
drawing itself (grids, captions) is pure tensor code beside each kind, free of Lightning.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from fm_lightning.capture import match_layer
from fm_lightning.layouts import Fallback
from fm_lightning.probing import measure_layouts

if TYPE_CHECKING:
    from fm_lightning.capture import Captured
    from fm_lightning.probing import Reading
    from fm_lightning.schedule import Frame


@dataclass(frozen=True)
class Picture:
    tag: str  # logger key, e.g. "feature_maps/conv1", "probe_inputs"
    path: str  # under the local directory, e.g. "conv1/epoch=003.png"
    image: Tensor  # (H, W, 3) uint8
    caption: str = ""


@dataclass
class Drawn:
    """What a kind hands to publishing for one captured validation."""

    pictures: list[Picture] = field(default_factory=list)
    scalars: dict[str, float] = field(default_factory=dict)  # logger key -> value
    stats: dict[str, dict[str, float]] = field(default_factory=dict)  # gallery: {folder: {..}}
    dead: dict[str, dict[int, int]] = field(default_factory=dict)  # gallery: {folder: {ch: since}}
    # gallery: {layer: {"to_previous": v, "to_first": v}}, None where undefined
    similarity: dict[str, dict[str, float | None]] = field(default_factory=dict)

    def add(self, other: Drawn) -> None:
        """Take in what another kind drew for the same validation."""
        self.pictures += other.pictures
        self.scalars.update(other.scalars)
        self.dead.update(other.dead)
        self.similarity.update(other.similarity)
        for folder, stats in other.stats.items():
            self.stats.setdefault(folder, {}).update(stats)


@dataclass
class Run:
    """What a kind may use during a captured validation; the callback builds it (every rank)."""

    model: nn.Module  # the LightningModule
    modules: Mapping[str, nn.Module]  # the chosen layers, {name: module}
    layouts: Mapping[str, Any]  # layouts= overrides, {pattern: layout}
    readings: dict[str, Reading]  # measured layouts, filled once per fit
    cam_layer: tuple[str, nn.Module] | None = None  # its layout is measured with the layers'
    forward_context: Callable[[], AbstractContextManager] = nullcontext  # the precision plugin's
    all_gather: Callable[[Any], Any] = lambda x: x  # LightningModule.all_gather
    broadcast: Callable[[Any], Any] = lambda x: x  # from rank zero, the strategy's
    all_agree: Callable[[bool], bool] = lambda ok: ok  # True when every rank says True
    world_size: int = 1
    validation_inputs: int | None = None  # inputs this rank validates on (None: unknown)
    validation_order: list[int] | None = None  # their dataset indices, batch after batch
    num_images: int = 0  # rows of a complete probe
    # rank zero's probe on every rank (a collective: every rank calls it), or None
    shared_probe: Callable[[], Any] = lambda: None
    # order="activation": the channels the maps draw for a probe, {layer: (C',) indices}
    channels_for: Callable[[Any], dict[str, Tensor]] = lambda probe: {}
    # The callback's failure policy: warn (prefixed, on any rank) / once per key / a failure
    # (warns once per cause and carries on, or raises with strict=True).
    warn: Callable[[str], None] = lambda message: None
    warn_once: Callable[[str, str], None] = lambda key, message: None
    fail: Callable[[str, Exception], None] = lambda cause, err: None

    def measure_layouts_once(self, probe: Any) -> None:
        """How each chosen layer's (and the CAM layer's) output lies on the input, measured on
        ``probe`` once per fit (:func:`fm_lightning.probing.measure_layouts`: one forward pass
        for all). Every rank measures, so sharded models stay in step. A layer whose layout
        cannot be measured, and that ``layouts=`` does not name, is read by the fallback rules
        and warned about once, by name."""
        modules = dict(self.modules)
        if self.cam_layer is not None:
            modules.setdefault(*self.cam_layer)
        if not all(name in self.readings for name in modules):  # a later call's comes along
            with self.forward_context():
                found = measure_layouts(self.model, probe, modules, known=self.readings)
            self.readings.update(found)
        for key, reading in self.readings.items():  # some measured by the examples' stream
            if isinstance(reading, Fallback) and match_layer(self.layouts, key) is None:
                self.warn_once(
                    f"layout:{key}",
                    f"could not measure how layer {key!r} lays out its output ({reading.reason}), "
                    "so it is read by the fallback rules (the kinds of its modules; its caption "
                    "says how). If that is wrong, give it a layout: "
                    f"layouts={{{key!r}: 'nchw' | 'nhwc' | 'tokens' | 'sequence' | a function}}.",
                )


@dataclass
class Shot:
    """One captured validation, as rank zero draws it."""

    frame: Frame
    step: int  # the step loggers get: the one Lightning logs this validation's metrics at
    probe: Any  # what the model was called with, on its device
    targets: Tensor | None  # (N,) true classes of the probe, when batches have them
    captured: dict[str, Captured]  # the probe pass, per layer key
    folders: dict[str, str]  # each layer key's own folder under the local directory
    root: str = ""  # the local directory

    @property
    def when(self) -> str:
        """``epoch 3, step 1722``, or ``step 1200 (epoch 2)`` in a step-based fit."""
        return (
            f"{self.frame.text}, step {self.step}" if self.frame.step is None else self.frame.text
        )


class PictureKind:
    """One kind of picture; see the module docstring for when each step runs."""

    def start(self, run: Run) -> None:
        pass

    def observe(self, run: Run, inputs: Any) -> AbstractContextManager:
        return nullcontext()

    def finish(self, run: Run) -> None:
        pass

    def draw(self, run: Run, shot: Shot) -> Drawn:
        raise NotImplementedError

    def layer_keys(self) -> list[str]:
        """Layers this kind draws in folders of their own beyond the probe pass's (rank zero)."""
        return []

    def teardown(self) -> None:
        """The fit ended: drop every reference to the model."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass
