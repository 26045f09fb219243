"""Feature-map grids for a trained checkpoint, outside training.

    python -m fm_lightning.visualize --ckpt logs/mnist/version_0/checkpoints/last.ckpt \
        --mnist-index 0 1 2 3 --out logs/visualize
    python -m fm_lightning.visualize --ckpt last.ckpt --image digit.png --layers conv1 conv2
    python -m fm_lightning.visualize --untrained --mnist-index 0 1 2 3   # fresh SimpleCNN, seed 0
    python -m fm_lightning.visualize --ckpt last.ckpt --mnist-index 0 1 --compare  # side by side

The grids are drawn exactly as ``FeatureMapCallback`` draws them during training
(``fm_lightning.rendering``: rows are input images, columns channels), for the layers named by
``--layers`` (names or glob patterns of ``SimpleCNN``: ``conv1``, ``pool``, ``conv2``, ``fc1``...).

Output layout (``--out``, default ``logs/visualize``)::

    probe_inputs.png           the inputs, in one row, in the order given
    <layer>/trained.png        the checkpoint's maps (with --ckpt)
    <layer>/untrained.png      a freshly initialised SimpleCNN's maps (--untrained, --compare)
    compare_<layer>.png        --compare: untrained and trained grids side by side, labelled
    index.html                 a gallery page of all of the above (fm_lightning.gallery)

A layer called twice in one forward pass (SimpleCNN's ``pool``) gets one directory per call,
``pool`` and ``pool@2``, as in the callback's output.

Checkpoints are read with ``torch.load(weights_only=True)``: tensors and plain containers only, so
a file that would run code while loading is refused, never executed. Both Lightning checkpoints of
``ImageClassifier(SimpleCNN())`` (keys ``net.conv1.weight``...) and bare ``SimpleCNN`` state dicts
(``conv1.weight``...) load. Inputs go through ``MNISTDataModule.normalize``, with the mean and std
recorded in the checkpoint when it has them (the template's defaults otherwise).

Input images must be 28x28 grayscale, like MNIST (light digit on black). Other colour modes are
converted to grayscale and a note says so; a mode Pillow cannot convert is refused. Other sizes
are refused unless ``--resize`` is given (then: scaled to fit 28x28 with antialiasing, aspect kept,
padded with the image's border colour). ``--invert`` turns dark-on-light drawings into MNIST's
light-on-dark. Every failure prints ``error: ...`` and exits with status 2.

``--out`` may be a training run's gallery directory: its ``stats.json`` is kept and its plots still
show. A damaged one is an error, and left as it is for the user to look at (the training callback,
which must not stop, moves it aside instead).
"""

from __future__ import annotations

import argparse
import glob
import io
import os
import pickle
import pickletools
import re
import sys
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError
from torch import Tensor, nn

from fm_lightning import rendering
from fm_lightning.capture import capture, resolve_layers
from fm_lightning.data import MNIST_MEAN, MNIST_STD, MNISTDataModule, load_mnist
from fm_lightning.files import safe_path_part, save_png
from fm_lightning.gallery import STATS_FILE, load_stats, write_index
from fm_lightning.models import SimpleCNN

# How torch's weights-only unpickler words a refusal of something that is not plain data: a global
# (a function or class), an object to build, or a function to call while loading.
_NEEDS_CODE = re.compile(r"GLOBAL|Can only (create new object|build)|call reduce")
_TORCH_BOILERPLATE = ("Weights only load failed", "Check the documentation", "Please file an issue")
IMAGE_SIZE = 28  # SimpleCNN's input: 1x28x28, as MNIST
SUPPORTED = (
    "SimpleCNN checkpoints from this template (`python train.py`, or a SimpleCNN state_dict)"
)


class VisualizeError(Exception):
    """A problem with the user's input: printed as ``error: ...``, exit status 2."""


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


# -----------------------------------------------------------------------------
# Models


