"""A self-contained HTML gallery and per-layer GIFs for a directory of feature-map PNGs.

    append_stats("logs/mnist/version_0/feature_maps", epoch=3, stats={"conv1": {"mean": 0.1, ...}})
    write_index("logs/mnist/version_0/feature_maps", title="mnist/version_0")   # -> index.html
    write_gifs("logs/mnist/version_0/feature_maps")          # -> <layer>/evolution.gif per layer

Open ``index.html`` straight from disk: it needs no server and loads nothing from the network
(inline CSS and JS, images by relative path). It shows the probe inputs, one row per layer with the
frame of the selected epoch and a small plot of the layer's activation statistics, an epoch slider
(left/right arrow keys move it too) and a play button.

The directory this reads, as :class:`~fm_lightning.FeatureMapCallback` writes it::

    <root>/probe_inputs.png          optional: the probe images in one row
    <root>/<layer>/epoch=000.png     one PNG per captured epoch (other stems, e.g. trained.png, too)
    <root>/stats.json                optional: written by append_stats

Every directory holding a ``*.png`` is a layer. Frames are ordered ``untrained`` first, then
``epoch=N`` by N, then any other stem alphabetically; the slider steps through the union of all
layers' frames, and a layer without a frame at some step shows its nearest earlier one.

``stats.json`` (strict JSON; a non-finite statistic is stored as ``null``)::

    {"format": 1,
     "layers": ["conv1", "conv2"],                      # in the order first captured
     "history": [{"epoch": 0, "stats": {"conv1": {"mean": 0.1, "std": 1.2, ...}, ...}}, ...]}

Layer rows follow ``layers`` there, then any other layer by directory name. Every file is written
atomically (:func:`fm_lightning.files.atomic_write`), so a browser reloading the page mid-run, or a
crash, never meets a half-written file.
"""

from __future__ import annotations

import html
import io
import json
import math
import os
import re
import string
import warnings
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

from PIL import Image, ImageDraw, ImageFont

from fm_lightning.files import atomic_write

__all__ = ["append_stats", "load_stats", "write_gifs", "write_index"]

STATS_FILE = "stats.json"
INDEX_FILE = "index.html"
GIF_NAME = "evolution.gif"
PROBE_FILE = "probe_inputs.png"
_STATS_FORMAT = 1
_EPOCH_STEM = re.compile(r"epoch=(\d+)")
# GIF frames are padded to a common size with white, the colour of the grids' separators.
_GIF_BACKGROUND = (255, 255, 255)
_GIF_LABEL_PX = 14


def append_stats(root: str | os.PathLike, epoch: int, stats: dict[str, dict[str, float]]) -> Path:
    """Merge one capture's per-layer statistics into ``root/stats.json``, atomically.

    Args:
        root: The feature-map directory; created if missing.
        epoch: The epoch captured. A second capture of the same epoch (a resumed run) replaces
            the first.
        stats: ``{layer: {"mean": .., "std": .., "frac_zero": .., "dead_channels": ..}}``, as
            :func:`fm_lightning.rendering.activation_stats` returns per layer. Layer names
            should be the layers' directory names, so the page can pair them with the images.

    Returns:
        The path of ``stats.json``.

    Raises:
        ValueError: If ``epoch`` is not an int >= 0, or ``stats.json`` exists but is not one
            this module wrote.
    """
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"expected epoch to be an int >= 0, got {epoch!r}")
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
    history = [h for h in data["history"] if h["epoch"] != epoch] + [entry]
    data["history"] = sorted(history, key=lambda h: h["epoch"])
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        f.write(json.dumps(data, indent=1, allow_nan=False).encode())
    return path


