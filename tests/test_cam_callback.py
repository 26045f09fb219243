"""FeatureMapCallback(cam=...) in real Trainers: training untouched, pictures everywhere maps go.

Each test fits a small net for a few tiny epochs on random data (tests/conftest.py) with real
loggers, then reads what landed on disk, in TensorBoard's event file and in what the WandbLogger
was handed. The DDP test runs this file as a script (``python tests/test_cam_callback.py OUT``):
two CPU processes, of which only rank zero may compute the maps.
"""

from __future__ import annotations

import gc
import glob
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import random_loader, recording_wandb_logger, tiny_trainer
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fm_lightning import FeatureMapCallback, ImageClassifier, SimpleCNN
from fm_lightning.pictures.cam import CAM_HEADER_PX

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DDP_SCRIPT = os.path.join(REPO, "tests", "scripts", "ddp_fit.py")
# cam_grid draws 28x28 tiles enlarged x3 (to at least 64 px) with 2 px of padding, under a
# header of CAM_HEADER_PX naming the columns.
TILE, PAD = 84, 2


def _cam_frames(cb) -> list[str]:
    return sorted(glob.glob(os.path.join(cb.local_dir, "cam", "epoch=*.png")))


def _tiles(path, rows: int, cols: int = 3) -> np.ndarray:
    """The cam picture cut into its tiles: (rows, columns, TILE, TILE, 3) uint8."""
    img = np.asarray(Image.open(path).convert("RGB"))[CAM_HEADER_PX:]
    assert img.shape[0] > PAD + rows * (TILE + PAD) and img.shape[1] > PAD + cols * (TILE + PAD)
    return np.stack(
        [
            np.stack(
                [
                    img[PAD + r * (TILE + PAD) :][:TILE, PAD + c * (TILE + PAD) :][:, :TILE]
                    for c in range(cols)
                ]
            )
            for r in range(rows)
        ]
    )


def _messages(record, text: str) -> list[str]:
    return [str(w.message) for w in record if text in str(w.message)]


# ---------------------------------------------------------------- models