def load_checkpoint(path: str | os.PathLike) -> tuple[SimpleCNN, dict]:
    """Loads a SimpleCNN from a Lightning checkpoint or a bare state_dict, weights only.

    Args:
        path: a ``.ckpt`` written by ``python train.py`` (or ``trainer.save_checkpoint``), or a
            file holding ``SimpleCNN().state_dict()``.

    Returns:
        ``(model, checkpoint)``: the model in eval mode on the CPU, and the loaded dict.

    Raises:
        VisualizeError: the file is missing, unreadable, would run code, or does not fit.
    """
    path = Path(path)
    if not path.exists():
        found = sorted(glob.glob("logs/*/version_*/checkpoints/*.ckpt"))[:3]
        hint = f" Checkpoints found here: {', '.join(found)}." if found else ""
        raise VisualizeError(
            f"checkpoint not found: {path}. Train one with `python train.py`, which writes "
            "logs/<name>/version_<N>/checkpoints/*.ckpt (the best by val/acc, and last.ckpt)."
            f"{hint}"
        )
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.ckpt"))
        hint = f" It holds: {', '.join(inside)}." if inside else ""
        raise VisualizeError(f"{path} is a directory; pass a checkpoint file.{hint}")
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols > 2, which its loader only partly reads; the
            # error below says what matters, and nothing else should be printed.
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # What it would call, read from the pickle's opcodes: torch cannot even parse protocol 4
        # ("Unsupported operand 149", its FRAME), and names only the first refusal otherwise.
        # Failing that, torch's weights-only unpickler names what it refused on one line.
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = _code_it_would_run(path) or next(
            (line for line in lines if _NEEDS_CODE.search(line)), None
        )
        if detail is not None:
            raise VisualizeError(
                f"{path} was refused because loading it would run code ({detail}). Only "
                "weights-only checkpoints are accepted (torch.load with weights_only=True: "
                "tensors and plain containers), such as the ones `python train.py` writes."
            ) from None
        useful = [line for line in lines if not line.startswith(_TORCH_BOILERPLATE)]
        why = useful[-1] if useful else "the weights-only loader could not parse it"
        raise VisualizeError(
            f"{path} is not a readable PyTorch checkpoint ({why}); it may be corrupt or "
            "truncated, or not written by torch.save."
        ) from None
    except OSError as err:
        raise VisualizeError(f"cannot read checkpoint {path}: {err.strerror or err}") from None
    except Exception as err:  # zip errors, EOF, garbage: torch raises many kinds
        if path.stat().st_size == 0:
            why = "the file is empty"
        elif isinstance(err, RuntimeError) and str(err):  # torch's own words, first sentence
            why = str(err).split(". ")[0].splitlines()[0][:160]
        else:
            why = f"{type(err).__name__} while parsing it"
        raise VisualizeError(
            f"{path} is not a readable PyTorch checkpoint ({why}); it may be corrupt or "
            "truncated, or not written by torch.save."
        ) from None

    state = _state_dict(ckpt, path)
    fc3 = state.get("fc3.weight")
    num_classes = fc3.shape[0] if isinstance(fc3, Tensor) and fc3.ndim == 2 else 10
    model = SimpleCNN(num_classes=num_classes)
    _check_fits(model, state, path)
    model.load_state_dict(state, strict=True)
    return model.eval(), ckpt if isinstance(ckpt, dict) else {}


