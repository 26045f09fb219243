"""A self-contained HTML gallery and per-layer GIFs for a directory of feature-map PNGs.

    append_stats("logs/mnist/version_0/feature_maps", epoch=3, stats={"conv1": {"mean": 0.1, ...}})
    write_index("logs/mnist/version_0/feature_maps", title="mnist/version_0")   # -> index.html
    write_gifs("logs/mnist/version_0/feature_maps")          # -> <layer>/evolution.gif per layer

Open ``index.html`` straight from disk: it needs no server and loads nothing from the network
(inline CSS and JS, images by relative path). It shows the probe inputs, one row per layer with the
frame of the selected epoch and a small plot of the layer's activation statistics, an epoch slider
(left/right arrow keys move it too) and a play button.

The directory this reads, as :class:`~fm_lightning.FeatureMapCallback` writes it::

    <root>/probe_inputs.png                 optional: the probe images in one row
    <root>/<layer>/epoch=000.png            feature maps, one PNG per captured epoch (other
                                            stems, e.g. trained.png, too)
    <root>/<layer>/examples/epoch=000.png   optional: the layer's top-k examples, shown under
                                            its maps and moving with the same slider
    <root>/cam/epoch=000.png                optional: class-activation overlays, a row of its own
    <root>/<layer>/step=000120.png          a frame of a fit whose validations are step-based,
                                            named by its global step (examples and cam too)
    <root>/similarity/epoch=000.png         optional: the layer x layer CKA heatmap, in the
                                            similarity panel (epoch=000.pt beside it is data)
    <root>/stats.json                       optional: written by append_stats

Every directory holding a ``*.png`` (or an ``examples/`` folder of them) is a row; ``cam`` is
last; ``similarity`` is not a row but the similarity panel, after them. Frames are ordered
``untrained`` first, then ``epoch=N`` by N, then any other stem alphabetically; the slider steps
through the union of all rows' (and heatmaps') frames, and a row without a frame at some step
shows its nearest earlier one (maps, examples and heatmap each).

``stats.json`` (strict JSON; a non-finite statistic is stored as ``null``)::

    {"format": 1,
     "layers": ["conv1", "conv2"],                      # in the order first captured
     "history": [{"epoch": 0,
                  "stats": {"conv1": {"mean": 0.1, "std": 1.2, ...}, ...},
                  "captions": {"conv1": "...", "conv1/examples": "...", "cam": "..."},  # optional
                  "dead": {"conv1": {"3": 0, "7": 2}},  # optional: channel -> dead since epoch
                  "similarity": {"conv1": {"to_previous": 0.98, "to_first": null}}},  # optional
                 ...]}

Layer rows follow ``layers`` there, then any other layer by directory name. A caption is shown
under the image it names, for the epoch of the frame shown; a layer's dead channels (with the
epoch each has been dead since) are listed in its row for the epoch selected. The similarity panel
(when an entry has ``similarity`` or ``similarity/*.png`` exist) plots each layer's linear CKA
with the previous and the first captured frame, one line per layer, "n/a" where a value is null
(a constant layer, or no earlier frame), and shows the heatmap of the frame selected. Every file is
written atomically (:func:`fm_lightning.files.atomic_write`), so a browser reloading the page
mid-run, or a crash, never meets a half-written file. The page's HTML, CSS and JS are package
files (``fm_lightning/assets/gallery.*``), inlined into each ``index.html``.

Why over 500 lines: ``stats.json`` is read back from disk every capture (a resumed run, the
visualizer writing into a run's directory), so each of its fields is checked here with an error
that says which; the page, the frames' order and the GIFs are the rest.
"""

from __future__ import annotations

import functools
import html
import io
import json
import math
import os
import re
import string
import warnings
from collections.abc import Mapping
from datetime import datetime
from importlib import resources
from pathlib import Path
from urllib.parse import quote

from PIL import Image, ImageDraw, ImageFont

from fm_lightning.files import atomic_write

__all__ = ["append_stats", "load_stats", "write_gifs", "write_index"]

