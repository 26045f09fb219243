"""The README's vendoring list is complete: exactly the files it names run the callback elsewhere.

The list is read from the README itself, so a module added to the callback without a line there
fails here, in a fresh interpreter that can only see the copied files.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest
from conftest import REPO

# A tiny real fit in a project that has only the vendored fm_lightning/ folder: maps, top-k
# examples, CAM and the gallery, so modules imported lazily are needed too.
_FIT = """
import sys
import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from fm_lightning.callbacks import FeatureMapCallback

class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.head = nn.Linear(4, 3)
    def forward(self, x):
        return self.head(self.conv(x).relu().mean((2, 3)))
    def training_step(self, batch, i):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])
    def validation_step(self, batch, i):
        pass
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

g = torch.Generator().manual_seed(0)
data = DataLoader(TensorDataset(torch.randn(16, 1, 12, 12, generator=g),
                                torch.randint(0, 3, (16,), generator=g)), batch_size=8)
maps = FeatureMapCallback(layers=["conv"], num_images=2, examples=2, cam="GradCAM",
                          save_dir="maps", strict=True)
pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
           enable_model_summary=False, callbacks=[maps]).fit(Net(), data, data)
print("\\n".join(m.__file__ for n, m in sys.modules.items() if n.startswith("fm_lightning.")))
"""


def vendoring_list() -> list[str]:
    """The files the README says to copy: the backquoted names of its "To vendor it" sentence."""
    readme = (REPO / "README.md").read_text()
    sentence = re.search(r"To vendor it instead, copy(.*?)into\s+a\s+folder\s+named", readme, re.S)
    assert sentence, "README: the sentence 'To vendor it instead, copy ... into a folder' is gone"
    return re.findall(r"`([\w./]+)`", sentence[1])


@pytest.mark.slow
def test_readme_vendoring_list_is_complete(tmp_path):
    listed = vendoring_list()
    assert "callbacks.py" in listed, listed
    vendored = tmp_path / "project" / "fm_lightning"
    vendored.mkdir(parents=True)
    for name in listed:
        if name == "__init__.py":  # "an empty __init__.py": a package of its own
            (vendored / name).touch()
            continue
        source = REPO / "fm_lightning" / name
        assert source.exists(), f"README lists {name}, which fm_lightning/ does not have"
        if source.is_dir():
            shutil.copytree(source, vendored / name)
        else:
            shutil.copy(source, vendored / name)
    # -S: no site hooks, so the editable install of this checkout cannot supply a module the
    # list lacks; the copies come first, then the installed third-party packages.
    path = os.pathsep.join([str(vendored.parent), sysconfig.get_paths()["purelib"]])
    proc = subprocess.run(
        [sys.executable, "-S", "-c", _FIT],
        cwd=vendored.parent,
        env={**os.environ, "PYTHONPATH": path, "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    missing = re.findall(r"No module named '(fm_lightning\.\w+)'", proc.stderr)
    assert proc.returncode == 0, f"missing from the README's list: {missing}\n{proc.stderr[-3000:]}"
    loaded = proc.stdout.split()
    assert any(path.endswith("callbacks.py") for path in loaded), proc.stdout
    assert [path for path in loaded if not path.startswith(str(vendored))] == []
    assert (vendored.parent / "maps" / "index.html").is_file()
    assert (vendored.parent / "maps" / "cam" / "epoch=000.png").is_file()
