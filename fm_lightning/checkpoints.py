"""Reading a run's checkpoint and rebuilding its network, weights only, outside training.

    ckpt = "logs/mnist/version_3/checkpoints/last.ckpt"
    config = read_config(find_config(ckpt))  # the run's config.yaml (find_config: None if none)
    model, data = model_from_config(config)  # its ImageClassifier (eval mode), MNISTDataModule
    check_takes_mnist(model, describe_model(model, config))  # one 1x28x28 zero image through it
    model, saved = load_checkpoint(ckpt, model)  # weights into model.net; saved: the loaded dict
    net, saved = load_checkpoint("simplecnn.pt")  # no config: a SimpleCNN (a bare state dict too)
    fresh = untrained_model(seed=0)  # a freshly initialised SimpleCNN, the same for the same seed

Checkpoints are read with ``torch.load(weights_only=True)``: tensors and plain containers only, so
a file that would run code while loading is refused, never executed, and the refusal names what
it would call (read from the pickle's opcodes). Both Lightning checkpoints (keys
``net.conv1.weight``...) and the network's bare state dicts (``conv1.weight``...) load, strictly:
missing, unexpected or misshapen weights are listed in the error.

From a run's ``config.yaml`` (the one LightningCLI saved beside ``checkpoints/``) only
``model.net`` is built, by LightningCLI's own parser (jsonargparse), so whatever ``--model.net``
the run used is rebuilt as ``train.py`` builds it; nothing else there (optimizer, scheduler,
trainer, callbacks, data) is instantiated, and only ``data.mean`` and ``data.std`` are read. The
net's class path is still imported and called, as ``train.py --config`` does: use configs you
trust.

Every problem raises :class:`CheckpointError`, whose message names it and the fix, worded for
``python -m fm_lightning.visualize``, which prints it as one ``error:`` line.
"""

from __future__ import annotations

import dataclasses
import glob
import inspect
import io
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
import yaml
from lightning.pytorch.cli import LightningArgumentParser
from torch import Tensor, nn

from fm_lightning.capture import eval_mode
from fm_lightning.data import MNISTDataModule
from fm_lightning.models import ImageClassifier, SimpleCNN

# How torch's weights-only unpickler words a refusal of something that is not plain data: a global
# (a function or class), an object to build, or a function to call while loading.
_NEEDS_CODE = re.compile(r"GLOBAL|Can only (create new object|build)|call reduce")
_TORCH_BOILERPLATE = ("Weights only load failed", "Check the documentation", "Please file an issue")
IMAGE_SIZE = 28  # MNIST's images, MNISTDataModule's batches: 1x28x28
CONFIG_FILE = "config.yaml"  # what train.py's LightningCLI saves in the run's directory
SUPPORTED = (
    "SimpleCNN checkpoints from this template (`python train.py`, or a SimpleCNN state_dict), "
    f"and any network trained by `python train.py` through its run's {CONFIG_FILE} (found in "
    "the run directory above checkpoints/, or given with --config PATH)"
)


class CheckpointError(Exception):
    """A checkpoint or run config that cannot be read, built or loaded; the message says why and
    what to do."""


# -----------------------------------------------------------------------------
# Checkpoints


def load_checkpoint(
    path: str | os.PathLike, model: nn.Module | None = None, built_from: str = "SimpleCNN"
) -> tuple[nn.Module, dict]:
    """Loads a checkpoint's weights, weights only, into ``model`` (default: a SimpleCNN).

    Args:
        path: a ``.ckpt`` written by ``python train.py`` (or ``trainer.save_checkpoint``), or a
            file holding the network's ``state_dict()``.
        model: the model to load into, e.g. from :func:`model_from_config`. Its ``net``
            (ImageClassifier's network) gets the weights when it has one, else the model does.
            None: a SimpleCNN with as many classes as the checkpoint's ``fc3``.
        built_from: how ``model`` was made, for the message when the weights do not fit.

    Returns:
        ``(model, checkpoint)``: the model in eval mode on the CPU, and the loaded dict.

    Raises:
        CheckpointError: the file is missing, unreadable, would run code, or does not fit.
    """
    path = Path(path)
    ckpt = read_checkpoint(path)
    state = _state_dict(ckpt, path)
    if model is None:
        fc3 = state.get("fc3.weight")
        num_classes = fc3.shape[0] if isinstance(fc3, Tensor) and fc3.ndim == 2 else 10
        model = SimpleCNN(num_classes=num_classes)
    net = model.net if isinstance(getattr(model, "net", None), nn.Module) else model
    _check_fits(net, state, path, built_from)
    net.load_state_dict(state, strict=True)
    return model.eval(), ckpt if isinstance(ckpt, dict) else {}