def _code_it_would_run(path: Path) -> str | None:
    """What the checkpoint's pickle would import and call outside torch's weights-only allow-list
    (``"it calls posix.system"``), found by reading its opcodes, which never runs them; None if
    nothing is, or if the file is no pickle."""
    try:  # private, so looked up here: without it, only torch's own words are reported
        from torch._weights_only_unpickler import _get_allowed_globals
    except ImportError:
        return None
    allowed = _get_allowed_globals()  # "module.name" of what torch.load(weights_only=True) takes
    memo: dict[object, object] = {}
    pushed: list[object] = []  # what the last two opcodes (memo ones aside) pushed
    calls: dict[str, None] = {}  # the disallowed ones, in order, once each
    try:
        if zipfile.is_zipfile(path):  # torch.save's format: the object is <archive>/data.pkl
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                stream = io.BytesIO(archive.read(name) if name else b"")
        else:  # a bare pickle, or torch's legacy format: several pickles, then storage bytes
            stream = io.BytesIO(path.read_bytes())
        while stream.tell() < len(stream.getbuffer()):
            for op, arg, _ in pickletools.genops(stream):
                if op.name == "MEMOIZE":
                    memo[len(memo)] = pushed[-1] if pushed else None
                    continue
                if op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[arg] = pushed[-1] if pushed else None
                    continue
                if op.name in ("GLOBAL", "INST"):  # arg: "module name"
                    target = arg.replace(" ", ".", 1)
                elif op.name == "STACK_GLOBAL":  # module and name are the two strings pushed
                    strings = [x for x in pushed if isinstance(x, str)]
                    target = ".".join(strings) if len(strings) == 2 else "a function named at load"
                elif op.name.startswith("EXT"):
                    target = "a function from the copyreg extension registry"
                else:
                    value = memo.get(arg) if op.name in ("GET", "BINGET", "LONG_BINGET") else arg
                    is_str = "UNICODE" in op.name or op.name.endswith("STRING")
                    pushed = [*pushed[-1:], value if is_str or op.name.endswith("GET") else None]
                    continue
                if target not in allowed:
                    calls[target] = None
    except (ValueError, zipfile.BadZipFile):  # past the pickles (legacy storage), or no pickle
        pass
    return f"it calls {', '.join(calls)}" if calls else None


def _state_dict(ckpt: object, path: Path) -> dict[str, Tensor]:
    """The SimpleCNN weights in a loaded checkpoint, with ImageClassifier's ``net.`` removed."""
    if isinstance(ckpt, Mapping) and isinstance(ckpt.get("state_dict"), Mapping):
        state = dict(ckpt["state_dict"])
    elif isinstance(ckpt, Mapping) and ckpt and all(isinstance(v, Tensor) for v in ckpt.values()):
        state = dict(ckpt)  # a bare state_dict
    else:
        what = (
            f"a dict with keys {', '.join(map(str, list(ckpt)[:8]))}"
            if isinstance(ckpt, Mapping)
            else f"a {type(ckpt).__name__}"
        )
        raise VisualizeError(
            f"{path} holds {what}, not a model checkpoint with a state_dict. "
            f"The visualizer supports {SUPPORTED}."
        )
    if any(key.startswith("net.") for key in state):
        # ImageClassifier keeps its network in `self.net`; its other entries are not weights.
        state = {key[4:]: value for key, value in state.items() if key.startswith("net.")}
    return state


def _check_fits(model: nn.Module, state: dict[str, object], path: Path) -> None:
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    wrong = [
        f"{key} {tuple(value.shape)} (SimpleCNN: {tuple(expected[key].shape)})"
        if isinstance(value, Tensor)
        else f"{key} (a {type(value).__name__}, not a tensor)"
        for key, value in state.items()
        if key in expected
        and not (isinstance(value, Tensor) and value.shape == expected[key].shape)
    ]
    problems = [
        f"{label}: {', '.join(items[:6])}{', ...' if len(items) > 6 else ''}"
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatch", wrong),
        )
        if items
    ]
    if problems:
        raise VisualizeError(
            f"{path} does not fit SimpleCNN ({'; '.join(problems)}). "
            f"The visualizer supports {SUPPORTED}."
        )


