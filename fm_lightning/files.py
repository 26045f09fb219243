"""Files that appear whole or not at all: atomic writes and PNG encoding.

    with atomic_write("data/MNIST/raw/train-labels-idx1-ubyte") as f:
        f.write(payload)                      # a crash here leaves no half-written file
    save_png(grid, "feature_maps/conv1/epoch=000.png")   # (H, W, 3) uint8 -> PNG
    with staging_dir("data/MNIST/raw", ".fetch-") as tmp:   # a private directory, removed after
        ...

Used by the MNIST fetcher, the callback's local destination and the gallery, so one reader of
the output directory never sees a partial file.

Nothing is left behind either. A process killed mid-write (SIGKILL, power loss) leaves its
``.<name>.<hex>.tmp`` file or staging directory; the first :func:`atomic_write` into a directory in
each process, and every :func:`staging_dir`, removes such debris there. Debris is what is older
than this process and not locked: a writer holds an ``flock`` on its temporary file or staging
directory while it works, and the kernel releases it when the writer dies, however it dies.
"""

from __future__ import annotations

import glob
import os
import re
import secrets
import shutil
import struct
import tempfile
import time
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO

import numpy as np
from torch import Tensor

try:
    import fcntl
except ImportError:  # Windows has no flock: there nothing counts as debris, nothing is removed
    fcntl = None