def read_checkpoint(path: Path) -> object:
    """``torch.load(path, weights_only=True)`` on the CPU; every failure a CheckpointError."""
    if not path.exists():
        found = sorted(glob.glob("logs/*/version_*/checkpoints/*.ckpt"))[:3]
        hint = f" Checkpoints found here: {', '.join(found)}." if found else ""
        raise CheckpointError(
            f"checkpoint not found: {path}. Train one with `python train.py`, which writes "
            "logs/<name>/version_<N>/checkpoints/*.ckpt (the best by val/acc, and last.ckpt)."
            f"{hint}"
        )
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.ckpt"))
        hint = f" It holds: {', '.join(inside)}." if inside else ""
        raise CheckpointError(f"{path} is a directory; pass a checkpoint file.{hint}")
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols > 2, which its loader only partly reads; the
            # error below says what matters, and nothing else should be printed.
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # What it would call, read from the pickle without running it: torch.load cannot even
        # parse protocol 4 ("Unsupported operand 149", its FRAME), and names only the first
        # refusal otherwise. Failing that, torch's weights-only unpickler names what it refused.
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = _code_it_would_run(path) or next(
            (line for line in lines if _NEEDS_CODE.search(line)), None
        )
        if detail is not None:
            raise CheckpointError(
                f"{path} was refused because loading it would run code ({detail}). Only "
                "weights-only checkpoints are accepted (torch.load with weights_only=True: "
                "tensors and plain containers), such as the ones `python train.py` writes."
            ) from None
        useful = [line for line in lines if not line.startswith(_TORCH_BOILERPLATE)]
        why = useful[-1] if useful else "the weights-only loader could not parse it"
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({why}); it may be corrupt or "
            "truncated, or not written by torch.save."
        ) from None
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err.strerror or err}") from None
    except Exception as err:  # zip errors, EOF, garbage: torch raises many kinds
        if path.stat().st_size == 0:
            why = "the file is empty"
        elif isinstance(err, RuntimeError) and str(err):  # torch's own words, first sentence
            why = str(err).split(". ")[0].splitlines()[0][:160]
        else:
            why = f"{type(err).__name__} while parsing it"
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({why}); it may be corrupt or "
            "truncated, or not written by torch.save."
        ) from None


def _code_it_would_run(path: Path) -> str | None:
    """What the checkpoint's pickle would import and call outside torch's weights-only allow-list
    (``"it calls posix.system"``), read without running it; None if nothing is, or if the file
    is no pickle."""
    try:  # torch.save's zip files at its default pickle protocol (2): what Lightning writes
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # not a zip file, or a pickle protocol torch's opcode reader cannot parse
        unsafe = _unsafe(_globals_named_in(path))
    return f"it calls {', '.join(sorted(unsafe))}" if unsafe else None


