"""The built-in classification data set: procedural shapes, generated on the fly (``--dataset shapes``).

Each image (32 x 32 by default) holds one large shape of its class on a textured, lit
background, with up to two smaller shapes of other classes as distractors and pixel noise. The
ten classes come in look-alike pairs (disc/ring, square/frame, plus/cross, triangle/diamond,
bars/crescent), so a teacher's soft labels say something its hard labels do not: which wrong
class an image resembles. Sample ``i`` of a split depends on ``(seed, split, i)`` only; no
file is read or downloaded.

Splits (default sizes): ``train`` 1000, ``val`` 500, ``test`` 1000, ``unlabeled`` 4000 (no labels).
"""

from __future__ import annotations

import math
import zlib
from functools import lru_cache

import numpy as np

from kdcache.core.errors import DatasetError
from kdcache.data.class_base import ClassificationDataset, ClassRef
from kdcache.data.registry import DATASETS
from kdcache.data.rendered import Rendered, split_size

CLASS_NAMES = ("disc", "ring", "square", "frame", "plus", "cross", "triangle", "diamond", "bars", "crescent")
DEFAULT_SIZES = {"train": 1000, "val": 500, "test": 1000, "unlabeled": 4000}
#: every data set object's images in this process (kdcache.data.rendered; 3 KB an image at 32 x 32:
#: the four default splits take 20 MB)
RENDERED = Rendered(128 * 2**20)