class FrozenNormNet(nn.Module):
    """A small CNN with a BatchNorm (frozen by the user) and a dropout (kept on in validation)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn(self.conv1(x))), 2)  # (N, 8, 14, 14)
        x = F.relu(self.conv2(x))  # (N, 16, 14, 14)
        return self.fc(self.drop(x.mean((2, 3))))  # (N, num_classes)


class UserModes(ImageClassifier):
    """Modes as users set them: the BatchNorm frozen in eval while training (fine-tuning), the
    dropout left in train while validating (Monte Carlo dropout). Records every forward."""

    def __init__(self) -> None:
        super().__init__(FrozenNormNet())
        self.forwards: list[dict[str, bool]] = []
        self.measuring_passes = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) > 1 and bool((x == x[:1]).all()):  # the layout measurement: copies of one row
            self.measuring_passes += 1
            return super().forward(x)
        self.forwards.append(
            dict(
                inference=x.is_inference(),
                requires_grad=x.requires_grad,
                grad_enabled=torch.is_grad_enabled(),
                training=self.training,
            )
        )
        return super().forward(x)

    def on_train_epoch_start(self) -> None:
        self.net.bn.eval()

    def on_validation_model_eval(self) -> None:
        super().on_validation_model_eval()
        self.net.drop.train()


# What the model sees in a CAM pass: an ordinary (not inference) tensor, with gradients on.
ORDINARY_WITH_GRAD = dict(inference=False, requires_grad=True, grad_enabled=True, training=False)


def _is_cam_pass(f: dict[str, bool]) -> bool:
    # Validation and the feature-map pass run without gradients, training in train mode: only
    # the CAM pass runs an eval-mode model with gradients on.
    return f["grad_enabled"] and not f["training"]


# ---------------------------------------------------------------- training state


def _hooks(model: nn.Module) -> list:
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    per_module = [
        (n, k, list(getattr(m, k).values())) for n, m in model.named_modules() for k in kinds
    ]
    module_globals = torch.nn.modules.module
    everywhere = [list(getattr(module_globals, f"_global_{k[1:]}").values()) for k in kinds]
    return per_module + everywhere


@dataclass
class State:
    grads: dict[str, torch.Tensor | None]  # the .grad objects themselves
    grad_bits: dict[str, torch.Tensor | None]  # and copies of their values
    requires_grad: dict[str, bool]
    modes: dict[str, bool]
    rng: torch.Tensor
    hooks: list


def _state(model: nn.Module) -> State:
    grads = {n: p.grad for n, p in model.named_parameters()}
    return State(
        grads=grads,
        grad_bits={n: None if g is None else g.clone() for n, g in grads.items()},
        requires_grad={n: p.requires_grad for n, p in model.named_parameters()},
        modes={n: m.training for n, m in model.named_modules()},
        rng=torch.get_rng_state(),
        hooks=_hooks(model),
    )


class Snapshot(pl.Callback):
    """Records the training state at on_validation_end. One goes before the FeatureMapCallback in
    trainer.callbacks and one after it, so between them only its on_validation_end runs."""

    def __init__(self) -> None:
        self.states: list[State] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        self.states.append(_state(pl_module))


def _assert_same(before: State, after: State) -> None:
    for name, grad in before.grads.items():
        assert after.grads[name] is grad, name  # the same .grad object ...
        if grad is not None:
            assert torch.equal(after.grads[name], before.grad_bits[name]), name  # ... same bits
    assert after.requires_grad == before.requires_grad
    assert after.modes == before.modes
    assert torch.equal(after.rng, before.rng)
    assert after.hooks == before.hooks


class StopAfterFirstMicroBatch(pl.Callback):
    """Stops fitting after the first batch of ``epoch``, as early stopping on a training metric
    does. Lightning then validates at once: with accumulate_grad_batches=2 that validation (and
    the FeatureMapCallback's capture) falls between the two micro-batches of one step."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == 0:
            trainer.should_stop = True


def _fit_accumulating(tmp_path, cam, method="GradCAM"):
    """3 epochs of 4 batches, accumulate_grad_batches=2, stopped after epoch 2's first batch."""
    torch.manual_seed(0)
    model = UserModes()
    cb = FeatureMapCallback(
        layers=["conv1"],
        cam=method if cam else None,
        cam_layer="conv2" if cam else None,
        strict=True,
    )
    before, after = Snapshot(), Snapshot()
    trainer = tiny_trainer(
        tmp_path / ("cam" if cam else "off"),
        [before, cb, after, StopAfterFirstMicroBatch(epoch=2)],
        max_epochs=3,
        limit_train_batches=4,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        accumulate_grad_batches=2,
        deterministic=True,
    )
    trainer.fit(model, random_loader(), random_loader(seed=1))
    return trainer, model, cb, before, after


def test_grads_weights_and_optimizer_untouched_by_a_capture_mid_accumulation(tmp_path):
    trainer, model, cb, before, after = _fit_accumulating(tmp_path, cam=True)
    # Two steps in each of epochs 0 and 1, none after epoch 2's first micro-batch: the last
    # capture came between the two backward passes of one step.
    assert trainer.global_step == 4
    assert [os.path.basename(p) for p in _cam_frames(cb)] == [
        f"epoch={e:03d}.png" for e in range(3)
    ]
    assert [f for f in model.forwards if _is_cam_pass(f)] == [ORDINARY_WITH_GRAD] * 3
    # conv1 and conv2: one pass finding the calls, then a shape pass and a question pass each
    assert model.measuring_passes == 1  # once per fit (both layers), not per captured epoch
    mid = before.states[-1]
    assert all(g is not None for g in mid.grads.values())  # half a step's gradients, pending
    for b, a in zip(before.states, after.states, strict=True):
        _assert_same(b, a)

    expected_trainer, expected, _, _, _ = _fit_accumulating(tmp_path, cam=False)
    for name, value in expected.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    for (name, p), q in zip(model.named_parameters(), expected.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name  # the pending micro-batch's gradient too
    adam = trainer.optimizers[0].state_dict()
    expected_adam = expected_trainer.optimizers[0].state_dict()
    assert adam["param_groups"] == expected_adam["param_groups"]
    assert adam["state"].keys() == expected_adam["state"].keys()
    for i, state in expected_adam["state"].items():
        for key, value in state.items():
            assert torch.equal(adam["state"][i][key], value), (i, key)


@pytest.mark.parametrize("method", ["GradCAM", "SmoothGradCAMpp"])
def test_modes_rng_and_hooks_restored_also_under_trainer_validate(tmp_path, method):
    """SmoothGradCAMpp draws noise; every method seeds the RNG (inside a fork) for it."""
    trainer, model, cb, before, after = _fit_accumulating(tmp_path, cam=True, method=method)
    # At on_validation_end the dropout is still in train mode (MC dropout), the rest in eval.
    assert before.states[-1].modes["net.drop"] and not before.states[-1].modes["net.bn"]
    for b, a in zip(before.states, after.states, strict=True):
        _assert_same(b, a)
    # While training, the frozen BatchNorm stayed in eval (its statistics stayed put) and the
    # rest trained, before and after the captures.
    assert not model.net.bn.training and model.net.drop.training and model.training
    assert torch.equal(model.net.bn.running_mean, torch.zeros(8))

    # trainer.validate() runs under inference mode: the batches (and the probe taken from
    # them) are inference tensors, but the CAM pass gets an ordinary copy with gradients.
    model.forwards.clear()
    validator = tiny_trainer(tmp_path / "validate", [before, cb, after], limit_val_batches=1)
    validator.validate(model, random_loader(seed=1), verbose=False)
    assert {f["inference"] for f in model.forwards if not _is_cam_pass(f)} == {True}
    cam_passes = [f for f in model.forwards if _is_cam_pass(f)]  # SmoothGradCAMpp: several
    assert cam_passes and all(f == ORDINARY_WITH_GRAD for f in cam_passes), cam_passes
    _assert_same(before.states[-1], after.states[-1])
    frame = _tiles(_cam_frames(cb)[-1], cb.num_images)
    assert frame[:, 1].std() > 5  # the maps were drawn, not a blank fallback


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc")
def test_memory_flat_over_30_captures(tmp_path):
    # Read at a few epochs only: gc.collect() and counting every live object cost more than an
    # epoch of this fit, and a leak grows from one reading to the next whichever they are.
    read_at = (1, 4, 15, 29)  # epoch 0 creates the optimizer's state

    class Reading(pl.Callback):
        def __init__(self) -> None:
            self.tensors: list[int] = []
            self.rss: list[int] = []

        def on_validation_end(self, trainer, pl_module) -> None:
            if trainer.sanity_checking or trainer.current_epoch not in read_at:
                return
            gc.collect()
            self.tensors.append(sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects()))
            with open("/proc/self/statm") as f:
                self.rss.append(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))

    cb = FeatureMapCallback(layers=["conv1"], cam="GradCAM", cam_layer="conv2", strict=True)
    reading = Reading()
    trainer = tiny_trainer(
        tmp_path, [cb, reading], max_epochs=30, limit_train_batches=1, limit_val_batches=1
    )
    trainer.fit(ImageClassifier(SimpleCNN()), random_loader(), random_loader(seed=1))
    assert len(_cam_frames(cb)) == 30 and len(reading.tensors) == len(read_at)
    growth = reading.rss[-1] - reading.rss[1]
    print(f"\nlive tensors {reading.tensors}\nRSS +{growth / 2**20:.2f} MB over captures 5-30")
    # From the second epoch on not one tensor more: a kept graph, map or result would add
    # several per capture.
    assert max(reading.tensors) == min(reading.tensors), reading.tensors
    assert growth < 8 * 2**20  # a leak of the model's activations would be ~1 MB per capture


