"""FeatureMapCallback: log what chosen layers of any LightningModule see, once per validation.

    from fm_lightning import FeatureMapCallback
    trainer = lightning.Trainer(callbacks=[FeatureMapCallback(layers=["conv1", "conv2"])])

or, from any LightningCLI script, by class path alone:

    python train.py --trainer.callbacks+=fm_lightning.FeatureMapCallback \
        --trainer.callbacks.layers=[conv1]

How it works: the first validation batches give a fixed probe of ``num_images`` inputs
(``fm_lightning.probe``; kept in the callback's ``state_dict``, so it survives resuming). Which
validations are drawn, and how their frames are named, is ``fm_lightning.schedule``'s: the last
of a captured epoch, or, in a fit whose validations are step-based, each one (``step=NNNNNN``).
Each picture kind is a module of ``fm_lightning.pictures`` (maps, examples, CAM): on a captured
validation every kind may observe the validation batches (hooks for one batch at a time) and
gathers across ranks at its end; then a copy of the probe goes through the model once more
(``fm_lightning.capture``: eval mode, no gradients, eager even for compiled models, each
layer's output read as its measured layout says, ``fm_lightning.probing``), and rank zero lets
every kind draw and hands all the pictures to every logger and the local files
(``fm_lightning.publishing``). This class is the lifecycle and the policy: nothing here can stop
training; a failure warns once per cause and the run goes on (``strict=True`` raises instead).

Why over 500 lines: a third is the argument reference below (read by users, by ``--help`` of any
LightningCLI and by the docs) and the arguments' checks, which Lightning's style does at
construction; the hooks, the DDP agreement and the failure policy are the rest.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.rank_zero import rank_prefixed_message
from torch import nn
from typing_extensions import override

from fm_lightning import capture, probing, rendering, schedule
from fm_lightning.cam import check_cam_method
from fm_lightning.capture import BatchReader
from fm_lightning.files import distinct_path_parts, safe_path_part
from fm_lightning.gallery import RESERVED_NAMES
from fm_lightning.layouts import Fallback, check_layout
from fm_lightning.pictures import Drawn, PictureKind, Run, Shot
from fm_lightning.pictures.cam import CamKind
from fm_lightning.pictures.examples import ExamplesKind, check_examples
from fm_lightning.pictures.maps import MapsKind
from fm_lightning.pictures.similarity import SimilarityKind
from fm_lightning.probe import Probe
from fm_lightning.publishing import (
    LocalRun,
    default_local_dir,
    publish,
    publish_gifs,
    without_pictures,
)


class FeatureMapCallback(Callback):
    """Logs activation grids of chosen layers for a fixed set of validation images.

    Args:
        layers: names from ``model.named_modules()`` or glob patterns (``"conv*"``,
            ``"layer1.*.conv1"``, ``"**.fc1"``), relative to the LightningModule; see
            :func:`fm_lightning.capture.resolve_layers`. Resolved when fitting starts, after
            ``configure_model()``, so layers built there can be named too.
        every_n_epochs: capture at the validation of epochs n-1, 2n-1, ... (Lightning's count,
            as in ``check_val_every_n_epoch``). With several validations per epoch at fractions
            of it (a float ``val_check_interval``), the last one of the epoch is drawn, as
            ``epoch=N``. In a step-based fit (an int or time ``val_check_interval``, or
            ``check_val_every_n_epoch=None``) every validation of a captured epoch is drawn, as
            ``step=N`` (the global step). A fit that can reach none warns at its start.
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
        layouts: per-layer readings that win over the measured ones (``fm_lightning.probing``,
            once per layer and fit), ``{pattern: layout}`` with a layout from
            :data:`fm_lightning.layouts.LAYOUTS` or a function ``output tensor -> (N, C, H, W)
            or (N, F)``, e.g. ``{"blocks.*": "tokens"}``.
        log_stats: also log per-layer mean, std, fraction of zeros and dead channels as scalars.
        examples: top examples per drawn channel (0: off, at most 100; no more than the
            validation set holds are kept). On a captured epoch the layers are
            also observed during that validation run: for each drawn channel, the validation
            inputs that excite it most, cropped to its receptive field, and the channels that
            are dead over the whole validation set (``fm_lightning.pictures.examples``). The
            rows are the channels the maps draw; with ``order="activation"`` under DDP and without a
            sanity check, epoch 0's are the first channels (no probe exists yet on every rank).
        dead_warn: warn once per crossing when a layer's fraction of channels dead over the
            whole validation set exceeds this (needs ``examples``); None: never.
        cam: a torchcam method (``"GradCAM"``, ``"GradCAMpp"``, ``"LayerCAM"``, ...; see
            :data:`fm_lightning.cam.CAM_METHODS`; any case, ``++`` for ``pp``) drawing where the
            model looks for its predicted and true class on the probe, every captured epoch; None:
            off.
        cam_layer: the layer the CAM is taken at (a name or pattern matching one module, read
            with ``layouts`` like ``layers``); None: torchcam's choice, the last layer with a
            spatial output. Given without ``cam``: a ValueError.
        target_fn: ``batch -> (N,) true classes`` for the CAM's true-class maps. Default: the
            second element of an ``(x, y)`` batch, or a ``"label(s)"``/``"target(s)"``/``"y"``
            key of a dict batch, when it holds N integer classes.
        similarity: n, the validation inputs compared by linear CKA (0: off; else >= 2): the
            first n of the first validation dataloader in dataset order, the same every epoch
            and run. Each captured validation logs ``feature_similarity/<layer>/to_previous``
            and ``/to_first`` (the layer's CKA with itself at the previous and the first
            captured validation), draws a layer x layer CKA heatmap and keeps the centred
            Grams in ``similarity/<frame>.pt`` for ``python -m fm_lightning.similarity``
            (``fm_lightning.pictures.similarity``, ``fm_lightning.cka``).
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
        for arg, value in (
            ("every_n_epochs", every_n_epochs),
            ("num_images", num_images),
            ("max_channels", max_channels),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"expected `{arg}` to be an int >= 1, got {value!r}")
        if normalize not in rendering.NORMALIZE_MODES:
            raise ValueError(
                f"expected `normalize` in {rendering.NORMALIZE_MODES}, got {normalize!r}"
            )
        if order not in rendering.ORDERS:
            raise ValueError(f"expected `order` in {rendering.ORDERS}, got {order!r}")
        rendering.check_cmap(cmap)
        if layouts is not None and not isinstance(layouts, Mapping):
            raise ValueError(
                f"expected `layouts` to be a dict {{pattern: layout}}, got {type(layouts).__name__}"
            )
        checked_layouts = {}
        for pattern, layout in (layouts or {}).items():
            try:
                checked_layouts[pattern] = check_layout(layout)
            except ValueError as err:
                raise ValueError(f"layouts[{pattern!r}]: {err}") from None
        check_examples(examples, dead_warn)
        if cam is not None:
            cam = check_cam_method(cam)  # its canonical name: "gradcam++" -> "GradCAMpp"
        if cam_layer is not None and (not isinstance(cam_layer, str) or not cam_layer):
            raise ValueError(f"expected `cam_layer` to be a layer name or None, got {cam_layer!r}")
        if cam_layer is not None and cam is None:
            raise ValueError(
                f"expected `cam` (a method such as 'GradCAM') with `cam_layer`, got "
                f"cam_layer={cam_layer!r} and cam=None: pass cam=..., or drop cam_layer"
            )
        batches = BatchReader(input_key, input_fn, target_fn)  # checks them
        if (
            isinstance(similarity, bool)
            or not isinstance(similarity, int)
            or not (similarity == 0 or similarity >= 2)
        ):
            raise ValueError(
                f"expected `similarity` to be 0 (off) or the number of inputs compared, an int "
                f">= 2, got {similarity!r}"
            )
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"expected `name` to be a non-empty string or None, got {name!r}")

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
        self.layouts = checked_layouts
        self.log_stats = log_stats
        self.examples = examples
        self.dead_warn = dead_warn
        self.cam = cam
        self.cam_layer = cam_layer
        self.target_fn = target_fn
        self.similarity = similarity
        self.name = name
        self.strict = strict

        self._batches = batches
        self._probe = Probe(num_images)  # the fixed inputs every captured validation draws
        # The picture kinds, in drawing order; each keeps its own state (see fm_lightning.pictures).
        self._maps = MapsKind(max_channels, normalize, cmap, order, stats=log_stats)
        self._cam = None if cam is None else CamKind(cam, cmap)
        self._kinds: list[PictureKind] = [self._maps]
        if examples:
            self._kinds.append(ExamplesKind(examples, dead_warn, max_channels, cmap, order))
        if self._cam is not None:
            self._kinds.append(self._cam)
        if similarity:
            self._kinds.append(SimilarityKind(similarity))
        self._modules: dict[str, nn.Module] = {}  # resolved when fitting starts
        self._readings: dict[str, probing.Reading] = {}  # output layouts, measured once per fit
        self._run: Run | None = None  # set for a captured validation, on every rank
        self._observing = ExitStack()  # the kinds' hooks, open for one validation batch
        self._warned: set[str] = set()
        self._disabled = False
        self.local_dir: str | None = None

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
        for logger in without_pictures(trainer.loggers):
            if f"no pictures:{id(logger)}" in self._warned:
                continue  # once per logger, not again at each stage's setup
            self._warned.add(f"no pictures:{id(logger)}")
            rank_zero_warn(
                f"FeatureMapCallback: {type(logger).__name__} receives no pictures (only W&B, "
                "TensorBoard, MLflow and Comet take them), only the feature statistics; the "
                f"pictures are written to {self.local_dir}"
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
        if not (self._disabled and trainer.world_size == 1):
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
            self._fail("input", err)

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
        if not self._probe.needs() or self._disabled or dataloader_idx != 0:
            return
        try:
            x = self._batches.inputs(batch)
            self._probe.add(x, self._batches.targets(batch, capture.num_rows(x)))
        except Exception as err:  # a misread batch must not stop validation
            self._fail("input", err, disable=True)

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
        # Only rank zero draws, but every rank runs the forward so sharded models stay in step.
        if not trainer.is_global_zero:
            run.modules = {}
        try:
            self._measure_layouts(run, probe)
            captured = self._maps.capture(run, probe)
        except Exception as err:
            self._fail("capture", err)
            return
        if not trainer.is_global_zero:
            return
        for layer in capture.not_run(run.modules, captured):
            self._warn_once(
                f"not-run:{layer}",
                f"FeatureMapCallback: layer {layer!r} did not run in the probe pass, so it is "
                "not drawn. Likely reasons: a training-only branch (an auxiliary head), a "
                "fused kernel that bypasses the module (fused attention), or a branch the "
                "forward skips for these inputs.",
            )
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
                trainer.loggers, self.local_dir, schedule.logging_step(trainer), self._fail
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
            if self.cam is not None and self.cam_layer is not None:
                found = capture.resolve_layers(pl_module, [self.cam_layer])
                if len(found) != 1:
                    raise ValueError(
                        f"expected `cam_layer` {self.cam_layer!r} to match one module, got "
                        f"{len(found)}: {', '.join(found)}"
                    )
                self._cam.layer = next(iter(found.items()))
        except ValueError as err:
            raise ValueError(f"FeatureMapCallback: {err}") from None

    def _make_run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Run:
        """What the picture kinds may use during this captured validation."""
        run = Run(
            model=pl_module,
            modules=self._modules,
            layouts=self.layouts,
            readings=self._readings,
            forward_context=trainer.precision_plugin.forward_context,
            all_gather=pl_module.all_gather,
            broadcast=lambda obj: trainer.strategy.broadcast(obj, src=0),
            all_agree=lambda ok: trainer.strategy.reduce_boolean_decision(ok, all=True),
            world_size=trainer.world_size,
            validation_inputs=schedule.validation_inputs(trainer),
            validation_order=schedule.validation_order(trainer) if self.similarity else None,
            num_images=self.num_images,
            shared_probe=lambda: self._shared_probe(trainer, pl_module),
            warn=lambda message: self._warn(f"FeatureMapCallback: {message}"),
            warn_once=lambda key, message: self._warn_once(key, f"FeatureMapCallback: {message}"),
            fail=self._fail,
        )

        def channels_for(probe: Any) -> dict[str, torch.Tensor]:
            self._measure_layouts(run, probe)
            captured = self._maps.capture(run, probe, stats=False)
            return {k: c.channels for k, c in captured.items() if c.channels is not None}

        run.channels_for = channels_for
        return run

    def _shared_probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        """Rank zero's probe on every rank (a collective: every rank calls it), or None."""
        local = None
        if not self._disabled:
            try:
                local = self._probe.assemble()
            except Exception as err:  # batches of different shapes or dtypes
                self._fail("input", err, disable=True)
        if local is not None and (have := capture.num_rows(local)) < self.num_images:
            self._warn(
                f"FeatureMapCallback: validation gave only {have} of num_images="
                f"{self.num_images} probe images.",
                key="short probe",
            )
        broadcast = lambda obj: trainer.strategy.broadcast(obj, src=0)  # noqa: E731
        return self._probe.share(broadcast, pl_module.device, send=local is not None)

    def _measure_layouts(self, run: Run, probe: Any) -> None:
        """How each layer's (and the CAM layer's) output lies on the input, once per fit.

        Every rank measures (the forward passes keep sharded models in step); a layer whose
        layout cannot be measured warns once, naming it, and is read by the fallback rules.
        """
        modules = dict(self._modules)
        if self._cam is not None and self._cam.layer is not None:
            modules.setdefault(*self._cam.layer)
        if not all(name in self._readings for name in modules):  # a later call's comes along
            with run.forward_context():
                found = probing.measure_layouts(run.model, probe, modules, known=self._readings)
            self._readings.update(found)
        for key, reading in self._readings.items():  # some measured by the examples' stream
            if isinstance(reading, Fallback) and capture.match_layer(self.layouts, key) is None:
                self._warn_once(
                    f"layout:{key}",
                    f"FeatureMapCallback: could not measure how layer {key!r} lays out its "
                    f"output ({reading.reason}), so it is read by the fallback rules (the kinds "
                    "of its modules; its caption says how). If that is wrong, give it a layout: "
                    f"layouts={{{key!r}: 'nchw' | 'nhwc' | 'tokens' | 'sequence' | a function}}.",
                )

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
            folders=self._folders(keys),
            root=self.local_dir,
        )
        drawn = Drawn()
        for kind in self._kinds:
            if self._disabled and kind is not self._maps:
                continue  # inputs that could not be read: only what was captured is drawn
            part = kind.draw(run, shot)
            drawn.pictures += part.pictures
            drawn.scalars.update(part.scalars)
            drawn.dead.update(part.dead)
            drawn.similarity.update(part.similarity)
            for folder, stats in part.stats.items():
                drawn.stats.setdefault(folder, {}).update(stats)
        title = os.path.dirname(self.local_dir) or "feature maps"
        frame = shot.frame
        local = LocalRun(
            self.local_dir,
            frame.epoch,
            drawn.stats,
            drawn.dead,
            title,
            frame.step,
            similarity=drawn.similarity,
        )
        publish(trainer.loggers, drawn.pictures, drawn.scalars, shot.step, local, self._fail)

    def _folders(self, keys: list[str]) -> dict[str, str]:
        """Each layer's own folder: its safe name, unless another layer's or a reserved one (the
        CAM pictures' ``cam``) is the same (then ``~2``...), said once."""
        folders = distinct_path_parts(list(dict.fromkeys(keys)), RESERVED_NAMES)
        for key, folder in folders.items():
            if folder != safe_path_part(key):
                wanted = safe_path_part(key)
                other = next((k for k in keys if k != key and folders[k] == wanted), None)
                self._warn_once(
                    f"folder:{key}",
                    f"FeatureMapCallback: layer {key!r}'s pictures go to {folder}/, as "
                    f"{safe_path_part(key)}/ holds "
                    + (f"layer {other!r}'s" if other else "the callback's own files")
                    + " (with the same tag prefix in the loggers, each keeps its own name).",
                )
        return folders

    # ------------------------------------------------------------------ failures

    def _fail(self, cause: str, err: Exception, disable: bool = False) -> None:
        if self.strict:
            raise err
        self._disabled = self._disabled or disable
        what = "is turned off for this run" if disable else "goes on"
        self._warn_once(
            f"{cause}:{type(err).__name__}",
            f"FeatureMapCallback: {cause} failed ({type(err).__name__}: {err}); training goes on "
            f"and the callback {what}. Pass strict=True to raise instead.",
        )

    def _warn_once(self, key: str, message: str) -> None:
        """A problem with what is drawn: warned once per key, or raised with strict=True."""
        if self.strict:
            raise RuntimeError(message)
        self._warn(message, key)

    def _warn(self, message: str, key: str | None = None) -> None:
        """A warning from any rank (once per ``key``, when given); never raises."""
        if key is not None and key in self._warned:
            return
        if key is not None:
            self._warned.add(key)
        if rank_zero_only.rank == 0:
            rank_zero_warn(message)
        else:  # a failure on another rank must not go unseen
            warnings.warn(rank_prefixed_message(message, rank_zero_only.rank), stacklevel=3)
