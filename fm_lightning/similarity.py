"""Do two runs learn the same representations? Their layers' linear CKA, as a table and a heatmap.

    python -m fm_lightning.similarity logs/mnist/version_0 logs/mnist/version_1
    python -m fm_lightning.similarity RUN_A RUN_B --epoch 4 --out logs/similarity
    python -m fm_lightning.similarity RUN_A RUN_A --epoch 0       # one run's layers at epoch 0

RUN_A and RUN_B are run directories of ``FeatureMapCallback(similarity=n)`` (it keeps
``<run>/feature_maps/similarity/epoch=NNN.pt``, the centred Gram matrices of each layer on the
same n validation inputs, see :mod:`fm_lightning.cka`); the feature_maps folder or the similarity
folder itself will do too. The rows are run A's layers, the columns run B's; each cell is the
linear CKA of the two layers on those inputs: 1 = the same representation up to rotation and
scale. The epoch is ``--epoch N`` (or ``--step N`` for a fit whose validations are step-based),
by default the last epoch both runs have (else the last step).

Printed: the table; written: ``<out>/<A>_vs_<B>_epoch=NNN.png`` (``--out``, default
``logs/similarity``), drawn by :func:`fm_lightning.pictures.similarity.similarity_picture`.

Runs compared on different inputs (other dataset indices, or inputs whose sha256 differs: another
dataset, order or preprocessing) are refused, as are missing and damaged files: one line,
``error: ...``, naming the problem, and exit status 2.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import torch

from fm_lightning.cka import SimilarityRecord, cka_matrix, load_record
from fm_lightning.files import safe_path_part, save_png
from fm_lightning.gallery import SIMILARITY_DIR
from fm_lightning.pictures.similarity import similarity_picture

__all__ = ["main"]

_RECORD_NAME = re.compile(r"(epoch|step)=(\d+)\.pt")


class SimilarityError(ValueError):
    """A user error: printed as one ``error: ...`` line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are SimilarityErrors, printed as every other error is."""

    def error(self, message: str) -> NoReturn:
        raise SimilarityError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m fm_lightning.similarity",
        description="Linear CKA between two runs' layers on the same validation inputs.",
        epilog=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_a", metavar="RUN_A", type=Path, help="run directory (the rows)")
    parser.add_argument("run_b", metavar="RUN_B", type=Path, help="run directory (the columns)")
    when = parser.add_mutually_exclusive_group()
    when.add_argument("--epoch", type=_count, help="epoch to compare (default: the last both have)")
    when.add_argument("--step", type=_count, help="global step, for step-based validation frames")
    parser.add_argument("--out", type=Path, default=Path("logs/similarity"), help="PNG folder")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (0, or 2 for a user error)."""
    try:
        run(build_parser().parse_args(argv))
    except SimilarityError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def run(args: argparse.Namespace) -> None:
    folders = [similarity_folder(args.run_a, "RUN_A"), similarity_folder(args.run_b, "RUN_B")]
    records = [_records(folder) for folder in folders]
    frame = _frame(records, args.epoch, args.step)
    a, b = (_load(found[frame]) for found in records)
    _check_same_inputs(a, b)
    values, defined = cka_matrix(a.grams, b.grams)
    kind, number = frame
    runs = [_run_name(folder) for folder in folders]
    title = f"linear CKA, {kind} {number}: rows {runs[0]} (A), columns {runs[1]} (B)"
    notes = [f"n = {len(a.indices)} validation inputs, the same in both runs"]
    print(title)
    print(notes[0])
    print(_table(values, defined, list(a.grams), list(b.grams)))
    png = (
        args.out / f"{safe_path_part(runs[0])}_vs_{safe_path_part(runs[1])}_{kind}={number:03d}.png"
    )
    image = similarity_picture(values, list(a.grams), list(b.grams), title, defined, notes)
    try:
        save_png(image, png)
    except OSError as err:
        raise SimilarityError(f"cannot write {png}: {err.strerror or err}") from None
    print(f"wrote {png}")


def similarity_folder(path: Path, name: str) -> Path:
    """The folder of ``epoch=NNN.pt`` files: in a run directory, its feature_maps, or itself."""
    if not path.is_dir():
        raise SimilarityError(
            f"expected {name} to be a run directory, got {str(path)!r}: no such directory"
        )
    for folder in (path / "feature_maps" / SIMILARITY_DIR, path / SIMILARITY_DIR, path):
        if folder.is_dir() and _records(folder):
            return folder
    raise SimilarityError(
        f"expected {name} ({path}) to hold feature_maps/{SIMILARITY_DIR}/epoch=NNN.pt files, found "
        "none: was it trained with FeatureMapCallback(similarity=N), N > 0?"
    )