def _globals_named_in(path: Path) -> list[str]:
    """Every global ("module.name") the file's pickles import, read with pickletools.

    Kept for what get_unsafe_globals_in_checkpoint cannot read: files that are no zip archive (a
    bare pickle, torch's legacy format: several pickles, then storage bytes) and pickle protocol
    >= 4 (torch.save(..., pickle_protocol=4)), whose FRAME its reader refuses ("Unsupported
    operand 149") and whose STACK_GLOBAL takes the names from strings pushed, maybe memoized,
    before it."""
    memo: dict[object, object] = {}
    pushed: list[object] = []  # what the last two opcodes (memo ones aside) pushed
    found: dict[str, None] = {}  # in order, once each
    try:
        if zipfile.is_zipfile(path):  # torch.save's format: the object is <archive>/data.pkl
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                stream = io.BytesIO(archive.read(name) if name else b"")
        else:
            stream = io.BytesIO(path.read_bytes())
        while stream.tell() < len(stream.getbuffer()):
            for op, arg, _ in pickletools.genops(stream):
                if op.name == "MEMOIZE":
                    memo[len(memo)] = pushed[-1] if pushed else None
                elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[arg] = pushed[-1] if pushed else None
                elif op.name in ("GLOBAL", "INST"):  # arg: "module name"
                    found[arg.replace(" ", ".", 1)] = None
                elif op.name == "STACK_GLOBAL":  # module and name are the two strings pushed
                    strings = [x for x in pushed if isinstance(x, str)]
                    found[".".join(strings) if len(strings) == 2 else _UNNAMED] = None
                elif op.name.startswith("EXT"):
                    found["a function from the copyreg extension registry"] = None
                else:
                    value = memo.get(arg) if op.name in ("GET", "BINGET", "LONG_BINGET") else arg
                    is_str = "UNICODE" in op.name or op.name.endswith("STRING")
                    pushed = [*pushed[-1:], value if is_str or op.name.endswith("GET") else None]
    except (ValueError, zipfile.BadZipFile):  # past the pickles (legacy storage), or no pickle
        pass
    return list(found)


_UNNAMED = "a function named at load"


def _unsafe(names: list[str]) -> list[str]:
    """The ``names`` torch's weights-only allow-list refuses, asked of torch's public API.

    get_unsafe_globals_in_checkpoint is the only public reader of that list, so the names are
    written as GLOBAL opcodes of a protocol-2 pickle in a minimal torch.save archive (data.pkl
    and version, the layout torch's serialization notes describe) and handed to it. A name that
    cannot be written as one (no module part, a newline in it) is refused outright."""
    lines = [n.rsplit(".", 1) for n in names if "." in n and "\n" not in n and " " not in n]
    writable = {".".join(parts) for parts in lines}
    refused = [n for n in names if n not in writable]
    pickled = b"\x80\x02(" + b"".join(f"c{m}\n{n}\n".encode() for m, n in lines) + b"t."
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("archive/data.pkl", pickled)
        z.writestr("archive/version", "3\n")
    archive.seek(0)
    return refused + torch.serialization.get_unsafe_globals_in_checkpoint(archive)


def _state_dict(ckpt: object, path: Path) -> dict[str, Tensor]:
    """The network's weights in a loaded checkpoint, with ImageClassifier's ``net.`` removed."""
    if isinstance(ckpt, Mapping) and isinstance(ckpt.get("state_dict"), Mapping):
        state = dict(ckpt["state_dict"])
    elif isinstance(ckpt, Mapping) and ckpt and all(isinstance(v, Tensor) for v in ckpt.values()):
        state = dict(ckpt)  # a bare state_dict
    else:
        what = (
            f"a dict with keys {', '.join(map(str, list(ckpt)[:8]))}"
            if isinstance(ckpt, Mapping)
            else f"a {type(ckpt).__name__}"
        )
        raise CheckpointError(
            f"{path} holds {what}, not a model checkpoint with a state_dict. "
            f"The visualizer supports {SUPPORTED}."
        )
    if any(key.startswith("net.") for key in state):
        # ImageClassifier keeps its network in `self.net`; its other entries are not weights.
        state = {key[4:]: value for key, value in state.items() if key.startswith("net.")}
    return state


