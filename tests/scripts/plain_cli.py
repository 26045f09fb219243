"""A LightningCLI project that has never heard of fm_lightning (the callback arrives by class path).

    python tests/scripts/plain_cli.py fit --trainer.callbacks+=fm_lightning.FeatureMapCallback \
        --trainer.callbacks.layers=[conv1]
"""

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class TinyConvNet(pl.LightningModule):
    def __init__(self, width: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        return self.head(F.relu(self.conv1(x)).mean(dim=(2, 3)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class RandomImages(pl.LightningDataModule):
    def __init__(self, n: int = 32):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.data = TensorDataset(
            torch.rand(n, 3, 16, 16, generator=g), torch.randint(0, 4, (n,), generator=g)
        )

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=8)

    def val_dataloader(self):
        return DataLoader(self.data, batch_size=8)


if __name__ == "__main__":
    LightningCLI(TinyConvNet, RandomImages)
