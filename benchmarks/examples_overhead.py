"""What do top-k examples cost: FeatureMapCallback(examples=9) against examples=0.

    python benchmarks/examples_overhead.py                   # ~15 min on a 2-core CPU
    python benchmarks/examples_overhead.py --repeats 4 --train-batches 300 --device cpu  # shorter

The default run (configs/default.yaml): SimpleCNN on MNIST, batches of 64, whole epochs (860
training batches, 79 validation batches), layers conv1 and conv2, num_images 8; the only
difference between the contenders is ``examples``. ``--train-batches`` shortens the epochs, which
makes the fit ratio larger than the default run's (the examples cost the same per validation).

Targets (issues 9 and 16):
    1. validation loop time with examples=9 within 10% of examples=0 on a model whose forward
       dominates the loop: timm resnet18 (random weights) at 128 x 128, 2,000 validation images
       (MNIST's, upsampled), examples on two stages (layer2, layer4). The seconds from
       on_validation_start to the end of the callback's on_validation_end (its gather, render
       and publish included), in fits of two epochs of one training batch each. The verdict
       is on the second validation, as every captured epoch after a fit's first costs; the
       first, which also measures the layers' layouts and (with examples) their receptive
       fields once per fit, is reported beside it. Contenders alternate, order flipping every
       round; the verdict uses the median of per-round ratios.
       SimpleCNN's whole validation is ~0.6 s on 2 cores, so no streaming top-k stays within
       10% of it: its ratio is reported from the default-run fits, not judged.
    2. fit time with examples=9 within 2% of examples=0 on the default run. The examples run
       only inside validation (hooks on validation batches, merge, draw and publish at its end;
       nothing in training, and their frames are not in the fit-end GIFs), so the verdict is
       1 + (validation seconds added by examples) / (fit seconds without), paired per round:
       this host's wall clock moves whole fits by 5-15% between rounds, more than the 2%
       judged, and the part outside validation also moves with glibc's heap: measured
       2026-12-03 over 8 rounds, it ran 0.82-1.04x (median 0.88) with examples, whose freed
       candidate pools raise glibc's dynamic mmap threshold, so training's large tensors came
       from the heap sooner; with the threshold fixed (MALLOC_MMAP_THRESHOLD_=65536, every fit
       ~2x slower) 0.96-1.04x (median 1.004) over 4 rounds. The premise is checked: a
       FeatureMapCallback hook run outside validation (the kinds run only from its validation
       hooks) makes the verdict FAIL. The whole fit's ratio and the rest's are printed.
    3. the top-k state's bytes, read from the streams of those fits, against the bound
       layers x drawn channels x k x (crop + overlay pixels ...): nothing grows with the
       validation set; and the most the candidate pool held between rankings, against
       TopKExamples.pool_bytes plus one batch's candidates.
    4. process RSS flat over 30 captured epochs (tiny epochs: 2 training and 4 validation
       batches), read after gc.collect() at the end of each validation, in a fresh process per
       contender with glibc's mmap threshold fixed at 64 KiB (see rss_in_child). Flat means no
       trend: the least-squares slope of RSS over the epochs after a warm-up, with examples=9,
       below the smallest top-k state a layer keeps (from 3.: a leak of even that once per
       epoch is caught), and the bytes of live tensors grown no more than with examples=0
       (both contenders gain 28 bytes at epoch 24). Not the growth from the first reading to
       the last: RSS moves up and down by a few hundred KiB between epochs with examples
       (measured 2026-12-03: the same code read +200 and +508 KiB from epoch 5 to 29 in two
       runs, -516 KiB in a third),
       more than examples=0's span, while live tensors grew as without examples; 30-epoch
       slopes read -6.5 and +18.7 KiB/epoch. Over 120 captured epochs (``--rss-child 9
       --captures 120`` under the same environment) the readings stayed within 976 KiB with
       no trend: slope +2.4 KiB/epoch, last minus epoch 5's +128 KiB.

Where the time goes is measured directly too: the seconds spent in the examples' own code
(the per-batch hook: reading maps and TopKExamples.update; the receptive field; the merge; the
grid), per fit.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import common
import lightning.pytorch as pl
import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import fm_lightning.pictures.examples
import fm_lightning.receptive_field
from fm_lightning import FeatureMapCallback, ImageClassifier, MNISTDataModule, SimpleCNN
from fm_lightning.pictures.examples import ExampleStream
from fm_lightning.topk import TopKExamples

# -----------------------------------------------------------------------------
# config

parser = common.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
parser.add_argument("--repeats", type=int, default=8, help="examples=9 / examples=0 fit pairs")
parser.add_argument(
    "--train-batches", type=int, default=None, help="training batches per epoch (default: all)"
)
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--examples", type=int, default=9, help="k of the contender with examples")
parser.add_argument("--resnet-repeats", type=int, default=5, help="resnet18 validation pairs")
parser.add_argument("--resnet-images", type=int, default=2000, help="resnet18 validation images")
parser.add_argument("--captures", type=int, default=30, help="captured epochs in the RSS check")
parser.add_argument("--warmup", type=int, default=5, help="captured epochs before RSS is judged")
parser.add_argument("--seed", type=int, default=42)
# Internal: run section 4's fit with this many examples and print its RSS readings as JSON.
parser.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
args = parser.parse_args()

device = common.pick_device(args.device)
common.quiet_lightning()
common.print_env(device)

LAYERS = ["conv1", "conv2"]
NUM_IMAGES = 8
dm = MNISTDataModule(args.data_dir, batch_size=64, seed=args.seed)
dm.prepare_data()
dm.setup("fit")  # every fit below reuses these in-memory splits


def new_callback(examples: int, layers: list[str] = LAYERS) -> FeatureMapCallback:
    return FeatureMapCallback(layers=layers, num_images=NUM_IMAGES, examples=examples)


def new_model() -> ImageClassifier:
    torch.manual_seed(args.seed)
    return ImageClassifier(SimpleCNN())


# -----------------------------------------------------------------------------
# 4.'s measurement, run in a fresh subprocess per contender (see rss_in_child)


def rss_over_epochs(examples: int) -> list[tuple[int, int]]:
    """(RSS, bytes of live tensors' storages) after each validation."""
    readings: list[tuple[int, int]] = []

    class Reader(pl.Callback):
        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                gc.collect()
                storages = {
                    t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in gc.get_objects()
                    if isinstance(t, torch.Tensor) and not t.is_meta
                }
                readings.append((common.rss_bytes(), sum(storages.values())))

    with tempfile.TemporaryDirectory() as tmp:
        trainer = common.quiet_trainer(
            tmp,
            [new_callback(examples), Reader()],
            device=device,
            max_epochs=args.captures,
            limit_train_batches=2,
            limit_val_batches=4,
        )
        trainer.fit(new_model(), datamodule=dm)
    return readings


# glibc moves its mmap threshold up to the largest block freed, so multi-MiB blocks freed once
# (the candidate pools, each validation) come back from the heap and RSS steps with the
# process's history; a fixed threshold makes RSS follow what is alive (as capture_cost.py's
# memory children run).
_RSS_CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 2**10), "MALLOC_TRIM_THRESHOLD_": "0"}


