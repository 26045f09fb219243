"""How fast does the template train, next to a bare PyTorch loop and the seed's pipeline?

    python benchmarks/train_speed.py                       # 3 interleaved rounds, ~1-2 min on CPU
    python benchmarks/train_speed.py --repeats 5 --device cpu
    python benchmarks/train_speed.py --breakdown           # + where Lightning's time goes, ~2.5 min

Targets (one training epoch, batch 64, SimpleCNN, Adam lr 1e-3, same seed, 55,000 images):
    lightning / bare <= 1.15   the template costs at most 15% over a bare loop on device tensors
    seed / lightning >= 1.5    and is at least 1.5x faster than the seed's torchvision pipeline

Contenders, run interleaved (ABC, BCA, CAB, ...) so drift in machine speed hits all of them:
    lightning  Trainer.fit(ImageClassifier(SimpleCNN()), MNISTDataModule(batch_size=64)), the
               template's own path: uint8 batches via __getitems__, normalised on the device.
               Timed: the whole fit() call (prepare_data's MD5 check of the raw files, Trainer
               set-up and teardown included). The datamodule's setup() (reading the IDX files into
               memory) runs before the clock starts and is reported on its own as data prep.
               Also reported: the epoch alone, from on_train_epoch_start to on_train_epoch_end.
    bare       the train split already as normalised float tensors on the device; each epoch a
               torch.randperm, then slices of it index a batch; forward, cross_entropy, backward,
               step. No DataLoader, no Lightning.
    seed       torchvision.datasets.MNIST + Compose([ToTensor(), Normalize]) per item, a Subset of
               the same 55,000 indices, DataLoader(batch_size=64, shuffle=True, num_workers=0),
               and the same plain training step: what the tutorial this template replaces does.
With --breakdown, two more contenders isolate Lightning's costs:
    lightning-nolog  the lightning contender without self.log("train/loss") in training_step
    bare-dmloader    the bare loop, but fed by MNISTDataModule.train_dataloader() + normalize
and, since differences of whole noisy runs resolve ~1 ms per step at best, direct stopwatches:
the cost of one self.log call, of each data path alone, of a fit's fixed set-up, and Lightning's
per-step overhead measured with a one-layer model (lightning vs bare), from which the expected
lightning / bare ratio for SimpleCNN follows. --profile adds a cProfile of one lightning fit.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable

import common
import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

from fm_lightning import ImageClassifier, MNISTDataModule, SimpleCNN

# -----------------------------------------------------------------------------
# config

parser = common.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
parser.add_argument("--epochs", type=int, default=1, help="training epochs per timed run")
parser.add_argument("--batch-size", type=int, default=64)
parser.add_argument("--seed", type=int, default=42)
parser.add_argument("--warmup-batches", type=int, default=30, help="untimed batches per contender")
parser.add_argument("--breakdown", action="store_true", help="add contenders that split overhead")
parser.add_argument("--profile", action="store_true", help="also print a cProfile of one fit")
args = parser.parse_args()

device = common.pick_device(args.device)
common.quiet_lightning()
common.print_env(device)
print(f"batch size {args.batch_size}, epochs per run {args.epochs}, repeats {args.repeats}")

# -----------------------------------------------------------------------------
# data: build each contender's data once, and time that preparation on its own

t0 = time.perf_counter()
MNISTDataModule(args.data_dir).prepare_data()  # what fit() does first: MD5-check the raw files
prepare_s = time.perf_counter() - t0

t0 = time.perf_counter()
dm = MNISTDataModule(args.data_dir, batch_size=args.batch_size, seed=args.seed)
dm.setup("fit")  # fit() calls setup("fit") again; the splits are kept, so it reads nothing
setup_s = time.perf_counter() - t0
n_train = len(dm.train_set)

# bare: the whole split, normalised once, resident on the device
with common.Timer(device) as t:
    bare_x = dm.normalize(dm.train_set.images.to(device))  # (55000, 1, 28, 28) float32
    bare_y = dm.train_set.labels.to(device)  # (55000,) int64
bare_prep_s = t.s

# seed: torchvision's dataset with per-item transforms, restricted to the same 55,000 images.
# The split is MNISTDataModule.setup's: a seeded permutation of the official 60,000, sorted.
t0 = time.perf_counter()
seed_transform = transforms.Compose(
    [transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))]
)
seed_full = datasets.MNIST(root=args.data_dir, train=True, transform=seed_transform)
perm = torch.randperm(len(seed_full), generator=torch.Generator().manual_seed(args.seed))
seed_train_idx = perm[dm.hparams.val_size :].sort().values
seed_set = Subset(seed_full, seed_train_idx.tolist())
seed_prep_s = time.perf_counter() - t0
if not torch.equal(seed_full.targets[seed_train_idx], dm.train_set.labels):
    raise RuntimeError("the seed pipeline's subset is not the datamodule's training split")

print(
    f"data prep (untimed in the runs below): MNISTDataModule.prepare_data {prepare_s:.3f}s "
    f"(also inside every lightning fit), setup('fit') {setup_s:.3f}s; "
    f"bare to-device+normalise {bare_prep_s:.3f}s; torchvision MNIST + Subset {seed_prep_s:.3f}s"
)
print(f"{n_train} training images, {-(-n_train // args.batch_size)} batches per epoch")

# -----------------------------------------------------------------------------
# contenders


def new_net(tiny: bool = False) -> torch.nn.Module:
    """SimpleCNN, or (tiny) one Linear layer whose step costs so little that what remains of a
    Lightning step is the framework's own per-step overhead. Same seed, same weights."""
    torch.manual_seed(args.seed)  # same initial weights for every contender
    if tiny:
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
    return SimpleCNN()


