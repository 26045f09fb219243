"""A quiet, truthful first run of train.py: the schedule follows the run, one directory per run,
no avoidable warnings, bounded output in files, one-line errors, the whole config in W&B."""

from __future__ import annotations

import logging
import os
import warnings

import pytest
import torch
from conftest import REPO, tiny_trainer
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from fm_lightning import FeatureMapCallback, ImageClassifier, SimpleCNN, mnist
from fm_lightning.cli import FMLightningCLI, RunConfigCallback, main
from fm_lightning.visualize import main as visualize

DEBUG = str(REPO / "configs" / "debug.yaml")


def _cli(*args: str) -> FMLightningCLI:
    return FMLightningCLI(list(args))


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and "usage:" not in err, err
    (line,) = err.strip().splitlines()
    assert line.startswith("error: ")
    return line


# ---------------------------------------------------------------- the schedule


@pytest.mark.parametrize("epochs", [3, 6, 10])
def test_cosine_schedule_ends_with_the_run(epochs, tmp_path, monkeypatch):
    # The README's `python train.py --trainer.max_epochs=3` once left T_max: 6, so the cosine
    # stopped half way, at lr 1e-3 instead of 0.
    monkeypatch.chdir(tmp_path)
    cli = _cli(f"--trainer.max_epochs={epochs}")
    scheduler = cli.model.configure_optimizers()["lr_scheduler"]
    assert scheduler.T_max == epochs
    lrs = []
    for _ in range(epochs):  # ImageClassifier's scheduler steps once per epoch
        lrs.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(0.002) and lrs[-1] > 0
    assert scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)  # the end of the run


def test_a_given_t_max_is_kept_and_config_yaml_records_null(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    given = _cli("--trainer.max_epochs=3", "--model.lr_scheduler.init_args.T_max=10")
    assert given.model.configure_optimizers()["lr_scheduler"].T_max == 10
    cli = _cli("--config", DEBUG, "--trainer.max_epochs=3")
    (saver,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, RunConfigCallback)]
    saver.setup(cli.trainer, cli.model, stage="fit")
    text = (tmp_path / "logs" / "debug" / "version_0" / "config.yaml").read_text()
    # rerun with another --trainer.max_epochs, it follows that one
    assert "      T_max: null\n" in text and "  max_epochs: 3\n" in text


def test_t_max_left_out_without_epochs_is_one_error_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["--config", DEBUG, "--trainer.max_epochs=-1", "--trainer.max_steps=100"])
    assert exit_.value.code == 2
    assert _error_line(capsys).startswith(
        "error: --model.lr_scheduler.init_args.T_max: expected a number of epochs"
    )
    assert not (tmp_path / "logs" / "debug").exists() or not os.listdir(tmp_path / "logs" / "debug")


# ---------------------------------------------------------------- one directory per run


@pytest.mark.slow
def test_readme_tensorboard_flag_writes_into_the_run_directory(tmp_path, monkeypatch, mnist_dir):
    # README: --trainer.logger+=...TensorBoardLogger --trainer.logger.save_dir=logs once put
    # the run in logs/debug/version_0 and logs/lightning_logs/version_0.
    monkeypatch.chdir(tmp_path)
    main(
        [
            "--config",
            DEBUG,
            f"--data.data_dir={mnist_dir}",
            "--trainer.logger+=lightning.pytorch.loggers.TensorBoardLogger",
            "--trainer.logger.save_dir=logs",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.enable_progress_bar=false",
        ]
    )
    assert os.listdir(tmp_path / "logs") == ["debug"]
    run = tmp_path / "logs" / "debug"
    assert os.listdir(run) == ["version_0"]
    assert (run / "version_0" / "metrics.csv").is_file()
    assert list((run / "version_0" / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "version_0" / "feature_maps" / "index.html").is_file()


def test_wandb_added_to_a_csv_run_keeps_its_files_in_the_run_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = _cli("--config", DEBUG, "--trainer.logger+=lightning.pytorch.loggers.WandbLogger")
    csv, wandb = cli.trainer.loggers
    assert isinstance(wandb, WandbLogger)
    assert wandb.save_dir == os.path.join("logs", "debug", "version_0") == csv.log_dir
    tb = _cli(
        "--config",
        DEBUG,
        "--trainer.logger+=lightning.pytorch.loggers.TensorBoardLogger",
        "--trainer.logger.save_dir=elsewhere",
    )
    assert isinstance(tb.trainer.loggers[1], TensorBoardLogger)
    assert tb.trainer.loggers[1].log_dir == os.path.join(
        "logs", "debug", "version_1", "tensorboard"
    )
    # A logger given a version of its own keeps it.
    apart = _cli(
        "--config",
        DEBUG,
        "--trainer.logger+=lightning.pytorch.loggers.TensorBoardLogger",
        "--trainer.logger.save_dir=tb",
        "--trainer.logger.version=mine",
    )
    assert apart.trainer.loggers[1].log_dir == os.path.join("tb", "lightning_logs", "mine")


# ---------------------------------------------------------------- quiet, bounded output


@pytest.mark.slow
def test_a_run_warns_nothing_and_prints_one_line_per_epoch_to_a_file(
    tmp_path, monkeypatch, mnist_dir, capsys
):
    # A run whose output is not a terminal (pytest's capture, like nohup or SLURM). Before:
    # tqdm's redraws (1.36 MB for the default run), the multiple-ModelCheckpoint warning of
    # test(ckpt_path="best") and torch's LeafSpec deprecation inside Lightning.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["train.py"])  # not pytest's: LightningCLI warns of both
    with warnings.catch_warnings(record=True) as caught:
        # Python's own filters, as `python train.py` has them, not pytest's
        warnings.resetwarnings()
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning):
            warnings.simplefilter("ignore", category)
        main(
            [
                "--config",
                DEBUG,
                f"--data.data_dir={mnist_dir}",
                "--trainer.limit_train_batches=40",
                "--trainer.log_every_n_steps=10",
            ]
        )
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []
    out = capsys.readouterr().out
    assert "\r" not in out
    epoch_lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert [line.split("  ")[:2] for line in epoch_lines] == [
        ["epoch 0 (1/2)", "40 batches"],
        ["epoch 1 (2/2)", "40 batches"],
    ]
    assert all("val/acc " in line for line in epoch_lines)
    assert len(out) < 4000, out  # the test table and the summary included


