"""Feature-map grids, top examples and class-activation maps for a checkpoint, outside training.

    python -m fm_lightning.visualize --ckpt logs/mnist/version_0/checkpoints/last.ckpt \
        --mnist-index 0 1 2 3 --out logs/visualize
    python -m fm_lightning.visualize --ckpt last.ckpt --image digit.png --layers conv1 conv2
    python -m fm_lightning.visualize --untrained --mnist-index 0 1 2 3   # fresh SimpleCNN, seed 0
    python -m fm_lightning.visualize --ckpt last.ckpt --mnist-index 0 1 --compare  # side by side
    python -m fm_lightning.visualize --ckpt last.ckpt --mnist-index 0 1 2 3 \
        --examples 9 --cam GradCAM --cam-layer relu2     # what channels respond to, where it looks
    python -m fm_lightning.visualize --untrained --config logs/mnist/version_3/config.yaml \
        --mnist-index 0 1                                 # that run's network, freshly initialised

Everything is drawn exactly as ``FeatureMapCallback`` draws it during training: the grids by
``fm_lightning.capture`` and ``fm_lightning.rendering`` (rows are input images, columns
channels) for the layers named by ``--layers`` (names or glob patterns, as the callback takes
them); with ``--examples K`` each drawn channel's top K inputs of the MNIST test set, cropped
to its receptive field (``fm_lightning.pictures.examples``, as ``examples=K`` does over
validation; dead channels, never above 0 on the test set, are marked); with ``--cam METHOD``
class-activation overlays of the inputs (``fm_lightning.pictures.cam``, torchcam), for the
predicted class and, for ``--mnist-index`` inputs, the true class, at ``--cam-layer`` (a layer
name or pattern matching one module; default the run's ``cam_layer``, else torchcam's choice).
Each picture and its caption come from the same code the callback draws with.

The network, read and rebuilt by ``fm_lightning.checkpoints``. A checkpoint written by ``python
train.py`` sits in ``checkpoints/`` of its run directory, beside the ``config.yaml`` LightningCLI
saved there; its ``model.net`` alone is parsed and instantiated by LightningCLI's own parser
(jsonargparse; nothing else in the config is built or called, and of ``data:`` only ``mean`` and
``std`` are read), so whatever ``--model.net`` the run used (a class path with ``init_args``,
``torchvision.models.resnet18``, ``timm.create_model`` with ``dict_kwargs``, a module of your own)
is rebuilt the same way. ``--config PATH`` names another one. Layers are then named as the callback
names them, relative to the ImageClassifier (``conv1`` finds ``net.conv1``), and ``--layers``
defaults to the run's FeatureMapCallback layers. Building the network imports and calls what
``model.net`` names, as ``train.py --config`` does: use configs you trust. Without a config the
network is SimpleCNN (layers ``conv1``, ``pool``, ``conv2``, ``fc1``...; default ``conv1 conv2``),
and bare SimpleCNN state dicts load too.

Inputs have MNIST's shape, 1x28x28, because that is what ``MNISTDataModule`` (train.py's data)
feeds every network it trains: a network that does not take it (say, a 3-channel ResNet) is
refused with one line, by one forward pass of a zero image before anything is drawn. Inputs go
through ``MNISTDataModule.normalize``, with the mean and std recorded in the checkpoint (or the
config's ``data:`` section; the template's defaults otherwise).

Output layout (``--out``, default ``logs/visualize``)::

    probe_inputs.png                 the inputs, in one row, in the order given
    <layer>/trained.png              the checkpoint's maps (with --ckpt)
    <layer>/untrained.png            a freshly initialised network's maps (--untrained, --compare)
    <layer>/examples/trained.png     --examples: top-K test inputs per drawn channel (and
                                     untrained.png with --untrained or --compare)
    cam/trained.png                  --cam: input, predicted-class and true-class overlays per
                                     input (and untrained.png)
    compare_<layer>.png              --compare: untrained and trained grids side by side, labelled
    index.html                       a gallery page of all of the above (fm_lightning.gallery)

A layer called twice in one forward pass (SimpleCNN's ``pool``) gets one directory per call,
``pool`` and ``pool@2``, as in the callback's output; a layer whose directory name is taken (by
another layer, ``"a b"`` and ``"a_b"``, or by ``cam``) gets ``~2`` appended. Every numeric option
has a stated bound (``--help``). What each picture shows (channels,
dead channels, predictions, CAM captions) is printed.

Checkpoints are read with ``torch.load(weights_only=True)``: tensors and plain containers only, so
a file that would run code while loading is refused, never executed. Both Lightning checkpoints
(keys ``net.conv1.weight``...) and the network's bare state dicts (``conv1.weight``...) load.

Input images must be 28x28 grayscale, like MNIST (light digit on black). Other colour modes are
converted to grayscale and a note says so; a mode Pillow cannot convert is refused. Other sizes
are refused unless ``--resize`` is given (then: scaled to fit 28x28 with antialiasing, aspect kept,
padded with the image's border colour). ``--invert`` turns dark-on-light drawings into MNIST's
light-on-dark. Every failure (a bad argument, checkpoint, config, image, layer or CAM method)
prints one line, ``error: ...`` naming the problem and the fix, and exits with status 2; nothing
is written to ``--out`` before all is drawn.

``--out`` may be a training run's gallery directory: its ``stats.json`` is kept and its plots still
show. A damaged one is an error, and left as it is for the user to look at (the training callback,
which must not stop, moves it aside instead).

Why over 500 lines: it is one command line read top to bottom, and a third of it is its options'
``--help`` texts with their bounds (``build_parser``); its inputs are in ``visualize_inputs.py``
and every picture is drawn by the code the callback draws with (``fm_lightning.pictures``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
from torch import Tensor, nn

from fm_lightning import rendering
from fm_lightning.cam import CAM_METHODS, check_cam_method
from fm_lightning.capture import capture, eval_mode, resolve_layers
from fm_lightning.checkpoints import (
    CONFIG_FILE,
    CheckpointError,
    RunConfig,
    check_takes_mnist,
    describe_model,
    find_config,
    load_checkpoint,
    model_from_config,
    read_config,
    untrained_model,
)
from fm_lightning.data import MNIST_MEAN, MNIST_STD, MNISTDataModule
from fm_lightning.files import distinct_path_parts
from fm_lightning.gallery import (
    CAM_DIR,
    EXAMPLES_DIR,
    PROBE_FILE,
    RESERVED_NAMES,
    STATS_FILE,
    load_stats,
    write_index,
)
from fm_lightning.pictures import Picture
from fm_lightning.pictures.cam import cam_picture, resolve_cam_layer
from fm_lightning.pictures.examples import ExampleStream, examples_caption, examples_grid
from fm_lightning.pictures.maps import MapsKind, maps_caption
from fm_lightning.probing import Reading, measure_layouts
from fm_lightning.publishing import save_pictures
from fm_lightning.text import stamp
from fm_lightning.topk import MAX_EXAMPLES, ExamplesResult
from fm_lightning.visualize_inputs import (
    VisualizeError,
    load_image,
    load_mnist_test,
    mnist_test_set,
    note,
)

EXAMPLES_BATCH = 500  # MNIST test images per forward pass of the --examples sweep
MAX_CHANNELS = 1024  # --max-channels: columns of a grid
MAX_SEED = 2**32 - 1  # --seed
_LABEL_PX = 14  # the labels of --compare's panels


# -----------------------------------------------------------------------------
# Pictures


def side_by_side(panels: Sequence[tuple[str, np.ndarray]], gap: int = 16) -> np.ndarray:
    """Lays out (H, W, 3) uint8 images in a row on white, each under a small text label."""
    label_h = _LABEL_PX + 6
    width = sum(img.shape[1] for _, img in panels) + gap * (len(panels) + 1)
    height = label_h + max(img.shape[0] for _, img in panels) + gap
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    x = gap
    for label, img in panels:
        # fm_lightning.text: glyphs the font lacks drawn from a fallback, or escaped
        stamp(canvas, (x, 2), label, (0, 0, 0), _LABEL_PX)
        h, w = img.shape[:2]
        canvas[label_h : label_h + h, x : x + w] = np.asarray(img)
        x += w + gap
    return canvas


def top_examples(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    images: Tensor,
    k: int,
    max_channels: int,
    channels: Mapping[str, Tensor] | None = None,
    readings: Mapping[str, Reading] | None = None,
    batch_size: int = EXAMPLES_BATCH,
) -> tuple[dict[str, ExamplesResult], dict[str, str]]:
    """Each drawn channel's top-k of ``images``, streamed as FeatureMapCallback streams a
    validation run (:class:`fm_lightning.pictures.examples.ExampleStream`: the same hooks,
    receptive fields measured from the model, crops and ranking).

    Args:
        model: the model the layers belong to.
        modules: ``{name: module}``, as from :func:`fm_lightning.capture.resolve_layers`.
        images: (N, C, H, W) float inputs as the model takes them; an image's index is its row.
        k: examples per channel.
        max_channels: channels kept per layer when ``channels`` does not name them.
        channels: ``{layer: (Cd,) channel indices}``, the channels the grids draw.
        readings: the layers' measured layouts (:func:`fm_lightning.probing.measure_layouts`);
            those missing are measured on the first batch.

    Returns:
        ``({layer: result}, {layer: why it has no examples})``.
    """
    k = min(k, len(images))  # no more slots than inputs
    stream = ExampleStream(
        model,
        modules,
        k=k,
        max_channels=max_channels,
        channels=channels,
        readings=dict(readings or {}),
    )
    with eval_mode(model), torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size]  # (B, C, H, W)
            with stream.batch(x, torch.arange(start, start + len(x))):
                model(x)
    return {layer: topk.result() for layer, topk in stream.topk.items()}, dict(stream.errors)


def _cam_layer(model: nn.Module, args: argparse.Namespace) -> tuple[str, nn.Module] | None:
    """``--cam-layer``'s ``(name, module)`` in ``model``, or None for torchcam's choice."""
    try:
        return resolve_cam_layer(model, args.cam_layer, "--cam-layer")
    except ValueError as err:
        raise _cam_error(args, err) from None


def _cam_error(args: argparse.Namespace, err: ValueError) -> VisualizeError:
    at = f" at --cam-layer {args.cam_layer}" if args.cam_layer else ""
    return VisualizeError(
        f"--cam {args.cam}{at}: {err}. Pass a --cam-layer with (N, C, h, w) maps, "
        "such as a conv layer or block."
    )


def _predictions(logits: Tensor) -> str:
    probs = logits.softmax(dim=1)
    conf, pred = probs.max(dim=1)
    return " ".join(f"{p} ({c:.0%})" for p, c in zip(pred.tolist(), conf.tolist(), strict=True))


# -----------------------------------------------------------------------------
# Command line


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one ``error: ...`` line (no usage block), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m fm_lightning.visualize",
        description=(
            "Draw what a network's layers see for chosen inputs, as FeatureMapCallback does\n"
            "during training: for a trained checkpoint (--ckpt), a freshly initialised network\n"
            "(--untrained), or both side by side (--ckpt PATH --compare); optionally each\n"
            "channel's top MNIST test inputs (--examples K) and class-activation maps (--cam).\n"
            "The network is rebuilt from its run's config.yaml (any --model.net of train.py),\n"
            "or is SimpleCNN when there is none. Writes PNGs and an index.html gallery to --out;\n"
            "errors print one 'error: ...' line and exit with status 2."
        ),
        epilog=(
            "examples:\n"
            "  python -m fm_lightning.visualize --ckpt logs/mnist/version_0/checkpoints/last.ckpt "
            "--mnist-index 0 1 2 3\n"
            "  python -m fm_lightning.visualize --ckpt last.ckpt --image digit.png --resize "
            "--invert\n"
            "  python -m fm_lightning.visualize --untrained --mnist-index 7 --layers 'conv*'\n"
            "  python -m fm_lightning.visualize --ckpt last.ckpt --mnist-index 0 1 --compare\n"
            "  python -m fm_lightning.visualize --ckpt last.ckpt --mnist-index 0 1 2 3 "
            "--examples 9 --cam GradCAM --cam-layer relu2"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--ckpt",
        metavar="PATH",
        help="checkpoint from `python train.py` (logs/<name>/version_<N>/checkpoints/*.ckpt) or "
        "the network's state_dict; loaded weights-only, so no code in it ever runs",
    )
    model.add_argument(
        "--config",
        metavar="PATH",
        help=f"the run's {CONFIG_FILE}, whose model: section (class paths, any --model.net) "
        "builds the network; default: the one in the checkpoint's run directory "
        f"(logs/<name>/version_<N>/{CONFIG_FILE}), else SimpleCNN. With --untrained: draw that "
        "network freshly initialised",
    )
    model.add_argument(
        "--untrained",
        action="store_true",
        help="draw a freshly initialised network (SimpleCNN, or --config's) instead of a "
        "checkpoint (seeded by --seed)",
    )
    model.add_argument(
        "--compare",
        action="store_true",
        help="with --ckpt: draw untrained and trained maps for the same inputs, and write "
        "compare_<layer>.png with the two grids side by side",
    )
    model.add_argument(
        "--seed",
        type=_int_in(0, MAX_SEED),
        default=0,
        help=f"seed of the untrained network, 0 to {MAX_SEED} (default: 0)",
    )

    inputs = parser.add_argument_group("inputs (one of)")
    which = inputs.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--image",
        nargs="+",
        metavar="FILE",
        help="image files (28x28 grayscale, light digit on black, like MNIST: the input of "
        "networks trained by train.py); other colour modes "
        "are converted with a note, other sizes refused unless --resize",
    )
    which.add_argument(
        "--mnist-index",
        nargs="+",
        type=int,
        metavar="I",
        help="indices into the official MNIST test set (0-9999), fetched into --data-dir if absent",
    )
    inputs.add_argument(
        "--data-dir", default="data", help="MNIST root for --mnist-index (default: data)"
    )
    inputs.add_argument(
        "--resize",
        action="store_true",
        help="scale images of another size to fit 28x28 (antialiased, aspect ratio kept, padded "
        "with the border colour) instead of refusing them",
    )
    inputs.add_argument(
        "--invert",
        action="store_true",
        help="invert --image files (255 - pixel), for dark digits drawn on a light background",
    )

    drawing = parser.add_argument_group("drawing (defaults: as FeatureMapCallback)")
    drawing.add_argument(
        "--layers",
        nargs="+",
        metavar="NAME",
        help="layers, names or glob patterns as FeatureMapCallback takes them: SimpleCNN's are "
        "conv1, relu1, pool, conv2, relu2, fc1, fc2, fc3; 'conv*', 'layer1.*' (default: the layers "
        "of the run's FeatureMapCallback in its config.yaml, else conv1 conv2)",
    )
    drawing.add_argument(
        "--max-channels",
        type=_int_in(1, MAX_CHANNELS),
        default=32,
        help=f"channels (columns) per grid, 1 to {MAX_CHANNELS} (default: 32)",
    )
    drawing.add_argument(
        "--normalize",
        choices=rendering.NORMALIZE_MODES,
        default="channel",
        help="channel: each map to its own range; layer: one range per image (default: channel)",
    )
    drawing.add_argument(
        "--cmap", type=_colormap, default="viridis", help="matplotlib colormap (default: viridis)"
    )
    drawing.add_argument(
        "--order",
        choices=rendering.ORDERS,
        default="index",
        help="index: the first channels; activation: the most active first (default: index)",
    )
    extra = parser.add_argument_group("what each channel responds to, where the model looks")
    extra.add_argument(
        "--examples",
        type=_int_in(1, MAX_EXAMPLES),
        metavar="K",
        help=f"also draw each drawn channel's top K (1 to {MAX_EXAMPLES}) inputs of the MNIST "
        "test set (10,000 images, "
        "from --data-dir), cropped to its receptive field, as FeatureMapCallback(examples=K) "
        "does over validation: <layer>/examples/trained.png",
    )
    extra.add_argument(
        "--cam",
        type=_cam_method,
        metavar="METHOD",
        help=f"also draw class-activation maps of the inputs (torchcam: {', '.join(CAM_METHODS)}) "
        "for the predicted class and, for --mnist-index, the true one: cam/trained.png",
    )
    extra.add_argument(
        "--cam-layer",
        metavar="NAME",
        help="the layer --cam takes its maps at, a name or pattern matching one module (default: "
        "the run's cam_layer in its config.yaml, else torchcam's choice, the last layer with "
        "spatial maps)",
    )
    parser.add_argument(
        "--out",
        default="logs/visualize",
        metavar="DIR",
        help="output directory (default: logs/visualize)",
    )
    return parser


def _int_in(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high], else one error line naming the bounds."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected an integer in [{low}, {high}], got {text}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its messages
    return parse


def _cam_method(name: str) -> str:
    try:
        return check_cam_method(name)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _colormap(name: str) -> str:
    try:
        return rendering.check_cmap(name)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (0, or 2 for a user error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.untrained and (args.ckpt or args.compare):
        parser.error(
            "--untrained draws a fresh network and takes no --ckpt; "
            "to draw both, pass --ckpt PATH --compare"
        )
    if args.compare and not args.ckpt:
        parser.error("--compare needs --ckpt PATH: the trained side of the comparison")
    if not (args.ckpt or args.untrained):
        parser.error("pass --ckpt PATH (a trained checkpoint) or --untrained")
    if args.cam_layer is not None and args.cam is None:
        parser.error("--cam-layer needs --cam METHOD, e.g. --cam GradCAM")
    try:
        run(args)
    except (CheckpointError, VisualizeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


@dataclasses.dataclass
class _Networks:
    """The networks to draw, by variant ("untrained" first), and what they are."""

    variants: dict[str, nn.Module]
    what: str  # e.g. "SimpleCNN", "ImageClassifier(net=...) from logs/.../config.yaml"
    mean: float  # the inputs' normalisation, as in training
    std: float
    config: RunConfig | None


def _networks(args: argparse.Namespace) -> _Networks:
    """Builds (from the run's config.yaml, or SimpleCNN) and loads the networks to draw."""
    config_path = args.config or (find_config(args.ckpt) if args.ckpt else None)
    config = read_config(config_path) if config_path else None
    variants: dict[str, nn.Module] = {}
    mean, std = MNIST_MEAN, MNIST_STD
    if config is None:
        what, ckpt = "SimpleCNN", {}
        if args.ckpt:
            trained, ckpt = load_checkpoint(args.ckpt)
            if args.compare:
                variants["untrained"] = untrained_model(args.seed, trained.fc3.out_features)
            variants["trained"] = trained
        else:
            variants["untrained"] = untrained_model(args.seed)
    else:
        model, data = model_from_config(config, seed=args.seed if not args.ckpt else None)
        what, ckpt = describe_model(model, config), {}
        mean, std = float(data.hparams.mean), float(data.hparams.std)
        if args.ckpt:
            trained, ckpt = load_checkpoint(args.ckpt, model, built_from=what)
            if args.compare:
                variants["untrained"] = model_from_config(config, seed=args.seed)[0]
            variants["trained"] = trained
        else:
            variants["untrained"] = model
        check_takes_mnist(model, what)
    hp = ckpt.get("datamodule_hyper_parameters")  # the data module's arguments, when recorded
    if (
        isinstance(hp, Mapping)
        and all(
            isinstance(hp.get(k), (int, float)) and not isinstance(hp.get(k), bool)
            for k in ("mean", "std")
        )
        and hp["std"] > 0
    ):
        mean, std = float(hp["mean"]), float(hp["std"])
    return _Networks(variants, what, mean, std, config)


def run(args: argparse.Namespace) -> None:
    """Does the work of :func:`main` with parsed, consistent arguments."""
    nets = _networks(args)
    run_config = nets.config
    args.layers = args.layers or (run_config and run_config.layers) or ["conv1", "conv2"]
    if args.cam and args.cam_layer is None and run_config is not None:
        args.cam_layer = run_config.cam_layer
    model = next(iter(nets.variants.values()))
    try:  # fail on a bad layer name before drawing anything
        resolve_layers(model, args.layers)
    except ValueError as err:
        raise VisualizeError(str(err)) from None
    try:  # and on a damaged stats.json in --out, which the gallery page would read
        load_stats(Path(args.out) / STATS_FILE)
    except OSError:
        pass  # an --out that cannot be read cannot be written either: reported when writing
    except ValueError as err:
        raise VisualizeError(
            f"{err}. --out is a gallery directory with a damaged stats file: delete or rename "
            "it, or pass another --out."
        ) from None

    targets = None
    if args.image:
        pixels = [load_image(p, resize=args.resize, invert=args.invert) for p in args.image]
        images = torch.from_numpy(np.stack(pixels)).unsqueeze(1)  # (N, 1, 28, 28) uint8
        names = [Path(p).name for p in args.image]
    else:
        images, labels = load_mnist_test(args.data_dir, args.mnist_index)
        names = [f"#{i} (label {y})" for i, y in zip(args.mnist_index, labels, strict=True)]
        targets = torch.tensor(labels)  # (N,) true classes, for the CAM's second column
    normalize = MNISTDataModule(args.data_dir, mean=nets.mean, std=nets.std).normalize
    x = normalize(images)  # (N, 1, 28, 28) float32, as in training
    # (10000, 1, 28, 28) float32 (31 MB): the inputs --examples ranks
    test_x = normalize(mnist_test_set(args.data_dir)[0]) if args.examples else None

    pictures, lines, captions = _draw(args, nets, x, targets, test_x)
    source = "MNIST test " + ", ".join(names) if args.mnist_index else ", ".join(names)
    out = Path(args.out)
    try:
        what = _labels(args)
        title = f"Feature maps: {' vs '.join(what[v] for v in nets.variants)}; inputs: {source}"
        written, index = _write(pictures, out, title, captions)
    except OSError as err:
        raise VisualizeError(f"cannot write to {out}: {err}") from None

    print(f"model:   {nets.what}")
    print(f"inputs:  {source}")
    for line in lines:
        print(line)
    print(f"wrote {len(written)} images to {out}/:")
    for path in written:
        print(f"  {path.relative_to(out)}")
    print(f"open:    {index}")


def _labels(args: argparse.Namespace) -> dict[str, str]:
    trained = f"trained ({Path(args.ckpt).name})" if args.ckpt else ""
    return {"untrained": f"untrained (seed {args.seed})", "trained": trained}


def _draw(
    args: argparse.Namespace,
    nets: _Networks,
    x: Tensor,
    targets: Tensor | None,
    test_x: Tensor | None,
) -> tuple[dict[str, np.ndarray], list[str], dict[str, dict[str, str]]]:
    """Every picture, by its path under --out, the lines that tell what they show, and the
    gallery's captions (``{variant: {folder: text}}``, as ``write_index`` takes them).

    Everything is drawn before anything is written, so a user error (a CAM layer without
    spatial maps, say) leaves --out as it was; the CAM is drawn before the examples' sweep.
    """
    pictures = {PROBE_FILE: rendering.image_grid(x).numpy()}
    lines: list[str] = []
    captions: dict[str, dict[str, str]] = {}
    what = _labels(args)
    grids: dict[str, dict[str, np.ndarray]] = {}  # layer -> variant -> grid
    folders: dict[str, str] = {}  # layer -> its own folder under --out
    for variant, model in nets.variants.items():
        caption_of = captions.setdefault(variant, {})
        modules = resolve_layers(model, args.layers)
        cam_layer = _cam_layer(model, args) if args.cam else None
        # One measuring pass for every layer read here: the maps', the CAM's and the examples'.
        readings = measure_layouts(model, x, dict([*modules.items(), *filter(None, [cam_layer])]))
        captured, logits = capture(
            model,
            x,
            modules,
            max_channels=args.max_channels,
            order=args.order,
            readings=readings,
            stats=False,
        )
        folders = distinct_path_parts([*folders, *captured, *modules], RESERVED_NAMES)
        lines.append(f"{what[variant]} predicts: {_predictions(logits)}")
        maps_kind = MapsKind(args.max_channels, args.normalize, args.cmap, args.order)
        for layer, cap in captured.items():
            if cap.error is not None:
                note(f"{layer} is not drawn: {cap.error}")
                continue
            grid = maps_kind.grid(cap).numpy()
            grids.setdefault(layer, {})[variant] = grid
            pictures[f"{folders[layer]}/{variant}.png"] = grid
            caption_of[folders[layer]] = f"{what[variant]}: {maps_caption(cap)}"
        if args.cam:
            reading = None if cam_layer is None else readings.get(cam_layer[0])
            try:
                grid, caption, _ = cam_picture(
                    model, x, args.cam, cam_layer, reading, targets, cmap=args.cmap
                )
            except ValueError as err:
                raise _cam_error(args, err) from None
            pictures[f"{CAM_DIR}/{variant}.png"] = grid.numpy()
            lines.append(f"{what[variant]} {caption}")
            caption_of[CAM_DIR] = f"{what[variant]}: {caption}"
        if test_x is not None:
            # The channels the grids draw, as the callback keeps examples for its maps' channels.
            drawn = {key: c.channels for key, c in captured.items() if c.channels is not None}
            results, errors = top_examples(
                model, modules, test_x, args.examples, args.max_channels, drawn, readings
            )
            for layer, error in errors.items():
                note(f"{layer} has no examples: {error}")
            for layer, result in results.items():
                path = f"{folders[layer]}/{EXAMPLES_DIR}/{variant}.png"
                pictures[path] = examples_grid(result, cmap=args.cmap).numpy()
                dead = result.dead.nonzero().flatten().tolist()
                text = examples_caption(result, "MNIST test", dead)
                lines.append(f"{what[variant]} {layer}: {text}")
                caption_of[f"{folders[layer]}/{EXAMPLES_DIR}"] = f"{what[variant]}: {text}"
    if args.compare:
        for layer, by_variant in grids.items():
            panels = [(f"{layer}: {what[v]}", by_variant[v]) for v in ("untrained", "trained")]
            pictures[f"compare_{folders[layer]}.png"] = side_by_side(panels)
    return pictures, lines, captions


def _write(
    pictures: dict[str, np.ndarray],
    out: Path,
    title: str,
    captions: dict[str, dict[str, str]],
) -> tuple[list[Path], Path]:
    """Writes the pictures and the gallery page; returns the PNGs written and the page."""
    pics = [Picture(rel, rel, torch.as_tensor(img)) for rel, img in pictures.items()]
    written = save_pictures(out, pics)
    # A frame this run did not draw (an earlier --compare's untrained side, an earlier
    # checkpoint's examples or CAM) would show in the gallery as if it belonged to this one.
    drawn = {rel.split("/", 1)[0] for rel in pictures if "/" in rel}
    for folder in drawn:
        for sub in ("", f"{EXAMPLES_DIR}/"):
            for stale in ("untrained", "trained"):
                if f"{folder}/{sub}{stale}.png" not in pictures:
                    (out / folder / f"{sub}{stale}.png").unlink(missing_ok=True)
    others = sorted(p.name for p in out.iterdir() if p.is_dir() and p.name not in drawn)
    if others:
        note(f"{out} also holds {', '.join(others)} from before; the gallery shows them too")
    return written, write_index(out, title=title, captions=captions)


if __name__ == "__main__":
    sys.exit(main())
