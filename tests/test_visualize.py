"""python -m fm_lightning.visualize: real checkpoints, real PNGs, every error path."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import warnings
from unittest import mock

import numpy as np
import pytest
import timm
import torch
import yaml
from conftest import REPO, random_loader, tiny_trainer
from PIL import Image, ImageDraw, ImageFilter

from fm_lightning import ImageClassifier, MNISTDataModule, SimpleCNN
from fm_lightning.capture import resolve_layers
from fm_lightning.cli import main as train_main
from fm_lightning.data import load_mnist
from fm_lightning.pictures.cam import CAM_HEADER_PX
from fm_lightning.pictures.examples import examples_grid
from fm_lightning.visualize import main, top_examples

# A real timm network as train.py takes it: `--model.net` a function class path, keyword
# arguments it passes through **kwargs as jsonargparse's dict_kwargs.
TIMM_NET = {
    "class_path": "timm.create_model",
    "init_args": {"model_name": "test_resnet"},
    "dict_kwargs": {"in_chans": 1, "num_classes": 10},
}
TIMM_CLASS = "ImageClassifier(net=timm.models.resnet.ResNet)"

# SimpleCNN grids for 2 images, as rendering.feature_grid draws them (1 px separators):
# conv1: 16 channels of 24x24; conv2: 32 channels of 8x8, enlarged to 16x16. The pictures are as
# wide, and taller: channel numbers above the grid, the colour scale below it.
CONV1_HW = (2 * 25 + 1, 16 * 25 + 1)
CONV2_HW = (2 * 17 + 1, 32 * 17 + 1)


def _digit(kind: str, size: int = 28, invert: bool = False) -> Image.Image:
    """A crude light-on-black digit, drawn with PIL: '1' (a stroke) or '0' (a ring)."""
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    s = size / 28
    if kind == "1":
        draw.line([(14 * s, 4 * s), (14 * s, 24 * s)], fill=255, width=max(1, round(3 * s)))
    else:
        draw.ellipse([8 * s, 5 * s, 20 * s, 23 * s], outline=255, width=max(1, round(3 * s)))
    return Image.eval(img, lambda p: 255 - p) if invert else img


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    """A real Lightning checkpoint of ImageClassifier(SimpleCNN()) after a 2-batch fit."""
    tmp = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(1)  # not the visualizer's default untrained seed (0)
    model = ImageClassifier(SimpleCNN())
    trainer = tiny_trainer(tmp, callbacks=[], max_epochs=1, num_sanity_val_steps=0)
    trainer.fit(model, train_dataloaders=random_loader(), val_dataloaders=random_loader(seed=1))
    path = tmp / "model.ckpt"
    trainer.save_checkpoint(path)
    return str(path)


@pytest.fixture(scope="module")
def timm_run(tmp_path_factory, mnist_dir) -> dict[str, str]:
    """A real `python train.py` run (fm_lightning.cli.main) of a timm ResNet on MNIST, a few
    batches long: its checkpoint under checkpoints/ and the config.yaml LightningCLI saved."""
    tmp = tmp_path_factory.mktemp("timm_run")
    overrides = {
        "trainer": {
            "max_epochs": 1,
            "limit_train_batches": 4,
            "limit_val_batches": 2,  # not 1: the CLI reads it as the float 1.0, all batches
            "limit_test_batches": 2,
            "log_every_n_steps": 2,
            "num_sanity_val_steps": 0,
            "deterministic": False,  # a process-wide torch setting; the other tests run after
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": [
                {
                    "class_path": "lightning.pytorch.loggers.CSVLogger",
                    "init_args": {"save_dir": str(tmp / "logs"), "name": "timm"},
                }
            ],
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"filename": "last"},
                },
                {
                    "class_path": "fm_lightning.FeatureMapCallback",
                    "init_args": {"layers": ["layer1", "layer2"], "cam": "GradCAM"},
                },
            ],
        },
        "model": {"net": TIMM_NET},
        "data": {"data_dir": mnist_dir, "batch_size": 16},
    }
    config = tmp / "timm.yaml"
    config.write_text(yaml.safe_dump(overrides))
    # as `python train.py --config debug.yaml --config timm.yaml` would (pytest's own argv aside)
    with torch.random.fork_rng(devices=[]), mock.patch.object(sys, "argv", ["train.py"]):
        train_main(["--config", str(REPO / "configs" / "debug.yaml"), "--config", str(config)])
    run = tmp / "logs" / "timm" / "version_0"
    assert (run / "config.yaml").is_file()
    return {"ckpt": str(run / "checkpoints" / "last.ckpt"), "config": str(run / "config.yaml")}


def _config(path, net: dict, **callback) -> str:
    """A config.yaml as train.py saves it: model, data and a FeatureMapCallback's arguments."""
    cb = {"class_path": "fm_lightning.FeatureMapCallback", "init_args": callback}
    text = {"trainer": {"callbacks": [cb]}, "model": {"net": net}, "data": {"batch_size": 8}}
    path.write_text(yaml.safe_dump(text))
    return str(path)


@pytest.fixture
def digits(tmp_path) -> list[str]:
    paths = []
    for kind in ("1", "0"):
        path = tmp_path / f"digit{kind}.png"
        _digit(kind).save(path)
        paths.append(str(path))
    return paths


