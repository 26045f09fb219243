"""FeatureMapCallback dropped into models as people write them today, with real Trainers.

Compiled nets, keyword-argument forwards with dict batches, training-only branches, layers built in
configure_model(), forwards that edit their input, resumes with other layers, several validations
per epoch, no validation at all, non-image inputs.
"""

from __future__ import annotations

import glob
import os
import warnings
from dataclasses import dataclass

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import random_loader, tiny_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fm_lightning import FeatureMapCallback, ImageClassifier, SimpleCNN, rendering
from fm_lightning.capture import capture, resolve_layers


def _fit(tmp_path, cb, model, train=None, val=None, **kwargs):
    trainer = tiny_trainer(tmp_path, [cb, *kwargs.pop("extra_callbacks", [])], **kwargs)
    trainer.fit(model, train or random_loader(), val or random_loader(seed=1))
    return trainer


def _frames(cb, layer) -> list[str]:
    return sorted(glob.glob(os.path.join(cb.local_dir, layer, "epoch=*.png")))


def _messages(record) -> list[str]:
    return [str(w.message) for w in record]


class CompiledClassifier(ImageClassifier):
    def __init__(self):
        super().__init__(torch.compile(SimpleCNN(), backend="eager"))


def test_compiled_net_with_a_ragged_last_batch_is_drawn_under_its_own_names(tmp_path):
    import torch._dynamo.utils as dynamo_utils

    def graphs_of_a_fit(callbacks) -> int:
        torch._dynamo.reset()
        dynamo_utils.counters.clear()
        torch.manual_seed(0)
        trainer = tiny_trainer(tmp_path, callbacks, max_epochs=2)
        # 13 validation images in batches of 8: the last batch has 5 rows, as does the probe.
        trainer.fit(CompiledClassifier(), random_loader(), random_loader(n=13, seed=1))
        return dynamo_utils.counters["stats"]["unique_graphs"]

    cb = FeatureMapCallback(layers=["conv1", "net.conv2"], num_images=13)
    with_callback = graphs_of_a_fit([cb])
    assert [len(_frames(cb, layer)) for layer in ("conv1", "net.conv2")] == [2, 2]
    assert not glob.glob(os.path.join(cb.local_dir, "*_orig_mod*"))
    grid = np.asarray(Image.open(_frames(cb, "conv1")[-1]))
    assert grid.shape[0] > 13 * 16  # 13 rows of maps: the probe, not a compiled batch's worth
    assert with_callback == graphs_of_a_fit([])  # the probe pass compiled nothing
    # Examples need hooks during validation: captured validations of a compiled net run eagerly.
    with_examples = FeatureMapCallback(layers=["conv1"], examples=2, save_dir=str(tmp_path / "x"))
    graphs_of_a_fit([with_examples])
    assert len(glob.glob(str(tmp_path / "x" / "conv1" / "examples" / "epoch=*.png"))) == 2


@dataclass
class Output:  # the shape of a HuggingFace ModelOutput: named tensor fields
    logits: torch.Tensor
    hidden: torch.Tensor


class KeywordNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4, 10)

    def forward(self, pixel_values, attention_mask=None):
        h = F.relu(self.conv(pixel_values))  # (N, 4, 28, 28)
        return Output(logits=self.head(h.mean((2, 3))), hidden=h)


class DictBatches(Dataset):
    def __init__(self, n=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 1, 28, 28, generator=g)
        self.y = torch.randint(0, 10, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


class KeywordModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = KeywordNet()

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.model(**_inputs(batch)).logits, batch["labels"])

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", F.cross_entropy(self(batch["pixel_values"]).logits, batch["labels"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _inputs(batch):
    return {"pixel_values": batch["pixel_values"]}


def test_keyword_forward_with_dict_batches_and_dataclass_outputs(tmp_path):
    cb = FeatureMapCallback(layers=["model", "conv"], input_fn=_inputs, strict=True)
    trainer = _fit(
        tmp_path,
        cb,
        KeywordModule(),
        DataLoader(DictBatches(), batch_size=8),
        DataLoader(DictBatches(seed=1), batch_size=8),
    )
    assert set(cb.probe) == {"pixel_values"} and cb.probe["pixel_values"].shape == (4, 1, 28, 28)
    assert len(_frames(cb, "conv")) == 2 and len(_frames(cb, "model")) == 2
    assert os.path.exists(os.path.join(cb.local_dir, "probe_inputs.png"))
    ckpt = tmp_path / "k.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)["callbacks"][cb.state_key]
    assert torch.equal(state["probe"]["pixel_values"], cb.probe["pixel_values"].cpu())


class WithAuxHead(ImageClassifier):
    """A training-only auxiliary head, like GoogLeNet's."""

    def __init__(self):
        super().__init__(SimpleCNN())
        self.aux = nn.Linear(10, 10)

    def forward(self, x):
        logits = self.net(x)
        return logits + self.aux(logits) if self.training else logits


def test_a_layer_that_never_runs_in_the_probe_pass_is_named_in_a_warning(tmp_path):
    cb = FeatureMapCallback(layers=["conv1", "aux"])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _fit(tmp_path, cb, WithAuxHead())
    not_run = [m for m in _messages(record) if "'aux' did not run in the probe pass" in m]
    assert len(not_run) == 1 and "training-only branch" in not_run[0]
    assert len(_frames(cb, "conv1")) == 2