# ---------------------------------------------------------------- where the pictures go


def test_png_rows_are_probe_images_and_columns_input_pred_true(tmp_path):
    torch.manual_seed(0)
    # Two classes, so some of the 8 probe images are classified right and some wrong.
    model = ImageClassifier(SimpleCNN(num_classes=2), num_classes=2)
    cb = FeatureMapCallback(layers=["conv1"], num_images=8, cam="GradCAM", cam_layer="conv2")
    trainer = tiny_trainer(tmp_path, [cb], max_epochs=2)
    trainer.fit(model, random_loader(classes=2), random_loader(seed=1, classes=2))

    assert [os.path.basename(p) for p in _cam_frames(cb)] == ["epoch=000.png", "epoch=001.png"]
    tiles = _tiles(_cam_frames(cb)[-1], 8).astype(int)  # drawn after the last step: these weights
    assert tiles.shape[:2] == (8, 3)
    with torch.no_grad():
        pred = model.eval()(cb.probe).argmax(1)
    right = (pred == cb.probe_targets).tolist()
    assert 0 < sum(right) < 8, right  # both kinds of rows are drawn
    for i, (image, tile) in enumerate(zip(cb.probe, tiles, strict=True)):
        grey = image[0]  # (28, 28) drawn min-max scaled, enlarged x3
        expected = ((grey - grey.min()) / (grey.max() - grey.min()) * 255).numpy()
        shown = tile[0, 1::3, 1::3]  # (28, 28, 3): one pixel per enlarged 3x3 block
        assert np.abs(shown - expected[..., None]).max() <= 1, f"row {i} is not probe image {i}"
        assert (np.ptp(tile[1], axis=-1) > 10).mean() > 0.5, f"row {i}: no colour map over it"
        # the true class's map where wrong, else the other class's (the runner-up): never flat
        assert tile[2].std() > 1, f"row {i}: no second map"
        assert not np.array_equal(tile[2], tile[1]), f"row {i}: the predicted map again"


