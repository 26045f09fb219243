"""fm_lightning.gallery: stats.json, index.html (checked in real headless Chromium), GIFs."""

from __future__ import annotations

import html
import importlib.resources
import io
import json
import math
import re

import numpy as np
import pytest
import torch
from browser import chromium
from PIL import Image

from fm_lightning.files import save_png
from fm_lightning.gallery import append_stats, write_gifs, write_index
from fm_lightning.pictures.similarity import similarity_picture
from fm_lightning.rendering import feature_grid, image_grid

HOSTILE_TITLE = '</title></script><script>window.__pwned = 1</script>"&'
# A layer directory name that runs script if anything puts it into the page as HTML.
HOSTILE_LAYER = "<img src=x onerror=window.__pwned=1>"
STATS = {"mean": 0.5, "std": 1.0, "frac_zero": 0.25, "dead_channels_probe": 0.0}


def add_frame(root, layer, stem, channels=4, size=8, seed=0):
    """A real feature-map PNG at root/layer/stem.png, as the callback writes it."""
    act = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(seed))
    return save_png(feature_grid(act), root / layer / f"{stem}.png")


def read_manifest(index):
    text = index.read_text()
    match = re.search(r'<script type="application/json" id="manifest">(.*?)</script>', text, re.S)
    assert match, "no manifest in the page"
    return match.group(1), json.loads(match.group(1))


