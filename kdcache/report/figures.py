"""Qualitative figures: colourised masks, overlays, sample panels, comparison grids and plots.

Each figure has a builder that returns the ``matplotlib.figure.Figure`` (tests read its bars,
lines and images back) and a ``save_*`` function that writes it as a PNG. Figures are built
with ``matplotlib.figure.Figure`` directly (never through ``pyplot``), so
no display or GUI backend is needed, the global backend is left alone and no figure stays open
after saving. matplotlib is imported by the first figure, not with kdcache (a second of every
command's start). Masks are ``[H, W]`` integer class ids; images are ``[H, W, 3]`` uint8 RGB;
palettes are ``[C, 3]`` uint8.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kdcache.core.metrics import per_image_iou

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

__all__ = [
    "colorize",
    "overlay",
    "sample_panel_figure",
    "comparison_grid_figure",
    "iou_histogram_figure",
    "per_class_bars_figure",
    "training_curves_figure",
    "save_sample_panel",
    "save_comparison_grid",
    "save_iou_histogram",
    "save_per_class_bars",
    "save_training_curves",
    "confusion_matrix_figure",
    "save_confusion_matrix",
    "class_examples_figure",
    "save_class_examples",
]

_PANEL_INCHES = 4.0  # height of one image panel
_LEGEND_COLS = 6
#: the training curves' size (inches) and font sizes (points): text that stays readable where the
#: figure is shown at about two thirds of its size, as compare's page shows it
CURVES_INCHES = (8.0, 3.4)
CURVES_FONT = {"title": 13, "label": 12, "tick": 11, "legend": 11}


def _check_palette(palette: Any) -> np.ndarray:
    pal = np.asarray(palette)
    if pal.ndim != 2 or pal.shape[1] != 3 or pal.shape[0] < 1:
        raise ValueError(f"palette must have shape [C, 3], got {pal.shape}")
    if pal.dtype != np.uint8:
        if pal.min() < 0 or pal.max() > 255:
            raise ValueError("palette values must lie in [0, 255]")
        pal = pal.astype(np.uint8)
    return pal


def _check_mask(mask: Any, name: str = "mask") -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"{name} must have shape [H, W], got {m.shape}")
    if not np.issubdtype(m.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class ids, got dtype {m.dtype}")
    return m


def _check_image(image: Any, shape: tuple[int, int] | None = None) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"image must be uint8 [H, W, 3], got {img.dtype} {img.shape}")
    if shape is not None and img.shape[:2] != shape:
        raise ValueError(f"image is {img.shape[:2]} but the masks are {shape}")
    return img


def colorize(
    mask: np.ndarray,
    palette: np.ndarray,
    ignore_index: int = 255,
    ignore_color: tuple[int, int, int] = (0, 0, 0),
) -> np.ndarray:
    """Map class ids ``[H, W]`` to palette colours ``[H, W, 3]`` uint8.

    Pixels equal to ``ignore_index`` get ``ignore_color``; any other id outside
    ``[0, len(palette))`` raises ``ValueError``.
    """
    m = _check_mask(mask)
    pal = _check_palette(palette)
    ignore = m == ignore_index
    bad = ~ignore & ((m < 0) | (m >= len(pal)))
    if bad.any():
        vals = np.unique(m[bad])[:10].tolist()
        raise ValueError(
            f"mask has class ids outside [0, {len(pal)}) that are not ignore_index "
            f"({ignore_index}): {vals}"
        )
    out = pal[np.where(ignore, 0, m).astype(np.intp)]
    out[ignore] = np.asarray(ignore_color, dtype=np.uint8)
    return out


def overlay(
    image: np.ndarray,
    mask: np.ndarray,
    palette: np.ndarray,
    alpha: float = 0.5,
    ignore_index: int = 255,
) -> np.ndarray:
    """Blend the colourised mask over the image: ``(1 - alpha) * image + alpha * colour``.

    Ignored pixels keep the image. Returns uint8 ``[H, W, 3]``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    m = _check_mask(mask)
    img = _check_image(image, m.shape)
    colors = colorize(m, palette, ignore_index=ignore_index).astype(np.float64)
    blended = (1.0 - alpha) * img.astype(np.float64) + alpha * colors
    out = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    ignore = m == ignore_index
    out[ignore] = img[ignore]
    return out


