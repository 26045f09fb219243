"""What does one capture cost on real models, next to the bare forward of the same probe?

    python benchmarks/capture_cost.py                     # ~2 min on an idle 2-core CPU
    python benchmarks/capture_cost.py --repeats 15 --mem-repeats 5 --device cpu

Models: timm ``resnet50`` (layers ``layer*``: layer1..layer4) and ``vit_small_patch16_224``
(``blocks.2``, ``blocks.5``, ``blocks.8``, ``blocks.11``: tokens read as 14x14 grids), random
weights (``pretrained=False``), a probe of 8 random 224x224 images, the model in eval mode.

Contenders, interleaved per model (order flipping every round, untimed warm-up first):
    bare     ``model(probe)`` under ``torch.no_grad()``.
    capture  what FeatureMapCallback does at a captured validation end before it hands the
             pictures over: ``fm_lightning.capture.capture`` with the callback's defaults
             (max_channels=32, order="index", stats on: eval mode, hooks, layout reading, channel
             selection and statistics) then ``rendering.feature_grid`` for each layer. Logging and
             PNG files are left out (benchmarks/callback_overhead.py times those).
    measure  ``fm_lightning.probing.measure_layouts`` of the same layers: how each output lies on
             the input, measured once per layer per fit before the first capture (one forward
             pass of 4 copies of the first probe image with gradients on, then one backward
             pass per layer from its output, down to the previous layer's output where every
             path from the input goes through it: to the input for layer1 and blocks.2 only).

Targets, per model: capture / bare <= 2.0, and measure / capture <= 2.0 (medians of the per-round
ratios; the targets are for CPU).

Memory (reported, no target): the peak resident memory (RSS) one call adds, for each contender,
and the difference. ``tracemalloc`` does not see torch's CPU tensors, so each measurement runs in a
fresh subprocess of this script: build the model, one warm-up call, then reset the kernel's RSS
high-water mark (``/proc/self/clear_refs``), run the call once and read ``VmHWM`` minus ``VmRSS``
from before it. glibc is told to hand every block of 64 KiB or more straight back to the kernel
(``MALLOC_MMAP_THRESHOLD_``), so memory freed by the warm-up cannot hide the call's own peak. On a
GPU, ``torch.cuda.max_memory_allocated`` over the same call is reported as well.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys

import common
import timm
import torch
from torch import nn

from fm_lightning import capture, probing, rendering

MODELS = {  # timm name -> layers, as a FeatureMapCallback user would write them
    "resnet50": ["layer*"],
    "vit_small_patch16_224": ["blocks.2", "blocks.5", "blocks.8", "blocks.11"],
}
TARGET = 2.0
MEASURE_TARGET = 2.0  # layout measurement of the layers / one capture of them

parser = common.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
parser.add_argument("--repeats", type=int, default=10, help="bare/capture rounds per model")
parser.add_argument("--mem-repeats", type=int, default=3, help="subprocesses per memory figure")
parser.add_argument("--images", type=int, default=8, help="probe images")
parser.add_argument("--size", type=int, default=224, help="probe image side, in pixels")
parser.add_argument("--seed", type=int, default=0)
# Internal: run one memory measurement ("MODEL:bare" or "MODEL:capture") and print it as JSON.
parser.add_argument("--child", help=argparse.SUPPRESS)
args = parser.parse_args()

device = common.pick_device(args.device)


# -----------------------------------------------------------------------------
# the two contenders


def build(name: str) -> tuple[nn.Module, torch.Tensor, dict[str, nn.Module]]:
    torch.manual_seed(args.seed)
    model = timm.create_model(name, pretrained=False).to(device).eval()
    probe = torch.randn(args.images, 3, args.size, args.size, device=device)  # (N, 3, H, W)
    return model, probe, capture.resolve_layers(model, MODELS[name])


def bare(model: nn.Module, probe: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(probe)


def capture_and_render(
    model: nn.Module, probe: torch.Tensor, modules: dict[str, nn.Module]
) -> list[torch.Tensor]:
    """One capture as the callback makes it; returns the (H, W, 3) uint8 grids."""
    captured, _ = capture.capture(model, probe, modules)
    return [
        rendering.feature_grid(cap.act, channels=cap.channels)
        for cap in captured.values()
        if cap.error is None
    ]


# -----------------------------------------------------------------------------
# memory: one measurement per subprocess

_CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 2**10), "MALLOC_TRIM_THRESHOLD_": "0"}


def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def child(spec: str) -> None:
    name, which = spec.split(":")
    model, probe, modules = build(name)

    def call() -> object:  # what it returns (the grids) is alive at the end of the call
        if which == "bare":
            return bare(model, probe)
        return capture_and_render(model, probe, modules)

    call()  # warm-up: lazy kernels and colormap tables are not the call's cost
    gc.collect()
    common.sync(device)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    rss_before = _kib("VmRSS")
    cuda_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    call()
    common.sync(device)
    cuda_peak = (
        torch.cuda.max_memory_allocated(device) - cuda_before if device.type == "cuda" else 0
    )
    print(json.dumps({"rss": (_kib("VmHWM") - rss_before) * 2**10, "cuda": cuda_peak}))


def measure_memory(name: str) -> dict[str, dict[str, list[int]]]:
    """``{contender: {"rss": [bytes...], "cuda": [bytes...]}}``, subprocesses interleaved."""
    found: dict[str, dict[str, list[int]]] = {
        c: {"rss": [], "cuda": []} for c in ("bare", "capture")
    }
    env = {**os.environ, **_CHILD_ENV}
    for r in range(args.mem_repeats):
        for which in ("bare", "capture") if r % 2 == 0 else ("capture", "bare"):
            cmd = [
                sys.executable,
                __file__,
                f"--device={args.device}",
                f"--images={args.images}",
                f"--size={args.size}",
                f"--seed={args.seed}",
                f"--child={name}:{which}",
            ]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"memory subprocess {name}:{which} failed:\n{proc.stderr}")
            reading = json.loads(proc.stdout.strip().splitlines()[-1])
            for key in ("rss", "cuda"):
                found[which][key].append(reading[key])
    return found


def mib(x: float) -> str:
    return f"{x / 2**20:.1f} MiB"


# -----------------------------------------------------------------------------
# main


def bench(name: str) -> tuple[int, float, float]:
    """Times and memory of one model: (layers, capture/bare ratio, peak extra RSS in bytes)."""
    model, probe, modules = build(name)
    grids = capture_and_render(model, probe, modules)  # warm-up of both contenders
    bare(model, probe)
    captured, _ = capture.capture(model, probe, modules)
    print(f"\n[{name}] {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")
    for (key, cap), grid in zip(captured.items(), grids, strict=True):
        note = f" ({cap.note})" if cap.note else ""
        print(
            f"  {key:10s} drawn {tuple(cap.act.shape)} of {cap.total_channels} channels{note}"
            f" -> grid {tuple(grid.shape)}"
        )
    render_s: list[float] = []

    def time_bare() -> float:
        with common.Timer(device) as t:
            bare(model, probe)
        return t.s

    def time_capture() -> float:
        with common.Timer(device) as t:
            captured, _ = capture.capture(model, probe, modules)
            with common.Timer(device) as r:
                for cap in captured.values():
                    rendering.feature_grid(cap.act, channels=cap.channels)
        render_s.append(r.s)
        return t.s

    def time_measure() -> float:
        with common.Timer(device) as t:
            probing.measure_layouts(model, probe, modules)
        return t.s

    readings = probing.measure_layouts(model, probe, modules)
    for key, reading in readings.items():
        print(f"  {key:10s} measured {reading}")
    contenders = {"bare": time_bare, "capture": time_capture, "measure": time_measure}
    times = common.interleaved(contenders, args.repeats)
    common.spread_warning(times)
    ratio = common.ratios(times["capture"], times["bare"])
    measure_ratio = common.ratios(times["measure"], times["capture"])
    print(f"  bare     {common.fmt_s(times['bare'])}")
    print(f"  capture  {common.fmt_s(times['capture'])}")
    print(f"    of which rendering {common.fmt_s(render_s)}")
    print(f"  measure  {common.fmt_s(times['measure'])}")
    print(common.fmt_ratios("capture / bare", ratio))
    print(common.fmt_ratios("measure / capture", measure_ratio))

    mem = measure_memory(name)
    peak = {which: common.median(m["rss"]) for which, m in mem.items()}
    print(f"  peak RSS added by one call (median of {args.mem_repeats} subprocesses):")
    for which, m in mem.items():
        runs = ", ".join(f"{x / 2**20:.1f}" for x in m["rss"])
        print(f"    {which:8s} {mib(peak[which])}   (runs: {runs} MiB)")
    extra = peak["capture"] - peak["bare"]
    print(f"    capture over bare: {mib(extra)}")
    if device.type == "cuda":
        cuda = {which: common.median(m["cuda"]) for which, m in mem.items()}
        print(
            f"  peak CUDA memory added: bare {mib(cuda['bare'])}, capture {mib(cuda['capture'])}, "
            f"capture over bare {mib(cuda['capture'] - cuda['bare'])}"
        )
    return len(captured), ratio["per-round median"], extra, measure_ratio["per-round median"]


def main() -> None:
    common.print_env(device)
    print(
        f"probe: {args.images} random images at {args.size}x{args.size}; timm {timm.__version__}, "
        "pretrained=False"
    )
    verdicts = {name: bench(name) for name in MODELS}
    print()
    common.print_load("at end")
    where = "" if device.type == "cpu" else f" (target is for CPU; ran on {device.type})"
    for name, (layers, ratio, extra, measure) in verdicts.items():
        common.target(
            f"{name}: capture + render of {layers} layers x {args.images} "
            f"images <= {TARGET} x the bare forward{where}",
            ratio <= TARGET,
            f"capture/bare = {ratio:.3f} (median of {args.repeats} per-round ratios); peak "
            f"extra RSS over bare {mib(extra)}",
        )
        common.target(
            f"{name}: layout measurement of {layers} layers <= {MEASURE_TARGET} x one capture "
            f"of them{where}",
            measure <= MEASURE_TARGET,
            f"measure/capture = {measure:.3f} (median of {args.repeats} per-round ratios)",
        )


if __name__ == "__main__":
    if args.child:
        child(args.child)
    else:
        main()
