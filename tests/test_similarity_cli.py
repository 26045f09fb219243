"""python -m fm_lightning.similarity on record files written by fm_lightning.cka.save_record."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import REPO
from PIL import Image

from fm_lightning.cka import SimilarityRecord, centered_gram, cka_matrix, save_record
from fm_lightning.similarity import main

SHA = "5" * 64


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def write_run(root, epochs, seed=0, sha=SHA, n=16, layers=("conv1", "conv2"), kind="epoch"):
    """A run directory as the callback leaves it: <root>/feature_maps/similarity/epoch=NNN.pt."""
    grams = {}
    for epoch in epochs:
        x = randn(n, 6, seed=seed + epoch)
        grams[epoch] = {
            "conv1": centered_gram(x),
            "conv2": centered_gram(x[:, :3] + 0.5 * randn(n, 3, seed=seed + 100 + epoch)),
            "dead": centered_gram(torch.zeros(n, 4)),
        }
        record = SimilarityRecord(torch.arange(n), sha, {k: grams[epoch][k] for k in layers})
        name = f"epoch={epoch:03d}.pt" if kind == "epoch" else f"step={epoch:06d}.pt"
        save_record(record, root / "feature_maps" / "similarity" / name)
    return grams


def test_compares_the_last_common_epoch_prints_the_table_and_writes_the_heatmap(tmp_path, capsys):
    a_grams = write_run(tmp_path / "mnist" / "version_0", [0, 1, 2, 3], seed=0)
    b_grams = write_run(tmp_path / "mnist" / "version_1", [0, 1, 2], seed=50)
    out = tmp_path / "out"
    assert (
        main(
            [
                str(tmp_path / "mnist/version_0"),
                str(tmp_path / "mnist/version_1"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert printed.startswith(
        "linear CKA, epoch 2: rows mnist/version_0 (A), columns mnist/version_1 (B)"
    )
    values, _ = cka_matrix(a_grams[2], b_grams[2])  # epoch 2: the last both have
    table = printed.splitlines()[2:5]
    assert table[0].split() == ["A", "\\", "B", "conv1", "conv2"]
    assert table[1].split() == ["conv1", f"{values[0, 0]:.3f}", f"{values[0, 1]:.3f}"]
    assert table[2].split() == ["conv2", f"{values[1, 0]:.3f}", f"{values[1, 1]:.3f}"]
    png = out / "mnist_version_0_vs_mnist_version_1_epoch=002.png"
    assert printed.splitlines()[-1] == f"wrote {png}"
    with Image.open(png) as image:
        assert image.mode == "RGB" and image.width > 100


def test_accepts_the_feature_maps_or_similarity_folder_an_epoch_or_a_step_and_shows_n_a(
    tmp_path, capsys
):
    write_run(tmp_path / "a", [0, 1], layers=("conv1", "dead"))
    write_run(tmp_path / "b", [0, 1])
    args = [str(tmp_path / "a/feature_maps"), str(tmp_path / "b/feature_maps/similarity")]
    assert main([*args, "--epoch", "0", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "epoch 0:" in printed
    assert printed.splitlines()[4].split() == ["dead", "n/a", "n/a"]
    assert "nan" not in printed.lower()
    write_run(tmp_path / "s", [120, 240], kind="step")
    assert main([str(tmp_path / "s"), str(tmp_path / "s"), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "step 240:" in printed and printed.splitlines()[3].split()[1] == "1.000"
    # A run is named by its last two folders, as Lightning's <name>/<version>.
    assert (tmp_path / "out" / f"{tmp_path.name}_a_vs_{tmp_path.name}_b_epoch=000.png").is_file()


def error_of(capsys, argv):
    """The exit status and the one stderr line of a failing command."""
    status = main(argv)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return status, err.strip()


def test_runs_on_other_inputs_missing_and_damaged_files_are_one_error_line_and_status_2(
    tmp_path, capsys
):
    write_run(tmp_path / "a", [0, 1])
    write_run(tmp_path / "other", [0, 1], sha="6" * 64)
    write_run(tmp_path / "fewer", [0, 1], n=12)
    (tmp_path / "empty").mkdir()
    a = str(tmp_path / "a")
    cases = {
        "other": "on the same inputs, got inputs with sha256 555555555555... in RUN_A",
        "fewer": "got dataset indices 0..15 in RUN_A and 0..11 in RUN_B",
        "empty": "to hold feature_maps/similarity/epoch=NNN.pt files, found none",
        "missing": "expected RUN_B to be a run directory, got",
    }
    for run, message in cases.items():
        status, err = error_of(capsys, [a, str(tmp_path / run)])
        assert status == 2 and message in err, err
    status, err = error_of(capsys, [a, a, "--epoch", "7"])
    assert status == 2 and err == "error: expected RUN_A to have epoch 7, got epochs 0, 1"
    status, err = error_of(capsys, [a, a, "--epoch", "-1"])
    assert status == 2 and "expected an integer >= 0, got '-1'" in err
    damaged = tmp_path / "a/feature_maps/similarity/epoch=001.pt"
    damaged.write_bytes(damaged.read_bytes()[:100])
    status, err = error_of(capsys, [a, a])
    assert status == 2 and err.startswith(f"error: cannot read {damaged}: not a file torch.save")
    assert not (tmp_path / "logs").exists()


def test_runs_as_a_module(tmp_path):
    write_run(tmp_path / "a", [0])
    run = subprocess.run(
        [sys.executable, "-m", "fm_lightning.similarity", "a", "a", "--out", "out"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(REPO), "PATH": ""},
    )
    assert run.returncode == 0, run.stderr
    name = f"{tmp_path.name}_a"
    assert run.stdout.splitlines()[-1] == f"wrote out/{name}_vs_{name}_epoch=000.png"
    bad = subprocess.run(
        [sys.executable, "-m", "fm_lightning.similarity", "a", "nowhere"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(REPO), "PATH": ""},
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: expected RUN_B to be a run")
    assert bad.stderr.count("\n") == 1


@pytest.mark.parametrize("bad", ["--epoch", "--step x", "--epoch 1 --step 2"])
def test_argument_errors_are_one_line(tmp_path, capsys, bad):
    status, err = error_of(capsys, ["a", "b", *bad.split()])
    assert status == 2 and err.endswith("(see --help)")
