"""The default run's CAM settings (configs/default.yaml) on a SimpleCNN trained on real MNIST.

    pytest tests/test_default_cam.py -s      # prints the figures the assertions rest on

A class-activation map taken before a ReLU is blank after GradCAM's own ReLU: SimpleCNN's conv2
output is mostly negative where the class evidence is. The default takes it after the ReLU
(``relu2``). The deletion check (Petsiuk et al., 2018) is measured and printed, not asserted:
see the README ("Where the model looks") for the figures and why, and
benchmarks/cam_faithfulness.py for them per method, layer and baseline on a default run.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import REPO

from fm_lightning import MNISTDataModule, SimpleCNN
from fm_lightning.cam import class_activation_maps
from fm_lightning.faithfulness import deletion_drops

STEPS, BATCH, IMAGES = 400, 64, 64
MIN_LIT = 0.2  # the median map has at least this fraction of its pixels ...
LIT_LEVEL = 0.2  # ... above this level (maps are scaled to their maximum, 1)


def default_cam_settings() -> dict:
    config = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    (cb,) = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("MapCallback")]
    return cb["init_args"]


@pytest.fixture(scope="module")
def trained(mnist_dir):
    """SimpleCNN after 400 Adam steps on MNIST (about 97% test accuracy), and 64 test images."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: two threads can be slower
    try:
        torch.manual_seed(0)
        dm = MNISTDataModule(mnist_dir)
        dm.setup()
        images, labels = dm.train_set.images, dm.train_set.labels
        net = SimpleCNN()
        opt = torch.optim.Adam(net.parameters(), lr=2e-3)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
        for step in range(STEPS):
            i = order[step * BATCH : (step + 1) * BATCH]
            loss = F.cross_entropy(net(dm.normalize(images[i])), labels[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        x = dm.normalize(dm.test_set.images[:IMAGES])
        with torch.no_grad():
            accuracy = (net(x).argmax(1) == dm.test_set.labels[:IMAGES]).float().mean().item()
        print(f"\ntrained {STEPS} steps; accuracy on the {IMAGES} test images: {accuracy:.3f}")
        yield net, x, dm.test_set.labels[:IMAGES]
    finally:
        torch.set_num_threads(threads)


def deletion_wins(net, x: torch.Tensor, maps: torch.Tensor) -> float:
    """Fraction of images whose predicted-class logit drops more when the map's top 20% of
    pixels are set to black than on average over 10 random sets of as many pixels."""
    by_map, by_chance = deletion_drops(net, x, maps, fill=x.min().item())
    print(f"median logit drop {by_map.median():.2f} (map) vs {by_chance.mean(0).median():.2f}")
    return (by_map > by_chance.mean(0)).float().mean().item()


@pytest.mark.slow
def test_default_cam_of_a_trained_simplecnn_is_not_blank(trained):
    net, x, y = trained
    settings = default_cam_settings()
    assert settings["cam_layer"] == "relu2"
    lit = {}
    for layer in ("conv2", settings["cam_layer"]):  # before and after the ReLU
        maps = class_activation_maps(net, x, settings["cam"], layer=layer, targets=y).pred_maps
        lit[layer] = (maps > LIT_LEVEL).flatten(1).float().mean(1).median().item()
        wins = deletion_wins(net, x, maps)
        print(f"{layer}: median map lit {lit[layer]:.3f}; deletion beats chance on {wins:.0%}")
    assert lit["relu2"] >= MIN_LIT, lit
    assert lit["conv2"] < 0.1, lit  # the pre-activation map this replaces: nearly blank
