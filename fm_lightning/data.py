"""MNIST as a LightningDataModule that holds the whole dataset in memory as uint8.

Usage::

    from fm_lightning.data import MNISTDataModule

    dm = MNISTDataModule(data_dir="data", batch_size=128)
    trainer.fit(model, datamodule=dm)  # prepare_data() fetches, setup() loads

    # or by hand, outside a Trainer
    dm.prepare_data()  # makes sure data/MNIST/raw holds the four verified IDX files
    dm.setup("fit")  # dm.train_set (55,000) and dm.val_set (5,000)
    images, labels = next(iter(dm.train_dataloader()))  # (B, 1, 28, 28) uint8, (B,) int64
    x = dm.normalize(images)  # (B, 1, 28, 28) float32, what the model sees

Batches stay uint8 until they reach the device; ``on_after_batch_transfer`` normalises
them there, so the loader moves 4x fewer bytes and does no per-item work at all. Where the
raw files come from and how they are verified is :mod:`fm_lightning.mnist`.
"""

import os
from numbers import Real
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from fm_lightning.mnist import MNIST_MEAN, MNIST_STD, NUM_TRAIN_IMAGES, ensure_mnist, load_mnist

__all__ = ["MNIST_MEAN", "MNIST_STD", "InMemoryDataset", "MNISTDataModule", "load_mnist"]


class InMemoryDataset(Dataset):
    """Images and labels held as tensors, indexed a whole batch at a time.

    torch's DataLoader calls ``__getitems__`` with the batch's indices when it is
    defined, so a batch is two tensor gathers instead of ``batch_size`` Python calls
    and a stack. Pair it with ``identity_collate``.

    Args:
        images: (N, 1, 28, 28) uint8.
        labels: (N,) int64.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices)
        return self.images[index], self.labels[index]  # (B, 1, 28, 28) uint8, (B,) int64


def identity_collate(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns the batch unchanged: ``InMemoryDataset.__getitems__`` already built it.

    Module level so that DataLoader workers can pickle it.
    """
    return batch


def _check(ok: bool, expected: str, got: object) -> None:
    if not ok:
        raise ValueError(f"expected {expected}, got {got!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class MNISTDataModule(pl.LightningDataModule):
    """MNIST with a seeded train/val split, served as uint8 and normalised on device.

    After ``setup``, ``train_set`` / ``val_set`` / ``test_set`` are ``InMemoryDataset``s
    of 60,000 - ``val_size``, ``val_size`` and 10,000 images.

    Args:
        data_dir: Root directory; the raw files live in ``<data_dir>/MNIST/raw``.
        batch_size: Images per batch.
        val_size: Images held out from the official training set for validation.
        num_workers: DataLoader worker processes (0 loads in the main process, which is
            usually fastest here since a batch is just two tensor gathers).
        seed: Seeds the train/val split and the training shuffle.
        mean: Pixel mean subtracted after scaling to [0, 1].
        std: Pixel standard deviation divided by after that.
    """

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 64,
        val_size: int = 5000,
        num_workers: int = 0,
        seed: int = 42,
        mean: float = MNIST_MEAN,
        std: float = MNIST_STD,
    ):
        super().__init__()
        _check(isinstance(data_dir, str | os.PathLike), "data_dir to be a path", data_dir)
        _check(_is_int(batch_size) and batch_size > 0, "batch_size > 0", batch_size)
        _check(
            _is_int(val_size) and 0 < val_size < NUM_TRAIN_IMAGES,
            f"0 < val_size < {NUM_TRAIN_IMAGES}",
            val_size,
        )
        _check(_is_int(num_workers) and num_workers >= 0, "num_workers >= 0", num_workers)
        _check(_is_int(seed), "an integer seed", seed)
        _check(isinstance(mean, Real) and not isinstance(mean, bool), "a float mean", mean)
        _check(isinstance(std, Real) and not isinstance(std, bool) and std > 0, "std > 0", std)
        self.save_hyperparameters()
        self.raw_dir = Path(data_dir) / "MNIST" / "raw"
        self.train_set: InMemoryDataset | None = None
        self.val_set: InMemoryDataset | None = None
        self.test_set: InMemoryDataset | None = None

    def prepare_data(self) -> None:
        """Fetches and verifies the raw files (Lightning runs this on one process only)."""
        ensure_mnist(self.raw_dir)

    def setup(self, stage: str | None = None) -> None:
        """Loads the splits a stage needs, on every process; ``None`` loads all of them.

        Files are MD5-checked while read. Splits already built are kept, so calling
        ``setup`` again reads nothing.
        """
        if stage in ("fit", "validate", None) and self.train_set is None:
            images, labels = load_mnist(self.raw_dir, "train")  # (60000, 1, 28, 28) uint8
            val_size = self.hparams.val_size
            _check(val_size < len(labels), f"val_size < {len(labels)} training images", val_size)
            # A private generator: the split depends on `seed` alone, not on global RNG state.
            generator = torch.Generator().manual_seed(self.hparams.seed)
            perm = torch.randperm(len(labels), generator=generator)
            # sorted: each split keeps the official order, which makes them easy to inspect
            val_idx, train_idx = perm[:val_size].sort().values, perm[val_size:].sort().values
            self.train_set = InMemoryDataset(images[train_idx], labels[train_idx])
            self.val_set = InMemoryDataset(images[val_idx], labels[val_idx])
        if stage in ("test", None) and self.test_set is None:
            self.test_set = InMemoryDataset(*load_mnist(self.raw_dir, "test"))

    def _loader(self, dataset: InMemoryDataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() with the matching stage before asking for a loader")
        workers = self.hparams.num_workers
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            generator=torch.Generator().manual_seed(self.hparams.seed) if shuffle else None,
            collate_fn=identity_collate,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches of (B, 1, 28, 28) uint8 images and (B,) labels."""
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in a fixed order."""
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches in a fixed order."""
        return self._loader(self.test_set, shuffle=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Maps uint8 pixels to the float32 inputs the model is trained on.

        Args:
            x: uint8 images of any shape, e.g. (B, 1, 28, 28), on any device.

        Returns:
            ``(x / 255 - mean) / std`` as float32, same shape and device.

        Raises:
            TypeError: If ``x`` is not uint8 (normalising twice would go unnoticed).
        """
        if x.dtype != torch.uint8:
            raise TypeError(f"expected a uint8 tensor, got {x.dtype}")
        return x.float().div_(255).sub_(self.hparams.mean).div_(self.hparams.std)

    def on_after_batch_transfer(
        self, batch: tuple[torch.Tensor, torch.Tensor], dataloader_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalises a batch once it is on the device, where the float work is cheap."""
        images, labels = batch
        x = self.normalize(images)  # float32
        if self.trainer is not None:
            # Lightning casts inputs for "bf16-true"/"16-true" before the transfer, when these
            # are still uint8 and so left alone; cast the floats made here instead.
            x = self.trainer.precision_plugin.convert_input(x)
        return x, labels
