"""One path for every picture the callback makes: each of the Trainer's loggers, PNGs, the gallery.

    drawn = Drawn([Picture("feature_maps/conv1", "conv1/epoch=003.png", grid, "epoch 3, ch 0-7")])
    local = LocalRun(root, epoch=3)       # PNGs, stats.json and index.html (drawn.stats...) there
    publish(trainer.loggers, drawn, step=120, local=local, on_error=warn)
    publish_gifs(trainer.loggers, root, step=600, on_error=warn)     # at the end of fit
    folders = layer_folders(["conv1", "cam"], warn_once)   # {"conv1": "conv1", "cam": "cam~2"}

A picture is an (H, W, 3) uint8 tensor with a tag (the logger key, e.g. ``feature_maps/conv1``),
a caption, and a path under the local directory (the layout :mod:`fm_lightning.gallery` reads).
Feature maps, top-k examples and class-activation maps all go through here, so every destination
gets every kind of picture the same way. A destination that fails is reported through
``on_error(cause, err)`` and the others still get theirs.

What each of Lightning's loggers receives (scalars: every logger, through ``log_metrics``):

    WandbLogger        wandb.Image rows with captions, in the same history row as the scalars
    TensorBoardLogger  image summaries whose description is the caption; TensorBoard shows the
                       first step's, so every step's caption is in the Text tab too
                       (<key>/caption/text_summary)
    MLFlowLogger       images at their step (MlflowClient.log_image, the "images at a step" the
                       MLflow UI shows) and captions/step=<N>.json: {key: caption}
    CometLogger        Experiment.log_image at the step, the caption in its metadata
    CSVLogger          no pictures (a metrics table): they are the PNG files beside it
    any other          no pictures: :func:`without_pictures` names it, for one warning

A logger's ``prefix`` goes before the key as its own metrics get it: with LOGGER_JOIN_CHAR ("-"),
or "_" for Comet, which joins its prefix itself. MLflow accepts only ``[A-Za-z0-9_-./ ]`` in an
image key, so other characters (``pool@2``) become "_" there.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import (
    CometLogger,
    CSVLogger,
    Logger,
    MLFlowLogger,
    TensorBoardLogger,
    WandbLogger,
)

from fm_lightning import gallery
from fm_lightning.files import distinct_path_parts, safe_path_part, save_png
from fm_lightning.pictures import Drawn, Picture

OnError = Callable[[str, Exception], None]


@dataclass(frozen=True)
class LocalRun:
    """Where and under which epoch (and gallery title) the local copies go."""

    root: str
    epoch: int
    title: str = "feature maps"
    step: int | None = None  # the frame's step, in a fit whose validations are step-based


def publish(
    loggers: Sequence[Logger], drawn: Drawn, step: int, local: LocalRun | None, on_error: OnError
) -> None:
    """Hand ``drawn``'s pictures and scalars to every logger, then write them under
    ``local.root`` with what the gallery shows beside them (its stats, dead channels and
    similarity)."""
    pictures, scalars = drawn.pictures, drawn.scalars
    for logger in loggers:
        try:
            if isinstance(logger, WandbLogger):
                _log_wandb(logger, pictures, scalars, step)
                continue
            send = next((f for kind, f in _SENDERS.items() if isinstance(logger, kind)), None)
            if send is not None and pictures:
                send(logger, pictures, step)
            if scalars:
                logger.log_metrics(dict(scalars), step=step)
        except Exception as err:
            on_error(type(logger).__name__, err)
    if local is None:
        return
    try:
        save_pictures(local.root, pictures)
        # The gallery pairs a caption with the folder its picture is in: conv1, conv1/examples, cam.
        captions = {os.path.dirname(p.path): p.caption for p in pictures if os.path.dirname(p.path)}
        gallery.append_stats(
            local.root,
            local.epoch,
            drawn.stats,
            captions=captions,
            dead=drawn.dead,
            step=local.step,
            similarity=drawn.similarity,
        )
        gallery.write_index(local.root, title=local.title)
    except Exception as err:
        on_error("files", err)


def save_pictures(root: str | os.PathLike, pictures: Sequence[Picture]) -> list[Path]:
    """Each picture as a PNG at its path under ``root`` (atomically); returns the paths."""
    return [save_png(pic.image, os.path.join(root, pic.path)) for pic in pictures]


def layer_folders(keys: Sequence[str], warn_once: Callable[[str, str], None]) -> dict[str, str]:
    """Each layer key's own folder under the local directory: its safe name, unless another
    layer's or a reserved one (the CAM pictures' ``cam``) is the same (then ``~2``...), said once
    per layer through ``warn_once(key, message)``."""
    keys = list(dict.fromkeys(keys))
    folders = distinct_path_parts(keys, gallery.RESERVED_NAMES)
    for key, folder in folders.items():
        wanted = safe_path_part(key)
        if folder != wanted:
            other = next((k for k in keys if k != key and folders[k] == wanted), None)
            warn_once(
                f"folder:{key}",
                f"layer {key!r}'s pictures go to {folder}/, as {wanted}/ holds "
                + (f"layer {other!r}'s" if other else "the callback's own files")
                + " (with the same tag prefix in the loggers, each keeps its own name).",
            )
    return folders


def without_pictures(loggers: Sequence[Logger]) -> list[Logger]:
    """The loggers :func:`publish` hands scalars only (CSVLogger aside: its pictures are the PNGs
    written beside it)."""
    known = (WandbLogger, CSVLogger, *_SENDERS)
    return [logger for logger in loggers if not isinstance(logger, known)]


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


def _key(logger: Logger, tag: str) -> str:
    """``tag`` as ``logger`` names its own metrics: after its prefix, if it has one."""
    # Lightning keeps a logger's prefix in the private `_prefix` its log_metrics reads; there is
    # no public accessor. Comet joins it with "_" itself (Experiment._log_metrics).
    prefix = getattr(logger, "_prefix", None)
    if not prefix:
        return tag
    join = "_" if isinstance(logger, CometLogger) else getattr(logger, "LOGGER_JOIN_CHAR", "-")
    return f"{prefix}{join}{tag}"


def _log_tensorboard(logger: TensorBoardLogger, pictures: Sequence[Picture], step: int) -> None:
    from torch.utils.tensorboard.summary import image

    # add_image takes no description; TensorBoard reads it from the summary's metadata (its
    # data_compat carries summary_description over when it converts an image value), so the
    # summary is built here and written through the writer's own FileWriter. TensorBoard shows
    # one description per image series, the first step's (each caption names its epoch and
    # step), so every step's caption also goes to the Text tab (<key>/caption/text_summary).
    writer = logger.experiment
    for pic in pictures:
        key = _key(logger, pic.tag)
        summary = image(key, pic.image, dataformats="HWC")
        summary.value[0].metadata.plugin_data.plugin_name = "images"
        summary.value[0].metadata.summary_description = pic.caption
        writer._get_file_writer().add_summary(summary, step)
        if pic.caption:
            writer.add_text(f"{key}/caption", pic.caption, global_step=step)


def _log_mlflow(logger: MLFlowLogger, pictures: Sequence[Picture], step: int) -> None:
    client, run_id = logger.experiment, logger.run_id
    keys = [re.sub(r"[^A-Za-z0-9_\-./ ]", "_", _key(logger, pic.tag)) for pic in pictures]
    for key, pic in zip(keys, pictures, strict=True):
        client.log_image(run_id, np.asarray(pic.image), key=key, step=step)
    # MLflow's images have no caption: one small JSON per step keeps them, keyed like the images.
    captions = {key: pic.caption for key, pic in zip(keys, pictures, strict=True)}
    client.log_text(run_id, json.dumps(captions, indent=1), f"captions/step={step}.json")


def _log_comet(logger: CometLogger, pictures: Sequence[Picture], step: int) -> None:
    for pic in pictures:
        logger.experiment.log_image(
            np.asarray(pic.image),
            name=_key(logger, pic.tag),
            step=step,
            metadata={"caption": pic.caption},
        )


# The loggers that get pictures besides W&B (whose pictures share one row with the scalars).
_SENDERS: dict[type, Callable[[Any, Sequence[Picture], int], None]] = {
    TensorBoardLogger: _log_tensorboard,
    MLFlowLogger: _log_mlflow,
    CometLogger: _log_comet,
}


def default_local_dir(trainer: Trainer, folder: str) -> str:
    """``<save_dir>/<name>/<version>/<folder>``: beside the checkpoints, as ModelCheckpoint
    places them, so every run (W&B ones included) gets its own directory."""
    if not trainer.loggers:
        return os.path.join(trainer.default_root_dir, folder)
    logger = trainer.loggers[0]
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    save_dir = logger.save_dir or trainer.default_root_dir
    # Every rank calls setup(); rank zero's answer wins (other ranks may not know the version).
    return trainer.strategy.broadcast(os.path.join(save_dir, str(logger.name), version, folder))
