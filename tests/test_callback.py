"""FeatureMapCallback with real Trainers, loggers and files (random data, seconds each)."""

from __future__ import annotations

import csv
import glob
import json
import os
import subprocess
import sys
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import random_loader, recording_wandb_logger, tiny_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from fm_lightning import FeatureMapCallback, ImageClassifier, SimpleCNN, rendering
from fm_lightning.capture import forward_hooks, resolve_layers
from fm_lightning.pictures.cam import CAM_HEADER_PX
from fm_lightning.pictures.maps import ranges


def _pngs(root) -> list[str]:
    return sorted(glob.glob(os.path.join(str(root), "**", "*.png"), recursive=True))


def _assert_not_blank(path) -> np.ndarray:
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.ndim == 3 and img.shape[2] == 3
    assert img.std() > 5, f"{path} looks blank (std {img.std():.2f})"
    return img


def _fit(tmp_path, cb, logger=None, model=None, train=None, val=None, **kwargs):
    model = model if model is not None else ImageClassifier(SimpleCNN())
    trainer = tiny_trainer(tmp_path, [cb, *kwargs.pop("extra_callbacks", [])], logger, **kwargs)
    trainer.fit(
        model,
        train if train is not None else random_loader(),
        val if val is not None else random_loader(seed=1),
    )
    return trainer, model


# ---------------------------------------------------------------- constructor and layer names


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(layers=[]), "expected `layers`"),
        (dict(layers=["conv1", 3]), "expected `layers`"),
        (
            dict(layers="conv1", every_n_epochs=0),
            "expected `every_n_epochs` to be an int >= 1, got 0",
        ),
        (dict(layers="conv1", num_images=2.5), "expected `num_images`"),
        (dict(layers="conv1", max_channels=True), "expected `max_channels`"),
        (dict(layers="conv1", normalize="global"), "expected `normalize` in"),
        (dict(layers="conv1", order="random"), "expected `order` in"),
        (dict(layers="conv1", cmap="viridiss"), "such as 'viridis'"),
        (dict(layers="conv1", input_key="x", input_fn=lambda b: b), "at most one of"),
        (dict(layers="conv1", input_fn="not callable"), "expected `input_fn` to be callable"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError) as err:
        FeatureMapCallback(**kwargs)
    assert message in str(err.value)


def test_layer_patterns_resolve_relative_to_the_wrapped_net():
    model = ImageClassifier(SimpleCNN())
    assert list(resolve_layers(model, ["conv*"])) == ["conv1", "conv2"]
    # named_modules() order, whatever order they were asked in
    assert list(resolve_layers(model, ["net.fc2", "conv1"])) == ["conv1", "net.fc2"]
    assert resolve_layers(model, ["pool"])["pool"] is model.net.pool


def test_unknown_layer_lists_available_and_closest(tmp_path):
    cb = FeatureMapCallback(layers=["conv3"])
    with pytest.raises(ValueError) as err:
        _fit(tmp_path, cb)
    msg = str(err.value)
    assert "'conv3' matches nothing in ImageClassifier" in msg
    assert "Closest: conv1, conv2" in msg or "Closest: conv2, conv1" in msg
    assert "Available layers: net, net.conv1, net.pool, net.relu1, net.conv2, net.relu2" in msg


# ---------------------------------------------------------------- destinations


def test_local_pngs_one_per_layer_per_captured_epoch(tmp_path):
    cb = FeatureMapCallback(layers=["conv1", "conv2"], every_n_epochs=2, num_images=3)
    _fit(tmp_path, cb, logger=CSVLogger(tmp_path, name="run"), max_epochs=5)
    root = os.path.join(tmp_path, "run", "version_0", "feature_maps")
    assert cb.local_dir == root
    names = [os.path.relpath(p, root) for p in _pngs(root)]
    # epochs 0, 2, 4 captured; the sanity check and epochs 1, 3 are not
    assert names == [
        "conv1/epoch=001.png",
        "conv1/epoch=003.png",
        "conv2/epoch=001.png",
        "conv2/epoch=003.png",
        "probe_inputs.png",
    ]
    for path in _pngs(root):
        _assert_not_blank(path)
    # 3 probe images -> 3 rows of 16 conv1 channels (24x24 maps upscaled, 1 px padding)
    conv1 = np.asarray(Image.open(os.path.join(root, "conv1", "epoch=001.png")))
    assert conv1.shape[0] < conv1.shape[1]  # 3 rows, 16 columns
    # the gallery page and its stats, rewritten at every capture; one GIF per layer at fit end
    page = open(os.path.join(root, "index.html")).read()
    assert "conv1/epoch%3D003.png" in page or "conv1/epoch=003.png" in page
    stats = json.load(open(os.path.join(root, "stats.json")))
    assert [h["epoch"] for h in stats["history"]] == [1, 3]
    assert set(stats["history"][0]["stats"]) == {"conv1", "conv2"}
    for layer in ("conv1", "conv2"):
        assert Image.open(os.path.join(root, layer, "evolution.gif")).n_frames == 2


