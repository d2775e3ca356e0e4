"""``compare``'s page to browse: ``index.html`` in the output folder, one page that works offline
(file://, no CDN, no server) with its pictures as files beside it.

It holds the comparison table (sortable by any column), the per-class view (the teacher beside
each student, and the per-class chart), every run's training curves and, for segmentation, a
prediction browser: for each chosen test image the image, the ground truth and each run's
prediction with its per-image IoU, each shown as an overlay on the image or as a plain class map
(a switch), filtered by a class present, sorted by how much KD helped or hurt
against the baseline (for the run chosen), paged with the arrow keys, under a legend of the class
colours (the palette of the class maps and overlays). For classification:
the confusion matrices and, per run, the images it gets wrong. The page's data is one JSON block
inside it (a file:// page cannot fetch files), its script a few dozen lines of plain JavaScript.
"""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from kdcache.core.outputs import OutputFolder
from kdcache.report import figures

#: the sub-folder of the prediction browser's pictures
BROWSE = "browse"
THUMB = 192  # the longer side of a browser picture, pixels
#: pixels without a label in a plain class map: VOC's void colour, not the black of class 0
IGNORE_COLOR = (224, 224, 192)
#: the class colour's share of an overlay's pixel (the image keeps the rest)
OVERLAY_ALPHA = 0.6


def save_picture(path: Path, rgb: np.ndarray) -> str:
    """``rgb`` as a PNG of at most :data:`THUMB` pixels a side (nearest: class colours stay); its file name."""
    img = Image.fromarray(rgb)
    scale = THUMB / max(img.size)
    if scale < 1:
        img = img.resize((max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale))), Image.NEAREST)
    img.save(path)
    return path.name


def browser_images(folder: OutputFolder, result: dict, images: list[dict], palette) -> list[dict]:
    """Write each browsed image's pictures into ``browse/`` of the comparison's folder and return the
    page's entries.

    ``images``: per image ``id``, ``image`` (uint8 [H, W, 3]), ``label`` ([H, W], 255 = no label)
    and ``preds`` (run name -> [H, W] class ids); per-image IoU comes from ``result``'s rows."""
    folder.remove(under=BROWSE)  # the pictures of an earlier comparison here (never anyone else's files)
    pal = np.asarray(palette, dtype=np.uint8)
    names = result["class_names"]
    entries = []

    def picture(name: str, rgb: np.ndarray) -> str:
        return f"{BROWSE}/" + save_picture(folder.file(f"{BROWSE}/{name}"), rgb)

    for n, im in enumerate(images):
        stem = f"{n:04d}"
        label = np.asarray(im["label"])
        folder.paths(f"{BROWSE}/{stem}_{part}.png" for part in
                     ("image", "truth", "truth_map", *(f"{k}{m}" for k in range(len(im["preds"])) for m in ("", "_map"))))
        files = {"image": picture(f"{stem}_image.png", im["image"]),
                 "truth": picture(f"{stem}_truth.png", figures.overlay(im["image"], label, pal, alpha=OVERLAY_ALPHA)),
                 "truth_map": picture(f"{stem}_truth_map.png",
                                      figures.colorize(label, pal, ignore_color=IGNORE_COLOR))}
        runs, maps = {}, {}
        for r, pred in im["preds"].items():
            pred = np.asarray(pred)
            maps[r] = picture(f"{stem}_{len(runs)}_map.png", figures.colorize(pred, pal))
            runs[r] = picture(f"{stem}_{len(runs)}.png", figures.overlay(im["image"], pred, pal, alpha=OVERLAY_ALPHA))
        present = sorted(int(c) for c in np.unique(label) if c != 255 and c < len(names))
        entries.append({"id": im["id"], "classes": [names[c] for c in present], "files": files, "runs": runs,
                        "maps": maps,
                        "iou": {r["name"]: r.get("per_image_iou", {}).get(im["id"]) for r in result["rows"]}})
    return entries


def hex_color(rgb) -> str:
    """``(r, g, b)`` (0-255) as ``#rrggbb``."""
    return "#" + "".join(f"{int(v):02x}" for v in rgb)


