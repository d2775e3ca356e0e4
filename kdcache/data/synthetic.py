"""The built-in synthetic road-scene data set (``--dataset synthetic``).

Every sample is drawn procedurally, on the fly, from ``(seed, split, index)`` alone: the data
set needs no files, a sample does not depend on which other samples were drawn or in which
order or process. Rendered samples are kept in memory (``SyntheticDataset.cache_bytes``), so
only the first epoch pays for drawing them.
The classes are CamVid's eleven (sky, building, pole, road, pavement, tree, sign, fence, car,
pedestrian, bicyclist); 255 marks void pixels. Splits: ``train`` (400), ``val`` (100) and
``test`` (100) by default, and ``unlabeled`` (1600 images, no masks: a pool for a teacher to
label; its own random stream, so no image repeats a labelled one; ``unlabeled_masks=True``
gives it its true masks, for a ceiling run only); ``size``, ``resolution`` and ``seed`` are
options.

Reproducibility: the random stream is ``numpy.random.default_rng([seed, crc32(split),
index])`` and the drawing uses only exactly-rounded arithmetic (no SIMD ``exp``/``pow``), so
the bytes are the same in every process and, for one numpy version, on every machine. numpy
does not promise the same random streams across versions.

The scenes imitate a forward-facing car camera in a street, in a simple perspective model
(camera height = 1 unit, horizon row ``y_h``, vanishing point ``x_v``; a ground point at depth
``Z`` lies ``H / Z`` rows below the horizon and a 1-unit object at depth ``Z`` is ``H / Z``
pixels tall), so textures and objects shrink and converge towards the vanishing point:

* sky (clear, overcast or dusk, with clouds) and a distant skyline of buildings and trees;
* a road with lane markings and zebra crossings, flanked by pavements (paving-tile grids in
  perspective or plain asphalt, a light kerb) and, on each side, either a row of building
  facades (window grids in perspective, brick courses, glass fronts mirroring the sky, shop
  fronts, billboards, wall-mounted signs) or an open side with grass (labelled tree, as in
  CamVid), fences and trees;
* objects drawn far to near, so near ones occlude far ones: cars, vans and buses (front/rear
  face and the visible flank in perspective, wheels, windows, lights), pedestrians (walking,
  in pairs, on pavements or crossing), bicyclists (side view with thin wheel rings, frame and
  rider, the wheel discs labelled as an annotator would; or seen from behind), poles (1-2 px
  wide far away) with street lamps, sign posts and traffic lights (labelled sign), broadleaf
  and conifer trees in front of facades, wooden or railing fences in front of facades;
* lighting: building shadows across the street, shadows under cars, trees and poles, a global
  exposure / white balance / gamma change, a lighting gradient and a soft local light blob,
  optional optical blur and sensor noise.

What makes it hard for a small network: road, pavement, building, fence and sky share colour
ranges (pavements of the road's own asphalt, fences in facade colours, glass facades and pale
walls the colour of an overcast sky, all under changing light), so the class often follows
from texture at a particular scale and orientation (window grids, tile grids, slats, foliage)
and from context (where in the street a surface is, the outline of a large uniform vehicle),
not from colour; thin and small objects (poles, signs, distant pedestrians, bicycle wheels)
need fine detail; occlusion breaks objects apart.

Void (255) is used sparingly (under 1% of pixels), as in CamVid: a few unlabelled clutter
objects (bins, boxes, crates) on the pavement, and in about half the images a one-pixel band
around cars, where an annotator's polygon would be uncertain.
"""

from __future__ import annotations

import math
import zlib
from functools import lru_cache

import numpy as np

from kdcache.core.errors import DatasetError
from kdcache.data.base import IGNORE_INDEX, SampleRef, SegmentationDataset
from kdcache.data.registry import DATASETS
from kdcache.data.rendered import Rendered, split_size

SKY, BUILDING, POLE, ROAD, PAVEMENT, TREE, SIGN, FENCE, CAR, PEDESTRIAN, BICYCLIST = range(11)
VOID = IGNORE_INDEX
_GROUND = np.zeros(256, bool)  # surfaces that receive cast shadows
_GROUND[[ROAD, PAVEMENT, TREE]] = True
_RIMMED = np.zeros(256, bool)  # background classes that give way to a void rim around cars
_RIMMED[[ROAD, PAVEMENT, BUILDING, SKY, TREE]] = True

#: Samples per split when ``size`` is not given.
DEFAULT_SIZES = {"train": 400, "val": 100, "test": 100, "unlabeled": 1600}
#: Splits whose samples come without masks (drawn like the others, from their own random stream)
UNLABELLED_SPLITS = ("unlabeled",)
#: (height, width) of the generated images when ``resolution`` is not given.
DEFAULT_RESOLUTION = (96, 128)

#: CamVid's usual colours for its 11 classes (as in SegNet's CamVid release).
CAMVID_PALETTE = np.array(
    [
        (128, 128, 128),  # sky
        (128, 0, 0),  # building
        (192, 192, 128),  # pole
        (128, 64, 128),  # road
        (60, 40, 222),  # pavement
        (128, 128, 0),  # tree
        (192, 128, 128),  # sign
        (64, 64, 128),  # fence
        (64, 0, 128),  # car
        (64, 64, 0),  # pedestrian
        (0, 128, 192),  # bicyclist
    ],
    dtype=np.uint8,
)


