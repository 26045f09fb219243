"""What does FeatureMapCallback cost: fit time, time per capture, and memory over many captures?

    python benchmarks/callback_overhead.py                    # ~2.5 min on a 2-core CPU
    python benchmarks/callback_overhead.py --repeats 12 --train-batches 300 --device cpu

Targets:
    1. fit time with FeatureMapCallback(layers=["conv1", "conv2"]) (its defaults) within 2% of
       the same fit without it. MNIST, 2 epochs of --train-batches batches of 64 and full
       validation (5,000 images), CSVLogger for both (the callback then writes PNGs, its default
       destination). With/without alternate, order flipping every round (AB, BA, ...); the
       verdict uses the median of the per-round ratios.
    2. one capture + render + log of 2 layers x 4 images under 50 ms on CPU. After a short fit,
       cb.on_validation_end(trainer, model) is called directly (cb._run made before each call,
       as on_validation_start makes it for a captured validation); reported as median and p90,
       and split into the capture (fm_lightning.capture.capture: the forward with hooks) and the
       render + log (cb._publish: every picture kind draws, then publishing).
    3. memory flat over 30 captures: RSS (and torch.cuda.memory_allocated on a GPU), read after
       gc.collect() following each capture, grows by no more than in a control loop of plain
       forward passes of the same probe without the callback (run before and after, to measure
       the noise rather than assume it).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time

import common
import lightning.pytorch as pl
import torch

from fm_lightning import FeatureMapCallback, ImageClassifier, MNISTDataModule, SimpleCNN, capture

# -----------------------------------------------------------------------------
# config

parser = common.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
parser.add_argument("--repeats", type=int, default=10, help="with/without pairs of fits")
parser.add_argument("--train-batches", type=int, default=300, help="training batches per epoch")
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--calls", type=int, default=50, help="timed on_validation_end calls")
parser.add_argument("--captures", type=int, default=30, help="captures in the memory check")
parser.add_argument("--seed", type=int, default=42)
args = parser.parse_args()

device = common.pick_device(args.device)
common.quiet_lightning()
common.print_env(device)

LAYERS = ["conv1", "conv2"]
dm = MNISTDataModule(args.data_dir, batch_size=64, seed=args.seed)
dm.prepare_data()
dm.setup("fit")  # every fit below reuses these in-memory splits


def make_trainer(log_dir: str, callbacks: list, **overrides) -> pl.Trainer:
    kwargs = dict(max_epochs=args.epochs, limit_train_batches=args.train_batches)
    return common.quiet_trainer(log_dir, callbacks, device, **{**kwargs, **overrides})


def new_model() -> ImageClassifier:
    torch.manual_seed(args.seed)
    return ImageClassifier(SimpleCNN())


# -----------------------------------------------------------------------------
# 1. fit time with and without the callback

print(
    f"\n[1] fit time: {args.epochs} epochs x {args.train_batches} train batches + full "
    f"validation ({len(dm.val_set)} images) per fit, {args.repeats} rounds"
)


class TimedFeatureMapCallback(FeatureMapCallback):
    """FeatureMapCallback that adds up the wall time spent inside its own Lightning hooks.

    A second, direct measure of its cost: unlike the difference of two fits, it does not drown
    in machine noise. (It cannot see indirect costs, which the with/without ratio bounds.)
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.hook_s: dict[str, float] = {}  # hook name -> seconds spent in it over the fit


