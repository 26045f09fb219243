"""FeatureMapCallback(examples=K) with real Trainers: files, loggers, a known answer, dead channels,
hooks, order="activation" and DDP.

The DDP tests run this file as a script, with Lightning's own DDP launcher on CPU processes:

    python tests/test_examples_callback.py OUT_DIR --devices 2 [--val-size 63]

which fits SimpleCNN (weights frozen by a zero learning rate, so runs on 1 and 2 processes see
the same model) and saves, from rank zero, every ExamplesResult the callback drew to
``OUT_DIR/examples.pt``.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import os
import subprocess
import sys
import warnings
from dataclasses import fields

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, random_loader, recording_wandb_logger, tiny_trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_examples import BAR, Bars, bar_images, ranked
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fm_lightning.pictures.examples
import fm_lightning.receptive_field
from fm_lightning import FeatureMapCallback, ImageClassifier, SimpleCNN, rendering
from fm_lightning.pictures.examples import examples_grid
from fm_lightning.receptive_field import receptive_field
from fm_lightning.topk import TopKExamples, content_ids

HERE = os.path.abspath(__file__)


def _fit(tmp_path, cb, logger=None, model=None, train=None, val=None, **kwargs):
    model = model if model is not None else ImageClassifier(SimpleCNN())
    trainer = tiny_trainer(tmp_path, [cb], logger, **kwargs)
    trainer.fit(model, train or random_loader(), val or random_loader(seed=1))
    return trainer, model


def _pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _assert_not_blank(path) -> np.ndarray:
    img = _pixels(path)
    assert img.std() > 5, f"{path} looks blank (std {img.std():.2f})"
    return img


def _record(monkeypatch, module, name) -> list:
    """Wraps module.name so every call's (args, kwargs) are kept; the real function still runs."""
    calls, real = [], getattr(module, name)

    def recording(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, recording)
    return calls


def _warnings_about_dead(record) -> list[str]:
    return [str(w.message) for w in record if "are dead" in str(w.message)]


