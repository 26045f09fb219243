"""The figures behind the README's reading of the default run's similarity panel and of two runs
compared.

    python benchmarks/similarity_reading.py logs/mnist/version_0 logs/mnist/version_1

RUN_A and RUN_B are two default runs (``python train.py``, the second with another
``--seed_everything``). Printed: each run's ``to_previous`` per layer and epoch (from its
``similarity/epoch=NNN.pt`` files, as the callback computes it) and how many times ``conv2``'s
change (1 - CKA) is ``conv1``'s; the layer x layer CKA between the runs at their last epoch; and,
for scale, the same between two untrained SimpleCNNs (seeds 42 and 7) on the same 512 validation
inputs (checked to be the runs' own by their sha256).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fm_lightning import MNISTDataModule, SimpleCNN
from fm_lightning.cka import SimilarityRecorder, cka_matrix, linear_cka, load_record

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("runs", nargs=2, help="two default runs' directories")
parser.add_argument("--data-dir", default="data")
args = parser.parse_args()

records = {}
for run in args.runs:
    files = sorted((Path(run) / "feature_maps" / "similarity").glob("epoch=*.pt"))
    records[run] = [load_record(f) for f in files]
    layers = list(records[run][0].grams)
    print(f"{run}: to_previous per epoch (1 - CKA in brackets)")
    change = {}
    for layer in layers:
        grams = [r.grams[layer] for r in records[run]]
        values = [linear_cka(b, a) for a, b in zip(grams, grams[1:], strict=False)]
        change[layer] = [1 - v for v in values]
        print(f"  {layer}: " + ", ".join(f"{v:.5f} ({1 - v:.5f})" for v in values))
    if {"conv1", "conv2"} <= set(change):
        ratios = [b / a for a, b in zip(change["conv1"], change["conv2"], strict=True)]
        print("  conv2's change / conv1's: " + ", ".join(f"{r:.1f}" for r in ratios))

a, b = (records[run][-1] for run in args.runs)
assert a.inputs_sha256 == b.inputs_sha256, "the runs compared different inputs"
values, _ = cka_matrix(a.grams, b.grams)
print(
    f"last epoch, A (rows) x B (columns): {[[round(v, 3) for v in row] for row in values.tolist()]}"
)

# Untrained networks on the same inputs: the first 512 validation inputs, normalised as in
# training, whose hash must equal the runs'.
dm = MNISTDataModule(args.data_dir, batch_size=64)
dm.prepare_data()
dm.setup("fit")
x = torch.cat([dm.normalize(batch[0]) for batch in dm.val_dataloader()])[: len(a.indices)]
grams = {}
for seed in (42, 7):
    torch.manual_seed(seed)
    net = SimpleCNN().eval()
    outputs = {}
    hooks = [
        getattr(net, name).register_forward_hook(
            lambda m, args, out, name=name, outputs=outputs: outputs.__setitem__(name, out)
        )
        for name in ("conv1", "conv2")
    ]
    with torch.no_grad():
        net(x)
    for hook in hooks:
        hook.remove()
    recorder = SimilarityRecorder(len(x), {k: v[0].numel() for k, v in outputs.items()})
    indices = torch.arange(len(x))
    recorder.observe_inputs(indices, x)
    for name, out in outputs.items():
        recorder.observe(name, indices, out)
    record = recorder.record()
    assert record.inputs_sha256 == a.inputs_sha256, "not the runs' inputs"
    grams[seed] = record.grams
values, _ = cka_matrix(grams[42], grams[7])
rounded = [[round(v, 3) for v in row] for row in values.tolist()]
print(f"untrained, seeds 42 (rows) x 7 (columns): {rounded}")
