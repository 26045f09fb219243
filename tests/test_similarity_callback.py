"""FeatureMapCallback(similarity=n) in real fits: linear CKA of the chosen layers on the first n
validation inputs, per captured epoch (scalars, a heatmap, the Grams kept in files).

    pytest tests/test_similarity_callback.py
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, random_loader, tiny_trainer
from lightning.pytorch.loggers import CSVLogger
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from fm_lightning import FeatureMapCallback, ImageClassifier, SimpleCNN
from fm_lightning.cka import centered_gram, count_sketch, linear_cka, load_record

N = 24  # inputs compared: the first 24 of the 32 validation inputs


def _fit(tmp_path, cb, model=None, val=None, max_epochs=3, **kwargs):
    model = model if model is not None else ImageClassifier(SimpleCNN())
    logger = CSVLogger(tmp_path, name="csv", version=0)
    kwargs.setdefault("limit_val_batches", 4)  # all 32 validation inputs
    trainer = tiny_trainer(tmp_path, [cb], logger, max_epochs=max_epochs, **kwargs)
    trainer.fit(model, random_loader(), val if val is not None else random_loader(seed=1))
    return trainer, model


def _logged(tmp_path) -> dict[str, dict[int, float]]:
    """{metric: {step: value}} from the CSVLogger's metrics.csv."""
    values: dict[str, dict[int, float]] = {}
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if value not in ("", None) and key != "step":
                    values.setdefault(key, {})[int(row["step"])] = float(value)
    return values


def _outputs(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """What ``layer`` of the model outputs for ``x``, in eval mode, as plain torch hooks see it."""
    seen = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, a, out: seen.append(out))
    model.eval()
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen[0]


def test_every_captured_epoch_keeps_the_grams_draws_the_matrix_and_logs_each_layers_change(
    tmp_path,
):
    cb = FeatureMapCallback(["conv1", "conv2"], similarity=N, save_dir=str(tmp_path / "maps"))
    val = random_loader(seed=1)
    _, model = _fit(tmp_path, cb, val=val)
    root = tmp_path / "maps" / "similarity"
    stems = [f"epoch={e:03d}" for e in range(3)]
    assert sorted(os.listdir(root)) == sorted(f"{s}.{ext}" for s in stems for ext in ("png", "pt"))

    # the kept Grams are the model's own on the first N validation inputs, in dataset order
    # (conv1's 9,216 values per input count-sketched to 4,096, as fm_lightning.cka documents)
    raw = torch.load(root / "epoch=002.pt", weights_only=True)
    assert set(raw) == {"indices", "inputs_sha256", "grams"}
    records = [load_record(root / f"{s}.pt") for s in stems]
    assert records[-1].indices.tolist() == list(range(N))
    x = val.dataset.tensors[0][:N]
    for layer in ("conv1", "conv2"):
        want = centered_gram(count_sketch(_outputs(model, f"net.{layer}", x)))
        assert torch.allclose(records[-1].grams[layer], want, rtol=1e-4, atol=1e-4), layer
    assert len({r.inputs_sha256 for r in records}) == 1  # the same inputs every epoch

    # to_previous / to_first are the CKA of those files, logged at the validation's step
    logged = _logged(tmp_path)
    for layer in ("conv1", "conv2"):
        to_prev = list(logged[f"feature_similarity/{layer}/to_previous"].values())
        to_first = list(logged[f"feature_similarity/{layer}/to_first"].values())
        grams = [r.grams[layer] for r in records]
        assert to_prev == pytest.approx(
            [linear_cka(grams[1], grams[0]), linear_cka(grams[2], grams[1])], abs=1e-6
        )
        assert to_first == pytest.approx([linear_cka(g, grams[0]) for g in grams], abs=1e-6)
        assert to_first[0] == pytest.approx(1.0, abs=1e-6)
        assert all(0 < v <= 1 + 1e-6 for v in to_prev + to_first)

    # the heatmap is drawn, and the gallery holds the values beside it
    heatmap = np.asarray(Image.open(root / "epoch=002.png").convert("RGB"))
    assert heatmap.std() > 5
    stats = json.loads((tmp_path / "maps" / "stats.json").read_text())
    last = stats["history"][-1]["similarity"]
    assert last["conv1"]["to_previous"] == pytest.approx(
        to_prev_conv1 := linear_cka(records[2].grams["conv1"], records[1].grams["conv1"]), abs=1e-6
    )
    assert 0 < to_prev_conv1 <= 1 + 1e-6