STATS_FILE = "stats.json"
INDEX_FILE = "index.html"
GIF_NAME = "evolution.gif"
PROBE_FILE = "probe_inputs.png"
EXAMPLES_DIR = "examples"  # <root>/<layer>/examples/epoch=NNN.png
CAM_DIR = "cam"  # <root>/cam/epoch=NNN.png: a row of its own, after the layers
SIMILARITY_DIR = "similarity"  # <root>/similarity/epoch=NNN.{png,pt}: the similarity panel's
SIMILARITY_SERIES = ("to_previous", "to_first")  # what the panel plots, per layer
# Names under <root> that are not layers' folders: a layer whose folder would be one of them
# gets another (fm_lightning.files.distinct_path_parts).
RESERVED_NAMES = (CAM_DIR, SIMILARITY_DIR, STATS_FILE, INDEX_FILE, PROBE_FILE)
_STATS_FORMAT = 1
_EPOCH_STEM = re.compile(r"epoch=(\d+)")
_FRAME_STEM = re.compile(r"(epoch|step)=(\d+)")  # step=N: a frame of a step-based fit
# GIF frames are padded to a common size with white, the colour of the grids' separators.
_GIF_BACKGROUND = (255, 255, 255)
_GIF_LABEL_PX = 14


def append_stats(
    root: str | os.PathLike,
    epoch: int,
    stats: dict[str, dict[str, float]],
    captions: Mapping[str, str] | None = None,
    dead: Mapping[str, Mapping[int, int]] | None = None,
    step: int | None = None,
    similarity: Mapping[str, Mapping[str, float | None]] | None = None,
) -> Path:
    """Merge one capture's per-layer statistics into ``root/stats.json``, atomically.

    Args:
        root: The feature-map directory; created if missing.
        epoch: The epoch captured. A second capture of the same epoch (a resumed run) replaces
            the first.
        stats: ``{layer: {"mean": .., "std": .., "frac_zero": .., "dead_channels_probe": ..}}``,
            as :func:`fm_lightning.rendering.activation_stats` returns per layer (the callback
            adds ``dead_channels_val``, over the whole validation set, with examples on). Layer
            names should be the layers' directory names, so the page can pair them with images.
        captions: optional text shown under this epoch's images, keyed by what they caption:
            ``"<layer>"`` (its maps), ``"<layer>/examples"``, ``"cam"``.
        dead: optional ``{layer: {channel: epoch it has been dead since}}`` for this epoch
            (e.g. :attr:`fm_lightning.pictures.examples.DeadChannels.since`); an empty dict records
            that no channel is dead.

    Returns:
        The path of ``stats.json``.

    Raises:
        ValueError: If ``epoch`` is not an int >= 0, a caption is not a string, a dead entry
            is not ``channel >= 0 -> epoch >= 0`` ints, or ``stats.json`` exists but is not one
            this module wrote.
        step: the capture's step, for a fit whose validations are step-based (its frames are
            ``step=N.png``): the entry is the frame's, and replaces one of the same step.
        similarity: optional ``{layer: {"to_previous": v, "to_first": v}}``, linear CKA of the
            layer with itself at the previous and the first captured frame (v None, or a
            non-finite number, where there is none), stored as the entry's ``"similarity"``.
    """
    if not _is_count(epoch):
        raise ValueError(f"expected epoch to be an int >= 0, got {epoch!r}")
    if step is not None and not _is_count(step):
        raise ValueError(f"expected step to be an int >= 0 or None, got {step!r}")
    captions = dict(captions or {})
    for key, text in captions.items():
        if not isinstance(key, str) or not isinstance(text, str):
            raise ValueError(f"expected captions as {{str: str}}, got {key!r}: {text!r}")
    dead_entry = {}
    for layer, channels in (dead or {}).items():
        if not isinstance(channels, Mapping) or not all(
            _is_count(c) and _is_count(e) for c, e in channels.items()
        ):
            raise ValueError(
                f"expected dead[{layer!r}] as {{channel: since epoch}} ints >= 0, got {channels!r}"
            )
        dead_entry[layer] = {str(c): e for c, e in sorted(channels.items())}
    similarity_entry = {}
    for layer, values in (similarity or {}).items():
        if not isinstance(values, Mapping) or not all(
            isinstance(k, str) and (v is None or _is_number(v)) for k, v in values.items()
        ):
            raise ValueError(
                f"expected similarity[{layer!r}] as {{name: number or None}}, got {values!r:.80}"
            )
        similarity_entry[layer] = {
            k: None if v is None else _finite_or_none(v) for k, v in values.items()
        }
    path = Path(root) / STATS_FILE
    data = _read_stats(path)
    for layer in stats:
        if layer not in data["layers"]:
            data["layers"].append(layer)
    entry = {
        "epoch": epoch,
        "stats": {
            layer: {name: _finite_or_none(value) for name, value in values.items()}
            for layer, values in stats.items()
        },
    }
    if step is not None:
        entry["step"] = step
    if captions:
        entry["captions"] = captions
    if dead_entry:
        entry["dead"] = dead_entry
    if similarity_entry:
        entry["similarity"] = similarity_entry
    key = _entry_key(entry)
    history = [h for h in data["history"] if _entry_key(h) != key] + [entry]
    data["history"] = sorted(history, key=lambda h: (h["epoch"], h.get("step", -1)))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        f.write(json.dumps(data, indent=1, allow_nan=False).encode())
    return path


