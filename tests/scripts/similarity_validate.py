"""One `trainer.validate` of a seeded SimpleCNN with FeatureMapCallback(similarity=24), on 1 or 2
CPU processes (Lightning DDP), writing OUT_DIR/similarity/epoch=000.pt.

    python tests/scripts/similarity_validate.py OUT_DIR --devices 2

Under DDP, Lightning's DistributedSampler gives rank r the inputs r, r + 2, ...: the first 24
inputs sit on both ranks, and rank zero's file must equal one process's.
"""

import argparse

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from fm_lightning import FeatureMapCallback, ImageClassifier, SimpleCNN

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--devices", type=int, default=1)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(40, 1, 28, 28, generator=g), torch.randint(0, 10, (40,)))
    torch.manual_seed(0)  # the same weights in every process and run
    model = ImageClassifier(SimpleCNN())
    cb = FeatureMapCallback(["conv1", "conv2", "fc1"], similarity=24, save_dir=args.out)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        logger=False,
        callbacks=[cb],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.validate(model, DataLoader(data, batch_size=8))