class BuiltLate(ImageClassifier):
    def __init__(self):
        super().__init__(nn.Identity())

    def configure_model(self):
        if isinstance(self.net, nn.Identity):
            self.net = SimpleCNN()


def test_layers_built_in_configure_model_resolve(tmp_path):
    cb = FeatureMapCallback(layers=["conv2"])
    _fit(tmp_path, cb, BuiltLate())
    assert len(_frames(cb, "conv2")) == 2


def test_a_typo_still_fails_before_the_first_training_step(tmp_path):
    model = ImageClassifier(SimpleCNN())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="'conv9' matches nothing"):
        _fit(tmp_path, FeatureMapCallback(layers=["conv9"]), model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


class InPlaceInput(ImageClassifier):
    def forward(self, x):
        x.mul_(0.5).add_(1.0)  # edits its input, as some preprocessing does
        return self.net(x)


def test_probe_stays_bit_identical_across_captures_and_in_the_checkpoint(tmp_path):
    cb = FeatureMapCallback(layers=["conv1"])
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    first = []

    class Record(pl.Callback):
        def on_validation_end(self, trainer, pl_module):
            if cb.probe is not None:
                first.append(cb.probe.clone())

    model = InPlaceInput(SimpleCNN())
    _fit(
        tmp_path,
        cb,
        model,
        max_epochs=3,
        extra_callbacks=[ckpt, Record()],
        enable_checkpointing=True,
    )
    # the sanity check's validation, then one per epoch
    assert len(first) == 4 and all(torch.equal(p, first[0]) for p in first)
    assert len(_frames(cb, "conv1")) == 3
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["callbacks"]
    assert torch.equal(state[cb.state_key]["probe"], first[0])


def test_resume_with_another_layer_keeps_the_probe(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    first = FeatureMapCallback(layers=["conv1"], save_dir=str(tmp_path / "a"))
    model = ImageClassifier(SimpleCNN())
    _fit(tmp_path, first, model, max_epochs=1, extra_callbacks=[ckpt], enable_checkpointing=True)
    second = FeatureMapCallback(layers=["conv1", "conv2"], save_dir=str(tmp_path / "b"))
    trainer = tiny_trainer(tmp_path, [second], max_epochs=2)
    # Different validation data: a new probe would differ from the stored one.
    trainer.fit(
        ImageClassifier(SimpleCNN()),
        random_loader(),
        random_loader(seed=7),
        ckpt_path=tmp_path / "ckpt" / "last.ckpt",
    )
    assert torch.equal(second.probe, first.probe)
    assert len(_frames(second, "conv2")) == 1


def test_with_two_validations_per_epoch_the_frame_shows_the_end_of_the_epoch(tmp_path):
    cb = FeatureMapCallback(layers=["conv2"])
    model = ImageClassifier(SimpleCNN())
    _fit(tmp_path, cb, model, max_epochs=1, limit_train_batches=4, val_check_interval=0.5)
    (frame,) = _frames(cb, "conv2")
    # Fit ends right after the epoch's last validation: its weights are the ones to draw.
    captured, _ = capture(model, cb.probe, resolve_layers(model, ["conv2"]))
    expected = rendering.feature_picture(captured["conv2"].act, channels=captured["conv2"].channels)
    assert np.array_equal(np.asarray(Image.open(frame)), expected.numpy())


class NoValidation(ImageClassifier):
    validation_step = pl.LightningModule.validation_step


def test_fit_without_any_validation_warns_once_at_the_start(tmp_path):
    cb = FeatureMapCallback(layers=["conv1"])
    trainer = tiny_trainer(tmp_path, [cb], max_epochs=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(ImageClassifier(SimpleCNN()), random_loader())
    assert sum("no validation loop" in m for m in _messages(record)) == 1


class AutoEncoder(pl.LightningModule):
    """Flattened pixels in, pixels out: no image-shaped input anywhere."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(784, 32)
        self.decoder = nn.Linear(32, 784)

    def forward(self, x):
        return self.decoder(F.relu(self.encoder(x)))

    def training_step(self, batch, batch_idx):
        return F.mse_loss(self(batch[0]), batch[0])

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", F.mse_loss(self(batch[0]), batch[0]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_non_image_inputs_are_no_failure_even_when_strict(tmp_path):
    cb = FeatureMapCallback(layers=["encoder", "decoder"], strict=True)
    flat = random_loader(shape=(784,))
    _fit(tmp_path, cb, AutoEncoder(), flat, random_loader(shape=(784,), seed=1))
    assert len(_frames(cb, "encoder")) == 2 and len(_frames(cb, "decoder")) == 2
    assert not os.path.exists(os.path.join(cb.local_dir, "probe_inputs.png"))


class DotNamed(ImageClassifier):
    def __init__(self):
        super().__init__(SimpleCNN())
        setattr(self.net, "..", nn.Identity())  # PyTorch accepts this name this way

    def forward(self, x):
        return getattr(self.net, "..")(self.net(x))


def test_module_names_never_lead_files_out_of_save_dir(tmp_path):
    save_dir = tmp_path / "maps"
    cb = FeatureMapCallback(layers=[".."], save_dir=str(save_dir))  # relative to net: ".."
    _fit(tmp_path, cb, DotNamed())
    pngs = glob.glob(str(tmp_path / "**" / "*.png"), recursive=True)
    assert pngs and all(p.startswith(str(save_dir) + os.sep) for p in pngs)
    assert len(_frames(cb, "__")) == 2
