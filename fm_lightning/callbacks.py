"""FeatureMapCallback: log what chosen layers of any LightningModule see, once per validation.

    from fm_lightning import FeatureMapCallback
    trainer = lightning.Trainer(callbacks=[FeatureMapCallback(layers=["conv1", "conv2"])])

or, from any LightningCLI script, by class path alone:

    python train.py --trainer.callbacks+=fm_lightning.FeatureMapCallback \
        --trainer.callbacks.layers=[conv1]

How it works: the first validation batches give a fixed probe of ``num_images`` inputs (kept in the
callback's ``state_dict``, so it survives resuming). At the end of a captured validation run, the
probe goes through the model once more, in eval mode and without gradients, with forward hooks on
the chosen layers for that pass only. The hooks pick the channels that will be drawn on the device
and only those leave it; rank zero renders them (``fm_lightning.rendering``), hands them to the
Trainer's loggers (W&B, TensorBoard) and writes them as PNG files. Nothing here can stop
training: a failure warns once per cause and the run goes on (``strict=True`` raises instead).
"""

from __future__ import annotations

import difflib
import fnmatch
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import nn

from fm_lightning import gallery, rendering
from fm_lightning.files import safe_path_part, save_png

# Keys tried, in order, when a batch is a dict and no input_key/input_fn was given.
_DICT_INPUT_KEYS = ("image", "images", "img", "x", "input", "inputs", "pixel_values")


