"""train.py and configs/: every config instantiates, --help shows the flags, a smoke run."""

from __future__ import annotations

import csv
import glob
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from PIL import Image

from fm_lightning import FeatureMapCallback, ImageClassifier, MNISTDataModule, SimpleCNN
from fm_lightning.cli import FMLightningCLI

CONFIGS = sorted(glob.glob(str(REPO / "configs" / "*.yaml")))
# Configs that ask for hardware this machine may lack are instantiated on the CPU instead; their
# files are still parsed and type-checked whole.
ON_CPU = {
    "gpu.yaml": ["--trainer.accelerator=cpu", "--trainer.precision=32-true"],
    "ddp.yaml": ["--trainer.accelerator=cpu", "--trainer.devices=2"],
}


def _cli(args, tmp_path) -> FMLightningCLI:
    return FMLightningCLI(
        ImageClassifier,
        MNISTDataModule,
        seed_everything_default=42,
        parser_kwargs={"default_config_files": [str(REPO / "configs" / "default.yaml")]},
        auto_configure_optimizers=False,
        run=False,
        args=[*args, f"--trainer.default_root_dir={tmp_path}"],
    )


def test_configs_exist():
    assert {os.path.basename(c) for c in CONFIGS} == {
        "default.yaml",
        "debug.yaml",
        "wandb.yaml",
        "gpu.yaml",
        "ddp.yaml",
    }


@pytest.mark.parametrize("config", CONFIGS, ids=os.path.basename)
def test_every_config_instantiates(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # loggers create their directories relative to the cwd
    name = os.path.basename(config)
    needs_hw = name == "gpu.yaml" and not torch.cuda.is_available() or name == "ddp.yaml"
    cli = _cli(["--config", config, *(ON_CPU.get(name, []) if needs_hw else [])], tmp_path)
    assert isinstance(cli.model.net, SimpleCNN)
    assert isinstance(cli.datamodule, MNISTDataModule)
    assert any(isinstance(cb, FeatureMapCallback) for cb in cli.trainer.callbacks)
    assert any(isinstance(cb, ModelCheckpoint) for cb in cli.trainer.callbacks)
    optimizer = cli.model.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    assert isinstance(optimizer, torch.optim.Adam)
    if name == "wandb.yaml":
        assert isinstance(cli.trainer.logger, WandbLogger)
    if name in ("default.yaml", "debug.yaml"):
        assert isinstance(cli.trainer.logger, CSVLogger)
    if name == "ddp.yaml":
        assert cli.trainer.world_size == 2 and "ddp" in type(cli.trainer.strategy).__name__.lower()


def test_cli_turns_wandb_offline_without_a_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    _cli(["--config", str(REPO / "configs" / "wandb.yaml")], tmp_path)
    assert os.environ["WANDB_MODE"] == "offline"


def test_help_documents_every_flag():
    out = subprocess.run(
        [sys.executable, "train.py", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    for flag in (
        "--config",
        "--trainer.max_epochs",
        "--trainer.callbacks",
        "--trainer.logger",
        "--model.net",
        "--model.optimizer",
        "--model.lr_scheduler",
        "--data.data_dir",
        "--data.batch_size",
        "--data.val_size",
        "--seed_everything",
    ):
        assert flag in out.stdout, flag


def _train_debug(cwd, mnist_dir, *flags) -> subprocess.CompletedProcess:
    """`python train.py --config configs/debug.yaml ...` in ``cwd``; fails the test if it fails."""
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "train.py"),
            "--config",
            str(REPO / "configs" / "debug.yaml"),
            f"--data.data_dir={mnist_dir}",
            "--trainer.enable_progress_bar=false",
            *flags,
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_train_py_smoke_run_leaves_metrics_checkpoint_and_maps(tmp_path, mnist_dir):
    proc = _train_debug(tmp_path, mnist_dir)
    run = tmp_path / "logs" / "debug" / "version_0"
    assert "test accuracy: " in proc.stdout
    assert "feature maps:  logs/debug/version_0/feature_maps" in proc.stdout
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert any(r["val/acc"] for r in rows) and any(r["test/acc"] for r in rows)
    # train/loss is logged on exactly the steps the logger writes (log_every_n_steps: 5)
    assert [int(r["step"]) for r in rows if r["train/loss"]] == [4, 9, 14, 19]
    assert glob.glob(str(run / "checkpoints" / "*.ckpt"))
    pngs = sorted(glob.glob(str(run / "feature_maps" / "*" / "*.png")))
    assert [os.path.relpath(p, run / "feature_maps") for p in pngs] == [
        "conv1/epoch=000.png",
        "conv1/epoch=001.png",
        "conv2/epoch=000.png",
        "conv2/epoch=001.png",
    ]
    for path in pngs:
        img = Image.open(path).convert("L")
        assert max(img.getextrema()) > min(img.getextrema())

    # --ckpt_path resumes that run for one more epoch, probe and all
    last = run / "checkpoints" / "last.ckpt"
    _train_debug(tmp_path, mnist_dir, "--trainer.max_epochs=3", f"--ckpt_path={last}")
    resumed = tmp_path / "logs" / "debug" / "version_1" / "feature_maps" / "conv1"
    assert [p.name for p in sorted(resumed.glob("*.png"))] == ["epoch=002.png"]

    # the visualizer reads the real checkpoint train.py wrote (weights only)
    from fm_lightning.visualize import main as visualize

    out = tmp_path / "vis"
    argv = ["--ckpt", str(run / "checkpoints" / "last.ckpt"), "--data-dir", mnist_dir]
    assert visualize([*argv, "--mnist-index", "0", "1", "--compare", "--out", str(out)]) == 0
    for name in ("conv1/trained.png", "conv1/untrained.png", "compare_conv2.png", "index.html"):
        assert (out / name).is_file(), name
