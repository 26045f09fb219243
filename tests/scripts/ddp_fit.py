"""Fit SimpleCNN on random data with Lightning DDP on CPU (2 processes) and FeatureMapCallback.

python tests/scripts/ddp_fit.py OUT_DIR
"""

import os
import sys

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from fm_lightning import FeatureMapCallback, ImageClassifier, SimpleCNN


def loader(seed):
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(
        torch.randn(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g)
    )
    return DataLoader(data, batch_size=8)


if __name__ == "__main__":
    out = sys.argv[1]
    fail_rank = int(sys.argv[3]) if sys.argv[2:3] == ["--fail-on-rank"] else None

    def pick_input(batch):
        # Lightning's DDP launcher sets LOCAL_RANK for every process it starts.
        if int(os.environ.get("LOCAL_RANK", 0)) == fail_rank:
            raise KeyError("this rank cannot find the input")
        return batch[0]

    cb = FeatureMapCallback(
        layers=["conv1", "conv2"], num_images=4, save_dir=f"{out}/maps", input_fn=pick_input
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=2,
        logger=TensorBoardLogger(out, name="tb", version=0),
        callbacks=[cb],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(ImageClassifier(SimpleCNN()), loader(0), loader(1))
    # Every rank prints what it drew with, so the test can check all ranks agree on the probe.
    probe_sum = "none" if cb.probe is None else f"{cb.probe.sum().item():.6f}"
    print(f"rank={trainer.global_rank} probe_sum={probe_sum}", flush=True)
    # Lightning leaves the process group up; destroyed here, its gloo threads cannot abort the
    # exit of a finished run ("terminate called without an active exception").
    torch.distributed.destroy_process_group()