class FeatureMapCallback(Callback):
    """Logs activation grids of chosen layers for a fixed set of validation images.

    Args:
        layers: names from ``model.named_modules()`` or glob patterns (``"conv*"``,
            ``"layer1.*.conv1"``), relative to the LightningModule.
        every_n_epochs: capture at the validation of epochs n-1, 2n-1, ... (Lightning's count,
            as in ``check_val_every_n_epoch``; at most once per epoch).
        num_images: probe images, taken from the first validation batches.
        max_channels: channels drawn per layer (rows are images, columns channels).
        save_dir: where the PNGs go (always written, whatever the loggers). ``None``:
            ``<logger save_dir>/<name>/<version>/feature_maps``, beside the checkpoints.
        normalize: ``"channel"`` scales each map to its own range; ``"layer"`` shares one range
            per image across channels, so magnitudes compare.
        cmap: a matplotlib colormap name.
        order: ``"index"`` draws the first channels; ``"activation"`` the most active first.
        input_key: where the input is in a batch: a dict key or a tuple index. Default: the
            batch itself, its first element, or a usual dict key (``"image"``, ``"x"``, ...).
        input_fn: a function ``batch -> input tensor``, for batches ``input_key`` can't reach.
        log_stats: also log per-layer mean, std, fraction of zeros and dead channels as scalars.
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
        normalize: str = "channel",
        cmap: str = "viridis",
        order: str = "index",
        input_key: str | int | None = None,
        input_fn: Callable[[Any], torch.Tensor] | None = None,
        log_stats: bool = True,
        strict: bool = False,
    ) -> None:
        layers = [layers] if isinstance(layers, str) else list(layers)
        if not layers or not all(isinstance(name, str) and name for name in layers):
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
        self.log_stats = log_stats
        self.strict = strict

        self.probe: torch.Tensor | None = None  # (N, ...) on the model's device once complete
        self._probe_parts: list[torch.Tensor] = []
        self._modules: dict[str, nn.Module] = {}  # resolved in setup()
        self._captures: dict[str, dict[str, Any]] = {}  # filled by the hooks of one capture
        self._last_epoch: int | None = None
        self._warned: set[str] = set()
        self._disabled = False
        self.local_dir: str | None = None

    # ------------------------------------------------------------------ Lightning hooks

    @property
    def state_key(self) -> str:
        # Two of these callbacks (say, on different layers) keep their probes apart in a checkpoint.
        return self._generate_state_key(layers=self.layers, num_images=self.num_images)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        try:
            self._modules = resolve_layers(pl_module, self.layers)
        except ValueError as err:
            raise ValueError(f"FeatureMapCallback: {err}") from None
        self.local_dir = self.save_dir or _default_local_dir(trainer)
        if self.save_dir is None:
            # A second FeatureMapCallback (say, added by class path) gets a directory of its own.
            ours = [cb for cb in trainer.callbacks if isinstance(cb, FeatureMapCallback)]
            if len(ours) > 1 and ours.index(self) > 0:
                self.local_dir += f"_{ours.index(self) + 1}"
        if stage == "fit" and trainer.limit_val_batches == 0:
            rank_zero_warn(
                "FeatureMapCallback: validation is disabled (limit_val_batches=0), "
                "so no feature maps will be logged."
            )

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # An unfinished probe (say, from the short sanity check) starts over, so no image repeats.
        if self.probe is None:
            self._probe_parts = []

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.probe is not None or self._disabled or dataloader_idx != 0:
            return
        try:
            x = self._extract_input(batch)
        except Exception as err:  # a misread batch must not stop validation
            self._fail("input", err, disable=True)
            return
        have = sum(len(part) for part in self._probe_parts)
        self._probe_parts.append(x[: self.num_images - have].detach().clone())
        if have + len(self._probe_parts[-1]) >= self.num_images:
            self._local_probe()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        # Every rank reaches the same verdict here, so the broadcast below is never left waiting.
        if (
            trainer.sanity_checking
            or (epoch + 1) % self.every_n_epochs != 0
            or epoch == self._last_epoch
        ):
            return
        self._last_epoch = epoch
        probe = self._local_probe()
        try:
            # Ranks see different validation shards (or none, or failed to read theirs): rank
            # zero's probe, or its None, is the one every rank uses. Sent from the CPU, so
            # unpickling it on another rank does not touch rank zero's GPU.
            probe = trainer.strategy.broadcast(None if probe is None else probe.cpu(), src=0)
        except Exception as err:
            self._fail("capture", err)
            return
        if probe is None:
            return
        self.probe = probe.to(pl_module.device)
        try:
            self._capture(trainer, pl_module)
        except Exception as err:
            self._fail("capture", err)
            return
        if trainer.is_global_zero:
            self._log(trainer, epoch)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """One GIF per layer across the captured epochs, written locally and sent to W&B."""
        if not trainer.is_global_zero or not os.path.isdir(self.local_dir):
            return  # nothing was written, so nothing to animate
        try:
            gifs = gallery.write_gifs(self.local_dir)
        except Exception as err:
            self._fail("files", err)  # the same cause as the PNGs: warned about once
            return
        for logger in trainer.loggers:
            if gifs and isinstance(logger, WandbLogger):
                try:
                    self._log_wandb_gifs(logger, gifs, _logging_step(trainer))
                except Exception as err:
                    self._fail(type(logger).__name__, err)

    def state_dict(self) -> dict[str, Any]:
        return {"probe": None if self.probe is None else self.probe.cpu()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.probe = state_dict.get("probe")
        self._probe_parts = []

    # ------------------------------------------------------------------ capture

    def _local_probe(self) -> torch.Tensor | None:
        """This rank's probe: complete, or the short one validation gave, or None."""
        if self._disabled:
            return None
        if self.probe is None and self._probe_parts:
            parts, self._probe_parts = self._probe_parts, []
            try:
                self.probe = torch.cat(parts)
            except Exception as err:  # batches of different shapes or dtypes
                self._fail("input", err, disable=True)
                return None
            if len(self.probe) < self.num_images:
                rank_zero_warn(
                    f"FeatureMapCallback: validation gave only {len(self.probe)} of "
                    f"num_images={self.num_images} probe images."
                )
        return self.probe

    def _extract_input(self, batch: Any) -> torch.Tensor:
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
        if not isinstance(x, torch.Tensor) or x.ndim < 2:
            raise TypeError(
                f"expected the model input to be a batched Tensor (N, ...), got {_describe(x)}"
            )
        return x

    def _capture(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """One forward pass of the probe with hooks on the chosen layers; fills self._captures."""
        self._captures = {}
        # Only rank zero draws, but every rank runs the forward so sharded models stay in step.
        modules = self._modules if trainer.is_global_zero else {}
        modes = {m: m.training for m in pl_module.modules()}
        try:
            pl_module.eval()
            with (
                forward_hooks(modules, self._record),
                torch.no_grad(),
                trainer.precision_plugin.forward_context(),
            ):
                pl_module(self.probe)
        finally:
            for module, training in modes.items():
                module.train(training)

    def _record(self, key: str, output: Any) -> None:
        """Hook body: keep the channels that will be drawn, moving only those off the device."""
        act = rendering.first_tensor(output)
        if act is None:
            self._captures[key] = {"error": f"output is {_describe(output)}, not a tensor"}
            return
        if act.ndim not in (2, 3, 4) or act.numel() == 0:  # stats and grids need a batch of maps
            shape = tuple(act.shape)
            self._captures[key] = {
                "error": f"expected a (N, C, H, W) or (N, F) activation, got shape {shape}"
            }
            return
        act = act.detach()
        channels = None
        drawn = act  # (N, F) and (N, C, L) are small enough to move whole
        if act.ndim == 4:  # (N, C, H, W): pick the drawn channels here, on the device
            channels = rendering.select_channels(act, self.max_channels, self.order)
            drawn = act.index_select(1, channels)
        self._captures[key] = {
            "act": drawn.float().cpu(),
            "channels": None if channels is None else channels.cpu(),
            "stats": rendering.activation_stats(act) if self.log_stats else {},
        }

    # ------------------------------------------------------------------ rendering and logging

    def _log(self, trainer: pl.Trainer, epoch: int) -> None:
        """Rank zero: render every captured layer and hand the images to each destination."""
        step = _logging_step(trainer)
        images: dict[str, Any] = {}  # tag -> uint8 (H, W, 3)
        captions: dict[str, str] = {}
        scalars: dict[str, float] = {}
        layer_stats: dict[str, dict[str, float]] = {}
        for name, cap in self._captures.items():
            if "error" in cap:
                self._warn_once(
                    f"skip:{name}", f"FeatureMapCallback: skipping layer {name!r}: {cap['error']}."
                )
                continue
            try:
                grid = rendering.feature_grid(
                    cap["act"],
                    max_channels=self.max_channels,
                    normalize=self.normalize,
                    cmap=self.cmap,
                    order=self.order,
                    channels=cap["channels"],
                )
            except rendering.UnsupportedActivationError as err:
                self._warn_once(
                    f"skip:{name}", f"FeatureMapCallback: skipping layer {name!r}: {err}."
                )
                continue
            except Exception as err:
                self._fail("render", err)
                continue
            images[f"feature_maps/{name}"] = grid
            captions[f"feature_maps/{name}"] = f"epoch {epoch}, step {step}, {_channels_text(cap)}"
            layer_stats[name] = cap["stats"]
            for stat, value in cap["stats"].items():
                scalars[f"feature_stats/{name}/{stat}"] = value
        self._captures = {}
        try:
            inputs = rendering.image_grid(self.probe.float().cpu())
        except Exception as err:
            self._fail("render", err)
            inputs = None
        if inputs is not None:
            images["probe_inputs"] = inputs
            captions["probe_inputs"] = f"{len(self.probe)} fixed validation inputs"

        for logger in trainer.loggers:
            try:
                if isinstance(logger, WandbLogger):
                    self._log_wandb(logger, images, captions, scalars, step)
                    continue
                if isinstance(logger, TensorBoardLogger):
                    for tag, img in images.items():
                        logger.experiment.add_image(tag, img, global_step=step, dataformats="HWC")
                if scalars:
                    logger.log_metrics(scalars, step=step)
            except Exception as err:
                self._fail(type(logger).__name__, err)
        try:
            self._save_local(images, layer_stats, epoch)
        except Exception as err:
            self._fail("files", err)

    @staticmethod
    def _log_wandb(logger: WandbLogger, images, captions, scalars, step: int) -> None:
        import wandb

        # One call, so images, stats and the step land in a single W&B history row.
        # wandb reads a torch tensor as (C, H, W); a uint8 numpy (H, W, 3) array is drawn as-is.
        row: dict[str, Any] = {
            tag: wandb.Image(np.asarray(img), caption=captions[tag]) for tag, img in images.items()
        }
        logger.log_metrics({**row, **scalars}, step=step)

    @staticmethod
    def _log_wandb_gifs(logger: WandbLogger, gifs: dict[str, os.PathLike], step: int) -> None:
        import wandb

        videos = {
            f"feature_maps_evolution/{layer}": wandb.Video(str(path), format="gif")
            for layer, path in gifs.items()
        }
        logger.log_metrics(videos, step=step)

    def _save_local(self, images: dict[str, Any], layer_stats, epoch: int) -> None:
        """PNGs in the layout fm_lightning.gallery reads, then its stats file and index.html."""
        for tag, img in images.items():
            if tag == "probe_inputs":
                path = os.path.join(self.local_dir, "probe_inputs.png")
            else:
                layer = safe_path_part(tag.removeprefix("feature_maps/"))
                path = os.path.join(self.local_dir, layer, f"epoch={epoch:03d}.png")
            save_png(img, path)
        if layer_stats:
            stats = {safe_path_part(name): values for name, values in layer_stats.items()}
            gallery.append_stats(self.local_dir, epoch, stats)
        gallery.write_index(self.local_dir, title=os.path.dirname(self.local_dir) or "feature maps")

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
                warnings.warn(f"[rank {rank_zero_only.rank}] {message}", stacklevel=2)


@contextmanager
def forward_hooks(
    modules: Mapping[str, nn.Module], record: Callable[[str, Any], None]
) -> Iterator[None]:
    """Forward hooks on ``modules`` for the body of the ``with`` only, removed however it ends.

    Each output goes to ``record(key, output)``; ``key`` is the module's name, or ``name@2``,
    ``name@3``... when a module runs again in the same pass (SimpleCNN's shared ``pool``).
    """
    calls: dict[str, int] = {}

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            calls[name] = calls.get(name, 0) + 1
            record(name if calls[name] == 1 else f"{name}@{calls[name]}", output)

        return hook

    handles = [module.register_forward_hook(make_hook(name)) for name, module in modules.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def resolve_layers(model: nn.Module, patterns: Sequence[str]) -> dict[str, nn.Module]:
    """Map exact names and glob patterns to ``{name: module}``, in ``named_modules()`` order.

    Names are those of ``model.named_modules()``. A LightningModule usually holds its network in
    one attribute (``self.net``), so a pattern that matches no full name is also tried without
    that first part: ``conv1`` finds ``net.conv1`` and is reported as ``conv1``.

    Raises:
        ValueError: a pattern matches no layer; the message lists the layers and the closest names.
    """
    named = {name: module for name, module in model.named_modules() if name}
    chosen: dict[str, nn.Module] = {}
    for pattern in patterns:
        hits = {name: named[name] for name in named if fnmatch.fnmatchcase(name, pattern)}
        if not hits:  # try names relative to a direct child: "net.conv1" -> "conv1"
            hits = {
                name.split(".", 1)[1]: module
                for name, module in named.items()
                if "." in name and fnmatch.fnmatchcase(name.split(".", 1)[1], pattern)
            }
        if not hits:
            relative = [name.split(".", 1)[1] for name in named if "." in name]
            close = difflib.get_close_matches(pattern, [*named, *relative], n=3, cutoff=0.5)
            hint = f" Closest: {', '.join(close)}." if close else ""
            raise ValueError(
                f"layer {pattern!r} matches nothing in {type(model).__name__}."
                f"{hint} Available layers: {', '.join(named) or '(none)'}."
            )
        chosen.update(hits)
    order = {module: i for i, module in enumerate(named.values())}
    return dict(sorted(chosen.items(), key=lambda item: order[item[1]]))


def _logging_step(trainer: pl.Trainer) -> int:
    # The step Lightning itself logs metrics at (it differs from global_step under gradient
    # accumulation), so images line up with that epoch's validation metrics.
    return getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)


def _default_local_dir(trainer: pl.Trainer) -> str:
    """``<save_dir>/<name>/<version>/feature_maps``: beside the checkpoints, as ModelCheckpoint
    places them, so every run (W&B ones included) gets its own directory."""
    if not trainer.loggers:
        return os.path.join(trainer.default_root_dir, "feature_maps")
    logger = trainer.loggers[0]
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    save_dir = logger.save_dir or trainer.default_root_dir
    # Every rank calls setup(); rank zero's answer wins (other ranks may not know the version).
    return trainer.strategy.broadcast(
        os.path.join(save_dir, str(logger.name), version, "feature_maps")
    )


def _channels_text(cap: dict[str, Any]) -> str:
    if cap["channels"] is None:
        return f"{cap['act'].shape[-1]} features"
    shown = cap["channels"].tolist()
    if shown == list(range(shown[0], shown[0] + len(shown))):
        return f"channels {shown[0]}-{shown[-1]}"
    return "channels " + ",".join(map(str, shown))


def _describe(obj: Any) -> str:
    if isinstance(obj, torch.Tensor):
        return f"Tensor of shape {tuple(obj.shape)}"
    return type(obj).__name__
