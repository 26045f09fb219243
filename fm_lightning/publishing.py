"""One path for every picture the callback makes: each of the Trainer's loggers, PNGs, the gallery.

    pictures = [Picture("feature_maps/conv1", "conv1/epoch=003.png", grid, "epoch 3, channels 0-7")]
    local = LocalRun(root, epoch=3, stats=stats)      # PNGs, stats.json and index.html under root
    publish(trainer.loggers, pictures, scalars, step=120, local=local, on_error=warn)
    publish_gifs(trainer.loggers, root, step=600, on_error=warn)     # at the end of fit

A picture is an (H, W, 3) uint8 tensor with a tag (the logger key: W&B and TensorBoard use it as
it is) and a path under the local directory (the layout :mod:`fm_lightning.gallery` reads). Feature
maps, top-k examples and class-activation maps all go through here, so every destination gets every
kind of picture the same way. A destination that fails is reported through ``on_error(cause, err)``
and the others still get theirs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from torch import Tensor

from fm_lightning import gallery
from fm_lightning.files import save_png

OnError = Callable[[str, Exception], None]


@dataclass(frozen=True)
class Picture:
    tag: str  # logger key, e.g. "feature_maps/conv1", "probe_inputs"
    path: str  # under the local directory, e.g. "conv1/epoch=003.png"
    image: Tensor  # (H, W, 3) uint8
    caption: str = ""


@dataclass(frozen=True)
class LocalRun:
    """Where and under which epoch the local copies go, and what the gallery shows beside them."""

    root: str
    epoch: int
    stats: Mapping[str, Mapping[str, float]] = field(default_factory=dict)  # {folder: {stat: v}}
    dead: Mapping[str, Mapping[int, int]] = field(default_factory=dict)  # {folder: {ch: since}}
    title: str = "feature maps"
    step: int | None = None  # the frame's step, in a fit whose validations are step-based


def publish(
    loggers: Sequence[Logger],
    pictures: Sequence[Picture],
    scalars: Mapping[str, float],
    step: int,
    local: LocalRun | None,
    on_error: OnError,
) -> None:
    """Hand ``pictures`` and ``scalars`` to every logger, then write them under ``local.root``."""
    for logger in loggers:
        try:
            if isinstance(logger, WandbLogger):
                _log_wandb(logger, pictures, scalars, step)
                continue
            if isinstance(logger, TensorBoardLogger):
                for pic in pictures:
                    logger.experiment.add_image(
                        pic.tag, pic.image, global_step=step, dataformats="HWC"
                    )
            if scalars:
                logger.log_metrics(dict(scalars), step=step)
        except Exception as err:
            on_error(type(logger).__name__, err)
    if local is None:
        return
    try:
        for pic in pictures:
            save_png(pic.image, os.path.join(local.root, pic.path))
        # The gallery pairs a caption with the folder its picture is in: conv1, conv1/examples, cam.
        captions = {os.path.dirname(p.path): p.caption for p in pictures if os.path.dirname(p.path)}
        gallery.append_stats(
            local.root,
            local.epoch,
            dict(local.stats),
            captions=captions,
            dead=dict(local.dead),
            step=local.step,
        )
        gallery.write_index(local.root, title=local.title)
    except Exception as err:
        on_error("files", err)


def publish_gifs(loggers: Sequence[Logger], root: str, step: int, on_error: OnError) -> None:
    """One GIF per picture folder across the captured epochs, written locally and sent to W&B."""
    if not os.path.isdir(root):
        return  # nothing was written, so nothing to animate
    try:
        gifs = gallery.write_gifs(root)
    except Exception as err:
        on_error("files", err)  # the same cause as the PNGs: warned about once
        return
    for logger in loggers:
        if gifs and isinstance(logger, WandbLogger):
            try:
                import wandb

                videos = {
                    f"{_evolution_tag(folder)}/{folder}": wandb.Video(str(path), format="gif")
                    for folder, path in gifs.items()
                }
                logger.log_metrics(videos, step=step)
            except Exception as err:
                on_error(type(logger).__name__, err)


def _evolution_tag(folder: str) -> str:
    return "class_activation_evolution" if folder == gallery.CAM_DIR else "feature_maps_evolution"


def _log_wandb(
    logger: WandbLogger, pictures: Sequence[Picture], scalars: Mapping[str, Any], step: int
) -> None:
    import wandb

    # One call, so pictures, stats and the step land in a single W&B history row.
    # wandb reads a torch tensor as (C, H, W); a uint8 numpy (H, W, 3) array is drawn as-is.
    row: dict[str, Any] = {
        pic.tag: wandb.Image(np.asarray(pic.image), caption=pic.caption) for pic in pictures
    }
    logger.log_metrics({**row, **scalars}, step=step)
