"""Shared helpers for the benchmark scripts in this folder (not a benchmark itself).

Each benchmark script imports this module as ``common`` (scripts run as ``python
benchmarks/x.py`` have their own folder on ``sys.path``). What lives here:

- ``add_common_args`` / ``pick_device``: the ``--device`` and ``--data-dir`` flags.
- ``print_env`` / ``print_load``: torch version, device, CPU and thread count, load average.
- ``Timer`` / ``sync``: wall-clock timing that waits for the GPU when there is one.
- ``interleaved``: runs contenders ABAB... (order rotating every round) and collects times,
  noting how many CPU cores other processes used meanwhile (``OtherLoad``).
- ``median`` / ``percentile`` / ``ratios`` / ``fmt_s`` / ``spread_warning`` / ``target``: reports.
- ``rss_bytes``: the process's resident memory, read from /proc.
- ``quiet_lightning``: silences Lightning's info logs and known harmless warnings.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = os.environ.get("FM_DATA_DIR", str(REPO / "data"))

# -----------------------------------------------------------------------------
# flags and environment


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds ``--device`` (default cuda if available, else cpu) and ``--data-dir``."""
    default = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", choices=["cpu", "cuda"], default=default)
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="holds MNIST/raw")
    return parser


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch.cuda.is_available() is False")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def print_env(device: torch.device) -> None:
    print(f"torch {torch.__version__}", end="")
    try:
        import lightning

        print(f", lightning {lightning.__version__}", end="")
    except ImportError:
        pass
    print(f", python {platform.python_version()}")
    print(f"device: {device.type} ({device_name(device)})")
    print(f"CPU count: {os.cpu_count()}, torch.get_num_threads(): {torch.get_num_threads()}")
    print_load("at start")


def print_load(when: str) -> None:
    """Load average: well above 0 on an idle machine means other work shares the CPU."""
    one, five, _ = os.getloadavg()
    print(f"load average {when}: {one:.2f} (1 min), {five:.2f} (5 min)")


def quiet_lightning() -> None:
    """Keeps benchmark output readable: no 'GPU available' banners or dataloader hints."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*number of training batches.*")
    warnings.filterwarnings("ignore", message=".*log_every_n_steps.*")


# -----------------------------------------------------------------------------
# timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """``with Timer(device) as t: ...`` then ``t.s`` holds the seconds, GPU work included."""

    def __init__(self, device: torch.device):
        self.device = device
        self.s = float("nan")

    def __enter__(self) -> Timer:
        sync(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        self.s = time.perf_counter() - self._t0


_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process), from /proc."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    busy = sum(ticks[:8]) - ticks[3] - ticks[4]  # all but idle and iowait (guest is in user)
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    mine = int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])  # u+s, children
    return busy / _TICK, mine / _TICK


class OtherLoad:
    """``with OtherLoad() as o: ...`` then ``o.cores``: CPU cores other processes kept busy.

    Machine-wide busy time minus this process's own CPU time, over the wall time. Near 0 means
    the measurement had the machine to itself; 1.0 on a 2-core box means half of it was taken.
    """

    cores = float("nan")

    def __enter__(self) -> OtherLoad:
        self._t0 = time.perf_counter()
        self._busy0, self._mine0 = _cpu_seconds()
        return self

    def __exit__(self, *exc) -> None:
        busy, mine = _cpu_seconds()
        wall = time.perf_counter() - self._t0
        self.cores = max(0.0, (busy - self._busy0) - (mine - self._mine0)) / max(wall, 1e-9)


def interleaved(
    contenders: dict[str, Callable[[], float]], repeats: int, verbose: bool = True
) -> dict[str, list[float]]:
    """Runs every contender once per round, ``repeats`` rounds, rotating the order each round.

    Each contender is a callable that does one measured unit of work and returns its own
    seconds (so it can leave set-up work out of the measurement). Rotating (ABC, BCA, CAB...)
    means no contender always runs first, last, or right after the same neighbour.

    Returns:
        ``{name: [seconds of round 0, round 1, ...]}`` in round order.
    """
    names = list(contenders)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        k = r % len(names)
        order = names[k:] + names[:k]
        with OtherLoad() as other:
            for name in order:
                times[name].append(contenders[name]())
        if verbose:
            row = "  ".join(f"{name} {times[name][-1]:.3f}s" for name in names)
            print(
                f"  round {r + 1}/{repeats} (order {', '.join(order)}): {row}   "
                f"[other processes: {other.cores:.2f} cores]",
                flush=True,
            )
    return times


# -----------------------------------------------------------------------------
# reporting


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def percentile(xs: list[float], q: float) -> float:
    """The q-th percentile (0..100), linearly interpolated between order statistics."""
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def fmt_s(xs: list[float]) -> str:
    """'median 1.234s (min 1.200s, max 1.300s, n=3)'."""
    return f"median {median(xs):.3f}s (min {min(xs):.3f}s, max {max(xs):.3f}s, n={len(xs)})"


def ratios(num: list[float], den: list[float]) -> dict[str, float]:
    """num / den three ways: of medians, median of per-round ratios, of minimums.

    The first is the headline. Per-round ratios pair runs made close together in time; the
    minimums are each contender's least-disturbed run (other work can only add time).
    """
    return {
        "of medians": median(num) / median(den),
        "per-round median": median([a / b for a, b in zip(num, den, strict=True)]),
        "of minimums": min(num) / min(den),
    }


def fmt_ratios(label: str, r: dict[str, float], note: str = "") -> str:
    cols = "   ".join(f"{value:6.3f} {kind}" for kind, value in r.items())
    return f"  {label:32s} {cols}{'   ' + note if note else ''}"


def spread_warning(times: dict[str, list[float]], limit: float = 1.25) -> None:
    """Warns when a contender's slowest run is ``limit`` x its fastest: the machine was busy."""
    noisy = {name: max(xs) / min(xs) for name, xs in times.items() if max(xs) > limit * min(xs)}
    if noisy:
        which = ", ".join(f"{name} {r:.2f}x" for name, r in noisy.items())
        print(
            f"  NOTE: noisy (max/min: {which}): other processes (see each round) or the host "
            "took CPU time. Compare the three ratio columns, or rerun with more --repeats."
        )


def target(description: str, ok: bool, measured: str) -> None:
    """Prints the one line a reader greps for; informational, it never changes the exit code."""
    print(f"TARGET {description}: {measured} -> {'PASS' if ok else 'FAIL'}")


# -----------------------------------------------------------------------------
# memory


PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")  # RSS is counted in pages of this size


def rss_bytes() -> int:
    """Resident set size of this process, from /proc/self/statm (Linux; no psutil needed)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE_SIZE


def quiet_trainer(log_dir: str, callbacks: list, device: torch.device, **kwargs):
    """A one-device Trainer that logs to a CSV file under ``log_dir`` and prints nothing."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    return pl.Trainer(
        logger=CSVLogger(log_dir),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator=device.type,
        devices=1,
        callbacks=callbacks,
        **kwargs,
    )
