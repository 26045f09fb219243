"""The figures behind the README's timm pictures (a ViT's tokens, a channels-last ConvNeXt block).

    python benchmarks/timm_reading.py --out docs/images  # vit_tokens.png, convnext_block.png

Puts FeatureMapCallback into a real Trainer, as a user of a timm project would, and runs
``trainer.validate`` (random weights, pretrained=False: no training step) on the first four MNIST
test digits, upsampled to 224 x 224 and repeated to 3 channels: timm ``vit_tiny_patch16_224``'s
``blocks.0``, and ``convnext_atto``'s ``stages.0.blocks.0.mlp.fc1`` built with ``conv_mlp=False``
(channels-last). Printed per model: the layer's output shape (a forward hook), the caption the
callback gave the picture (with its measured reading of the layer) and where the picture went.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import timm
import torch
import torch.nn.functional as F
from common import DEFAULT_DATA_DIR, quiet_lightning
from torch.utils.data import DataLoader, TensorDataset

from fm_lightning import FeatureMapCallback, ImageClassifier, MNISTDataModule

MODELS = {  # README picture: (timm model, its arguments, layer)
    "vit_tokens.png": ("vit_tiny_patch16_224", {}, "blocks.0"),
    # conv_mlp=False: the block's MLP as Linear layers on (N, H, W, C), as in the original
    # ConvNeXt (convnext_atto's default, conv_mlp=True, runs it as 1x1 convs on NCHW)
    "convnext_block.png": ("convnext_atto", {"conv_mlp": False}, "stages.0.blocks.0.mlp.fc1"),
}
IMAGES, SIZE = 4, 224
MAX_CHANNELS = 8  # columns: keeps the README picture small

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--out", default="logs/timm_reading", help="where the two PNGs are copied")
parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="holds MNIST/raw")
args = parser.parse_args()
quiet_lightning()

dm = MNISTDataModule(args.data_dir)
dm.setup()
x = dm.normalize(dm.test_set.images[:IMAGES])  # (4, 1, 28, 28)
x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear").repeat(1, 3, 1, 1)  # (4, 3, 224, 224)
loader = DataLoader(TensorDataset(x, dm.test_set.labels[:IMAGES]), batch_size=IMAGES)
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
for picture, (name, kwargs, layer) in MODELS.items():
    torch.manual_seed(0)
    net = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    model = ImageClassifier(net)
    shapes = []
    hook = model.get_submodule(f"net.{layer}").register_forward_hook(
        lambda m, a, output, seen=shapes: seen.append(tuple(output.shape))
    )
    with tempfile.TemporaryDirectory() as tmp:
        cb = FeatureMapCallback(
            layers=f"net.{layer}", num_images=IMAGES, max_channels=MAX_CHANNELS, save_dir=tmp
        )
        trainer = pl.Trainer(
            default_root_dir=tmp,
            logger=False,
            callbacks=[cb],
            accelerator="cpu",
            devices=1,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.validate(model, loader, verbose=False)
        hook.remove()
        (drawn,) = Path(tmp).glob("*/epoch=*.png")
        shutil.copyfile(drawn, out / picture)
        (captured,) = json.loads((Path(tmp) / "stats.json").read_text())["history"]
    print(f"{name} {kwargs or ''} {layer}: output {shapes[0]}")
    print(f"  the callback's caption: {captured['captions'][f'net.{layer}']}")
    print(f"  drawn: {out / picture}")