def test_two_callbacks_need_names_and_then_keep_apart(tmp_path):
    # Same state (the probe of 4 images): Lightning refuses them; a `name` tells them apart.
    same = [FeatureMapCallback(layers=["conv1"]), FeatureMapCallback(layers=["fc1"])]
    with pytest.raises(RuntimeError, match="state_key` must be unique"):
        _fit(tmp_path, same[0], extra_callbacks=same[1:])
    # Different states but one directory: refused before they overwrite each other's files.
    same_dir = [FeatureMapCallback(layers=["conv1"]), FeatureMapCallback("fc1", num_images=2)]
    with pytest.raises(ValueError, match="its own `name`"):
        _fit(tmp_path, same_dir[0], extra_callbacks=same_dir[1:])
    first = FeatureMapCallback(layers=["conv1"])
    second = FeatureMapCallback(layers=["fc1"], num_images=2, name="dense")
    trainer, _ = _fit(
        tmp_path, first, logger=CSVLogger(tmp_path, name="run"), extra_callbacks=[second]
    )
    assert second.local_dir == first.local_dir + "_dense"
    assert first.state_key != second.state_key
    assert len(_pngs(os.path.join(first.local_dir, "conv1"))) == 2
    assert len(_pngs(os.path.join(second.local_dir, "fc1"))) == 2
    assert not os.path.exists(os.path.join(first.local_dir, "fc1"))