def sample_seed(seed: int, split: str, index: int) -> list[int]:
    """The entropy that fixes one sample: stable across processes (no salted ``hash()``)."""
    return [int(seed) % (1 << 63), zlib.crc32(split.encode("utf-8")), int(index)]


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _axes(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates: a column vector of rows and a row vector of columns."""
    ys = (np.arange(h, dtype=np.float32) + 0.5)[:, None]
    xs = (np.arange(w, dtype=np.float32) + 0.5)[None, :]
    ys.setflags(write=False)
    xs.setflags(write=False)
    return ys, xs


@lru_cache(maxsize=64)
def _gamma_lut(gamma_percent: int) -> np.ndarray:
    """x ** gamma on 1024 levels, computed with the C library (not SIMD loops) for exactness."""
    g = gamma_percent / 100.0
    lut = np.array([math.pow(i / 1023.0, g) for i in range(1024)], dtype=np.float32)
    lut.setflags(write=False)
    return lut


def _value_noise(rng: np.random.Generator, h: int, w: int, cy: int, cx: int) -> np.ndarray:
    """Smooth noise in about [-1, 1]: a (cy+1) x (cx+1) random grid, bilinearly upsampled."""
    g = rng.uniform(-1.0, 1.0, size=(cy + 1, cx + 1)).astype(np.float32)
    fy = (np.arange(h, dtype=np.float32) + 0.5) * (cy / h)
    fx = (np.arange(w, dtype=np.float32) + 0.5) * (cx / w)
    iy = np.minimum(fy.astype(np.int32), cy - 1)
    ix = np.minimum(fx.astype(np.int32), cx - 1)
    ty = (fy - iy)[:, None]
    tx = (fx - ix)[None, :]
    rows = g[iy] * (1 - ty) + g[iy + 1] * ty  # [h, cx+1]
    return rows[:, ix] * (1 - tx) + rows[:, ix + 1] * tx


def _seg(X, h, p0, p1, t):
    """Mask of points within ``t`` of the segment p0-p1 (all in the same unit coordinates)."""
    dx, dh = p1[0] - p0[0], p1[1] - p0[1]
    l2 = dx * dx + dh * dh + 1e-9
    a = np.clip(((X - p0[0]) * dx + (h - p0[1]) * dh) / l2, 0.0, 1.0)
    ex = X - p0[0] - a * dx
    eh = h - p0[1] - a * dh
    return ex * ex + eh * eh < t * t


def _disc(X, h, cx, ch, r):
    return (X - cx) ** 2 + (h - ch) ** 2 < r * r


def _jitter(rng, rgb, amount=0.06):
    c = np.asarray(rgb, dtype=np.float32) * rng.uniform(1 - amount, 1 + amount, 3)
    return np.clip(c, 0.0, 1.0).astype(np.float32)


def _grey(rng, lo, hi, tint=0.04):
    v = rng.uniform(lo, hi)
    return np.clip(v * (1 + rng.uniform(-tint, tint, 3)), 0, 1).astype(np.float32)


def _any_colour(rng):
    """Paint/clothing colours: anything from black to white, saturated or not."""
    kind = rng.random()
    if kind < 0.35:
        return _grey(rng, 0.05, 0.9, 0.05)
    hue = rng.uniform(0, 6)
    sat = rng.uniform(0.3, 0.9)
    val = rng.uniform(0.25, 0.9)
    k = np.array([5, 3, 1], dtype=np.float32)
    rgb = val - val * sat * np.clip(np.minimum((k + hue) % 6, 4 - (k + hue) % 6), 0, 1)
    return rgb.astype(np.float32)


def _facade_colour(rng):
    choice = rng.integers(0, 6)
    base = [
        (0.55, 0.55, 0.55),  # concrete grey
        (0.78, 0.7, 0.56),  # beige / sandstone
        (0.55, 0.3, 0.22),  # brick
        (0.85, 0.84, 0.8),  # white render
        (0.45, 0.37, 0.3),  # brown
        (0.62, 0.66, 0.72),  # bluish grey (like an overcast sky)
    ][choice]
    return _jitter(rng, np.array(base) * rng.uniform(0.7, 1.15), 0.08)


def _wood_colour(rng):
    choice = rng.integers(0, 4)
    base = [(0.45, 0.33, 0.22), (0.55, 0.5, 0.45), (0.25, 0.35, 0.25), (0.3, 0.3, 0.32)][choice]
    return _jitter(rng, np.array(base) * rng.uniform(0.75, 1.3), 0.08)


def _foliage_colour(rng):
    if rng.random() < 0.15:  # autumn
        return _jitter(rng, (0.55, 0.45, 0.15), 0.12)
    return _jitter(rng, np.array((0.2, 0.36, 0.12)) * rng.uniform(0.6, 1.5), 0.15)


# ---------------------------------------------------------------------------------------------
# the renderer
# ---------------------------------------------------------------------------------------------


class _Scene:
    """Draws one street scene into ``img`` (float RGB in [0, 1]) and ``lab`` (class ids)."""

    def __init__(self, rng: np.random.Generator, h: int, w: int):
        self.rng = rng
        self.H, self.W = h, w
        self.ys, self.xs = _axes(h, w)
        self.img = np.zeros((h, w, 3), np.float32)
        self.lab = np.zeros((h, w), np.uint8)
        # Noise fields shared by the textures (sliced per object).
        # unit-variance uniform noise (much cheaper than Gaussian)
        self.n_fine = (rng.random((h, w), dtype=np.float32) - 0.5) * 3.4641
        self.n_mid = _value_noise(rng, h, w, max(2, h // 6), max(2, w // 6))
        self.n_low = _value_noise(rng, h, w, 3, 4)
        self.y_h = h * rng.uniform(0.36, 0.52)
        self.x_v = w * rng.uniform(0.35, 0.65)

    # -- projections -------------------------------------------------------------------------
    def _rows(self, y0, y1):
        a = max(0, int(np.floor(y0)))
        b = min(self.H, int(np.ceil(y1)))
        return (slice(a, b) if b > a else None), a, b

    def _cols(self, x0, x1):
        a = max(0, int(np.floor(x0)))
        b = min(self.W, int(np.ceil(x1)))
        return (slice(a, b) if b > a else None), a, b

    def fronto(self, Z, X0, X1, h0, h1):
        """A camera-facing plane at depth Z: bbox slices and unit coordinates (X row, h column)."""
        s = self.H / Z
        xs, _, _ = self._cols(self.x_v + X0 * s, self.x_v + X1 * s)
        ys, _, _ = self._rows(self.y_h + s * (1 - h1), self.y_h + s * (1 - h0))
        if xs is None or ys is None:
            return None
        X = (self.xs[:, xs] - self.x_v) / s
        h = 1 - (self.ys[ys] - self.y_h) / s
        return ys, xs, X, h, s

    def side(self, Xp, Z0, Z1, h0, h1):
        """A plane along the street at lateral offset Xp, depths Z0..Z1: slices, (Z row, h 2-D)."""
        H = self.H
        xa, xb = sorted((self.x_v + Xp * H / Z0, self.x_v + Xp * H / Z1))
        xs, _, _ = self._cols(xa, xb)
        ylo = min(self.y_h + H / Z * (1 - h1) for Z in (Z0, Z1))
        yhi = max(self.y_h + H / Z * (1 - h0) for Z in (Z0, Z1))
        ys, _, _ = self._rows(ylo, yhi)
        if xs is None or ys is None:
            return None
        dg = (self.xs[:, xs] - self.x_v) / Xp  # rows below the horizon of the plane's base
        dg = np.maximum(dg, 1e-3)
        Z = H / dg
        h = 1 - (self.ys[ys] - self.y_h) / dg
        return ys, xs, Z, h, dg

    def paint(self, ys, xs, mask, colour, label):
        reg = self.img[ys, xs]
        if colour.ndim == 1:
            reg[mask] = colour
        else:
            reg[mask] = np.broadcast_to(colour, reg.shape)[mask]
        self.lab[ys, xs][mask] = label

    # -- background --------------------------------------------------------------------------
    def background(self):
        rng, H, W = self.rng, self.H, self.W
        ys, xs = self.ys, self.xs
        img, lab = self.img, self.lab
        yh, xv = self.y_h, self.x_v

        # Sky: a vertical gradient plus clouds.
        weather = rng.choice(3, p=[0.5, 0.35, 0.15])
        if weather == 0:  # clear
            top = _jitter(rng, (0.3, 0.5, 0.85))
            hor = _jitter(rng, (0.72, 0.8, 0.92))
        elif weather == 1:  # overcast
            g = rng.uniform(0.55, 0.92)
            top = _grey(rng, g * 0.85, g * 0.95, 0.03)
            hor = _grey(rng, g * 0.95, min(1.0, g * 1.1), 0.03)
        else:  # dusk
            top = _jitter(rng, (0.35, 0.4, 0.62))
            hor = _jitter(rng, (0.95, 0.7, 0.45))
        S = slice(0, min(H, int(np.ceil(yh)) + 1))  # the ground covers the rest
        t = np.clip(ys[S] / max(yh, 1.0), 0, 1)[..., None]
        sky = top * (1 - t) + hor * t
        clouds = np.clip(self.n_low[S] * 1.2 + 0.4 * self.n_mid[S], 0, 1)[..., None]
        clouds *= rng.uniform(0.1, 0.6)
        img[S] = sky * (1 - clouds) + clouds * rng.uniform(0.75, 1.0)
        self.sky_hor = hor
        lab[:] = SKY

        # Distant skyline: buildings and tree lines along the horizon.
        x = 0.0
        while x < W:
            seg = W * rng.uniform(0.04, 0.16)
            kind = rng.random()
            if kind < 0.65:
                top_y = yh - H * rng.uniform(0.02, 0.2)
                cs, _, _ = self._cols(x, x + seg)
                rs, _, _ = self._rows(top_y, yh + 1)
                if cs is not None and rs is not None:
                    col = _facade_colour(rng) * rng.uniform(0.7, 1.0)
                    col = col * 0.6 + hor * 0.4  # aerial perspective
                    img[rs, cs] = col * (1 + 0.05 * self.n_fine[rs, cs, None])
                    lab[rs, cs] = BUILDING
            elif kind < 0.85:
                cs, a, b = self._cols(x, x + seg)
                if cs is not None:
                    hgt = H * rng.uniform(0.02, 0.08) * (1 + 0.6 * self.n_mid[0:1, cs])
                    m = (ys >= yh - hgt) & (ys < yh + 1)
                    col = _foliage_colour(rng) * 0.7 + hor * 0.3
                    reg = img[:, cs]
                    reg[m] = col
                    lab[:, cs][m] = TREE
            x += seg

        # Ground below the horizon: road, pavements, and what lies beyond them.
        self.X_l = -rng.uniform(1.0, 3.2)
        self.X_r = rng.uniform(1.0, 3.6)
        self.P_l = rng.uniform(0.8, 3.0)
        self.P_r = rng.uniform(0.8, 3.0)
        self.W_l = self.X_l - self.P_l  # wall line (or edge of the open ground)
        self.W_r = self.X_r + self.P_r
        self.side_kind = ["buildings" if rng.random() < 0.72 else "open" for _ in range(2)]

        dg_full = np.maximum(ys - yh, 0.25)
        self.Zg = H / dg_full  # depth of ground rows, column vector
        self.Xg = (xs - xv) / dg_full  # lateral offset on the ground, 2-D
        r0 = min(H, int(np.floor(yh + 0.25)))
        G = slice(r0, H)
        gi, gl = img[G], lab[G]
        n_fine, n_mid = self.n_fine[G], self.n_mid[G]
        dg, Zg, Xg = dg_full[G], self.Zg[G], self.Xg[G]
        below = ys[G] > yh + 0.25
        fade = np.clip(dg / 10.0, 0, 1)  # textures fade out towards the horizon

        # Ground materials: 0 road, 1 marking, 2 paving, 3 kerb, 4 grass. Each gets a colour and
        # a single-channel texture; the RGB image is written once at the end.
        road = (Xg >= self.X_l) & (Xg <= self.X_r)
        pave = ~road & (Xg >= self.W_l) & (Xg <= self.W_r)
        mat = np.full(Xg.shape, 4, np.uint8)
        mat[pave] = 2
        mat[road] = 0
        tex = 1 + 0.12 * n_fine + 0.1 * n_mid  # grass

        # Road: asphalt grain, repairs, markings.
        asphalt = _grey(rng, 0.22, 0.55, 0.06)
        grain = rng.uniform(0.02, 0.06)
        r_tex = 1 + grain * n_fine + rng.uniform(0.02, 0.08) * n_mid * (n_mid > 0.2)
        marks = np.zeros(Xg.shape, bool)
        lane_w = rng.uniform(2.6, 3.6)
        dash = rng.uniform(3.0, 6.0)
        line_t = np.maximum(0.06, 0.45 / dg)
        k0 = int(np.ceil(self.X_l / lane_w))
        for k in range(k0, int(self.X_r / lane_w) + 1):
            xl = k * lane_w + rng.uniform(-0.2, 0.2)
            dashed = rng.random() < 0.7
            if self.X_l + 0.3 < xl < self.X_r - 0.3:
                m = np.abs(Xg - xl) < line_t
                marks |= (m & (((Zg / dash) % 1.0) < 0.5)) if dashed else m
        if rng.random() < 0.5:  # edge lines
            marks |= np.abs(Xg - (self.X_l + 0.25)) < line_t
            marks |= np.abs(Xg - (self.X_r - 0.25)) < line_t
        if rng.random() < 0.2:  # zebra crossing
            zc = rng.uniform(3, 12)
            marks |= ((Zg > zc) & (Zg < zc + 1.6)) & (((Xg / 0.55) % 1.0) < 0.5)
        mark_col = (_grey(rng, 0.75, 0.95, 0.05) if rng.random() < 0.85
                    else _jitter(rng, np.array((0.9, 0.75, 0.2))))
        np.copyto(tex, r_tex, where=road)
        mat[road & marks] = 1

        # Pavement: paving-tile grid in perspective and a light kerb at the road edge.
        kind = rng.random()
        if kind < 0.55:  # the same asphalt as the road
            paving = np.clip(asphalt * rng.uniform(0.9, 1.25), 0, 1)
        elif kind < 0.85:
            paving = _grey(rng, 0.32, 0.65, 0.05)
        else:
            paving = _jitter(rng, np.array((0.55, 0.38, 0.32)) * rng.uniform(0.7, 1.2))
        tile = rng.uniform(0.3, 0.8)
        tile_contrast = rng.uniform(0.05, 0.3) if rng.random() < 0.75 else 0.0
        lt = np.maximum(0.03, 0.35 / dg) / tile
        gx = np.abs(((Xg / tile) % 1.0) - 0.5) > 0.5 - lt
        ltz = np.maximum(0.03, 0.35 * Zg * Zg / H) / tile
        gz = np.abs(((Zg / tile) % 1.0) - 0.5) > 0.5 - ltz
        p_tex = (1 - tile_contrast * (gx | gz) * fade
                 + rng.uniform(0.02, 0.05) * n_fine + 0.04 * n_mid)
        np.copyto(tex, p_tex, where=pave)
        kerb = np.minimum(np.abs(Xg - self.X_l), np.abs(Xg - self.X_r)) < np.maximum(0.12, 0.6 / dg)
        mat[pave & kerb] = 3
        grass_col = _jitter(rng, np.array((0.3, 0.42, 0.15)) * rng.uniform(0.7, 1.3), 0.12)
        kerb_col = np.clip(paving * rng.uniform(1.05, 1.35) + rng.uniform(0, 0.05), 0, 1)
        cols = np.stack([asphalt, mark_col, paving, kerb_col, grass_col])
        tex[(mat == 1) | (mat == 3)] = 1 + 0.05 * n_fine[(mat == 1) | (mat == 3)]

        # Shadow of one side's buildings across the street (sun from the other side).
        if rng.random() < 0.55:
            left = rng.random() < 0.5
            Xs = (self.W_l + rng.uniform(0.5, 6.0)) if left else (self.W_r - rng.uniform(0.5, 6.0))
            edge = Xs + rng.uniform(-0.08, 0.08) * Zg
            tex[(Xg < edge) if left else (Xg > edge)] *= rng.uniform(0.4, 0.7)

        g0 = int(np.argmax(below[:, 0])) if below.any() else len(below)
        gi[g0:] = cols[mat[g0:]] * tex[g0:, :, None]
        gl[g0:] = np.array([ROAD, ROAD, PAVEMENT, PAVEMENT, TREE], np.uint8)[mat[g0:]]

        # Facades on building sides.
        self.fence_planes = []
        for side, Xw in ((0, self.W_l), (1, self.W_r)):
            if self.side_kind[side] == "buildings":
                self._facades(Xw)
            if rng.random() < (0.6 if self.side_kind[side] == "buildings" else 0.9):
                Xf = Xw + (0.3 if Xw < 0 else -0.3) * rng.random()
                z0 = 1 / rng.uniform(1 / 40, 1 / 2.5)
                self.fence_planes.append((Xf, z0, z0 + rng.uniform(3, 40)))

    def _facades(self, Xw):
        rng, H = self.rng, self.H
        xs, ys = self.xs, self.ys
        sign = -1 if Xw < 0 else 1
        cs = np.nonzero((xs[0] - self.x_v) * sign > 0.5)[0]
        if len(cs) == 0:
            return
        c_first = int(cs[0])
        dg_all = (xs[:, cs[0] : cs[-1] + 1] - self.x_v) / Xw  # rows from horizon to wall base
        Zw_all = H / dg_all  # depth of each column on the wall plane
        # Buildings along the street: depth boundaries, each with its height and look.
        z = rng.uniform(0.3, 2.0)
        bounds, tops = [], []
        end = rng.uniform(25, 120)
        while z < end:
            bounds.append(z)
            tops.append(rng.uniform(2.0, 14.0))
            z += rng.uniform(3.0, 16.0)
        bounds.append(end)
        idx = np.searchsorted(np.array(bounds), Zw_all[0]) - 1
        for b in range(len(tops)):
            bc = np.nonzero(idx == b)[0]
            glass = rng.random() < 0.25  # a glass front mirroring the sky
            base = _jitter(rng, self.sky_hor * rng.uniform(0.8, 1.05), 0.04) if glass else _facade_colour(rng)
            shade = rng.uniform(0.75, 1.1)
            pz, ph = rng.uniform(1.2, 3.0), rng.uniform(1.6, 2.6)
            phase_z, phase_h = rng.random(), rng.random()
            duty_z, duty_h = rng.uniform(0.35, 0.65), rng.uniform(0.4, 0.6)
            windows = rng.random() < 0.8
            brick = rng.random() < 0.3
            wcol = (_grey(rng, 0.05, 0.3) if rng.random() < 0.5
                    else _jitter(rng, np.array((0.55, 0.65, 0.8)) * rng.uniform(0.6, 1.1)))
            if glass:  # faint mullions only
                wcol = base * rng.uniform(0.8, 0.95)
            shop = _grey(rng, 0.1, 0.5) if rng.random() < 0.5 else None
            board = None
            if rng.random() < 0.25:  # billboard (still building)
                z0 = bounds[b] + rng.uniform(0, 2)
                h0 = rng.uniform(1.5, 3)
                board = (z0, z0 + rng.uniform(1, 3), h0, h0 + rng.uniform(0.8, 2), _any_colour(rng))
            if len(bc) == 0:
                continue
            c0, c1 = int(bc[0]), int(bc[-1]) + 1
            top = tops[b]
            dg = dg_all[:, c0:c1]
            Zw = Zw_all[:, c0:c1]
            dmax = float(dg.max())
            rs, _, _ = self._rows(self.y_h - dmax * (top - 1), self.y_h + dmax + 1)
            if rs is None:
                continue
            csl = slice(c_first + c0, c_first + c1)
            hw = 1 - (ys[rs] - self.y_h) / dg
            wall = (hw >= 0) & (hw <= top)
            tex = shade + 0.04 * self.n_fine[rs, csl] + 0.06 * self.n_mid[rs, csl]
            if brick:  # courses of bricks: fine horizontal lines, visible close up
                tex = tex - 0.12 * ((((hw / 0.12) % 1.0) < 0.3) * np.clip(0.06 * dg - 1.0, 0, 1))
            c = base * tex[..., None]
            if windows:  # a window grid in perspective
                win = (((Zw / pz + phase_z) % 1.0) < duty_z) & (((hw / ph + phase_h) % 1.0) < duty_h)
                win &= (hw > 1.3) & (hw < top - 0.5)
                # contrast fades where the window period drops below ~2 pixels
                vis = np.clip(pz * abs(Xw) * dg * dg / (2.5 * H), 0, 1)
                a = (win * vis)[..., None]
                c = c * (1 - a) + wcol * a
                if shop is not None:  # shop front at street level
                    m = (hw < 1.2) & (hw > 0.1)
                    c[m] = shop * (1 + 0.1 * self.n_mid[rs, csl][m, None])
            if board is not None:
                z0, z1, h0, h1, bcol = board
                m = (Zw > z0) & (Zw < z1) & (hw > h0) & (hw < h1)
                c[m] = bcol
            self.paint(rs, csl, wall, c, BUILDING)
        # a wall-mounted sign now and then
        if rng.random() < 0.3:
            z0 = 1 / rng.uniform(1 / 30, 1 / 3)
            r = self.side(Xw - 0.05 * sign, z0, z0 + rng.uniform(0.4, 0.8), 1.6, 2.1)
            if r is not None:
                ys2, xs2, Z2, h2, _ = r
                m = (Z2 >= z0) & (Z2 <= z0 + 0.8) & (h2 >= 1.6) & (h2 <= 2.1)
                m &= self.lab[ys2, xs2] == BUILDING
                self.paint(ys2, xs2, m, _sign_colour(rng), SIGN)

    def fences(self):
        rng = self.rng
        for Xf, z0, z1 in self.fence_planes:
            topf = rng.uniform(0.45, 1.1)
            r = self.side(Xf, z0, z1, 0.0, topf)
            if r is None:
                continue
            ys, xs, Z, h, dg = r
            m = (Z >= z0) & (Z <= z1) & (h >= 0) & (h <= topf)
            if not m.any():
                continue
            base = _wood_colour(rng) if rng.random() < 0.5 else _facade_colour(rng)
            period = rng.uniform(0.12, 0.4)
            slat = ((Z / period) % 1.0) < rng.uniform(0.5, 0.8)
            rail = (np.abs(h - topf * 0.85) < 0.05) | (np.abs(h - topf * 0.2) < 0.05)
            if rng.random() < 0.7:  # solid boards: slats with dark gaps
                c = base * np.where(slat | rail, 1.0, 0.6)[..., None]
                c = c * (1 + 0.05 * self.n_fine[ys, xs, None])
                self.paint(ys, xs, m, c, FENCE)
            else:  # railings: the background shows through but it is all fence
                bg = self.img[ys, xs]
                c = np.where(((slat & (h > topf * 0.1)) | rail)[..., None], base, bg * 0.9 + base * 0.1)
                c = c * (1 + 0.04 * self.n_fine[ys, xs, None])
                self.paint(ys, xs, m, c, FENCE)

    # -- objects -----------------------------------------------------------------------------
    def objects(self):
        rng = self.rng
        objs = []

        def depth(near=2.2, far=40.0):
            return 1.0 / rng.uniform(1.0 / far, 1.0 / near)

        def pave_x(side=None, margin=0.2):
            left = rng.random() < 0.5 if side is None else side == 0
            if left:
                return rng.uniform(self.W_l + margin, self.X_l - margin) if self.P_l > 2 * margin else self.X_l - 0.3
            return rng.uniform(self.X_r + margin, self.W_r - margin) if self.P_r > 2 * margin else self.X_r + 0.3

        for _ in range(rng.integers(0, 7)):  # cars
            w = rng.uniform(1.1, 1.35)
            if rng.random() < 0.35:  # parked along a kerb
                X = (self.X_l + w / 2 + 0.15) if rng.random() < 0.5 else (self.X_r - w / 2 - 0.15)
            else:
                X = rng.uniform(self.X_l + w / 2 + 0.2, max(self.X_l + w / 2 + 0.3, self.X_r - w / 2 - 0.2))
            objs.append((depth(2.6), "car", X, w))
        for _ in range(rng.integers(2, 8)):  # pedestrians, some in pairs
            Z = depth(2.2, 24)
            X = pave_x() if rng.random() < 0.8 else rng.uniform(self.X_l, self.X_r)
            objs.append((Z, "pedestrian", X))
            if rng.random() < 0.3:  # a companion
                objs.append((Z + rng.uniform(-0.5, 0.5), "pedestrian", X + rng.uniform(-0.5, 0.5)))
        for _ in range(rng.choice(4, p=[0.2, 0.4, 0.3, 0.1])):  # bicyclists
            X = rng.uniform(self.X_l + 0.3, self.X_r - 0.3) if rng.random() < 0.7 else pave_x()
            objs.append((depth(2.6, 30), "bicyclist", X))
        for _ in range(rng.integers(2, 9)):  # poles, lamps, sign posts, traffic lights
            Z = depth(2.6, 30)
            side = int(rng.random() < 0.5)
            kerb = self.X_l - 0.3 if side == 0 else self.X_r + 0.3
            X = kerb + rng.normal(0, 0.1) if rng.random() < 0.7 else pave_x(side)
            objs.append((Z, "pole", X, rng.choice(4, p=[0.2, 0.3, 0.35, 0.15])))
        for _ in range(rng.integers(0, 7)):  # trees
            side = int(rng.random() < 0.5)
            if self.side_kind[side] == "open" and rng.random() < 0.6:
                X = (self.W_l - rng.uniform(0, 6)) if side == 0 else (self.W_r + rng.uniform(0, 6))
            else:
                X = pave_x(side)
            objs.append((depth(2.6, 50), "tree", X))
        for _ in range(rng.choice(3, p=[0.55, 0.3, 0.15])):  # unlabelled clutter
            objs.append((depth(2.5, 25), "clutter", pave_x()))

        for o in objs:  # ground shadows first, so they fall under everything drawn later
            self._shadow(o)
        for o in sorted(objs, key=lambda o: -o[0]):
            getattr(self, "_" + o[1])(*o[:1], *o[2:])

    def _shadow(self, o):
        Z, kind, X = o[0], o[1], o[2]
        if kind not in ("car", "tree", "pole") or Z > 25:
            return
        rng, H = self.rng, self.H
        if kind == "car":
            w = o[3]
            x0, x1, z0, z1, f = X - w / 2 - 0.1, X + w / 2 + 0.1, Z - 0.15, Z + 3.2, 0.45
        elif kind == "tree":
            x0, x1, z0, z1, f = X - 1.4, X + 1.4, Z - 1.2, Z + 1.2, 0.6
        else:  # a pole's shadow: a thin line across the ground
            off = rng.uniform(-3, 3)
            t = max(0.05, 0.6 * Z * Z / H)
            x0, x1, z0, z1, f = X + min(0, off), X + max(0, off), Z - t, Z + t, 0.6
        z0 = max(z0, 0.5)
        ys, _, _ = self._rows(self.y_h + H / z1, self.y_h + H / z0 + 1)
        xc = [self.x_v + xx * H / zz for xx in (x0, x1) for zz in (z0, z1)]
        xs, _, _ = self._cols(min(xc) - 1, max(xc) + 1)
        if ys is None or xs is None:
            return
        Zg, Xg = self.Zg[ys], self.Xg[ys, xs]
        m = (Zg >= z0) & (Zg <= z1) & (Xg >= x0) & (Xg <= x1)
        if kind == "tree":
            m &= ((Xg - X) / 1.4) ** 2 + ((Zg - Z) / 1.2) ** 2 < 1
            m &= self.n_mid[ys, xs] < 0.3
        m &= _GROUND[self.lab[ys, xs]]
        self.img[ys, xs][m] *= f

    def _car(self, Z, X, w):
        rng = self.rng
        kind = rng.random()
        van = kind < 0.2  # vans, lorries and buses are cars too (as in CamVid's 11 classes)
        bus = kind < 0.06
        if bus:
            L, ht, w = rng.uniform(7.0, 10.0), rng.uniform(2.0, 2.6), w * 1.3
        elif van:
            L, ht = rng.uniform(3.8, 5.0), rng.uniform(1.3, 1.7)
        else:
            L, ht = rng.uniform(2.8, 3.6), rng.uniform(0.85, 1.05)
        body = _any_colour(rng)
        glass = _grey(rng, 0.05, 0.25, 0.1)
        tyre = _grey(rng, 0.03, 0.12)
        belt = 0.6 * ht if not van else 0.55 * ht
        # flank, if visible
        for Xp, vis in ((X - w / 2, X - w / 2 > 0.05), (X + w / 2, X + w / 2 < -0.05)):
            if not vis:
                continue
            r = self.side(Xp, Z, Z + L, 0.0, ht)
            if r is None:
                continue
            ys, xs, Zc, h, _ = r
            zr = Zc - Z
            inz = (zr >= 0) & (zr <= L)
            lower = inz & (h >= 0.12) & (h <= belt)
            if bus:
                cab = inz & (h > belt) & (h <= ht)
                win = cab & (zr > 0.3) & (zr < L - 0.3) & (h < ht - 0.15) & (((zr / 1.2) % 1.0) < 0.85)
            elif van:
                cab = inz & (h > belt) & (h <= ht)
                win = cab & (zr > 0.2) & (zr < L * 0.3) & (h < ht - 0.08)
            else:
                cab = inz & (h > belt) & (h <= ht) & (zr > 0.22 * L + (h - belt) * 0.9) & (zr < 0.85 * L - (h - belt) * 0.6)
                win = cab & (h < ht - 0.06) & (zr > 0.22 * L + (h - belt) * 0.9 + 0.1) & (zr < 0.85 * L - (h - belt) * 0.6 - 0.1)
            wheels = _disc(zr, h, 0.2 * L, 0.17, 0.17) | _disc(zr, h, 0.8 * L, 0.17, 0.17)
            shade = (0.8 + 0.25 * np.clip(h / ht, 0, 1))[..., None] * 0.85
            self.paint(ys, xs, lower | cab, body * shade, CAR)
            self.paint(ys, xs, win, glass, CAR)
            self.paint(ys, xs, wheels & inz, tyre, CAR)
        # rear (or front) face
        r = self.fronto(Z, X - w / 2, X + w / 2, 0.0, ht)
        if r is None:
            return
        ys, xs, Xc, h, s = r
        d = np.abs(Xc - X)
        lower = (d <= w / 2) & (h >= 0.12) & (h <= belt)
        taper = 0.03 if van else 0.3  # vans and buses are boxes; cars narrow above the belt
        cab = (d <= w / 2 * 0.88 - (h - belt) * taper) & (h > belt) & (h <= ht)
        win = (d <= w / 2 * 0.78 - (h - belt) * taper) & (h > belt + 0.05) & (h <= ht - 0.07)
        wheels = (d >= w / 2 - 0.28) & (d <= w / 2 - 0.05) & (h < 0.14)
        lights = (d >= w / 2 - 0.18) & (d <= w / 2 - 0.03) & (np.abs(h - belt + 0.12) < 0.05)
        hl = _jitter(rng, (0.8, 0.1, 0.08)) if rng.random() < 0.7 else _grey(rng, 0.85, 1.0)
        q = ((h - belt) / 0.08) ** 2
        spec = 1 + 0.25 / (1 + q * q)  # a highlight along the belt line
        self.paint(ys, xs, lower | cab, body * spec[..., None], CAR)
        self.paint(ys, xs, win, glass * (1 + 0.3 * (h - belt) / ht)[..., None], CAR)
        self.paint(ys, xs, wheels, tyre, CAR)
        self.paint(ys, xs, lights, hl, CAR)

    def _pedestrian(self, Z, X):
        rng = self.rng
        ht = rng.uniform(0.95, 1.3)
        r = self.fronto(Z, X - 0.4 * ht, X + 0.4 * ht, 0.0, ht)
        if r is None:
            return
        ys, xs, Xc, h, s = r
        h = h / ht
        Xc = (Xc - X) / ht
        minw = 0.5 / s / ht
        stride = rng.uniform(-0.25, 0.25)
        leg_t = max(0.05, minw)
        legs = (_seg(Xc, h, (-0.05, 0.5), (-0.05 - stride, 0.0), leg_t)
                | _seg(Xc, h, (0.05, 0.5), (0.05 + stride, 0.0), leg_t))
        torso = (np.abs(Xc) <= 0.12 + 0.06 * np.clip((h - 0.5) / 0.35, 0, 1)) & (h >= 0.47) & (h <= 0.86)
        arm_t = max(0.035, minw)
        sw = rng.uniform(-0.12, 0.12)
        arms = (_seg(Xc, h, (-0.17, 0.84), (-0.2 + sw, 0.5), arm_t)
                | _seg(Xc, h, (0.17, 0.84), (0.2 - sw, 0.5), arm_t))
        head = _disc(Xc, h, 0.0, 0.94, max(0.075, minw))
        top, trousers = _any_colour(rng), _any_colour(rng)
        skin = _jitter(rng, np.array((0.8, 0.6, 0.5)) * rng.uniform(0.4, 1.1), 0.1)
        self.paint(ys, xs, legs, trousers, PEDESTRIAN)
        self.paint(ys, xs, torso | arms, top * (0.85 + 0.3 * h)[..., None], PEDESTRIAN)
        self.paint(ys, xs, head, skin, PEDESTRIAN)
        if rng.random() < 0.2:  # a bag or umbrella counts as the person
            bag = (np.abs(Xc - 0.22) < 0.08) & (np.abs(h - 0.55) < 0.1)
            self.paint(ys, xs, bag, _any_colour(rng), PEDESTRIAN)

    def _bicyclist(self, Z, X):
        rng = self.rng
        frame_c, top, trousers = _any_colour(rng), _any_colour(rng), _any_colour(rng)
        tyre = _grey(rng, 0.03, 0.15)
        skin = _jitter(rng, np.array((0.8, 0.6, 0.5)) * rng.uniform(0.4, 1.1), 0.1)
        if rng.random() < 0.6:  # crossing: side view
            d = 1 if rng.random() < 0.5 else -1
            r = self.fronto(Z, X - 0.7, X + 0.7, 0.0, 1.3)
            if r is None:
                return
            ys, xs, Xc, h, s = r
            Xc = (Xc - X) * d
            minw = 0.5 / s
            R, t = 0.23, max(0.04, minw)
            rr = np.sqrt((Xc + 0.4) ** 2 + (h - R) ** 2)
            rf = np.sqrt((Xc - 0.4) ** 2 + (h - R) ** 2)
            wheels = (np.abs(rr - R) < t) | (np.abs(rf - R) < t)
            # the wheel discs are labelled (as an annotator's polygon would be) but show the
            # background through the spokes
            discs = (rr < R) | (rf < R)
            bg = self.img[ys, xs]
            self.paint(ys, xs, discs, bg * 0.8 + tyre * 0.2, BICYCLIST)
            ft = max(0.025, minw)
            rear, front, seat, crank, handle = (-0.4, R), (0.4, R), (-0.12, 0.62), (0.0, 0.24), (0.32, 0.7)
            frame = (_seg(Xc, h, rear, seat, ft) | _seg(Xc, h, seat, crank, ft)
                     | _seg(Xc, h, crank, rear, ft) | _seg(Xc, h, seat, handle, ft)
                     | _seg(Xc, h, handle, front, ft) | _seg(Xc, h, crank, (0.28, 0.6), ft))
            lean = rng.uniform(0.05, 0.2)
            shoulder = (-0.02 + lean, 1.0)
            torso = _seg(Xc, h, (-0.12, 0.66), shoulder, max(0.09, minw))
            head = _disc(Xc, h, shoulder[0] + 0.06, 1.13, max(0.08, minw))
            knee = (0.12, 0.5)
            legs = _seg(Xc, h, (-0.12, 0.64), knee, max(0.055, minw)) | _seg(Xc, h, knee, (0.03, 0.22), max(0.045, minw))
            arms = _seg(Xc, h, shoulder, handle, max(0.035, minw))
            self.paint(ys, xs, wheels, tyre, BICYCLIST)
            self.paint(ys, xs, frame, frame_c, BICYCLIST)
            self.paint(ys, xs, legs, trousers, BICYCLIST)
            self.paint(ys, xs, torso | arms, top, BICYCLIST)
            self.paint(ys, xs, head, skin, BICYCLIST)
        else:  # riding along the street: seen from behind or ahead
            r = self.fronto(Z, X - 0.35, X + 0.35, 0.0, 1.3)
            if r is None:
                return
            ys, xs, Xc, h, s = r
            Xc = Xc - X
            minw = 0.5 / s
            wheel = (np.abs(Xc) < max(0.03, minw)) & (h < 0.5)
            bar = (np.abs(Xc) < 0.25) & (np.abs(h - 0.8) < max(0.02, minw))
            legs = (_seg(Xc, h, (-0.08, 0.68), (-0.06, 0.25), max(0.045, minw))
                    | _seg(Xc, h, (0.08, 0.68), (0.06, 0.35), max(0.045, minw)))
            torso = (np.abs(Xc) < 0.15) & (h > 0.66) & (h < 1.05)
            head = _disc(Xc, h, 0.0, 1.14, max(0.08, minw))
            self.paint(ys, xs, wheel, tyre, BICYCLIST)
            self.paint(ys, xs, legs, trousers, BICYCLIST)
            self.paint(ys, xs, torso, top, BICYCLIST)
            self.paint(ys, xs, bar, frame_c, BICYCLIST)
            self.paint(ys, xs, head, skin, BICYCLIST)

    def _pole(self, Z, X, kind):
        rng = self.rng
        s = self.H / Z
        ht = {0: rng.uniform(2.5, 5.0), 1: rng.uniform(3.5, 6.0), 2: rng.uniform(1.6, 2.6),
              3: rng.uniform(2.2, 3.6)}[int(kind)]
        wpx = max(1, int(round(rng.uniform(0.1, 0.2) * s)))
        xc = self.x_v + X * s
        c0 = int(np.floor(xc - wpx / 2 + 0.5))
        cs, _, _ = self._cols(c0, c0 + wpx)
        rs, _, _ = self._rows(self.y_h + s * (1 - ht), self.y_h + s)
        col = _grey(rng, 0.1, 0.6, 0.05) if rng.random() < 0.8 else _jitter(rng, (0.2, 0.3, 0.22))
        if cs is not None and rs is not None:
            shade = 0.85 + 0.3 * (np.arange(cs.stop - cs.start) == 0)
            self.img[rs, cs] = col * shade[None, :, None]
            self.lab[rs, cs] = POLE
        if kind == 1:  # street lamp: an arm over the road and a lamp head
            d = 1 if X < (self.X_l + self.X_r) / 2 else -1
            arm = rng.uniform(0.6, 1.5)
            r = self.fronto(Z, X - arm - 0.1, X + arm + 0.1, ht - 0.3, ht + 0.1)
            if r is not None:
                ys, xs, Xc, h, s2 = r
                Xc = (Xc - X) * d
                t = max(0.04, 0.5 / s2)
                m = _seg(Xc, h, (0.0, ht - 0.25), (arm, ht), t) | ((Xc > arm - 0.3) & (Xc < arm) & (np.abs(h - ht + 0.05) < max(0.06, 0.5 / s2)))
                self.paint(ys, xs, m, col, POLE)
        elif kind in (2, 3):  # a sign or a traffic light at the top
            if kind == 2:
                sz = rng.uniform(0.45, 0.75)
                hw_ = sz / 2
            else:
                sz, hw_ = rng.uniform(0.6, 0.9), rng.uniform(0.12, 0.18)
            sx = X + (rng.uniform(-0.05, 0.05) if kind == 2 else 0)
            r = self.fronto(Z, sx - hw_ - 0.05, sx + hw_ + 0.05, ht, ht + sz)
            if r is None:
                return
            ys, xs, Xc, h, s2 = r
            ext = max(hw_, 1.5 / s2)  # at least ~3 px across
            dx = np.abs(Xc - sx)
            hc = ht + sz / 2
            dh = np.abs(h - hc)
            if kind == 3:
                box = (dx <= ext) & (dh <= max(sz / 2, 1.5 / s2))
                self.paint(ys, xs, box, _grey(rng, 0.05, 0.2), SIGN)
                lit = rng.integers(0, 3)
                cols = [(0.9, 0.1, 0.1), (0.95, 0.7, 0.1), (0.1, 0.9, 0.3)]
                for i in range(3):
                    m = _disc(Xc, h, sx, hc + (1 - i) * sz / 3.2, max(hw_ * 0.6, 0.5 / s2))
                    c = np.array(cols[i], np.float32) * (1.0 if i == lit else 0.3)
                    self.paint(ys, xs, m & box, c, SIGN)
                return
            shape = rng.integers(0, 4)
            ext_h = max(sz / 2, 1.5 / s2)
            if shape == 0:  # round
                m = (dx / ext) ** 2 + (dh / ext_h) ** 2 <= 1
                inner = (dx / ext) ** 2 + (dh / ext_h) ** 2 <= 0.55
            elif shape == 1:  # triangle
                m = (h >= hc - ext_h) & (dx <= ext * (hc + ext_h - h) / (2 * ext_h))
                inner = (h >= hc - ext_h * 0.6) & (dx <= ext * 0.6 * (hc + ext_h * 0.6 - h) / (2 * ext_h))
            elif shape == 2:  # rectangle
                m = (dx <= ext) & (dh <= ext_h * 0.75)
                inner = (dx <= ext * 0.75) & (dh <= ext_h * 0.45)
            else:  # diamond
                m = dx / ext + dh / ext_h <= 1
                inner = dx / ext + dh / ext_h <= 0.6
            self.paint(ys, xs, m, _sign_colour(rng), SIGN)
            self.paint(ys, xs, inner, _sign_colour(rng), SIGN)

    def _tree(self, Z, X):
        rng = self.rng
        s = self.H / Z
        ht = rng.uniform(1.0, 2.6)
        rad = rng.uniform(0.6, 1.7)
        r = self.fronto(Z, X - 2.2 * rad, X + 2.2 * rad, 0.0, ht + 2.5 * rad)
        if r is None:
            return
        ys, xs, Xc, h, s = r
        trunk_t = max(0.07, 0.5 / s)
        trunk = (np.abs(Xc - X - 0.3 * trunk_t * (h / ht)) < trunk_t) & (h <= ht + 0.3)
        rough = 1 + 0.18 * self.n_mid[ys, xs]
        if rng.random() < 0.3:  # a conifer: a tall, dark, jagged cone
            top = ht + 2.4 * rad
            rel = (top - h) / (top - ht * 0.6)
            canopy = (h >= ht * 0.6) & (np.abs(Xc - X) < 0.85 * rad * rel * rough * (0.8 + 0.2 * ((h * 3 / rad) % 1.0)))
            leaf = _jitter(rng, np.array((0.1, 0.25, 0.12)) * rng.uniform(0.6, 1.4), 0.1)
        else:  # a broadleaf: a cluster of rough discs
            canopy = np.zeros(np.broadcast_shapes(Xc.shape, h.shape), bool)
            for _ in range(rng.integers(2, 6)):
                cx = X + rng.normal(0, 0.45 * rad)
                ch = ht + rad * rng.uniform(0.5, 1.3)
                cr = rad * rng.uniform(0.55, 1.0)
                canopy |= ((Xc - cx) ** 2 + (h - ch) ** 2) < (cr * rough) ** 2
            leaf = _foliage_colour(rng)
        bark = _jitter(rng, np.array((0.3, 0.22, 0.15)) * rng.uniform(0.6, 1.4))
        self.paint(ys, xs, trunk, bark * (1 + 0.1 * self.n_fine[ys, xs, None]), TREE)
        rel = np.clip((h - ht) / (2 * rad), 0, 1)
        tex = 0.55 + 0.25 * rel + 0.25 * self.n_mid[ys, xs] * -1 + 0.15 * self.n_fine[ys, xs]
        self.paint(ys, xs, canopy, leaf * tex[..., None], TREE)

    def _clutter(self, Z, X):
        rng = self.rng
        w, ht = rng.uniform(0.3, 0.8), rng.uniform(0.4, 1.0)
        r = self.fronto(Z, X - w / 2, X + w / 2, 0.0, ht)
        if r is None:
            return
        ys, xs, Xc, h, _ = r
        m = (np.abs(Xc - X) <= w / 2) & (h >= 0) & (h <= ht)
        col = _any_colour(rng) * (0.8 + 0.3 * h / ht)[..., None]
        self.paint(ys, xs, m, col, VOID)

    # -- lighting and the sensor -------------------------------------------------------------
    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        rng, H, W = self.rng, self.H, self.W
        img, lab = self.img, self.lab
        ys, xs = self.ys, self.xs
        # void rim around cars in about half the images
        if rng.random() < 0.5:
            car = lab == CAR
            nb = np.zeros_like(car)
            nb[1:] |= car[:-1]
            nb[:-1] |= car[1:]
            nb[:, 1:] |= car[:, :-1]
            nb[:, :-1] |= car[:, 1:]
            rim = nb & ~car & _RIMMED[lab]
            lab[rim] = VOID
        # global exposure, white balance, a lighting gradient and a soft local light
        gain = rng.uniform(0.55, 1.35)
        wb = rng.uniform(0.85, 1.15, 3).astype(np.float32)
        ang = rng.uniform(0, 2 * math.pi)
        amp = rng.uniform(0, 0.5)
        grad = 1 + amp * ((xs / W - 0.5) * math.cos(ang) + (ys / H - 0.5) * math.sin(ang))
        cy, cx, rad = rng.uniform(0, H), rng.uniform(0, W), rng.uniform(0.15, 0.5) * W
        d2 = ((ys - cy) ** 2 + (xs - cx) ** 2) / (rad * rad)
        blob = 1 + rng.uniform(-0.35, 0.45) / (1 + d2 * d2)
        light = (gain * grad * blob).astype(np.float32)
        out = img * light[..., None] * wb
        if rng.random() < 0.5:  # optical blur (1-2-1 in both directions)
            b = out.copy()
            b[1:-1] = 0.5 * out[1:-1] + 0.25 * (out[:-2] + out[2:])
            out = b.copy()
            out[:, 1:-1] = 0.5 * b[:, 1:-1] + 0.25 * (b[:, :-2] + b[:, 2:])
        lut = _gamma_lut(int(rng.integers(80, 126)))  # gamma 0.80 .. 1.25
        out = lut[(np.clip(out, 0, 1) * 1023 + 0.5).astype(np.int16)]
        sigma = rng.uniform(0.005, 0.035)
        noise = (rng.random((H, W, 3), dtype=np.float32) - 0.5) * (sigma * 3.4641)
        noise += self.n_fine[..., None] * (sigma * 0.5)  # luminance noise
        out = out + noise
        img8 = (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)
        return img8, lab


def _sign_colour(rng):
    choice = rng.integers(0, 6)
    base = [(0.85, 0.1, 0.1), (0.1, 0.3, 0.8), (0.95, 0.8, 0.1), (0.92, 0.92, 0.92),
            (0.1, 0.5, 0.25), (0.1, 0.1, 0.1)][choice]
    return _jitter(rng, base, 0.08)


def render_scene(seed: int, split: str, index: int, resolution: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Image uint8 [H, W, 3] and mask uint8 [H, W] of one synthetic sample."""
    h, w = resolution
    rng = np.random.default_rng(sample_seed(seed, split, index))
    scene = _Scene(rng, h, w)
    scene.background()
    scene.fences()
    scene.objects()
    return scene.finish()


#: every data set object's renders in this process (kdcache.data.rendered; 256 MB: the four default
#: splits at the default resolution take about 110 MB together, 80 of them the unlabelled pool)
RENDERED = Rendered(256 * 2**20)


# ---------------------------------------------------------------------------------------------
# the data set
# ---------------------------------------------------------------------------------------------


@DATASETS.register("synthetic")
class SyntheticDataset(SegmentationDataset):
    """Procedural CamVid-like street scenes, generated on the fly.

    ``size`` overrides the number of samples of the split (defaults: ``DEFAULT_SIZES``),
    ``resolution`` is (height, width) (default ``DEFAULT_RESOLUTION``), ``seed`` selects a
    different data set; sample ``i`` of a split depends on ``(seed, split, i)`` only, so a
    larger ``size`` extends a split without changing the samples it already had. Samples are
    rendered when first read and kept in memory (see ``cache_bytes``).
    """

    needs_root = False
    #: Rendered samples are kept in memory up to this many bytes per data set object (the
    #: default train split at the default resolution takes about 20 MB), so later epochs do
    #: not render again; a full cache is emptied and starts over (the latest sample is always
    #: kept, so ``read_image`` + ``read_mask`` of one sample render it once).
    cache_bytes = 256 * 2**20
    class_names = ("sky", "building", "pole", "road", "pavement", "tree", "sign", "fence", "car",
                   "pedestrian", "bicyclist")

    def __init__(self, root=None, split: str = "train", size: int | None = None,
                 resolution: tuple[int, int] | str = DEFAULT_RESOLUTION, seed: int = 0,
                 unlabeled_masks: bool = False):
        if split not in DEFAULT_SIZES:
            raise DatasetError(
                f"synthetic data set has no split '{split}'; valid splits: {', '.join(DEFAULT_SIZES)}"
            )
        n = split_size("synthetic", size, DEFAULT_SIZES[split])
        if isinstance(resolution, str):  # "96x128" (height x width)
            resolution = resolution.lower().replace("*", "x").split("x")
        try:
            h, w = (int(v) for v in resolution)
        except (TypeError, ValueError):
            raise DatasetError(
                f"synthetic resolution must be (height, width) or 'HxW', got {resolution!r}"
            ) from None
        if h < 16 or w < 16:
            raise DatasetError(f"synthetic resolution must be at least 16x16, got {h}x{w}")
        self.resolution = (h, w)
        self.seed = 0 if seed is None else int(seed)
        self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._cache_bytes = 0
        # the unlabeled pool with its true masks: for a ceiling run (what labelling it would be worth)
        self.labelled = split not in UNLABELLED_SPLITS or bool(unlabeled_masks)
        refs = [SampleRef(id=f"{split}_{i:06d}") for i in range(n)]
        super().__init__(refs, split=split, root=None)

    @property
    def palette(self) -> np.ndarray:
        return CAMVID_PALETTE.copy()

    def _render(self, ref: SampleRef) -> tuple[np.ndarray, np.ndarray]:
        hit = self._cache.get(ref.id)
        if hit is not None:
            return hit
        split, _, idx = ref.id.rpartition("_")
        seed, index, resolution = self.seed, int(idx), self.resolution
        image, mask = RENDERED.get((seed, split, index, *resolution),
                                   lambda: render_scene(seed, split, index, resolution))
        size = image.nbytes + mask.nbytes
        if self._cache_bytes + size > self.cache_bytes:
            # over budget: start over (the newest sample stays, for the read_mask that follows)
            self._cache.clear()
            self._cache_bytes = 0
        self._cache[ref.id] = (image, mask)
        self._cache_bytes += size
        return image, mask

    def prepare_for_workers(self) -> None:
        """Render every sample now when they all fit in ``cache_bytes``: workers forked later
        inherit them instead of rendering them again in every epoch's new workers."""
        h, w = self.resolution
        if len(self) * h * w * 4 <= self.cache_bytes:  # RGB image + mask, uint8
            for ref in self.refs:
                self._render(ref)

    def read_image(self, ref: SampleRef) -> np.ndarray:
        return self._render(ref)[0].copy()

    def read_mask(self, ref: SampleRef) -> np.ndarray:
        return self._render(ref)[1].copy()

    def image_size(self, index: int) -> tuple[int, int]:
        return self.resolution

    def describe(self, ref: SampleRef) -> str:
        return f"synthetic:{ref.id} (seed {self.seed})"