def _records(folder: Path) -> dict[tuple[str, int], Path]:
    """``{("epoch", N) or ("step", N): path}`` of the record files in ``folder``."""
    found = {}
    for path in folder.glob("*.pt"):
        match = _RECORD_NAME.fullmatch(path.name)
        if match:
            found[(match.group(1), int(match.group(2)))] = path
    return found


def _frame(
    records: list[dict[tuple[str, int], Path]], epoch: int | None, step: int | None
) -> tuple[str, int]:
    """The frame both runs have: the one asked for, or the last common epoch (else step)."""
    common = set(records[0]) & set(records[1])
    if epoch is not None or step is not None:
        frame = ("epoch", epoch) if epoch is not None else ("step", step)
        for found, name in zip(records, ("RUN_A", "RUN_B"), strict=True):
            if frame not in found:
                raise SimilarityError(
                    f"expected {name} to have {frame[0]} {frame[1]}, got {_listing(found)}"
                )
        return frame
    for kind in ("epoch", "step"):
        numbers = [n for k, n in common if k == kind]
        if numbers:
            return kind, max(numbers)
    raise SimilarityError(
        f"expected an epoch both runs have, got RUN_A {_listing(records[0])} and "
        f"RUN_B {_listing(records[1])}"
    )


def _listing(found: dict[tuple[str, int], Path]) -> str:
    """``epochs 0, 1, 2`` / ``steps 100, 200`` of a run's records."""
    parts = []
    for kind in ("epoch", "step"):
        numbers = sorted(n for k, n in found if k == kind)
        if numbers:
            shown = ", ".join(map(str, numbers[:8])) + (", ..." if len(numbers) > 8 else "")
            parts.append(f"{kind}s {shown}")
    return " and ".join(parts)


def _load(path: Path) -> SimilarityRecord:
    try:
        return load_record(path)
    except FileNotFoundError:
        raise SimilarityError(f"cannot read {path}: it is gone") from None
    except (ValueError, OSError) as err:
        raise SimilarityError(str(err)) from None


def _check_same_inputs(a: SimilarityRecord, b: SimilarityRecord) -> None:
    if not torch.equal(a.indices, b.indices):
        raise SimilarityError(
            f"expected both runs measured on the same inputs, got dataset indices "
            f"{_span(a.indices)} in RUN_A and {_span(b.indices)} in RUN_B: train them with the "
            "same similarity=n"
        )
    if a.inputs_sha256 != b.inputs_sha256:
        raise SimilarityError(
            f"expected both runs measured on the same inputs, got inputs with sha256 "
            f"{a.inputs_sha256[:12]}... in RUN_A and {b.inputs_sha256[:12]}... in RUN_B: another"
            " validation set, order or preprocessing (CKA needs the same inputs)"
        )


def _span(indices: torch.Tensor) -> str:
    if torch.equal(indices, torch.arange(len(indices))):
        return f"0..{len(indices) - 1}"
    return f"{indices[:4].tolist()}... ({len(indices)})"


def _table(values: torch.Tensor, defined: torch.Tensor, rows: list[str], cols: list[str]) -> str:
    """Rows and columns of a CKA matrix as text, three decimals, "n/a" where undefined."""
    cells = [
        [f"{v:.3f}" if ok else "n/a" for v, ok in zip(vs.tolist(), ds.tolist(), strict=True)]
        for vs, ds in zip(values, defined, strict=True)
    ]
    first = max(len(name) for name in ["A \\ B", *rows])
    widths = [max(len(col), 5) for col in cols]
    lines = [
        "  ".join(["A \\ B".ljust(first), *(c.rjust(w) for c, w in zip(cols, widths, strict=True))])
    ]
    for name, row in zip(rows, cells, strict=True):
        lines.append(
            "  ".join([name.ljust(first), *(c.rjust(w) for c, w in zip(row, widths, strict=True))])
        )
    return "\n".join(lines)


def _run_name(folder: Path) -> str:
    """``mnist/version_0`` of ``.../mnist/version_0/feature_maps/similarity``."""
    run = folder.resolve()
    if run.name == SIMILARITY_DIR:
        run = run.parent
    if run.name == "feature_maps":
        run = run.parent
    return "/".join(run.parts[-2:])


def _count(text: str) -> int:
    """An argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


if __name__ == "__main__":
    sys.exit(main())