def _check_fits(model: nn.Module, state: dict[str, object], path: Path, built_from: str) -> None:
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    wrong = [
        f"{key} {tuple(value.shape)} ({type(model).__name__}: {tuple(expected[key].shape)})"
        if isinstance(value, Tensor)
        else f"{key} (a {type(value).__name__}, not a tensor)"
        for key, value in state.items()
        if key in expected
        and not (isinstance(value, Tensor) and value.shape == expected[key].shape)
    ]
    problems = [
        f"{label}: {', '.join(items[:6])}{', ...' if len(items) > 6 else ''}"
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatch", wrong),
        )
        if items
    ]
    if not problems:
        return
    if built_from == "SimpleCNN":
        fix = f"The visualizer supports {SUPPORTED}."
    else:
        fix = "Pass --config with the config.yaml of the run that wrote this checkpoint."
    raise CheckpointError(f"{path} does not fit {built_from} ({'; '.join(problems)}). {fix}")


def untrained_model(seed: int, num_classes: int = 10) -> SimpleCNN:
    """A freshly initialised SimpleCNN, the same for the same seed; global RNG state is kept."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SimpleCNN(num_classes=num_classes).eval()


# -----------------------------------------------------------------------------
# A run's config.yaml


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The parts of a ``python train.py`` run's ``config.yaml`` that the visualizer uses."""

    path: Path
    model: dict  # the `model:` section: ImageClassifier's arguments, `net` as a class path
    data: dict  # the `data:` section: MNISTDataModule's arguments
    layers: list[str] | None  # the run's FeatureMapCallback `layers`, if it had one
    cam_layer: str | None  # and its `cam_layer`


def find_config(ckpt: str | os.PathLike) -> Path | None:
    """The config.yaml of the run that wrote ``ckpt``: beside it, or in the run directory when
    it is in ``checkpoints/`` (``logs/<name>/version_<N>/{config.yaml,checkpoints/*.ckpt}``)."""
    ckpt = Path(ckpt)
    folders = (
        [ckpt.parent, ckpt.parent.parent] if ckpt.parent.name == "checkpoints" else [ckpt.parent]
    )
    return next((f / CONFIG_FILE for f in folders if (f / CONFIG_FILE).is_file()), None)


def read_config(path: str | os.PathLike) -> RunConfig:
    """Reads the sections of a run's config.yaml that build its model and data.

    Raises:
        CheckpointError: the file is missing, unreadable, not YAML, or has no ``model:`` section.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"config not found: {path}. Pass the {CONFIG_FILE} that `python train.py` saved in "
            f"the run's directory (logs/<name>/version_<N>/{CONFIG_FILE}), or leave --config out "
            "for a SimpleCNN checkpoint."
        )
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as err:
        raise CheckpointError(f"cannot read config {path}: {err.strerror or err}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        why = " ".join(str(err).split())
        raise CheckpointError(
            f"{path} is not valid YAML ({why}); pass the {CONFIG_FILE} `python train.py` saved."
        ) from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise CheckpointError(
            f"{path} has no model: section; expected the {CONFIG_FILE} that `python train.py` "
            "saves in its run directory (model: net: class_path: ...)."
        )
    _check_from_train_py(path, raw["model"])
    data = raw.get("data")
    if not isinstance(data, dict | None):
        raise CheckpointError(f"expected the data: section of {path} to be a mapping, got {data!r}")
    # The run's FeatureMapCallback, if any: its layers are the visualizer's default layers.
    trainer = raw.get("trainer") if isinstance(raw.get("trainer"), dict) else {}
    callbacks = trainer.get("callbacks")
    found = next(
        (
            cb.get("init_args") or {}
            for cb in (callbacks if isinstance(callbacks, list) else [callbacks])
            if isinstance(cb, dict)
            and str(cb.get("class_path", "")).rsplit(".", 1)[-1] == "FeatureMapCallback"
        ),
        {},
    )
    layers = found.get("layers") if isinstance(found, dict) else None
    layers = [layers] if isinstance(layers, str) else layers
    cam_layer = found.get("cam_layer") if isinstance(found, dict) else None
    return RunConfig(
        path=path,
        model=raw["model"],
        data=data or {},
        layers=layers
        if isinstance(layers, list) and all(isinstance(x, str) for x in layers)
        else None,
        cam_layer=cam_layer if isinstance(cam_layer, str) else None,
    )


def _check_from_train_py(path: Path, model: dict) -> None:
    """A ``model:`` section of ImageClassifier's arguments, as train.py saves; another
    LightningCLI project's (its own class or arguments) is named as such, not as a broken one."""
    other = model.get("class_path") or ", ".join(
        sorted(set(model) - set(inspect.signature(ImageClassifier).parameters))
    )
    if other:
        raise CheckpointError(
            f"{path} is the config of another project's LightningCLI run (model: {other}); the "
            "visualizer rebuilds only the models `python train.py` trains (ImageClassifier "
            "with a --model.net), so run it on a train.py checkpoint."
        )


