"""Tests for kdcache.report.figures: exact colours and overlays, figures whose bars, histogram
counts, lines and image panels equal the numbers behind them, and valid PNG files."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from kdcache.report.figures import (  # noqa: E402
    colorize,
    comparison_grid_figure,
    iou_histogram_figure,
    overlay,
    per_class_bars_figure,
    sample_panel_figure,
    save_comparison_grid,
    save_iou_histogram,
    save_per_class_bars,
    save_sample_panel,
    save_training_curves,
    training_curves_figure,
)

IGN = 255
PALETTE = np.array([[128, 64, 128], [244, 35, 232], [70, 70, 70], [102, 102, 156]], np.uint8)
NAMES = ["road", "sidewalk", "building", "wall"]


def _sample(h: int = 24, w: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    gt = np.zeros((h, w), np.uint8)
    gt[:, w // 2 :] = 1
    gt[h // 2 :, :] = 2
    gt[:2, :2] = IGN
    pred = gt.copy()
    pred[:2, :2] = 0
    pred[-4:, -4:] = 3
    return image, gt, pred


def _check_png(path: Path, min_w: int = 200, min_h: int = 150) -> np.ndarray:
    assert path.is_file()
    with Image.open(path) as im:
        assert im.format == "PNG"
        arr = np.asarray(im.convert("RGB"))
    h, w = arr.shape[:2]
    assert w >= min_w and h >= min_h, (w, h)
    assert w <= 10000 and h <= 10000, (w, h)
    assert len(np.unique(arr.reshape(-1, 3), axis=0)) > 5, "image looks blank"
    return arr


@pytest.fixture
def no_figure_leak():
    before = len(plt.get_fignums())
    yield
    assert len(plt.get_fignums()) == before


def test_colorize_exact_palette_and_ignore() -> None:
    mask = np.array([[0, 1, 2], [3, IGN, 0]], np.uint8)
    out = colorize(mask, PALETTE)
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8
    for (i, j), v in np.ndenumerate(mask):
        want = (0, 0, 0) if v == IGN else tuple(PALETTE[v])
        assert tuple(out[i, j]) == want
    white = colorize(mask, PALETTE, ignore_color=(255, 255, 255))
    assert tuple(white[1, 1]) == (255, 255, 255)
    assert np.array_equal(white[0], out[0])
    # int64 masks and a custom ignore index
    custom = colorize(np.array([[-1, 2]]), PALETTE, ignore_index=-1, ignore_color=(1, 2, 3))
    assert tuple(custom[0, 0]) == (1, 2, 3) and tuple(custom[0, 1]) == tuple(PALETTE[2])


def test_colorize_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"\[4\]"):
        colorize(np.array([[0, 4]], np.uint8), PALETTE)
    with pytest.raises(ValueError):
        colorize(np.zeros((2, 2, 1), np.uint8), PALETTE)
    with pytest.raises(ValueError):
        colorize(np.zeros((2, 2), np.uint8), PALETTE[:, :2])
    with pytest.raises(ValueError):
        colorize(np.zeros((2, 2), np.float32), PALETTE)


def test_overlay_alpha_extremes_and_half() -> None:
    image, gt, _ = _sample(6, 8)
    labelled = gt != IGN
    assert np.array_equal(overlay(image, gt, PALETTE, alpha=0.0), image)
    full = overlay(image, gt, PALETTE, alpha=1.0)
    assert full.dtype == np.uint8 and full.shape == image.shape
    assert np.array_equal(full[labelled], PALETTE[gt[labelled]])
    assert np.array_equal(full[~labelled], image[~labelled])
    half = overlay(image, gt, PALETTE, alpha=0.5)
    want = np.rint(0.5 * image[labelled] + 0.5 * PALETTE[gt[labelled]].astype(float))
    assert np.array_equal(half[labelled], want.astype(np.uint8))
    assert np.array_equal(half[~labelled], image[~labelled])
    with pytest.raises(ValueError):
        overlay(image, gt, PALETTE, alpha=1.5)
    with pytest.raises(ValueError):
        overlay(image[:3], gt, PALETTE)


def test_save_sample_panel(tmp_path: Path, no_figure_leak: None) -> None:
    image, gt, pred = _sample()
    out = save_sample_panel(
        tmp_path / "sub" / "panel.png",
        image,
        gt,
        pred,
        PALETTE,
        NAMES,
        title="sample train_000012 — IoU 0.812",
    )
    arr = _check_png(out, min_w=600, min_h=300)
    assert arr.shape[1] > 2 * arr.shape[0]  # one row of four panels
    with pytest.raises(ValueError):
        save_sample_panel(tmp_path / "bad.png", image, gt, pred[:-1], PALETTE, NAMES)
    assert not (tmp_path / "bad.png").exists()


@pytest.mark.slow  # draws a panel (test_save_sample_panel stays quick)
def test_save_sample_panel_without_names_or_title(tmp_path: Path, no_figure_leak: None) -> None:
    image, gt, pred = _sample()
    _check_png(save_sample_panel(tmp_path / "p.png", image, gt, pred, PALETTE, None))


@pytest.mark.slow  # draws a grid of panels
def test_save_comparison_grid(tmp_path: Path, no_figure_leak: None) -> None:
    image, gt, pred = _sample()
    preds = {"student": pred, "kd": gt.copy(), "empty": np.full_like(gt, 3)}
    out = save_comparison_grid(tmp_path / "cmp.png", image, gt, preds, PALETTE, NAMES, "cmp")
    arr = _check_png(out, min_w=700, min_h=300)
    assert arr.shape[1] > 3 * arr.shape[0]  # image, gt and three predictions in one row
    with pytest.raises(ValueError):
        save_comparison_grid(tmp_path / "x.png", image, gt, {}, PALETTE, NAMES)


def test_save_iou_histogram(tmp_path: Path, no_figure_leak: None) -> None:
    rng = np.random.default_rng(1)
    ious = [*rng.uniform(0.3, 0.95, size=50).tolist(), math.nan]
    _check_png(save_iou_histogram(tmp_path / "hist.png", ious, title="val"))
    _check_png(save_iou_histogram(tmp_path / "empty.png", [math.nan]))


def test_save_per_class_bars(tmp_path: Path, no_figure_leak: None) -> None:
    series = {
        "baseline": [0.9, 0.6, math.nan, 0.1],
        "kd": [0.92, 0.65, 0.3, math.nan],
    }
    _check_png(save_per_class_bars(tmp_path / "bars.png", NAMES, series, title="per class"))
    _check_png(save_per_class_bars(tmp_path / "one.png", NAMES, {"only": [0.5] * 4}))
    with pytest.raises(ValueError, match="3 values"):
        save_per_class_bars(tmp_path / "bad.png", NAMES, {"x": [0.1, 0.2, 0.3]})


# -- figure content: what is drawn equals the numbers behind it ------------------------------------

def _image_panels(fig) -> list[tuple[str, np.ndarray]]:
    return [(ax.get_title(), np.asarray(ax.images[0].get_array())) for ax in fig.axes if ax.images]


def test_sample_panel_shows_exactly_the_image_masks_and_overlay() -> None:
    image, gt, pred = _sample()
    fig = sample_panel_figure(image, gt, pred, PALETTE, NAMES, title="t", alpha=0.5)
    panels = _image_panels(fig)
    assert [t for t, _ in panels] == ["Image", "Ground truth", "Prediction", "Overlay (prediction)"]
    want = [image, colorize(gt, PALETTE), colorize(pred, PALETTE), overlay(image, pred, PALETTE, 0.5)]
    for (_, got), w in zip(panels, want, strict=True):
        assert np.array_equal(got, w)
    # the legend names exactly the classes present in gt or pred (3 only in pred), not the ignore
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["road", "sidewalk", "building", "wall"]
    only_gt = sample_panel_figure(image, gt, gt, PALETTE, NAMES)
    assert [t.get_text() for t in only_gt.legends[0].get_texts()] == ["road", "sidewalk", "building"]
    assert fig.get_suptitle() == "t"


def test_comparison_grid_titles_carry_each_runs_per_image_iou() -> None:
    image, gt, pred = _sample()
    preds = {"student": pred, "kd": gt.copy()}
    fig = comparison_grid_figure(image, gt, preds, PALETTE, NAMES)
    panels = _image_panels(fig)
    assert [t for t, _ in panels][:2] == ["Image", "Ground truth"]
    assert panels[2][0].startswith("student — IoU ") and panels[3][0] == "kd — IoU 1.000"
    # student: class 0 lost the 4 ignored pixels (never counted); class 3 steals 16 pixels of class 2
    n2 = int((gt == 2).sum())
    want = np.mean([1.0, 1.0, (n2 - 16) / n2, 0.0])
    assert float(panels[2][0].split("IoU ")[1]) == pytest.approx(want, abs=5e-4)
    assert np.array_equal(panels[2][1], colorize(pred, PALETTE))
    assert np.array_equal(panels[3][1], colorize(gt, PALETTE))


def test_iou_histogram_bars_are_the_counts_per_bin() -> None:
    rng = np.random.default_rng(1)
    vals = rng.uniform(0.0, 1.0, size=137)
    fig = iou_histogram_figure([*vals.tolist(), math.nan, math.nan], bins=10)
    ax = fig.axes[0]
    heights = [p.get_height() for p in ax.patches]
    lefts = [p.get_x() for p in ax.patches]
    want, edges = np.histogram(vals, bins=np.linspace(0, 1, 11))
    assert heights == want.tolist() and sum(heights) == 137
    assert np.allclose(lefts, edges[:-1])
    mean_line, median_line = ax.lines
    assert mean_line.get_xdata()[0] == pytest.approx(vals.mean())
    assert median_line.get_xdata()[0] == pytest.approx(np.median(vals))
    assert ax.get_title() == "n=137"  # the NaNs are dropped, and said so by the count
    empty = iou_histogram_figure([math.nan])
    assert not empty.axes[0].patches and empty.axes[0].texts[0].get_text() == "no valid IoU values"


def test_per_class_bars_heights_are_the_ious_in_percent() -> None:
    series = {"baseline": [0.9, 0.6, math.nan, 0.1], "kd": [0.92, 0.65, 0.3, math.nan]}
    fig = per_class_bars_figure(NAMES, series)
    ax = fig.axes[0]
    containers = ax.containers
    assert [c.get_label() for c in containers] == ["baseline", "kd"]
    for c, vals in zip(containers, series.values(), strict=True):
        got = [p.get_height() for p in c.patches]
        want = [0.0 if math.isnan(v) else 100 * v for v in vals]
        assert got == pytest.approx(want)
    # bars of one class sit side by side around the class's tick
    xs = [[p.get_x() + p.get_width() / 2 for p in c.patches] for c in containers]
    assert np.allclose(np.mean(xs, axis=0), np.arange(4))
    # each NaN is marked by an x at height 0 under its own bar
    marks = [ln for ln in ax.lines if ln.get_marker() == "x" and len(ln.get_xdata())]
    assert sorted((float(ln.get_xdata()[0]), float(ln.get_ydata()[0])) for ln in marks) == [
        (pytest.approx(xs[0][2]), 0.0), (pytest.approx(xs[1][3]), 0.0)]
    assert [t.get_text() for t in ax.get_xticklabels()] == NAMES


def test_training_curves_lines_are_the_records() -> None:
    records = [
        {"epoch": 0, "train_loss": 2.0, "train_kd": 1.5, "train_time_s": 9.0, "val_miou": 0.25,
         "train_samples_seen": 64, "loss_terms": ["train_loss", "train_kd"]},
        {"epoch": 1, "train_loss": 1.2, "train_kd": 0.7, "train_time_s": 8.0, "val_miou": None},
        {"split": "test", "miou": 0.9},  # an evaluation record: skipped
        {"epoch": 2, "train_loss": 0.9, "train_kd": 0.4, "train_time_s": 8.0, "val_miou": 0.5},
    ]
    fig = training_curves_figure(records, ["train_loss", "train_kd"], title="run")
    left, right = fig.axes
    lines = {ln.get_label(): ln for ln in left.lines}
    assert set(lines) == {"loss", "kd"}  # timings and counters are not loss terms
    assert list(lines["loss"].get_xdata()) == [1, 2, 3]
    assert list(lines["loss"].get_ydata()) == [2.0, 1.2, 0.9]
    assert list(lines["kd"].get_ydata()) == [1.5, 0.7, 0.4]
    (val,) = right.lines
    assert list(val.get_xdata()) == [1, 3] and list(val.get_ydata()) == [25.0, 50.0]
    with pytest.raises(ValueError, match="no epoch records"):
        training_curves_figure([{"split": "test"}], ["train_loss"])


def test_save_training_curves_writes_a_png(tmp_path: Path, no_figure_leak: None) -> None:
    records = [{"epoch": e, "train_loss": 1.0 / (e + 1), "val_miou": 0.1 * e} for e in range(3)]
    _check_png(save_training_curves(tmp_path / "c.png", records, ["train_loss"]))