def legend(class_names, palette) -> str:
    """The prediction browser's colour legend: a swatch of each class's palette colour beside its
    name, in class order, then the colour of unlabelled pixels in a class map. Overlays blend the
    same colours with the image (the class colour at :data:`OVERLAY_ALPHA`); unlabelled pixels keep
    the image there."""
    pal = np.asarray(palette, dtype=np.uint8)
    if len(pal) < len(class_names):
        raise ValueError(f"the palette has {len(pal)} colours for {len(class_names)} classes")

    def item(name: str, color: str, cls: str = "") -> str:
        return (f'<li{cls} data-class="{html.escape(name)}" data-color="{color}">'
                f'<span class="swatch" style="background:{color}"></span>{html.escape(name)}</li>')

    items = [item(str(n), hex_color(pal[c])) for c, n in enumerate(class_names)]
    items.append(item("no label (class maps)", hex_color(IGNORE_COLOR), ' class="void"'))
    alpha = f"{100 * OVERLAY_ALPHA:.0f}"
    return (f'<p class="note">Class colours: plain in the class maps, {alpha}% over the image in the overlays '
            f'(where a pixel has no label, an overlay shows the image).</p><ul id="legend">{"".join(items)}</ul>')


def write_page(folder: OutputFolder, result: dict, *, images: list[dict] | None = None,
               wrong: dict[str, list[dict]] | None = None, palette=None) -> Path:
    """``out_dir/index.html`` for a ``compare`` result (written beside compare.md and the figures):
    ``images`` the prediction browser's entries (:func:`browser_images`), ``wrong`` for
    classification the images each run gets wrong (run -> [{"file", "caption"}]), ``palette`` the
    class colours ([C, 3] uint8) of the browser's pictures, listed in its :func:`legend`."""
    curves = {}
    for r in result["rows"]:
        src = Path(r["run"]) / "curves.png"
        if src.exists():
            name = f"curves/{len(curves)}.png"
            shutil.copyfile(src, folder.file(name))
            curves[r["name"]] = name
    classification = result.get("task") == "classification"
    key = "top1" if classification else "miou"
    delta = "delta_top1" if classification else "delta_miou"
    columns = [("run", "name", "text"), ("method", "method", "text"), ("model", "model", "text"),
               ("top-1" if classification else "mIoU", key, "pct"), ("Δ", delta, "delta"),
               ("mAcc", "macc", "pct"), *([] if classification else [("aAcc", "aacc", "pct")]),
               ("#params (M)", "params", "params"), ("ms/image", "ms_per_image", "num"), ("FPS", "fps", "num")]
    table = [{"cells": [{"text": "base", "sort": 0.0} if kind == "delta" and r["baseline"] else _cell(r.get(k), kind)
                        for _, k, kind in columns]} for r in result["rows"]]
    base = next((r["name"] for r in result["rows"] if r["baseline"]), None)
    students = [r["name"] for r in result["rows"] if not r["baseline"] and not r.get("teacher")]
    data = {"columns": [c[0] for c in columns], "table": table, "perClass": result.get("per_class") or [],
            "classNames": result["class_names"], "images": images or [], "runs": [r["name"] for r in result["rows"]],
            "baseline": base, "students": students, "curves": curves, "wrong": wrong or {},
            "confusion": {r["name"]: f"confusion_{r['name']}.png" for r in result["rows"]
                          if folder.owns(f"confusion_{r['name']}.png")},
            "chart": "per_class_acc.png" if classification else "per_class_iou.png"}
    data = _finite(data)
    title = f"kdcache compare: {result['dataset']} / {result['split']} ({result['num_samples']} images)"
    legend_html = "" if classification or palette is None else legend(result["class_names"], palette)
    page = PAGE.replace("{{title}}", html.escape(title)).replace("{{legend}}", legend_html).replace(
        "{{data}}", json.dumps(data, allow_nan=False, default=str).replace("</", "<\\/"))
    path = folder.file("index.html")
    path.write_text(page, encoding="utf-8")
    return path