# Temporary files and staging directories older than this were left by another process: one
# still running holds its lock (see the module docstring), a dead one left debris.
PROCESS_START = time.time()
_TMP_NAME = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")  # atomic_write's ".<name>.<hex>.tmp"
_swept: set[Path] = set()  # directories this process has already cleared of stale temp files


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Opens a binary file that only appears at ``path`` once fully written.

    Writes go to a temporary file in the same directory, which is fsynced and then
    renamed over ``path`` (``os.replace`` is atomic within one file system). If the
    body raises, the temporary file is removed and ``path`` is left as it was.

    Args:
        path: Final location of the file.

    Yields:
        The temporary file, opened for binary writing.
    """
    path = Path(path)
    _sweep_once(path.parent)
    # Not tempfile.mkstemp: its files are private (0600); O_EXCL with mode 0o666 gives
    # the usual permissions under the user's umask, as a plain open() would.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            if fcntl:  # "in use": another process's sweep leaves it alone
                fcntl.flock(f, fcntl.LOCK_EX)
            yield f
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, path)  # while still locked, so no sweep can take it before the rename
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextmanager
def staging_dir(parent: str | os.PathLike, prefix: str) -> Iterator[Path]:
    """A new private directory in ``parent``, deleted with its contents when the block ends.

    Staging directories with the same ``prefix`` that a killed process left in ``parent`` are
    deleted first. Keep ``parent`` on the file system of the final files, so moving them out
    with ``os.replace`` is atomic.

    Args:
        parent: Existing directory to create it in.
        prefix: Start of its name, e.g. ``".fetch-"`` (a leading dot keeps it out of listings).

    Yields:
        The directory, locked for as long as the block runs.
    """
    parent = Path(parent)
    for old in parent.glob(f"{glob.escape(prefix)}*"):
        remove_if_stale(old)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    fd = os.open(path, os.O_RDONLY) if fcntl else None
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        if fd is not None:
            os.close(fd)


def remove_if_stale(path: str | os.PathLike) -> bool:
    """Deletes a temporary file or staging directory that a dead process left behind.

    Only if it is older than this process and nobody holds its lock (:func:`atomic_write` and
    :func:`staging_dir` lock theirs while in use); anything else is left alone, as are symlinks.

    Returns:
        Whether ``path`` was deleted.
    """
    path = Path(path)
    if fcntl is None:  # no way to tell a live writer's file from a dead one's
        return False
    try:
        if path.lstat().st_mtime >= PROCESS_START:
            return False
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:  # gone already, a symlink, or not ours to open
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held: a live process is writing it
        os.close(fd)
        return False
    try:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    finally:
        os.close(fd)
    return True


def _sweep_once(directory: Path) -> None:
    """Removes stale ``atomic_write`` temporary files from ``directory``, once per process."""
    key = directory.absolute()
    if key in _swept:
        return
    _swept.add(key)
    with suppress(OSError), os.scandir(directory) as entries:  # a missing directory has none
        for entry in entries:
            if _TMP_NAME.fullmatch(entry.name):
                remove_if_stale(entry.path)


def to_png_bytes(img: Tensor | np.ndarray) -> bytes:
    """Encode an (H, W, 3) uint8 image, e.g. from :func:`feature_grid`, as PNG.

    Args:
        img: uint8 tensor (any device) or array of shape (H, W, 3).

    Returns:
        The PNG file contents.
    """
    if isinstance(img, Tensor):
        img = img.detach().cpu().numpy()
    if not isinstance(img, np.ndarray):
        raise TypeError(f"expected a Tensor or numpy array, got {type(img).__name__}")
    if img.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got dtype {img.dtype}")
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {img.shape}")
    if img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"expected an image of at least 1x1 pixels, got shape {img.shape}")
    # Written here rather than by PIL, whose adaptive per-row filter choice costs more than the
    # compression: every row gets the "Up" filter (the difference from the row above; the
    # enlarged, banded pictures here repeat rows), then zlib level 1; PIL decodes it bit-exactly.
    # Kept for benchmarks/callback_overhead.py's target (a fit with the callback within 2% of
    # one without, last measured at 1.019): on the README's pictures of a default run, PIL's
    # compress_level=1 took 152 ms per captured epoch against 72 ms here, files no larger (the
    # two maps grids alone 75 vs 46 ms; medians of 7, machine loaded to ~10 on 2 cores), so PIL
    # would add about half to one per cent to that benchmark's few-second fit.
    h, w, _ = img.shape
    flat = np.ascontiguousarray(img).reshape(h, w * 3)
    rows = np.empty((h, 1 + w * 3), dtype=np.uint8)  # a filter-type byte, then the row
    rows[:, 0] = 2  # Up
    rows[:1, 1:] = flat[:1]  # the row above the first is zeros
    np.subtract(flat[1:], flat[:-1], out=rows[1:, 1:])  # modulo 256, as PNG's Up filter is
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return b"".join(
        (_PNG_SIGNATURE, _chunk(b"IHDR", header), _chunk(b"IDAT", zlib.compress(rows, 1)))
        + (_chunk(b"IEND", b""),)
    )


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk: length, type, body, CRC of type + body."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def save_png(img: Tensor | np.ndarray, path: str | os.PathLike) -> Path:
    """Write an (H, W, 3) uint8 image to a PNG file atomically.

    The image is written to a temporary file in the target directory and then renamed,
    so a reader (or a crash) never sees a half-written PNG. Parent directories are
    created as needed.

    Args:
        img: uint8 tensor or array of shape (H, W, 3).
        path: Destination file.

    Returns:
        The destination path.
    """
    path = Path(path)
    data = to_png_bytes(img)  # encode first: a bad image never touches the disk
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        f.write(data)
    return path


def safe_path_part(name: str) -> str:
    """A layer name as one directory name: ``layer1.0.conv1`` and ``pool@2`` stay as they are.

    Anything else becomes ``_``, and so do names made only of dots (``.``, ``..``: PyTorch accepts
    them as module names), so the result never leaves the directory it is joined to.
    """
    safe = re.sub(r"[^A-Za-z0-9_.@-]", "_", name)
    return "_" * len(safe) if not safe.strip(".") else safe


def distinct_path_parts(names: Iterable[str], reserved: Iterable[str] = ()) -> dict[str, str]:
    """``{name: directory name}``: :func:`safe_path_part` of each name, made distinct.

    A name whose part is taken, by an earlier name (``"a b"`` and ``"a_b"`` both make ``a_b``)
    or by a reserved one (the CAM pictures' ``cam``), gets ``~2``, ``~3``, ... appended;
    ``safe_path_part`` never makes a ``~``, so no other name can come to the same part.
    """
    taken, parts = set(reserved), {}
    for name in names:
        if name in parts:
            continue
        part = candidate = safe_path_part(name)
        n = 1
        while candidate in taken:
            n += 1
            candidate = f"{part}~{n}"
        taken.add(candidate)
        parts[name] = candidate
    return parts