def model_from_config(
    config: RunConfig, seed: int | None = None
) -> tuple[ImageClassifier, MNISTDataModule]:
    """The run's network in an ImageClassifier (eval mode), and an MNISTDataModule with its
    normalisation.

    Only ``model.net`` is built, by jsonargparse (LightningCLI's parser) as train.py builds it,
    so every ``--model.net`` train.py takes (a class path with ``init_args``, a function such as
    ``torchvision.models.resnet18`` or ``timm.create_model`` with ``dict_kwargs``, a module of
    your own) is rebuilt the same way. Nothing else in the config is instantiated or called: the
    optimizer, scheduler, trainer and callbacks are never parsed, and of the ``data:`` section
    only the numbers ``mean`` and ``std`` are read. Building the net still imports and calls what
    ``model.net`` names, as ``python train.py --config`` does: use configs you trust. The global
    random state is left as it was; ``seed`` seeds the initial weights.

    Raises:
        CheckpointError: a class that does not import, an argument it does not take, or a
            value it refuses, in the words of jsonargparse or of the class.
    """
    if "net" not in config.model:
        raise CheckpointError(
            f"{config.path} has no model.net; expected the {CONFIG_FILE} that `python train.py` "
            "saves in its run directory (model: net: class_path: ...)."
        )
    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_argument("--net", type=nn.Module, required=True)
    # jsonargparse >= 4.49 calls it instantiate(); older ones, as Lightning does, the other name
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    try:
        cfg = parser.parse_object({"net": config.model["net"]})
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            net = instantiate(cfg).net
    except Exception as err:  # jsonargparse's ArgumentError, or what a constructor raises
        why = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        raise CheckpointError(
            f"cannot build the model of {config.path} ({why or type(err).__name__}). Fix its "
            "model.net, and run from the directory you trained in, so that modules of your own "
            "import."
        ) from None
    numbers = {k: config.data[k] for k in ("mean", "std") if k in config.data}
    try:
        data = MNISTDataModule(**numbers)
    except ValueError as err:
        raise CheckpointError(f"cannot read the data: section of {config.path}: {err}") from None
    return ImageClassifier(net).eval(), data


def describe_model(model: nn.Module, config: RunConfig) -> str:
    """``ImageClassifier(net=timm.models.resnet.ResNet) from logs/.../config.yaml``."""
    net = getattr(model, "net", None)
    inner = f"(net={type(net).__module__}.{type(net).__qualname__})" if net is not None else ""
    return f"{type(model).__name__}{inner} from {config.path}"


def check_takes_mnist(model: nn.Module, what: str) -> None:
    """One MNIST-shaped zero image through ``model``: a one-line error, not a traceback later."""
    try:
        with torch.no_grad(), eval_mode(model):
            out = model(torch.zeros(1, 1, IMAGE_SIZE, IMAGE_SIZE))
    except Exception as err:
        why = next(iter(str(err).strip().splitlines()), "")
        raise CheckpointError(
            f"the {what} does not take MNIST's 1x{IMAGE_SIZE}x{IMAGE_SIZE} images "
            f"({type(err).__name__}: {why}); the visualizer feeds what MNISTDataModule, "
            "train.py's data, feeds: pass the config.yaml of a run trained on it."
        ) from None
    if not (isinstance(out, Tensor) and out.dim() == 2 and len(out) == 1):
        got = f"shape {tuple(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
        raise CheckpointError(
            f"expected the {what} to return (N, num_classes) logits for MNIST images, got {got}"
        )
