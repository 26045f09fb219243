"""Validate SimpleCNN with a SimilarityRecorder on 1 or 2 CPU processes (Lightning DDP).

    python tests/scripts/ddp_similarity.py OUT.pt --devices 2

61 random inputs (a DistributedSampler pads the odd one out with input 0, so rank 1 sees it too),
batches of 8, the first n = 50 observed at conv1 (sketched) and conv2. Each rank's state goes
through Lightning's all_gather, every rank merges, and rank 0 saves the record to OUT.pt. Each
rank prints ``rank=R saw=K``: how many of the n it observed itself.
"""

import argparse

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from fm_lightning import ImageClassifier, SimpleCNN
from fm_lightning.cka import SimilarityRecorder, save_record

N_INPUTS, N = 61, 50
FEATURES = {"conv1": 16 * 24 * 24, "conv2": 32 * 8 * 8}


class Observed(ImageClassifier):
    def on_validation_epoch_start(self) -> None:
        self.recorder = SimilarityRecorder(N, FEATURES, device=self.device)
        self.hooks = [
            getattr(self.net, name).register_forward_hook(
                lambda _m, _i, out, name=name: self.recorder.observe(name, self.indices, out)
            )
            for name in FEATURES
        ]

    def validation_step(self, batch, batch_idx):
        x, y, self.indices = batch
        self.recorder.observe_inputs(self.indices, x)
        super().validation_step((x, y), batch_idx)

    def on_validation_epoch_end(self) -> None:
        for hook in self.hooks:
            hook.remove()
        print(f"rank={self.global_rank} saw={self.recorder.seen['conv1']}", flush=True)
        self.recorder.merge(self.all_gather(self.recorder.state()))
        if self.global_rank == 0:
            save_record(self.recorder.record(), args.out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--devices", type=int, default=1)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(N_INPUTS, 1, 28, 28, generator=g),
        torch.randint(0, 10, (N_INPUTS,), generator=g),
        torch.arange(N_INPUTS),  # each input's dataset index
    )
    torch.manual_seed(0)
    model = Observed(SimpleCNN())
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.validate(model, DataLoader(data, batch_size=8), verbose=False)
