"""Progress as one line per epoch, for output that is a file rather than a terminal.

    python train.py > run.log 2>&1          # train.py uses it when stdout is not a terminal
    lightning.Trainer(callbacks=[EpochLinesProgressBar()])

A tqdm bar redraws itself after every batch with a carriage return: in a terminal that rewrites
one line, in a file (nohup, SLURM, CI logs) every redraw stays, 1.35 MB for the default 6-epoch
run. This bar prints one line when a training epoch ends (its batches, the progress-bar metrics
such as ``val/acc``, and its time), and inside an epoch at most one line per ``interval``
seconds, so a log grows with the run's epochs and minutes, not with its batches.
"""

from __future__ import annotations

import math
import time

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar
from typing_extensions import override


class EpochLinesProgressBar(ProgressBar):
    """Lightning's progress bar interface, printing plain lines instead of redrawing a bar.

    Args:
        interval: seconds between lines inside a training epoch (the epoch's own line is always
            printed); ``math.inf`` for epoch lines only.
    """

    def __init__(self, interval: float = 60.0) -> None:
        super().__init__()
        if isinstance(interval, bool) or not isinstance(interval, int | float) or interval <= 0:
            raise ValueError(f"expected `interval` to be seconds > 0, got {interval!r}")
        self.interval = interval
        self._enabled = True
        self._epoch_start = self._last_line = 0.0

    @override
    def disable(self) -> None:
        self._enabled = False

    @override
    def enable(self) -> None:
        self._enabled = True

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = self._last_line = time.monotonic()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        now = time.monotonic()
        if self._enabled and now - self._last_line >= self.interval:
            self._last_line = now
            self._line(trainer, pl_module, f"{batch_idx + 1}/{self._total(trainer)} batches")

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._enabled:
            self._line(trainer, pl_module, f"{self._total(trainer)} batches")

    def _total(self, trainer: pl.Trainer) -> str:
        total = trainer.num_training_batches
        return str(total) if math.isfinite(total) else "?"

    def _line(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: str) -> None:
        # Lightning's 0-based epoch, as in the checkpoint and PNG names, then the count
        of_max = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        parts = [f"epoch {trainer.current_epoch} ({trainer.current_epoch + 1}{of_max})", batches]
        for key, value in self.get_metrics(trainer, pl_module).items():
            if key != "v_num":  # the logger's version, already in the run directory's name
                parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
        parts.append(f"{time.monotonic() - self._epoch_start:.1f} s")
        print("  ".join(parts), flush=True)
