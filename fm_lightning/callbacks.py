"""FeatureMapCallback: log what chosen layers of any LightningModule see, once per validation.

    from fm_lightning import FeatureMapCallback
    trainer = lightning.Trainer(callbacks=[FeatureMapCallback(layers=["conv1", "conv2"])])

or, from any LightningCLI script, by class path alone:

    python train.py --trainer.callbacks+=fm_lightning.FeatureMapCallback \
        --trainer.callbacks.layers=[conv1]

How it works: the first validation batches give a fixed probe of ``num_images`` inputs
(``fm_lightning.probe``, kept in the ``state_dict``). ``fm_lightning.schedule`` says which
validations are drawn and how their frames are named. On each, every picture kind of
``fm_lightning.pictures`` (maps, examples, CAM, similarity) may observe the validation batches,
then the probe goes through the model once more (``fm_lightning.capture``, layouts measured by
``fm_lightning.probing``) and rank zero hands every kind's pictures to every logger and the
local files (``fm_lightning.publishing``). This class is the lifecycle and the policy: nothing
here can stop training (``fm_lightning.failures``: a failure warns once per cause and the run
goes on; ``strict=True`` raises instead).

Why over ~350 lines: the class docstring is the arguments' reference, which LightningCLI's
``--help`` prints beside each argument; the code is the hooks and the policy.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from fm_lightning import capture, probing, schedule
from fm_lightning.capture import BatchReader
from fm_lightning.failures import Failures
from fm_lightning.files import safe_path_part
from fm_lightning.layouts import check_layouts
from fm_lightning.pictures import Drawn, PictureKind, Run, Shot
from fm_lightning.pictures.cam import CamKind
from fm_lightning.pictures.examples import ExamplesKind, check_examples
from fm_lightning.pictures.maps import MapsKind
from fm_lightning.pictures.similarity import SimilarityKind, check_similarity
from fm_lightning.probe import Probe
from fm_lightning.publishing import (
    LocalRun,
    default_local_dir,
    layer_folders,
    publish,
    publish_gifs,
    without_pictures,
)


class FeatureMapCallback(Callback):
    """Logs activation grids of chosen layers for a fixed set of validation images.

    Args:
        layers: names from ``model.named_modules()`` or glob patterns (``"conv*"``,
            ``"layer1.*.conv1"``, ``"**.fc1"``), resolved when fitting starts, after
            ``configure_model()`` (:func:`fm_lightning.capture.resolve_layers`).
        every_n_epochs: draw the last validation of epochs n-1, 2n-1, ... (Lightning's count),
            as ``epoch=N``; in a step-based fit (an int or time ``val_check_interval``, or
            ``check_val_every_n_epoch=None``) every validation of those epochs, as ``step=N``
            (:mod:`fm_lightning.schedule`). A fit that can reach none warns at its start.
        num_images: probe images, taken from the first validation batches.
        max_channels: channels drawn per layer (rows are images, columns channels).
        save_dir: where the PNGs and ``index.html`` go (always written, whatever the loggers).
            ``None``: ``<logger save_dir>/<name>/<version>/feature_maps``, beside the checkpoints.
        normalize: ``"channel"`` scales each map to its own range; ``"layer"`` shares one range
            per image across channels, so magnitudes compare.
        cmap: a matplotlib colormap name.
        order: ``"index"`` draws the first channels; ``"activation"`` the most active first, as
            chosen at the first captured epoch and kept for the run (and in checkpoints), so a
            column is one channel over time.
        input_key: where the model input is in a batch: a dict key or a tuple index. Default: the
            batch itself, its first element, or a usual dict key (``"image"``, ``"x"``, ...).
        input_fn: a function ``batch -> model input``. It may return a Tensor (``model(x)``), a
            tuple (``model(*x)``) or a dict (``model(**x)``, e.g. ``{"pixel_values": ...}``).
        layouts: ``{pattern: layout}`` winning over the measured layouts (``probing``), a layout
            being one of :data:`fm_lightning.layouts.LAYOUTS` or a function ``output tensor ->
            (N, C, H, W) or (N, F)``, e.g. ``{"blocks.*": "tokens"}``.
        log_stats: also log per-layer mean, std, fraction of zeros and dead channels as scalars.
        examples: k, 0 (off) to 100: on a captured epoch, the k validation inputs that excite
            each drawn channel most, cropped to its receptive field, and the channels dead over
            the whole validation set (:mod:`fm_lightning.pictures.examples`, which says what
            ``order="activation"`` under DDP draws at epoch 0).
        dead_warn: warn once per crossing when a layer's fraction of channels dead over the
            whole validation set exceeds this (needs ``examples``); None: never.
        cam: a torchcam method (:data:`fm_lightning.cam.CAM_METHODS`, any case, ``++`` for
            ``pp``) drawing where the model looks for its predicted and true class on the probe
            every captured epoch; None: off.
        cam_layer: the layer the CAM is taken at (a name or pattern matching one module, read
            with ``layouts`` like ``layers``); None: torchcam's choice, the last layer with a
            spatial output. Given without ``cam``: a ValueError.
        target_fn: ``batch -> (N,) true classes`` for the CAM's true-class maps. Default: the
            second element of an ``(x, y)`` batch, or a ``"label(s)"``/``"target(s)"``/``"y"``
            key of a dict batch, when it holds N integer classes.
        similarity: n >= 2: the layers' linear CKA on the first n validation inputs in dataset
            order, to the previous and first captured epoch, and layer x layer; 0: off
            (:mod:`fm_lightning.pictures.similarity`; ``python -m fm_lightning.similarity``).
        name: tells two FeatureMapCallbacks in one Trainer apart: their checkpoint state and
            their default directory (``feature_maps_<name>``).
        strict: raise on failures instead of warning once and carrying on.

    Example:
        >>> cb = FeatureMapCallback(layers=["conv1", "conv2"], num_images=4, order="activation")
        >>> cb.layers
        ['conv1', 'conv2']
    """

    def __init__(
        self,
        layers: str | Sequence[str],
        every_n_epochs: int = 1,
        num_images: int = 4,
        max_channels: int = 32,
        save_dir: str | None = None,
        normalize: Literal["channel", "layer"] = "channel",
        cmap: str = "viridis",
        order: Literal["index", "activation"] = "index",
        input_key: str | int | None = None,
        input_fn: Callable[[Any], Any] | None = None,
        layouts: Mapping[str, str | Callable] | None = None,
        log_stats: bool = True,
        examples: int = 0,
        dead_warn: float | None = 0.5,
        cam: str | None = None,
        cam_layer: str | None = None,
        target_fn: Callable[[Any], torch.Tensor] | None = None,
        similarity: int = 0,
        name: str | None = None,
        strict: bool = False,
    ) -> None:
        layers = [layers] if isinstance(layers, str) else list(layers)
        if not layers or not all(isinstance(layer, str) and layer for layer in layers):
            raise ValueError(f"expected `layers` to be non-empty layer names, got {layers!r}")
        for arg, value in [
            ("every_n_epochs", every_n_epochs),
            ("num_images", num_images),
            ("max_channels", max_channels),
        ]:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"expected `{arg}` to be an int >= 1, got {value!r}")
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"expected `name` to be a non-empty string or None, got {name!r}")
        if cam_layer is not None and cam is None:
            raise ValueError(
                f"expected `cam` (a method such as 'GradCAM') with `cam_layer`, got "
                f"cam_layer={cam_layer!r} and cam=None: pass cam=..., or drop cam_layer"
            )
        # The kinds' own arguments are checked by each kind (ValueErrors naming them); MapsKind
        # checks the cmap and order the others share.
        check_examples(examples, dead_warn)
        self._maps = MapsKind(max_channels, normalize, cmap, order, stats=log_stats)
        self._cam = None if cam is None else CamKind(cam, cam_layer, cmap)
        self._kinds: list[PictureKind] = [self._maps]
        if examples:
            self._kinds.append(ExamplesKind(examples, dead_warn, max_channels, cmap, order))
        if self._cam is not None:
            self._kinds.append(self._cam)
        if check_similarity(similarity):
            self._kinds.append(SimilarityKind(similarity))
        self._batches = BatchReader(input_key, input_fn, target_fn)

        self.layers = layers
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.max_channels = max_channels
        self.save_dir = save_dir
        self.normalize = normalize
        self.cmap = cmap
        self.order = order
        self.input_key = input_key
        self.input_fn = input_fn
        self.layouts = check_layouts(layouts)
        self.log_stats = log_stats
        self.examples = examples
        self.dead_warn = dead_warn
        self.cam = None if self._cam is None else self._cam.method  # canonical: "GradCAMpp"
        self.cam_layer = cam_layer
        self.target_fn = target_fn
        self.similarity = similarity
        self.name = name

        self._probe = Probe(num_images)  # the fixed inputs every captured validation draws
        self._modules: dict[str, nn.Module] = {}  # resolved when fitting starts
        self._readings: dict[str, probing.Reading] = {}  # output layouts, measured once per fit
        self._run: Run | None = None  # set for a captured validation, on every rank
        self._observing = ExitStack()  # the kinds' hooks, open for one validation batch
        self._failures = Failures(strict)
        self.local_dir: str | None = None

    @property
    def strict(self) -> bool:
        """Raise on failures instead of warning once and carrying on (settable)."""
        return self._failures.strict

    @strict.setter
    def strict(self, value: bool) -> None:
        self._failures.strict = value

    @property
    def probe(self) -> Any:
        """The fixed validation inputs drawn every captured epoch (None until collected)."""
        return self._probe.inputs

    @property
    def probe_targets(self) -> torch.Tensor | None:
        """(N,) true classes of the probe, when the batches have them."""
        return self._probe.targets

    # ------------------------------------------------------------------ Lightning hooks

    @property
    @override
    def state_key(self) -> str:
        # The state is the probe: it depends on how many images and whose it is, not on `layers`,
        # so adding a layer on resume keeps the probe.
        return self._generate_state_key(num_images=self.num_images, name=self.name)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        default_dir = "feature_maps" if self.name is None else f"feature_maps_{self.name}"
        self.local_dir = self.save_dir or default_local_dir(trainer, safe_path_part(default_dir))
        others = [cb for cb in trainer.callbacks if isinstance(cb, FeatureMapCallback)]
        if any(cb is not self and cb.local_dir == self.local_dir for cb in others):
            raise ValueError(
                "FeatureMapCallback: expected each FeatureMapCallback in one Trainer to have its "
                f"own `name` (or `save_dir`), got two writing to {self.local_dir}"
            )
        for logger in without_pictures(trainer.loggers) if trainer.is_global_zero else []:
            self._failures.warn(  # once per logger, not again at each stage's setup
                f"{type(logger).__name__} receives no pictures (only W&B, TensorBoard, MLflow and "
                f"Comet take them), only the feature statistics; the pictures are written to "
                f"{self.local_dir}",
                key=f"no pictures:{id(logger)}",
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._resolve(pl_module)  # after configure_model(), before the first training step
        cam = f", {self.cam} at {self.cam_layer or 'the last spatial layer'}" if self.cam else ""
        rank_zero_info(
            f"FeatureMapCallback: drawing {', '.join(self._modules)}{cam} every "
            f"{self.every_n_epochs} epoch(s); gallery: {os.path.join(self.local_dir, 'index.html')}"
        )
        if not schedule.has_validation(trainer, pl_module):
            rank_zero_warn(
                "FeatureMapCallback: this fit has no validation loop (no validation_step, no "
                "val dataloader, or limit_val_batches=0), so no feature maps will be logged."
            )
        elif (why := schedule.nothing_drawn(trainer, self.every_n_epochs)) is not None:
            rank_zero_warn(f"FeatureMapCallback: nothing will be drawn in this fit: {why}.")

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._modules:  # trainer.validate(): no on_fit_start
            self._resolve(pl_module)
        self._probe.restart()
        self._run = None
        if not schedule.is_captured(trainer, self.every_n_epochs):
            return
        self._run = self._make_run(trainer, pl_module)  # the same verdict on every rank
        # Under DDP a rank that cannot read its batches still starts (the kinds' collectives
        # wait for every rank); its kinds fail at their first batch and then gather nothing.
        if not (self._failures.disabled and trainer.world_size == 1):
            for kind in self._kinds:
                kind.start(self._run)

    @override
    def on_validation_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._run is None or dataloader_idx != 0:
            return
        try:
            x = self._batches.inputs(batch)
            for kind in self._kinds:
                self._observing.enter_context(kind.observe(self._run, x))
        except Exception as err:  # a misread batch must not stop validation
            self._failures.fail("input", err)

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._observing.close()  # the kinds' hooks live for one batch
        if not self._probe.needs() or self._failures.disabled or dataloader_idx != 0:
            return
        try:
            x = self._batches.inputs(batch)
            self._probe.add(x, self._batches.targets(batch, capture.num_rows(x)))
        except Exception as err:  # a misread batch must not stop validation
            self._failures.fail("input", err, disable=True)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Every rank reaches the same verdict here, so the collectives below are never left waiting.
        self._observing.close()
        run, self._run = self._run, None
        if run is None:
            return
        for kind in self._kinds:  # collectives: every rank, first
            kind.finish(run)
        probe = run.shared_probe()
        if probe is None:
            return
        try:  # every rank measures and runs the probe pass, so sharded models stay in step
            run.measure_layouts_once(probe)
            if not trainer.is_global_zero:
                run.modules = {}  # only rank zero draws: the others run the bare forward
            captured = self._maps.capture(run, probe)
        except Exception as err:
            self._failures.fail("capture", err)
            return
        if trainer.is_global_zero:
            self._publish(trainer, run, probe, captured)

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._observing.close()  # a validation step that raised leaves no hook behind

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """One GIF per layer across the captured epochs, written locally and sent to W&B."""
        if trainer.is_global_zero:
            publish_gifs(
                trainer.loggers, self.local_dir, schedule.logging_step(trainer), self._failures.fail
            )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._observing.close()
        # No reference to the model outlives the run.
        self._modules, self._run = {}, None
        self._readings = {}  # measured again next fit: the model may have changed
        for kind in self._kinds:
            kind.teardown()

    @override
    def state_dict(self) -> dict[str, Any]:
        state = self._probe.state_dict()
        for kind in self._kinds:
            state.update(kind.state_dict())
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._probe.load_state_dict(state_dict)
        for kind in self._kinds:
            kind.load_state_dict(state_dict)

    # ------------------------------------------------------------------ capture

    def _resolve(self, pl_module: pl.LightningModule) -> None:
        try:
            self._modules = capture.resolve_layers(pl_module, self.layers)
            if self._cam is not None:
                self._cam.resolve(pl_module)
        except ValueError as err:
            raise ValueError(f"FeatureMapCallback: {err}") from None

    def _make_run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Run:
        """What the picture kinds may use during this captured validation."""
        broadcast = functools.partial(trainer.strategy.broadcast, src=0)
        run = Run(
            model=pl_module,
            modules=self._modules,
            layouts=self.layouts,
            readings=self._readings,
            cam_layer=None if self._cam is None else self._cam.layer,
            forward_context=trainer.precision_plugin.forward_context,
            all_gather=pl_module.all_gather,
            broadcast=broadcast,
            all_agree=lambda ok: trainer.strategy.reduce_boolean_decision(ok, all=True),
            world_size=trainer.world_size,
            validation_inputs=schedule.validation_inputs(trainer),
            validation_order=schedule.validation_order(trainer) if self.similarity else None,
            num_images=self.num_images,
            shared_probe=functools.partial(
                self._probe.share_assembled, broadcast, pl_module.device, self._failures
            ),
            warn=self._failures.warn,
            warn_once=self._failures.warn_once,
            fail=self._failures.fail,
        )
        run.channels_for = functools.partial(self._maps.channels_for, run)
        return run

    # ------------------------------------------------------------------ publishing

    def _publish(self, trainer: pl.Trainer, run: Run, probe: Any, captured: dict) -> None:
        """Rank zero: every kind draws; all the pictures go to every logger and the files."""
        keys = [*captured, *(key for kind in self._kinds for key in kind.layer_keys())]
        shot = Shot(
            frame=schedule.frame_of(trainer),
            step=schedule.logging_step(trainer),
            probe=probe,
            targets=self._probe.targets,
            captured=captured,
            folders=layer_folders(keys, self._failures.warn_once),
            root=self.local_dir,
        )
        drawn = Drawn()
        for kind in self._kinds:
            if self._failures.disabled and kind is not self._maps:
                continue  # inputs that could not be read: only what was captured is drawn
            drawn.add(kind.draw(run, shot))
        title = os.path.dirname(self.local_dir) or "feature maps"
        local = LocalRun(self.local_dir, shot.frame.epoch, title, shot.frame.step)
        publish(trainer.loggers, drawn, shot.step, local, self._failures.fail)