def untrained_model(seed: int, num_classes: int = 10) -> SimpleCNN:
    """A freshly initialised SimpleCNN, the same for the same seed; global RNG state is kept."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SimpleCNN(num_classes=num_classes).eval()


# -----------------------------------------------------------------------------
# Inputs


def load_image(
    path: str | os.PathLike,
    resize: bool = False,
    invert: bool = False,
    note: Callable[[str], None] = _note,
) -> np.ndarray:
    """Reads one image as the 28x28 uint8 grayscale array SimpleCNN expects.

    Conversions are reported through ``note``; what cannot be converted raises.

    Args:
        path: any file Pillow can read.
        resize: scale an image of another size to fit 28x28 (aspect kept, padded with its border
            colour) instead of refusing it.
        invert: ``255 - pixel``, for dark digits on a light background.
        note: called with a message for every conversion made.

    Returns:
        (28, 28) uint8 array.

    Raises:
        VisualizeError: unreadable file, unconvertible colour mode, or wrong size without resize.
    """
    path = Path(path)
    name = str(path)
    if not path.exists():
        raise VisualizeError(f"cannot read image {name}: no such file")
    if path.is_dir():
        raise VisualizeError(f"cannot read image {name}: it is a directory")
    try:
        with Image.open(path) as img:
            frames = getattr(img, "n_frames", 1)
            if frames > 1:
                note(f"{name} has {frames} frames; using the first")
            img.load()
            pixels = _to_gray(img, name, note)
    except UnidentifiedImageError:
        raise VisualizeError(
            f"cannot read image {name}: not an image format Pillow recognises"
        ) from None
    except Image.DecompressionBombError as err:
        raise VisualizeError(f"cannot read image {name}: refused as too large ({err})") from None
    except OSError as err:
        if err.strerror:  # the file system's answer: permission denied, ...
            raise VisualizeError(f"cannot read image {name}: {err.strerror}") from None
        raise VisualizeError(
            f"cannot read image {name}: its data is corrupt or truncated ({err})"
        ) from None
    if invert:
        pixels = 255 - pixels
    border = int(np.median(np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])))
    if not invert and border > 160:
        note(
            f"{name} looks like a dark digit on a light background (border colour {border}); "
            "MNIST digits are light on black, so you may want --invert"
        )
    h, w = pixels.shape
    if (h, w) == (IMAGE_SIZE, IMAGE_SIZE):
        return pixels
    if not resize:
        raise VisualizeError(
            f"image {name} is {w}x{h} pixels, but SimpleCNN takes {IMAGE_SIZE}x{IMAGE_SIZE} "
            "(MNIST-sized) images, so it was refused. Pass --resize to scale it to fit "
            f"{IMAGE_SIZE}x{IMAGE_SIZE} (aspect ratio kept, padded with its border colour), "
            "or resize it yourself."
        )
    scale = IMAGE_SIZE / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    small = Image.fromarray(pixels).resize((new_w, new_h), Image.Resampling.LANCZOS)
    canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), border)
    canvas.paste(small, ((IMAGE_SIZE - new_w) // 2, (IMAGE_SIZE - new_h) // 2))
    padded = f" and padded to {IMAGE_SIZE}x{IMAGE_SIZE} with its border colour ({border})"
    note(
        f"{name} is {w}x{h}; resized to {new_w}x{new_h} (aspect kept, antialiased)"
        f"{padded if (new_w, new_h) != (IMAGE_SIZE, IMAGE_SIZE) else ''}"
    )
    return np.asarray(canvas, dtype=np.uint8).copy()


def _to_gray(img: Image.Image, name: str, note: Callable[[str], None]) -> np.ndarray:
    """Any Pillow mode -> (H, W) uint8 grayscale, saying what was done."""
    mode = img.mode
    if mode == "L":
        return np.asarray(img, dtype=np.uint8).copy()
    if mode.startswith("I;16"):
        values = np.asarray(img).astype(np.float64) / 257  # 0..65535 -> 0..255
        note(f"{name} is 16-bit grayscale ({mode}); scaled to 8-bit grayscale (L)")
        return np.rint(values).astype(np.uint8)
    if mode in ("I", "F"):
        values = np.asarray(img).astype(np.float64)
        lo, hi = float(values.min()), float(values.max())
        if lo >= 0 and hi <= 255:
            note(f"{name} is {mode} (32-bit) with values in 0-255; converted to grayscale (L)")
            return np.rint(values).astype(np.uint8)
        note(f"{name} is {mode} (32-bit); rescaled from [{lo:g}, {hi:g}] to grayscale (L) 0-255")
        return np.rint((values - lo) / ((hi - lo) or 1.0) * 255).astype(np.uint8)
    has_alpha = mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info)
    try:
        if has_alpha:
            rgba = img.convert("RGBA")
            transparent = rgba.getextrema()[3][0] < 255
            black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
            gray = Image.alpha_composite(black, rgba).convert("L")
        else:
            transparent = False
            gray = img.convert("L")
    except (ValueError, OSError) as err:
        raise VisualizeError(
            f"image {name} has colour mode {mode}, which cannot be converted to grayscale "
            f"({err}), so it was refused. Save it as grayscale (L) or RGB, e.g. a PNG."
        ) from None
    flattened = (
        "; transparent pixels drawn on black (MNIST's background), then" if transparent else ";"
    )
    kind = {"1": "1 (1-bit)", "P": "P (palette)", "PA": "PA (palette)"}.get(mode, mode)
    note(f"{name} is {kind}{flattened} converted to grayscale (L)")
    return np.asarray(gray, dtype=np.uint8).copy()


def load_mnist_test(data_dir: str, indices: Sequence[int]) -> tuple[Tensor, list[int]]:
    """Images ``indices`` of the official MNIST test set (fetched into ``data_dir`` if absent).

    Returns:
        ``((N, 1, 28, 28) uint8, labels)``.

    Raises:
        VisualizeError: MNIST cannot be had, or an index is out of range.
    """
    dm = MNISTDataModule(data_dir)
    try:
        dm.prepare_data()
        images, labels = load_mnist(dm.raw_dir, "test")
    except Exception as err:  # unavailable, corrupt: data.py's messages say what to do
        raise VisualizeError(f"cannot load the MNIST test set: {err}") from None
    bad = [i for i in indices if not 0 <= i < len(images)]
    if bad:
        raise VisualizeError(
            f"--mnist-index {', '.join(map(str, bad))} out of range: the MNIST test set has "
            f"{len(images):,} images, indices 0 to {len(images) - 1}"
        )
    index = torch.as_tensor(list(indices), dtype=torch.long)
    return images[index], labels[index].tolist()


# -----------------------------------------------------------------------------
# Pictures


def side_by_side(panels: Sequence[tuple[str, np.ndarray]], gap: int = 16) -> np.ndarray:
    """Lays out (H, W, 3) uint8 images in a row on white, each under a small text label."""
    try:
        font = ImageFont.load_default(size=14)
    except (TypeError, OSError):  # Pillow without FreeType: the small bitmap font
        font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_h = max(probe.textbbox((0, 0), label, font=font)[3] for label, _ in panels)
    label_h = text_h + 6
    width = sum(img.shape[1] for _, img in panels) + gap * (len(panels) + 1)
    height = label_h + max(img.shape[0] for _, img in panels) + gap
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    x = gap
    for label, img in panels:
        draw.text((x, 2), label, fill="black", font=font)
        canvas.paste(Image.fromarray(np.asarray(img)), (x, label_h))
        x += img.shape[1] + gap
    return np.asarray(canvas)


def _predictions(logits: Tensor) -> str:
    probs = logits.softmax(dim=1)
    conf, pred = probs.max(dim=1)
    return " ".join(f"{p} ({c:.0%})" for p, c in zip(pred.tolist(), conf.tolist(), strict=True))


# -----------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fm_lightning.visualize",
        description=(
            "Draw what SimpleCNN's layers see for chosen inputs, as FeatureMapCallback does\n"
            "during training: for a trained checkpoint (--ckpt), a freshly initialised network\n"
            "(--untrained), or both side by side (--ckpt PATH --compare). Writes PNG grids and\n"
            "an index.html gallery to --out; errors print 'error: ...' and exit with status 2."
        ),
        epilog=(
            "examples:\n"
            "  python -m fm_lightning.visualize --ckpt logs/mnist/version_0/checkpoints/last.ckpt "
            "--mnist-index 0 1 2 3\n"
            "  python -m fm_lightning.visualize --ckpt last.ckpt --image digit.png --resize "
            "--invert\n"
            "  python -m fm_lightning.visualize --untrained --mnist-index 7 --layers 'conv*'\n"
            "  python -m fm_lightning.visualize --ckpt last.ckpt --mnist-index 0 1 --compare"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--ckpt",
        metavar="PATH",
        help="checkpoint from `python train.py` (logs/<name>/version_<N>/checkpoints/*.ckpt) or "
        "a SimpleCNN state_dict; loaded weights-only, so no code in it ever runs",
    )
    model.add_argument(
        "--untrained",
        action="store_true",
        help="draw a freshly initialised SimpleCNN instead of a checkpoint (seeded by --seed)",
    )
    model.add_argument(
        "--compare",
        action="store_true",
        help="with --ckpt: draw untrained and trained maps for the same inputs, and write "
        "compare_<layer>.png with the two grids side by side",
    )
    model.add_argument(
        "--seed", type=int, default=0, help="seed of the untrained network (default: 0)"
    )

    inputs = parser.add_argument_group("inputs (one of)")
    which = inputs.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--image",
        nargs="+",
        metavar="FILE",
        help="image files (28x28 grayscale, light digit on black, like MNIST); other colour modes "
        "are converted with a note, other sizes refused unless --resize",
    )
    which.add_argument(
        "--mnist-index",
        nargs="+",
        type=int,
        metavar="I",
        help="indices into the official MNIST test set (0-9999), fetched into --data-dir if absent",
    )
    inputs.add_argument(
        "--data-dir", default="data", help="MNIST root for --mnist-index (default: data)"
    )
    inputs.add_argument(
        "--resize",
        action="store_true",
        help="scale images of another size to fit 28x28 (antialiased, aspect ratio kept, padded "
        "with the border colour) instead of refusing them",
    )
    inputs.add_argument(
        "--invert",
        action="store_true",
        help="invert --image files (255 - pixel), for dark digits drawn on a light background",
    )

    drawing = parser.add_argument_group("drawing (defaults: as FeatureMapCallback)")
    drawing.add_argument(
        "--layers",
        nargs="+",
        default=["conv1", "conv2"],
        metavar="NAME",
        help="SimpleCNN layers, names or glob patterns: conv1, pool, conv2, fc1, fc2, fc3, "
        "'conv*' (default: conv1 conv2)",
    )
    drawing.add_argument(
        "--max-channels",
        type=_positive_int,
        default=32,
        help="channels (columns) per grid (default: 32)",
    )
    drawing.add_argument(
        "--normalize",
        choices=rendering.NORMALIZE_MODES,
        default="channel",
        help="channel: each map to its own range; layer: one range per image (default: channel)",
    )
    drawing.add_argument(
        "--cmap", type=_colormap, default="viridis", help="matplotlib colormap (default: viridis)"
    )
    drawing.add_argument(
        "--order",
        choices=rendering.ORDERS,
        default="index",
        help="index: the first channels; activation: the most active first (default: index)",
    )
    parser.add_argument(
        "--out",
        default="logs/visualize",
        metavar="DIR",
        help="output directory (default: logs/visualize)",
    )
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _colormap(name: str) -> str:
    try:
        return rendering.check_cmap(name)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (0, or 2 for a user error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.untrained and (args.ckpt or args.compare):
        parser.error(
            "--untrained draws a fresh network and takes no --ckpt; "
            "to draw both, pass --ckpt PATH --compare"
        )
    if args.compare and not args.ckpt:
        parser.error("--compare needs --ckpt PATH: the trained side of the comparison")
    if not (args.ckpt or args.untrained):
        parser.error("pass --ckpt PATH (a trained checkpoint) or --untrained")
    try:
        run(args)
    except VisualizeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def run(args: argparse.Namespace) -> None:
    """Does the work of :func:`main` with parsed, consistent arguments."""
    try:  # fail on a bad layer name before loading anything
        resolve_layers(SimpleCNN(), args.layers)
    except ValueError as err:
        raise VisualizeError(str(err)) from None
    try:  # and on a damaged stats.json in --out, which the gallery page would read
        load_stats(Path(args.out) / STATS_FILE)
    except OSError:
        pass  # an --out that cannot be read cannot be written either: reported when writing
    except ValueError as err:
        raise VisualizeError(
            f"{err}. --out is a gallery directory with a damaged stats file: delete or rename "
            "it, or pass another --out."
        ) from None

    models: dict[str, nn.Module] = {}  # variant -> model, untrained first
    mean, std = MNIST_MEAN, MNIST_STD
    if args.ckpt:
        trained, ckpt = load_checkpoint(args.ckpt)
        hp = ckpt.get("datamodule_hyper_parameters")
        if (
            isinstance(hp, Mapping)
            and all(
                isinstance(hp.get(k), (int, float)) and not isinstance(hp.get(k), bool)
                for k in ("mean", "std")
            )
            and hp["std"] > 0
        ):
            mean, std = float(hp["mean"]), float(hp["std"])
        if args.compare:
            models["untrained"] = untrained_model(args.seed, trained.fc3.out_features)
        models["trained"] = trained
    else:
        models["untrained"] = untrained_model(args.seed)

    if args.image:
        pixels = [load_image(p, resize=args.resize, invert=args.invert) for p in args.image]
        images = torch.from_numpy(np.stack(pixels)).unsqueeze(1)  # (N, 1, 28, 28) uint8
        names = [Path(p).name for p in args.image]
    else:
        images, labels = load_mnist_test(args.data_dir, args.mnist_index)
        names = [f"#{i} (label {y})" for i, y in zip(args.mnist_index, labels, strict=True)]
    x = MNISTDataModule(args.data_dir, mean=mean, std=std).normalize(images)

    out = Path(args.out)
    try:
        _write(args, models, x, names, out)
    except OSError as err:
        raise VisualizeError(f"cannot write to {out}: {err}") from None


def _write(
    args: argparse.Namespace, models: dict[str, nn.Module], x: Tensor, names: list[str], out: Path
) -> None:
    """Draws every layer for every model into ``out`` and prints what was written."""
    written = [save_png(rendering.image_grid(x), out / "probe_inputs.png")]
    grids: dict[str, dict[str, np.ndarray]] = {}  # layer -> variant -> grid
    predictions: dict[str, str] = {}
    for variant, model in models.items():
        modules = resolve_layers(model, args.layers)
        captured, logits = capture(
            model, x, modules, max_channels=args.max_channels, order=args.order, stats=False
        )
        predictions[variant] = _predictions(logits)
        for layer, cap in captured.items():
            if cap.error is not None:
                _note(f"{layer} is not drawn: {cap.error}")
                continue
            grid = rendering.feature_grid(
                cap.act,
                max_channels=args.max_channels,
                normalize=args.normalize,
                cmap=args.cmap,
                order=args.order,
                channels=cap.channels,
            ).numpy()
            grids.setdefault(layer, {})[variant] = grid
            written.append(save_png(grid, out / safe_path_part(layer) / f"{variant}.png"))
    dirs = {safe_path_part(layer) for layer in grids}
    for name in dirs:  # a frame left from an earlier run would show in the gallery's slider
        for stale in {"untrained", "trained"} - set(models):
            (out / name / f"{stale}.png").unlink(missing_ok=True)
    others = sorted(p.name for p in out.iterdir() if p.is_dir() and p.name not in dirs)
    if others:
        _note(f"{out} also holds {', '.join(others)} from before; the gallery shows them too")

    trained_label = f"trained ({Path(args.ckpt).name})" if args.ckpt else ""
    untrained_label = f"untrained (seed {args.seed})"
    if args.compare:
        for layer, by_variant in grids.items():
            panels = [
                (f"{layer}: {untrained_label}", by_variant["untrained"]),
                (f"{layer}: {trained_label}", by_variant["trained"]),
            ]
            path = out / f"compare_{safe_path_part(layer)}.png"
            written.append(save_png(side_by_side(panels), path))

    source = "MNIST test " + ", ".join(names) if args.mnist_index else ", ".join(names)
    what = {"untrained": untrained_label, "trained": trained_label}
    title = f"Feature maps: {' vs '.join(what[v] for v in models)}; inputs: {source}"
    index = write_index(out, title=title)

    print(f"inputs:  {source}")
    for variant in models:
        print(f"{what[variant]} predicts: {predictions[variant]}")
    print(f"wrote {len(written)} images to {out}/:")
    for path in written:
        print(f"  {path.relative_to(out)}")
    print(f"open:    {index}")


if __name__ == "__main__":
    sys.exit(main())
