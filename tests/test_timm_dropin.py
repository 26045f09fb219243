"""FeatureMapCallback on real timm models (random weights) in a real Trainer: what the PNGs show.

A ViT's blocks drawn as h x w token grids, a channels-last ConvNeXt block's ``norm`` and
``mlp.fc1`` with their real channel counts, a ResNet's stages and global pool as 1x1 maps. The
models are timm's own architectures made tiny (32x32 inputs, few blocks) so each test takes seconds.
Each frame is opened and compared, pixel for pixel, with what ``rendering.feature_picture`` draws
for the expected (N, C, h, w) maps of the trained model; captions are read as the callback hands
them to its loggers.
"""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest
import timm
import torch
from conftest import random_loader, tiny_trainer
from PIL import Image

from fm_lightning import FeatureMapCallback, ImageClassifier, callbacks, publishing, rendering
from fm_lightning.capture import capture, resolve_layers
from fm_lightning.files import safe_path_part
from fm_lightning.layouts import Fallback
from fm_lightning.probing import measure_layouts

NUM_IMAGES = 4  # the callback's default probe size


@pytest.fixture
def published(monkeypatch) -> list[publishing.Picture]:
    """Every picture the callback hands to its loggers, recorded on its way to the real publish."""
    pictures: list[publishing.Picture] = []

    def recording_publish(loggers, drawn, *args, **kwargs):
        pictures.extend(drawn.pictures)
        return publishing.publish(loggers, drawn, *args, **kwargs)

    monkeypatch.setattr(callbacks, "publish", recording_publish)
    return pictures


def _fit(tmp_path, net, layers, shape, **cb_kwargs) -> tuple[FeatureMapCallback, ImageClassifier]:
    """One epoch of one training batch and one validation batch: the probe, then one frame."""
    torch.manual_seed(0)
    model = ImageClassifier(net)
    cb = FeatureMapCallback(layers=layers, num_images=NUM_IMAGES, **cb_kwargs)
    trainer = tiny_trainer(
        tmp_path,
        [cb],
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=1,
        num_sanity_val_steps=0,
    )
    loaders = [random_loader(8, shape, batch_size=NUM_IMAGES, seed=seed) for seed in (0, 1)]
    trainer.fit(model, *loaders)
    return cb, model


def _frame(cb, layer) -> np.ndarray:
    """The one PNG of ``layer``, as (H, W, 3) uint8."""
    (frame,) = glob.glob(os.path.join(cb.local_dir, safe_path_part(layer), "epoch=*.png"))
    return np.asarray(Image.open(frame).convert("RGB"))


def _caption(published, layer) -> str:
    (caption,) = [p.caption for p in published if p.tag == f"feature_maps/{layer}"]
    return caption


def _grid_shape(shape, max_channels: int = 32) -> tuple[int, ...]:
    """Pixel size feature_grid gives for maps of ``shape`` (N, C, h, w)."""
    return tuple(rendering.feature_grid(torch.rand(shape), max_channels=max_channels).shape)


def _tiles(png: np.ndarray, n: int, c: int, h: int, w: int) -> np.ndarray:
    """(n, c, th, tw, 3): the tiles of a grid of n rows x c columns of h x w maps (padding 1)."""
    th, tw = _grid_shape((1, 1, h, w))[:2]
    th, tw = th - 2, tw - 2  # the lone tile's border
    return np.stack(
        [
            np.stack([png[1 + i * (th + 1) :][:th, 1 + j * (tw + 1) :][:, :tw] for j in range(c)])
            for i in range(n)
        ]
    )


def _expected_pngs(model, cb, layers, max_channels: int = 32, draw=rendering.feature_picture):
    """What the trained model's maps of ``layers`` look like, captured and drawn afresh, read as
    measured on the model: the labelled pictures, or with ``draw=rendering.feature_grid`` their
    grids (the pictures' top-left block under the channel numbers, as tests/test_rendering.py
    checks)."""
    modules = resolve_layers(model, layers)
    readings = measure_layouts(model, cb.probe, modules)
    assert not any(isinstance(r, Fallback) for r in readings.values()), readings
    captured, _ = capture(model, cb.probe, modules, max_channels=max_channels, readings=readings)
    return {layer: draw(cap.act, channels=cap.channels).numpy() for layer, cap in captured.items()}


# ----------------------------------------------------------------------------------- ViT


