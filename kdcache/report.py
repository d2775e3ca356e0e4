"""Rich tables of evaluation results (percentages, as the seeds' tables print them)."""

from __future__ import annotations

import math

from rich.table import Table


def pct(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{100 * x:.{digits}f}"


def summary_table(report: dict) -> Table:
    lat = report.get("latency") or {}
    t = Table(title=f"{report['model']} on {report['dataset']} / {report['split']} ({report['num_samples']} images)")
    for col in ("mIoU", "mAcc", "aAcc", "#params", "ms/image", "FPS"):
        t.add_column(col, justify="right")
    t.add_row(
        pct(report["miou"]), pct(report["macc"]), pct(report["aacc"]),
        f"{report['params'] / 1e6:.2f}M",
        f"{lat['ms_per_image']:.2f}" if lat else "—",
        f"{lat['fps']:.1f}" if lat else "—",
    )
    if lat:
        t.caption = f"latency: batch 1, {tuple(lat['input_size'])}, median of {lat['repeats']}, {lat['device']}"
    return t


def per_class_table(report: dict) -> Table:
    t = Table(title="per class (%)")
    t.add_column("class")
    t.add_column("IoU", justify="right")
    t.add_column("Acc", justify="right")
    for name, iou, acc in zip(report["class_names"], report["iou"], report["acc"]):
        t.add_row(name, pct(iou), pct(acc))
    return t
