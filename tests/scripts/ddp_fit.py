"""Fit SimpleCNN on random data with Lightning DDP on CPU (2 processes) and FeatureMapCallback.

    python tests/scripts/ddp_fit.py OUT_DIR                      # maps of conv1 and conv2
    python tests/scripts/ddp_fit.py OUT_DIR --fail-on-rank 1     # that rank cannot read batches
    python tests/scripts/ddp_fit.py OUT_DIR --cam GradCAM        # class-activation maps of conv2

Every rank prints one line, ``rank=R probe_sum=S layout_passes=N`` (with --cam also
``cam_passes=N`` and ``targets=T,T,...``), so a test can check what each rank drew with and that
every rank measured the layers' layouts (the same forward passes on every rank).
"""

import argparse
import os

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
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--fail-on-rank", type=int, default=None)
    parser.add_argument("--cam", default=None, help="a torchcam method, drawn at conv2")
    parser.add_argument("--examples", type=int, default=0, help="top examples per channel")
    args = parser.parse_args()

    def pick_input(batch):
        # Lightning's DDP launcher sets LOCAL_RANK for every process it starts.
        if int(os.environ.get("LOCAL_RANK", 0)) == args.fail_on_rank:
            raise KeyError("this rank cannot find the input")
        return batch[0]

    cb = FeatureMapCallback(
        layers=["conv1", "conv2"],
        num_images=4,
        save_dir=f"{args.out}/maps",
        input_fn=pick_input,
        cam=args.cam,
        cam_layer="conv2" if args.cam else None,
        examples=args.examples,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=2,
        logger=TensorBoardLogger(args.out, name="tb", version=0),
        callbacks=[cb],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    model = ImageClassifier(SimpleCNN())
    # Forward passes of the probe's 4 rows with gradients on in eval mode: CAM's (the layout
    # measurement, once per fit on every rank, runs 4 copies of one probe row).
    cam_passes, layout_passes = [], []

    def count_passes(module, args):
        x = args[0]
        if torch.is_grad_enabled() and not module.training and len(x) == 4:
            (layout_passes if bool((x == x[:1]).all()) else cam_passes).append(1)

    model.register_forward_pre_hook(count_passes)
    trainer.fit(model, loader(0), loader(1))
    # Every rank prints what it drew with, so the test can check all ranks agree on the probe.
    probe_sum = "none" if cb.probe is None else f"{cb.probe.sum().item():.6f}"
    line = f"rank={trainer.global_rank} probe_sum={probe_sum} layout_passes={len(layout_passes)}"
    if args.cam:
        targets = ",".join(str(t) for t in cb.probe_targets.tolist())
        line += f" cam_passes={len(cam_passes)} targets={targets}"
    print(line, flush=True)
    # Lightning leaves the process group up; destroyed here, its gloo threads cannot abort the
    # exit of a finished run ("terminate called without an active exception").
    torch.distributed.destroy_process_group()