def rss_in_child(examples: int) -> list[list[int]]:
    """rss_over_epochs(examples) in a fresh process of this script, under _RSS_CHILD_ENV."""
    cmd = [sys.executable, *sys.argv, f"--rss-child={examples}"]
    proc = subprocess.run(
        cmd, env={**os.environ, **_RSS_CHILD_ENV}, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"RSS subprocess (examples={examples}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if args.rss_child is not None:  # the child: only the measurement, printed as JSON
    print(json.dumps(rss_over_epochs(args.rss_child)))
    raise SystemExit(0)


class ValidationClock(pl.Callback):
    """Seconds of every validation run but the sanity check, from the first callback's
    on_validation_start to the last callback's on_validation_end: put one first and one last."""

    def __init__(self, seconds: list[float], starts: bool):
        self.seconds, self.starts = seconds, starts

    def on_validation_start(self, trainer, pl_module):
        if self.starts and not trainer.sanity_checking:
            common.sync(device)
            self.seconds.append(-time.perf_counter())

    def on_validation_end(self, trainer, pl_module):
        if not self.starts and not trainer.sanity_checking:
            common.sync(device)
            self.seconds[-1] += time.perf_counter()


# -----------------------------------------------------------------------------
# instrumentation: seconds inside the examples' own code, and the top-k state's bytes

spent: dict[str, float] = {}  # part -> seconds, for the fit being run
state_bytes: list[dict[str, int]] = []  # {layer: TopKExamples.nbytes()} per gathered stream


def _timed(owner, name: str, part: str) -> None:
    real = owner.__dict__[name]
    fn = real.__func__ if isinstance(real, staticmethod) else real

    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            spent[part] = spent.get(part, 0.0) + time.perf_counter() - t0

    setattr(owner, name, staticmethod(wrapper) if isinstance(real, staticmethod) else wrapper)


PARTS = {
    "hook: maps": (ExampleStream, "_maps"),
    "hook: TopKExamples.update": (TopKExamples, "update"),
    "receptive_field": (fm_lightning.pictures.examples, "receptive_field"),
    "merge": (TopKExamples, "merge"),
    "examples_grid": (fm_lightning.pictures.examples, "examples_grid"),
}
for _part, (_owner, _name) in PARTS.items():
    _timed(_owner, _name, _part)
_real_states = ExampleStream.states


def _recording_states(self: ExampleStream):
    state_bytes.append({name: topk.nbytes() for name, topk in self.topk.items()})
    return _real_states(self)


ExampleStream.states = _recording_states
pool_peak: dict[int, int] = {}  # Cd x k slots of a layer -> the most bytes its pool held
_real_rank_pool = TopKExamples._rank_pool


def _recording_rank_pool(self: TopKExamples):
    slots = self.k * len(self.channels)
    pool_peak[slots] = max(pool_peak.get(slots, 0), self.pool_nbytes())
    return _real_rank_pool(self)


TopKExamples._rank_pool = _recording_rank_pool

# -----------------------------------------------------------------------------
# 2. fit time on the default run (and SimpleCNN's validation ratio, reported), examples=9 vs 0

print(
    f"\n[2] {args.epochs} epochs x {args.train_batches or 'all'} train batches + full "
    f"validation ({len(dm.val_set)} images) per fit, examples={args.examples} vs examples=0, "
    f"{args.repeats} rounds"
)
val_seconds: dict[str, list[float]] = {"examples": [], "off": []}  # summed per fit
parts_per_fit: list[dict[str, float]] = []


def fit_seconds(examples: int) -> float:
    spent.clear()
    seconds: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        trainer = common.quiet_trainer(
            tmp,
            [
                ValidationClock(seconds, starts=True),
                new_callback(examples),
                ValidationClock(seconds, starts=False),
            ],
            device=device,
            max_epochs=args.epochs,
            limit_train_batches=args.train_batches,
        )
        model = new_model()
        with common.Timer(device) as t:
            trainer.fit(model, datamodule=dm)
    assert len(seconds) == args.epochs, seconds
    val_seconds["examples" if examples else "off"].append(sum(seconds))
    if examples:
        parts_per_fit.append(dict(spent))
    return t.s


fit_seconds(args.examples)  # untimed warm-up of both: imports, colormaps, the PNG encoder
fit_seconds(0)
for xs in (*val_seconds.values(), parts_per_fit, state_bytes):
    xs.clear()
fits = common.interleaved(
    {"examples": lambda: fit_seconds(args.examples), "off": lambda: fit_seconds(0)},
    args.repeats,
)
common.spread_warning(fits)
val_ratios = common.ratios(val_seconds["examples"], val_seconds["off"])
fit_ratios = common.ratios(fits["examples"], fits["off"])
per_round_val = [a / b for a, b in zip(val_seconds["examples"], val_seconds["off"], strict=True)]
per_round_fit = [a / b for a, b in zip(fits["examples"], fits["off"], strict=True)]
# Outside validation (training, setup, the fit-end GIFs): the same code for both contenders.
rest = {c: [f - v for f, v in zip(fits[c], val_seconds[c], strict=True)] for c in fits}
per_round_rest = [a / b for a, b in zip(rest["examples"], rest["off"], strict=True)]
# What the examples add to a fit, all of it inside validation, over the fit without them.
per_round_added = [
    1 + (ve - vo) / fo
    for ve, vo, fo in zip(val_seconds["examples"], val_seconds["off"], fits["off"], strict=True)
]


def resolution(per_round: list[float]) -> float:
    """Standard error of the median of the per-round ratios: how finely they can tell."""
    return 1.2533 * statistics.stdev(per_round) / len(per_round) ** 0.5 if len(per_round) > 1 else 0


print(f"  validation, examples={args.examples}  {common.fmt_s(val_seconds['examples'])}")
print(f"  validation, examples=0   {common.fmt_s(val_seconds['off'])}")
print(common.fmt_ratios("validation examples/off", val_ratios))
print(f"  fit, examples={args.examples}         {common.fmt_s(fits['examples'])}")
print(f"  fit, examples=0          {common.fmt_s(fits['off'])}")
print(common.fmt_ratios("fit examples/off", fit_ratios))
print(common.fmt_ratios("outside validation", common.ratios(rest["examples"], rest["off"])))
val_ratio, fit_ratio = val_ratios["per-round median"], fit_ratios["per-round median"]
val_res, fit_res = resolution(per_round_val), resolution(per_round_fit)
rest_ratio, rest_res = common.median(per_round_rest), resolution(per_round_rest)
added_ratio, added_res = common.median(per_round_added), resolution(per_round_added)
print(
    f"  1 + validation added / fit   {added_ratio:.4f} +- {added_res:.4f} (rounds "
    + ", ".join(f"{r:.4f}" for r in per_round_added)
    + ")"
)

# Direct: the examples' own code, per fit (its wall-clock share cannot drown in noise).
parts = {part: common.median([p.get(part, 0.0) for p in parts_per_fit]) for part in PARTS}
direct = sum(parts.values())
val_off = common.median(val_seconds["off"])
print(
    f"  inside the examples' code: median {direct * 1e3:.0f} ms per fit = "
    f"{direct / val_off:.1%} of the validation time with examples=0 ("
    + ", ".join(f"{part} {s * 1e3:.0f} ms" for part, s in parts.items())
    + ")"
)

# -----------------------------------------------------------------------------
# 3. the top-k state's bytes


def bound(layer_bytes: dict[str, int]) -> dict[str, int]:
    """Bytes the state may hold per layer: drawn channels x k x (crop + overlay + score,
    index, position), + every channel's maximum; from the fields the streams measured."""
    out = {}
    for layer in layer_bytes:
        model = new_model().net
        x = dm.val_set.images[:4].float()
        rf = fm_lightning.receptive_field.receptive_field(model, getattr(model, layer), x)
        channels = getattr(model, layer).out_channels
        drawn = min(channels, 32)  # max_channels, the callback's default
        per_slot = 1 * rf.height * rf.width * 4 + rf.height * rf.width * 4 + 4 + 8 + 2 * 8
        out[layer] = drawn * args.examples * per_slot + channels * 4
    return out


print(f"\n[3] top-k state (k={args.examples}), from the {len(state_bytes)} gathered streams")
sizes = state_bytes[0]
expected = bound(sizes)
same = all(s == sizes for s in state_bytes)
for layer, n in sizes.items():
    print(f"  {layer}: {n / 2**10:.1f} KiB (bound {expected[layer] / 2**10:.1f} KiB)")
total = sum(sizes.values())
print(f"  total {total / 2**10:.1f} KiB; the same in every validation of every fit: {same}")
# Between rankings the candidates wait in a pool: at most pool_bytes plus one batch's candidates
# (every drawn map and the batch's inputs, as in the first batches, when every entry qualifies).
x = dm.val_set.images[:64].float()
pool_bound = {}
for layer in LAYERS:
    net, outputs = new_model().net, []
    hook = getattr(net, layer).register_forward_hook(lambda m, a, out, got=outputs: got.append(out))
    with torch.no_grad():
        net(x)
    hook.remove()
    maps = outputs[0]  # (64, C, h, w)
    drawn = min(maps.shape[1], 32)
    slots = args.examples * drawn
    batch = 64 * drawn * (maps[0, 0].numel() * 4 + 8 + 4 + 8 + 8) + x.numel() * 4
    pool_bound[slots] = (layer, TopKExamples.pool_bytes + batch)
for slots, (layer, most) in pool_bound.items():
    print(
        f"  {layer}: candidate pool at most {pool_peak.get(slots, 0) / 2**20:.2f} MiB "
        f"(bound {most / 2**20:.2f} MiB: pool_bytes + one batch)"
    )
pool_ok = all(pool_peak.get(slots, 0) <= most for slots, (_, most) in pool_bound.items())
pool_total = sum(pool_peak.get(slots, 0) for slots in pool_bound)  # before [1] adds resnet18's

# -----------------------------------------------------------------------------
# 4. RSS over many captured epochs


print(f"\n[4] RSS after each of {args.captures} captured epochs (judged after {args.warmup})")


def slope(ys: list[int]) -> tuple[float, float]:
    """Least-squares slope of ys over 0, 1, 2, ... and its standard error."""
    n, mx, my = len(ys), (len(ys) - 1) / 2, statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in range(n))
    b = sum((x - mx) * (y - my) for x, y in enumerate(ys)) / sxx
    residual = sum((y - my - b * (x - mx)) ** 2 for x, y in enumerate(ys)) / max(n - 2, 1)
    return b, (residual / sxx) ** 0.5