def test_tensorboard_event_file_holds_class_activation_images(tmp_path):
    cb = FeatureMapCallback(layers=["conv1"], cam="GradCAM", cam_layer="conv2")
    trainer = tiny_trainer(tmp_path, [cb], TensorBoardLogger(tmp_path, name="tb"), max_epochs=2)
    trainer.fit(ImageClassifier(SimpleCNN()), random_loader(), random_loader(seed=1))
    acc = EventAccumulator(trainer.logger.log_dir, size_guidance={"images": 0})
    acc.Reload()
    assert "class_activation/conv2" in acc.Tags()["images"]
    cams, maps = acc.Images("class_activation/conv2"), acc.Images("feature_maps/conv1")
    assert [e.step for e in cams] == [e.step for e in maps] and len(cams) == 2
    first = np.asarray(Image.open(_cam_frames(cb)[0]).convert("RGB"))
    assert (cams[0].height, cams[0].width) == first.shape[:2]


def test_wandb_gets_captioned_images_on_the_validation_step_and_the_gif(tmp_path):
    import wandb

    logger, logged = recording_wandb_logger(tmp_path)  # (metrics, step) of every log_metrics
    torch.manual_seed(0)
    model = ImageClassifier(SimpleCNN())
    cb = FeatureMapCallback(layers=["conv1"], num_images=3, cam="GradCAM", cam_layer="conv2")
    tiny_trainer(tmp_path, [cb], logger, max_epochs=3).fit(
        model, random_loader(), random_loader(seed=1)
    )
    logger.experiment.finish()

    val_steps = [step for metrics, step in logged if "val/acc" in metrics]
    rows = [(m, step) for m, step in logged if "class_activation/conv2" in m]
    assert len(val_steps) == 3 and [step for _, step in rows] == val_steps
    for metrics, _ in rows:
        image = metrics["class_activation/conv2"]
        assert isinstance(image, wandb.Image)
        assert np.asarray(image.image.convert("RGB")).std() > 5
    # The last picture was drawn with the final weights: its caption is their predictions.
    with torch.no_grad():
        probs = model.eval()(cb.probe).softmax(1)
    top2 = probs.topk(2, dim=1)
    expected = "; ".join(
        f"{i}: pred {p} (p={q:.2f}), true {t}"
        + (" WRONG" if p != t else f", runner-up {r} (p={rq:.2f})")
        for i, (p, q, t, r, rq) in enumerate(
            zip(
                top2.indices[:, 0].tolist(),
                top2.values[:, 0].tolist(),
                cb.probe_targets.tolist(),
                top2.indices[:, 1].tolist(),
                top2.values[:, 1].tolist(),
                strict=True,
            ),
            start=1,
        )
    )
    (caption,) = wandb.Image.all_captions([rows[-1][0]["class_activation/conv2"]])
    assert caption == (
        "epoch 2: GradCAM on conv2; columns: input, predicted, second (the true class if the "
        "prediction is wrong, else the runner-up). " + expected
    )
    videos = [m for m, _ in logged if "class_activation_evolution/cam" in m]
    assert len(videos) == 1 and isinstance(videos[0]["class_activation_evolution/cam"], wandb.Video)


