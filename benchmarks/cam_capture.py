"""What does one class-activation-map capture cost, and what does it look like?

    python benchmarks/cam_capture.py                          # ~20 s on a 2-core CPU
    python benchmarks/cam_capture.py --method LayerCAM --layer conv2 --out /tmp/cam.png

Target: one capture (fm_lightning.cam.class_activation_maps) of 8 probe images on SimpleCNN under
100 ms on CPU, median over --repeats calls after 3 warm-up calls. Two cases: the labels of the
first 8 validation images (the briefly trained net gets them right, so only the predicted-class
maps are computed) and the same images with every label shifted by one (every prediction wrong,
so the true-class maps are computed too: the costlier path).

Also timed: drawing (cam_grid) and PNG encoding. And a picture: the grid of a SimpleCNN trained
for --train-batches batches of MNIST, for the first 6 validation images and the first 2 it gets
wrong (so the true-class column shows maps), is written to --out.
"""

from __future__ import annotations

import argparse
import time

import common
import torch
import torch.nn.functional as F

from fm_lightning import MNISTDataModule, SimpleCNN
from fm_lightning.cam import CAM_METHODS, cam_caption, cam_grid, class_activation_maps
from fm_lightning.files import save_png, to_png_bytes

TARGET_S = 0.100
PROBE = 8

parser = common.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
parser.add_argument("--method", choices=CAM_METHODS, default="GradCAM")
parser.add_argument("--layer", default="conv2")
parser.add_argument("--repeats", type=int, default=50, help="timed calls per case")
parser.add_argument("--train-batches", type=int, default=150, help="batches of 64 to train on")
parser.add_argument("--out", default="/tmp/cam_grid.png", help="where the picture goes")
parser.add_argument("--seed", type=int, default=42)
parser.add_argument(
    "--threads", type=int, help="torch threads while timing (default: torch's); 1 on a busy machine"
)
args = parser.parse_args()

device = common.pick_device(args.device)
threads = args.threads or torch.get_num_threads()
# Training is not timed: one thread, since two threads on a busy 2-core machine can be 30x slower.
torch.set_num_threads(1)

# -----------------------------------------------------------------------------
# a briefly trained SimpleCNN

print(f"training SimpleCNN for {args.train_batches} batches of 64 (not timed)")
dm = MNISTDataModule(args.data_dir, batch_size=64, seed=args.seed)
dm.prepare_data()
dm.setup("fit")
torch.manual_seed(args.seed)
model = SimpleCNN().to(device)
opt = torch.optim.Adam(model.parameters(), lr=2e-3)
t0 = time.perf_counter()
for i, (images, labels) in enumerate(dm.train_dataloader()):
    if i == args.train_batches:
        break
    loss = F.cross_entropy(model(dm.normalize(images.to(device))), labels.to(device))
    opt.zero_grad()
    loss.backward()
    opt.step()
val_x = dm.normalize(dm.val_set.images[:1000]).to(device)  # (1000, 1, 28, 28)
val_y = dm.val_set.labels[:1000].to(device)
with torch.no_grad():
    accuracy = (model.eval()(val_x).argmax(1) == val_y).float().mean().item()
print(
    f"trained in {time.perf_counter() - t0:.1f}s: accuracy {accuracy:.1%} on 1000 validation images"
)
torch.set_num_threads(threads)
common.print_env(device)

# -----------------------------------------------------------------------------
# 1. capture time


def time_capture(x: torch.Tensor, y: torch.Tensor) -> list[float]:
    for _ in range(3):
        class_activation_maps(model, x, args.method, args.layer, y)
    times = []
    for _ in range(args.repeats):
        with common.Timer(device) as t:
            class_activation_maps(model, x, args.method, args.layer, y)
        times.append(t.s)
    return times


probe_x, probe_y = val_x[:PROBE], val_y[:PROBE]
print(f"\n[1] one {args.method} capture of {PROBE} images on {args.layer}, {args.repeats} calls")
for case, labels in (
    ("labels as given", probe_y),
    ("every label wrong (true-class maps too)", (probe_y + 1) % 10),
):
    wrong = class_activation_maps(model, probe_x, args.method, args.layer, labels).pred != labels
    times = time_capture(probe_x, labels)
    median = common.median(times)
    print(
        f"  {case} ({int(wrong.sum())} of {PROBE} predictions differ): median "
        f"{median * 1e3:.1f} ms, p90 {common.percentile(times, 90) * 1e3:.1f} ms"
    )
    common.target(
        f"capture < {TARGET_S * 1e3:.0f} ms on {device.type} ({case})",
        median < TARGET_S,
        f"median {median * 1e3:.1f} ms",
    )

# -----------------------------------------------------------------------------
# 2. drawing, and the picture

with torch.no_grad():
    missed = (model(val_x).argmax(1) != val_y).nonzero().flatten()[:2]
pick = torch.cat([torch.arange(6, device=device), missed])
result = class_activation_maps(model, val_x[pick], args.method, args.layer, val_y[pick])
render, encode = [], []
for _ in range(args.repeats):
    t0 = time.perf_counter()
    grid = cam_grid(val_x[pick], result)
    t1 = time.perf_counter()
    to_png_bytes(grid)
    render.append(t1 - t0)
    encode.append(time.perf_counter() - t1)
print(
    f"\n[2] cam_grid of {len(pick)} images ({tuple(grid.shape)}): median "
    f"{common.median(render) * 1e3:.1f} ms; PNG encoding: median "
    f"{common.median(encode) * 1e3:.1f} ms"
)
print(f"wrote {save_png(grid, args.out)}")
print(f"caption: {cam_caption(result)}")
common.print_load("at end")