rss = {"off (before)": rss_in_child(0), "examples": rss_in_child(args.examples)}
rss["off (after)"] = rss_in_child(0)
trends: dict[str, tuple[float, float]] = {}
for name, readings in rss.items():
    judged = [r for r, _ in readings[args.warmup :]]
    tensors = [t for _, t in readings[args.warmup :]]
    trends[name] = slope(judged)
    print(
        f"  {name:13s} after warm-up {judged[0] / 2**20:7.2f} MiB, slope "
        f"{trends[name][0] / 2**10:+6.1f} +- {trends[name][1] / 2**10:4.1f} KiB/epoch, first to "
        f"last {(judged[-1] - judged[0]) / 2**10:+7.1f} KiB, span "
        f"{(max(judged) - min(judged)) / 2**10:6.1f} KiB; live tensors "
        f"{tensors[0] / 2**20:.3f} MiB, grew {tensors[-1] - tensors[0]:+d} B"
    )
leak_bound = min(sizes.values())
rss_slope, rss_slope_se = trends["examples"]
tensor_growth = {name: xs[-1][1] - xs[args.warmup][1] for name, xs in rss.items()}
tensors_flat = tensor_growth["examples"] <= max(g for n, g in tensor_growth.items() if "off" in n)

# -----------------------------------------------------------------------------
# 1. validation loop time on timm resnet18 at 128 x 128, examples=9 against examples=0
# (run last: its top-k streams would otherwise count in 3.)