def write_index(
    root: str | os.PathLike,
    title: str = "Feature maps",
    captions: Mapping[str, Mapping[str, str]] | None = None,
) -> Path:
    """Scan ``root`` (see the module docstring) and write ``root/index.html`` atomically.

    Args:
        root: The feature-map directory; must exist.
        title: Page title, e.g. the run name; shown as text, never interpreted as HTML.
        captions: Captions of frames that are not epochs (``stats.json`` holds the epochs'),
            ``{stem: {key: text}}`` with keys as in :func:`append_stats`, e.g.
            ``{"trained": {"conv1": "...", "cam": "..."}}`` for ``conv1/trained.png``.

    Returns:
        The path of ``index.html``.
    """
    root = Path(root)
    stats = _read_stats(root / STATS_FILE)
    layers = _layers(root, stats["layers"])
    heatmaps = _frames(root / SIMILARITY_DIR)
    stems = sorted(
        {stem for row in layers.values() for frames in row for stem in frames} | set(heatmaps),
        key=_frame_order,
    )
    history = {_entry_key(h): h for h in stats["history"]}
    steps = [{"label": _frame_label(stem), "epoch": _frame_epoch(stem)} for stem in stems]
    frame_keys = [_frame_key(stem) for stem in stems]

    def at(i: int | None, *keys: str):
        """history[frame of step i][keys...], or None."""
        value = history.get(frame_keys[i]) if i is not None else None
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    def caption(i: int | None, key: str) -> str | None:
        """The caption of ``key``'s frame at step i: recorded for its epoch, or given."""
        if i is None:
            return None
        return at(i, "captions", key) or (captions or {}).get(stems[i], {}).get(key)

    rows = []
    for name, (frames, examples) in layers.items():
        srcs, sources = _track(stems, frames, name)
        series: dict[str, list[float | None]] = {}
        for i in range(len(steps)):
            for stat, value in (at(i, "stats", name) or {}).items():
                series.setdefault(stat, [None] * len(steps))[i] = value
        row = {
            "name": name,
            "src": srcs,
            "from": sources,
            "caption": [caption(f, name) for f in sources],
            "stats": series,
            # [[channel, since epoch], ...] by channel, or None where the epoch has no record
            "dead": [
                None if (d := at(i, "dead", name)) is None else [[int(c), e] for c, e in d.items()]
                for i in range(len(steps))
            ],
            "examples": None,
            "cam": name == CAM_DIR,  # drawn at its own size, its caption beside it
        }
        if examples:
            ex_srcs, ex_sources = _track(stems, examples, name, EXAMPLES_DIR)
            key = f"{name}/{EXAMPLES_DIR}"
            row["examples"] = {
                "src": ex_srcs,
                "from": ex_sources,
                "caption": [caption(f, key) for f in ex_sources],
            }
        rows.append(row)

    manifest = {"steps": steps, "layers": rows, "similarity": None}
    measured = _similarity_layers(stats)
    if measured or heatmaps:
        srcs, sources = _track(stems, heatmaps, SIMILARITY_DIR)
        manifest["similarity"] = {
            "layers": measured,
            # {"to_previous": {layer: [value per step]}, "to_first": ...}, None where unknown
            "series": {
                key: {
                    layer: [at(i, "similarity", layer, key) for i in range(len(steps))]
                    for layer in measured
                }
                for key in SIMILARITY_SERIES
            },
            "src": srcs,
            "from": sources,
            "caption": [caption(f, SIMILARITY_DIR) for f in sources],
        }
    # JSON inside <script>: escaping <, > and & keeps any name from closing the element.
    data = json.dumps(manifest, allow_nan=False)
    data = data.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    probe = ""
    if (root / PROBE_FILE).is_file():
        # The visualizer's frames are networks (untrained, trained), not epochs.
        every = "epoch" if all(s["epoch"] is not None for s in steps) else "picture"
        probe = (
            f'<figure class="probe"><img id="probe" src="{quote(PROBE_FILE)}" alt="probe inputs">'
            f"<figcaption>probe inputs, in the order of the pictures' rows; the same in every "
            f"{every}</figcaption></figure>"
        )
    page = _page().substitute(
        title=html.escape(title),
        probe=probe,
        manifest=data,
        style=_asset("gallery.css"),
        script=_asset("gallery.js"),
    )
    path = root / INDEX_FILE
    with atomic_write(path) as f:
        f.write(page.encode())
    return path