def _timed(hook: str):
    def method(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return getattr(FeatureMapCallback, hook)(self, *args, **kwargs)
        finally:
            self.hook_s[hook] = self.hook_s.get(hook, 0.0) + time.perf_counter() - t0

    return method


# Every hook FeatureMapCallback overrides (found at run time, so new hooks are timed too).
TIMED_HOOKS = [
    hook
    for hook in dir(pl.Callback)
    if (hook.startswith("on_") or hook in ("setup", "teardown", "state_dict"))
    and getattr(FeatureMapCallback, hook) is not getattr(pl.Callback, hook)
]
for _hook in TIMED_HOOKS:
    setattr(TimedFeatureMapCallback, _hook, _timed(_hook))

hook_seconds: list[dict[str, float]] = []  # per fit with the callback


def fit_seconds(with_callback: bool) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cb = TimedFeatureMapCallback(layers=LAYERS) if with_callback else None
        trainer = make_trainer(tmp, [cb] if cb else [])
        model = new_model()
        with common.Timer(device) as t:
            trainer.fit(model, datamodule=dm)
    if cb:
        hook_seconds.append(cb.hook_s)
    return t.s


fit_seconds(True)  # untimed warm-up of both: imports, matplotlib's colormap, PNG encoder
fit_seconds(False)
hook_seconds.clear()
fits = common.interleaved(
    {"with": lambda: fit_seconds(True), "without": lambda: fit_seconds(False)}, args.repeats
)
with_vs_without = common.ratios(fits["with"], fits["without"])
ratio = with_vs_without["per-round median"]
extra_ms = (min(fits["with"]) - min(fits["without"])) * 1e3
print(f"  with callback     {common.fmt_s(fits['with'])}")
print(f"  without callback  {common.fmt_s(fits['without'])}")
per_round = [w / wo for w, wo in zip(fits["with"], fits["without"], strict=True)]
print(f"  per-round ratios with/without: {', '.join(f'{r:.3f}' for r in per_round)}")
common.spread_warning(fits)
print(common.fmt_ratios("with / without", with_vs_without, "(target <= 1.02, per-round median)"))
print(f"  difference of minimums {extra_ms:+.0f} ms per fit ({args.epochs} captures)")
per_fit = [sum(h.values()) for h in hook_seconds]
hook_ms = common.median(per_fit) * 1e3
direct = hook_ms / 1e3 / common.median(fits["without"])
print(
    f"  time inside the callback's hooks: median {hook_ms:.0f} ms per fit "
    f"(max {max(per_fit) * 1e3:.0f} ms) = {direct:.2%} of the median fit without it"
)
by_hook = {hook: common.median([h.get(hook, 0.0) for h in hook_seconds]) for hook in TIMED_HOOKS}
print(
    "  by hook (median ms per fit): " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in by_hook.items())
)
# How finely the wall-clock ratio can tell: standard error of the median of per-round ratios.
resolution = 1.2533 * statistics.stdev(per_round) / len(per_round) ** 0.5 if args.repeats > 1 else 0
print(f"  wall-clock resolution: +-{resolution:.1%} (standard error of the per-round median)")

# -----------------------------------------------------------------------------
# 2. one capture + render + log, called directly

print(f"\n[2] capture + render + log of {len(LAYERS)} layers x 4 images, {args.calls} calls each")
tmp_dir = tempfile.TemporaryDirectory()
cb = FeatureMapCallback(layers=LAYERS, num_images=4)
trainer = make_trainer(
    tmp_dir.name, [cb], max_epochs=1, limit_train_batches=10, limit_val_batches=2
)
model = new_model()
trainer.fit(model, datamodule=dm)  # sets up the callback and takes its probe of 4 images
model.to(device)  # the strategy's teardown moved the model back to the CPU
assert cb.probe is not None and len(cb.probe) == 4, "the fit should have taken a 4-image probe"
cb._resolve(model)  # teardown dropped the callback's module references
run = cb._make_run(trainer, model)


def full_call_seconds() -> float:
    cb._run = cb._make_run(trainer, model)  # as on_validation_start makes it when captured
    with common.Timer(device) as t:
        cb.on_validation_end(trainer, model)
    return t.s


def probe_pass():
    captured, _ = capture.capture(
        model, cb.probe, cb._modules, max_channels=cb.max_channels, order=cb.order
    )
    return captured


def capture_seconds() -> float:
    with common.Timer(device) as t:
        probe_pass()
    return t.s


def log_seconds() -> float:
    captured = probe_pass()
    with common.Timer(device) as t:
        cb._publish(trainer, run, cb.probe, captured)
    return t.s


for fn in (full_call_seconds, capture_seconds, log_seconds):  # warm-up
    fn()
with common.OtherLoad() as other:
    calls = common.interleaved(
        {"full": full_call_seconds, "capture": capture_seconds, "render+log": log_seconds},
        args.calls,
        verbose=False,
    )