RESNET_LAYERS = ["layer2", "layer4"]
print(
    f"\n[1] timm resnet18 at 128 x 128, {args.resnet_images} validation images, layers "
    f"{' + '.join(RESNET_LAYERS)}, examples={args.examples} vs 0, {args.resnet_repeats} rounds"
)
with torch.no_grad():  # MNIST's validation digits, normalised and upsampled: (N, 1, 128, 128)
    images = dm.normalize(dm.val_set.images[: args.resnet_images])
    images = F.interpolate(images, size=128, mode="bilinear", align_corners=False)
labels = dm.val_set.labels[: args.resnet_images]
# {contender: seconds per fit} of its first validation (with the once-per-fit measurements: the
# layers' layouts, and with examples their receptive fields) and of its second (every later one)
resnet_first: dict[str, list[float]] = {"examples": [], "off": []}
resnet_val: dict[str, list[float]] = {"examples": [], "off": []}


def resnet_validation_seconds(examples: int) -> float:
    seconds: list[float] = []
    torch.manual_seed(args.seed)
    net = timm.create_model("resnet18", pretrained=False, num_classes=10, in_chans=1)
    loader = DataLoader(TensorDataset(images, labels), batch_size=64)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = common.quiet_trainer(
            tmp,
            [
                ValidationClock(seconds, starts=True),
                new_callback(examples, RESNET_LAYERS),
                ValidationClock(seconds, starts=False),
            ],
            device=device,
            max_epochs=2,
            limit_train_batches=1,
            num_sanity_val_steps=0,
        )
        trainer.fit(ImageClassifier(net), train_dataloaders=loader, val_dataloaders=loader)
    assert len(seconds) == 2, seconds
    contender = "examples" if examples else "off"
    resnet_first[contender].append(seconds[0])
    resnet_val[contender].append(seconds[1])
    return seconds[1]


