"""What the commands print: rich tables of evaluation results (metrics in percent), of a cache's inspection and of a comparison, and bench-kernels' Markdown table."""

from __future__ import annotations

import math

from rich.table import Table

from kdcache.report.compare import class_key, notable_classes, signed_pct


def pct(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{100 * x:.{digits}f}"


def summary_table(report: dict) -> Table:
    lat = report.get("latency") or {}
    t = Table(title=f"{report['model']} on {report['dataset']} / {report['split']} ({report['num_samples']} images)")
    classification = report.get("task") == "classification"
    cols = ("top-1", "top-5", "mAcc") if classification else ("mIoU", "mAcc", "aAcc")
    for col in (*cols, "#params", "ms/image", "FPS"):
        t.add_column(col, justify="right")
    t.add_row(
        *((pct(report["top1"]), pct(report["top5"]), pct(report["macc"])) if classification
          else (pct(report["miou"]), pct(report["macc"]), pct(report["aacc"]))),
        f"{report['params'] / 1e6:.2f}M",
        f"{lat['ms_per_image']:.2f}" if lat else "—",
        f"{lat['fps']:.1f}" if lat else "—",
    )
    if lat:
        t.caption = f"latency: batch 1, {tuple(lat['input_size'])}, median of {lat['repeats']}, {lat['device']}"
        if report.get("backend") == "onnxruntime":
            t.caption += ", ONNX Runtime"
    return t


def per_class_table(report: dict) -> Table:
    t = Table(title="per class (%)")
    t.add_column("class")
    classification = report.get("task") == "classification"
    if not classification:
        t.add_column("IoU", justify="right")
    t.add_column("Acc", justify="right")
    if classification:
        t.add_column("images", justify="right")
        for name, acc, n in zip(report["class_names"], report["acc"], report["gt_pixels"]):
            t.add_row(name, pct(acc), str(n))
        return t
    for name, iou, acc in zip(report["class_names"], report["iou"], report["acc"]):
        t.add_row(name, pct(iou), pct(acc))
    return t


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


def cache_report(report: dict) -> list:
    """``inspect-cache``'s tables: store, provenance, arrays and top-k coverage."""
    t = Table(title=f"teacher cache {report['path']}", show_header=False)
    t.add_column("", style="bold")
    t.add_column("")
    bpp = report["bytes_per_pixel"]
    dense = report["dense_fp32_bytes_per_pixel"]
    about = dict(report["about"])
    rows = [
        ("schema", about.pop("schema")),
        ("samples", f"{report['done']} done / {report['num_samples']} ({report['shards']} shards of "
                    f"{report['samples_per_shard']})"),
        ("size on disk", human_bytes(report["bytes_on_disk"])),
        ("bytes / pixel", (f"{bpp:.2f} on disk ({report['bytes_per_pixel_uncompressed']} raw) vs "
                           f"{dense} for a dense fp32 map: {dense / bpp:.1f}x smaller") if bpp else "—"),
        *about.items(),
    ]
    for k, v in rows:
        t.add_row(k, str(v))
    arrays = Table(title="arrays")
    for col in ("array", "shape", "dtype", "chunk", "shard", "on disk"):
        arrays.add_column(col, justify="left" if col == "array" else "right", no_wrap=col == "array")
    for a in report["arrays"]:
        arrays.add_row(a["path"], "x".join(map(str, a["shape"])), a["dtype"], "x".join(map(str, a["chunks"])),
                       "x".join(map(str, a["shards"])), human_bytes(a["bytes"]))
    out = [t, arrays]
    if report.get("coverage"):
        cov = Table(title=f"teacher probability mass in the top {report['k']} ({report['coverage_samples']} samples)")
        cov.add_column("T", justify="right")
        cov.add_column("mean", justify="right")
        cov.add_column("5th percentile", justify="right")
        for key, v in report["coverage"].items():
            cov.add_row(key.split("=")[1], pct(v["mean"]), pct(v["p5"]))
        cov.caption = "exact at T = 1; at T > 1 the tail's classes are taken as equal (the 'bin' policy)"
        out.append(cov)
    q = report.get("teacher_quality")
    if q and q["rows"]:
        labelled = q["labelled_pixels"] > 0
        classification = bool(report.get("classification"))
        qt = Table(title=f"teacher quality ({q['samples']} samples"
                         + ((f", {q['labelled_pixels']} labelled images)" if classification
                             else f", {q['labelled_pixels']} labelled pixels)") if labelled else ", no labels)"))
        qt.add_column("teacher output", no_wrap=True)
        shown = ("top-1", "NLL / image") if classification else ("mIoU", "aAcc", "NLL / pixel")
        for col in (shown if labelled else ()) + ("agrees with combined",):
            qt.add_column(col, justify="right")
        for name, r in q["rows"].items():
            cells = []
            if labelled:
                cells = ([pct(r["aacc"]), f"{r['nll']:.4f}"] if classification
                         else [pct(r["miou"]), pct(r["aacc"]), f"{r['nll']:.4f}"])
            qt.add_row(name, *cells, pct(r["agreement"]))
        qt.caption = ("the classifier's prediction (a label map's mean over its cells); agreement: the share of map "
                      "cells whose top class is the combination's" if classification else
                      "at the labels' resolution (logits upsampled, as evaluate does); agreement: the share of "
                      "map cells whose top class is the combination's")
        out.append(qt)
    return out


def compare_table(result: dict, width: int | None = None) -> Table:
    """``compare``'s table: one row per run, each run and method named whole. In a terminal
    narrower than the full table (``width``), FPS, then aAcc, then mAcc are left out (they stay in
    compare.md/.csv/.json) so that nothing is cut."""
    note = "best-on-validation checkpoints" if result.get("split_given") else "best checkpoints"
    classification = result.get("task") == "classification"
    rows = []
    for r in result["rows"]:
        key = "delta_top1" if classification else "delta_miou"
        delta = "—" if r[key] is None else ("base" if r["baseline"] else signed_pct(r[key]))
        main = ({"top-1": pct(r["top1"]), "Δ top-1": delta, "top-5": pct(r["top5"])} if classification
                else {"mIoU": pct(r["miou"]), "Δ mIoU": delta})
        rows.append({"run": r["name"], "method": r["method"], **main,
                     "mAcc": pct(r["macc"]), "aAcc": pct(r["aacc"]), "#params": f"{r['params'] / 1e6:.3f}M",
                     "ms/img": "—" if r["ms_per_image"] is None else f"{r['ms_per_image']:.2f}",
                     "FPS": "—" if r["fps"] is None else f"{r['fps']:.0f}"})
    cols = (["run", "method", "top-1", "Δ top-1", "top-5", "mAcc", "#params", "ms/img", "FPS"] if classification
            else ["run", "method", "mIoU", "Δ mIoU", "mAcc", "aAcc", "#params", "ms/img", "FPS"])

    # the method column may wrap between words (never inside one); every other column stays whole
    method_min = max(len("method"), *(len(w) for x in rows for w in x["method"].split()))

    def needed(cs):  # each column's widest cell or header, plus 3 for padding and its border
        return 1 + sum(3 + (method_min if c == "method" else max(len(c), *(len(x[c]) for x in rows))) for c in cs)

    dropped = []
    for optional in ("FPS", "aAcc", "mAcc", "top-5"):
        if optional not in cols:
            continue
        if width is None or needed(cols) <= width:
            break
        cols.remove(optional)
        dropped.append(optional)
    t = Table(title=f"{result['dataset']} / {result['split']} ({result['num_samples']} images, {note}), %")
    for c in cols:
        if c == "method":
            t.add_column(c, min_width=method_min, overflow="fold")
        else:
            t.add_column(c, justify="left" if c == "run" else "right", no_wrap=True)
    for x in rows:
        t.add_row(*[x[c] for c in cols])
    caption = []
    if result.get("latency_device"):
        caption.append(f"latency: batch 1, {result['latency_device']}; one measurement per architecture, "
                       "interleaved in rounds")
    if dropped:
        caption.append(f"{', '.join(dropped)} in compare.md (too narrow a terminal)")
    t.caption = "; ".join(caption) or None
    return t


def compare_per_class_table(result: dict) -> Table:
    """Where distillation helps and hurts, per class, in 80 columns: the teacher's score, the
    baseline's and each student's Δ against it, for the classes where a run differs from the
    baseline by more than a point or the teacher is below it (without a baseline: every run's
    score for the worst classes); the rest are in compare.md/.csv/.json."""
    key, what = class_key(result)
    view, rows = result["per_class"], result["rows"]
    shown = notable_classes(result)
    base = next((r for r in rows if r["baseline"]), None)
    if base is None:
        t = Table(title=f"per-class {what}, % (the worst classes; no baseline run)")
        t.add_column("class", no_wrap=True)
        for r in rows:
            t.add_column(r["name"], justify="right", overflow="fold")
        for c in shown:
            t.add_row(result["class_names"][c], *[pct(r[key][c], 1) for r in rows])
    else:
        teacher = next((r for r in rows if r.get("teacher")), None)
        names = list(view[0]["delta"]) if view else []
        t = Table(title=f"per-class {what}, %: Δ against {base['name']}")
        t.add_column("class", no_wrap=True)
        if teacher is not None:
            t.add_column("teacher", justify="right")
        t.add_column("base", justify="right")
        for n in names:
            t.add_column(f"Δ {n}", justify="right", overflow="fold")
        for c in shown:
            v = view[c]
            flag = " !" if v["teacher_below_baseline"] else ""
            cells = [v["class"] + flag] + ([pct(v["teacher"], 1)] if teacher is not None else []) + [pct(v["baseline"], 1)]
            cells += ["—" if v["delta"][n] is None else signed_pct(v["delta"][n]) for n in names]
            t.add_row(*cells)
        notes = []
        if teacher is not None:
            notes.append("! teacher below the baseline")
        else:
            notes.append("teacher: give its run among RUNS")
        if len(shown) < len(view):
            notes.append(f"{len(view) - len(shown)} classes within a point of the baseline: compare.md")
        t.caption = "; ".join(notes)
    return t


def kernel_table(result: dict) -> str:
    """bench-kernels' Markdown table. The columns a run has no numbers for are left out: the
    forward and backward apart (timed on CUDA alone: the CPU kernel computes both in one call), and
    the bytes moved with the share of the floor (on the CPU the one call moves exactly the floor)."""
    cp = result["copy_gbps"]
    cases = result["cases"]
    split = any("fused_fwd" in c["ms"] for c in cases)
    moves = any((c.get("moved_bytes") or c["floor_bytes"]) != c["floor_bytes"] for c in cases)
    call = any("fused_call" in c["ms"] for c in cases)  # CUDA: device times, and the call from an idle GPU
    lines = [
        f"Device: {result['device']}; student {result['dtype']}, teacher fp16 values + uint8/int32 ids + fp16 tail; "
        f"copy bandwidth measured in the same run: {cp:.1f} GB/s."
        + (" Shapes scaled down for the CPU (the GPU cases are N=8×512×1024 and 4096 rows)." if result["scaled_down"] else "")
        + " floor: the bytes of one pass (student read once, teacher read, gradient written)"
        + ("; moved: what the fused kernels read and write; % of copy: the fused GB/s on the bytes moved; % of floor: "
           "the floor's bytes at the copy rate over the fused time." if moves else
           "; the fused kernel moves exactly these; % of copy: the fused GB/s on them.")
        + (" Times are the device's: each call is queued behind a GPU spin, so the host's overhead (Python, "
           "dispatch, launches) overlaps it, as in a training loop whose host runs ahead. one call: the fused "
           "forward + backward from an idle GPU, host overhead included (a small step bound by its host); host: "
           "the host's ms to queue the fused call." if call else ""),
        "",
    ]
    head = ["case", "k", "floor MB", *(["moved MB"] if moves else []), *(["fused fwd ms", "fused bwd ms"] if split else []),
            "fused ms", *(["fused one call ms", "fused host ms"] if call else []), "eager ms", "compile ms", "% of copy",
            *(["% of floor"] if moves else []), "× eager", "× compile"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cases:
        ms, gb = c["ms"], c["gbps"]
        shape = "×".join(map(str, c["shape"]))
        moved = c.get("moved_bytes") or c["floor_bytes"]

        def cell(b, ms=ms):
            return f"{ms[b]:.2f}" if b in ms else "—"

        def ratio(b, ms=ms):
            return f"{ms[b] / ms['fused']:.2f}" if b in ms and "fused" in ms else "—"

        floor_share = (f"{100 * c['floor_bytes'] / (cp * 1e9) / (ms['fused'] * 1e-3):.0f}%" if "fused" in ms else "—")
        row = [f"{c['kind']} {shape}", str(c["k"]), f"{c['floor_bytes'] / 1e6:.1f}", *([f"{moved / 1e6:.1f}"] if moves else []),
               *([cell("fused_fwd"), cell("fused_bwd")] if split else []), cell("fused"),
               *([cell("fused_call"), cell("fused", c.get("host_ms", {}))] if call else []), cell("eager"), cell("compile"),
               f"{100 * gb.get('fused', float('nan')) / cp:.0f}%", *([floor_share] if moves else []), ratio("eager"),
               ratio("compile")]
        lines.append("| " + " | ".join(row) + " |")
    errors = [(c, b, e) for c in result["cases"] for b, e in c["errors"].items()]
    if errors:
        lines += ["", "Not measured: " + "; ".join(f"{'×'.join(map(str, c['shape']))} k={c['k']} {b}: {e}" for c, b, e in errors)]
    notes = [(c, n) for c in result["cases"] for n in c.get("notes", [])]
    if notes:
        lines += ["", "Notes: " + "; ".join(f"{'×'.join(map(str, c['shape']))} k={c['k']}: {n}" for c, n in notes)]
    return "\n".join(lines) + "\n"