def write_index(root: str | os.PathLike, title: str = "Feature maps") -> Path:
    """Scan ``root`` (see the module docstring) and write ``root/index.html`` atomically.

    Args:
        root: The feature-map directory; must exist.
        title: Page title, e.g. the run name; shown as text, never interpreted as HTML.

    Returns:
        The path of ``index.html``.
    """
    root = Path(root)
    stats = _read_stats(root / STATS_FILE)
    frames = _layers(root, stats["layers"])
    stems = sorted({stem for fs in frames.values() for stem in fs}, key=_frame_order)
    by_epoch = {h["epoch"]: h["stats"] for h in stats["history"]}
    steps = [{"label": _frame_label(stem), "epoch": _frame_epoch(stem)} for stem in stems]

    rows = []
    for name, layer_frames in frames.items():
        srcs: list[str | None] = []
        sources: list[int | None] = []  # step whose frame is shown: this one or the last before
        for i, stem in enumerate(stems):
            if stem in layer_frames:
                srcs.append(_url(name, layer_frames[stem].name))
                sources.append(i)
            else:
                srcs.append(srcs[-1] if srcs else None)
                sources.append(sources[-1] if sources else None)
        series: dict[str, list[float | None]] = {}
        for i, step in enumerate(steps):
            values = by_epoch.get(step["epoch"], {}).get(name, {})
            for stat, value in values.items():
                series.setdefault(stat, [None] * len(steps))[i] = value
        rows.append({"name": name, "src": srcs, "from": sources, "stats": series})

    manifest = {"steps": steps, "layers": rows}
    # JSON inside <script>: escaping <, > and & keeps any name from closing the element.
    data = json.dumps(manifest, allow_nan=False)
    data = data.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    probe = ""
    if (root / PROBE_FILE).is_file():
        probe = (
            f'<figure class="probe"><img id="probe" src="{quote(PROBE_FILE)}" alt="probe inputs">'
            "<figcaption>probe inputs, the same every epoch</figcaption></figure>"
        )
    page = _PAGE.substitute(title=html.escape(title), probe=probe, manifest=data)
    path = root / INDEX_FILE
    with atomic_write(path) as f:
        f.write(page.encode())
    return path


def write_gifs(root: str | os.PathLike, duration_ms: int = 600) -> dict[str, Path]:
    """Write one animated GIF per layer from its ``epoch=*.png`` frames, in epoch order.

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
    for name, frames in _layers(root, _read_stats(root / STATS_FILE)["layers"]).items():
        epochs = {s: p for s, p in frames.items() if _frame_epoch(s) is not None}
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


def _finite_or_none(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _layers(root: Path, order: list[str]) -> dict[str, dict[str, Path]]:
    """``{layer: its frames}`` for root's layers: in the recorded order first, then by name."""
    layers = {
        p.name: frames
        for p in sorted(root.iterdir())
        if p.is_dir() and not p.name.startswith(".") and (frames := _frames(p))
    }
    rank = {name: i for i, name in enumerate(order)}
    # sorted() is stable, so layers missing from the recorded order stay sorted by name.
    return dict(sorted(layers.items(), key=lambda item: rank.get(item[0], len(rank))))


def _frames(folder: Path) -> dict[str, Path]:
    """``{stem: path}`` of a layer's PNGs in frame order; hidden files are skipped."""
    paths = (p for p in folder.glob("*.png") if not p.name.startswith("."))
    return {p.stem: p for p in sorted(paths, key=lambda p: _frame_order(p.stem))}


def _frame_epoch(stem: str) -> int | None:
    match = _EPOCH_STEM.fullmatch(stem)
    return int(match.group(1)) if match else None


def _frame_order(stem: str) -> tuple[int, int, str]:
    """``untrained`` first, then ``epoch=N`` by N, then other stems alphabetically."""
    if stem == "untrained":
        return (0, 0, stem)
    epoch = _frame_epoch(stem)
    return (1, epoch, stem) if epoch is not None else (2, 0, stem)


def _frame_label(stem: str) -> str:
    epoch = _frame_epoch(stem)
    return f"epoch {epoch}" if epoch is not None else stem


def _url(*parts: str) -> str:
    """A relative URL to root/parts..., every segment percent-encoded (works from file://)."""
    return "/".join(quote(part, safe="") for part in parts)


