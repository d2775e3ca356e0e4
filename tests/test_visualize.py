"""Tests for kdcache.visualize: exact colours, overlays and valid, non-blank PNG figures."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from kdcache.visualize import (  # noqa: E402
    colorize,
    overlay,
    save_comparison_grid,
    save_iou_histogram,
    save_per_class_bars,
    save_sample_panel,
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


def test_save_sample_panel_without_names_or_title(tmp_path: Path, no_figure_leak: None) -> None:
    image, gt, pred = _sample()
    _check_png(save_sample_panel(tmp_path / "p.png", image, gt, pred, PALETTE, None))


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