def _mask(kind: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Shape ``kind`` in its own coordinates (u right, v down; radius 1)."""
    r2 = u * u + v * v
    box = np.maximum(np.abs(u), np.abs(v))
    if kind == 0:
        return r2 < 1
    if kind == 1:
        return (r2 < 1) & (r2 > 0.55 ** 2)
    if kind == 2:
        return box < 0.8
    if kind == 3:
        return (box < 0.8) & (box > 0.48)
    if kind in (4, 5):
        if kind == 5:
            c = math.sqrt(0.5)
            u, v = c * (u - v), c * (u + v)
        return ((np.abs(u) < 0.27) & (np.abs(v) < 0.95)) | ((np.abs(v) < 0.27) & (np.abs(u) < 0.95))
    if kind == 6:
        return (v < 0.62) & (v > 1.7 * np.abs(u) - 0.95)
    if kind == 7:
        return np.abs(u) + np.abs(v) < 1
    if kind == 8:
        return (np.abs(u) < 0.9) & ((np.abs(v - 0.45) < 0.2) | (np.abs(v + 0.45) < 0.2))
    return (r2 < 1) & ((u - 0.45) ** 2 + v * v > 0.75 ** 2)


def _colour(rng: np.random.Generator, away_from: np.ndarray | None = None) -> np.ndarray:
    for _ in range(20):
        c = rng.uniform(0.05, 0.95, 3)
        if away_from is None or np.abs(c - away_from).sum() > 0.6:
            return c
    return 1.0 - away_from


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


@lru_cache(maxsize=2**16)
def label_of(seed: int, split: str, index: int) -> int:
    """The class of a sample (the first draw of its generator: no rendering), kept for the
    process: a data set object asks for every sample's when it is made."""
    return int(_rng(seed, split, index).integers(len(CLASS_NAMES)))


def render(seed: int, split: str, index: int, size: int) -> tuple[np.ndarray, int]:
    """Image uint8 [size, size, 3] and class of sample ``index`` of ``split``."""
    rng = _rng(seed, split, index)
    label = int(rng.integers(len(CLASS_NAMES)))
    s2 = size * 2  # drawn at twice the size, then averaged: soft edges
    yy, xx = np.mgrid[0:s2, 0:s2].astype(np.float64) / s2
    a, b = _colour(rng), _colour(rng)
    t = np.clip((xx * math.cos(rng.uniform(0, 6.3)) + yy * math.sin(rng.uniform(0, 6.3)) + 1) / 2, 0, 1)
    img = a * (1 - t[..., None]) + b * t[..., None]
    fx, fy, ph = rng.uniform(2, 7), rng.uniform(2, 7), rng.uniform(0, 6.3)
    img += 0.05 * (np.sin(2 * math.pi * fx * xx + ph) * np.sin(2 * math.pi * fy * yy))[..., None]
    bg_mean = img.mean((0, 1))

    def draw(kind: int, radius: float, cy: float, cx: float, colour: np.ndarray) -> None:
        th = rng.uniform(-0.45, 0.45)
        dx, dy = (xx - cx) / radius, (yy - cy) / radius
        u = math.cos(th) * dx + math.sin(th) * dy
        v = -math.sin(th) * dx + math.cos(th) * dy
        m = _mask(kind, u, v)
        shade = 1 + 0.25 * (u * rng.uniform(-1, 1) + v * rng.uniform(-1, 1))
        img[m] = np.clip(colour[None] * shade[m][:, None], 0, 1)

    for _ in range(int(rng.integers(0, 3))):
        other = int(rng.integers(len(CLASS_NAMES) - 1))
        other += other >= label
        r = rng.uniform(0.08, 0.13)
        draw(other, r, rng.uniform(r, 1 - r), rng.uniform(r, 1 - r), _colour(rng, bg_mean))
    r = rng.uniform(0.26, 0.4)
    cy, cx = rng.uniform(r * 0.9, 1 - r * 0.9), rng.uniform(r * 0.9, 1 - r * 0.9)
    local = img[int(cy * s2), int(cx * s2)]
    draw(label, r, cy, cx, _colour(rng, local))
    img = img.reshape(size, 2, size, 2, 3).mean((1, 3))
    img *= rng.uniform(0.7, 1.2)  # light
    img += rng.normal(0, 0.04, img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), label


@DATASETS.register("shapes")
class ShapesDataset(ClassificationDataset):
    """See the module docstring; ``size`` overrides a split's sample count, ``resolution`` the
    image side (default 32), ``seed`` selects another data set."""

    needs_root = False
    class_names = CLASS_NAMES

    def __init__(self, root=None, split: str = "train", size: int | None = None, resolution: int = 32,
                 seed: int = 0):
        if split not in DEFAULT_SIZES:
            raise DatasetError(f"shapes data set has no split '{split}'; valid splits: {', '.join(DEFAULT_SIZES)}")
        n = split_size("shapes", size, DEFAULT_SIZES[split])
        side = resolution
        if isinstance(side, (list, tuple)):  # -o resolution=32x32 (the command line's HxW)
            side = side[0] if len(side) == 2 and side[0] == side[1] else None
        try:
            side = int(side)
        except (TypeError, ValueError):
            raise DatasetError(f"shapes images are square: give -o resolution=N (e.g. 32), got {resolution}") from None
        if side < 16:
            raise DatasetError(f"shapes resolution must be at least 16, got {resolution}")
        self.resolution, self.seed = side, int(seed)
        self.labelled = split != "unlabeled"
        refs = [ClassRef(id=f"{split}_{i:06d}", label=label_of(self.seed, split, i)) for i in range(n)]
        super().__init__(refs, split, None)

    def read_image(self, ref: ClassRef) -> np.ndarray:
        """Rendered when first read in this process, by this object or another, then kept
        (:data:`RENDERED`)."""
        split, _, idx = ref.id.rpartition("_")
        seed, index, side = self.seed, int(idx), self.resolution
        return RENDERED.get((seed, split, index, side), lambda: render(seed, split, index, side)[0]).copy()

    def prepare_for_workers(self) -> None:
        """Render every image now, so workers forked later inherit them (when they all fit)."""
        for ref in self.refs:
            self.read_image(ref)

    def image_size(self, index: int) -> tuple[int, int]:
        return (self.resolution, self.resolution)

    def describe(self, ref: ClassRef) -> str:
        return f"shapes:{ref.id} (seed {self.seed})"
