(function () {
  "use strict";
  var M = JSON.parse(document.getElementById("manifest").textContent);
  var SVG = "http://www.w3.org/2000/svg";  // a namespace name, never fetched
  var PANELS = [
    {keys: ["mean", "std"], colors: ["#1f77b4", "#ff7f0e"], fraction: false},
    // dead channels on the probe, and (with examples on) over the whole validation set
    {keys: ["frac_zero", "dead_channels_probe", "dead_channels_val"],
      colors: ["#2ca02c", "#d62728", "#9467bd"], fraction: true}
  ];
  // The similarity panel: one line per layer, its linear CKA with the previous and the first
  // frame. Values near 1 matter: the axis runs from the tenth below the lowest value up to 1.
  var SIMILARITY = [
    {key: "to_previous", title: "CKA with the previous frame (1 = unchanged)"},
    {key: "to_first", title: "CKA with the first frame"}
  ];
  var PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
    "#7f7f7f", "#bcbd22", "#17becf"];
  // Plot size and margins; the left margin grows to fit the widest value label.
  var W = 300, H = 84, L = 40, R = 8, T = 6, B = 18, CHAR_PX = 6.5;
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
  function x(i, left) { return last > 0 ? left + (W - left - R) * i / last : (left + W - R) / 2; }
  function fmt(v, spec) {
    if (v === null || v === undefined) return spec.missing || "\u2013";
    if (spec.fraction) return (100 * v).toFixed(1) + "%";
    // Fixed decimals where values crowd near 1 (CKA 0.99996 is not 1): the digits that differ.
    if (spec.decimals) return v.toFixed(spec.decimals);
    return Number(v.toPrecision(spec.precision || 3)).toString();
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
    if (spec.nearOne) {
      hi = 1;
      lo = Math.min(0.9, Math.ceil(10 * Math.min.apply(null, values.concat([1]))) / 10 - 0.1);
    }
    if (!(hi > lo)) { hi = lo + 1; }
    function y(v) { return T + (H - T - B) * (hi - v) / (hi - lo); }
    var ticks = [hi, lo].map(function (v) { return fmt(v, spec); });
    var left = Math.max(L, 8 + CHAR_PX * Math.max(ticks[0].length, ticks[1].length));
    function px(i) { return x(i, left); }
    var svg = el("svg", {width: W, height: H, viewBox: "0 0 " + W + " " + H}, undefined, true);
    svg.appendChild(el("rect", {x: left, y: T, width: W - left - R, height: H - T - B,
      fill: "#fafbfc", stroke: "#e2e4e8"}, undefined, true));
    [hi, lo].forEach(function (v, k) {
      svg.appendChild(el("text", {x: left - 4, y: y(v) + 3, "text-anchor": "end", fill: "#666"},
        ticks[k], true));
    });
    if (!spec.fraction && lo < 0 && hi > 0) {
      svg.appendChild(el("line", {x1: left, x2: W - R, y1: y(0), y2: y(0), stroke: "#ccc",
        "stroke-dasharray": "3 3"}, undefined, true));
    }
    (last > 0 ? [0, last] : [0]).forEach(function (i) {
      var anchor = last === 0 ? "middle" : i ? "end" : "start";
      svg.appendChild(el("text", {x: px(i), y: H - 5, "text-anchor": anchor, fill: "#666"},
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
        d += pen + px(i).toFixed(1) + " " + y(v).toFixed(1) + " ";
        pen = "L";
        if (all[i - 1] == null && all[i + 1] == null) {
          svg.appendChild(el("circle", {cx: px(i), cy: y(v), r: 2, fill: color}, undefined, true));
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
    if (spec.title) box.appendChild(el("div", {"class": "plot-title"}, spec.title));
    box.appendChild(svg);
    box.appendChild(legend);
    return {node: box, show: function (i) {
      cursor.setAttribute("x1", px(i));
      cursor.setAttribute("x2", px(i));
      parts.forEach(function (p) {
        var v = stats[p.k][i];
        p.value.textContent = fmt(v, spec);
        p.dot.setAttribute("visibility", v === null ? "hidden" : "visible");
        if (v !== null) { p.dot.setAttribute("cx", px(i)); p.dot.setAttribute("cy", y(v)); }
      });
    }};
  }

  // An image that follows the slider: the step's frame, or the last one before it, with the
  // caption recorded for the epoch of the frame shown.
  function track(spec, name, box, most, cls) {
    var figure = el("figure", {"class": cls});
    var img = el("img", {alt: name});
    zoomed(img, box, most);
    var empty = el("div", {"class": "empty"}, "no frame yet");
    var caption = el("figcaption");
    figure.appendChild(img);
    figure.appendChild(empty);
    figure.appendChild(caption);
    return {node: figure, show: function (i) {
      var src = spec.src[i], from = spec.from[i];
      img.hidden = src === null;
      empty.hidden = src !== null;
      if (src !== null && img.getAttribute("src") !== src) img.setAttribute("src", src);
      img.setAttribute("alt", name + ", " + M.steps[i].label);
      caption.textContent = spec.caption[i] || "";
      caption.hidden = !spec.caption[i];
      return from;
    }};
  }
  function deadText(dead) {
    return dead.length + " dead channel" + (dead.length > 1 ? "s" : "") + ": " +
      dead.map(function (d) { return d[0] + " (since epoch " + d[1] + ")"; }).join(", ");
  }

  M.layers.forEach(function (layer) {
    var section = el("section", {"class": "layer"});
    var title = el("h2", {}, layer.name);
    var note = el("span", {"class": "note"});
    title.appendChild(note);
    section.appendChild(title);
    var dead = el("p", {"class": "dead"});
    section.appendChild(dead);
    var row = el("div", {"class": "row"});
    // A CAM picture carries its own labels: drawn at its own size, its caption beside it.
    var frame = track(layer, layer.name, row, layer.cam ? 1 : 4, layer.cam ? "frame cam" : "frame");
    row.appendChild(frame.node);
    var plots = PANELS.map(function (spec) { return panel(layer.stats, spec); })
      .filter(Boolean);
    if (plots.length) {
      var column = el("div", {"class": "plots"});
      plots.forEach(function (p) { column.appendChild(p.node); });
      row.appendChild(column);
    }
    section.appendChild(row);
    var examples = null, exampleNote = null;
    if (layer.examples) {
      // Folded: a grid is one row per drawn channel, thousands of pixels tall.
      var fold = el("details", {"class": "examples"});
      var heading = el("summary", {}, "top examples per channel");
      exampleNote = el("span", {"class": "note"});
      heading.appendChild(exampleNote);
      fold.appendChild(heading);
      examples = track(layer.examples, layer.name + " examples", section, 2, "");
      fold.appendChild(examples.node);
      section.appendChild(fold);
    }
    document.getElementById("layers").appendChild(section);
    views.push(function (i) {
      var from = frame.show(i);
      note.textContent = from !== null && from !== i ? "showing " + M.steps[from].label : "";
      if (examples) {
        var exFrom = examples.show(i);
        exampleNote.textContent = exFrom !== null && exFrom !== i ?
          "showing " + M.steps[exFrom].label : "";
      }
      var d = layer.dead[i];
      dead.hidden = !d || !d.length;
      dead.textContent = d && d.length ? deadText(d) : "";
      plots.forEach(function (p) { p.show(i); });
    });
  });
  if (M.similarity) {
    var S = M.similarity;
    var section = el("section", {"class": "layer similarity", id: "similarity"});
    var title = el("h2", {}, "similarity (linear CKA)");
    var note = el("span", {"class": "note"});
    title.appendChild(note);
    section.appendChild(title);
    var row = el("div", {"class": "row"});
    // The heatmap carries its own labels and scale: drawn at its own size.
    var heatmap = track(S, "layer x layer CKA", row, 1, "frame heatmap");
    row.appendChild(heatmap.node);
    var colors = S.layers.map(function (_, k) { return PALETTE[k % PALETTE.length]; });
    var plots = SIMILARITY.map(function (kind) {
      return panel(S.series[kind.key], {keys: S.layers, colors: colors, fraction: false,
        nearOne: true, decimals: 5, missing: "n/a", title: kind.title});
    }).filter(Boolean);
    if (plots.length) {
      var column = el("div", {"class": "plots"});
      plots.forEach(function (p) { column.appendChild(p.node); });
      row.appendChild(column);
    }
    section.appendChild(row);
    document.getElementById("layers").appendChild(section);
    views.push(function (i) {
      var from = heatmap.show(i);
      note.textContent = from !== null && from !== i ? "heatmap of " + M.steps[from].label : "";
      plots.forEach(function (p) { p.show(i); });
    });
  }
  if (!M.layers.length) {
    document.getElementById("layers").appendChild(el("p", {"class": "empty"},
      "No feature maps yet."));
  }

  function show(i) {
    slider.value = i;
    label.textContent = last >= 0 ? M.steps[i].label : "\u2013";
    views.forEach(function (view) { view(i); });
  }
  var timer = null;
  function setPlaying(on) {
    clearInterval(timer);
    timer = on ? setInterval(function () { show((Number(slider.value) + 1) % (last + 1)); }, 700)
      : null;
    play.textContent = on ? "\u275a\u275a pause" : "\u25b6 play";
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
