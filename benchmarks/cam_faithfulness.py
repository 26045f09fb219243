"""How faithful the default run's class-activation maps are, by the deletion check, per setting.

    python benchmarks/cam_faithfulness.py logs/mnist/version_0/checkpoints/epoch=5-*.ckpt

Loads a SimpleCNN checkpoint of ``python train.py`` and takes, for the first N MNIST test images
(``--images``, default 256) and for the first 64 of them on their own (tests/test_default_cam.py's
count), the predicted-class map of each torchcam method at each layer, as the callback does
(``fm_lightning.cam.class_activation_maps``). Each map is scored by the deletion check
(``fm_lightning.faithfulness.deletion_drops``): set the 20% of pixels it ranks highest to a fill
value and compare the drop of the predicted class's logit with that for 20% random pixels.
Printed per layer, method and fill value (black: the images' minimum; mean: 0, the dataset's mean
after normalisation):

- ``lit``: the median map's share of pixels above 0.2 (the test's "not blank" criterion: >= 0.2);
- ``wins vs mean of 10``: the share of images where the map's drop beats the mean drop of 10
  random masks, with its 95% Wilson interval, on N images and on the first 64;
- ``wins vs 1 random``: the same against one random mask per image;
- the median logit drop by the map and by random pixels (mean of 10 per image), on N images;
- ``runner-up``: the median correlation of the predicted-class map with the runner-up's (the
  callback's second map): near 1, the map is much the same whatever the class; ``input``: its
  median correlation with the input image (near 1: it redraws the digit).
The first rows score the input itself as the map (its ink, black fill), which knows nothing of
the model: what the check gives a map that only points at the digit.
The issue's target: wins on >= 70% of 64 test images for the default setting (relu2, GradCAM,
black).
"""

from __future__ import annotations

import argparse
import math

import torch
from common import DEFAULT_DATA_DIR

from fm_lightning import MNISTDataModule
from fm_lightning.cam import class_activation_maps
from fm_lightning.checkpoints import load_checkpoint
from fm_lightning.faithfulness import deletion_drops

LAYERS = ("conv2", "relu2", "relu1")
METHODS = ("GradCAM", "GradCAMpp", "LayerCAM", "XGradCAM")
FIRST = 64  # tests/test_default_cam.py's number of images
HEADER = (
    f"{'layer':6s} {'method':9s} {'fill':5s} {'lit':>5s}  {'wins vs mean of 10, N':30s} "
    f"{'first 64':8s}  {'wins vs 1 random':30s} {'first 64':8s}  median drop map / random  "
    "runner-up  input"
)
Z95 = 1.959964


def wilson(wins: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    p, z2 = wins / n, Z95**2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return centre - half, centre + half


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Median over rows of the correlation of (N, H, W) maps a and b (0 where one is flat)."""
    a, b = a.flatten(1), b.flatten(1)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    r = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))  # (N,)
    return r.nan_to_num().median().item()


def rate(won: torch.Tensor) -> str:
    """'67.2% [55.0%, 77.5%]' for a (N,) bool tensor."""
    lo, hi = wilson(int(won.sum()), len(won))
    return f"{won.float().mean():6.1%} [{lo:.1%}, {hi:.1%}]"


parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("ckpt", help="a SimpleCNN checkpoint of python train.py (configs/default.yaml)")
parser.add_argument("--images", type=int, default=256, help="first N MNIST test images")
parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="holds MNIST/raw")
args = parser.parse_args()
if args.images < FIRST:
    parser.error(f"expected --images >= {FIRST}, got {args.images}")

torch.set_num_threads(1)  # a shared 2-core machine: two threads can be slower
net, _ = load_checkpoint(args.ckpt)  # a SimpleCNN in eval mode
dm = MNISTDataModule(args.data_dir)
dm.setup()
x = dm.normalize(dm.test_set.images[: args.images])  # (N, 1, 28, 28)
y = dm.test_set.labels[: args.images]
with torch.no_grad():
    accuracy = (net(x).argmax(1) == y).float().mean().item()
print(f"{args.ckpt}: accuracy on the first {len(x)} test images {accuracy:.2%}")
print(HEADER.replace("N", f"N={len(x)}", 1))
fills = {"black": x.min().item(), "mean": 0.0}


def row(layer: str, method: str, maps: torch.Tensor, fill_name: str, alike: str) -> None:
    """One table row: the deletion check of (N, H, W) ``maps`` with one fill value."""
    fill = fills[fill_name]
    lit = (maps > 0.2).flatten(1).float().mean(1).median().item()
    by_map, by_chance = deletion_drops(net, x, maps, fill=fill)
    # the first 64 as the test measures them: with their own random draws
    by_map64, by_chance64 = deletion_drops(net, x[:FIRST], maps[:FIRST], fill=fill)
    mean10, mean10_64 = by_map > by_chance.mean(0), by_map64 > by_chance64.mean(0)
    one, one64 = by_map > by_chance[0], by_map64 > by_chance64[0]
    print(
        f"{layer:6s} {method:9s} {fill_name:5s} {lit:5.2f}  {rate(mean10):30s} "
        f"{mean10_64.float().mean():8.1%}  {rate(one):30s} {one64.float().mean():8.1%}  "
        f"{by_map.median():5.2f} / {by_chance.mean(0).median():5.2f}            {alike}",
        flush=True,
    )


lo, hi = x.amin((1, 2, 3), keepdim=True), x.amax((1, 2, 3), keepdim=True)
ink = ((x - lo) / (hi - lo))[:, 0]  # (N, 28, 28) the input scaled to [0, 1] per image
for fill_name in fills:
    row("-", "input", ink, fill_name, "-          1.00")
for layer in LAYERS:
    for method in METHODS:
        result = class_activation_maps(net, x, method, layer=layer, targets=y)
        maps = result.pred_maps  # (N, H, W)
        alike = f"{correlation(maps, result.second_maps):5.2f}      {correlation(maps, ink):.2f}"
        for fill_name in fills:
            row(layer, method, maps, fill_name, alike)