def test_gallery_row_and_gif_follow_the_epochs(tmp_path):
    cb = FeatureMapCallback(layers=["conv1"], cam="GradCAM", cam_layer="conv2")
    tiny_trainer(tmp_path, [cb], max_epochs=3).fit(
        ImageClassifier(SimpleCNN()), random_loader(), random_loader(seed=1)
    )
    page = open(os.path.join(cb.local_dir, "index.html")).read()
    match = re.search(r'<script type="application/json" id="manifest">(.*?)</script>', page, re.S)
    rows = {row["name"]: row for row in json.loads(match.group(1))["layers"]}
    assert list(rows) == ["conv1", "cam"]
    assert rows["cam"]["src"] == [f"cam/epoch%3D{e:03d}.png" for e in range(3)]
    assert [c.split(":")[0] for c in rows["cam"]["caption"]] == ["epoch 0", "epoch 1", "epoch 2"]
    with Image.open(os.path.join(cb.local_dir, "cam", "evolution.gif")) as gif:
        assert gif.n_frames == 3


# ---------------------------------------------------------------- where the true classes come from


class DictBatchClassifier(ImageClassifier):
    def training_step(self, batch, batch_idx):
        return super().training_step((batch["image"], batch["labels"]), batch_idx)

    def validation_step(self, batch, batch_idx):
        return super().validation_step((batch["image"], batch["labels"]), batch_idx)


class NestedLabelClassifier(ImageClassifier):
    """Batches (x, {"digit": y}): the class is in the second element, but not as a tensor."""

    def training_step(self, batch, batch_idx):
        return super().training_step((batch[0], batch[1]["digit"]), batch_idx)

    def validation_step(self, batch, batch_idx):
        return super().validation_step((batch[0], batch[1]["digit"]), batch_idx)


class UnlabelledClassifier(ImageClassifier):
    """Batches (x,) without labels: trained to be confident, whatever the class."""

    def training_step(self, batch, batch_idx):
        return -self(batch[0]).log_softmax(1).amax(1).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/confidence", self(batch[0]).softmax(1).amax(1).mean())


def _labelled(kind: str, seed: int) -> DataLoader:
    x, y = random_loader(seed=seed).dataset.tensors  # (32, 1, 28, 28), (32,)
    if kind == "dict":
        return DataLoader(
            [{"image": a, "labels": b} for a, b in zip(x, y, strict=True)], batch_size=8
        )
    if kind == "target_fn":
        return DataLoader([(a, {"digit": b}) for a, b in zip(x, y, strict=True)], batch_size=8)
    if kind == "none":
        return DataLoader(TensorDataset(x), batch_size=8)
    return DataLoader(TensorDataset(x, y), batch_size=8)


