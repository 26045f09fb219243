"""What does one class-activation-map capture cost, and what does it look like?

    python benchmarks/cam_capture.py                          # ~4 min on a 2-core CPU
    python benchmarks/cam_capture.py --fit-repeats 0          # the capture alone, ~20 s
    python benchmarks/cam_capture.py --method LayerCAM --layer conv2 --out /tmp/cam.png

Target: one capture (fm_lightning.cam.class_activation_maps) of 8 probe images on SimpleCNN under
100 ms on CPU, median over --repeats calls after 3 warm-up calls. Two cases: the labels of the
first 8 validation images (the briefly trained net gets them right, so only the predicted-class
maps are computed) and the same images with every label shifted by one (every prediction wrong,
so the true-class maps are computed too: the costlier path).

Also timed: drawing (cam_grid) and PNG encoding. And a picture: the grid of a SimpleCNN trained
for --train-batches batches of MNIST, for the first 6 validation images and the first 2 it gets
wrong (so the true-class column shows maps), is written to --out.

Target 2: fit time with ``cam`` on within 2% of the same fit with it off, for the callback as the
default run configures it (configs/default.yaml: layers conv1 and conv2, 8 probe images, top-9
examples; ``cam="GradCAM"``, ``cam_layer="relu2"`` or ``cam=None``). SimpleCNN on MNIST in
batches of 64, --fit-epochs epochs of --fit-train-batches batches and full validation (5,000
images), CSVLogger; on and off alternate, order flipping every round, --fit-repeats rounds; the
verdict is the median of the per-round ratios. The time spent drawing the CAM inside each fit
is reported too: a direct measure that does not drown in machine noise.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import common
import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger

from fm_lightning import FeatureMapCallback, ImageClassifier, MNISTDataModule, SimpleCNN
from fm_lightning.cam import CAM_METHODS, class_activation_maps
from fm_lightning.files import save_png, to_png_bytes
from fm_lightning.pictures.cam import cam_caption, cam_grid

TARGET_S = 0.100
PROBE = 8
FIT_RATIO_TARGET = 1.02

parser = common.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
parser.add_argument("--method", choices=CAM_METHODS, default="GradCAM")
parser.add_argument("--layer", default="relu2")
parser.add_argument("--repeats", type=int, default=50, help="timed calls per case")
parser.add_argument("--train-batches", type=int, default=150, help="batches of 64 to train on")
parser.add_argument("--out", default="/tmp/cam_grid.png", help="where the picture goes")
parser.add_argument("--seed", type=int, default=42)
parser.add_argument("--fit-repeats", type=int, default=6, help="cam on/off pairs of fits (0: skip)")
parser.add_argument("--fit-epochs", type=int, default=2)
parser.add_argument("--fit-train-batches", type=int, default=300, help="batches of 64 per epoch")
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

# -----------------------------------------------------------------------------
# 3. fit time with cam on vs off


class TimedCam(FeatureMapCallback):
    """FeatureMapCallback that adds up the wall time spent computing and drawing the CAM."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.cam_s = 0.0

    def _cam_pictures(self, trainer, pl_module):
        with common.Timer(device) as t:
            pictures = super()._cam_pictures(trainer, pl_module)
        self.cam_s += t.s
        return pictures


cam_seconds: list[float] = []  # per fit with cam on


def fit_seconds(cam: bool) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        # configs/default.yaml's callback, with cam on or off
        cb = TimedCam(
            layers=["conv1", "conv2"],
            num_images=8,
            examples=9,
            cam="GradCAM" if cam else None,
            cam_layer="relu2",
        )
        trainer = pl.Trainer(
            max_epochs=args.fit_epochs,
            limit_train_batches=args.fit_train_batches,
            logger=CSVLogger(tmp),
            callbacks=[cb],
            deterministic=True,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator=device.type,
            devices=1,
        )
        torch.manual_seed(args.seed)
        model = ImageClassifier(SimpleCNN())
        with common.Timer(device) as t:
            trainer.fit(model, datamodule=dm)
    if cam:
        cam_seconds.append(cb.cam_s)
    return t.s


if args.fit_repeats > 0:
    common.quiet_lightning()
    print(
        f"\n[3] fit time, cam on vs off: {args.fit_epochs} epochs x {args.fit_train_batches} "
        f"train batches of 64 + full validation ({len(dm.val_set)} images), "
        f"{args.fit_repeats} rounds"
    )
    fit_seconds(True)  # untimed warm-up of both: imports, colormaps, PNG and GIF encoders
    fit_seconds(False)
    cam_seconds.clear()
    fits = common.interleaved(
        {"cam on": lambda: fit_seconds(True), "cam off": lambda: fit_seconds(False)},
        args.fit_repeats,
    )
    on_vs_off = common.ratios(fits["cam on"], fits["cam off"])
    print(f"  cam on   {common.fmt_s(fits['cam on'])}")
    print(f"  cam off  {common.fmt_s(fits['cam off'])}")
    per_round = [a / b for a, b in zip(fits["cam on"], fits["cam off"], strict=True)]
    print(f"  per-round ratios on/off: {', '.join(f'{r:.3f}' for r in per_round)}")
    common.spread_warning(fits)
    print(common.fmt_ratios("on / off", on_vs_off, "(target <= 1.02, per-round median)"))
    cam_ms = common.median(cam_seconds) * 1e3
    print(
        f"  time computing and drawing the CAM: median {cam_ms:.0f} ms per fit "
        f"({args.fit_epochs} captures) = {cam_ms / 1e3 / common.median(fits['cam off']):.2%} "
        "of the median fit with cam off"
    )
    # How finely the wall clock can tell: standard error of the median of per-round ratios.
    if args.fit_repeats > 1:
        resolution = 1.2533 * statistics.stdev(per_round) / len(per_round) ** 0.5
        print(
            f"  wall-clock resolution: +-{resolution:.1%} (standard error of the per-round median)"
        )
    ratio = on_vs_off["per-round median"]
    common.target(
        f"fit time cam on / off <= {FIT_RATIO_TARGET} on {device.type}",
        ratio <= FIT_RATIO_TARGET,
        f"{ratio:.3f} (median of {args.fit_repeats} per-round ratios)",
    )
common.print_load("at end")
