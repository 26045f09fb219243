"""fm-lightning: see what a CNN's layers see while it trains (PyTorch Lightning)."""

from fm_lightning.callbacks import FeatureMapCallback
from fm_lightning.data import MNISTDataModule
from fm_lightning.models import ImageClassifier, SimpleCNN

__all__ = ["FeatureMapCallback", "ImageClassifier", "MNISTDataModule", "SimpleCNN"]
__version__ = "0.1.0"