def leftovers(root):
    return [p.name for p in root.rglob("*") if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------- stats.json


def test_append_stats_merges_replaces_a_recaptured_epoch_and_keeps_first_capture_order(tmp_path):
    append_stats(tmp_path, 0, {"conv2": STATS, "conv1": STATS})
    append_stats(tmp_path, 2, {"conv1": {**STATS, "mean": math.nan}, "fc": STATS})
    path = append_stats(tmp_path, 0, {"conv2": {**STATS, "mean": 9.0}})  # resumed run

    assert path == tmp_path / "stats.json"
    data = json.loads(path.read_text(), parse_constant=pytest.fail)  # strict JSON: no NaN
    assert data["layers"] == ["conv2", "conv1", "fc"]
    assert [h["epoch"] for h in data["history"]] == [0, 2]
    assert data["history"][0]["stats"] == {"conv2": {**STATS, "mean": 9.0}}
    assert data["history"][1]["stats"]["conv1"]["mean"] is None
    assert data["history"][1]["stats"]["fc"] == STATS
    assert leftovers(tmp_path) == []


def test_append_stats_rejects_bad_epochs_and_moves_foreign_files_aside(tmp_path):
    for epoch in (-1, 1.0, True):
        with pytest.raises(ValueError, match="epoch"):
            append_stats(tmp_path, epoch, {"conv1": STATS})
    (tmp_path / "stats.json").write_text("{not json")
    with pytest.warns(UserWarning, match="stats.json is not valid JSON.*Moved it to .*corrupt-"):
        append_stats(tmp_path, 0, {"conv1": STATS})
    assert [h["epoch"] for h in json.loads((tmp_path / "stats.json").read_text())["history"]] == [0]
    (tmp_path / "stats.json").write_text('{"conv1": []}')
    with pytest.warns(UserWarning, match="format 1. Moved it to"):
        write_index(tmp_path)
    assert len(list(tmp_path.glob("stats.json.corrupt-*"))) == 2


# ---------------------------------------------------------------------------- index.html


def test_index_escapes_names_and_links_images_by_relative_encoded_paths(tmp_path):
    layers = ["pool@2", "layer1.0.conv1", 'a"b<c>&d', HOSTILE_LAYER]
    for layer in layers:
        add_frame(tmp_path, layer, "epoch=000")
    save_png(image_grid(torch.rand(3, 1, 8, 8)), tmp_path / "probe_inputs.png")

    index = write_index(tmp_path, title=HOSTILE_TITLE)

    assert index == tmp_path / "index.html"
    page = index.read_text()
    assert f"<title>{html.escape(HOSTILE_TITLE)}</title>" in page
    assert f"<h1>{html.escape(HOSTILE_TITLE)}</h1>" in page
    assert "window.__pwned = 1</script>" not in page
    raw, manifest = read_manifest(index)
    assert "<" not in raw and ">" not in raw and "&" not in raw  # nothing can close the script
    srcs = {row["name"]: row["src"] for row in manifest["layers"]}
    assert list(srcs) == sorted(layers)  # no stats.json: by directory name
    assert srcs["pool@2"] == ["pool%402/epoch%3D000.png"]
    assert srcs["layer1.0.conv1"] == ["layer1.0.conv1/epoch%3D000.png"]
    assert srcs['a"b<c>&d'] == ["a%22b%3Cc%3E%26d/epoch%3D000.png"]
    assert 'src="probe_inputs.png"' in page
    # Self-contained: the only absolute URL is the SVG namespace name, which is never fetched.
    assert set(re.findall(r"https?://[^\s\"'<>]*", page)) == {"http://www.w3.org/2000/svg"}
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(//|[a-z]+:)""", page, re.I)
    assert "<link" not in page and "<script src" not in page
    assert leftovers(tmp_path) == []


def test_index_orders_steps_and_layers_and_fills_gaps_with_the_last_frame(tmp_path):
    for stem in ("trained", "epoch=10", "untrained", "epoch=009", "epoch=002"):
        add_frame(tmp_path, "b", stem)
    add_frame(tmp_path, "a", "epoch=009")
    add_frame(tmp_path, "c", "epoch=002")
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a layer")
    append_stats(tmp_path, 9, {"c": STATS, "b": {**STATS, "std": math.inf}})
    append_stats(tmp_path, 2, {"c": STATS})

    _, manifest = read_manifest(write_index(tmp_path))

    assert [s["label"] for s in manifest["steps"]] == [
        "untrained",
        "epoch 2",
        "epoch 9",
        "epoch 10",
        "trained",
    ]
    rows = {row["name"]: row for row in manifest["layers"]}
    assert list(rows) == ["c", "b", "a"]  # stats.json order first, then the rest by name
    assert rows["a"]["src"] == [None, None, "a/epoch%3D009.png", *["a/epoch%3D009.png"] * 2]
    assert rows["a"]["from"] == [None, None, 2, 2, 2]
    assert rows["c"]["from"] == [None, 1, 1, 1, 1]
    assert rows["b"]["from"] == [0, 1, 2, 3, 4]
    assert rows["c"]["stats"]["mean"] == [None, 0.5, 0.5, None, None]
    assert rows["b"]["stats"]["std"] == [None, None, None, None, None]  # inf is stored as null
    assert rows["a"]["stats"] == {}


def test_index_of_an_empty_directory_is_still_a_page(tmp_path):
    _, manifest = read_manifest(write_index(tmp_path))
    assert manifest == {"steps": [], "layers": [], "similarity": None}


# ---------------------------------------------------------------------------- GIFs


def test_write_gifs_one_frame_per_epoch_padded_to_a_common_size(tmp_path):
    sizes = {"epoch=000": 8, "epoch=001": 12, "epoch=002": 10}  # frames of different sizes
    frames = {
        s: add_frame(tmp_path, "conv1", s, size=n, seed=i) for i, (s, n) in enumerate(sizes.items())
    }
    add_frame(tmp_path, "conv1", "trained")  # not an epoch: not in the GIF
    add_frame(tmp_path, "fc", "epoch=000")  # one frame: no GIF
    add_frame(tmp_path, "fc", "untrained")

    gifs = write_gifs(tmp_path, duration_ms=250)

    assert gifs == {"conv1": tmp_path / "conv1" / "evolution.gif"}
    widest = max(Image.open(p).width for p in frames.values())
    tallest = max(Image.open(p).height for p in frames.values())
    with Image.open(gifs["conv1"]) as gif:
        assert gif.n_frames == 3
        assert gif.info["loop"] == 0 and gif.info["duration"] == 250
        assert gif.width == widest and gif.height > tallest  # padded, plus an epoch caption
        gif.seek(1)
        assert np.asarray(gif.convert("RGB")).std() > 0
    assert not (tmp_path / "fc" / "evolution.gif").exists()
    assert leftovers(tmp_path) == []
    with pytest.raises(ValueError, match="duration_ms"):
        write_gifs(tmp_path, duration_ms=0)


# ---------------------------------------------------------------------------- in Chromium


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


@pytest.fixture
def open_page(browser):
    """Opens a file in a fresh page; records every request and script error it causes."""
    pages = []

    def open_(path):
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        page.set_default_timeout(5000)  # a broken page fails in seconds, not Playwright's 30
        page.requests, page.errors = [], []
        page.on("request", lambda r: page.requests.append(r.url))
        page.on("pageerror", lambda e: page.errors.append(str(e)))
        page.goto(path.as_uri())
        pages.append(page)
        return page

    yield open_
    for page in pages:
        page.close()


@pytest.fixture
def run_dir(tmp_path):
    """Three layers by three epochs, as a run writes them; the hostile layer missed epoch 1."""
    root = tmp_path / "feature maps"  # a space, so file:// URLs need encoding
    layers = {"conv1": [0, 1, 2], "layer1.0.conv1": [0, 1, 2], HOSTILE_LAYER: [0, 2]}
    for i, (layer, epochs) in enumerate(layers.items()):
        for epoch in epochs:
            add_frame(root, layer, f"epoch={epoch:03d}", channels=4 + 2 * i, seed=10 * i + epoch)
    for epoch in range(3):
        stats = {layer: {**STATS, "mean": epoch / 2} for layer in layers}
        append_stats(root, epoch, stats)
    save_png(image_grid(torch.rand(3, 1, 8, 8)), root / "probe_inputs.png")
    return write_index(root, title=HOSTILE_TITLE)


ALL_IMAGES_LOADED = """() => [...document.images].filter(i => !i.hidden)
    .every(i => i.complete && i.naturalWidth > 0)"""


def images(page):
    return page.eval_on_selector_all(
        "img", "els => els.map(i => [i.getAttribute('src'), i.complete, i.naturalWidth, i.hidden])"
    )


def label(page):
    return page.text_content("#epoch-label")


def layer_srcs(page):
    return page.eval_on_selector_all(".layer img", "els => els.map(i => i.getAttribute('src'))")


def move_slider(page, value):
    page.eval_on_selector(
        "#epoch", "(s, v) => { s.value = v; s.dispatchEvent(new Event('input')); }", value
    )


@pytest.mark.browser
def test_gallery_renders_from_disk_with_every_image_loaded(open_page, run_dir):
    page = open_page(run_dir)

    assert page.errors == []
    assert all(url.startswith("file://") for url in page.requests), page.requests
    assert page.title() == HOSTILE_TITLE  # shown as text, not run
    assert page.evaluate("window.__pwned") is None
    names = page.eval_on_selector_all(".layer h2", "els => els.map(e => e.firstChild.data)")
    assert names == ["conv1", "layer1.0.conv1", HOSTILE_LAYER]
    assert HOSTILE_LAYER in page.inner_text("body")

    shown = images(page)
    assert len(shown) == 4  # the probe and one per layer
    assert all(complete and width > 0 for _, complete, width, _ in shown), shown
    assert len(page.query_selector_all(".layer svg")) == 6  # two stats plots per layer
    shot = Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("RGB")
    assert shot.width == 1200
    assert len(shot.getcolors(maxcolors=1 << 24)) > 100  # images and plots, not a blank page


@pytest.mark.browser
def test_slider_arrow_keys_and_play_change_the_epoch_shown(open_page, run_dir):
    page = open_page(run_dir)
    assert label(page) == "epoch 2"  # the latest capture first
    assert all(src.endswith("epoch%3D002.png") for src in layer_srcs(page))
    legend = page.text_content(".legend b")

    move_slider(page, 0)
    assert label(page) == "epoch 0"
    assert all(src.endswith("epoch%3D000.png") for src in layer_srcs(page))
    assert page.text_content(".legend b") != legend  # the plot follows: mean 1 -> 0
    page.wait_for_function(ALL_IMAGES_LOADED)

    page.keyboard.press("ArrowRight")
    assert label(page) == "epoch 1"
    # The hostile layer has no epoch 1: it keeps its epoch 0 frame and says so.
    assert layer_srcs(page)[2].endswith("epoch%3D000.png")
    assert page.text_content(".layer:nth-child(3) .note") == "showing epoch 0"
    page.wait_for_function(ALL_IMAGES_LOADED)

    # Playwright's clock drives the play timer, so no check depends on how fast the page runs.
    page.clock.install()
    page.click("#play")
    page.clock.run_for(700)  # one step of the 700 ms timer
    assert label(page) == "epoch 2"
    page.click("#play")  # pause: the epoch stays put
    page.clock.run_for(700 * 4)  # four more steps, had it kept playing: epoch 0
    assert label(page) == "epoch 2"
    assert page.errors == []


@pytest.mark.browser
def test_a_single_capture_still_renders(open_page, tmp_path):
    add_frame(tmp_path, "conv1", "epoch=000")
    append_stats(tmp_path, 0, {"conv1": STATS})
    page = open_page(write_index(tmp_path))

    assert label(page) == "epoch 0"
    assert page.is_disabled("#epoch") and page.is_disabled("#play")
    page.wait_for_function(ALL_IMAGES_LOADED)
    assert images(page)[0][2] > 0
    assert page.errors == []


# ---------------------------------------------------------------------------- examples, cam, dead


def test_append_stats_records_captions_and_dead_channels_and_checks_them(tmp_path):
    append_stats(tmp_path, 0, {"conv1": STATS})  # without them: the entry has neither key
    captions = {"conv1": "16 channels", "conv1/examples": "top 9", "cam": "GradCAM on conv2"}
    append_stats(tmp_path, 1, {"conv1": STATS}, captions=captions, dead={"conv1": {7: 1, 3: 0}})

    history = json.loads((tmp_path / "stats.json").read_text())["history"]
    assert history[0] == {"epoch": 0, "stats": {"conv1": STATS}}
    assert history[1]["captions"] == captions
    assert history[1]["dead"] == {"conv1": {"3": 0, "7": 1}}  # JSON keys, by channel
    for bad in ({"conv1": {-1: 0}}, {"conv1": {3: "0"}}, {"conv1": [3]}, {"conv1": {True: 0}}):
        with pytest.raises(ValueError, match=r"expected dead\['conv1'\]"):
            append_stats(tmp_path, 2, {}, dead=bad)
    with pytest.raises(ValueError, match="expected captions"):
        append_stats(tmp_path, 2, {}, captions={"conv1": 3})


@pytest.fixture
def examples_dir(tmp_path):
    """conv1 with examples at epochs 0 and 2, conv2 without, a cam row; captions, dead channels."""
    root = tmp_path / "feature maps"
    for epoch in range(3):
        add_frame(root, "cam", f"epoch={epoch:03d}", channels=3, seed=epoch)
        add_frame(root, "conv2", f"epoch={epoch:03d}", seed=10 + epoch)
        add_frame(root, "conv1", f"epoch={epoch:03d}", seed=20 + epoch)
    for epoch in (0, 2):
        add_frame(root, "conv1/examples", f"epoch={epoch:03d}", channels=9, size=6, seed=epoch)
    dead = [{"conv1": {}}, {"conv1": {3: 1}}, {"conv1": {3: 1, 5: 2}}]
    for epoch in range(3):
        captions = {"conv1": f"maps e{epoch}", "conv1/examples": f"examples e{epoch}"}
        captions["cam"] = f"cam e{epoch}"
        append_stats(root, epoch, {"conv2": STATS, "conv1": STATS}, captions, dead[epoch])
    return root


def test_index_shows_examples_under_their_layer_captions_dead_channels_and_cam_last(examples_dir):
    _, manifest = read_manifest(write_index(examples_dir))

    rows = {row["name"]: row for row in manifest["layers"]}
    assert list(rows) == ["conv2", "conv1", "cam"]  # recorded order, then cam
    conv1 = rows["conv1"]
    assert conv1["examples"]["src"] == [
        "conv1/examples/epoch%3D000.png",
        "conv1/examples/epoch%3D000.png",  # no examples at epoch 1: the last before
        "conv1/examples/epoch%3D002.png",
    ]
    assert conv1["examples"]["from"] == [0, 0, 2]
    # A caption describes the frame shown, so a gap repeats the earlier epoch's caption.
    assert conv1["examples"]["caption"] == ["examples e0", "examples e0", "examples e2"]
    assert conv1["caption"] == ["maps e0", "maps e1", "maps e2"]
    assert conv1["dead"] == [[], [[3, 1]], [[3, 1], [5, 2]]]
    assert rows["conv2"]["examples"] is None and rows["conv2"]["dead"] == [None] * 3
    assert rows["cam"]["caption"] == ["cam e0", "cam e1", "cam e2"]
    assert rows["cam"]["src"][2] == "cam/epoch%3D002.png" and rows["cam"]["stats"] == {}


def test_index_inlines_the_packaged_css_and_js(examples_dir):
    page = write_index(examples_dir).read_text()
    assets = importlib.resources.files("fm_lightning") / "assets"
    assert (assets / "gallery.css").read_text() in page
    assert (assets / "gallery.js").read_text() in page
    assert "$style" not in page and "$script" not in page and "$manifest" not in page


def test_write_gifs_animates_cam_but_not_the_examples(examples_dir):
    gifs = write_gifs(examples_dir)
    assert set(gifs) == {"conv1", "conv2", "cam"}
    with Image.open(gifs["cam"]) as gif:
        assert gif.n_frames == 3
    assert not list(examples_dir.glob("*/examples/*.gif"))
    # A layer with examples but no maps gets no GIF (and no error).
    add_frame(examples_dir, "fc/examples", "epoch=000")
    add_frame(examples_dir, "fc/examples", "epoch=001")
    assert "fc" not in write_gifs(examples_dir)


def examples_state(page):
    """[src, caption, note] of conv1's examples image, and the text of its dead-channel mark."""
    return page.evaluate(
        """() => {
        const row = [...document.querySelectorAll('.layer')]
            .find(s => s.querySelector('h2').firstChild.data === 'conv1');
        const fig = row.querySelector('.examples');
        const dead = row.querySelector('.dead');
        return [fig.querySelector('img').getAttribute('src'),
                fig.querySelector('figcaption').textContent,
                fig.querySelector('.note').textContent,
                dead.hidden ? null : dead.textContent,
                getComputedStyle(dead).color];
    }"""
    )


@pytest.mark.browser
def test_examples_follow_the_slider_and_dead_channels_are_marked(open_page, examples_dir):
    page = open_page(write_index(examples_dir, title="run"))
    assert label(page) == "epoch 2"
    page.wait_for_function(ALL_IMAGES_LOADED)
    src, caption, note, dead, color = examples_state(page)
    assert src == "conv1/examples/epoch%3D002.png" and caption == "examples e2" and note == ""
    assert dead == "2 dead channels: 3 (since epoch 1), 5 (since epoch 2)"
    assert color == "rgb(180, 35, 24)"  # red: the mark stands out
    # Under conv1's maps, not in another row; conv2 has none; cam is the last row.
    names = page.eval_on_selector_all(".layer h2", "els => els.map(e => e.firstChild.data)")
    assert names == ["conv2", "conv1", "cam"]
    assert page.eval_on_selector_all(".examples", "els => els.length") == 1
    assert page.text_content(".layer:nth-child(3) figcaption") == "cam e2"

    move_slider(page, 1)
    src, caption, note, dead, _ = examples_state(page)
    assert (src, caption, note) == (
        "conv1/examples/epoch%3D000.png",
        "examples e0",
        "showing epoch 0",
    )
    assert dead == "1 dead channel: 3 (since epoch 1)"
    page.wait_for_function(ALL_IMAGES_LOADED)

    page.keyboard.press("ArrowLeft")
    assert label(page) == "epoch 0"
    src, caption, note, dead, _ = examples_state(page)
    assert (src, caption, note, dead) == ("conv1/examples/epoch%3D000.png", "examples e0", "", None)
    page.wait_for_function(ALL_IMAGES_LOADED)
    assert all(complete and width > 0 for _, complete, width, hidden in images(page) if not hidden)
    assert page.errors == []


@pytest.mark.browser
def test_examples_are_folded_until_their_heading_is_clicked(open_page, examples_dir):
    page = open_page(write_index(examples_dir, title="run"))
    page.wait_for_function(ALL_IMAGES_LOADED)
    fold = page.query_selector(".layer details.examples")
    image = fold.query_selector("img")
    assert fold.evaluate("d => d.open") is False
    folded = fold.bounding_box()["height"]
    assert not image.is_visible() and folded < 40  # only its heading: the page stays short
    fold.query_selector("summary").click()
    assert fold.evaluate("d => d.open") is True
    assert image.is_visible() and fold.bounding_box()["height"] > folded + 50
    assert page.errors == []


@pytest.mark.browser
def test_cam_is_drawn_at_its_own_size_with_its_caption_beside_it(open_page, examples_dir):
    page = open_page(write_index(examples_dir, title="run"))
    page.wait_for_function(ALL_IMAGES_LOADED)
    img, caption = page.evaluate(
        """() => {
        const fig = document.querySelector('.frame.cam');
        const img = fig.querySelector('img'), cap = fig.querySelector('figcaption');
        const a = img.getBoundingClientRect(), b = cap.getBoundingClientRect();
        return [[a.width, img.naturalWidth, a.right, a.top], [b.left, b.top, cap.textContent]];
    }"""
    )
    width, natural, right, top = img
    assert width == natural  # not zoomed: it carries its own labels, drawn at their size
    assert caption[2] == "cam e2" and caption[0] >= right and caption[1] < top + 20  # beside it
    # The maps' frames are still zoomed to fit (small maps enlarged by an integer factor).
    zoomed = page.evaluate(
        "() => [...document.querySelectorAll('.frame:not(.cam) img')]"
        ".map(i => i.getBoundingClientRect().width / i.naturalWidth)"
    )
    assert zoomed and all(z >= 2 for z in zoomed)


@pytest.mark.browser
def test_plot_axis_labels_are_never_clipped(open_page, tmp_path):
    root = tmp_path / "run"
    add_frame(root, "conv1", "epoch=000")
    add_frame(root, "conv1", "epoch=001")
    for epoch, mean in ((0, -0.000373), (1, -0.0002)):  # the clipped label
        append_stats(root, epoch, {"conv1": {**STATS, "mean": mean, "std": 0.000123}})
    page = open_page(write_index(root))
    boxes = page.evaluate(
        """() => [...document.querySelectorAll('svg text')].map(t => {
        const b = t.getBBox();
        return [t.textContent, b.x, b.x + b.width, +t.ownerSVGElement.getAttribute('width')];
    })"""
    )
    texts = [text for text, *_ in boxes]
    assert "-0.000373" in texts and "0.000123" in texts, texts
    for text, left, right, width in boxes:
        assert left >= 0 and right <= width, (text, left, right)
    assert page.errors == []


# ---------------------------------------------------------------------------- similarity panel


def similarity_heatmap(root, stem, value):
    """A real CKA heatmap PNG at root/similarity/<stem>.png, with ``value`` off the diagonal."""
    values = torch.tensor([[1.0, value, 0.0], [value, 1.0, 0.0], [0.0, 0.0, 0.0]])
    defined = torch.tensor([[True, True, False], [True, True, False], [False, False, False]])
    names = ["conv1", "conv2", "dead"]
    return save_png(
        similarity_picture(values, names, names, f"CKA {stem}", defined=defined),
        root / "similarity" / f"{stem}.png",
    )


@pytest.fixture
def similarity_dir(tmp_path):
    """Three epochs of two layers' maps, each with a heatmap and to_previous / to_first values;
    ``dead`` is constant (None), and epoch 0 has no previous frame (None)."""
    root = tmp_path / "run"
    to_previous = {"conv1": [None, 0.95, 0.999], "conv2": [None, 0.8, 0.97]}
    for epoch in range(3):
        for layer in ("conv1", "conv2"):
            add_frame(root, layer, f"epoch={epoch:03d}", seed=epoch)
        similarity_heatmap(root, f"epoch={epoch:03d}", 0.3 + 0.2 * epoch)
        similarity = {
            layer: {"to_previous": values[epoch], "to_first": values[epoch] and values[epoch] - 0.1}
            for layer, values in to_previous.items()
        }
        similarity["dead"] = {"to_previous": None, "to_first": math.nan}
        append_stats(root, epoch, {"conv1": STATS, "conv2": STATS}, similarity=similarity)
    return root


def test_append_stats_keeps_similarity_with_none_for_n_a_and_the_folder_is_no_layer(
    similarity_dir,
):
    data = json.loads((similarity_dir / "stats.json").read_text(), parse_constant=pytest.fail)
    assert data["history"][1]["similarity"]["conv1"] == {"to_previous": 0.95, "to_first": 0.85}
    assert data["history"][2]["similarity"]["dead"] == {"to_previous": None, "to_first": None}
    with pytest.raises(ValueError, match=r"expected similarity\['conv1'\] as \{name: number"):
        append_stats(similarity_dir, 3, {}, similarity={"conv1": {"to_previous": "high"}})
    _, manifest = read_manifest(write_index(similarity_dir))
    assert [row["name"] for row in manifest["layers"]] == ["conv1", "conv2"]  # no "similarity"
    panel = manifest["similarity"]
    assert panel["layers"] == ["conv1", "conv2", "dead"]
    assert panel["series"]["to_previous"]["conv2"] == [None, 0.8, 0.97]
    assert panel["series"]["to_first"]["dead"] == [None, None, None]
    assert panel["src"] == [f"similarity/epoch%3D00{i}.png" for i in range(3)]
    assert write_gifs(similarity_dir).keys() == {"conv1", "conv2"}  # no GIF of the heatmaps


def test_a_gallery_without_similarity_has_no_panel(tmp_path):
    add_frame(tmp_path, "conv1", "epoch=000")
    append_stats(tmp_path, 0, {"conv1": STATS})
    assert read_manifest(write_index(tmp_path))[1]["similarity"] is None


def similarity_state(page):
    """The heatmap shown, the panel's legend texts and plotted lines."""
    return page.evaluate(
        """() => {
        const panel = document.querySelector('#similarity');
        return {
            src: panel.querySelector('img').getAttribute('src'),
            titles: [...panel.querySelectorAll('.plot-title')].map(t => t.textContent),
            legends: [...panel.querySelectorAll('.legend')].map(l => l.textContent),
            lines: [...panel.querySelectorAll('svg path')].map(p => p.getAttribute('stroke')),
            body: document.body.innerText,
        };
    }"""
    )


@pytest.mark.browser
def test_similarity_panel_plots_a_line_per_layer_and_its_heatmap_follows_the_slider(
    open_page, similarity_dir
):
    page = open_page(write_index(similarity_dir, title="run"))
    page.wait_for_function(ALL_IMAGES_LOADED)
    state = similarity_state(page)
    assert label(page) == "epoch 2"
    assert state["src"] == "similarity/epoch%3D002.png"
    assert state["titles"] == [
        "CKA with the previous frame (1 = unchanged)",
        "CKA with the first frame",
    ]
    # One line per layer in each plot (dead has no values, so no line), distinct colours.
    assert len(state["lines"]) == 6 and len(set(state["lines"][:3])) == 3
    assert state["legends"][0] == "conv1 0.99900conv2 0.97000dead n/a"
    assert "NaN" not in state["body"] and "nan" not in state["body"]
    # The heatmap is the last row, after the layers, drawn at its own size.
    sections = page.eval_on_selector_all(".layer", "els => els.map(e => e.id || 'layer')")
    assert sections == ["layer", "layer", "similarity"]
    width = page.evaluate(
        "() => { const i = document.querySelector('#similarity img');"
        " return [i.getBoundingClientRect().width, i.naturalWidth]; }"
    )
    assert width[0] == width[1]

    move_slider(page, 0)
    state = similarity_state(page)
    assert label(page) == "epoch 0" and state["src"] == "similarity/epoch%3D000.png"
    assert state["legends"][0] == "conv1 n/aconv2 n/adead n/a"  # no previous frame yet
    page.keyboard.press("ArrowRight")
    state = similarity_state(page)
    assert state["src"] == "similarity/epoch%3D001.png"
    assert state["legends"][0] == "conv1 0.95000conv2 0.80000dead n/a"
    assert state["legends"][1] == "conv1 0.85000conv2 0.70000dead n/a"
    page.wait_for_function(ALL_IMAGES_LOADED)
    assert page.errors == []