def test_stats_are_logged_on_the_validation_step(tmp_path):
    cb = FeatureMapCallback(layers=["conv1"])
    trainer, _ = _fit(tmp_path, cb, logger=CSVLogger(tmp_path, name="run"), max_epochs=2)
    with open(os.path.join(trainer.logger.log_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    val_steps = {r["step"] for r in rows if r.get("val/acc")}
    stat_steps = {r["step"] for r in rows if r.get("feature_stats/conv1/dead_channels_probe")}
    assert len(stat_steps) == 2 and stat_steps == val_steps
    for key in ("mean", "std", "frac_zero", "dead_channels_probe"):
        assert any(r.get(f"feature_stats/conv1/{key}") for r in rows)


def test_tensorboard_event_files_hold_the_images(tmp_path):
    cb = FeatureMapCallback(layers=["conv1", "fc2"])
    trainer, _ = _fit(tmp_path, cb, logger=TensorBoardLogger(tmp_path, name="tb"), max_epochs=2)
    acc = EventAccumulator(trainer.logger.log_dir, size_guidance={"images": 0})
    acc.Reload()
    tags = acc.Tags()["images"]
    assert {"feature_maps/conv1", "feature_maps/fc2", "probe_inputs"} <= set(tags)
    events = acc.Images("feature_maps/conv1")
    assert len(events) == 2  # epochs 0 and 1, none from the sanity check
    assert events[0].width > 0 and events[0].height > 0
    # PNGs are written too, beside the TensorBoard run
    assert cb.local_dir == os.path.join(trainer.logger.log_dir, "feature_maps")
    assert len(_pngs(os.path.join(cb.local_dir, "conv1"))) == 2


def test_wandb_offline_run_holds_non_blank_images(tmp_path):
    import wandb

    logger, logged = recording_wandb_logger(tmp_path)  # (metrics, step) of every log_metrics
    cb = FeatureMapCallback(layers=["conv1", "conv2"], num_images=2)
    _fit(tmp_path, cb, logger=logger, max_epochs=3)
    run_dir = os.path.dirname(logger.experiment.dir)
    # the local copy sits beside the checkpoints, in a directory of this run's own
    assert cb.local_dir == os.path.join(tmp_path, "fm-test", logger.version, "feature_maps")
    assert len(_pngs(os.path.join(cb.local_dir, "conv2"))) == 3

    # What W&B was handed: one row per epoch (none from the sanity check) with images, captions
    # and stats, on the step of that epoch's validation metrics.
    val_steps = [step for metrics, step in logged if "val/acc" in metrics]
    rows = [(metrics, step) for metrics, step in logged if "feature_maps/conv1" in metrics]
    assert len(val_steps) == 3 and [step for _, step in rows] == val_steps
    for epoch, (metrics, step) in enumerate(rows):
        for tag in ("feature_maps/conv1", "feature_maps/conv2", "probe_inputs"):
            assert isinstance(metrics[tag], wandb.Image), tag
            pixels = np.asarray(metrics[tag].image.convert("RGB"))
            assert pixels.std() > 5, f"{tag} of epoch {epoch} looks blank"
        assert wandb.Image.all_captions([metrics["feature_maps/conv1"]]) == [
            f"epoch {epoch}, step {step}, channels 0-15 of 16; measured: NCHW"
        ]
        assert isinstance(metrics["feature_stats/conv2/dead_channels_probe"], float)
    # the evolution GIFs arrive once, at the end of fit
    videos = [metrics for metrics, _ in logged if any("evolution" in key for key in metrics)]
    assert [sorted(v) for v in videos] == [
        ["feature_maps_evolution/conv1", "feature_maps_evolution/conv2"]
    ]
    assert all(isinstance(v, wandb.Video) for v in videos[0].values())

    # and the media files W&B wrote into the run, which `wandb sync` uploads
    logger.experiment.finish()
    assert os.path.basename(run_dir).startswith("offline-run-")
    media = os.path.join(run_dir, "files", "media")
    for layer in ("conv1", "conv2"):
        files = sorted(glob.glob(os.path.join(media, "images", "feature_maps", f"{layer}_*.png")))
        assert len(files) == 3, files
        for path in files:
            _assert_not_blank(path)
    assert len(glob.glob(os.path.join(media, "images", "probe_inputs_*.png"))) == 3
    gifs = glob.glob(os.path.join(media, "videos", "**", "*.gif"), recursive=True)
    assert sorted(os.path.basename(g).split("_")[0] for g in gifs) == ["conv1", "conv2"]


def test_save_dir_writes_pngs_next_to_an_image_logger(tmp_path):
    cb = FeatureMapCallback(layers=["conv2"], save_dir=str(tmp_path / "maps"))
    _fit(tmp_path, cb, logger=TensorBoardLogger(tmp_path, name="tb"), max_epochs=1)
    assert [os.path.basename(p) for p in _pngs(tmp_path / "maps")] == [
        "epoch=000.png",
        "probe_inputs.png",
    ]


# ---------------------------------------------------------------- capture mechanics


class _HookSpy(ImageClassifier):
    """Records how many forward hooks conv1 carries during every training and validation step."""

    def __init__(self):
        super().__init__(SimpleCNN())
        self.hooks_seen = []
        self.modes_in_forward = []

    def forward(self, x):
        if not torch.is_grad_enabled():
            self.modes_in_forward.append(self.training)
        return super().forward(x)

    def training_step(self, batch, batch_idx):
        self.hooks_seen.append(len(self.net.conv1._forward_hooks))
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        self.hooks_seen.append(len(self.net.conv1._forward_hooks))
        return super().validation_step(batch, batch_idx)


def test_hooks_live_only_for_the_probe_pass_and_modes_are_restored(tmp_path):
    model = _HookSpy()
    model.net.fc1.eval()  # a user's deliberately frozen submodule must stay in eval
    cb = FeatureMapCallback(layers=["conv*", "fc1"])
    _fit(tmp_path, cb, model=model, max_epochs=2)
    assert model.hooks_seen and set(model.hooks_seen) == {0}
    assert all(not m._forward_hooks for m in model.modules())
    assert model.modes_in_forward and not any(model.modes_in_forward)  # probe ran in eval mode
    assert not model.net.fc1.training and model.net.conv1.training


class _FailsOnProbe(ImageClassifier):
    """Its forward raises in the probe pass only (eval mode outside the validation loop)."""

    def __init__(self):
        super().__init__(SimpleCNN())
        self.in_val_loop = False

    def on_validation_epoch_start(self):
        self.in_val_loop = True

    def on_validation_epoch_end(self):
        self.in_val_loop = False

    def forward(self, x):
        if not self.training and not self.in_val_loop:
            raise RuntimeError("probe forward exploded")
        return super().forward(x)


def test_a_failing_probe_forward_removes_its_hooks_and_training_goes_on(tmp_path):
    model = _FailsOnProbe()
    cb = FeatureMapCallback(layers=["conv1", "conv2"])
    with pytest.warns(UserWarning, match="capture failed .*probe forward exploded") as record:
        trainer, _ = _fit(tmp_path, cb, model=model, max_epochs=2)
    assert sum("FeatureMapCallback" in str(w.message) for w in record) == 1
    assert trainer.current_epoch == 2
    assert all(not m._forward_hooks for m in model.modules())
    assert model.net.conv1.training  # train mode restored after the failed pass

    with pytest.raises(RuntimeError, match="probe forward exploded"):
        _fit(tmp_path, FeatureMapCallback(layers=["conv1"], strict=True), model=_FailsOnProbe())


def test_probe_is_deterministic_and_survives_resume(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    cb = FeatureMapCallback(layers=["conv1"], num_images=5)
    trainer, _ = _fit(tmp_path, cb, extra_callbacks=[ckpt], enable_checkpointing=True, max_epochs=1)
    probe = cb.probe.cpu()
    assert probe.shape == (5, 1, 28, 28)
    assert torch.equal(probe, random_loader(seed=1).dataset.tensors[0][:5])

    # Resume with validation data that has changed: the saved probe is still the one drawn.
    resumed = FeatureMapCallback(layers=["conv1"], num_images=5)
    trainer = tiny_trainer(tmp_path, [resumed], max_epochs=2)
    trainer.fit(
        ImageClassifier(SimpleCNN()),
        random_loader(),
        random_loader(seed=7),
        ckpt_path=ckpt.last_model_path,
    )
    assert torch.equal(resumed.probe.cpu(), probe)
    assert resumed.state_dict()["probe"].device.type == "cpu"


def test_probe_spans_several_batches_and_short_validation_warns(tmp_path):
    cb = FeatureMapCallback(layers=["conv1"], num_images=12)
    _fit(tmp_path, cb, val=random_loader(n=16, batch_size=5, seed=1), limit_val_batches=3)
    assert cb.probe.shape[0] == 12

    short = FeatureMapCallback(layers=["conv1"], num_images=12)
    with pytest.warns(UserWarning, match="only 4 of num_images=12"):
        _fit(tmp_path, short, val=random_loader(n=4, seed=1))
    assert short.probe.shape[0] == 4


def test_shared_module_called_twice_is_drawn_per_call(tmp_path):
    cb = FeatureMapCallback(layers=["pool"], save_dir=str(tmp_path / "maps"))
    _fit(tmp_path, cb, max_epochs=1)
    layers = sorted(os.listdir(tmp_path / "maps"))
    assert layers == ["index.html", "pool", "pool@2", "probe_inputs.png", "stats.json"]


def test_every_n_epochs_lines_up_with_check_val_every_n_epoch(tmp_path):
    cb = FeatureMapCallback(layers=["conv1"], every_n_epochs=2, save_dir=str(tmp_path / "maps"))
    _fit(tmp_path, cb, max_epochs=4, check_val_every_n_epoch=2)
    names = [os.path.basename(p) for p in _pngs(tmp_path / "maps" / "conv1")]
    assert names == ["epoch=001.png", "epoch=003.png"]  # every validation Lightning runs


def test_order_by_activation_draws_the_most_active_channels(tmp_path):
    cb = FeatureMapCallback(layers=["conv2"], max_channels=4, order="activation")
    logger = TensorBoardLogger(tmp_path, name="tb")
    _, model = _fit(tmp_path, cb, logger=logger, max_epochs=1)
    # Redo the probe pass by hand on the weights the capture saw (fit ends right after it).
    acts = {}
    model.eval()
    with (
        forward_hooks(
            {"conv2": model.net.conv2}, lambda key, module, out: acts.__setitem__(key, out)
        ),
        torch.no_grad(),
    ):
        model(cb.probe)
    expected = rendering.feature_picture(acts["conv2"], max_channels=4, order="activation")
    drawn = np.asarray(Image.open(os.path.join(cb.local_dir, "conv2", "epoch=000.png")))
    assert np.array_equal(drawn, expected.numpy())
    index_order = rendering.feature_picture(acts["conv2"], max_channels=4, order="index")
    assert not np.array_equal(drawn, index_order.numpy())  # the choice made a difference


class _SilenceDrawnChannels(pl.Callback):
    """After each training epoch, zeroes conv2's filters of the channels the callback draws, so
    that at the next validation the most active channels are others."""

    def __init__(self, cb: FeatureMapCallback) -> None:
        self.cb = cb

    def on_train_epoch_end(self, trainer, pl_module):
        drawn = self.cb.state_dict()["channels"]["conv2"]
        with torch.no_grad():
            pl_module.net.conv2.weight[drawn] = 0.0
            pl_module.net.conv2.bias[drawn] = 0.0


def test_order_by_activation_keeps_the_first_epochs_channels_for_the_run(tmp_path):
    cb = FeatureMapCallback(layers=["conv2"], max_channels=4, order="activation")
    _, model = _fit(tmp_path, cb, max_epochs=2, extra_callbacks=[_SilenceDrawnChannels(cb)])
    chosen = cb.state_dict()["channels"]["conv2"]  # kept in the checkpoint's state
    history = json.load(open(os.path.join(cb.local_dir, "stats.json")))["history"]
    captions = [h["captions"]["conv2"] for h in history]
    shown = f"channels {ranges(chosen.tolist())} of 32"
    assert len(captions) == 2 and all(f"{shown};" in c for c in captions), captions
    # Choosing afresh on the last epoch's weights would have drawn other channels.
    acts = {}
    with forward_hooks({"conv2": model.net.conv2}, lambda k, m, out: acts.__setitem__(k, out)):
        model.eval()(cb.probe)
    fresh = rendering.select_channels(acts["conv2"], 4, "activation")
    assert not set(fresh.tolist()) & set(chosen.tolist())
    # A resumed run keeps them too.
    resumed = FeatureMapCallback(layers=["conv2"], max_channels=4, order="activation")
    resumed.load_state_dict(cb.state_dict())
    assert torch.equal(resumed.state_dict()["channels"]["conv2"], chosen)


# ---------------------------------------------------------------- batches that are not (x, y)


class _DictClassifier(ImageClassifier):
    def training_step(self, batch, batch_idx):
        return super().training_step((batch["pixels"], batch["label"]), batch_idx)

    def validation_step(self, batch, batch_idx):
        return super().validation_step((batch["pixels"], batch["label"]), batch_idx)


def _dict_loader(seed):
    base = random_loader(seed=seed).dataset
    items = [{"pixels": x, "label": y} for x, y in base]
    return torch.utils.data.DataLoader(items, batch_size=8)


@pytest.mark.parametrize(
    "how", [dict(input_key="pixels"), dict(input_fn=lambda batch: batch["pixels"])]
)
def test_dict_batches_with_input_key_or_fn(tmp_path, how):
    cb = FeatureMapCallback(layers=["conv1"], save_dir=str(tmp_path / "maps"), **how)
    _fit(
        tmp_path, cb, model=_DictClassifier(SimpleCNN()), train=_dict_loader(0), val=_dict_loader(1)
    )
    assert len(_pngs(tmp_path / "maps" / "conv1")) == 2


def test_unreadable_batch_warns_once_and_training_goes_on(tmp_path):
    cb = FeatureMapCallback(layers=["conv1"], save_dir=str(tmp_path / "maps"))
    with pytest.warns(UserWarning, match="expected the batch dict to hold one of") as record:
        trainer, _ = _fit(
            tmp_path,
            cb,
            model=_DictClassifier(SimpleCNN()),
            train=_dict_loader(0),
            val=_dict_loader(1),
        )
    assert sum("FeatureMapCallback" in str(w.message) for w in record) == 1
    assert trainer.current_epoch == 2 and not _pngs(tmp_path / "maps")

    strict = FeatureMapCallback(layers=["conv1"], strict=True)
    with pytest.raises(KeyError, match="input_key"):
        _fit(
            tmp_path,
            strict,
            model=_DictClassifier(SimpleCNN()),
            train=_dict_loader(0),
            val=_dict_loader(1),
        )


# ---------------------------------------------------------------- failures never stop training


class _BrokenTensorBoard(TensorBoardLogger):
    """A real TensorBoardLogger whose image upload fails, as a full disk or dead service would."""

    def log_metrics(self, metrics, step=None):
        if any(k.startswith("feature_stats/") for k in metrics):
            raise OSError("No space left on device")
        super().log_metrics(metrics, step)


def test_logger_failure_warns_once_and_keeps_checkpoints(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    cb = FeatureMapCallback(layers=["conv1"])
    logger = _BrokenTensorBoard(tmp_path, name="tb")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer, _ = _fit(
            tmp_path,
            cb,
            logger=logger,
            extra_callbacks=[ckpt],
            enable_checkpointing=True,
            max_epochs=3,
        )
    ours = [str(w.message) for w in record if "FeatureMapCallback" in str(w.message)]
    assert len(ours) == 1 and "No space left on device" in ours[0]
    assert trainer.current_epoch == 3
    assert os.path.isfile(ckpt.last_model_path)


def test_disk_failure_warns_once_and_strict_raises(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the maps directory should be")
    cb = FeatureMapCallback(layers=["conv1"], save_dir=str(blocker))
    with pytest.warns(UserWarning, match="files failed") as record:
        trainer, _ = _fit(tmp_path, cb, max_epochs=2)
    assert sum("FeatureMapCallback" in str(w.message) for w in record) == 1
    assert trainer.current_epoch == 2

    strict = FeatureMapCallback(layers=["conv1"], save_dir=str(blocker), strict=True)
    with pytest.raises(OSError):
        _fit(tmp_path, strict, max_epochs=1)


class _NaNHalf(nn.Module):
    """Passes its input on with the left half of every map set to NaN."""

    def forward(self, x):
        x = x.clone()
        x[..., : x.shape[-1] // 2] = float("nan")
        return x


def test_nan_activations_still_render(tmp_path):
    net = SimpleCNN()
    net.conv1 = nn.Sequential(net.conv1, _NaNHalf())
    cb = FeatureMapCallback(layers=["conv1.1"], save_dir=str(tmp_path / "maps"))
    model = ImageClassifier(net)
    trainer = tiny_trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=0)
    trainer.validate(model, random_loader(seed=1))
    (png,) = _pngs(tmp_path / "maps" / "conv1.1")
    _assert_not_blank(png)


class _TupleOut(nn.Module):
    def forward(self, x):
        return x, x.mean()


class _DictOut(nn.Module):
    def forward(self, x):
        return {"mask": None, "features": x}


class _Score(nn.Module):
    def forward(self, x):
        return x.flatten(1).mean(1)  # (N,): a shape no grid can draw


def test_tuple_and_dict_outputs_use_first_tensor_and_unsupported_warn_once(tmp_path):
    net = SimpleCNN()
    net.extra = nn.ModuleDict({"pair": _TupleOut(), "mapping": _DictOut(), "score": _Score()})
    model = ImageClassifier(net)

    def forward(x):
        for module in net.extra.values():
            module(x)
        return net(x)

    model.forward = forward
    cb = FeatureMapCallback(layers=["extra.*", "conv1"], save_dir=str(tmp_path / "maps"))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _fit(tmp_path, cb, model=model, max_epochs=2)
    ours = [str(w.message) for w in record if "FeatureMapCallback" in str(w.message)]
    assert len(ours) == 1, ours  # one per unsupported layer, not one per epoch
    assert "'extra.score'" in ours[0] and "got shape (4,)" in ours[0]
    # the layers that can be drawn still are
    for layer in ("extra.pair", "extra.mapping", "conv1"):
        assert len(_pngs(tmp_path / "maps" / layer)) == 2
    assert not os.path.exists(tmp_path / "maps" / "extra.score")


# ---------------------------------------------------------------- models and data it has never seen


def test_drops_into_torchvision_resnet18(tmp_path):
    from torchvision.models import resnet18

    cb = FeatureMapCallback(layers=["layer1.0.conv1", "layer4"], save_dir=str(tmp_path / "maps"))
    model = ImageClassifier(resnet18(weights=None, num_classes=10))
    data = dict(
        train=random_loader(shape=(3, 32, 32)), val=random_loader(shape=(3, 32, 32), seed=1)
    )
    _fit(tmp_path, cb, model=model, max_epochs=1, **data)
    for layer in ("layer1.0.conv1", "layer4"):
        (png,) = _pngs(tmp_path / "maps" / layer)
        img = _assert_not_blank(png) if layer != "layer4" else np.asarray(Image.open(png))
        assert img.shape[2] == 3
    _assert_not_blank(tmp_path / "maps" / "probe_inputs.png")


def test_drops_into_a_linear_only_model(tmp_path):
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
    cb = FeatureMapCallback(layers=["1", "2"], save_dir=str(tmp_path / "maps"))
    _fit(tmp_path, cb, model=ImageClassifier(net), max_epochs=1)
    for layer in ("1", "2"):
        (png,) = _pngs(tmp_path / "maps" / layer)
        _assert_not_blank(png)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_capture_matches_and_keeps_memory_flat(tmp_path, monkeypatch):
    # full float32 convolutions on both sides, so the CPU can reproduce the GPU's maps
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    allocated = []  # GPU bytes in use after each epoch's capture

    class AfterCapture(pl.Callback):
        def on_validation_end(self, trainer, pl_module):
            torch.cuda.synchronize()
            allocated.append(torch.cuda.memory_allocated())

    cb = FeatureMapCallback(layers=["conv1", "conv2"], save_dir=str(tmp_path / "maps"))
    model = ImageClassifier(SimpleCNN())
    trainer = tiny_trainer(
        tmp_path, [cb, AfterCapture()], max_epochs=5, accelerator="gpu", num_sanity_val_steps=0
    )
    trainer.fit(model, random_loader(), random_loader(seed=1))
    assert cb.probe.device.type == "cuda"
    assert len(_pngs(tmp_path / "maps" / "conv2")) == 5

    # matches: the last epoch's PNGs are what the same weights draw on the CPU
    model = model.cpu().eval()
    acts = {}  # layer -> (N, C, H, W) output, recorded by plain torch hooks
    hooks = [
        getattr(model.net, name).register_forward_hook(
            lambda module, args, out, name=name: acts.__setitem__(name, out)
        )
        for name in ("conv1", "conv2")
    ]
    with torch.no_grad():
        model(cb.probe.cpu())
    for hook in hooks:
        hook.remove()
    for layer, act in acts.items():
        expected = rendering.feature_picture(
            act, max_channels=cb.max_channels, normalize=cb.normalize, cmap=cb.cmap, order=cb.order
        ).numpy()
        drawn = np.asarray(Image.open(tmp_path / "maps" / layer / "epoch=004.png").convert("RGB"))
        assert drawn.shape == expected.shape, layer
        # a colour level at most: float32 sums in another order round differently
        assert np.abs(drawn.astype(int) - expected.astype(int)).max() <= 1, layer
        assert drawn.std() > 5, f"{layer} looks blank"

    # keeps memory flat: from epoch 1 on (epoch 0 also creates the optimizer's state), every
    # capture leaves GPU memory where the one before left it, not one probe's maps higher
    one_capture = sum(act.numel() * 4 for act in acts.values())  # float32 maps of both layers
    assert len(allocated) == 5
    assert max(allocated[1:]) - min(allocated[1:]) < one_capture / 4, allocated


# ---------------------------------------------------------------- class path and DDP (subprocesses)

SCRIPTS = os.path.join(os.path.dirname(__file__), "scripts")


def _run(args, cwd, timeout=300) -> str:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_a_plain_lightningcli_gets_it_by_class_path_alone(tmp_path):
    script = os.path.join(SCRIPTS, "plain_cli.py")
    assert "fm_lightning" not in open(script).read().split('"""', 2)[2]  # never imported
    _run(
        [
            script,
            "fit",
            "--trainer.callbacks+=fm_lightning.FeatureMapCallback",
            "--trainer.callbacks.layers=[conv1]",
            "--trainer.max_epochs=2",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        cwd=tmp_path,
    )
    # LightningCLI's default logger is TensorBoard (installed here), so the images land there.
    acc = EventAccumulator(
        str(tmp_path / "lightning_logs" / "version_0"), size_guidance={"images": 0}
    )
    acc.Reload()
    assert len(acc.Images("feature_maps/conv1")) == 2
    assert len(acc.Images("probe_inputs")) == 2


@pytest.mark.slow
def test_ddp_two_cpu_processes_log_one_set_of_images(tmp_path):
    out = _run([os.path.join(SCRIPTS, "ddp_fit.py"), str(tmp_path)], cwd=tmp_path)
    ranks = [line.split() for line in out.splitlines() if line.startswith("rank=")]
    probes = {rank: probe for rank, probe, _ in ranks}
    assert set(probes) == {"rank=0", "rank=1"}
    assert len(set(probes.values())) == 1, probes  # both ranks drew with rank zero's probe
    # Every rank measured the layouts, once per fit (sharded models need the same passes).
    assert [passes for _, _, passes in ranks] == ["layout_passes=1"] * 2, ranks
    names = [os.path.relpath(p, tmp_path / "maps") for p in _pngs(tmp_path / "maps")]
    assert names == [
        "conv1/epoch=000.png",
        "conv1/epoch=001.png",
        "conv2/epoch=000.png",
        "conv2/epoch=001.png",
        "probe_inputs.png",
    ]
    acc = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"images": 0})
    acc.Reload()
    assert len(acc.Images("feature_maps/conv1")) == 2  # exactly one per captured epoch


@pytest.mark.slow
@pytest.mark.parametrize("fail_rank", [0, 1])
def test_ddp_ranks_that_disagree_neither_hang_nor_stop_training(tmp_path, fail_rank):
    # One rank cannot read its batches: the other must not wait for it in a collective.
    script = os.path.join(SCRIPTS, "ddp_fit.py")
    out = _run([script, str(tmp_path), "--fail-on-rank", str(fail_rank)], cwd=tmp_path, timeout=180)
    assert "rank=0" in out and "rank=1" in out  # both ranks finished fit
    pngs = _pngs(tmp_path / "maps" / "conv1")
    # rank zero's probe decides: drawn when rank zero has one, skipped everywhere when it has not
    assert len(pngs) == (0 if fail_rank == 0 else 2)


@pytest.mark.slow
@pytest.mark.parametrize("fail_rank", [0, 1])
def test_ddp_ranks_that_disagree_with_examples_on_neither_hang_nor_stop_training(
    tmp_path, fail_rank
):
    # examples=2 adds collectives when a validation starts (the slots every rank keeps): the
    # rank that cannot read its batches must still take part in them.
    script = os.path.join(SCRIPTS, "ddp_fit.py")
    args = [script, str(tmp_path), "--fail-on-rank", str(fail_rank), "--examples", "2"]
    out = _run(args, cwd=tmp_path, timeout=180)
    assert "rank=0" in out and "rank=1" in out  # both ranks finished fit
    assert len(_pngs(tmp_path / "maps" / "conv1")) == (0 if fail_rank == 0 else 2)
    # ranks that disagree gather no examples: none drawn, none half-merged
    assert not (tmp_path / "maps" / "conv1" / "examples").exists()


# ---------------------------------------------------------------- folders of their own


class CollidingNames(nn.Module):
    """A classifier whose layers are named "cam", "a b" and "a_b": "cam" is the CAM pictures'
    folder, and "a b" and "a_b" make the same safe folder name."""

    def __init__(self) -> None:
        super().__init__()
        self.cam = nn.Conv2d(1, 4, 3, padding=1)
        self.add_module("a b", nn.Conv2d(4, 6, 3, padding=1))
        self.a_b = nn.Conv2d(6, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.cam(x))  # (N, 4, 28, 28)
        x = torch.relu(getattr(self, "a b")(x))  # (N, 6, 28, 28)
        x = torch.relu(self.a_b(x))  # (N, 8, 28, 28)
        return self.fc(x.mean(dim=(2, 3)))


def test_every_layer_and_the_cam_get_folders_and_tags_of_their_own(tmp_path):
    cb = FeatureMapCallback(
        layers=["cam", "a b", "a_b"],
        examples=2,
        cam="GradCAM",
        cam_layer="a_b",
        save_dir=str(tmp_path / "maps"),
        strict=False,
    )
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer, _ = _fit(tmp_path, cb, logger, model=ImageClassifier(CollidingNames()))
    root = tmp_path / "maps"
    folders = {"cam": "cam~2", "a b": "a_b", "a_b": "a_b~2"}
    for folder in folders.values():
        for epoch in (0, 1):
            assert (root / folder / f"epoch={epoch:03d}.png").is_file()
            assert (root / folder / "examples" / f"epoch={epoch:03d}.png").is_file()
    # cam/ holds the CAM pictures alone: the columns' header above 4 rows of 84 px tiles
    for epoch in (0, 1):
        with Image.open(root / "cam" / f"epoch={epoch:03d}.png") as im:
            assert im.height > CAM_HEADER_PX + 4 * 84 + 5 * 2
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["a_b", "a_b~2", "cam", "cam~2"]
    said = [str(w.message) for w in record if "pictures go to" in str(w.message)]
    assert len(said) == 2 and any("'a_b'" in s and "a_b~2/" in s and "'a b'" in s for s in said)
    assert any("'cam'" in s and "cam~2/" in s and "the callback's own files" in s for s in said)

    stats = json.loads((root / "stats.json").read_text())
    assert stats["layers"] == ["cam~2", "a_b", "a_b~2"]
    captions = stats["history"][-1]["captions"]
    assert captions["cam"].startswith("epoch 1: GradCAM on a_b")
    for layer, folder in folders.items():  # each folder holds its own layer's channels
        channels = {"cam": 4, "a b": 6, "a_b": 8}[layer]
        assert captions[folder].startswith("epoch 1, step")
        assert f"channels 0-{channels - 1} of {channels}" in captions[folder]

    acc = EventAccumulator(trainer.logger.log_dir, size_guidance={"images": 0})
    acc.Reload()
    tags = set(acc.Tags()["images"])
    assert {"feature_maps/cam", "feature_maps/a b", "feature_maps/a_b"} <= tags
    assert "class_activation/a_b" in tags
    assert {"feature_examples/cam", "feature_examples/a b", "feature_examples/a_b"} <= tags