def _finite(x):
    """``x`` with every non-finite float as None (JSON has no NaN)."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if np.isfinite(x) else None
    return x


def _cell(value, kind: str) -> dict:
    """A table cell: its text and the number it sorts by (None: text sorts)."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return {"text": "—", "sort": None}
    if kind == "text":
        return {"text": str(value), "sort": None}
    if kind == "pct":
        return {"text": f"{100 * value:.2f}", "sort": float(value)}
    if kind == "delta":  # as compare.md writes it: never -0.00
        text = f"{100 * value:+.2f}"
        return {"text": "±0.00" if text in ("+0.00", "-0.00") else text, "sort": float(value)}
    if kind == "params":
        return {"text": f"{value / 1e6:.3f}", "sort": float(value)}
    return {"text": f"{value:.2f}", "sort": float(value)}


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{title}}</title>
<style>
body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:.5em 0}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{cursor:pointer;background:#f4f4f4}
td:first-child,th:first-child{text-align:left}.flag{color:#b00;font-weight:bold}
figure{display:inline-block;margin:4px;text-align:center;font-size:12px}img{max-width:100%}
#browser .row{border-top:1px solid #ddd;padding:4px 0}.controls{margin:.5em 0}
#curves img{width:600px}.note{margin:.3em 0;font-size:14px;color:#444}
#legend{list-style:none;padding:0;margin:.3em 0 .6em;display:flex;flex-wrap:wrap;gap:4px 16px;font-size:14px}
#legend li{display:flex;align-items:center;gap:6px}.swatch{display:inline-block;width:18px;height:18px;border:1px solid #666}
</style></head><body>
<h1>{{title}}</h1>
<h2>Runs</h2><p>Click a column to sort by it.</p><table id="runs"><thead></thead><tbody></tbody></table>
<h2>Per class</h2><table id="perclass"><thead></thead><tbody></tbody></table>
<img id="chart" alt="per-class chart">
<h2>Training curves</h2><div id="curves"></div>
<div id="predictions"><h2>Predictions</h2>
<div class="controls">class present <select id="filter"><option value="">any</option></select>
sort <select id="sort"><option value="id">image id</option><option value="helped">KD helped most</option>
<option value="hurt">KD hurt most</option></select> for <select id="sortrun"></select>
show <select id="view"><option value="overlay">overlays</option><option value="map">class maps</option></select>
<button id="prev">◀</button> <span id="page"></span> <button id="next">▶</button> (← → keys)</div>
{{legend}}
<div id="browser"></div></div>
<div id="classification"><h2>Confusion matrices</h2><div id="confusion"></div><h2>Images each run gets wrong</h2>
<div id="wrong"></div></div>
<script id="data" type="application/json">{{data}}</script>
<script>
const D = JSON.parse(document.getElementById("data").textContent), PER_PAGE = 4;
const el = (tag, attrs = {}, text) => { const e = document.createElement(tag);
  Object.entries(attrs).forEach(([k, v]) => e.setAttribute(k, v)); if (text !== undefined) e.textContent = text; return e; };
const fig = (src, caption) => { const f = el("figure"); f.append(el("img", {src, alt: caption}), el("figcaption", {}, caption)); return f; };
const pct = x => x === null || x === undefined ? "—" : (100 * x).toFixed(2);
// a difference in points as compare.md writes it: signed, and never -0.00
const signed = x => { const t = (100 * x).toFixed(2); return t === "0.00" || t === "-0.00" ? "±0.00" : (x > 0 ? "+" : "") + t; };
// the runs table, sortable
const runs = document.getElementById("runs"); let sortCol = -1, asc = true;
const hr = el("tr"); D.columns.forEach((c, i) => { const th = el("th", {}, c); th.onclick = () => sortBy(i); hr.append(th); });
runs.tHead.append(hr);
function drawRuns(rows) { runs.tBodies[0].replaceChildren(...rows.map(r => { const tr = el("tr");
  r.cells.forEach(c => tr.append(el("td", {}, c.text))); return tr; })); }
function sortBy(i) { asc = sortCol === i ? !asc : true; sortCol = i;
  const key = r => r.cells[i].sort === null ? r.cells[i].text : r.cells[i].sort;
  drawRuns([...D.table].sort((a, b) => (key(a) < key(b) ? -1 : key(a) > key(b) ? 1 : 0) * (asc ? 1 : -1))); }
drawRuns(D.table);
// per class: the teacher beside the baseline and each student's delta
const pc = document.getElementById("perclass");
if (D.perClass.length) { const names = Object.keys(D.perClass[0].delta), h = el("tr");
  ["class", "teacher", "baseline", ...names.map(n => "Δ " + n), "teacher < baseline"].forEach(c => h.append(el("th", {}, c)));
  pc.tHead.append(h);
  D.perClass.forEach(v => { const tr = el("tr"); tr.append(el("td", {}, v.class), el("td", {}, pct(v.teacher)), el("td", {}, pct(v.baseline)));
    names.forEach(n => tr.append(el("td", {}, v.delta[n] === null ? "—" : signed(v.delta[n]))));
    tr.append(el("td", v.teacher_below_baseline ? {class: "flag"} : {}, v.teacher_below_baseline ? "yes" : "")); pc.tBodies[0].append(tr); }); }
document.getElementById("chart").src = D.chart;
Object.entries(D.curves).forEach(([n, src]) => document.getElementById("curves").append(fig(src, n)));
// the prediction browser
const filter = document.getElementById("filter"), sort = document.getElementById("sort"), sortRun = document.getElementById("sortrun"),
  view = document.getElementById("view");
[...new Set(D.images.flatMap(m => m.classes))].sort().forEach(c => filter.append(el("option", {value: c}, c)));
D.students.forEach(n => sortRun.append(el("option", {value: n}, n)));
let page = 0;
function shown() { const c = filter.value, r = sortRun.value;
  const gain = m => (m.iou[r] ?? 0) - (m.iou[D.baseline] ?? 0);
  const list = D.images.filter(m => !c || m.classes.includes(c));
  if (sort.value === "helped") list.sort((a, b) => gain(b) - gain(a));
  else if (sort.value === "hurt") list.sort((a, b) => gain(a) - gain(b));
  return list; }
function drawBrowser() { const list = shown(), pages = Math.max(1, Math.ceil(list.length / PER_PAGE));
  page = Math.min(Math.max(page, 0), pages - 1);
  document.getElementById("page").textContent = `page ${page + 1} of ${pages} (${list.length} images)`;
  document.getElementById("browser").replaceChildren(...list.slice(page * PER_PAGE, (page + 1) * PER_PAGE).map(m => {
    const maps = view.value === "map", row = el("div", {class: "row", "data-id": m.id});
    row.append(fig(m.files.image, m.id), fig(maps ? m.files.truth_map : m.files.truth, "ground truth"));
    Object.entries(maps ? m.maps : m.runs).forEach(([n, src]) => row.append(fig(src, `${n}: IoU ${pct(m.iou[n])}`))); return row; })); }
[filter, sort, sortRun].forEach(s => s.onchange = () => { page = 0; drawBrowser(); });
view.onchange = drawBrowser;
document.getElementById("prev").onclick = () => { page--; drawBrowser(); };
document.getElementById("next").onclick = () => { page++; drawBrowser(); };
document.addEventListener("keydown", e => { if (e.key === "ArrowLeft") { page--; drawBrowser(); }
  if (e.key === "ArrowRight") { page++; drawBrowser(); } });
if (D.images.length) drawBrowser(); else document.getElementById("predictions").hidden = true;
// classification: confusion matrices and the images each run gets wrong
if (Object.keys(D.confusion).length) { Object.entries(D.confusion).forEach(([n, src]) => document.getElementById("confusion").append(fig(src, n)));
  Object.entries(D.wrong).forEach(([n, list]) => { const d = el("div"); d.append(el("h3", {}, n));
    list.forEach(w => d.append(fig(w.file, w.caption))); document.getElementById("wrong").append(d); }); }
else document.getElementById("classification").hidden = true;
</script></body></html>
"""
