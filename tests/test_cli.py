"""train.py and configs/: every config instantiates, --help shows the flags, a smoke run."""

from __future__ import annotations

import csv
import glob
import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from PIL import Image

from fm_lightning import FeatureMapCallback, MNISTDataModule, SimpleCNN, mnist
from fm_lightning.cli import FMLightningCLI, RunConfigCallback, main

CONFIGS = sorted(glob.glob(str(REPO / "configs" / "*.yaml")))
# Configs that ask for hardware this machine may lack are instantiated on the CPU instead; their
# files are still parsed and type-checked whole.
ON_CPU = {
    "gpu.yaml": ["--trainer.accelerator=cpu", "--trainer.precision=32-true"],
    "ddp.yaml": ["--trainer.accelerator=cpu", "--trainer.devices=2"],
}


def _cli(args, tmp_path) -> FMLightningCLI:
    return FMLightningCLI([*args, f"--trainer.default_root_dir={tmp_path}"])


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


def test_saved_config_keeps_counts_counts_and_starts_a_new_run(tmp_path, monkeypatch):
    # limit_val_batches=1 is one batch, 1.0 every batch: typing may cache Trainer's
    # Union[int, float] float first, and the parsed and saved 1 then became 1.0.
    monkeypatch.chdir(tmp_path)
    debug = str(REPO / "configs" / "debug.yaml")
    cli = _cli(["--config", debug, "--trainer.limit_val_batches=1"], tmp_path)
    assert type(cli.trainer.limit_val_batches) is int and cli.trainer.limit_val_batches == 1
    assert type(cli.trainer.limit_train_batches) is int  # debug.yaml's 10
    fraction = _cli(["--config", debug, "--trainer.limit_val_batches=1.0"], tmp_path)
    assert type(fraction.trainer.limit_val_batches) is float

    (saver,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, RunConfigCallback)]
    saver.setup(cli.trainer, cli.model, stage="fit")  # what fit() does first
    saved = tmp_path / "logs" / "debug" / "version_0" / "config.yaml"
    text = saved.read_text()
    assert "  limit_val_batches: 1\n" in text and "  limit_train_batches: 10\n" in text
    # It records what was asked, not the claimed version, so running it again is a new run.
    assert "      version: null\n" in text
    again = _cli(["--config", str(saved)], tmp_path)
    assert again.trainer.logger.version == 2  # version_1 went to `fraction` above
    assert type(again.trainer.limit_val_batches) is int and again.trainer.limit_val_batches == 1


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
    pngs = sorted(glob.glob(str(run / "feature_maps" / "**" / "*.png"), recursive=True))
    # maps, top-k examples, CAM overlays and the CKA heatmap, as configs/default.yaml turns them on
    assert [os.path.relpath(p, run / "feature_maps") for p in pngs] == [
        "cam/epoch=000.png",
        "cam/epoch=001.png",
        "conv1/epoch=000.png",
        "conv1/epoch=001.png",
        "conv1/examples/epoch=000.png",
        "conv1/examples/epoch=001.png",
        "conv2/epoch=000.png",
        "conv2/epoch=001.png",
        "conv2/examples/epoch=000.png",
        "conv2/examples/epoch=001.png",
        "probe_inputs.png",
        "similarity/epoch=000.png",
        "similarity/epoch=001.png",
    ]
    for path in pngs:
        img = Image.open(path).convert("L")
        assert max(img.getextrema()) > min(img.getextrema())

    # --ckpt_path resumes that run for one more epoch, probe and all
    last = run / "checkpoints" / "last.ckpt"
    _train_debug(tmp_path, mnist_dir, "--trainer.max_epochs=3", f"--ckpt_path={last}")
    resumed = tmp_path / "logs" / "debug" / "version_1" / "feature_maps" / "conv1"
    assert [p.name for p in sorted(resumed.glob("*.png"))] == ["epoch=002.png"]
    # the CKA state came along: the resumed epoch compares with epoch 1 and with epoch 0
    with open(tmp_path / "logs" / "debug" / "version_1" / "metrics.csv") as f:
        logged = [r for r in csv.DictReader(f) if r.get("feature_similarity/conv1/to_previous")]
    assert len(logged) == 1 and logged[0]["feature_similarity/conv1/to_first"]

    # the visualizer reads the real checkpoint train.py wrote (weights only)
    from fm_lightning.visualize import main as visualize

    out = tmp_path / "vis"
    argv = ["--ckpt", str(run / "checkpoints" / "last.ckpt"), "--data-dir", mnist_dir]
    assert visualize([*argv, "--mnist-index", "0", "1", "--compare", "--out", str(out)]) == 0
    for name in ("conv1/trained.png", "conv1/untrained.png", "compare_conv2.png", "index.html"):
        assert (out / name).is_file(), name


# ---------------------------------------------------------------- bad values, concurrent runs


@pytest.mark.parametrize(
    "flag, expected",
    [
        ("--data.batch_size=0", "--data.batch_size: expected batch_size > 0, got 0"),
        ("--data.val_size=70000", "--data.val_size: expected 0 < val_size < 60000, got 70000"),
        ("--data.num_workers=-1", "--data.num_workers: expected num_workers >= 0, got -1"),
        ("--data.std=0", "--data.std: expected std > 0, got 0.0"),
        ("--model.optimizer.lr=0", "--model.optimizer.lr: expected lr > 0, got 0.0"),
        ("--model.optimizer.lr=-1e-3", "--model.optimizer.lr: expected lr > 0, got -0.001"),
        ("--model.optimizer.eps=-1", "--model.optimizer: Invalid epsilon value: -1.0"),
        ("--model.num_classes=1", "--model.num_classes: Expected argument `num_classes`"),
    ],
)
def test_out_of_range_values_are_one_error_line_and_exit_2(
    flag, expected, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(mnist, "SOURCES", ())  # should a bad value get through, no download
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(REPO / "configs" / "debug.yaml"), flag])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: {expected}")
    assert "Traceback" not in err
    assert list((tmp_path / "logs" / "debug").iterdir()) == []  # no version_0 left claimed


