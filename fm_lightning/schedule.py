"""When FeatureMapCallback draws: which validations are captured, and how a frame is named.

    if is_captured(trainer, every_n_epochs):   # at on_validation_start
        frame = frame_of(trainer)              # Frame(epoch=3, step=None).stem == "epoch=003"

A fit is step-based when it validates every so many training batches (an int
``val_check_interval``, ``check_val_every_n_epoch=None``) or so much time: then every validation
of a captured epoch is a frame of its own, ``step=NNNNNN``. Otherwise an epoch's last validation
is its frame, ``epoch=NNN``. Lightning has no public API for some of what this needs (which
step metrics are logged at, whether the epoch loop is done, the time interval, whether a val
dataloader is defined): those private attributes are read here only, each with a fallback or a
comment saying why.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import lightning.pytorch as pl
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.utils.data import IterableDataset, RandomSampler


def logging_step(trainer: pl.Trainer) -> int:
    """The step Lightning itself logs metrics at, so images line up with that validation's
    metrics. It differs from ``global_step`` under gradient accumulation; Lightning keeps it in a
    private counter (no public API gives it), hence the fallback."""
    return getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)


class Frame(NamedTuple):
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


def frame_of(trainer: pl.Trainer) -> Frame:
    """The frame of the validation running now."""
    by_step = trainer.state.fn == "fit" and step_based(trainer)
    return Frame(trainer.current_epoch, trainer.global_step if by_step else None)


def step_based(trainer: pl.Trainer) -> bool:
    """Whether the fit validates every so many training batches (an int ``val_check_interval``,
    ``check_val_every_n_epoch=None``) or so much time, rather than at fractions of epochs: then
    no validation need be an epoch's last one, and each is a frame of its own."""
    interval = getattr(trainer, "val_check_interval", 1.0)
    return (
        trainer.check_val_every_n_epoch is None
        or (isinstance(interval, int) and not isinstance(interval, bool))
        # a time-based val_check_interval ("00:00:10:00") is kept privately (Lightning 2.6)
        or getattr(trainer, "_val_check_time_interval", None) is not None
    )


def nothing_drawn(trainer: pl.Trainer, every_n_epochs: int) -> str | None:
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


def is_captured(trainer: pl.Trainer, every_n_epochs: int) -> bool:
    """Whether the validation starting now is drawn: in a captured epoch, every one of a
    step-based fit (see :func:`step_based`), else the epoch's last one."""
    if trainer.sanity_checking or (trainer.current_epoch + 1) % every_n_epochs != 0:
        return False
    if not trainer.training and trainer.state.fn != "fit":
        return True  # trainer.validate(): one validation, drawn
    if step_based(trainer):
        return True
    # Mid-epoch validations (a float val_check_interval < 1) are skipped: the epoch's frame
    # shows the model at the end of the epoch (or where fitting stops early). `_is_training_done`
    # (max_steps reached mid-epoch) has no public counterpart.
    loop = trainer.fit_loop.epoch_loop
    return bool(loop.batch_progress.is_last_batch or loop._is_training_done or trainer.should_stop)


def validation_inputs(trainer: pl.Trainer) -> int | None:
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


def validation_order(trainer: pl.Trainer) -> list[int] | None:
    """The dataset indices this rank's first val dataloader yields, in the order it yields them
    (its batch sampler's, as Lightning set it up: a DistributedSampler's shard under DDP), or
    None when that order is unknown or changes between epochs (an iterable dataset, a shuffling
    sampler)."""
    loaders = trainer.val_dataloaders
    loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
    if isinstance(getattr(loader, "dataset", None), IterableDataset):
        return None  # its sampler is an endless placeholder
    sampler = getattr(loader, "sampler", None)
    if sampler is None or isinstance(sampler, RandomSampler) or getattr(sampler, "shuffle", False):
        return None
    batches = getattr(loader, "batch_sampler", None)
    try:
        if batches is not None:
            return [int(i) for batch in batches for i in batch]
        return [int(i) for i in sampler]
    except (TypeError, ValueError):  # a sampler yielding something else than indices
        return None


def has_validation(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
    if trainer.limit_val_batches == 0 or not is_overridden("validation_step", pl_module):
        return False
    # The same (private) test Lightning makes before it skips its validation loop: a public
    # trainer.val_dataloaders is only set once that loop has run.
    return trainer.fit_loop.epoch_loop.val_loop._data_source.is_defined()
