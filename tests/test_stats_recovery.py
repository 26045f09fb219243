"""A damaged stats.json in the callback's directory is moved aside; the gallery keeps updating."""

from __future__ import annotations

import json
import warnings
from urllib.parse import quote

import pytest
from conftest import random_loader, tiny_trainer

from fm_lightning import FeatureMapCallback, ImageClassifier, SimpleCNN


@pytest.mark.parametrize(
    "content",
    [
        "{trunc",  # not JSON: a disk that filled up under another tool
        '{"format": 1, "history": []}',  # no "layers"
        '{"format": 1, "layers": ["conv1"], "history": [{"epoch": 0, "stats": [1]}]}',
    ],
    ids=["json", "missing-key", "wrong-type"],
)
def test_damaged_stats_json_is_moved_aside_and_the_gallery_keeps_updating(content, tmp_path):
    maps = tmp_path / "maps"
    maps.mkdir()
    (maps / "stats.json").write_text(content)
    cb = FeatureMapCallback(layers=["conv1"], save_dir=str(maps))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = tiny_trainer(tmp_path, [cb], max_epochs=2)
        trainer.fit(ImageClassifier(SimpleCNN()), random_loader(), random_loader(seed=1))
    messages = [str(w.message) for w in caught if "stats.json" in str(w.message)]
    (aside,) = maps.glob("stats.json.corrupt-*")
    assert aside.read_text() == content  # kept for the user to look at
    assert len(messages) == 1, messages
    assert str(maps / "stats.json") in messages[0] and f"Moved it to {aside}" in messages[0]
    assert not any("files failed" in str(w.message) for w in caught)
    # a fresh history with both epochs, and a page that shows the last one
    stats = json.loads((maps / "stats.json").read_text())
    assert stats["layers"] == ["conv1"]
    assert [h["epoch"] for h in stats["history"]] == [0, 1]
    assert quote("conv1/epoch=001.png") in (maps / "index.html").read_text()