resnet_validation_seconds(args.examples)  # untimed warm-up of both
resnet_validation_seconds(0)
for xs in [*resnet_val.values(), *resnet_first.values()]:
    xs.clear()
common.spread_warning(
    common.interleaved(
        {
            "examples": lambda: resnet_validation_seconds(args.examples),
            "off": lambda: resnet_validation_seconds(0),
        },
        args.resnet_repeats,
    )
)
first_ratios = common.ratios(resnet_first["examples"], resnet_first["off"])
print(f"  first validation, examples={args.examples}  {common.fmt_s(resnet_first['examples'])}")
print(f"  first validation, examples=0   {common.fmt_s(resnet_first['off'])}")
print(common.fmt_ratios("first validation examples/off", first_ratios))
resnet_ratios = common.ratios(resnet_val["examples"], resnet_val["off"])
per_round_resnet = [a / b for a, b in zip(resnet_val["examples"], resnet_val["off"], strict=True)]
print(f"  later validation, examples={args.examples}  {common.fmt_s(resnet_val['examples'])}")
print(f"  later validation, examples=0   {common.fmt_s(resnet_val['off'])}")
print(common.fmt_ratios("later validation examples/off", resnet_ratios))
resnet_ratio, resnet_res = resnet_ratios["per-round median"], resolution(per_round_resnet)