def train_steps(model, optimizer, batches: Iterable, max_batches: int | None = None) -> float:
    """The plain PyTorch step shared by the non-Lightning contenders; returns the last loss."""
    model.train()
    for i, (x, y) in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return loss.item()


def device_batches(generator: torch.Generator) -> Iterable:
    """Shuffled batches sliced out of the device-resident split."""
    perm = torch.randperm(n_train, generator=generator).to(device)
    for i in range(0, n_train, args.batch_size):
        idx = perm[i : i + args.batch_size]
        yield bare_x[idx], bare_y[idx]


def dm_batches() -> Iterable:
    """The template's loader, normalised on the device as on_after_batch_transfer does."""
    for images, labels in dm.train_dataloader():
        yield dm.normalize(images.to(device, non_blocking=True)), labels


class EpochTimer(pl.Callback):
    """Seconds from on_train_epoch_start to on_train_epoch_end, per epoch; and the last loss."""

    def __init__(self):
        self.epoch_s: list[float] = []
        self.last_loss = torch.tensor(float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.last_loss = outputs["loss"]  # kept as a tensor: no host sync per step

    def on_train_epoch_start(self, trainer, pl_module):
        common.sync(device)
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        common.sync(device)
        self.epoch_s.append(time.perf_counter() - self._t0)


class NoLogClassifier(ImageClassifier):
    """ImageClassifier whose training_step does not call self.log (for --breakdown)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)


class TimedLogClassifier(ImageClassifier):
    """ImageClassifier's training_step with a stopwatch around its self.log call (--breakdown)."""

    log_s = 0.0

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        t0 = time.perf_counter()
        self.log("train/loss", loss, prog_bar=True)
        self.log_s += time.perf_counter() - t0
        return loss


last_loss: dict[str, float] = {}
epoch_only: dict[str, list[float]] = {"lightning": []}


def training_only_trainer(**kwargs) -> pl.Trainer:
    """A Trainer that only trains: no validation, logger, checkpoints, bar or summary."""
    return pl.Trainer(
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator=device.type,
        devices=1,
        **kwargs,
    )


def run_lightning(
    name: str, module_cls=ImageClassifier, max_batches: int | None = None, tiny: bool = False
) -> float:
    timer = EpochTimer()
    trainer = training_only_trainer(
        max_epochs=args.epochs,
        limit_train_batches=max_batches if max_batches is not None else 1.0,
        callbacks=[timer],
    )
    model = module_cls(new_net(tiny))
    with common.Timer(device) as t:
        trainer.fit(model, datamodule=dm)
    if max_batches is None:
        epoch_only.setdefault(name, []).append(sum(timer.epoch_s))
        last_loss[name] = timer.last_loss.item()
    return t.s


def run_loop(name: str, batches_fn, max_batches: int | None = None, tiny: bool = False) -> float:
    model = new_net(tiny).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(args.seed)
    with common.Timer(device) as t:
        for _ in range(args.epochs):
            loss = train_steps(model, optimizer, batches_fn(generator), max_batches)
    if max_batches is None:
        last_loss[name] = loss
    return t.s


def seed_batches(generator: torch.Generator) -> Iterable:
    return DataLoader(seed_set, batch_size=args.batch_size, shuffle=True, generator=generator)


contenders = {
    "lightning": lambda **kw: run_lightning("lightning", **kw),
    "bare": lambda **kw: run_loop("bare", device_batches, **kw),
    "seed": lambda **kw: run_loop("seed", seed_batches, **kw),
}
if args.breakdown:
    contenders["lightning-nolog"] = lambda **kw: run_lightning(
        "lightning-nolog", NoLogClassifier, **kw
    )
    contenders["bare-dmloader"] = lambda **kw: run_loop(
        "bare-dmloader", lambda g: dm_batches(), **kw
    )

# -----------------------------------------------------------------------------
# run: a short untimed warm-up of each (imports, allocator, kernels), then interleaved rounds

for run in contenders.values():
    run(max_batches=args.warmup_batches)

print(f"timed runs ({args.repeats} rounds, order rotating):")
times = common.interleaved({name: run for name, run in contenders.items()}, args.repeats)

# -----------------------------------------------------------------------------
# report

print("\nresults (seconds per timed run):")
for name, xs in times.items():
    print(
        f"  {name:16s} {common.fmt_s(xs)}   last-batch loss {last_loss.get(name, float('nan')):.4f}"
    )
print(
    "  (same initial weights; the DataLoader contenders share one shuffle order, bare has its own)"
)
for name, xs in epoch_only.items():
    if not name.startswith("tiny"):
        print(f"  {name + ' epoch':16s} {common.fmt_s(xs)}   (on_train_epoch_start..end only)")

common.spread_warning(times)

bare = times["bare"]
light_vs_bare = common.ratios(times["lightning"], bare)
seed_vs_light = common.ratios(times["seed"], times["lightning"])
print("\nratios:")
print(common.fmt_ratios("lightning fit / bare", light_vs_bare, "(target <= 1.15)"))
print(
    common.fmt_ratios("lightning epoch-only / bare", common.ratios(epoch_only["lightning"], bare))
)
with_setup = [t + setup_s for t in times["lightning"]]
print(common.fmt_ratios("(lightning fit + setup) / bare", common.ratios(with_setup, bare)))
print(common.fmt_ratios("seed / lightning fit", seed_vs_light, "(target >= 1.5)"))
print(common.fmt_ratios("seed / bare", common.ratios(times["seed"], bare)))
if args.breakdown:
    print(
        common.fmt_ratios("lightning-nolog / bare", common.ratios(times["lightning-nolog"], bare))
    )
    print(common.fmt_ratios("bare-dmloader / bare", common.ratios(times["bare-dmloader"], bare)))
    n_steps = args.epochs * -(-n_train // args.batch_size)
    print("  per-step costs (ms per training step; difference of minimums, then of medians):")
    for label, slow, fast in (
        ("training_step's logging", "lightning", "lightning-nolog"),
        ("DataLoader + normalise", "bare-dmloader", "bare"),
        ("rest of Lightning", "lightning-nolog", "bare-dmloader"),
        ("all of Lightning", "lightning", "bare"),
    ):
        d_min = (min(times[slow]) - min(times[fast])) / n_steps * 1e3
        d_med = (common.median(times[slow]) - common.median(times[fast])) / n_steps * 1e3
        print(f"    {label:24s} {d_min:+.3f}   {d_med:+.3f}   ({slow} - {fast})")

    # Direct stopwatches: unlike differences of whole runs, these do not drown in machine noise.
    print("  measured directly (ms per training step):")
    timed_module = TimedLogClassifier(new_net())
    trainer = training_only_trainer(max_epochs=1)
    trainer.fit(timed_module, datamodule=dm)
    print(
        f"    self.log('train/loss') call      {timed_module.log_s / trainer.global_step * 1e3:.3f}"
    )
    for label, batches in (
        ("MNISTDataModule loader+normalise", dm_batches()),
        ("bare randperm + slicing", device_batches(torch.Generator().manual_seed(args.seed))),
    ):
        with common.Timer(device) as t:
            n_batches = sum(1 for _ in batches)
        print(f"    {label:32s} {t.s / n_batches * 1e3:.3f}")
    fixed_s = run_lightning("lightning", max_batches=1)
    print(f"    fixed cost of a fit (1 batch)    {fixed_s * 1e3:.0f} ms in all")

    # The same two paths with a one-layer model: the step is so cheap that the difference is
    # Lightning's own per-step overhead, and small enough for the machine's noise to matter less.
    tiny = common.interleaved(
        {
            "tiny-lightning": lambda: run_lightning("tiny-lightning", tiny=True),
            "tiny-bare": lambda: run_loop("tiny-bare", device_batches, tiny=True),
        },
        args.repeats,
        verbose=False,
    )
    per_step_ms = {name: common.median(xs) / n_steps * 1e3 for name, xs in tiny.items()}
    overhead_ms = per_step_ms["tiny-lightning"] - per_step_ms["tiny-bare"]
    bare_step_ms = common.median(bare) / n_steps * 1e3
    print(
        f"    with a one-layer model: lightning {per_step_ms['tiny-lightning']:.3f}, bare "
        f"{per_step_ms['tiny-bare']:.3f}; Lightning's overhead {overhead_ms:.3f} ms per step "
        "(fixed cost included)"
    )
    print(
        f"    -> predicted lightning / bare for SimpleCNN = 1 + {overhead_ms:.3f} / "
        f"{bare_step_ms:.3f} (bare step) = {1 + overhead_ms / bare_step_ms:.3f}"
    )

if args.profile:
    import cProfile
    import pstats

    print("\ncProfile of one lightning fit (top 25 by cumulative time):")
    profiler = cProfile.Profile()
    profiler.enable()
    run_lightning("lightning")
    profiler.disable()
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)

print()
common.print_load("at end")
common.target(
    "lightning epoch <= 1.15x bare loop",
    light_vs_bare["of medians"] <= 1.15,
    f"lightning fit / bare = {light_vs_bare['of medians']:.3f} (of medians)",
)
common.target(
    "lightning epoch >= 1.5x faster than the seed pipeline",
    seed_vs_light["of medians"] >= 1.5,
    f"seed / lightning fit = {seed_vs_light['of medians']:.3f} (of medians)",
)