def _png(path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.mode == "RGB"
        return np.asarray(img).astype(np.float64)


def _find(big: np.ndarray, small: np.ndarray) -> tuple[int, int] | None:
    """Where ``small`` (h, w, 3) lies inside ``big`` as an exact copy: (y, x), or None."""
    h, w = small.shape[:2]
    for y in range(big.shape[0] - h + 1):
        rows = np.lib.stride_tricks.sliding_window_view(big[y + 1], (w, 3))[:, 0]  # (X, w, 3)
        for x in np.flatnonzero((rows == small[1]).all(axis=(1, 2))):
            if np.array_equal(big[y : y + h, x : x + w], small):
                return y, int(x)
    return None


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") or "\nerror: " in err
    assert "Traceback" not in err
    return err


def _one_error(capsys, argv) -> str:
    """Exit status 2 and exactly one line on stderr, ``error: ...``, whoever found the problem
    (argparse or the visualizer)."""
    try:
        status = main(argv)
    except SystemExit as exit_info:
        status = exit_info.code
    captured = capsys.readouterr()
    assert status == 2, captured.err
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    return captured.err


# ----------------------------------------------------------------------------- what it draws


def test_trained_grids_written_and_not_blank(ckpt, digits, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--ckpt", ckpt, "--image", *digits, "--out", str(out)]) == 0
    for layer, hw in (("conv1", CONV1_HW), ("conv2", CONV2_HW)):
        grid = _png(out / layer / "trained.png")
        assert grid.shape[1:] == (hw[1], 3) and grid.shape[0] > hw[0]
        assert grid.std() > 0
        assert not (out / layer / "untrained.png").exists()
    probe = _png(out / "probe_inputs.png")
    assert probe.shape == (29 + 1, 2 * 29 + 1, 3)
    index = (out / "index.html").read_text()
    assert "conv1/trained.png" in index and "conv2/trained.png" in index
    stdout = capsys.readouterr().out
    assert str(out / "index.html") in stdout
    assert "conv1/trained.png" in stdout


def test_untrained_is_seeded(digits, tmp_path):
    runs = {}
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        out = tmp_path / name
        assert main(["--untrained", "--seed", seed, "--image", *digits, "--out", str(out)]) == 0
        assert not (out / "conv1" / "trained.png").exists()
        runs[name] = (out / "conv1" / "untrained.png").read_bytes()
        assert _png(out / "conv1" / "untrained.png").std() > 0
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]


def test_compare_writes_both_frames_and_side_by_side(ckpt, digits, tmp_path):
    out = tmp_path / "out"
    assert main(["--ckpt", ckpt, "--compare", "--image", *digits, "--out", str(out)]) == 0
    for layer in ("conv1", "conv2"):
        trained = _png(out / layer / "trained.png")
        untrained = _png(out / layer / "untrained.png")
        assert trained.shape == untrained.shape
        # trained and untrained weights give different maps for the same inputs
        assert np.abs(trained - untrained).mean() > 5
        both = _png(out / f"compare_{layer}.png")
        assert both.shape[1] > 2 * trained.shape[1]  # side by side
        # untrained on the left, trained on the right, both under a label
        (uy, ux), (ty, tx) = _find(both, untrained), _find(both, trained)
        assert ux + untrained.shape[1] <= tx and uy == ty > 0
        assert (both[:uy] < 128).any()  # the label: dark text on white
    # compare_*.png are files at the top level, so the gallery does not take them for layers
    index = (out / "index.html").read_text()
    assert "conv1/untrained.png" in index and "conv1/trained.png" in index


def test_untrained_side_matches_untrained_run(ckpt, digits, tmp_path):
    argv = ["--ckpt", ckpt, "--compare", "--image", *digits, "--out", str(tmp_path / "a")]
    assert main(argv) == 0
    assert main(["--untrained", "--image", *digits, "--out", str(tmp_path / "b")]) == 0
    a = (tmp_path / "a" / "conv2" / "untrained.png").read_bytes()
    assert a == (tmp_path / "b" / "conv2" / "untrained.png").read_bytes()


def test_bare_state_dict_draws_the_same_as_the_lightning_checkpoint(ckpt, digits, tmp_path):
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    bare = tmp_path / "bare.pt"
    torch.save({k.removeprefix("net."): v for k, v in state.items()}, bare)
    assert main(["--ckpt", ckpt, "--image", *digits, "--out", str(tmp_path / "a")]) == 0
    assert main(["--ckpt", str(bare), "--image", *digits, "--out", str(tmp_path / "b")]) == 0
    for layer in ("conv1", "conv2"):
        a = (tmp_path / "a" / layer / "trained.png").read_bytes()
        assert a == (tmp_path / "b" / layer / "trained.png").read_bytes()


def test_inputs_normalised_with_the_checkpoints_mean_and_std(ckpt, digits, tmp_path):
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    for name, hparams in (("default", {}), ("recorded", {"mean": 0.5, "std": 0.05})):
        path = tmp_path / f"{name}.ckpt"
        torch.save({"state_dict": state, "datamodule_hyper_parameters": hparams}, path)
        assert main(["--ckpt", str(path), "--image", *digits, "--out", str(tmp_path / name)]) == 0
    assert main(["--ckpt", ckpt, "--image", *digits, "--out", str(tmp_path / "fixture")]) == 0
    a = (tmp_path / "default" / "conv2" / "trained.png").read_bytes()
    assert a == (tmp_path / "fixture" / "conv2" / "trained.png").read_bytes()  # 0.1307, 0.3081
    assert a != (tmp_path / "recorded" / "conv2" / "trained.png").read_bytes()


def test_layer_patterns_and_shared_pool(ckpt, digits, tmp_path):
    out = tmp_path / "out"
    argv = ["--ckpt", ckpt, "--image", *digits, "--layers", "conv*", "pool", "fc3"]
    assert main([*argv, "--out", str(out)]) == 0
    layers = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert layers == ["conv1", "conv2", "fc3", "pool", "pool@2"]  # pool runs twice per forward
    assert _png(out / "fc3" / "trained.png").std() > 0


def test_stale_frame_from_an_earlier_compare_is_removed(ckpt, digits, tmp_path):
    out = tmp_path / "out"
    assert main(["--ckpt", ckpt, "--compare", "--image", *digits, "--out", str(out)]) == 0
    assert (out / "conv1" / "untrained.png").exists()
    assert main(["--ckpt", ckpt, "--image", *digits, "--out", str(out)]) == 0
    assert not (out / "conv1" / "untrained.png").exists()
    assert "untrained.png" not in (out / "index.html").read_text()


def test_other_layers_already_in_out_are_mentioned(digits, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--untrained", "--image", *digits, "--layers", "fc1", "--out", str(out)]) == 0
    assert "from before" not in capsys.readouterr().err
    assert main(["--untrained", "--image", *digits, "--out", str(out)]) == 0
    assert f"{out} also holds fc1 from before" in capsys.readouterr().err


def test_unwritable_out(digits, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    err = _error(capsys, ["--untrained", "--image", *digits, "--out", str(blocker / "out")])
    assert f"cannot write to {blocker / 'out'}" in err


@pytest.mark.parametrize(
    "content, problem",
    [
        ("{not json", "is not valid JSON"),
        ('{"format": 1, "history": []}', "a list of layer names"),  # no "layers"
        ('{"format": 1, "layers": ["conv1"], "history": [{"epoch": "0"}]}', "a history of"),
        ("[1, 2]", "a stats.json of format 1"),
    ],
    ids=["json", "missing-key", "wrong-type", "not-a-dict"],
)
def test_damaged_stats_json_in_out_is_one_error_and_left_alone(
    content, problem, digits, tmp_path, capsys
):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stats.json").write_text(content)
    err = _error(capsys, ["--untrained", "--image", *digits, "--out", str(out)])
    assert err.count("\n") == 1
    assert f"{out / 'stats.json'}" in err and problem in err
    assert "delete or rename it, or pass another --out" in err
    assert [p.name for p in out.iterdir()] == ["stats.json"]  # nothing written, nothing moved
    assert (out / "stats.json").read_text() == content

    # a good one (a training run's gallery) is kept, and its history still drives the page
    stats = {"format": 1, "layers": ["conv1"], "history": [{"epoch": 0, "stats": {}}]}
    (out / "stats.json").write_text(json.dumps(stats))
    assert main(["--untrained", "--image", *digits, "--out", str(out)]) == 0
    assert json.loads((out / "stats.json").read_text()) == stats


@pytest.mark.slow
def test_mnist_index(ckpt, mnist_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--ckpt", ckpt, "--mnist-index", "0", "1", "--data-dir", mnist_dir, "--out", str(out)]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "#0 (label 7)" in stdout and "#1 (label 2)" in stdout  # the official test set
    assert _png(out / "probe_inputs.png").shape == (30, 59, 3)
    assert _png(out / "conv1" / "trained.png").shape[1:] == (CONV1_HW[1], 3)
    assert "label 7" in (out / "index.html").read_text()

    err = _error(capsys, [*argv[:2], "--mnist-index", "3", "10000", "--data-dir", mnist_dir])
    assert "10000" in err and "0 to 9999" in err


# ----------------------------------------------------------------------------- checkpoints


def test_missing_checkpoint(digits, tmp_path, capsys):
    missing = tmp_path / "nope.ckpt"
    err = _error(capsys, ["--ckpt", str(missing), "--image", *digits, "--out", str(tmp_path)])
    assert str(missing) in err and "not found" in err and "python train.py" in err
    assert "checkpoints/*.ckpt" in err


@pytest.mark.parametrize("kind", ["garbage", "pickle-garbage", "truncated", "empty", "text"])
def test_corrupt_checkpoint(kind, ckpt, digits, tmp_path, capsys):
    path = tmp_path / "bad.ckpt"
    data = open(ckpt, "rb").read()
    path.write_bytes(
        {
            "garbage": np.random.default_rng(0).bytes(4096),
            # a pickle header, then nonsense: what the weights-only unpickler itself rejects
            "pickle-garbage": b"\x80\x02" + np.random.default_rng(1).bytes(4096),
            "truncated": data[: len(data) // 2],
            "empty": b"",
            "text": b"this is not a checkpoint\n",
        }[kind]
    )
    err = _error(capsys, ["--ckpt", str(path), "--image", *digits, "--out", str(tmp_path / "o")])
    assert str(path) in err and "not a readable PyTorch checkpoint" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "how", ["torch.save", "torch.save protocol 4", "pickle protocol 4", "pickle protocol 2"]
)
def test_checkpoint_that_would_run_code_is_refused(how, digits, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch PWNED",))

    path = tmp_path / "evil.ckpt"
    obj = {"state_dict": {"net." + k: v for k, v in SimpleCNN().state_dict().items()}}
    obj["hyper_parameters"] = Payload()
    if how.startswith("torch.save"):
        torch.save(obj, path, pickle_protocol=4 if how.endswith("4") else 2)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=int(how[-1])))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        err = _error(capsys, ["--ckpt", str(path), "--image", *digits, "--out", "out"])
    assert [str(w.message) for w in caught] == []  # torch's pickle-protocol warning included
    assert err.count("\n") == 1  # one line, nothing else
    assert f"{path} was refused because loading it would run code" in err
    assert "posix.system" in err and "weights-only" in err
    assert not (tmp_path / "PWNED").exists()
    assert not (tmp_path / "out").exists()
    # The payload is live: an unsafe load would have run it.
    if how.startswith("torch.save"):
        torch.load(path, map_location="cpu", weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert (tmp_path / "PWNED").exists()


@pytest.mark.parametrize(
    "state, expected",
    [
        ({"net.conv1.weight": torch.zeros(3, 1, 5, 5)}, ["missing keys", "conv2.weight"]),
        (
            {**SimpleCNN().state_dict(), "conv1.weight": torch.zeros(8, 1, 3, 3)},
            ["shape mismatch", "conv1.weight (8, 1, 3, 3)", "(16, 1, 5, 5)"],
        ),
        ({**SimpleCNN().state_dict(), "extra.weight": torch.zeros(1)}, ["unexpected keys"]),
    ],
    ids=["missing", "shape", "unexpected"],
)
def test_state_dict_that_does_not_fit(state, expected, digits, tmp_path, capsys):
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": state}, path)
    err = _error(capsys, ["--ckpt", str(path), "--image", *digits, "--out", str(tmp_path)])
    assert "does not fit SimpleCNN" in err and "supports SimpleCNN checkpoints" in err
    for text in expected:
        assert text in err


def test_checkpoint_without_a_state_dict(digits, tmp_path, capsys):
    path = tmp_path / "list.ckpt"
    torch.save([1, 2, 3], path)
    err = _error(capsys, ["--ckpt", str(path), "--image", *digits, "--out", str(tmp_path)])
    assert "holds a list" in err and "state_dict" in err


# ----------------------------------------------------------------------------- images


def test_missing_and_unreadable_images(tmp_path, capsys):
    base = ["--untrained", "--out", str(tmp_path / "o"), "--image"]
    err = _error(capsys, [*base, str(tmp_path / "nope.png")])
    assert "nope.png" in err and "no such file" in err

    text = tmp_path / "notes.png"
    text.write_text("not an image")
    err = _error(capsys, [*base, str(text)])
    assert "notes.png" in err and "not an image" in err

    good = tmp_path / "good.png"
    _digit("0").save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    err = _error(capsys, [*base, str(truncated)])
    assert "truncated.png" in err and "truncated" in err.split("truncated.png", 1)[1]


def test_wrong_size_is_refused_unless_resize(tmp_path, capsys):
    path = tmp_path / "big.png"
    _digit("1", size=56).crop((0, 0, 56, 42)).save(path)  # 56x42
    base = ["--untrained", "--image", str(path), "--out", str(tmp_path / "o")]
    err = _error(capsys, base)
    assert "big.png" in err and "56x42" in err and "28x28" in err
    assert "refused" in err and "--resize" in err

    assert main([*base, "--resize"]) == 0
    err = capsys.readouterr().err
    assert "note: " in err and "56x42" in err and "resized to 28x21" in err and "padded" in err
    assert _png(tmp_path / "o" / "probe_inputs.png").shape == (30, 30, 3)


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("RGB", "is RGB; converted to grayscale (L)"),
        ("RGBA", "is RGBA; transparent pixels drawn on black"),
        ("I;16", "is 16-bit grayscale (I;16); scaled to 8-bit grayscale (L)"),
        ("P", "is P (palette); converted to grayscale (L)"),
        ("1", "is 1 (1-bit); converted to grayscale (L)"),
    ],
)
def test_other_colour_modes_are_converted_with_a_note(mode, expected, tmp_path, capsys):
    gray = _digit("0")
    if mode not in ("P", "1"):  # modes that keep every gray level: check all of them survive
        gray = gray.filter(ImageFilter.GaussianBlur(1.5))
    out = tmp_path / "o"
    gray.save(tmp_path / "ref.png")
    assert main(["--untrained", "--image", str(tmp_path / "ref.png"), "--out", str(out)]) == 0
    reference = _png(out / "conv1" / "untrained.png")
    capsys.readouterr()

    if mode == "RGBA":
        img = gray.convert("RGBA")
        img.putalpha(Image.eval(gray, lambda p: 255 if p else 0))  # only the digit is opaque
    elif mode == "I;16":
        img = Image.fromarray(np.asarray(gray).astype(np.uint16) * 256)
    else:
        img = gray.convert(mode)
    assert img.mode == mode
    path = tmp_path / f"digit_{mode.replace(';', '')}.png"
    img.save(path)
    assert main(["--untrained", "--image", str(path), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"note: {path} {expected}" in err
    # the same picture in another mode draws the same maps (16-bit: up to 1 level off in 255)
    assert np.abs(_png(out / "conv1" / "untrained.png") - reference).mean() < 1


def test_unconvertible_mode_is_refused(tmp_path, capsys):
    path = tmp_path / "lab.tif"
    Image.new("LAB", (28, 28)).save(path)
    err = _error(capsys, ["--untrained", "--image", str(path), "--out", str(tmp_path / "o")])
    assert "lab.tif" in err and "colour mode LAB" in err and "refused" in err


def test_multi_frame_image_uses_the_first_frame(tmp_path, capsys):
    path = tmp_path / "anim.gif"
    first, second = _digit("1").convert("P"), _digit("0").convert("P")
    first.save(path, save_all=True, append_images=[second])
    assert main(["--untrained", "--image", str(path), "--out", str(tmp_path / "o")]) == 0
    assert "has 2 frames; using the first" in capsys.readouterr().err


def test_invert_for_dark_on_light_drawings(tmp_path, capsys):
    dark = tmp_path / "dark.png"
    _digit("1", invert=True).save(dark)
    light = tmp_path / "light.png"
    _digit("1").save(light)
    assert main(["--untrained", "--image", str(dark), "--out", str(tmp_path / "a")]) == 0
    assert "you may want --invert" in capsys.readouterr().err
    argv = ["--untrained", "--image", str(dark), "--invert", "--out", str(tmp_path / "b")]
    assert main(argv) == 0
    assert "--invert" not in capsys.readouterr().err
    assert main(["--untrained", "--image", str(light), "--out", str(tmp_path / "c")]) == 0
    inverted = (tmp_path / "b" / "conv1" / "untrained.png").read_bytes()
    assert inverted == (tmp_path / "c" / "conv1" / "untrained.png").read_bytes()
    assert inverted != (tmp_path / "a" / "conv1" / "untrained.png").read_bytes()


# ----------------------------------------------------------------------------- arguments


def test_unknown_layer_lists_the_available_ones(digits, tmp_path, capsys):
    argv = ["--untrained", "--image", *digits, "--layers", "conv1", "cnv2", "--out", str(tmp_path)]
    err = _error(capsys, argv)
    assert "'cnv2' matches nothing" in err and "Closest: conv2" in err
    assert "Available layers: conv1, pool, relu1, conv2, relu2, fc1, fc2, fc3" in err
    assert not (tmp_path / "conv1").exists()  # checked before anything is drawn


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--compare", "--image", "x.png"], "--compare needs --ckpt"),
        (["--untrained", "--ckpt", "a.ckpt", "--image", "x.png"], "--untrained"),
        (["--image", "x.png"], "--ckpt PATH"),
        (["--untrained", "--image", "x.png", "--mnist-index", "0"], "not allowed with"),
    ],
)
def test_inconsistent_arguments(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err


def test_help_runs_as_a_module():
    result = subprocess.run(
        [sys.executable, "-m", "fm_lightning.visualize", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    flags = ["--ckpt", "--config", "--untrained", "--compare", "--image", "--mnist-index"]
    for flag in [*flags, "--resize", "--examples", "--cam", "--cam-layer"]:
        assert flag in result.stdout


# ----------------------------------------------------------------------------- run configs


def _mnist_test_x(mnist_dir: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The 10,000 MNIST test images as the model sees them (default mean and std), and labels."""
    images, labels = load_mnist(MNISTDataModule(mnist_dir).raw_dir, "test")
    return MNISTDataModule(mnist_dir).normalize(images), labels


@pytest.mark.slow
def test_run_config_rebuilds_a_timm_net(timm_run, mnist_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--ckpt", timm_run["ckpt"], "--mnist-index", "0", "1", "--data-dir", mnist_dir]
    assert main([*argv, "--compare", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert f"model:   {TIMM_CLASS} from {timm_run['config']}" in stdout
    # the layers of the run's FeatureMapCallback, as it named them
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["layer1", "layer2"]
    for layer in ("layer1", "layer2"):
        trained, untrained = _png(out / layer / "trained.png"), _png(out / layer / "untrained.png")
        assert trained.std() > 0 and trained.shape == untrained.shape
        assert np.abs(trained - untrained).mean() > 1
    index = (out / "index.html").read_text()
    assert "layer1/trained.png" in index and "layer2/untrained.png" in index

    # the checkpoint's weights, in the network timm builds: the same predictions
    net = timm.create_model("test_resnet", in_chans=1, num_classes=10).eval()
    state = torch.load(timm_run["ckpt"], map_location="cpu", weights_only=True)["state_dict"]
    net.load_state_dict({k.removeprefix("net."): v for k, v in state.items()})
    x, _ = _mnist_test_x(mnist_dir)
    with torch.no_grad():
        probs = net(x[:2]).softmax(dim=1)
    expected = " ".join(f"{p} ({c:.0%})" for c, p in zip(*probs.max(dim=1), strict=True))
    assert f"trained (last.ckpt) predicts: {expected}\n" in stdout


def test_gallery_captions_every_picture_and_says_what_its_steps_are(ckpt, digits, tmp_path):
    out = tmp_path / "out"
    argv = ["--ckpt", ckpt, "--compare", "--image", *digits, "--cam", "GradCAM"]
    assert main([*argv, "--cam-layer", "relu2", "--out", str(out)]) == 0
    page = (out / "index.html").read_text()
    match = re.search(r'<script type="application/json" id="manifest">(.*?)</script>', page, re.S)
    manifest = json.loads(match.group(1))
    assert [s["label"] for s in manifest["steps"]] == ["untrained", "trained"]
    rows = {row["name"]: row for row in manifest["layers"]}
    assert rows["conv1"]["caption"] == [
        "untrained (seed 0): channels 0-15 of 16; measured: NCHW",
        "trained (model.ckpt): channels 0-15 of 16; measured: NCHW",
    ]
    untrained, trained = rows["cam"]["caption"]
    assert untrained.startswith("untrained (seed 0): GradCAM on relu2; columns: input, predicted")
    assert trained.startswith("trained (model.ckpt): GradCAM on relu2; columns: input, predicted")
    # The frames are networks, not epochs: the probe's caption does not speak of epochs.
    assert "epoch" not in re.search(r"<figcaption>(.*?)</figcaption>", page).group(1)


@pytest.mark.slow
def test_cam_of_a_timm_net_at_the_runs_cam_layer_or_another(timm_run, mnist_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--ckpt", timm_run["ckpt"], "--mnist-index", "0", "1", "--data-dir", mnist_dir]
    assert main([*argv, "--cam", "GradCAM", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    # torchcam's choice (the run's callback names no cam_layer): the last layer with spatial
    # maps, layer3 (2x2) for 28x28 inputs, as layer4's are 1x1
    assert "trained (last.ckpt) GradCAM on net.layer3" in stdout
    assert "1: pred " in stdout and ", true 7" in stdout and ", true 2" in stdout
    cam = _png(out / "cam" / "trained.png")
    # rows: 2 images; columns: input, predicted class, true class; 28 px tiles drawn 84 px,
    # under the columns' names, beside each row's classes, above the colour scale
    assert cam.shape[0] > CAM_HEADER_PX + 2 * 84 + 3 * 2 and cam.shape[1] > 3 * 84 + 4 * 2
    assert cam[:, 86:172].std() > 0  # the predicted-class overlay is not blank
    assert "cam/trained.png" in (out / "index.html").read_text()

    argv = [*argv, "--cam", "LayerCAM", "--cam-layer", "layer1", "--out", str(tmp_path / "b")]
    assert main(argv) == 0
    assert "LayerCAM on layer1;" in capsys.readouterr().out  # named as --cam-layer named it
    assert not np.array_equal(_png(tmp_path / "b" / "cam" / "trained.png"), cam)


@pytest.mark.slow
def test_top_examples_of_a_timm_layer_are_its_strongest_inputs(timm_run, mnist_dir):
    model = ImageClassifier(timm.create_model("test_resnet", in_chans=1, num_classes=10))
    state = torch.load(timm_run["ckpt"], map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict(state)
    model.eval()
    x, _ = _mnist_test_x(mnist_dir)
    x = x[:96]
    modules = resolve_layers(model, ["layer2"])
    results, errors = top_examples(model, modules, x, k=4, max_channels=6, batch_size=40)
    assert errors == {}
    result = results["layer2"]
    with torch.no_grad():  # the truth: each channel's maximum per image, strongest first
        best = (
            model.net.layer2(
                model.net.layer1(
                    model.net.maxpool(model.net.act1(model.net.bn1(model.net.conv1(x))))
                )
            )
            .amax(dim=(2, 3))[:, :6]
            .T
        )  # (6, 96)
    order = np.lexsort((np.arange(96)[None].repeat(6, 0), -best.numpy()), axis=1)[:, :4]
    assert result.indices.tolist() == order.tolist()
    torch.testing.assert_close(result.scores, best.gather(1, torch.from_numpy(order)))
    assert examples_grid(result).float().std() > 0


@pytest.mark.slow
def test_examples_over_the_mnist_test_set(ckpt, mnist_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--ckpt", ckpt, "--mnist-index", "0", "1", "--data-dir", mnist_dir, "--compare"]
    assert main([*argv, "--examples", "3", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "trained (model.ckpt) conv1: top 3 MNIST test inputs of channels 0-15" in stdout
    index = (out / "index.html").read_text()
    for layer in ("conv1", "conv2"):
        for variant in ("trained", "untrained"):
            assert _png(out / layer / "examples" / f"{variant}.png").std() > 0
            assert f"{layer}/examples/{variant}.png" in index
    trained = _png(out / "conv2" / "examples" / "trained.png")
    assert not np.array_equal(trained, _png(out / "conv2" / "examples" / "untrained.png"))

    # they are the test set's strongest inputs for each channel (ties: the smaller index)
    model = SimpleCNN()
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict({k.removeprefix("net."): v for k, v in state.items()})
    model.eval()
    x, _ = _mnist_test_x(mnist_dir)
    results, _ = top_examples(model, {"conv2": model.conv2}, x, k=3, max_channels=32)
    with torch.no_grad():
        best = torch.cat(
            [model.conv2(model.pool(model.conv1(b).relu())).amax(dim=(2, 3)) for b in x.split(500)]
        ).T  # (32, 10000)
    order = np.lexsort((np.arange(10_000)[None].repeat(32, 0), -best.numpy()), axis=1)[:, :3]
    assert results["conv2"].indices.tolist() == order.tolist()
    # and the picture the command wrote is that result, drawn as the callback draws it
    assert np.array_equal(examples_grid(results["conv2"], cmap="viridis").numpy(), trained)

    # drawn again without --examples: the old examples are not left to pass for the new run's
    assert main([*argv[:-1], "--out", str(out)]) == 0
    assert not (out / "conv2" / "examples" / "trained.png").exists()
    assert "conv2/examples/trained.png" not in (out / "index.html").read_text()


def test_cam_of_files_and_its_layer(ckpt, digits, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--ckpt", ckpt, "--image", *digits, "--compare", "--out", str(out)]
    assert main([*argv, "--cam", "GradCAMpp", "--cam-layer", "conv2"]) == 0
    stdout = capsys.readouterr().out
    assert (
        "trained (model.ckpt) GradCAMpp on conv2; columns: input, predicted, second (the "
        "runner-up class). 1: pred" in stdout
    )
    trained, untrained = _png(out / "cam" / "trained.png"), _png(out / "cam" / "untrained.png")
    # no true class for files: the third column is the runner-up's map
    assert trained.shape[0] > CAM_HEADER_PX + 2 * 84 + 3 * 2 and trained.shape[1] > 3 * 84 + 8
    assert trained[:, 86:].std() > 0 and not np.array_equal(trained, untrained)
    index = (out / "index.html").read_text()
    assert "cam/trained.png" in index and "cam/untrained.png" in index


def test_untrained_net_from_a_config(digits, tmp_path, capsys):
    config = _config(tmp_path / "config.yaml", TIMM_NET, layers=["layer1", "layer3"])
    out = tmp_path / "out"
    assert main(["--untrained", "--config", config, "--image", *digits, "--out", str(out)]) == 0
    assert f"model:   {TIMM_CLASS} from {config}" in capsys.readouterr().out
    for layer in ("layer1", "layer3"):  # the config's FeatureMapCallback layers
        assert _png(out / layer / "untrained.png").std() > 0
    again = tmp_path / "again"
    argv = ["--untrained", "--config", config, "--image", *digits, "--layers", "layer1"]
    assert main([*argv, "--out", str(again)]) == 0  # --seed 0 both times: the same weights
    assert (again / "layer1" / "untrained.png").read_bytes() == (
        out / "layer1" / "untrained.png"
    ).read_bytes()
    assert main([*argv, "--seed", "1", "--out", str(tmp_path / "seed1")]) == 0
    assert (tmp_path / "seed1" / "layer1" / "untrained.png").read_bytes() != (
        out / "layer1" / "untrained.png"
    ).read_bytes()


def test_config_is_found_in_the_run_directory(ckpt, digits, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    moved = run / "checkpoints" / "last.ckpt"
    moved.write_bytes(open(ckpt, "rb").read())
    argv = ["--ckpt", str(moved), "--image", *digits, "--out", str(tmp_path / "out")]
    assert main(argv) == 0  # no config.yaml: SimpleCNN, as before
    assert "model:   SimpleCNN\n" in capsys.readouterr().out

    config = _config(run / "config.yaml", {"class_path": "fm_lightning.SimpleCNN"})
    assert main(argv) == 0
    expected = f"model:   ImageClassifier(net=fm_lightning.models.SimpleCNN) from {config}"
    assert expected in capsys.readouterr().out

    _config(run / "config.yaml", TIMM_NET)  # the run's config wins over SimpleCNN
    err = _one_error(capsys, argv)
    assert f"does not fit {TIMM_CLASS} from {config}" in err
    assert "Pass --config with the config.yaml of the run that wrote this checkpoint" in err


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--cam", "GradKam"], "expected a CAM method, one of GradCAM,"),
        (["--cam", "GradCAM", "--cam-layer", "cnv2"], "'cnv2' matches nothing"),
        (["--cam", "GradCAM", "--cam-layer", "conv*"], "to match one module, got 2: conv1, conv2"),
        (["--cam", "GradCAM", "--cam-layer", "fc1"], "expected layer 'fc1' to output (N, C, h, w)"),
        (["--cam-layer", "conv2"], "--cam-layer needs --cam METHOD"),
        (["--examples", "0"], "expected an integer in [1, 100], got 0"),
        (["--examples", "1000000000"], "expected an integer in [1, 100], got 1000000000"),
        (["--examples", "many"], "expected an integer in [1, 100], got many"),
        (["--max-channels", "0"], "expected an integer in [1, 1024], got 0"),
        (["--max-channels", "99999999999"], "expected an integer in [1, 1024], got 99999999999"),
        (["--seed", "-1"], "expected an integer in [0, 4294967295], got -1"),
        (["--seed", str(2**64)], f"expected an integer in [0, 4294967295], got {2**64}"),
    ],
    ids=[
        "method",
        "layer",
        "two-layers",
        "flat-layer",
        "no-cam",
        "examples",
        "examples-huge",
        "examples-text",
        "channels",
        "channels-huge",
        "seed-negative",
        "seed-huge",
    ],
)
def test_bad_cam_and_examples_arguments(args, expected, digits, tmp_path, capsys):
    out = tmp_path / "out"
    err = _one_error(capsys, ["--untrained", "--image", *digits, *args, "--out", str(out)])
    assert expected in err
    assert not out.exists()  # nothing drawn before the problem was found


def test_bad_configs(ckpt, digits, tmp_path, capsys):
    base = ["--image", *digits, "--out", str(tmp_path / "out")]
    missing = tmp_path / "nope.yaml"
    for model in (["--untrained"], ["--ckpt", ckpt]):
        err = _one_error(capsys, [*model, "--config", str(missing), *base])
        assert f"config not found: {missing}" in err and "version_<N>/config.yaml" in err

    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [net\n")
    assert "is not valid YAML" in _one_error(
        capsys, ["--untrained", "--config", str(broken), *base]
    )
    broken.write_text("trainer: {}\n")
    assert "has no model: section" in _one_error(
        capsys, ["--untrained", "--config", str(broken), *base]
    )
    config = _config(tmp_path / "c.yaml", {"class_path": "fm_lightning.NoSuchNet"})
    err = _one_error(capsys, ["--untrained", "--config", config, *base])
    assert f"cannot build the model of {config}" in err and "fm_lightning.NoSuchNet" in err
    config = _config(
        tmp_path / "c.yaml", {"class_path": "fm_lightning.SimpleCNN", "init_args": {"num_class": 3}}
    )
    err = _one_error(capsys, ["--untrained", "--config", config, *base])
    assert "num_class" in err

    # a real torchvision ResNet-18 (a function class path) takes 3-channel images, not MNIST's
    net = {"class_path": "torchvision.models.resnet18", "init_args": {"num_classes": 10}}
    err = _one_error(capsys, ["--untrained", "--config", _config(tmp_path / "r.yaml", net), *base])
    assert "ImageClassifier(net=torchvision.models.resnet.ResNet)" in err
    assert "does not take MNIST's 1x28x28 images" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_as_a_process(timm_run, mnist_dir, tmp_path):
    """The real command: exit 0 and nothing on stderr, or one error line and exit 2."""
    argv = [sys.executable, "-m", "fm_lightning.visualize", "--ckpt", timm_run["ckpt"]]
    argv += ["--mnist-index", "3", "--data-dir", mnist_dir, "--cam", "GradCAM"]
    ok = subprocess.run(
        [*argv, "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True
    )
    assert ok.returncode == 0 and ok.stderr == "", ok.stderr
    assert _png(tmp_path / "out" / "cam" / "trained.png").std() > 0
    bad = subprocess.run(
        [*argv, "--cam-layer", "fc", "--out", str(tmp_path / "bad")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.startswith("error: --cam GradCAM at --cam-layer fc: ")
    assert bad.stderr.count("\n") == 1
    assert not (tmp_path / "bad").exists()


def test_config_builds_only_the_net_and_calls_nothing_else(digits, tmp_path, capsys):
    """A config's optimizer, scheduler, data or trainer sections naming a function with
    init_args (os.system here) run nothing: only model.net is ever instantiated."""
    marker = tmp_path / "ran"
    command = {"class_path": "os.system", "init_args": {"command": f"touch {marker}"}}
    base = ["--untrained", "--image", *digits, "--out", str(tmp_path / "out")]
    config = tmp_path / "config.yaml"
    net = {"class_path": "fm_lightning.SimpleCNN"}
    sections = {
        "model": {"net": net, "optimizer": command, "lr_scheduler": command},
        "data": {"batch_size": 8, "data_dir": command},
        "trainer": {"callbacks": [command], "logger": command},
        "optimizer": command,
        "lr_scheduler": command,
    }
    config.write_text(yaml.safe_dump(sections))
    assert main([*base, "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "model:   ImageClassifier(net=fm_lightning.models.SimpleCNN)" in out
    assert not marker.exists()

    # the data section's numbers are read, never built: a function there is an error
    sections["data"] = {"mean": command}
    config.write_text(yaml.safe_dump(sections))
    err = _one_error(capsys, [*base, "--config", str(config)])
    assert "cannot read the data: section" in err and "mean" in err
    # and model.net itself must be a network
    sections["data"] = {}
    sections["model"]["net"] = command
    config.write_text(yaml.safe_dump(sections))
    err = _one_error(capsys, [*base, "--config", str(config)])
    assert f"cannot build the model of {config}" in err
    assert not marker.exists()


def test_a_layer_named_cam_and_layers_with_one_safe_name_get_folders_of_their_own(
    digits, tmp_path, capsys
):
    # test_callback.CollidingNames: layers "cam", "a b" and "a_b" (one safe name: a_b)
    config = _config(tmp_path / "c.yaml", {"class_path": "test_callback.CollidingNames"})
    out = tmp_path / "out"
    argv = ["--untrained", "--config", config, "--image", *digits, "--out", str(out)]
    argv += ["--layers", "cam", "a b", "a_b", "--cam", "gradcam", "--cam-layer", "a_b"]
    assert main(argv) == 0
    written = capsys.readouterr().out
    index = (out / "index.html").read_text()
    for folder, channels in (("cam~2", 4), ("a_b", 6), ("a_b~2", 8)):
        assert f"  {folder}/untrained.png" in written
        # the gallery's entry for that folder is the layer with that many channels
        entry = re.search(
            rf'"name": "{re.escape(folder)}", "src": \[[^]]*\], .*?"caption": \[([^]]*)\]', index
        )
        assert entry and f"channels 0-{channels - 1} of {channels}" in entry.group(1)
    # cam/ holds the CAM alone: its columns' header above 84 px tiles, not a layer's maps
    cam = _png(out / "cam" / "untrained.png")
    assert cam.shape[0] > CAM_HEADER_PX + 2 * 84 + 3 * 2
    assert "GradCAM on a_b" in written