# -----------------------------------------------------------------------------
# targets

print()
common.print_load("at end")
common.target(
    f"validation loop time on resnet18 128x128 (each validation after a fit's first), "
    f"examples={args.examples} / examples=0 <= 1.10",
    resnet_ratio <= 1.10,
    f"{resnet_ratio:.4f} +- {resnet_res:.3f} (median of {args.resnet_repeats} paired rounds)",
)
print(
    f"REPORT validation loop time on SimpleCNN (default run), examples={args.examples} / "
    f"examples=0 (no target): {val_ratio:.4f} +- {val_res:.3f} (median of {args.repeats} paired "
    f"rounds); the examples' own code = {direct / val_off:.1%} of the validation without them"
)
# The premise: no callback hook runs outside validation but setup, fit start/end and teardown.
outside = sorted(
    hook
    for hook in dir(pl.Callback)
    if hook.startswith(("on_train", "on_before", "on_after", "on_save", "on_load"))
    and getattr(FeatureMapCallback, hook) is not getattr(pl.Callback, hook)
)
print(f"  FeatureMapCallback hooks run outside validation: {outside or 'none'}")
common.target(
    f"fit time, examples={args.examples} / examples=0 <= 1.02 (1 + the validation seconds "
    "examples add / the fit without them)",
    added_ratio <= 1.02 and not outside,
    f"{added_ratio:.4f} +- {added_res:.4f} (median of {args.repeats} paired rounds; hooks "
    f"outside validation: {outside or 'none'}); the whole fit's wall clock {fit_ratio:.3f} +- "
    f"{fit_res:.3f}, outside validation {rest_ratio:.3f} +- {rest_res:.3f}",
)
common.target(
    "top-k state within its bound and the same size in every validation; pool within its bound",
    same and all(sizes[layer] <= expected[layer] for layer in sizes) and pool_ok,
    f"{total / 2**10:.1f} KiB for {len(sizes)} layers, pools at most {pool_total / 2**20:.2f} MiB",
)
common.target(
    f"RSS flat over {args.captures} captured epochs with examples={args.examples} (slope after "
    f"{args.warmup} epochs below the smallest layer's top-k state, live tensors grown no more "
    "than without examples)",
    rss_slope <= leak_bound and tensors_flat,
    f"{rss_slope / 2**10:+.1f} +- {rss_slope_se / 2**10:.1f} KiB/epoch vs {leak_bound / 2**10:.1f} "
    f"KiB (examples=0: "
    + ", ".join(f"{trends[n][0] / 2**10:+.1f}" for n in trends if "off" in n)
    + "); live tensors grew "
    + ", ".join(f"{n} {g:+d} B" for n, g in tensor_growth.items()),
)