def test_typo_in_a_flag_is_one_line_with_the_closest_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--trainer.max_epocs=3"])
    assert exit_.value.code == 2
    line = _error_line(capsys)
    assert "--trainer.max_epocs=3" in line and "did you mean --trainer.max_epochs?" in line


def test_a_malformed_value_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--trainer.max_epochs=three"])
    assert exit_.value.code == 2
    assert "trainer.max_epochs" in _error_line(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without GPU")
def test_gpu_config_without_a_gpu_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(mnist, "SOURCES", ())  # nothing downloads, whatever happens
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(REPO / "configs" / "gpu.yaml")])
    assert exit_.value.code == 2
    line = _error_line(capsys)
    assert line.startswith("error: --trainer.accelerator=gpu: ") and "gpu" in line[35:], line
    assert "Pass --trainer.accelerator=auto" in line
    assert os.listdir(tmp_path / "logs" / "mnist") == []  # the claimed version given back


# ---------------------------------------------------------------- what the run says and logs


def test_callback_says_once_where_its_gallery_is(tmp_path, caplog):
    from conftest import random_loader

    lightning_logger = logging.getLogger("lightning.pytorch")  # does not propagate to root
    lightning_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
            cb = FeatureMapCallback(["conv1", "conv2"], cam="GradCAM", cam_layer="conv2")
            model = ImageClassifier(SimpleCNN())
            trainer = tiny_trainer(tmp_path, [cb], max_epochs=2)
            trainer.fit(model, random_loader(), random_loader())
    finally:
        lightning_logger.removeHandler(caplog.handler)
    lines = [r.getMessage() for r in caplog.records if "FeatureMapCallback" in r.getMessage()]
    gallery = os.path.join(cb.local_dir, "index.html")
    assert lines == [
        f"FeatureMapCallback: drawing conv1, conv2, GradCAM at conv2 every 1 epoch(s); "
        f"gallery: {gallery}"
    ]
    assert os.path.isfile(gallery)  # where it said


@pytest.mark.slow
def test_wandb_is_handed_the_whole_train_py_config(tmp_path, monkeypatch, mnist_dir):
    # Before: only Lightning's own hyperparameters, num_classes and the data module's arguments.
    monkeypatch.chdir(tmp_path)
    handed: list[dict] = []
    log_hyperparams = WandbLogger.log_hyperparams

    def recording(self, params):
        handed.append(params)
        log_hyperparams(self, params)

    monkeypatch.setattr(WandbLogger, "log_hyperparams", recording)
    main(
        [
            "--config",
            DEBUG,
            "--config",
            str(REPO / "configs" / "wandb.yaml"),
            f"--data.data_dir={mnist_dir}",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.enable_progress_bar=false",
            "--model.optimizer.lr=0.003",
        ]
    )
    (config,) = [p for p in handed if "trainer" in p]
    assert config["trainer"]["max_epochs"] == 1
    assert config["model"]["optimizer"]["class_path"] == "torch.optim.Adam"
    assert config["model"]["optimizer"]["init_args"]["lr"] == 0.003
    assert config["model"]["net"]["class_path"] == "fm_lightning.SimpleCNN"
    assert config["model"]["lr_scheduler"]["init_args"]["T_max"] == 1  # what ran
    assert config["data"]["batch_size"] == 64


# ---------------------------------------------------------------- the visualizer


@pytest.mark.parametrize(
    "model, named",
    [
        (
            "  class_path: mypkg.models.BoringModel\n  init_args:\n    hidden_dim: 64\n",
            "BoringModel",
        ),
        ("  hidden_dim: 64\n  learning_rate: 0.1\n", "hidden_dim, learning_rate"),
    ],
)
def test_visualizer_names_another_projects_checkpoint_as_such(model, named, tmp_path, capsys):
    run = tmp_path / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(f"trainer:\n  max_epochs: 3\nmodel:\n{model}")
    ckpt = run / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": {"model.weight": torch.zeros(2, 4)}, "epoch": 2}, ckpt)
    assert visualize(["--ckpt", str(ckpt), "--mnist-index", "0", "--out", str(tmp_path)]) == 2
    line = _error_line(capsys)
    assert "another project's LightningCLI run" in line and named in line
    assert "rebuilds only the models `python train.py` trains" in line
