"""What each of Lightning's loggers receives from FeatureMapCallback, read back from what it wrote.

Real loggers, real Trainers: TensorBoard's event files (through TensorBoard's own reader), MLflow's
local file store (through MlflowClient), Comet's offline archive, and a user-defined logger that
takes no pictures. The captions compared against are the ones the callback handed ``publish``.
"""

from __future__ import annotations

import io
import json
import os
import re
import warnings
import zipfile

import numpy as np
import pytest
from conftest import random_loader, tiny_trainer
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fm_lightning import FeatureMapCallback, ImageClassifier, SimpleCNN, callbacks, publishing


@pytest.fixture
def handed(monkeypatch) -> list[tuple[int, publishing.Picture]]:
    """(step, picture) of every picture the callback hands to publish, on its way to it."""
    record: list[tuple[int, publishing.Picture]] = []

    def recording_publish(loggers, drawn, step, *args, **kwargs):
        record.extend((step, pic) for pic in drawn.pictures)
        return publishing.publish(loggers, drawn, step, *args, **kwargs)

    monkeypatch.setattr(callbacks, "publish", recording_publish)
    return record


def _fit(tmp_path, logger, layers=("conv1",), max_epochs=2):
    cb = FeatureMapCallback(layers=list(layers), num_images=2)
    trainer = tiny_trainer(tmp_path, [cb], logger, max_epochs=max_epochs)
    trainer.fit(ImageClassifier(SimpleCNN()), random_loader(), random_loader(seed=1))
    return trainer, cb


def _not_blank(png: bytes) -> bool:
    with Image.open(io.BytesIO(png)) as im:
        return np.asarray(im.convert("RGB")).std() > 5


def test_tensorboard_images_carry_captions_and_the_loggers_prefix(tmp_path, handed):
    logger = TensorBoardLogger(tmp_path, name="tb", prefix="fm")
    trainer, _ = _fit(tmp_path, logger)
    acc = EventAccumulator(
        trainer.logger.log_dir, size_guidance={"images": 0, "scalars": 0, "tensors": 0}
    )
    acc.Reload()
    # The images are named as the logger names its scalars: "fm" + LOGGER_JOIN_CHAR + the key.
    assert "fm-feature_stats/conv1/mean" in acc.Tags()["scalars"]
    assert {"fm-feature_maps/conv1", "fm-probe_inputs"} <= set(acc.Tags()["images"])
    steps = sorted({step for step, _ in handed})
    assert len(steps) == 2
    captions = {(step, pic.tag): pic.caption for step, pic in handed}
    assert captions[(steps[0], "feature_maps/conv1")].startswith(f"epoch 0, step {steps[0]}, ")
    for tag in ("feature_maps/conv1", "probe_inputs"):
        # under the image, what W&B shows: TensorBoard keeps one description per series (the
        # first step's), and every step's caption is in the Text tab
        assert acc.SummaryMetadata(f"fm-{tag}").summary_description == captions[(steps[0], tag)]
        texts = acc.Tensors(f"fm-{tag}/caption/text_summary")  # add_text appends /text_summary
        assert [t.step for t in texts] == steps
        assert [t.tensor_proto.string_val[0].decode() for t in texts] == [
            captions[(step, tag)] for step in steps
        ]
    events = acc.Images("fm-feature_maps/conv1")
    assert [e.step for e in events] == steps
    assert all(_not_blank(e.encoded_image_string) for e in events)


def test_mlflow_file_store_holds_images_at_their_steps_with_captions(tmp_path, handed, monkeypatch):
    mlflow = pytest.importorskip("mlflow")  # the dev extra installs mlflow-skinny
    from lightning.pytorch.loggers import MLFlowLogger

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for it, or sqlite
    uri = f"file:{tmp_path / 'mlruns'}"
    logger = MLFlowLogger(experiment_name="fm", tracking_uri=uri)
    # SimpleCNN calls `pool` twice: "pool@2" has a character MLflow refuses in an image key
    _fit(tmp_path, logger, layers=("conv1", "pool"))
    client = mlflow.MlflowClient(uri)
    run_id = logger.run_id
    val_steps = [m.step for m in client.get_metric_history(run_id, "val/acc")]
    assert len(val_steps) == 2
    # MlflowClient.log_image(key=, step=) names its files <key with / as ~>+step+<N>+...
    images: dict[str, list[int]] = {}
    for item in client.list_artifacts(run_id, "images"):
        name = os.path.basename(item.path)
        match = re.fullmatch(r"(.+)\+step\+(\d+)\+timestamp\+\d+\+[0-9a-f-]+\.png", name)
        if match:
            images.setdefault(match[1].replace("~", "/"), []).append(int(match[2]))
            local = client.download_artifacts(run_id, item.path, str(tmp_path / "dl"))
            with open(local, "rb") as f:
                assert _not_blank(f.read()), name
    expected = {
        "feature_maps/conv1",
        "feature_maps/pool",
        "feature_maps/pool_2",  # pool@2
        "probe_inputs",
    }
    assert set(images) == expected
    assert all(sorted(steps) == val_steps for steps in images.values()), images
    # the captions, one JSON per step, keyed like the images
    handed_captions = {(step, pic.tag.replace("@", "_")): pic.caption for step, pic in handed}
    for step in val_steps:
        path = client.download_artifacts(run_id, f"captions/step={step}.json", str(tmp_path))
        with open(path) as f:
            captions = json.load(f)
        assert set(captions) == expected
        for key, caption in captions.items():
            assert caption == handed_captions[(step, key)] and caption, key