def _class_name(class_names: Sequence[str] | None, c: int) -> str:
    if class_names is not None and c < len(class_names):
        return str(class_names[c])
    return f"class {c}"


def _legend_handles(
    masks: Sequence[np.ndarray],
    palette: np.ndarray,
    class_names: Sequence[str] | None,
    ignore_index: int,
) -> list[Patch]:
    present: set[int] = set()
    for m in masks:
        present.update(int(v) for v in np.unique(m))
    present.discard(ignore_index)
    from matplotlib.patches import Patch

    return [
        Patch(
            facecolor=palette[c] / 255.0,
            edgecolor="black",
            linewidth=0.5,
            label=_class_name(class_names, c),
        )
        for c in sorted(present)
        if 0 <= c < len(palette)
    ]


def _figure(**kwargs) -> Figure:
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _prepare_path(path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def _save(fig: Figure, path: str | Path, dpi: int) -> Path:
    out = _prepare_path(path)
    fig.savefig(out, dpi=dpi)
    return out


def _image_row(
    panels: Sequence[tuple[str, np.ndarray]],
    handles: list[Patch],
    title: str,
    dpi: int,
) -> Figure:
    """Images in one row with panel titles, a suptitle and a legend below."""
    h, w = panels[0][1].shape[:2]
    n = len(panels)
    legend_rows = math.ceil(len(handles) / _LEGEND_COLS) if handles else 0
    scale = _PANEL_INCHES / max(h, w, 1)  # the longer image side gets _PANEL_INCHES
    panel_w, panel_h = w * scale, h * scale
    extra_h = 0.6 + 0.25 * legend_rows + (0.4 if title else 0.0)
    fig_h = panel_h + extra_h
    fig = _figure(figsize=(max(panel_w * n * 1.03, 4.0), fig_h), dpi=dpi)
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, (name, arr) in zip(axes, panels, strict=True):
        ax.imshow(arr, interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=12)
    if handles:
        fig.legend(
            handles=handles,
            loc="lower center",
            ncol=min(len(handles), _LEGEND_COLS),
            fontsize=9,
            frameon=False,
            handlelength=1.2,
            columnspacing=1.0,
        )
    top = 1.0 - (0.4 + (0.4 if title else 0.0)) / fig_h
    bottom = (0.2 + 0.25 * legend_rows) / fig_h
    fig.subplots_adjust(left=0.01, right=0.99, top=top, bottom=bottom, wspace=0.03)
    return fig


def sample_panel_figure(
    image: np.ndarray,
    gt: np.ndarray,
    pred: np.ndarray,
    palette: np.ndarray,
    class_names: Sequence[str] | None,
    title: str = "",
    ignore_index: int = 255,
    alpha: float = 0.5,
    dpi: int = 100,
) -> Figure:
    """One row: image, ground truth, prediction, prediction over image.

    ``title`` becomes the suptitle (e.g. ``"sample train_000012 — IoU 0.812"``); the legend
    lists the classes present in ``gt`` or ``pred``.
    """
    g = _check_mask(gt, "gt")
    p = _check_mask(pred, "pred")
    if g.shape != p.shape:
        raise ValueError(f"gt and pred shapes differ: {g.shape} vs {p.shape}")
    img = _check_image(image, g.shape)
    pal = _check_palette(palette)
    panels = [
        ("Image", img),
        ("Ground truth", colorize(g, pal, ignore_index)),
        ("Prediction", colorize(p, pal, ignore_index)),
        ("Overlay (prediction)", overlay(img, p, pal, alpha, ignore_index)),
    ]
    handles = _legend_handles([g, p], pal, class_names, ignore_index)
    return _image_row(panels, handles, title, dpi)


def save_sample_panel(path: str | Path, image: np.ndarray, gt: np.ndarray, pred: np.ndarray,
                      palette: np.ndarray, class_names: Sequence[str] | None, title: str = "",
                      ignore_index: int = 255, alpha: float = 0.5, dpi: int = 100) -> Path:
    """Save :func:`sample_panel_figure` as a PNG; returns the written path."""
    fig = sample_panel_figure(image, gt, pred, palette, class_names, title, ignore_index, alpha, dpi)
    return _save(fig, path, dpi)


def comparison_grid_figure(
    image: np.ndarray,
    gt: np.ndarray,
    preds: Mapping[str, np.ndarray],
    palette: np.ndarray,
    class_names: Sequence[str] | None,
    title: str = "",
    ignore_index: int = 255,
    show_iou: bool = True,
    dpi: int = 100,
) -> Figure:
    """One row: image, ground truth, then each run's prediction (titled by name).

    With ``show_iou`` each prediction title adds its per-image mIoU (classes = palette rows).
    The legend lists the classes present in ``gt`` or any prediction.
    """
    if not preds:
        raise ValueError("preds is empty: give at least one run's prediction")
    g = _check_mask(gt, "gt")
    img = _check_image(image, g.shape)
    pal = _check_palette(palette)
    panels: list[tuple[str, np.ndarray]] = [
        ("Image", img),
        ("Ground truth", colorize(g, pal, ignore_index)),
    ]
    masks = [g]
    for name, pred in preds.items():
        p = _check_mask(pred, f"preds[{name!r}]")
        if p.shape != g.shape:
            raise ValueError(f"preds[{name!r}] is {p.shape} but gt is {g.shape}")
        label = str(name)
        if show_iou:
            iou = per_image_iou(p, g, len(pal), ignore_index)
            label = f"{label} — IoU {iou:.3f}" if not math.isnan(iou) else f"{label} — IoU n/a"
        panels.append((label, colorize(p, pal, ignore_index)))
        masks.append(p)
    handles = _legend_handles(masks, pal, class_names, ignore_index)
    return _image_row(panels, handles, title, dpi)


def save_comparison_grid(path: str | Path, image: np.ndarray, gt: np.ndarray,
                         preds: Mapping[str, np.ndarray], palette: np.ndarray,
                         class_names: Sequence[str] | None, title: str = "", ignore_index: int = 255,
                         show_iou: bool = True, dpi: int = 100) -> Path:
    """Save :func:`comparison_grid_figure` as a PNG; returns the written path."""
    fig = comparison_grid_figure(image, gt, preds, palette, class_names, title, ignore_index,
                                 show_iou, dpi)
    return _save(fig, path, dpi)


def iou_histogram_figure(
    ious: Sequence[float],
    title: str = "",
    bins: int = 20,
    dpi: int = 100,
) -> Figure:
    """A histogram of per-image IoU (fractions in [0, 1]; NaN dropped) with mean/median lines.

    ``bins`` equal bins over [0, 1]. An empty list (after dropping NaN) gives a figure saying so.
    """
    vals = np.asarray(list(ious), dtype=np.float64)
    vals = vals[~np.isnan(vals)]
    fig = _figure(figsize=(6.0, 4.0), dpi=dpi)
    ax = fig.subplots()
    if vals.size:
        ax.hist(vals, bins=np.linspace(0.0, 1.0, bins + 1), color="#4c72b0", edgecolor="white")
        mean, median = float(vals.mean()), float(np.median(vals))
        ax.axvline(mean, color="#c44e52", linestyle="-", linewidth=1.5, label=f"mean {mean:.3f}")
        ax.axvline(
            median, color="#55a868", linestyle="--", linewidth=1.5, label=f"median {median:.3f}"
        )
        ax.legend(loc="upper left", fontsize=9)
    else:
        ax.text(0.5, 0.5, "no valid IoU values", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("per-image mIoU")
    ax.set_ylabel("images")
    ax.set_title(f"{title} (n={vals.size})" if title else f"n={vals.size}", fontsize=11)
    fig.tight_layout()
    return fig


def save_iou_histogram(path: str | Path, ious: Sequence[float], title: str = "", bins: int = 20,
                       dpi: int = 100) -> Path:
    """Save :func:`iou_histogram_figure` as a PNG; returns the written path."""
    return _save(iou_histogram_figure(ious, title, bins, dpi), path, dpi)


def per_class_bars_figure(
    class_names: Sequence[str],
    series: Mapping[str, Sequence[float]],
    title: str = "",
    dpi: int = 100,
    ylabel: str = "IoU (%)",
) -> Figure:
    """A grouped bar chart of per-class IoU in percent, one bar group per class.

    ``series`` maps a run name to its per-class IoU as fractions in [0, 1] (one per class).
    NaN (class undefined) is drawn as a zero-height bar with an ``x`` marker at 0.
    """
    if not series:
        raise ValueError("series is empty: give at least one run's per-class IoU")
    n_cls = len(class_names)
    data: dict[str, np.ndarray] = {}
    for name, values in series.items():
        arr = np.asarray(list(values), dtype=np.float64)
        if arr.shape != (n_cls,):
            raise ValueError(
                f"series {name!r} has {arr.size} values but there are {n_cls} class names"
            )
        data[str(name)] = arr * 100.0
    n_runs = len(data)
    width = 0.8 / n_runs
    x = np.arange(n_cls)
    fig_w = min(max(6.0, 0.25 * n_cls * max(1.0, 0.6 * n_runs) + 1.5), 60.0)
    fig = _figure(figsize=(fig_w, 4.5), dpi=dpi)
    ax = fig.subplots()
    for i, (name, vals) in enumerate(data.items()):
        pos = x - 0.4 + width * (i + 0.5)
        nan = np.isnan(vals)
        bars = ax.bar(pos, np.where(nan, 0.0, vals), width=width, label=name)
        if nan.any():
            ax.plot(
                pos[nan],
                np.zeros(int(nan.sum())),
                linestyle="none",
                marker="x",
                color=bars.patches[0].get_facecolor(),
                markersize=6,
                clip_on=False,
                zorder=3,
            )
    if any(np.isnan(v).any() for v in data.values()):
        ax.plot([], [], linestyle="none", marker="x", color="black", label="undefined (NaN)")
    ax.set_xticks(x)
    ax.set_xticklabels([str(c) for c in class_names], rotation=90, fontsize=8)
    ax.set_xlim(-0.6, n_cls - 0.4)
    ax.set_ylim(0.0, 100.0)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: labels[i] == "undefined (NaN)")
    ax.legend(
        [handles[i] for i in order],
        [labels[i] for i in order],
        fontsize=8,
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        frameon=False,
    )
    if title:
        ax.set_title(title, fontsize=11)
    fig.tight_layout()
    return fig


def save_per_class_bars(path: str | Path, class_names: Sequence[str],
                        series: Mapping[str, Sequence[float]], title: str = "", dpi: int = 100,
                        ylabel: str = "IoU (%)") -> Path:
    """Save :func:`per_class_bars_figure` as a PNG; returns the written path."""
    return _save(per_class_bars_figure(class_names, series, title, dpi, ylabel), path, dpi)


def confusion_matrix_figure(matrix: Any, class_names: Sequence[str], title: str = "", dpi: int = 100) -> Figure:
    """The confusion matrix ``[C, C]`` (rows: true class, columns: predicted), each row
    normalised to the share of its class's samples, with the counts written in the cells when
    there are at most 30 classes. Rows of a class without samples stay empty."""
    m = np.asarray(matrix, dtype=np.float64)
    n = len(class_names)
    if m.shape != (n, n):
        raise ValueError(f"matrix has shape {m.shape} but there are {n} class names")
    totals = m.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(totals > 0, m / np.maximum(totals, 1), np.nan)
    side = min(max(4.0, 0.45 * n + 2.0), 40.0)
    fig = _figure(figsize=(side + 1.2, side), dpi=dpi)
    ax = fig.subplots()
    im = ax.imshow(share * 100, cmap="Blues", vmin=0, vmax=100, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="% of the true class")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if m[i, j]:
                    ax.text(j, i, str(int(m[i, j])), ha="center", va="center", fontsize=7,
                            color="white" if share[i, j] > 0.5 else "black")
    ticks = np.arange(n)
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_xticklabels([str(c) for c in class_names], rotation=90, fontsize=8)
    ax.set_yticklabels([str(c) for c in class_names], fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title, fontsize=11)
    fig.tight_layout()
    return fig


def save_confusion_matrix(path: str | Path, matrix: Any, class_names: Sequence[str], title: str = "",
                          dpi: int = 100) -> Path:
    """Save :func:`confusion_matrix_figure` as a PNG; returns the written path."""
    return _save(confusion_matrix_figure(matrix, class_names, title, dpi), path, dpi)


def class_examples_figure(images: Sequence[np.ndarray], captions: Sequence[Sequence[str]], title: str = "",
                          dpi: int = 100) -> Figure:
    """Classified images in a row, each with its lines of caption below (the true class, then
    each model's prediction and confidence); a caption line starting with ``✗`` is drawn red."""
    if len(images) != len(captions) or not images:
        raise ValueError("give one caption (a list of lines) per image, and at least one image")
    n = len(images)
    lines = max(len(c) for c in captions)
    fig = _figure(figsize=(max(2.2 * n, 4.0), 2.4 + 0.22 * lines + (0.4 if title else 0)), dpi=dpi)
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, image, caption in zip(axes, images, captions):
        ax.imshow(_check_image(image), interpolation="nearest")
        ax.set_axis_off()
        for i, line in enumerate(caption):
            ax.text(0.5, -0.06 - 0.13 * i, line, transform=ax.transAxes, ha="center", va="top", fontsize=8,
                    color="tab:red" if line.startswith("✗") else "black")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.subplots_adjust(left=0.02, right=0.98, top=0.86 if title else 0.95, bottom=0.1 + 0.05 * lines, wspace=0.1)
    return fig


def save_class_examples(path: str | Path, images: Sequence[np.ndarray], captions: Sequence[Sequence[str]],
                        title: str = "", dpi: int = 100) -> Path:
    """Save :func:`class_examples_figure` as a PNG; returns the written path."""
    return _save(class_examples_figure(images, captions, title, dpi), path, dpi)


def training_curves_figure(records: Sequence[Mapping[str, Any]], terms: Sequence[str],
                           title: str = "", dpi: int = 100) -> Figure:
    """The loss terms of each epoch record (``terms``: record keys such as ``train_loss``) on the
    left and the validation mIoU in percent on the right, against the epoch counted from 1.
    Records without an ``epoch`` (e.g. evaluations) are skipped; a missing value is a gap."""
    epochs = [r for r in records if "epoch" in r]
    if not epochs:
        raise ValueError("no epoch records to plot")
    x = [r["epoch"] + 1 for r in epochs]
    fig = _figure(figsize=CURVES_INCHES, dpi=dpi)
    from matplotlib.ticker import MaxNLocator  # matplotlib is loaded by _figure already
    ax_l, ax_m = fig.subplots(1, 2)
    for k in terms:
        ys = [r.get(k, float("nan")) for r in epochs]
        ax_l.plot(x, ys, marker="o", markersize=4, label=k.removeprefix("train_"))
    if terms:
        ax_l.legend(fontsize=CURVES_FONT["legend"])
    key, what = ("val_top1", "top-1 accuracy") if any("val_top1" in r for r in epochs) else ("val_miou", "mIoU")
    val = [(r["epoch"] + 1, 100 * r[key]) for r in epochs if r.get(key) is not None]
    if val:
        ax_m.plot([v[0] for v in val], [v[1] for v in val], marker="o", markersize=4, color="tab:green")
    for ax, ylabel, name in ((ax_l, "loss", "training loss terms"), (ax_m, f"val {what} (%)", f"validation {what}")):
        ax.set_xlabel("epoch", fontsize=CURVES_FONT["label"])
        ax.set_ylabel(ylabel, fontsize=CURVES_FONT["label"])
        ax.set_title(name, fontsize=CURVES_FONT["title"])
        ax.tick_params(labelsize=CURVES_FONT["tick"])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # whole epochs
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=CURVES_FONT["title"])
    # fixed margins, not tight_layout: every training run draws this figure once, and tight_layout's
    # own layout pass would be a large share of its drawing time
    fig.subplots_adjust(left=0.1, right=0.985, bottom=0.17, top=0.8 if title else 0.88, wspace=0.3)
    return fig


def save_training_curves(path: str | Path, records: Sequence[Mapping[str, Any]], terms: Sequence[str],
                         title: str = "", dpi: int = 100) -> Path:
    """Save :func:`training_curves_figure` as a PNG; returns the written path."""
    return _save(training_curves_figure(records, terms, title, dpi), path, dpi)
