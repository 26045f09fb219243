"""The figures behind the README's reading of the default run's CAM picture.

    python benchmarks/cam_reading.py logs/mnist/version_0/checkpoints/last.ckpt

Loads a default run's checkpoint and the FeatureMapCallback probe stored in it, takes GradCAM at
``conv2`` (before SimpleCNN's ReLU) and ``relu2`` (after it) as the callback does, and prints per
map: the fraction of pixels above 0.2, the share of the map's weight on the digit (input above
half its range) and on the digit grown by 2 pixels, and the correlation of the predicted-class map
with the second (runner-up or true-class) map.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from fm_lightning import ImageClassifier, SimpleCNN
from fm_lightning.cam import class_activation_maps

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("ckpt", help="a checkpoint of python train.py (configs/default.yaml)")
args = parser.parse_args()

ckpt = torch.load(args.ckpt, weights_only=False, map_location="cpu")  # your own run's file
model = ImageClassifier(SimpleCNN())
model.load_state_dict(ckpt["state_dict"])
model.eval()
(state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("FeatureMapCallback")]
probe, targets = state["probe"].float(), state["targets"]  # (N, 1, 28, 28), (N,)
x = probe[:, 0]
lo, hi = x.amin((1, 2), keepdim=True), x.amax((1, 2), keepdim=True)
digit = (x - lo) / (hi - lo) > 0.5  # (N, 28, 28)
grown = F.max_pool2d(digit[:, None].float(), 5, 1, 2)[:, 0] > 0  # the digit grown by 2 px
print(f"epoch {ckpt['epoch']}: the digit grown by 2 px covers {grown.float().mean():.0%}")
for layer in ("net.conv2", "net.relu2"):
    r = class_activation_maps(model, probe, "GradCAM", layer=layer, targets=targets)
    for name, maps in (("predicted", r.pred_maps), ("second", r.second_maps)):
        lit = (maps > 0.2).flatten(1).float().mean(1)  # (N,)
        mass = maps.flatten(1).sum(1).clamp_min(1e-12)
        on_digit = ((maps * digit).flatten(1).sum(1) / mass).median()
        on_grown = ((maps * grown).flatten(1).sum(1) / mass).median()
        print(
            f"{layer} {name}: pixels above 0.2 per row {[round(v, 2) for v in lit.tolist()]}, "
            f"median {lit.median():.0%}; weight on the digit {on_digit:.0%}, grown {on_grown:.0%}"
        )
    pairs = torch.stack([r.pred_maps.flatten(1), r.second_maps.flatten(1)], dim=1)  # (N, 2, HW)
    corr = [round(torch.corrcoef(p)[0, 1].item(), 2) for p in pairs]
    print(f"{layer}: correlation of predicted and second map per row {corr}")
