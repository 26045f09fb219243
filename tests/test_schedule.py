"""When FeatureMapCallback draws: every fit with a validation loop draws, real Trainers only.

Epoch-based fits (``val_check_interval`` a float, the default 1.0) draw the last validation of
each captured epoch as ``epoch=N`` frames. Step-based fits (an int ``val_check_interval``,
``check_val_every_n_epoch=None``, or a time interval) draw every validation of a captured epoch
as a ``step=N`` frame, N the logging step: files, examples, CAM, gallery, GIFs and loggers.
"""

from __future__ import annotations

import json
import re
import warnings

import pytest
from conftest import random_loader, tiny_trainer
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fm_lightning import FeatureMapCallback, ImageClassifier, SimpleCNN


def _fit(tmp_path, cb, logger=None, **kwargs):
    trainer = tiny_trainer(tmp_path, [cb], logger, **kwargs)
    trainer.fit(ImageClassifier(SimpleCNN()), random_loader(), random_loader(seed=1))
    return trainer


def _frames(root, folder) -> list[str]:
    return sorted(p.name for p in (root / folder).glob("*.png"))


def _manifest(root) -> dict:
    text = (root / "index.html").read_text()
    match = re.search(r'<script type="application/json" id="manifest">(.*?)</script>', text, re.S)
    return json.loads(match.group(1))


def _tensorboard_steps(trainer, tag) -> list[int]:
    acc = EventAccumulator(trainer.logger.log_dir, size_guidance={"images": 0})
    acc.Reload()
    return [event.step for event in acc.Images(tag)]


def test_int_val_check_interval_off_the_epoch_end_draws_every_validation_by_its_step(tmp_path):
    # 4 training batches, a validation after the 3rd of each epoch: never an epoch's last batch
    cb = FeatureMapCallback(
        layers=["conv1"],
        examples=2,
        cam="GradCAM",
        cam_layer="conv2",
        save_dir=str(tmp_path / "maps"),
    )
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = _fit(tmp_path, cb, logger, limit_train_batches=4, val_check_interval=3)
    root = tmp_path / "maps"
    steps = ["step=000003.png", "step=000007.png"]
    assert _frames(root, "conv1") == steps
    assert _frames(root, "conv1/examples") == steps
    assert _frames(root, "cam") == steps
    # the loggers get each validation's pictures at the step its metrics are logged at
    assert _tensorboard_steps(trainer, "feature_maps/conv1") == [2, 6]
    assert _tensorboard_steps(trainer, "class_activation/conv2") == [2, 6]
    acc = EventAccumulator(trainer.logger.log_dir)
    acc.Reload()
    assert [e.step for e in acc.Scalars("val/loss")] == [2, 6]

    manifest = _manifest(root)
    assert [s["label"] for s in manifest["steps"]] == ["step 3", "step 7"]
    rows = {row["name"]: row for row in manifest["layers"]}
    assert rows["conv1"]["caption"][1].startswith("step 7 (epoch 1), channels")
    assert rows["conv1"]["examples"]["caption"][0].startswith("step 3 (epoch 0): top 2")
    assert rows["cam"]["caption"][1].startswith("step 7 (epoch 1): GradCAM on conv2")
    assert set(rows["conv1"]["stats"]) >= {"mean", "std"}
    assert all(v is not None for v in rows["conv1"]["stats"]["mean"])  # each step its own
    history = json.loads((root / "stats.json").read_text())["history"]
    assert [(h["epoch"], h["step"]) for h in history] == [(0, 3), (1, 7)]

    with Image.open(root / "conv1" / "evolution.gif") as gif:
        assert gif.n_frames == 2


def test_iteration_based_training_draws_each_validation_across_epochs(tmp_path):
    cb = FeatureMapCallback(layers=["conv1"], save_dir=str(tmp_path / "maps"))
    trainer = _fit(
        tmp_path,
        cb,
        max_epochs=-1,
        max_steps=6,
        limit_train_batches=4,
        check_val_every_n_epoch=None,
        val_check_interval=2,
    )
    assert trainer.global_step == 6  # 4 batches in epoch 0, 2 in epoch 1
    assert _frames(tmp_path / "maps", "conv1") == [
        "step=000002.png",
        "step=000004.png",
        "step=000006.png",
    ]


def test_every_n_epochs_keeps_its_meaning_in_a_step_based_fit(tmp_path):
    cb = FeatureMapCallback(layers=["conv1"], every_n_epochs=2, save_dir=str(tmp_path / "maps"))
    _fit(tmp_path, cb, max_epochs=2, limit_train_batches=4, val_check_interval=2)
    # validations at steps 2, 4 (epoch 0) and 6, 8 (epoch 1): epoch 1's are drawn
    assert _frames(tmp_path / "maps", "conv1") == ["step=000006.png", "step=000008.png"]


def test_epoch_based_fits_keep_one_frame_per_epoch(tmp_path):
    cb = FeatureMapCallback(layers=["conv1"], save_dir=str(tmp_path / "maps"))
    _fit(tmp_path, cb, limit_train_batches=4, val_check_interval=0.5)  # two validations an epoch
    assert _frames(tmp_path / "maps", "conv1") == ["epoch=000.png", "epoch=001.png"]


@pytest.mark.parametrize(
    "cb_args, trainer_args, why",
    [
        (
            {"every_n_epochs": 3},
            {"max_epochs": 2},
            "every_n_epochs=3 with check_val_every_n_epoch=1 first draws at epoch 2, after "
            "max_epochs=2",
        ),
        (
            {"every_n_epochs": 2},
            {"max_epochs": 5, "check_val_every_n_epoch": 3},
            "first draws at epoch 5, after max_epochs=5",
        ),
        (
            {},
            {"max_epochs": -1, "max_steps": 4, "check_val_every_n_epoch": None},
            "val_check_interval=10 training batches is more than the fit's max_steps=4",
        ),
    ],
    ids=["epochs", "lcm", "steps"],
)
def test_a_fit_that_can_draw_nothing_says_so_once(tmp_path, cb_args, trainer_args, why):
    cb = FeatureMapCallback(layers=["conv1"], save_dir=str(tmp_path / "maps"), **cb_args)
    if trainer_args.get("check_val_every_n_epoch", 1) is None:
        trainer_args["val_check_interval"] = 10
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _fit(tmp_path, cb, limit_train_batches=2, **trainer_args)
    said = [str(w.message) for w in record if "nothing will be drawn" in str(w.message)]
    assert len(said) == 1 and why in said[0], said
    assert not (tmp_path / "maps" / "conv1").exists()


def test_a_fit_that_draws_does_not_warn(tmp_path):
    cb = FeatureMapCallback(layers=["conv1"], every_n_epochs=2, save_dir=str(tmp_path / "maps"))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _fit(tmp_path, cb, max_epochs=2)
    assert not [w for w in record if "nothing will be drawn" in str(w.message)]
    assert _frames(tmp_path / "maps", "conv1") == ["epoch=001.png"]