def test_vit_blocks_are_drawn_as_token_grids_with_every_channel(tmp_path, published):
    # 32x48 images in 8x8 patches: a 4x6 token grid plus the CLS token, 48 channels, 2 blocks.
    net = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=(32, 48),
        patch_size=8,
        depth=2,
        embed_dim=48,
        num_heads=3,
        num_classes=10,
    )
    cb, model = _fit(tmp_path, net, ["blocks.*"], (3, 32, 48), max_channels=64)
    expected = _expected_pngs(model, cb, ["blocks.*"], max_channels=64)
    grids = _expected_pngs(model, cb, ["blocks.*"], 64, rendering.feature_grid)
    for layer in ("blocks.0", "blocks.1"):
        png = _frame(cb, layer)
        # Every one of the 48 channels, each a 4x6 map; tokens read as channels would not fit.
        assert grids[layer].shape == _grid_shape((NUM_IMAGES, 48, 4, 6), max_channels=64)
        assert np.array_equal(png, expected[layer])
        caption = _caption(published, layer)
        assert "channels 0-47 of 48" in caption
        assert "measured: tokens 4x6 +1 prefix, 48 channels" in caption
        tiles = _tiles(grids[layer], NUM_IMAGES, 48, 4, 6).reshape(NUM_IMAGES * 48, -1, 3)
        assert all(len(np.unique(t, axis=0)) > 1 for t in tiles)  # no flat tile: not blank


# ------------------------------------------------------------------------------ ConvNeXt


@pytest.mark.parametrize(
    ("conv_mlp", "note"),
    # Linear on (N, H, W, C), or 1x1 convs
    [(False, "; measured: channels-last -> NCHW"), (True, "; measured: NCHW")],
)
def test_convnext_block_norm_and_fc1_are_drawn_with_their_real_channel_counts(
    tmp_path, published, conv_mlp, note
):
    net = timm.create_model("convnext_atto", pretrained=False, conv_mlp=conv_mlp, num_classes=10)
    norm, fc1 = "stages.0.blocks.0.norm", "stages.0.blocks.0.mlp.fc1"
    cb, model = _fit(tmp_path, net, [norm, fc1], (3, 32, 32))
    # The stem's stride 4 leaves 8x8 maps; stage 0 is 40 wide and its MLP 4x that.
    expected = _expected_pngs(model, cb, [norm, fc1])
    grids = _expected_pngs(model, cb, [norm, fc1], draw=rendering.feature_grid)
    for layer, channels in ((norm, 40), (fc1, 160)):
        png = _frame(cb, layer)
        assert grids[layer].shape == _grid_shape((NUM_IMAGES, 32, 8, 8))
        assert np.array_equal(png, expected[layer])
        assert _caption(published, layer).endswith(f"channels 0-31 of {channels}{note}")
        tiles = _tiles(grids[layer], NUM_IMAGES, 32, 8, 8).reshape(NUM_IMAGES * 32, -1, 3)
        assert all(len(np.unique(t, axis=0)) > 1 for t in tiles)  # no flat tile: not blank


# -------------------------------------------------------------------------------- ResNet


def test_resnet_stages_and_global_pool_are_drawn_with_visible_1x1_values(tmp_path, published):
    net = timm.create_model("resnet18", pretrained=False, num_classes=10)
    # On 32x32 inputs: layer1..layer4 give 8x8, 4x4, 2x2, 1x1 maps; the pool inside timm's
    # global_pool gives (N, 512, 1, 1), global_pool itself flattens to (N, 512) features.
    cb, model = _fit(tmp_path, net, ["layer*", "global_pool.pool", "global_pool"], (3, 32, 32))
    layers = ["layer*", "global_pool.pool", "global_pool"]
    expected = _expected_pngs(model, cb, layers)
    grids = _expected_pngs(model, cb, layers, draw=rendering.feature_grid)
    for layer, channels, side in (
        ("layer1", 64, 8),
        ("layer2", 128, 4),
        ("layer3", 256, 2),
        ("layer4", 512, 1),
        ("global_pool.pool", 512, 1),
    ):
        png = _frame(cb, layer)
        assert grids[layer].shape == _grid_shape((NUM_IMAGES, 32, side, side))
        assert np.array_equal(png, expected[layer])
        assert f"channels 0-31 of {channels}" in _caption(published, layer)
    for layer in ("layer4", "global_pool.pool"):
        tiles = _tiles(grids[layer], NUM_IMAGES, 32, 1, 1)
        for row in tiles:  # (32, th, tw, 3): each 1x1 map is one colour, but they differ
            colours = np.unique(row.reshape(32, -1, 3)[:, 0], axis=0)
            assert len(colours) > 8
    # The flattened pool: one heatmap row per image, all 512 features.
    assert "512 of 512 features" in _caption(published, "global_pool")
    assert np.array_equal(_frame(cb, "global_pool"), expected["global_pool"])
