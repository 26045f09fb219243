"""The visualizer's inputs: image files and MNIST test digits, as the 1x28x28 inputs it draws.

    x = load_image("digit.png", resize=True, invert=True)   # (28, 28) uint8, as MNIST
    images, labels = load_mnist_test("data", [0, 1, 2, 3])  # (4, 1, 28, 28) uint8, [7, 2, 1, 0]

Used by ``python -m fm_lightning.visualize``; every failure is a :class:`VisualizeError` whose
message names the problem and the fix (the command prints it as one ``error:`` line).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from fm_lightning.checkpoints import IMAGE_SIZE
from fm_lightning.data import MNISTDataModule, load_mnist


class VisualizeError(Exception):
    """A problem with the user's input (an image, MNIST index, layer, CAM or --out; the network's
    are :class:`~fm_lightning.checkpoints.CheckpointError`): printed as ``error: ...``, exit 2."""


def note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


# -----------------------------------------------------------------------------
# Inputs


def load_image(
    path: str | os.PathLike,
    resize: bool = False,
    invert: bool = False,
    note: Callable[[str], None] = note,
) -> np.ndarray:
    """Reads one image as the 28x28 uint8 grayscale array the networks take (as MNIST).

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
            f"image {name} is {w}x{h} pixels, but the network takes {IMAGE_SIZE}x{IMAGE_SIZE} "
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


def mnist_test_set(data_dir: str) -> tuple[Tensor, Tensor]:
    """The official MNIST test set (fetched into ``data_dir`` if absent).

    Returns:
        ``((10000, 1, 28, 28) uint8, (10000,) int64 labels)``.

    Raises:
        VisualizeError: MNIST cannot be had.
    """
    dm = MNISTDataModule(data_dir)
    try:
        dm.prepare_data()
        return load_mnist(dm.raw_dir, "test")
    except Exception as err:  # unavailable, corrupt: data.py's messages say what to do
        raise VisualizeError(f"cannot load the MNIST test set: {err}") from None


def load_mnist_test(data_dir: str, indices: Sequence[int]) -> tuple[Tensor, list[int]]:
    """Images ``indices`` of the official MNIST test set (fetched into ``data_dir`` if absent).

    Returns:
        ``((N, 1, 28, 28) uint8, labels)``.

    Raises:
        VisualizeError: MNIST cannot be had, or an index is out of range.
    """
    images, labels = mnist_test_set(data_dir)
    bad = [i for i in indices if not 0 <= i < len(images)]
    if bad:
        raise VisualizeError(
            f"--mnist-index {', '.join(map(str, bad))} out of range: the MNIST test set has "
            f"{len(images):,} images, indices 0 to {len(images) - 1}"
        )
    index = torch.as_tensor(list(indices), dtype=torch.long)
    return images[index], labels[index].tolist()