@pytest.mark.parametrize(
    "kind, module, kwargs",
    [
        ("tuple", ImageClassifier, {}),
        ("dict", DictBatchClassifier, {}),
        ("target_fn", NestedLabelClassifier, dict(target_fn=lambda batch: batch[1]["digit"])),
        ("none", UnlabelledClassifier, {}),
    ],
)
def test_true_classes_from_tuples_dicts_or_target_fn_and_none_without(
    tmp_path, kind, module, kwargs
):
    cb = FeatureMapCallback(
        layers=["conv1"], cam="GradCAM", cam_layer="conv2", strict=True, **kwargs
    )
    tiny_trainer(tmp_path, [cb], max_epochs=1).fit(
        module(SimpleCNN()), _labelled(kind, 0), _labelled(kind, 1)
    )
    assert _tiles(_cam_frames(cb)[0], 4).shape[:2] == (4, 3)  # the runner-up's map, if no labels
    if kind == "none":
        assert cb.probe_targets is None
    else:
        _, labels = random_loader(seed=1).dataset.tensors
        assert torch.equal(cb.probe_targets, labels[:4])


def test_resumed_run_keeps_the_probe_and_its_true_classes(tmp_path):
    cb = FeatureMapCallback(layers=["conv1"], cam="GradCAM", cam_layer="conv2", strict=True)
    first = tiny_trainer(tmp_path, [cb], max_epochs=1)
    first.fit(ImageClassifier(SimpleCNN()), random_loader(), random_loader(seed=1))
    first.save_checkpoint(tmp_path / "last.ckpt")

    resumed = FeatureMapCallback(layers=["conv1"], cam="GradCAM", cam_layer="conv2", strict=True)
    # Other validation data on resume: the probe and its classes come from the checkpoint.
    tiny_trainer(tmp_path, [resumed], max_epochs=2).fit(
        ImageClassifier(SimpleCNN()),
        random_loader(),
        random_loader(seed=2),
        ckpt_path=tmp_path / "last.ckpt",
    )
    assert torch.equal(resumed.probe, cb.probe)
    assert torch.equal(resumed.probe_targets, cb.probe_targets)
    assert not torch.equal(resumed.probe_targets, random_loader(seed=2).dataset.tensors[1][:4])
    assert os.path.basename(_cam_frames(resumed)[-1]) == "epoch=001.png"
    assert _tiles(_cam_frames(resumed)[-1], 4).shape[:2] == (4, 3)


def test_target_fn_returning_no_classes_is_reported(tmp_path):
    cb = FeatureMapCallback(
        layers=["conv1"], cam="GradCAM", target_fn=lambda batch: batch[1].float(), strict=True
    )
    with pytest.raises(TypeError, match=r"expected target_fn to return \(8,\) integer classes"):
        tiny_trainer(tmp_path, [cb], max_epochs=1).fit(
            ImageClassifier(SimpleCNN()), random_loader(), random_loader(seed=1)
        )


# ---------------------------------------------------------------- failures


def test_unknown_cam_method_or_layer_fails_at_construction_or_fit_start(tmp_path):
    with pytest.raises(ValueError, match=r"expected a CAM method.*got 'GradKam'.*'GradCAM'\?"):
        FeatureMapCallback(layers=["conv1"], cam="GradKam")
    # names in any case, ++ for pp: kept as torchcam spells them
    assert FeatureMapCallback(layers=["conv1"], cam="gradcam").cam == "GradCAM"
    assert FeatureMapCallback(layers=["conv1"], cam="GradCAM++").cam == "GradCAMpp"
    assert FeatureMapCallback(layers=["conv1"], cam="scorecam").cam == "ScoreCAM"
    # a cam_layer without cam (even misspelt) is refused, not silently ignored
    for layer in ("conv2", "conv9"):
        with pytest.raises(
            ValueError, match=rf"expected `cam`.*with `cam_layer`, got cam_layer='{layer}'"
        ):
            FeatureMapCallback(layers=["conv1"], cam_layer=layer)
    cb = FeatureMapCallback(layers=["conv1"], cam="GradCAM", cam_layer="conv9")
    with pytest.raises(ValueError, match="conv9"):
        tiny_trainer(tmp_path, [cb]).fit(
            ImageClassifier(SimpleCNN()), random_loader(), random_loader(seed=1)
        )