def test_a_frozen_layer_has_not_changed_and_a_trained_one_has(tmp_path):
    # Seeded: with 2 SGD steps per epoch, some initialisations leave conv2 within 1e-5 of its
    # previous representation by the second epoch (measured: 0.99999 once in an unseeded run).
    torch.manual_seed(0)
    net = SimpleCNN()
    net.conv1.requires_grad_(False)  # frozen from the start
    model = ImageClassifier(net, optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    cb = FeatureMapCallback(["conv1", "conv2"], similarity=N, save_dir=str(tmp_path / "maps"))
    _fit(tmp_path, cb, model=model)
    logged = _logged(tmp_path)
    frozen = list(logged["feature_similarity/conv1/to_previous"].values())
    trained = list(logged["feature_similarity/conv2/to_previous"].values())
    assert len(frozen) == len(trained) == 2
    assert frozen == pytest.approx([1.0, 1.0], abs=1e-6)
    assert all(v < 1 - 1e-4 for v in trained), trained


class _WithADeadLayer(nn.Module):
    """SimpleCNN-like: ``dead`` outputs zeros whatever the input (a constant representation)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.dead = nn.ReLU()
        self.head = nn.Linear(4, 10)

    def forward(self, x):
        h = self.conv(x)
        return self.head(self.dead(-h.abs() - 1).mean((2, 3)) + h.mean((2, 3)))


def test_a_constant_layer_is_na_never_nan(tmp_path):
    cb = FeatureMapCallback(["conv", "dead"], similarity=N, save_dir=str(tmp_path / "maps"))
    _fit(tmp_path, cb, model=ImageClassifier(_WithADeadLayer()), max_epochs=2)
    logged = _logged(tmp_path)
    assert "feature_similarity/conv/to_previous" in logged
    assert not any(key.startswith("feature_similarity/dead/") for key in logged)
    record = load_record(tmp_path / "maps" / "similarity" / "epoch=001.pt")
    assert torch.count_nonzero(record.grams["dead"]) == 0
    stats = (tmp_path / "maps" / "stats.json").read_text()
    assert "NaN" not in stats
    last = json.loads(stats)["history"][-1]["similarity"]
    assert last["dead"] == {"to_previous": None, "to_first": None}


def test_too_few_or_shuffled_validation_inputs_warn_once_and_training_goes_on(tmp_path):
    cb = FeatureMapCallback(["conv1"], similarity=64, save_dir=str(tmp_path / "few"))
    with pytest.warns(UserWarning, match="expected all 64 inputs") as record:
        trainer, _ = _fit(tmp_path / "a", cb)
    assert trainer.current_epoch == 3  # every epoch ran
    assert sum("expected all 64 inputs" in str(w.message) for w in record) == 1
    assert not (tmp_path / "few" / "similarity").exists()

    data = random_loader(seed=1).dataset
    shuffled = DataLoader(data, batch_size=8, shuffle=True)
    cb = FeatureMapCallback(["conv1"], similarity=N, save_dir=str(tmp_path / "shuffled"))
    with pytest.warns(UserWarning, match="fixed order") as record:
        _fit(tmp_path / "b", cb, val=shuffled)
    assert sum("fixed order" in str(w.message) for w in record) == 1
    assert not (tmp_path / "shuffled" / "similarity").exists()


@pytest.mark.parametrize("value", [-1, 1, True, False, 0.0, None, 2.0, "512"])
def test_similarity_must_be_0_or_at_least_2_inputs(value):
    with pytest.raises(ValueError, match="expected `similarity`"):
        FeatureMapCallback(["conv1"], similarity=value)


@pytest.mark.slow
def test_ddp_two_processes_keep_the_grams_one_process_keeps(tmp_path):
    """The n inputs sit on both ranks (DistributedSampler's strided shards); rank zero's Grams
    equal one process's on the same weights and data (trainer.validate: no training step)."""
    script = REPO / "tests" / "scripts" / "similarity_validate.py"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)}
    for devices in (1, 2):
        proc = subprocess.run(
            [sys.executable, str(script), str(tmp_path / f"d{devices}"), "--devices", str(devices)],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    one = load_record(tmp_path / "d1" / "similarity" / "epoch=000.pt")
    two = load_record(tmp_path / "d2" / "similarity" / "epoch=000.pt")
    assert one.inputs_sha256 == two.inputs_sha256
    for layer, gram in one.grams.items():
        assert torch.allclose(two.grams[layer], gram, atol=1e-5), layer
