"""What does similarity=512 cost the default run: fit time with it on and off, side by side.

    python benchmarks/similarity_fit.py                     # ~6 min on an idle 2-core CPU
    python benchmarks/similarity_fit.py --repeats 5 --epochs 2 --train-batches 860

The default run's callback (configs/default.yaml: conv1 and conv2, 8 probe images, examples=9,
GradCAM at relu2) with similarity=512 and with similarity=0, on SimpleCNN and MNIST (batches of
64, the whole 5,000-input validation every epoch), fits alternating AB/BA with an untimed warm-up
of each. Printed: both fits' times and their ratio (target, issue 19 section 4: <= 1.02 by the
per-round median), the validation time of each, and the time inside the similarity kind's own
steps per captured epoch (start, finish with its Grams, draw, and the recorder's work in the hooks:
timed directly, so it cannot drown in the fit's noise).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import common
import torch

from fm_lightning import FeatureMapCallback, ImageClassifier, MNISTDataModule, SimpleCNN
from fm_lightning.cka import SimilarityRecorder
from fm_lightning.pictures.similarity import SimilarityKind

parser = common.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
parser.add_argument("--repeats", type=int, default=3, help="similarity on/off fit pairs")
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--train-batches", type=int, default=860, help="a whole epoch: 860")
parser.add_argument("--n", type=int, default=512, help="inputs compared")
parser.add_argument("--seed", type=int, default=42)
args = parser.parse_args()
device = common.pick_device(args.device)
common.print_env(device)
common.quiet_lightning()

dm = MNISTDataModule(args.data_dir, batch_size=64, seed=args.seed)
dm.prepare_data()
dm.setup("fit")  # every fit reuses these in-memory splits

# Seconds inside each of the similarity kind's steps, for the fit being run.
spent: dict[str, float] = {}


def _timed(owner: type, name: str) -> None:
    real = getattr(owner, name)

    def wrapper(self, *a, **kw):
        t0 = time.perf_counter()
        try:
            return real(self, *a, **kw)
        finally:
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0

    setattr(owner, name, wrapper)


# The kind's steps; the hooks' own work is the recorder's observe/observe_inputs (sketch, copy,
# hash), its Grams record() (inside finish).
for _owner, _name in [
    (SimilarityKind, "start"),
    (SimilarityKind, "finish"),
    (SimilarityKind, "draw"),
    (SimilarityRecorder, "observe"),
    (SimilarityRecorder, "observe_inputs"),
]:
    _timed(_owner, _name)


def fit_seconds(n: int) -> float:
    spent.clear()
    cb = FeatureMapCallback(
        ["conv1", "conv2"], num_images=8, examples=9, cam="GradCAM", cam_layer="relu2", similarity=n
    )
    with tempfile.TemporaryDirectory() as tmp:
        trainer = common.quiet_trainer(
            tmp, [cb], device=device, max_epochs=args.epochs, limit_train_batches=args.train_batches
        )
        torch.manual_seed(args.seed)
        model = ImageClassifier(SimpleCNN())
        with common.Timer(device) as t:
            trainer.fit(model, datamodule=dm)
    if n:
        per_step.append(dict(spent))
    return t.s


per_step: list[dict[str, float]] = []
fit_seconds(args.n)  # untimed warm-up of both
fit_seconds(0)
per_step.clear()
fits = common.interleaved(
    {"on": lambda: fit_seconds(args.n), "off": lambda: fit_seconds(0)}, args.repeats
)
common.spread_warning(fits)
ratios = common.ratios(fits["on"], fits["off"])
per_round = [a / b for a, b in zip(fits["on"], fits["off"], strict=True)]
resolution = 1.2533 * statistics.stdev(per_round) / len(per_round) ** 0.5 if args.repeats > 1 else 0
print(f"  fit, similarity={args.n}   {common.fmt_s(fits['on'])}")
print(f"  fit, similarity=0     {common.fmt_s(fits['off'])}")
print(common.fmt_ratios("fit similarity on/off", ratios))
print(f"  wall-clock resolution: +-{resolution:.1%} (standard error of the per-round median)")
names = sorted({k for p in per_step for k in p})
steps = {k: common.median([p.get(k, 0.0) for p in per_step]) / args.epochs for k in names}
inside = sum(steps.values())
fit_off = common.median(fits["off"])
print(
    f"  inside the similarity kind per captured epoch: {inside * 1e3:.0f} ms ("
    + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in steps.items())
    + f"); x {args.epochs} epochs = {inside * args.epochs / fit_off:.2%} of the fit without it"
)
ratio = ratios["per-round median"]
verdict = "PASS" if ratio <= 1.02 else "FAIL"
print(
    f"TARGET fit time with similarity={args.n} within 2% of without: {ratio:.4f} "
    f"+- {resolution:.3f} (median of {args.repeats} paired rounds) -> {verdict}"
)
