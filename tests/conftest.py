"""Shared fixtures: tiny real Trainers on random data, and real MNIST for tests that need it."""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _quiet_offline_wandb(monkeypatch, tmp_path):
    # W&B never reaches the network from a test and keeps its own files inside tmp_path.
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / ".wandb-cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / ".wandb-config"))


@pytest.fixture(scope="session")
def mnist_dir() -> str:
    """A data dir holding verified MNIST (fetched once per machine; CI caches it)."""
    from fm_lightning import MNISTDataModule

    data_dir = os.environ.get("FM_DATA_DIR", str(REPO / "data"))
    MNISTDataModule(data_dir).prepare_data()
    return data_dir


def random_loader(n: int = 32, shape=(1, 28, 28), batch_size: int = 8, seed: int = 0, classes=10):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)  # (N, C, H, W)
    y = torch.randint(0, classes, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def tiny_trainer(tmp_path, callbacks, logger=None, max_epochs: int = 2, **kwargs) -> pl.Trainer:
    """A real Trainer that runs a couple of batches per epoch, quietly."""
    defaults = dict(
        default_root_dir=tmp_path,
        max_epochs=max_epochs,
        limit_train_batches=2,
        limit_val_batches=2,
        num_sanity_val_steps=1,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    defaults.update(kwargs)
    return pl.Trainer(
        callbacks=callbacks, logger=logger if logger is not None else False, **defaults
    )


def recording_wandb_logger(tmp_path) -> tuple:
    """A real offline WandbLogger whose log_metrics calls are also recorded as (metrics, step).

    The real method still does the logging, so the run's media files are written as usual; the
    record is what the callback (and Lightning) handed W&B, without parsing W&B's private files.
    """
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="fm-test")
    logged: list[tuple[dict, int | None]] = []
    log_metrics = logger.log_metrics

    def recording_log_metrics(metrics, step=None):
        logged.append((dict(metrics), step))
        log_metrics(metrics, step)

    logger.log_metrics = recording_log_metrics
    return logger, logged