# string.Template: one substitution pass, so a title cannot inject the other placeholders, and
# "$" must not appear in the CSS or JS below.
_PAGE = string.Template(
    """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title</title>
<style>
body{margin:0;font:14px/1.4 system-ui,sans-serif;color:#222;background:#f6f7f9}
header{position:sticky;top:0;z-index:1;background:#fff;border-bottom:1px solid #ddd;
 padding:10px 20px;display:flex;flex-wrap:wrap;align-items:center;gap:8px 20px}
h1{font-size:18px;margin:0;overflow-wrap:anywhere}
.controls{display:flex;align-items:center;gap:10px;flex:1;min-width:260px}
#epoch{flex:1;max-width:480px}
#epoch-label{min-width:7em;font-variant-numeric:tabular-nums;font-weight:600}
button{font:inherit;padding:3px 12px;border:1px solid #bbb;border-radius:4px;background:#fff;
 cursor:pointer}
main{padding:12px 20px;max-width:1400px}
[hidden]{display:none!important}
img{image-rendering:pixelated;max-width:100%;display:block}
figure{margin:0}
figcaption,.note,.empty{color:#666;font-size:12px}
.probe{margin-bottom:12px}
.layer{background:#fff;border:1px solid #e2e4e8;border-radius:6px;padding:10px 14px;margin:0 0 12px}
.layer h2{font:600 14px ui-monospace,monospace;margin:0 0 8px;overflow-wrap:anywhere}
.layer .note{font:12px system-ui,sans-serif;margin-left:8px}
.row{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
.frame{flex:0 1 auto;min-width:0}
.plots{flex:1 1 300px;max-width:640px;display:flex;flex-wrap:wrap;gap:6px 16px}
svg{display:block;font:10px system-ui,sans-serif}
.legend{display:flex;flex-wrap:wrap;gap:2px 12px;font-size:12px;font-variant-numeric:tabular-nums}
.legend i{display:inline-block;width:10px;height:3px;margin-right:4px;vertical-align:middle}
</style>
</head>
<body>
<header>
<h1>$title</h1>
<div class="controls">
<button id="play" type="button">&#9654; play</button>
<input id="epoch" type="range" min="0" max="0" step="1" value="0" aria-label="epoch">
<span id="epoch-label"></span>
</div>
</header>
<main>
$probe
<div id="layers"></div>
</main>
<script type="application/json" id="manifest">$manifest</script>
<script>
(function () {
  "use strict";
  var M = JSON.parse(document.getElementById("manifest").textContent);
  var SVG = "http://www.w3.org/2000/svg";  // a namespace name, never fetched
  var PANELS = [
    {keys: ["mean", "std"], colors: ["#1f77b4", "#ff7f0e"], fraction: false},
    {keys: ["frac_zero", "dead_channels"], colors: ["#2ca02c", "#d62728"], fraction: true}
  ];
  var W = 300, H = 84, L = 40, R = 8, T = 6, B = 18;
  var slider = document.getElementById("epoch");
  var label = document.getElementById("epoch-label");
  var play = document.getElementById("play");
  var last = M.steps.length - 1;
  var views = [];

  function el(tag, attrs, text, ns) {
    var node = ns ? document.createElementNS(SVG, tag) : document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function x(i) { return last > 0 ? L + (W - L - R) * i / last : (L + W - R) / 2; }
  function fmt(v, fraction) {
    if (v === null || v === undefined) return "\\u2013";
    return fraction ? (100 * v).toFixed(1) + "%" : Number(v.toPrecision(3)).toString();
  }
  // Integer zoom, as large as the box allows, so pixelated maps keep square pixels (max-width
  // still shrinks an image wider than the screen). The stats plots wrap below a wide frame.
  function zoom(img, box, most) {
    var w = img.naturalWidth;
    if (!w) return;  // not loaded yet
    img.style.width = w * Math.max(1, Math.min(most, Math.floor(box.clientWidth / w))) + "px";
  }
  function zoomed(img, box, most) {
    img.addEventListener("load", function () { zoom(img, box, most); });
    window.addEventListener("resize", function () { zoom(img, box, most); });
    zoom(img, box, most);
  }

  function panel(stats, spec) {
    var series = spec.keys.filter(function (k) { return stats[k]; });
    if (!series.length) return null;
    var values = [].concat.apply([], series.map(function (k) { return stats[k]; }))
      .filter(function (v) { return v !== null; });
    var lo = spec.fraction ? 0 : Math.min.apply(null, values.concat([0]));
    var hi = spec.fraction ? 1 : Math.max.apply(null, values.concat([0]));
    if (!(hi > lo)) { hi = lo + 1; }
    function y(v) { return T + (H - T - B) * (hi - v) / (hi - lo); }
    var svg = el("svg", {width: W, height: H, viewBox: "0 0 " + W + " " + H}, undefined, true);
    svg.appendChild(el("rect", {x: L, y: T, width: W - L - R, height: H - T - B,
      fill: "#fafbfc", stroke: "#e2e4e8"}, undefined, true));
    [hi, lo].forEach(function (v) {
      svg.appendChild(el("text", {x: L - 4, y: y(v) + 3, "text-anchor": "end", fill: "#666"},
        fmt(v, spec.fraction), true));
    });
    if (!spec.fraction && lo < 0 && hi > 0) {
      svg.appendChild(el("line", {x1: L, x2: W - R, y1: y(0), y2: y(0), stroke: "#ccc",
        "stroke-dasharray": "3 3"}, undefined, true));
    }
    (last > 0 ? [0, last] : [0]).forEach(function (i) {
      var anchor = last === 0 ? "middle" : i ? "end" : "start";
      svg.appendChild(el("text", {x: x(i), y: H - 5, "text-anchor": anchor, fill: "#666"},
        M.steps[i].label, true));
    });
    var cursor = el("line", {y1: T, y2: H - B, stroke: "#888"}, undefined, true);
    svg.appendChild(cursor);
    var legend = el("div", {"class": "legend"});
    var parts = series.map(function (k) {
      var color = spec.colors[spec.keys.indexOf(k)], d = "", pen = "M";
      // A gap (null) breaks the line, so a value between gaps gets a dot of its own.
      stats[k].forEach(function (v, i, all) {
        if (v === null) { pen = "M"; return; }
        d += pen + x(i).toFixed(1) + " " + y(v).toFixed(1) + " ";
        pen = "L";
        if (all[i - 1] == null && all[i + 1] == null) {
          svg.appendChild(el("circle", {cx: x(i), cy: y(v), r: 2, fill: color}, undefined, true));
        }
      });
      svg.appendChild(el("path", {d: d, fill: "none", stroke: color, "stroke-width": 1.5},
        undefined, true));
      var dot = el("circle", {r: 3, fill: color}, undefined, true);
      svg.appendChild(dot);
      var item = el("span");
      item.appendChild(el("i", {style: "background:" + color}));
      item.appendChild(document.createTextNode(k + " "));
      var value = el("b", {}, "");
      item.appendChild(value);
      legend.appendChild(item);
      return {k: k, dot: dot, value: value};
    });
    var box = el("div");
    box.appendChild(svg);
    box.appendChild(legend);
    return {node: box, show: function (i) {
      cursor.setAttribute("x1", x(i));
      cursor.setAttribute("x2", x(i));
      parts.forEach(function (p) {
        var v = stats[p.k][i];
        p.value.textContent = fmt(v, spec.fraction);
        p.dot.setAttribute("visibility", v === null ? "hidden" : "visible");
        if (v !== null) { p.dot.setAttribute("cx", x(i)); p.dot.setAttribute("cy", y(v)); }
      });
    }};
  }

  M.layers.forEach(function (layer) {
    var section = el("section", {"class": "layer"});
    var title = el("h2", {}, layer.name);
    var note = el("span", {"class": "note"});
    title.appendChild(note);
    section.appendChild(title);
    var row = el("div", {"class": "row"});
    var frame = el("div", {"class": "frame"});
    var img = el("img", {alt: layer.name});
    zoomed(img, row, 4);
    var empty = el("div", {"class": "empty"}, "no frame yet");
    frame.appendChild(img);
    frame.appendChild(empty);
    row.appendChild(frame);
    var plots = PANELS.map(function (spec) { return panel(layer.stats, spec); })
      .filter(Boolean);
    if (plots.length) {
      var column = el("div", {"class": "plots"});
      plots.forEach(function (p) { column.appendChild(p.node); });
      row.appendChild(column);
    }
    section.appendChild(row);
    document.getElementById("layers").appendChild(section);
    views.push(function (i) {
      var src = layer.src[i], from = layer.from[i];
      img.hidden = src === null;
      empty.hidden = src !== null;
      if (src !== null && img.getAttribute("src") !== src) img.setAttribute("src", src);
      img.setAttribute("alt", layer.name + ", " + M.steps[i].label);
      note.textContent = from !== null && from !== i ? "showing " + M.steps[from].label : "";
      plots.forEach(function (p) { p.show(i); });
    });
  });
  if (!M.layers.length) {
    document.getElementById("layers").appendChild(el("p", {"class": "empty"},
      "No feature maps yet."));
  }

  function show(i) {
    slider.value = i;
    label.textContent = last >= 0 ? M.steps[i].label : "\\u2013";
    views.forEach(function (view) { view(i); });
  }
  var timer = null;
  function setPlaying(on) {
    clearInterval(timer);
    timer = on ? setInterval(function () { show((Number(slider.value) + 1) % (last + 1)); }, 700)
      : null;
    play.textContent = on ? "\\u275a\\u275a pause" : "\\u25b6 play";
  }
  slider.max = Math.max(last, 0);
  slider.disabled = play.disabled = last < 1;
  slider.addEventListener("input", function () { show(Number(slider.value)); });
  play.addEventListener("click", function () {
    if (timer === null && Number(slider.value) === last) show(0);  // replay from the start
    setPlaying(timer === null);
  });
  document.addEventListener("keydown", function (e) {
    // The focused slider moves itself on arrow keys; elsewhere they move it too.
    if (e.target === slider || slider.disabled) return;
    var step = {ArrowLeft: -1, ArrowRight: 1}[e.key];
    if (!step) return;
    e.preventDefault();
    show(Math.min(last, Math.max(0, Number(slider.value) + step)));
  });
  var probe = document.getElementById("probe");
  if (probe) zoomed(probe, probe.parentNode, 3);
  show(Math.max(last, 0));
})();
</script>
</body>
</html>
"""
)
