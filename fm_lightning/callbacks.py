"""FeatureMapCallback: log what chosen layers of any LightningModule see, once per validation.

    from fm_lightning import FeatureMapCallback
    trainer = lightning.Trainer(callbacks=[FeatureMapCallback(layers=["conv1", "conv2"])])

or, from any LightningCLI script, by class path alone:

    python train.py --trainer.callbacks+=fm_lightning.FeatureMapCallback \
        --trainer.callbacks.layers=[conv1]

How it works: the first validation batches give a fixed probe of ``num_images`` inputs (kept in the
callback's ``state_dict``, so it survives resuming). At the end of a captured validation (the last
of a captured epoch, or, in a fit whose validations are step-based, each one: a frame named by its
global step, ``step=NNNNNN``), a copy of the probe goes through the model once more
(``fm_lightning.capture``: eval mode, no gradients, eager even for compiled models, hooks on the
chosen layers for that pass only). Each layer's output is read as maps or features
(``fm_lightning.layouts``), the channels to draw are picked on the device, and rank zero renders
them (``fm_lightning.rendering``) and hands them to every logger and the local files
(``fm_lightning.publishing``). Nothing here can stop training: a failure warns once per cause and
the run goes on (``strict=True`` raises instead).
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from typing import Any, Literal, NamedTuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_prefixed_message
from torch import nn
from typing_extensions import override

from fm_lightning import capture, probing, rendering
from fm_lightning.cam import cam_caption, cam_grid, check_cam_method, class_activation_maps
from fm_lightning.examples import (
    MAX_EXAMPLES,
    DeadChannels,
    ExamplesResult,
    ExampleStream,
    ReceptiveField,
    TopKExamples,
    content_ids,
    examples_grid,
)
from fm_lightning.files import distinct_path_parts, safe_path_part
from fm_lightning.gallery import CAM_DIR, RESERVED_NAMES
from fm_lightning.layouts import Fallback, check_layout, interpret
from fm_lightning.publishing import LocalRun, Picture, publish, publish_gifs, without_pictures

# Keys tried, in order, when a batch is a dict and no input_key/input_fn was given.
_DICT_INPUT_KEYS = ("image", "images", "img", "x", "input", "inputs", "pixel_values")
_DICT_TARGET_KEYS = ("label", "labels", "target", "targets", "y")


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
            are dead over the whole validation set (``fm_lightning.examples``). The rows are
            the channels the maps draw; with ``order="activation"`` under DDP and without a
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
        if input_key is not None and input_fn is not None:
            raise ValueError("expected at most one of `input_key` and `input_fn`, got both")
        if input_fn is not None and not callable(input_fn):
            raise ValueError(f"expected `input_fn` to be callable, got {type(input_fn).__name__}")
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
        if (
            isinstance(examples, bool)
            or not isinstance(examples, int)
            or not 0 <= examples <= MAX_EXAMPLES
        ):
            raise ValueError(
                f"expected `examples` to be an int in [0, {MAX_EXAMPLES}], got {examples!r}"
            )
        if dead_warn is not None and (
            isinstance(dead_warn, bool)
            or not isinstance(dead_warn, (int, float))
            or not 0 <= dead_warn <= 1
        ):
            raise ValueError(f"expected `dead_warn` in [0, 1] or None, got {dead_warn!r}")
        if cam is not None:
            cam = check_cam_method(cam)  # its canonical name: "gradcam++" -> "GradCAMpp"
        if cam_layer is not None and (not isinstance(cam_layer, str) or not cam_layer):
            raise ValueError(f"expected `cam_layer` to be a layer name or None, got {cam_layer!r}")
        if cam_layer is not None and cam is None:
            raise ValueError(
                f"expected `cam` (a method such as 'GradCAM') with `cam_layer`, got "
                f"cam_layer={cam_layer!r} and cam=None: pass cam=..., or drop cam_layer"
            )
        if target_fn is not None and not callable(target_fn):
            raise ValueError(f"expected `target_fn` to be callable, got {type(target_fn).__name__}")
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
        self.name = name
        self.strict = strict

        self.probe: Any = None  # Tensor, tuple or dict of (N, ...) tensors once complete
        self.probe_targets: torch.Tensor | None = None  # (N,) true classes, when batches have them
        self._probe_parts: list[tuple[Any, torch.Tensor | None]] = []
        self._modules: dict[str, nn.Module] = {}  # resolved when fitting starts
        self._cam_module: tuple[str, nn.Module] | None = None  # (name, module), or torchcam's pick
        self._stream: ExampleStream | None = None  # top-k examples of a captured validation run
        self._examples_run = False  # this validation run streams examples (on every rank)
        self._stream_hooks = ExitStack()  # the stream's hooks, open for one validation batch
        self._channels_from_first_batch = False  # order="activation" before any probe exists
        # order="activation": the channels chosen at the first captured epoch, kept for the run
        # so that a column of the pictures is one channel over time. {layer: (C',) indices}
        self._run_channels: dict[str, torch.Tensor] = {}
        self._fields: dict[str, ReceptiveField] = {}  # receptive fields, measured once per layer
        self._readings: dict[str, probing.Reading] = {}  # output layouts, measured once per fit
        self._dead: dict[str, DeadChannels] = {}
        self._capturing = False  # this validation run is the one to draw
        self._warned: set[str] = set()
        self._disabled = False
        self.local_dir: str | None = None

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
        self.local_dir = self.save_dir or _default_local_dir(trainer, safe_path_part(default_dir))
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
        if not _has_validation(trainer, pl_module):
            rank_zero_warn(
                "FeatureMapCallback: this fit has no validation loop (no validation_step, no "
                "val dataloader, or limit_val_batches=0), so no feature maps will be logged."
            )
        elif (why := _nothing_drawn(trainer, self.every_n_epochs)) is not None:
            rank_zero_warn(f"FeatureMapCallback: nothing will be drawn in this fit: {why}.")

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._modules:  # trainer.validate(): no on_fit_start
            self._resolve(pl_module)
        # An unfinished probe (say, from the short sanity check) starts over, so no image repeats.
        if self.probe is None:
            self._probe_parts = []
        self._capturing = _is_captured(trainer, self.every_n_epochs)
        self._stream = None
        self._examples_run = self._capturing and self.examples > 0  # the same on every rank
        # Under DDP a rank that cannot read its batches still starts (the collectives in
        # _start_examples wait for every rank); its stream fails at its first batch, and then
        # _gather_examples gathers nothing on any rank.
        if self._examples_run and not (self._disabled and trainer.world_size == 1):
            try:
                self._start_examples(trainer, pl_module)
            except Exception as err:
                self._fail("examples", err)

    @override
    def on_validation_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._stream is None or dataloader_idx != 0:
            return
        try:
            x = self._extract_input(batch)
            if not isinstance(x, torch.Tensor) or x.ndim != 4:
                raise TypeError(
                    "expected the model input to be one (N, C, H, W) tensor for examples, got "
                    f"{_describe(x)}"
                )
            if len(x) == 0:
                return  # an empty batch: nothing to stream, and the next batch may choose
            # Inputs are told apart by content, whatever sampler gave them to this rank
            # (DistributedSampler's strided shards padded with the first inputs again, a custom
            # one, each rank its own data), so all ranks' candidates merge as one process's
            # would and an input seen twice counts once.
            indices = content_ids(x)
            if self._channels_from_first_batch:
                self._channels_from_first_batch = False
                if capture.num_rows(x) >= self.num_images:  # the probe will be these inputs
                    probe = capture.take_rows(x, self.num_images)
                    self._stream.channels = self._drawn_channels(trainer, pl_module, probe)
            self._stream_hooks.enter_context(self._stream.batch(x, indices))
        except Exception as err:
            self._stream = None
            self._fail("examples", err)

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
        self._stream_hooks.close()  # the examples' hooks live for one batch
        if self.probe is not None or self._disabled or dataloader_idx != 0:
            return
        try:
            x = self._extract_input(batch)
            have = sum(capture.num_rows(part) for part, _ in self._probe_parts)
            need = self.num_images - have
            y = self._extract_targets(batch, capture.num_rows(x))
            part = (capture.take_rows(x, need), None if y is None else y[:need].clone())
            self._probe_parts.append(part)
        except Exception as err:  # a misread batch must not stop validation
            self._fail("input", err, disable=True)
            return
        if have + capture.num_rows(part[0]) >= self.num_images:
            self._local_probe()

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Every rank reaches the same verdict here, so the broadcast below is never left waiting.
        self._stream_hooks.close()
        if not self._capturing:
            return
        self._capturing = False
        examples = self._gather_examples(trainer, pl_module)  # collectives: every rank, first
        try:
            probe = self._shared_probe(trainer, pl_module)
        except Exception as err:
            self._fail("capture", err)
            return
        if probe is None:
            return
        # Only rank zero draws, but every rank runs the forward so sharded models stay in step.
        modules = self._modules if trainer.is_global_zero else {}
        try:
            self._measure_layouts(trainer, pl_module, probe)
            captured, _ = capture.capture(
                pl_module,
                self.probe,
                modules,
                max_channels=self.max_channels,
                order=self.order,
                layouts_by_layer=self.layouts,
                readings=self._readings,
                stats=self.log_stats,
                forward_context=trainer.precision_plugin.forward_context(),
                channels=self._run_channels,
            )
        except Exception as err:
            self._fail("capture", err)
            return
        self._keep_channels(captured)
        if trainer.is_global_zero:
            for layer in capture.not_run(modules, captured):
                self._warn_once(
                    f"not-run:{layer}",
                    f"FeatureMapCallback: layer {layer!r} did not run in the probe pass, so it is "
                    "not drawn. Likely reasons: a training-only branch (an auxiliary head), a "
                    "fused kernel that bypasses the module (fused attention), or a branch the "
                    "forward skips for these inputs.",
                )
            frame = _frame(trainer)
            pictures = self._cam_pictures(trainer, pl_module, frame)
            self._log(trainer, frame, captured, examples, pictures)

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._stream_hooks.close()  # a validation step that raised leaves no hook behind

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """One GIF per layer across the captured epochs, written locally and sent to W&B."""
        if trainer.is_global_zero:
            publish_gifs(trainer.loggers, self.local_dir, _logging_step(trainer), self._fail)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stream_hooks.close()
        # No reference to the model outlives the run.
        self._modules, self._cam_module, self._stream = {}, None, None
        self._readings = {}  # measured again next fit: the model may have changed
        self._capturing = False

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "probe": None if self.probe is None else capture.to_device(self.probe, "cpu"),
            "targets": None if self.probe_targets is None else self.probe_targets.cpu(),
            "dead": {layer: dead.state_dict() for layer, dead in self._dead.items()},
            "channels": dict(self._run_channels),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.probe = state_dict.get("probe")
        self.probe_targets = state_dict.get("targets")
        self._probe_parts = []
        self._dead = {}
        self._run_channels = dict(state_dict.get("channels") or {})
        for layer, state in (state_dict.get("dead") or {}).items():
            self._dead[layer] = DeadChannels()
            self._dead[layer].load_state_dict(state)

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
                self._cam_module = next(iter(found.items()))
        except ValueError as err:
            raise ValueError(f"FeatureMapCallback: {err}") from None

    def _measure_layouts(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: Any
    ) -> None:
        """How each layer's (and the CAM layer's) output lies on the input, once per fit.

        Every rank measures (the forward passes keep sharded models in step); a layer whose
        layout cannot be measured warns once, naming it, and is read by the fallback rules.
        """
        modules = dict(self._modules)
        if self._cam_module is not None:
            modules.setdefault(*self._cam_module)
        if not all(name in self._readings for name in modules):  # a later call's comes along
            with trainer.precision_plugin.forward_context():
                found = probing.measure_layouts(pl_module, probe, modules, known=self._readings)
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

    def _shared_probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        """Rank zero's probe (and targets), on every rank and on the model's device; or None."""
        probe = self._local_probe()
        # Ranks see different validation shards (or none, or failed to read theirs): rank
        # zero's probe, or its None, is the one every rank uses. Sent from the CPU, so
        # unpickling it on another rank does not touch rank zero's GPU.
        cpu = None if probe is None else capture.to_device((probe, self.probe_targets), "cpu")
        shared = trainer.strategy.broadcast(cpu, src=0)
        if shared is None:
            return None
        self.probe, self.probe_targets = capture.to_device(shared, pl_module.device)
        return self.probe

    def _local_probe(self) -> Any:
        """This rank's probe: complete, or the short one validation gave, or None."""
        if self._disabled:
            return None
        if self.probe is None and self._probe_parts:
            parts, self._probe_parts = self._probe_parts, []
            try:
                self.probe = capture.concat_rows([x for x, _ in parts])
                targets = [y for _, y in parts]
                has_all = all(y is not None for y in targets)
                self.probe_targets = torch.cat(targets) if has_all else None
            except Exception as err:  # batches of different shapes or dtypes
                self._fail("input", err, disable=True)
                return None
            have = capture.num_rows(self.probe)
            if have < self.num_images:
                rank_zero_warn(
                    f"FeatureMapCallback: validation gave only {have} of "
                    f"num_images={self.num_images} probe images."
                )
        return self.probe

    def _extract_input(self, batch: Any) -> Any:
        if self.input_fn is not None:
            x = self.input_fn(batch)
        elif self.input_key is not None:
            x = batch[self.input_key]
        elif isinstance(batch, torch.Tensor):
            x = batch
        elif isinstance(batch, (tuple, list)) and batch:
            x = batch[0]
        elif isinstance(batch, Mapping):
            key = next((k for k in _DICT_INPUT_KEYS if k in batch), None)
            if key is None:
                raise KeyError(
                    f"expected the batch dict to hold one of {_DICT_INPUT_KEYS}, got keys "
                    f"{list(batch)}; pass FeatureMapCallback(input_key=...) or input_fn=..."
                )
            x = batch[key]
        else:
            raise TypeError(
                "expected a batch that is a Tensor, tuple, list or dict, got "
                f"{type(batch).__name__}; pass FeatureMapCallback(input_fn=...) to pick the input"
            )
        if not isinstance(x, (torch.Tensor, tuple, list, Mapping)):
            raise TypeError(
                f"expected the model input to be a Tensor, tuple or dict, got {_describe(x)}"
            )
        capture.num_rows(x)  # raises for inputs without a common batch size
        return x

    def _extract_targets(self, batch: Any, n: int) -> torch.Tensor | None:
        """(n,) integer classes of a batch, for the CAM's true-class maps; None without them."""
        if self.target_fn is not None:
            y = self.target_fn(batch)
        elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
            y = batch[1]
        elif isinstance(batch, Mapping):
            y = next((batch[k] for k in _DICT_TARGET_KEYS if k in batch), None)
        else:
            y = None
        is_classes = isinstance(y, torch.Tensor) and y.shape == (n,) and not y.is_floating_point()
        if self.target_fn is not None and not is_classes:
            raise TypeError(
                f"expected target_fn to return ({n},) integer classes, got {_describe(y)}"
            )
        return y.detach() if is_classes else None

    # ------------------------------------------------------------------ top-k examples

    def _start_examples(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Open a stream for this validation run, drawing the channels the maps will draw."""
        channels: dict[str, torch.Tensor] = {}
        self._channels_from_first_batch = False
        if self.order == "activation":
            # The maps' channels come from the probe, on the same weights as at the end of this
            # validation.
            probe = self._shared_probe(trainer, pl_module)
            if probe is not None:
                channels = self._drawn_channels(trainer, pl_module, probe)
            elif trainer.world_size == 1:
                # No probe yet (the first validation, without a sanity check): it will be this
                # run's first inputs, so they choose, before any batch is streamed. Under DDP
                # rank zero's inputs are not known to the others: the first channels are kept.
                self._channels_from_first_batch = True
        self._stream = ExampleStream(
            pl_module,
            self._modules,
            k=self._examples_kept(pl_module, trainer),
            max_channels=self.max_channels,
            channels=channels,
            fields=self._fields,
            layouts_by_layer=self.layouts,
            readings=self._readings,
        )

    def _examples_kept(self, pl_module: pl.LightningModule, trainer: pl.Trainer) -> int:
        """``examples``, or fewer when the validation set holds fewer inputs (all ranks': a
        state's slots have one shape on every rank, for all_gather)."""
        size = _validation_inputs(trainer)
        local = torch.tensor(self.examples if size is None else min(size, self.examples))
        return int(pl_module.all_gather(local.to(pl_module.device)).sum().clamp(1, self.examples))

    def _drawn_channels(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: Any
    ) -> dict[str, torch.Tensor]:
        """The channels the maps draw for this probe (order="activation"), per layer."""
        self._measure_layouts(trainer, pl_module, probe)
        captured, _ = capture.capture(
            pl_module,
            probe,
            self._modules,
            max_channels=self.max_channels,
            order=self.order,
            layouts_by_layer=self.layouts,
            readings=self._readings,
            stats=False,
            forward_context=trainer.precision_plugin.forward_context(),
            channels=self._run_channels,
        )
        self._keep_channels(captured)
        return {k: c.channels for k, c in captured.items() if c.channels is not None}

    def _keep_channels(self, captured: dict[str, capture.Captured]) -> None:
        """order="activation": the first channels chosen for a layer stay its channels."""
        if self.order == "activation":
            for key, cap in captured.items():
                if cap.channels is not None:
                    self._run_channels.setdefault(key, cap.channels.cpu())

    def _gather_examples(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> dict[str, ExamplesResult]:
        """Every rank's candidates, merged on rank zero (Lightning's all_gather, every rank)."""
        stream, self._stream = self._stream, None
        if not self._examples_run:
            return {}
        self._examples_run = False
        # A rank whose stream failed, or saw other layers, must not leave the others waiting
        # in all_gather: all ranks agree first, and gather only if every one can.
        layers = None if stream is None else sorted(stream.topk)
        agreed = trainer.strategy.broadcast(layers, src=0)
        ok = layers is not None and layers == agreed
        if not trainer.strategy.reduce_boolean_decision(ok, all=True) or stream is None:
            return {}
        for layer, error in stream.errors.items():
            self._warn_once(
                f"examples:{layer}", f"FeatureMapCallback: no examples for {layer!r}: {error}."
            )
        try:
            return {
                layer: TopKExamples.merge(pl_module.all_gather(state))
                for layer, state in stream.states().items()
            }
        except Exception as err:
            self._fail("examples", err)
            return {}

    def _example_pictures(
        self,
        frame: _Frame,
        results: dict[str, ExamplesResult],
        scalars: dict[str, float],
        folders: dict[str, str],
    ) -> tuple[list[Picture], dict[str, dict[int, int]]]:
        """Rank zero: one examples grid per layer; dead channels over the whole validation set."""
        pictures, dead_since, epoch = [], {}, frame.epoch
        for layer, result in results.items():
            dead = self._dead.setdefault(layer, DeadChannels())
            dead.update(epoch, result.dead.cpu())
            scalars[f"feature_stats/{layer}/dead_channels_val"] = dead.fraction
            if dead.crossed(self.dead_warn):
                rank_zero_warn(
                    f"FeatureMapCallback: {dead.fraction:.0%} of {layer!r}'s channels are dead "
                    f"(never above 0 on the validation set) at epoch {epoch}, over "
                    f"dead_warn={self.dead_warn}: channels {dead.channels}."
                )
            folder = folders[layer]
            dead_since[folder] = dict(dead.since)
            try:
                grid = examples_grid(result, cmap=self.cmap)
            except Exception as err:
                self._fail("render", err)
                continue
            shown = result.channels.tolist()
            caption = (
                f"{frame.text}: top {result.scores.shape[1]} validation inputs of channels "
                f"{_ranges(shown)}, cropped to the receptive field; dead over the whole "
                f"validation set: "
                f"{_ranges(dead.channels) or 'none'}"
            )
            path = f"{folder}/examples/{frame.stem}.png"
            pictures.append(Picture(f"feature_examples/{layer}", path, grid, caption))
        return pictures, dead_since

    # ------------------------------------------------------------------ class activation maps

    def _cam_pictures(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, frame: _Frame
    ) -> list[Picture]:
        """Rank zero: where the model looks on the probe, for its predicted and true classes."""
        if self.cam is None or self._disabled:
            return []
        probe = self.probe
        if not isinstance(probe, torch.Tensor) or probe.ndim != 4:
            self._warn_once(
                "cam:input",
                "FeatureMapCallback: cam needs a model called with one (N, C, H, W) tensor, got "
                f"{_describe(probe)}; no class-activation maps are drawn.",
            )
            return []
        layer, reshape = None, None
        if self._cam_module is not None:
            key, module = self._cam_module
            layer = next(n for n, m in pl_module.named_modules() if m is module)
            layout = capture.match_layer(self.layouts, key) or "auto"
            reading = self._readings.get(key)  # measured with the layers, before the capture

            def reshape(t: torch.Tensor) -> torch.Tensor:
                return interpret(
                    t,
                    module=module,
                    model=pl_module,
                    num_rows=len(probe),
                    layout=layout,
                    reading=reading,
                ).act

        try:
            with (
                torch.compiler.set_stance("force_eager"),
                trainer.precision_plugin.forward_context(),
            ):
                result = class_activation_maps(
                    pl_module,
                    probe,
                    self.cam,
                    layer=layer,
                    targets=self.probe_targets,
                    reshape=reshape,
                )
            if self._cam_module is not None:  # named as the user named it, like the maps
                result = dataclasses.replace(result, layer=self._cam_module[0])
            grid = cam_grid(probe.float(), result, cmap=self.cmap)
        except Exception as err:
            self._fail("cam", err)
            return []
        if result.target_is_class is not None and not bool(result.target_is_class.all()):
            labels = sorted(set(result.target[~result.target_is_class].tolist()))
            self._warn_once(
                "cam:labels",
                f"FeatureMapCallback: probe labels {labels} are not classes of the model (not "
                "a column of its logits: an ignore_index?); those rows get no true-class map, "
                "the others are drawn.",
            )
        caption = f"{frame.text}: {cam_caption(result)}"
        path = f"{CAM_DIR}/{frame.stem}.png"
        return [Picture(f"class_activation/{result.layer}", path, grid, caption)]

    # ------------------------------------------------------------------ rendering and logging

    def _log(
        self,
        trainer: pl.Trainer,
        frame: _Frame,
        captured: dict[str, capture.Captured],
        examples: dict[str, ExamplesResult],
        extra: list[Picture],
    ) -> None:
        """Rank zero: render every captured layer and publish all the pictures."""
        step, epoch = _logging_step(trainer), frame.epoch
        pictures: list[Picture] = []
        scalars: dict[str, float] = {}
        layer_stats: dict[str, dict[str, float]] = {}
        folders = self._folders([*captured, *examples])
        for key, cap in captured.items():
            if cap.error is not None:
                self._warn_once(
                    f"skip:{key}", f"FeatureMapCallback: skipping layer {key!r}: {cap.error}."
                )
                continue
            try:
                grid = rendering.feature_picture(
                    cap.act,
                    max_channels=self.max_channels,
                    normalize=self.normalize,
                    cmap=self.cmap,
                    order=self.order,
                    channels=cap.channels,
                )
            except rendering.UnsupportedActivationError as err:
                self._warn_once(f"skip:{key}", f"FeatureMapCallback: skipping {key!r}: {err}.")
                continue
            except Exception as err:
                self._fail("render", err)
                continue
            when = f"epoch {epoch}, step {step}" if frame.step is None else frame.text
            caption = f"{when}, {_channels_text(cap)}"
            if cap.note:
                caption += f"; {cap.note}"
            folder = folders[key]
            pictures.append(
                Picture(f"feature_maps/{key}", f"{folder}/{frame.stem}.png", grid, caption)
            )
            layer_stats[folder] = cap.stats
            for stat, value in cap.stats.items():
                scalars[f"feature_stats/{key}/{stat}"] = value
        images = capture.first_image(self.probe)  # non-image inputs have no strip, quietly
        if images is not None:
            try:
                strip = rendering.image_grid(images.float().cpu())
                caption = f"{len(images)} fixed validation inputs"
                pictures.append(Picture("probe_inputs", "probe_inputs.png", strip, caption))
            except Exception as err:
                self._fail("render", err)
        example_pictures, dead = self._example_pictures(frame, examples, scalars, folders)
        for layer in examples:  # beside dead_channels_probe in the gallery's plot
            value = scalars.get(f"feature_stats/{layer}/dead_channels_val")
            if value is not None and folders.get(layer) in layer_stats:
                layer_stats[folders[layer]]["dead_channels_val"] = value
        pictures += example_pictures + extra
        title = os.path.dirname(self.local_dir) or "feature maps"
        local = LocalRun(self.local_dir, epoch, layer_stats, dead, title, step=frame.step)
        publish(trainer.loggers, pictures, scalars, step, local, self._fail)

    def _folders(self, keys: list[str]) -> dict[str, str]:
        """Each layer's own folder: its safe name, unless another layer's or a reserved one (the
        CAM pictures' ``cam``) is the same (then ``~2``...), said once."""
        folders = distinct_path_parts(keys, RESERVED_NAMES)
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
        if self.strict:
            raise RuntimeError(message)
        if key not in self._warned:
            self._warned.add(key)
            if rank_zero_only.rank == 0:
                rank_zero_warn(message)
            else:  # a failure on another rank must not go unseen
                warnings.warn(rank_prefixed_message(message, rank_zero_only.rank), stacklevel=2)


def _logging_step(trainer: pl.Trainer) -> int:
    # The step Lightning itself logs metrics at (it differs from global_step under gradient
    # accumulation), so images line up with that epoch's validation metrics.
    return getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)


def _default_local_dir(trainer: pl.Trainer, folder: str) -> str:
    """``<save_dir>/<name>/<version>/<folder>``: beside the checkpoints, as ModelCheckpoint
    places them, so every run (W&B ones included) gets its own directory."""
    if not trainer.loggers:
        return os.path.join(trainer.default_root_dir, folder)
    logger = trainer.loggers[0]
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    save_dir = logger.save_dir or trainer.default_root_dir
    # Every rank calls setup(); rank zero's answer wins (other ranks may not know the version).
    return trainer.strategy.broadcast(os.path.join(save_dir, str(logger.name), version, folder))


class _Frame(NamedTuple):
    """Which validation a picture shows: its epoch, and its step in a step-based fit."""

    epoch: int
    # trainer.global_step (optimizer steps so far, as in ModelCheckpoint's step=N), when the
    # fit's validations are step-based; loggers still get the step Lightning logs metrics at
    step: int | None

    @property
    def stem(self) -> str:
        """The file name of the frame: ``epoch=003`` or ``step=001200``."""
        return f"epoch={self.epoch:03d}" if self.step is None else f"step={self.step:06d}"

    @property
    def text(self) -> str:
        if self.step is None:
            return f"epoch {self.epoch}"
        return f"step {self.step} (epoch {self.epoch})"


def _frame(trainer: pl.Trainer) -> _Frame:
    step_based = trainer.state.fn == "fit" and _step_based(trainer)
    return _Frame(trainer.current_epoch, trainer.global_step if step_based else None)


def _step_based(trainer: pl.Trainer) -> bool:
    """Whether the fit validates every so many training batches (an int ``val_check_interval``,
    ``check_val_every_n_epoch=None``) or so much time, rather than at fractions of epochs: then
    no validation need be an epoch's last one, and each is a frame of its own."""
    interval = getattr(trainer, "val_check_interval", 1.0)
    return (
        trainer.check_val_every_n_epoch is None
        or (isinstance(interval, int) and not isinstance(interval, bool))
        or getattr(trainer, "_val_check_time_interval", None) is not None
    )


def _nothing_drawn(trainer: pl.Trainer, every_n_epochs: int) -> str | None:
    """Why a fit with these settings can never reach a captured validation, or None."""
    max_epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
    check = trainer.check_val_every_n_epoch
    if max_epochs is not None and check is not None:
        first = math.lcm(every_n_epochs, check)  # the first epoch that validates and is captured
        if first > max_epochs:
            return (
                f"every_n_epochs={every_n_epochs} with check_val_every_n_epoch={check} first "
                f"draws at epoch {first - 1}, after max_epochs={max_epochs}"
            )
    interval = getattr(trainer, "val_check_interval", 1.0)
    if check is None and isinstance(interval, int) and trainer.max_steps > 0:
        batches = trainer.max_steps * trainer.accumulate_grad_batches
        if interval > batches:
            return (
                f"val_check_interval={interval} training batches is more than the fit's "
                f"max_steps={trainer.max_steps} x accumulate_grad_batches="
                f"{trainer.accumulate_grad_batches} = {batches}, so it never validates"
            )
    return None


def _is_captured(trainer: pl.Trainer, every_n_epochs: int) -> bool:
    """Whether the validation starting now is drawn: in a captured epoch, every one of a
    step-based fit (see :func:`_step_based`), else the epoch's last one."""
    if trainer.sanity_checking or (trainer.current_epoch + 1) % every_n_epochs != 0:
        return False
    if not trainer.training and trainer.state.fn != "fit":
        return True  # trainer.validate(): one validation, drawn
    if _step_based(trainer):
        return True
    # Mid-epoch validations (a float val_check_interval < 1) are skipped: the epoch's frame
    # shows the model at the end of the epoch (or where fitting stops early).
    loop = trainer.fit_loop.epoch_loop
    return bool(loop.batch_progress.is_last_batch or loop._is_training_done or trainer.should_stop)


def _validation_inputs(trainer: pl.Trainer) -> int | None:
    """Inputs this rank validates on (its sampler's length, else its dataset's), or None when
    that is unknown (iterable datasets)."""
    loaders = trainer.val_dataloaders
    loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
    for source in ("sampler", "dataset"):
        try:
            return len(getattr(loader, source))
        except (AttributeError, TypeError):
            continue
    return None


def _has_validation(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
    if trainer.limit_val_batches == 0 or not is_overridden("validation_step", pl_module):
        return False
    # The same test Lightning makes before it skips its validation loop.
    return trainer.fit_loop.epoch_loop.val_loop._data_source.is_defined()


def _channels_text(cap: capture.Captured) -> str:
    if cap.channels is None:
        return f"{cap.act.shape[-1]} of {cap.total_channels} features"
    return f"channels {_ranges(cap.channels.tolist())} of {cap.total_channels}"


def _ranges(values: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    spans: list[list[int]] = []
    for v in values:
        if spans and v == spans[-1][1] + 1:
            spans[-1][1] = v
        else:
            spans.append([v, v])
    return ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans)


def _describe(obj: Any) -> str:
    if isinstance(obj, torch.Tensor):
        return f"Tensor of shape {tuple(obj.shape)}"
    return type(obj).__name__