@pytest.mark.slow  # importing comet_ml takes ~10 s
def test_comet_offline_archive_holds_the_images(tmp_path, handed, monkeypatch):
    pytest.importorskip("comet_ml")  # the dev extra installs comet-ml
    from lightning.pytorch.loggers import CometLogger

    # Comet's own offline mode. CometLogger(online=False) would not do: Lightning 2.6 turns the
    # experiment off altogether then (ExperimentConfig(disabled=True)), so nothing is written.
    monkeypatch.setenv("COMET_START_ONLINE", "false")
    logger = CometLogger(project="fm-test", offline_directory=str(tmp_path / "comet"))
    logged: list[tuple[str, int, dict]] = []  # (name, step, metadata) of every log_image call
    real_log_image = logger.experiment.log_image

    def recording_log_image(image, name=None, step=None, metadata=None, **kwargs):
        logged.append((name, step, metadata))
        return real_log_image(image, name=name, step=step, metadata=metadata, **kwargs)

    logger.experiment.log_image = recording_log_image
    _fit(tmp_path, logger)
    logger.experiment.end()  # writes the offline archive

    assert [(n, s, m["caption"]) for n, s, m in logged] == [
        (pic.tag, step, pic.caption) for step, pic in handed
    ]
    assert {n for n, _, _ in logged} == {"feature_maps/conv1", "probe_inputs"}
    (archive,) = (tmp_path / "comet").glob("*.zip")
    with zipfile.ZipFile(archive) as z:
        files = [z.read(name) for name in z.namelist()]
    pngs = [data for data in files if data.startswith(b"\x89PNG\r\n\x1a\n")]
    assert len(pngs) == len(logged) == 4  # 2 pictures x 2 epochs
    assert all(_not_blank(png) for png in pngs)


class _MetricsOnly(Logger):
    """A user's own logger that takes metrics and nothing else."""

    def __init__(self):
        super().__init__()
        self.metrics: list[dict] = []

    name = "metrics-only"
    version = 0

    def log_metrics(self, metrics, step=None):
        self.metrics.append(dict(metrics))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_a_logger_without_pictures_is_named_once_and_still_gets_the_scalars(tmp_path):
    own, csv = _MetricsOnly(), CSVLogger(tmp_path, name="csv")
    cb = FeatureMapCallback(layers=["conv1"], num_images=2, save_dir=str(tmp_path / "maps"))
    trainer = tiny_trainer(tmp_path, [cb], [own, csv], max_epochs=2)
    model = ImageClassifier(SimpleCNN())
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(model, random_loader(), random_loader(seed=1))
        trainer.validate(model, random_loader(seed=1), verbose=False)
    ours = [str(w.message) for w in record if "receives no pictures" in str(w.message)]
    assert len(ours) == 1, ours  # fit and validate: one warning; CSVLogger: none
    assert ours[0].startswith("FeatureMapCallback: _MetricsOnly receives no pictures")
    assert str(tmp_path / "maps") in ours[0]
    assert sum("feature_stats/conv1/mean" in m for m in own.metrics) >= 2


def test_a_local_run_hands_similarity_and_its_heatmap_to_the_gallery(tmp_path):
    """The contract with the similarity view: LocalRun.similarity reaches stats.json and the
    panel; a picture under similarity/ is the panel's heatmap, with its caption."""
    import torch

    from fm_lightning.gallery import load_stats

    heatmap = torch.full((8, 8, 3), 200, dtype=torch.uint8)
    pictures = [
        publishing.Picture(
            "feature_similarity/layers", "similarity/epoch=001.png", heatmap, "CKA e1"
        )
    ]
    similarity = {"conv1": {"to_previous": 0.9, "to_first": None}}
    drawn = publishing.Drawn(pictures, similarity=similarity)
    local = publishing.LocalRun(str(tmp_path), epoch=1)
    errors = []
    publishing.publish([], drawn, step=10, local=local, on_error=lambda *e: errors.append(e))
    assert errors == []
    entry = load_stats(tmp_path / "stats.json")["history"][0]
    assert entry["similarity"] == similarity and entry["captions"] == {"similarity": "CKA e1"}
    page = (tmp_path / "index.html").read_text()
    manifest = json.loads(re.search(r'id="manifest">(.*?)</script>', page, re.S).group(1))
    assert manifest["layers"] == []
    assert manifest["similarity"]["series"]["to_previous"] == {"conv1": [0.9]}
    assert manifest["similarity"]["caption"] == ["CKA e1"]