def test_train_py_prints_one_error_line_for_a_bad_value(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--data.batch_size=0"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert [line for line in proc.stderr.splitlines() if "error" in line.lower()] == [
        "error: --data.batch_size: expected batch_size > 0, got 0"
    ]
    assert "Traceback" not in proc.stderr


# Waits for the file argv[1] (the barrier), then runs train.py's main() with argv[2:], so that
# every process reaches the point where runs pick their directories at the same moment.
_AT_BARRIER = """
import os, sys, time
from fm_lightning.cli import main
open(sys.argv[1] + f".ready.{os.getpid()}", "w").close()
while not os.path.exists(sys.argv[1]):
    time.sleep(0.005)
main(sys.argv[2:])
"""


@pytest.mark.slow
def test_train_py_on_two_ddp_processes_exits_cleanly_with_one_run_directory(tmp_path, mnist_dir):
    # The second process re-runs train.py: it must neither claim a directory of its own nor
    # print a second summary, and both must exit 0 once their process group is torn down.
    flags = ["--trainer.strategy=ddp", "--trainer.accelerator=cpu", "--trainer.devices=2"]
    proc = _train_debug(tmp_path, mnist_dir, "--trainer.max_epochs=1", *flags)
    assert proc.stdout.count("test accuracy: ") == 1, proc.stdout
    assert os.listdir(tmp_path / "logs" / "debug") == ["version_0"]
    maps = tmp_path / "logs" / "debug" / "version_0" / "feature_maps"
    assert sorted(p.name for p in (maps / "conv2").glob("*.png")) == ["epoch=000.png"]


@pytest.mark.slow
def test_runs_started_together_get_their_own_complete_directories(tmp_path, mnist_dir):
    n = 2  # two runs released at one moment race for a directory as three do, in 2/3 the time
    barrier = tmp_path / "go"
    args = [
        "--config",
        str(REPO / "configs" / "debug.yaml"),
        f"--data.data_dir={mnist_dir}",
        "--trainer.enable_progress_bar=false",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _AT_BARRIER, str(barrier), *args],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(REPO)},  # this checkout's fm_lightning
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(n)
    ]
    try:
        while len(list(tmp_path.glob("go.ready.*"))) < n:  # all imported, all waiting
            assert all(p.poll() is None for p in procs), "a run exited before the barrier"
            time.sleep(0.05)
        barrier.touch()
        outputs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-2000:] + err[-3000:]
    printed = sorted(
        line.split()[1]
        for out, _ in outputs
        for line in out.splitlines()
        if line.startswith("metrics:")
    )
    runs = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "logs" / "debug").iterdir())
    assert runs == printed == [f"logs/debug/version_{i}" for i in range(n)]
    for run in runs:
        run = tmp_path / run
        with open(run / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        assert any(r["val/acc"] for r in rows) and any(r["test/acc"] for r in rows)
        assert "batch_size: 64" in (run / "config.yaml").read_text()
        (best, last) = sorted(p.name for p in (run / "checkpoints").iterdir())
        assert best.startswith("epoch=0-val_acc=") and last == "last.ckpt"
        assert [p.name for p in (run / "feature_maps" / "conv1").glob("*.png")] == ["epoch=000.png"]


@pytest.mark.slow
def test_wandb_run_keeps_config_yaml_in_its_own_directory(tmp_path, mnist_dir):
    # Lightning would write it to the W&B logger's save_dir, logs/, which every run shares.
    proc = _train_debug(
        tmp_path,
        mnist_dir,
        "--config",
        str(REPO / "configs" / "wandb.yaml"),
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
    )
    (run,) = (tmp_path / "logs" / "fm-lightning").iterdir()  # <project>/<W&B run id>
    assert "class_path: lightning.pytorch.loggers.WandbLogger" in (run / "config.yaml").read_text()
    assert not (tmp_path / "logs" / "config.yaml").exists()
    assert f"checkpoints:   logs/fm-lightning/{run.name}/checkpoints" in proc.stdout


# ---------------------------------------------------------------- make test and the browser tests


def test_make_test_installs_no_system_packages():
    # -n prints every command `make test` would run, without running any
    out = subprocess.run(
        ["make", "-n", "test", "VENV=/nonexistent-venv"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "pytest" in out.stdout
    for word in ("apt-get", "sudo", "dnf", "brew"):
        assert word not in out.stdout, out.stdout


@pytest.mark.parametrize("ci", ["", "true"])
def test_without_chromium_browser_tests_skip_saying_how_to_enable_them(ci, tmp_path, monkeypatch):
    from browser import chromium

    monkeypatch.setenv("PATH", str(tmp_path))  # no browser on it
    monkeypatch.delenv("CHROMIUM", raising=False)
    monkeypatch.setenv("CI", ci)
    outcome = pytest.fail.Exception if ci else pytest.skip.Exception
    with pytest.raises(outcome) as raised:
        with chromium():
            pass
    message = str(raised.value)
    assert "\n" not in message
    assert "apt-get install chromium" in message and "$CHROMIUM" in message
    assert message.startswith("no Chromium found" if ci else "browser tests skipped: no Chromium")