print(f"  (other processes used {other.cores:.2f} CPU cores meanwhile)")
for name, xs in calls.items():
    ms = [x * 1e3 for x in xs]
    print(
        f"  {name:10s} median {common.median(ms):7.2f} ms   p90 {common.percentile(ms, 90):7.2f} ms"
        f"   min {min(ms):7.2f} ms   max {max(ms):7.2f} ms"
    )
full_med_ms = common.median(calls["full"]) * 1e3
full_p90_ms = common.percentile(calls["full"], 90) * 1e3
print(f"  PNGs written under {cb.local_dir}")

# -----------------------------------------------------------------------------
# 3. memory over many captures, against a control loop of plain forward passes

print(f"\n[3] memory over {args.captures} captures (read after gc.collect() each time)")


def memory_now() -> tuple[int, int]:
    gc.collect()
    cuda = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    return common.rss_bytes(), cuda


def track(step) -> list[tuple[int, int]]:
    """Runs step() args.captures times; memory after each, the first reading is the baseline."""
    readings = []
    for _ in range(args.captures):
        step()
        readings.append(memory_now())
    return readings


def capture_step() -> None:
    cb._run = cb._make_run(trainer, model)
    cb.on_validation_end(trainer, model)


def control_step() -> None:
    model.eval()
    with torch.no_grad():
        model(cb.probe)
    model.train()


def growth(readings: list[tuple[int, int]], i: int) -> dict[str, int]:
    """first -> last growth, largest growth over the first reading, and max - min span."""
    xs = [r[i] for r in readings]
    return {"last": xs[-1] - xs[0], "max": max(xs) - xs[0], "span": max(xs) - min(xs)}


runs = {
    "control (before)": track(control_step),
    "callback": track(capture_step),
    "control (after)": track(control_step),
}
kinds = [("RSS", 0)] + ([("CUDA allocated", 1)] if device.type == "cuda" else [])
verdicts = {}
for kind, i in kinds:
    for name, readings in runs.items():
        g = growth(readings, i)
        print(
            f"  {kind:14s} {name:17s} first {readings[0][i] / 2**20:9.2f} MiB  "
            f"growth last {g['last'] / 2**10:+8.1f} KiB  max {g['max'] / 2**10:+8.1f} KiB  "
            f"span {g['span'] / 2**10:8.1f} KiB"
        )
    # Noise: how far memory wanders while doing the same forwards without the callback; never
    # below one page, the resolution RSS is counted in.
    noise = max(
        common.PAGE_SIZE if i == 0 else 0,
        *(growth(runs[n], i)["span"] for n in runs if n.startswith("control")),
    )
    verdicts[kind] = (growth(runs["callback"], i)["last"], noise)
    print(f"  {kind}: noise (largest control span, >= 1 page for RSS) {noise / 2**10:.1f} KiB")
tmp_dir.cleanup()

# -----------------------------------------------------------------------------
# targets

print()
common.print_load("at end")
common.target(
    "fit time with FeatureMapCallback within 2% of without",
    ratio <= 1.02,
    f"with/without = {ratio:.4f} +- {resolution:.3f} (median of {args.repeats} paired rounds); "
    f"time in its hooks = {direct:.2%} of the fit",
)
# The wall-clock ratio above can't resolve 2% on a noisy machine (see its +-); the time spent
# inside the callback's own hooks, measured directly in the same fits, can.
common.target(
    "time inside FeatureMapCallback's hooks within 2% of the fit without it",
    direct <= 0.02,
    f"{direct:.2%}",
)
common.target(
    "capture + render + log of 2 layers x 4 images < 50 ms"
    + ("" if device.type == "cpu" else f" (target is for CPU; measured on {device.type})"),
    full_med_ms < 50,
    f"median {full_med_ms:.2f} ms, p90 {full_p90_ms:.2f} ms",
)
for kind, (grew, noise) in verdicts.items():
    common.target(
        f"{kind} flat over {args.captures} captures",
        grew <= noise,
        f"grew {grew / 2**10:+.1f} KiB vs noise {noise / 2**10:.1f} KiB",
    )