@dataclass
class Output:  # the shape of a HuggingFace ModelOutput
    logits: torch.Tensor


class DataclassNet(SimpleCNN):
    def forward(self, x: torch.Tensor) -> Output:
        return Output(logits=super().forward(x))


class DataclassClassifier(ImageClassifier):
    """forward returns Output(logits=...), as HuggingFace models do."""

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]).logits, batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", F.cross_entropy(self(batch[0]).logits, batch[1]))


class DictInputClassifier(ImageClassifier):
    """Called with a dict of inputs: model(**{"pixels": x})."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(pixels=batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", F.cross_entropy(self(pixels=batch[0]), batch[1]))


@pytest.mark.parametrize(
    "module, net, kwargs, error, message",
    [
        (
            DataclassClassifier,
            DataclassNet,
            {},
            ValueError,
            "expected model(inputs) to return (4, num_classes)",
        ),
        (
            DictInputClassifier,
            SimpleCNN,
            dict(input_fn=lambda batch: {"pixels": batch[0]}),
            RuntimeError,
            "cam needs a model called with one (N, C, H, W) tensor, got dict",
        ),
    ],
)
def test_models_cam_cannot_read_warn_once_and_strict_raises(
    tmp_path, module, net, kwargs, error, message
):
    cb = FeatureMapCallback(layers=["conv1"], cam="GradCAM", cam_layer="conv2", **kwargs)
    with pytest.warns(UserWarning) as record:
        trainer = tiny_trainer(tmp_path, [cb], max_epochs=3)
        trainer.fit(module(net()), random_loader(), random_loader(seed=1))
    assert len(_messages(record, message)) == 1  # once, not once per epoch
    assert trainer.current_epoch == 3 and not _cam_frames(cb)
    assert len(glob.glob(os.path.join(cb.local_dir, "conv1", "epoch=*.png"))) == 3  # maps go on

    strict = FeatureMapCallback(
        layers=["conv1"], cam="GradCAM", cam_layer="conv2", strict=True, **kwargs
    )
    with pytest.raises(error, match=re.escape(message)):
        tiny_trainer(tmp_path / "strict", [strict], max_epochs=1).fit(
            module(net()), random_loader(), random_loader(seed=1)
        )


# ---------------------------------------------------------------- DDP (a subprocess)


@pytest.mark.slow
def test_ddp_two_cpu_processes_draw_one_set_of_cam_images(tmp_path):
    # This checkout's fm_lightning, whatever copy the environment has installed.
    path = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, DDP_SCRIPT, str(tmp_path), "--cam", "GradCAM"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=300,  # a rank left waiting in a collective would hang here
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = dict(
        line.split(" ", 1) for line in proc.stdout.splitlines() if line.startswith("rank=")
    )
    assert ranks.keys() == {"rank=0", "rank=1"}
    fields = {rank: dict(f.split("=", 1) for f in rest.split(" ")) for rank, rest in ranks.items()}
    # Only rank zero ran the CAM, once per epoch; rank one drew with the same probe and labels.
    assert fields["rank=0"].pop("cam_passes") == "2"
    assert fields["rank=1"].pop("cam_passes") == "0"
    assert fields["rank=0"] == fields["rank=1"] and fields["rank=0"]["probe_sum"] != "none"
    names = sorted(os.listdir(tmp_path / "maps" / "cam"))
    assert names == ["epoch=000.png", "epoch=001.png", "evolution.gif"]
    acc = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"images": 0})
    acc.Reload()
    assert len(acc.Images("class_activation/conv2")) == 2  # exactly one per captured epoch
