"""Atomic writes and PNG encoding (fm_lightning.files)."""

import io
import os
import signal
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image

from fm_lightning.files import (
    atomic_write,
    distinct_path_parts,
    safe_path_part,
    save_png,
    to_png_bytes,
)
from fm_lightning.rendering import feature_grid


def test_atomic_write_failure_leaves_no_file(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(target) as f:
            f.write(b"half of it")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []

    # an existing file is left exactly as it was
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as f:
            f.write(b"new")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target]

    with atomic_write(target) as f:
        f.write(b"new")
    assert target.read_bytes() == b"new"
    assert list(tmp_path.iterdir()) == [target]


def test_written_files_get_the_usual_permissions(tmp_path):
    # mkstemp would make them 0600: unreadable to a web server or a teammate.
    umask = os.umask(0o022)
    try:
        save_png(np.zeros((2, 2, 3), np.uint8), tmp_path / "a.png")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "a.png").stat().st_mode) == 0o644


def test_save_png_writes_readable_non_blank_png_atomically(tmp_path):
    grid = feature_grid(torch.randn(2, 4, 8, 8))
    path = tmp_path / "nested" / "dir" / "conv1.png"
    assert save_png(grid, path) == path
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == (grid.shape[1], grid.shape[0])
        pixels = np.asarray(im.convert("RGB"))
    assert np.array_equal(pixels, grid.numpy())
    assert pixels.std() > 0
    assert [p.name for p in path.parent.iterdir()] == ["conv1.png"]  # no temp file left


def test_save_png_overwrites_and_accepts_numpy(tmp_path):
    path = tmp_path / "img.png"
    save_png(np.zeros((4, 5, 3), np.uint8), path)
    save_png(np.full((6, 7, 3), 200, np.uint8), str(path))
    with Image.open(path) as im:
        assert im.size == (7, 6)
    assert [p.name for p in tmp_path.iterdir()] == ["img.png"]


@pytest.mark.parametrize("shape", [(5, 9, 3), (1, 1, 3), (1, 40, 3), (300, 2, 3)])
def test_to_png_bytes_round_trips(shape):
    img = torch.randint(0, 256, shape, dtype=torch.uint8)
    data = to_png_bytes(img)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(data)) as im:
        im.verify()  # every chunk's CRC
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "RGB"
        assert np.array_equal(np.asarray(im), img.numpy())


def test_to_png_bytes_reads_a_strided_view_as_its_pixels():
    img = np.random.default_rng(0).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    view = img[::2, ::3]  # (4, 4, 3), not contiguous
    with Image.open(io.BytesIO(to_png_bytes(view))) as im:
        assert np.array_equal(np.asarray(im), view)


def test_to_png_bytes_rejects_bad_images():
    with pytest.raises(TypeError, match="expected a uint8 image, got dtype float32"):
        to_png_bytes(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match=r"expected an \(H, W, 3\) image, got shape \(4, 4\)"):
        to_png_bytes(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"expected an image of at least 1x1 pixels, got shape"):
        to_png_bytes(np.zeros((0, 4, 3), np.uint8))


# ---------------------------------------------------------------- debris of killed processes


def start_held_writer(code: str, *args: str) -> subprocess.Popen:
    """``python -c code *args``, where ``code`` prints ``ready`` once it is mid-write and then
    hangs: SIGKILL it to leave what a crash leaves, or keep it running as a writer at work."""
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=REPO,  # this checkout's fm_lightning
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()  # blocks until the write has begun (or the process died)
    assert line == "ready\n", f"writer exited with {proc.wait()} before it was mid-write"
    return proc


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL: no cleanup handler, no finally block runs."""
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()


_PNG_WRITE_HELD = """
    import sys, time
    from fm_lightning.files import atomic_write
    with atomic_write(sys.argv[1]) as f:
        f.write(b"half a PNG")
        print("ready", flush=True)
        time.sleep(600)
"""
_SAVE_PNG = "import sys, numpy; from fm_lightning.files import save_png; " + (
    "save_png(numpy.full((4, 4, 3), 255, numpy.uint8), sys.argv[1])"
)


@pytest.mark.slow
def test_next_save_removes_temp_files_of_killed_writers_but_not_live_ones(tmp_path):
    layer = tmp_path / "conv1"
    layer.mkdir()
    # a capture killed mid-write, as SIGKILL during training leaves it
    kill(start_held_writer(_PNG_WRITE_HELD, str(layer / "epoch=000.png")))
    (debris,) = layer.iterdir()
    assert debris.name.startswith(".epoch=000.png.") and debris.name.endswith(".tmp")
    # another process writing into the same directory right now, since before the next run
    live = start_held_writer(_PNG_WRITE_HELD, str(layer / "epoch=001.png"))
    try:
        (in_progress,) = set(layer.iterdir()) - {debris}
        # the next run's first save in that directory
        save = [sys.executable, "-c", _SAVE_PNG, str(layer / "epoch=002.png")]
        subprocess.run(save, cwd=REPO, check=True)
        left = sorted(p.name for p in layer.iterdir())
        assert left == sorted([in_progress.name, "epoch=002.png"])
        with Image.open(layer / "epoch=002.png") as im:
            assert im.getpixel((0, 0)) == (255, 255, 255)
    finally:
        kill(live)


def test_distinct_path_parts_never_give_two_names_one_folder():
    names = ["a b", "a_b", "a/b", "cam", "conv1", "..", "a b"]
    parts = distinct_path_parts(names, reserved=["cam", "stats.json"])
    assert parts == {
        "a b": "a_b",
        "a_b": "a_b~2",
        "a/b": "a_b~3",
        "cam": "cam~2",  # the CAM pictures' folder is not a layer's
        "conv1": "conv1",
        "..": "__",
    }
    assert len(set(parts.values())) == len(parts)
    # a suffixed part is never another name's own: safe_path_part makes no "~"
    assert safe_path_part("a_b~2") == "a_b_2"