def write_gifs(root: str | os.PathLike, duration_ms: int = 600) -> dict[str, Path]:
    """Write one animated GIF per row (layers, ``cam``) from its ``epoch=*.png`` frames.

    The frames of a layer's ``examples/`` folder are not animated.

    Each frame gets an "epoch N" caption above it, and frames of different sizes are padded with
    white to a common size. Layers with fewer than two epoch frames get no GIF.

    Args:
        root: The feature-map directory.
        duration_ms: How long each frame is shown.

    Returns:
        ``{layer: path}`` of the GIFs written (``root/<layer>/evolution.gif``), in page order.
    """
    if duration_ms < 1:
        raise ValueError(f"expected duration_ms >= 1, got {duration_ms}")
    root = Path(root)
    font = ImageFont.load_default(size=_GIF_LABEL_PX - 2)
    written = {}
    for name, (frames, _) in _layers(root, _read_stats(root / STATS_FILE)["layers"]).items():
        epochs = {s: p for s, p in frames.items() if _frame_key(s) is not None}
        if len(epochs) < 2:
            continue
        images = []
        for path in epochs.values():
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        width = max(im.width for im in images)
        height = max(im.height for im in images)
        labelled = []
        for stem, im in zip(epochs, images, strict=True):
            frame = Image.new("RGB", (width, height + _GIF_LABEL_PX), _GIF_BACKGROUND)
            frame.paste(im, (0, _GIF_LABEL_PX))
            ImageDraw.Draw(frame).text((2, 0), _frame_label(stem), fill=(0, 0, 0), font=font)
            labelled.append(frame)
        buf = io.BytesIO()
        labelled[0].save(
            buf,
            format="GIF",
            save_all=True,
            append_images=labelled[1:],
            loop=0,
            duration=duration_ms,
        )
        written[name] = root / name / GIF_NAME
        with atomic_write(written[name]) as f:
            f.write(buf.getvalue())
    return written


def load_stats(path: str | os.PathLike) -> dict:
    """The contents of a ``stats.json`` (see the module docstring), checked; empty if missing.

    Raises:
        ValueError: The file is not valid JSON or not in this module's format; the message
            names the file and what is wrong.
    """
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {"format": _STATS_FORMAT, "layers": [], "history": []}
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(data, dict) or data.get("format") != _STATS_FORMAT:
        raise ValueError(f"expected {path} to be a stats.json of format {_STATS_FORMAT}")
    layers, history = data.get("layers"), data.get("history")
    if not (isinstance(layers, list) and all(isinstance(name, str) for name in layers)):
        raise ValueError(f"expected {path} to hold a list of layer names, got {layers!r:.80}")
    for entry in history if isinstance(history, list) else [history]:
        epoch = entry.get("epoch") if isinstance(entry, dict) else None
        by_layer = entry.get("stats") if isinstance(entry, dict) else None
        if not (
            isinstance(epoch, int)
            and not isinstance(epoch, bool)
            and isinstance(by_layer, dict)
            and all(
                isinstance(values, dict)
                and all(v is None or isinstance(v, int | float) for v in values.values())
                for values in by_layer.values()
            )
        ):
            raise ValueError(
                f'expected {path} to hold a history of {{"epoch": int, "stats": {{layer: '
                f"{{name: number}}}}}}, got {entry!r:.80}"
            )
        similarity = entry.get("similarity", {})
        if not (
            isinstance(similarity, dict)
            and all(
                isinstance(values, dict)
                and all(v is None or _is_number(v) for v in values.values())
                for values in similarity.values()
            )
        ):
            raise ValueError(
                f"expected {path}'s similarity entries as {{layer: {{name: number or null}}}}, "
                f"got {similarity!r:.80}"
            )
    return data


