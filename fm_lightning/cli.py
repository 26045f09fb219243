"""The command line behind ``python train.py``: fit, test the best checkpoint, say where things are.

    python train.py                                   # configs/default.yaml: SimpleCNN on MNIST
    python train.py --config configs/debug.yaml       # a seconds-long smoke run
    python train.py --config configs/wandb.yaml       # W&B, offline when no API key is set
    python train.py --trainer.max_epochs=3 --data.batch_size=128
    python train.py --trainer.callbacks+=lightning.pytorch.callbacks.EarlyStopping \
        --trainer.callbacks.monitor=val/loss
    python train.py --help

It is a plain LightningCLI (``run=False``), so every Trainer, model and data argument is a flag,
``--config`` takes YAML files (later ones override earlier ones) and callbacks or loggers are
added by class path.
"""

from __future__ import annotations

import netrc
import os
from collections.abc import Sequence
from pathlib import Path

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import WandbLogger

from fm_lightning.callbacks import FeatureMapCallback
from fm_lightning.data import MNISTDataModule
from fm_lightning.models import ImageClassifier

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


class FMLightningCLI(LightningCLI):
    """LightningCLI for ImageClassifier + MNISTDataModule that turns W&B offline without a key."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--ckpt_path",
            type=str | None,
            default=None,
            help="resume fitting from this checkpoint (a last.ckpt under logs/)",
        )

    def before_instantiate_classes(self) -> None:
        loggers = self.config.get("trainer.logger")
        loggers = loggers if isinstance(loggers, list) else [loggers]
        uses_wandb = any("WandbLogger" in str(getattr(lg, "class_path", "")) for lg in loggers)
        if uses_wandb and "WANDB_MODE" not in os.environ and not _wandb_key_available():
            # No account on this machine: write the run locally, upload later with `wandb sync`.
            os.environ["WANDB_MODE"] = "offline"


def _wandb_key_available() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def main(args: Sequence[str] | None = None, default_config: Path | None = DEFAULT_CONFIG) -> dict:
    """Fit, then test the best checkpoint; returns the test metrics. ``args`` default to argv."""
    parser_kwargs = {"default_config_files": [str(default_config)]} if default_config else {}
    cli = FMLightningCLI(
        ImageClassifier,
        MNISTDataModule,
        seed_everything_default=42,
        parser_kwargs=parser_kwargs,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,  # the optimizer is a --model.optimizer argument
        run=False,
        args=args,
    )
    trainer = cli.trainer
    trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.ckpt_path)
    # The best checkpoint when one was saved; the weights in memory otherwise (e.g. debug runs).
    ckpt = (
        "best"
        if trainer.checkpoint_callback and trainer.checkpoint_callback.best_model_path
        else None
    )
    metrics = trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt)[0]
    if trainer.is_global_zero:
        _print_summary(trainer, metrics)
    return metrics


def _print_summary(trainer, metrics: dict) -> None:
    lines = [f"test accuracy: {metrics.get('test/acc', float('nan')):.4f}"]
    if trainer.checkpoint_callback and trainer.checkpoint_callback.dirpath:
        best = trainer.checkpoint_callback.best_model_path or "(none saved)"
        lines.append(f"checkpoints:   {trainer.checkpoint_callback.dirpath}  (best: {best})")
    for cb in trainer.callbacks:
        if isinstance(cb, FeatureMapCallback) and cb.local_dir:
            lines.append(f"feature maps:  {cb.local_dir}")
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            run_dir = os.path.dirname(logger.experiment.dir)  # .../wandb/<run>/files -> .../<run>
            lines.append(f"W&B run:       {run_dir}  (feature maps under feature_maps/*)")
            if os.environ.get("WANDB_MODE") == "offline":
                lines.append(f"upload it:     wandb sync {run_dir}")
        elif getattr(logger, "log_dir", None):  # MLflow, Comet... have none
            lines.append(f"metrics:       {logger.log_dir}")
    print("\n" + "\n".join(lines))