# Rows of a drawn examples grid (fm_lightning.pictures.examples' layout): tiles of at least 40 px,
# a 12 px caption and a 3 px gap per row, plus the top gap.
def _grid_rows(png: np.ndarray, crop_px: int) -> float:
    tile = crop_px * -(-40 // crop_px)
    return (png.shape[0] - 3) / (tile + 12 + 3)


# ---------------------------------------------------------------- files, gallery data, loggers


def test_examples_png_per_layer_per_captured_epoch_and_gallery_data(tmp_path):
    cb = FeatureMapCallback(
        layers=["conv1", "conv2"], every_n_epochs=2, num_images=3, max_channels=6, examples=4
    )
    trainer, _ = _fit(tmp_path, cb, logger=CSVLogger(tmp_path, name="run"), max_epochs=4)
    root = cb.local_dir
    found = sorted(
        os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "*", "examples", "*"))
    )
    # epochs 1 and 3 captured; the sanity check and epochs 0, 2 are not
    assert found == [
        f"{layer}/examples/epoch={epoch:03d}.png"
        for layer in ("conv1", "conv2")
        for epoch in (1, 3)
    ]
    for layer, crop_px in (("conv1", 5), ("conv2", 14)):  # their receptive fields (5 px, 14 px)
        png = _assert_not_blank(os.path.join(root, layer, "examples", "epoch=003.png"))
        assert _grid_rows(png, crop_px) == 6  # max_channels rows
        assert png.shape[1] == 36 + 4 * (crop_px * -(-40 // crop_px) + 3) + 3  # 4 columns

    # The gallery's data: per captured epoch, the examples' captions and the dead channels.
    history = json.load(open(os.path.join(root, "stats.json")))["history"]
    assert [entry["epoch"] for entry in history] == [1, 3]
    for entry in history:
        epoch = entry["epoch"]
        for layer in ("conv1", "conv2"):
            assert entry["captions"][f"{layer}/examples"].startswith(
                f"epoch {epoch}: top 4 validation inputs of channels 0-5"
            )
            assert layer in entry["dead"]  # recorded even when empty: "no channel is dead"
    # dead_channels_val sits on the validation step, beside the validation metrics
    with open(os.path.join(trainer.logger.log_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    val_steps = [r["step"] for r in rows if r.get("val/acc")]
    dead_steps = [r["step"] for r in rows if r.get("feature_stats/conv2/dead_channels_val")]
    assert len(val_steps) == 4 and dead_steps == [val_steps[1], val_steps[3]]


def test_tensorboard_holds_the_examples_on_the_validation_step(tmp_path):
    cb = FeatureMapCallback(layers=["conv1", "conv2"], examples=3)
    trainer, _ = _fit(tmp_path, cb, logger=TensorBoardLogger(tmp_path, name="tb"), max_epochs=2)
    acc = EventAccumulator(trainer.logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    val_steps = [event.step for event in acc.Scalars("val/acc")]
    assert len(val_steps) == 2
    for layer in ("conv1", "conv2"):
        events = acc.Images(f"feature_examples/{layer}")
        assert [event.step for event in events] == val_steps  # none from the sanity check
        local = sorted(glob.glob(os.path.join(cb.local_dir, layer, "examples", "*.png")))
        for event, path in zip(events, local, strict=True):
            # the same picture as the local PNG, pixel for pixel
            with Image.open(io.BytesIO(event.encoded_image_string)) as im:
                assert np.array_equal(np.asarray(im.convert("RGB")), _assert_not_blank(path))


def test_wandb_is_handed_the_examples_with_the_validation_metrics(tmp_path):
    import wandb

    logger, logged = recording_wandb_logger(tmp_path)  # (metrics, step) of every log_metrics
    cb = FeatureMapCallback(layers=["conv1", "conv2"], num_images=2, examples=3)
    _fit(tmp_path, cb, logger=logger, max_epochs=3)
    logger.experiment.finish()

    val_steps = [step for metrics, step in logged if "val/acc" in metrics]
    rows = [(m, step) for m, step in logged if "feature_examples/conv2" in m]
    assert len(val_steps) == 3 and [step for _, step in rows] == val_steps
    for epoch, (metrics, _) in enumerate(rows):
        for layer in ("conv1", "conv2"):
            image = metrics[f"feature_examples/{layer}"]
            assert isinstance(image, wandb.Image)
            # what W&B got is the local PNG of that epoch
            path = os.path.join(cb.local_dir, layer, "examples", f"epoch={epoch:03d}.png")
            assert np.array_equal(np.asarray(image.image.convert("RGB")), _assert_not_blank(path))
            (caption,) = wandb.Image.all_captions([image])
            assert caption.startswith(f"epoch {epoch}: top 3 validation inputs of channels")
            # the dead fraction rides in the same row as the pictures
            assert isinstance(metrics[f"feature_stats/{layer}/dead_channels_val"], float)


# ---------------------------------------------------------------- a known answer


class BarsClassifier(pl.LightningModule):
    """test_examples.Bars' hand-set conv (frozen: horizontal bar, vertical bar, dead) + a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = Bars().conv.requires_grad_(False)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(F.relu(self.conv(x)).amax(dim=(2, 3)))  # (N, 3) -> (N, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.head.parameters(), lr=0.1)


def test_known_answer_each_channel_gets_the_images_with_its_strongest_bars(tmp_path, monkeypatch):
    images, (h_strength, v_strength), (h_centre, v_centre) = bar_images()  # 12 images
    data = TensorDataset(images, torch.arange(12) % 2)
    drawn = _record(monkeypatch, fm_lightning.pictures.examples, "examples_grid")
    cb = FeatureMapCallback(layers=["conv"], examples=4, save_dir=str(tmp_path / "maps"))
    model = BarsClassifier()
    # batches of 5, 5 and 2: the top-k runs across batches; inputs are told apart by content
    loader = DataLoader(data, batch_size=5)
    _fit(tmp_path, cb, model=model, train=loader, val=loader, limit_val_batches=1.0, max_epochs=1)

    (((result,), _),) = drawn
    ids = content_ids(images)  # (12,) what the callback identifies each input by
    for channel, strength, centre in ((0, h_strength, h_centre), (1, v_strength, v_centre)):
        best = ranked(strength, ids, 4)  # ids, by strength (then id)
        assert result.indices[channel].tolist() == best
        expected = [ids.tolist().index(i) for i in best]  # their dataset indices
        assert torch.equal(result.scores[channel], BAR * strength[expected])  # the whole bar
        assert torch.equal(result.positions[channel], centre[expected] - 2)  # on its centre
        bar = torch.zeros(4, 1, BAR, BAR)  # the crop is the bar, centred, nothing else
        if channel == 0:
            bar[:, 0, BAR // 2, :] = strength[expected, None]
        else:
            bar[:, 0, :, BAR // 2] = strength[expected, None]
        assert torch.equal(result.crops[channel], bar)
    assert result.dead.tolist() == [False, False, True]

    # The PNG is what one brute-force top-k over the whole validation set draws.
    rf = receptive_field(model, model.conv, images)
    brute = TopKExamples(4, torch.arange(3), rf)
    with torch.no_grad():
        brute.update(model.conv(images), images, ids)
    expected_png = examples_grid(brute.result(), cmap=cb.cmap).numpy()
    png = _assert_not_blank(tmp_path / "maps" / "conv" / "examples" / "epoch=000.png")
    assert np.array_equal(png, expected_png)


# ---------------------------------------------------------------- dead channels


def _half_dead_cnn() -> ImageClassifier:
    """SimpleCNN whose conv1 is frozen with channels 0-9 of 16 biased to -1000: dead."""
    torch.manual_seed(0)
    model = ImageClassifier(SimpleCNN())
    with torch.no_grad():
        model.net.conv1.bias[:10] = -1000.0
    model.net.conv1.requires_grad_(False)
    return model


def test_a_dead_channel_made_on_purpose_is_logged_and_warned_about_once(tmp_path):
    cb = FeatureMapCallback(layers=["conv1", "conv2"], examples=2, max_channels=4)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer, _ = _fit(
            tmp_path, cb, CSVLogger(tmp_path, name="run"), _half_dead_cnn(), max_epochs=3
        )
    (message,) = _warnings_about_dead(record)  # once across 3 epochs, for conv1 only
    assert "'conv1'" in message and f"{10 / 16:.0%}" in message and "at epoch 0" in message
    assert "channels [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]" in message

    with open(os.path.join(trainer.logger.log_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    logged = [r["feature_stats/conv1/dead_channels_val"] for r in rows]
    assert [float(v) for v in logged if v] == [10 / 16] * 3
    # The gallery learns which channels, and since when: epoch 0, every epoch.
    history = json.load(open(os.path.join(cb.local_dir, "stats.json")))["history"]
    assert [entry["dead"]["conv1"] for entry in history] == [{str(c): 0 for c in range(10)}] * 3
    # The drawn rows of dead channels are marked in the picture (red frame).
    png = _pixels(os.path.join(cb.local_dir, "conv1", "examples", "epoch=002.png")).astype(int)
    red = (png[..., 0] > 180) & (png[..., 1] < 80) & (png[..., 2] < 80)
    assert red.any()


def test_dead_warn_none_never_warns_but_still_logs(tmp_path):
    cb = FeatureMapCallback(layers=["conv1"], examples=2, dead_warn=None)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer, _ = _fit(
            tmp_path, cb, CSVLogger(tmp_path, name="run"), _half_dead_cnn(), max_epochs=3
        )
    assert _warnings_about_dead(record) == []
    with open(os.path.join(trainer.logger.log_dir, "metrics.csv")) as f:
        logged = [r["feature_stats/conv1/dead_channels_val"] for r in csv.DictReader(f)]
    assert [float(v) for v in logged if v] == [10 / 16] * 3


# ---------------------------------------------------------------- hooks


class _HookCounter(ImageClassifier):
    """Counts conv1's forward hooks in every step; raises in one validation step if asked."""

    def __init__(self, raise_at: tuple[int, int] | None = None):
        super().__init__(SimpleCNN())
        self.raise_at = raise_at  # (epoch, batch_idx)
        self.seen: list[tuple[str, int, int]] = []  # (stage, epoch, hooks on conv1)

    def training_step(self, batch, batch_idx):
        self.seen.append(("train", self.current_epoch, len(self.net.conv1._forward_hooks)))
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        stage = "sanity" if self.trainer.sanity_checking else "val"
        self.seen.append((stage, self.current_epoch, len(self.net.conv1._forward_hooks)))
        if (self.current_epoch, batch_idx) == self.raise_at:
            raise RuntimeError("user's validation_step exploded")
        return super().validation_step(batch, batch_idx)


def test_hooks_live_only_in_captured_validation_batches_and_none_remain(tmp_path):
    model = _HookCounter()
    cb = FeatureMapCallback(layers=["conv1", "conv2"], examples=3, every_n_epochs=2)
    _fit(tmp_path, cb, model=model, max_epochs=4)
    hooks = {(stage, epoch): n for stage, epoch, n in model.seen}
    # one hook on conv1 in the validation batches of the captured epochs (1 and 3), else none
    assert hooks == {
        ("sanity", 0): 0,
        **{("train", e): 0 for e in range(4)},
        **{("val", e): int(e % 2 == 1) for e in range(4)},
    }
    assert all(not m._forward_hooks for m in model.modules())


def test_a_validation_step_that_raises_mid_epoch_leaves_no_hook(tmp_path):
    model = _HookCounter(raise_at=(1, 1))  # epoch 1's second validation batch
    cb = FeatureMapCallback(layers=["conv1", "conv2"], examples=3)
    with pytest.raises(RuntimeError, match="user's validation_step exploded"):
        _fit(tmp_path, cb, model=model, max_epochs=3)
    assert model.seen[-1] == ("val", 1, 1)  # the examples' hook was live when it raised
    assert all(not m._forward_hooks for m in model.modules())
    assert all(not m._forward_pre_hooks for m in model.modules())


# ---------------------------------------------------------------- order="activation"


@pytest.mark.parametrize("sanity_steps", [2, 0], ids=["sanity check", "no sanity check"])
def test_order_activation_examples_rows_are_the_channels_the_maps_draw(
    tmp_path, monkeypatch, sanity_steps
):
    # Without a sanity check the first validation starts with no probe: its first inputs,
    # which become the probe, choose the channels before any batch is streamed.
    results = _record(monkeypatch, fm_lightning.pictures.examples, "examples_grid")
    drawn = _record(monkeypatch, rendering, "feature_picture")
    cb = FeatureMapCallback(
        layers=["conv1", "conv2"], examples=2, max_channels=5, order="activation"
    )
    _fit(tmp_path, cb, max_epochs=3, num_sanity_val_steps=sanity_steps)
    examples_rows = [args[0].channels.tolist() for args, _ in results]
    maps_columns = [kwargs["channels"].tolist() for _, kwargs in drawn]
    assert len(examples_rows) == 6  # 2 layers x 3 epochs, in the same order as the maps
    assert examples_rows == maps_columns  # the same channels, in the same order
    # not simply the first channels, else this test could not tell
    assert any(channels != list(range(5)) for channels in maps_columns)
    if sanity_steps == 0:  # and epoch 0, the case without a probe at its start, in particular
        assert maps_columns[0] != list(range(5)), maps_columns[0]


# ---------------------------------------------------------------- unusual set-ups


def test_absurd_examples_are_refused_at_construction_with_the_bound():
    for k in (10**6, 101, -1):
        with pytest.raises(
            ValueError, match=rf"expected `examples` to be an int in \[0, 100\], got {k}"
        ):
            FeatureMapCallback(layers=["conv1"], examples=k)
    assert FeatureMapCallback(layers=["conv1"], examples=100).examples == 100


def test_examples_beyond_the_validation_set_keep_only_the_inputs_there_are(tmp_path, monkeypatch):
    drawn = _record(monkeypatch, fm_lightning.pictures.examples, "examples_grid")
    cb = FeatureMapCallback(layers=["conv2"], examples=100, save_dir=str(tmp_path / "maps"))
    val = random_loader(n=24, seed=1)
    _fit(tmp_path, cb, val=val, max_epochs=1, limit_val_batches=1.0)
    (((result,), _),) = drawn
    assert result.scores.shape == (32, 24)  # 24 slots a channel, not 100
    assert (result.indices >= 0).all()  # every slot an input, no empty ones
    caption = json.loads((tmp_path / "maps" / "stats.json").read_text())["history"][0]["captions"]
    assert caption["conv2/examples"].startswith("epoch 0: top 24 validation inputs")


class _EmptyBatches(torch.utils.data.Dataset):
    """Validation batches, prebuilt: some with 0 rows (first and in the middle)."""

    def __init__(self, x, y, sizes):
        starts = np.cumsum([0, *sizes])
        self.batches = [(x[a:b], y[a:b]) for a, b in zip(starts[:-1], starts[1:], strict=True)]

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]


class _SkipsEmpty(ImageClassifier):
    """A model whose validation_step passes over batches with no rows (torchmetrics cannot)."""

    def validation_step(self, batch, batch_idx):
        if len(batch[0]):
            super().validation_step(batch, batch_idx)


def test_a_validation_batch_with_no_rows_is_a_no_op(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 1, 28, 28, generator=g), torch.randint(0, 10, (24,), generator=g)

    def examples(sizes, name):
        drawn = _record(monkeypatch, fm_lightning.pictures.examples, "examples_grid")
        cb = FeatureMapCallback(
            layers=["conv1", "conv2"], examples=3, save_dir=str(tmp_path / name), strict=True
        )
        val = DataLoader(_EmptyBatches(x, y, sizes), batch_size=None)
        torch.manual_seed(0)  # the same weights in both fits
        model = _SkipsEmpty(SimpleCNN())
        _fit(tmp_path / name, cb, model=model, val=val, max_epochs=2, limit_val_batches=1.0)
        return [args[0] for args, _ in drawn]

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        gaps = examples([0, 8, 0, 8, 0, 8], "gaps")
    assert not [w for w in record if "examples" in str(w.message)], [str(w.message) for w in record]
    plain = examples([8, 8, 8], "plain")
    assert len(gaps) == len(plain) == 4  # both layers, both epochs: none dropped
    for a, b in zip(gaps, plain, strict=True):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.scores, b.scores)


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_low_precision_models_measure_the_receptive_field_in_their_dtype(
    tmp_path, monkeypatch, precision
):
    fields = _record(monkeypatch, fm_lightning.pictures.examples, "receptive_field")
    measured = []  # what each call returned
    real = fm_lightning.pictures.examples.receptive_field
    monkeypatch.setattr(
        fm_lightning.pictures.examples,
        "receptive_field",
        lambda *a, **kw: measured.append(real(*a, **kw)) or measured[-1],
    )
    cb = FeatureMapCallback(
        layers=["conv2"], examples=3, save_dir=str(tmp_path / "maps"), strict=True
    )
    # SGD with lr=0: Adam's eps (1e-8) is 0 in float16 and would fill the weights with NaN
    model = ImageClassifier(SimpleCNN(), optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    _fit(tmp_path, cb, model=model, max_epochs=1, precision=precision)
    dtype = {"bf16-true": torch.bfloat16, "16-true": torch.float16}[precision]
    ((args, _),) = fields  # measured once, in the model's dtype
    assert args[2].dtype == dtype
    png = _assert_not_blank(tmp_path / "maps" / "conv2" / "examples" / "epoch=000.png")
    # the same field as the float32 model's: 5x5 conv, 2x2 pool, 5x5 conv
    model = SimpleCNN()
    rf = receptive_field(model, model.conv2, torch.randn(2, 1, 28, 28))
    assert measured == [rf]
    assert _grid_rows(png, rf.height) == 32  # a row per channel


# ---------------------------------------------------------------- DDP (subprocesses)


def _ddp_examples(tmp_path, devices: int, val_size: int, sampler: str = "distributed") -> list:
    out = tmp_path / f"devices={devices}-{sampler}"
    cmd = [sys.executable, HERE, str(out), "--devices", str(devices), "--val-size", str(val_size)]
    cmd += ["--sampler", sampler]
    # PYTHONPATH: the processes import this checkout's fm_lightning, whatever is installed
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": path}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    drew = sorted(line for line in proc.stdout.splitlines() if line.startswith("rank="))
    # rank zero alone draws: 2 layers x 2 epochs
    assert drew == [f"rank={r} drew={4 if r == 0 else 0}" for r in range(devices)], proc.stdout
    pngs = sorted(glob.glob(str(out / "maps" / "*" / "examples" / "*.png")))
    assert [os.path.relpath(p, out / "maps") for p in pngs] == [
        f"{layer}/examples/epoch={epoch:03d}.png"
        for layer in ("conv1", "conv2")
        for epoch in (0, 1)
    ]
    return torch.load(out / "examples.pt")  # [{field: tensor}] per drawn grid


def _assert_same_examples(two, one):
    assert len(two) == len(one) == 4
    for a, b in zip(two, one, strict=True):
        for field in ("channels", "indices", "positions"):  # same inputs, same order
            assert torch.equal(a[field], b[field]), field
        # Other batches give the same per-input values up to float rounding of the conv.
        for field in ("scores", "crops", "overlays", "channel_max"):
            torch.testing.assert_close(a[field], b[field], equal_nan=True, msg=field)


@pytest.mark.slow
def test_ddp_two_cpu_processes_give_the_examples_of_one(tmp_path):
    one = _ddp_examples(tmp_path, devices=1, val_size=64)
    two = _ddp_examples(tmp_path, devices=2, val_size=64)
    _assert_same_examples(two, one)


@pytest.mark.slow
def test_ddp_padded_shard_counts_the_repeated_input_once(tmp_path):
    # 63 inputs on 2 ranks: DistributedSampler pads rank 1's shard with input 0 again.
    one = _ddp_examples(tmp_path, devices=1, val_size=63)
    first = int(content_ids(_ddp_inputs(63)[:1]))  # input 0, as the callback identifies it
    assert any((r["indices"] == first).any() for r in one)  # it is in some channel's top-k
    two = _ddp_examples(tmp_path, devices=2, val_size=63)
    _assert_same_examples(two, one)


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["none", "shard"])
def test_ddp_without_distributed_sampler_gives_the_true_top_k(tmp_path, sampler):
    # none: use_distributed_sampler=False, every rank validates all 64 inputs in order;
    # shard: a custom sampler gives rank r the inputs r*32..r*32+31 (not DistributedSampler's
    # strided shards). Either way the merged top-k is the one process's over the 64 inputs.
    one = _ddp_examples(tmp_path, devices=1, val_size=64)
    two = _ddp_examples(tmp_path, devices=2, val_size=64, sampler=sampler)
    _assert_same_examples(two, one)
    for result in one:  # distinct inputs, none dropped as a duplicate of another
        kept = result["indices"][result["indices"] >= 0]
        assert len(kept) == result["indices"].numel()


# ---------------------------------------------------------------- the DDP script


class _Shards(torch.utils.data.Sampler):
    """Rank r of w gets the r-th contiguous block of the inputs (rank known once DDP runs)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def _block(self) -> range:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        size = self.n // world
        return range(rank * size, (rank + 1) * size)

    def __iter__(self):
        return iter(self._block())

    def __len__(self) -> int:
        return len(self._block())


def _ddp_inputs(val_size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(val_size, 1, 28, 28, generator=g)  # (N, 1, 28, 28)
    x[0] *= 3  # input 0 excites most channels most: among the top-k, where padding repeats it
    return x


def _ddp_main() -> None:
    parser = argparse.ArgumentParser(description="fit with examples, save rank zero's results")
    parser.add_argument("out")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--val-size", type=int, default=64)
    parser.add_argument(
        "--sampler", choices=["distributed", "none", "shard"], default="distributed"
    )
    args = parser.parse_args()

    drawn = []  # every ExamplesResult this process draws (rank zero alone draws)
    real_grid = fm_lightning.pictures.examples.examples_grid

    def recording_grid(result, *a, **kw):
        drawn.append(result)
        return real_grid(result, *a, **kw)

    fm_lightning.pictures.examples.examples_grid = recording_grid
    x = _ddp_inputs(args.val_size)
    labels = torch.randint(0, 10, (args.val_size,), generator=torch.Generator().manual_seed(2))
    sampler = _Shards(args.val_size) if args.sampler == "shard" else None
    val = DataLoader(TensorDataset(x, labels), 8, sampler=sampler)
    torch.manual_seed(0)  # the same weights in every process and run; a zero learning rate
    model = ImageClassifier(SimpleCNN(), optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    cb = FeatureMapCallback(
        layers=["conv1", "conv2"], examples=5, max_channels=8, save_dir=f"{args.out}/maps"
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        use_distributed_sampler=args.sampler == "distributed",
        max_epochs=2,
        limit_train_batches=2,
        num_sanity_val_steps=0,
        logger=False,
        callbacks=[cb],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, random_loader(n=32), val)
    if trainer.is_global_zero:
        plain = [{f.name: getattr(r, f.name).cpu() for f in fields(r)} for r in drawn]
        torch.save(plain, os.path.join(args.out, "examples.pt"))
    print(f"rank={trainer.global_rank} drew={len(drawn)}", flush=True)
    if torch.distributed.is_initialized():  # devices=1 starts no process group
        # Lightning leaves the process group up; destroyed here, its gloo threads cannot abort the
        # exit of a finished run ("terminate called without an active exception").
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _ddp_main()