def _read_stats(path: Path) -> dict:
    """:func:`load_stats`, but a damaged file is moved aside with a warning and an empty history
    is returned, so a run's gallery keeps updating."""
    try:
        return load_stats(path)
    except ValueError as err:
        # to the microsecond: a second damaged file must not replace the first one set aside
        aside = path.with_name(f"{path.name}.corrupt-{datetime.now():%Y%m%d-%H%M%S.%f}")
        os.replace(path, aside)
        warnings.warn(
            f"{err}. Moved it to {aside} and started a new {path.name}; the gallery's plots "
            "show the statistics captured from now on.",
            stacklevel=3,
        )
        return load_stats(path)  # moved away: an empty history


def _similarity_layers(stats: dict) -> list[str]:
    """The layers with a similarity value in any entry: in the recorded order, then by name."""
    names = {layer for h in stats["history"] for layer in h.get("similarity") or {}}
    rank = {name: i for i, name in enumerate(stats["layers"])}
    return sorted(names, key=lambda name: (rank.get(name, len(rank)), name))


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _finite_or_none(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _layers(root: Path, order: list[str]) -> dict[str, tuple[dict[str, Path], dict[str, Path]]]:
    """``{row: (its frames, its examples' frames)}``: the recorded order, then by name, cam last."""
    layers = {}
    for p in sorted(root.iterdir()):
        if p.is_dir() and not p.name.startswith(".") and p.name != SIMILARITY_DIR:
            frames, examples = _frames(p), _frames(p / EXAMPLES_DIR)
            if frames or examples:
                layers[p.name] = (frames, examples)
    rank = {name: i for i, name in enumerate(order)}
    # sorted() is stable, so layers missing from the recorded order stay sorted by name.
    return dict(
        sorted(layers.items(), key=lambda item: (item[0] == CAM_DIR, rank.get(item[0], len(rank))))
    )


def _track(stems: list[str], frames: dict[str, Path], *folder: str) -> tuple[list, list]:
    """Per step: the URL of the frame shown (this step's or the last before) and its step."""
    srcs: list[str | None] = []
    sources: list[int | None] = []
    for i, stem in enumerate(stems):
        if stem in frames:
            srcs.append(_url(*folder, frames[stem].name))
            sources.append(i)
        else:
            srcs.append(srcs[-1] if srcs else None)
            sources.append(sources[-1] if sources else None)
    return srcs, sources


def _frames(folder: Path) -> dict[str, Path]:
    """``{stem: path}`` of a layer's PNGs in frame order; hidden files are skipped."""
    paths = (p for p in folder.glob("*.png") if not p.name.startswith("."))  # none if no folder
    return {p.stem: p for p in sorted(paths, key=lambda p: _frame_order(p.stem))}


def _frame_epoch(stem: str) -> int | None:
    match = _EPOCH_STEM.fullmatch(stem)
    return int(match.group(1)) if match else None


def _frame_key(stem: str) -> tuple[str, int] | None:
    """``("epoch", N)`` for ``epoch=N``, ``("step", N)`` for ``step=N``, else None."""
    match = _FRAME_STEM.fullmatch(stem)
    return (match.group(1), int(match.group(2))) if match else None


def _entry_key(entry: Mapping) -> tuple[str, int]:
    """The frame a stats.json history entry belongs to (see :func:`_frame_key`)."""
    step = entry.get("step")
    return ("step", step) if isinstance(step, int) else ("epoch", entry["epoch"])


def _frame_order(stem: str) -> tuple[int, int, str]:
    """``untrained`` first, then ``epoch=N`` by N, then ``step=N`` by N, then other stems
    alphabetically."""
    if stem == "untrained":
        return (0, 0, stem)
    key = _frame_key(stem)
    if key is None:
        return (3, 0, stem)
    return (1 if key[0] == "epoch" else 2, key[1], stem)


def _frame_label(stem: str) -> str:
    key = _frame_key(stem)
    return f"{key[0]} {key[1]}" if key is not None else stem


def _url(*parts: str) -> str:
    """A relative URL to root/parts..., every segment percent-encoded (works from file://)."""
    return "/".join(quote(part, safe="") for part in parts)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@functools.cache
def _asset(name: str) -> str:
    """A file of fm_lightning/assets (package data)."""
    return resources.files("fm_lightning").joinpath("assets", name).read_text(encoding="utf-8")


def _page() -> string.Template:
    # string.Template: one substitution pass, so a title (or the CSS and JS, inlined as values)
    # cannot inject the other placeholders.
    return string.Template(_asset("gallery.html"))
