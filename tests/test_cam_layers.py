"""CAM at any layer the feature maps can draw: containers, in-place ops after the layer, tokens.

Real torchcam on small real models; the maps are compared with those of a twin model that
differs only in the point under test.
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import numpy as np
import pytest
import torch
from conftest import random_loader, tiny_trainer
from measuring import ChannelNorm
from PIL import Image
from torch import Tensor, nn

from fm_lightning import FeatureMapCallback, ImageClassifier
from fm_lightning.cam import class_activation_maps
from fm_lightning.pictures.cam import cam_grid


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class Net(nn.Module):
    """conv -> ReLU -> conv block (optionally returning (maps, extra)) -> pool -> linear."""

    def __init__(self, inplace: bool = False, tuple_out: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.act = nn.ReLU(inplace=inplace)
        self.block = Block(tuple_out)
        self.head = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        y = self.block(self.act(self.conv1(x)))
        y = y[0] if isinstance(y, tuple) else y
        return self.head(self.act(y).mean(dim=(2, 3)))


class Block(nn.Module):
    def __init__(self, tuple_out: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.tuple_out = tuple_out

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        y = self.conv(x)
        return (y, y.mean(dim=1)) if self.tuple_out else y


def twins(**kwargs) -> tuple[nn.Module, nn.Module]:
    plain = Net().eval()
    other = Net(**kwargs).eval()
    other.load_state_dict(plain.state_dict())
    return plain, other


@pytest.mark.parametrize("method", ["GradCAM", "LayerCAM", "ScoreCAM"])
def test_a_layer_followed_by_an_inplace_relu_gives_the_out_of_place_map(method):
    plain, inplace = twins(inplace=True)
    x, y = torch.randn(6, 1, 12, 12), torch.arange(6) % 5
    want = class_activation_maps(plain, x, method, layer="conv1", targets=y)
    got = class_activation_maps(inplace, x, method, layer="conv1", targets=y)
    assert want.pred_maps.amax() > 0.5  # not blank
    torch.testing.assert_close(got.pred_maps, want.pred_maps)
    torch.testing.assert_close(got.true_maps, want.true_maps)


@pytest.mark.parametrize("method", ["GradCAM", "XGradCAM", "ScoreCAM"])
def test_a_layer_returning_a_tuple_uses_its_first_tensor(method):
    plain, tupled = twins(tuple_out=True)
    x = torch.randn(4, 1, 12, 12)
    want = class_activation_maps(plain, x, method, layer="block")
    got = class_activation_maps(tupled, x, method, layer="block")
    assert want.pred_maps.amax() > 0.5
    torch.testing.assert_close(got.pred_maps, want.pred_maps)


def test_the_callback_takes_cam_at_a_layer_as_measured_not_as_its_class_names_say(tmp_path):
    # By its modules (a LayerNorm only) `norm` looks channels-last; it returns NCHW maps.
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        ChannelNorm(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )
    model = ImageClassifier(net, num_classes=10)
    cb = FeatureMapCallback(
        layers=["1"], num_images=4, cam="GradCAM", cam_layer="1", save_dir=tmp_path
    )
    loader = random_loader(n=16)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        tiny_trainer(tmp_path, [cb], max_epochs=1).fit(model, loader, loader)
    assert [str(w.message) for w in record if "FeatureMapCallback" in str(w.message)] == []
    # The same maps, taken straight from the (N, C, H, W) output with no reshape at all.
    result = class_activation_maps(
        model, cb.probe, "GradCAM", layer="net.1", targets=cb.probe_targets
    )
    result = dataclasses.replace(result, layer="1")  # named as cam_layer names it
    want = cam_grid(cb.probe.float(), result, cmap=cb.cmap).numpy()
    got = np.asarray(Image.open(os.path.join(tmp_path, "cam", "epoch=000.png")).convert("RGB"))
    assert np.array_equal(got, want)
