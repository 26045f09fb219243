"""The worked example's network and a LightningModule that trains any image classifier.

from fm_lightning import ImageClassifier, SimpleCNN
model = ImageClassifier(SimpleCNN())          # or ImageClassifier(torchvision.models.resnet18())
lightning.Trainer(max_epochs=3).fit(model, datamodule=MNISTDataModule())
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics.classification import MulticlassAccuracy


class SimpleCNN(nn.Module):
    """The seed tutorial's LeNet-style CNN for 1x28x28 inputs.

    Submodule names (``conv1``, ``pool``, ``conv2``, ``fc1``, ``fc2``, ``fc3``) are what you pass to
    ``FeatureMapCallback(layers=...)``, so they are kept exactly as in the tutorial. The
    convolutions' ReLUs are modules too (``relu1``, ``relu2``; they have no weights, so checkpoints
    load either way): ``conv2`` is the layer before its ReLU, ``relu2`` after it, the layer a
    class-activation map needs (GradCAM's own ReLU blanks a map taken before the model's).

    Example:
        >>> SimpleCNN()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=5)  # 28 -> 24
        self.pool = nn.MaxPool2d(2)  # halves H and W; shared by both convs
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 32, kernel_size=5)  # 12 -> 8
        self.relu2 = nn.ReLU()
        self.fc1 = nn.Linear(32 * 4 * 4, 120)  # 512 -> 120
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu1(self.conv1(x)))  # (N, 16, 12, 12)
        x = self.pool(self.relu2(self.conv2(x)))  # (N, 32, 4, 4)
        x = torch.flatten(x, 1)  # (N, 512)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)  # (N, num_classes) logits


def _adam(params) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-3)


class ImageClassifier(pl.LightningModule):
    """Cross-entropy training of any ``nn.Module`` that maps images to class logits.

    Args:
        net: the classifier (an object, or a ``class_path`` from the CLI).
        num_classes: number of classes, for the accuracy metrics.
        optimizer: a callable ``params -> Optimizer`` (the CLI fills it from ``--optimizer``).
        lr_scheduler: optional callable ``optimizer -> LRScheduler``, stepped every epoch.

    Logs ``train/loss``, ``val/loss``, ``val/acc`` and ``test/acc``.

    Example:
        >>> model = ImageClassifier(SimpleCNN())
        >>> model(torch.zeros(1, 1, 28, 28)).shape
        torch.Size([1, 10])
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int = 10,
        optimizer: OptimizerCallable = _adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        # The net's weights live in the checkpoint's state_dict; its constructor arguments are
        # recorded by the CLI. Pickling the module object into hparams would duplicate it.
        self.save_hyperparameters(ignore=["net", "optimizer", "lr_scheduler"])
        self.net = net
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        # self.log costs ~0.5 ms a call on a CPU (benchmarks/train_speed.py), ~7% of a SimpleCNN
        # step. Loggers only write every log_every_n_steps, so log just on the steps they write
        # (the same test as Lightning's: the step about to be taken is a multiple of n, or the
        # last one before an early stop).
        every = self.trainer.log_every_n_steps  # 0 turns logging off
        if every and ((self.global_step + 1) % every == 0 or self.trainer.should_stop):
            self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), prog_bar=True, sync_dist=True)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test/acc", self.test_acc)

    def configure_optimizers(self):
        optimizer = self.optimizer(self.parameters())
        if self.lr_scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler(optimizer)}
