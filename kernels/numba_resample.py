"""The loader's resampling of a top-k + tail cache, compiled: :func:`nearest_topk` (the default,
``--target-resample nearest``; the math is :func:`kdcache.pipeline.warp._axes`'s) and
:func:`bilinear_topk` (``--target-resample bilinear``; :func:`kdcache.pipeline.warp.resample_logits`'s).

:func:`nearest_topk` takes one crop's cached values, ids and tail to the crop's target grid in one
call: the row and column each output cell samples (float64, the numpy code's operations in its
order, so the cells are the same to the bit), the padding mask, and the three gathers. In numpy
that is about thirty calls on arrays of a few dozen entries, whose overhead (about 0.1 ms an item)
was most of what a cached epoch's loading costs beyond a CE epoch's. Values and tail go in as
their raw bits (fp16 as uint16): the kernel only copies them.

:func:`bilinear_topk`:

It runs once per training item in the loader, on maps of a few hundred cells and a few to a few
hundred classes. Written with numpy and torch calls, the same work would take about twenty calls
per item (the dense rebuild, four gathers, a top k and a log-sum-exp over the class axis, each on a
[C, h, w] array), whose overhead would dominate; here it is one call, one output cell at a time, in
float64 (benchmarks/results/epoch-time-cpu.md has a bilinear epoch's time against a CE epoch's):

1. Each cached cell of the window the points fall in is rebuilt to C logits once: its top k at
   their ids, every other class at ``tail − log(C − k)`` (the equal share), or ``absent`` where
   the cache keeps no tail.
2. Interpolated along the rows, then along the columns (separable: (1 − w)·a + w·b, so a weight
   of exactly 0 leaves the logits as they were), then the top k (ties go to the lower class id) by k
   passes over the classes, or one stable sort where k > 8 (a dense cache of many classes), and
   the log-sum-exp of the classes left out, taken directly over them (max, then the sum of
   exponentials: no cancellation).

A cell whose point is exactly a cached cell's centre (both weights 0) copies that cell's entries
as they are, so an aligned crop gets the cache's own values, ids, tail and order.
Serial on purpose (``parallel`` would start Numba's threading layer inside every DataLoader
worker, and the work per item is microseconds). Compiled once for one signature (float32 values,
int64 ids, float32 tail, float64 weights; the caller converts) and kept in Numba's disk cache.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def _axis(n, o, flip, offset, s, size, m, mirror, cells, valid):  # pragma: no cover - compiled
    """Per output row (or column) ``i`` of ``n``: the map cell of ``m`` it samples into ``cells``
    and whether it lies in the scaled image into ``valid`` (:func:`kdcache.pipeline.warp._axes`,
    operation for operation: (((i + 1/2) · o / n, mirrored by ``flip``) + offset) · size / s ·
    m / size, floored and clamped; ``mirror``: counted from the far side)."""
    for i in range(n):
        c = i + 0.5
        c *= o
        c /= n
        if flip:
            c = o - c
        c += offset
        valid[i] = c >= 0.0 and c < s
        c *= size
        c /= s
        c *= m
        c /= size
        j = min(max(int(math.floor(c)), 0), int(m) - 1)
        cells[i] = int(m) - 1 - j if mirror else j


@njit(cache=True, nogil=True)
def nearest_topk(v, ids, tail, has_tail, in_h, in_w, sh, sw, oh, ow, top, left, flip, mirror,
                 out_v, out_i, out_t, invalid):  # pragma: no cover - compiled
    """``v``/``ids`` [k, h, w] and ``tail`` [h, w] (read unless ``has_tail`` is False) of one cached
    map of an input of ``in_h`` × ``in_w``, through a crop scaled to ``sh`` × ``sw``, cut at
    (``top``, ``left``) with ``oh`` × ``ow`` pixels and mirrored when ``flip`` (``mirror``: the map
    is of the mirrored image). Writes each output cell's nearest cached entries into ``out_v`` /
    ``out_i`` [k, ny, nx] and ``out_t`` [ny, nx], and ``invalid`` [ny, nx]: the cells outside the
    scaled image."""
    k, mh, mw = v.shape
    ny, nx = invalid.shape
    yi = np.empty(ny, np.int64)
    vy = np.empty(ny, np.bool_)
    xi = np.empty(nx, np.int64)
    vx = np.empty(nx, np.bool_)
    _axis(ny, oh, False, top, sh, in_h, float(mh), False, yi, vy)
    _axis(nx, ow, flip, left, sw, in_w, float(mw), mirror, xi, vx)
    for i in range(ny):
        for j in range(nx):
            invalid[i, j] = not (vy[i] and vx[j])
    for r in range(k):
        for i in range(ny):
            y = yi[i]
            for j in range(nx):
                out_v[r, i, j] = v[r, y, xi[j]]
                out_i[r, i, j] = ids[r, y, xi[j]]
    if has_tail:
        for i in range(ny):
            y = yi[i]
            for j in range(nx):
                out_t[i, j] = tail[y, xi[j]]


@njit(cache=True, nogil=True)
def bilinear_topk(v, ids, tail, has_tail, absent, y0, y1, wy, x0, x1, wx, num_classes,
                  out_v, out_i, out_t):  # pragma: no cover - compiled
    """``v``/``ids`` [k, h, w] and ``tail`` [h, w] (ignored unless ``has_tail``) of the cache;
    per output row ``i`` the cached rows ``y0[i]``/``y1[i]`` and the weight ``wy[i]`` of ``y1``,
    per output column the same (``x0``, ``x1``, ``wx``). Writes the new top k into ``out_v`` /
    ``out_i`` [k, ny, nx] and the log-sum-exp of the rest into ``out_t`` [ny, nx] (−inf when
    k = C)."""
    k = v.shape[0]
    C = num_classes
    log_rest = math.log(C - k) if C > k else 0.0
    ny, nx = y0.shape[0], x0.shape[0]
    # the window of cached cells the points fall between, each rebuilt to C logits once
    ya, yb, xa, xb = y0.min(), y1.max() + 1, x0.min(), x1.max() + 1
    dense = np.empty((yb - ya, xb - xa, C), np.float64)
    for yy in range(ya, yb):
        for xx in range(xa, xb):
            base = tail[yy, xx] - log_rest if has_tail else absent
            cell = dense[yy - ya, xx - xa]
            for c in range(C):
                cell[c] = base
            for r in range(k):
                cell[ids[r, yy, xx]] = v[r, yy, xx]
    rows = np.empty((xb - xa, C), np.float64)
    acc = np.empty(C, np.float64)
    taken = np.zeros(C, np.bool_)
    for i in range(ny):
        a, b, w = y0[i] - ya, y1[i] - ya, wy[i]
        for xx in range(xb - xa):  # along the rows first: a weight of 0 leaves a row as it is
            for c in range(C):
                rows[xx, c] = (1.0 - w) * dense[a, xx, c] + w * dense[b, xx, c]
        for j in range(nx):
            if w == 0.0 and wx[j] == 0.0:  # the point is a cached cell's centre: its entries as they are
                yy, xx = y0[i], x0[j]
                for r in range(k):
                    out_v[r, i, j] = v[r, yy, xx]
                    out_i[r, i, j] = ids[r, yy, xx]
                out_t[i, j] = tail[yy, xx] if has_tail else -np.inf
                continue
            p, q, u = x0[j] - xa, x1[j] - xa, wx[j]
            for c in range(C):
                acc[c] = (1.0 - u) * rows[p, c] + u * rows[q, c]
                taken[c] = False
            if k <= 8:  # k passes over the classes
                for r in range(k):
                    best = -np.inf
                    bi = -1
                    for c in range(C):
                        if not taken[c] and (bi < 0 or acc[c] > best):
                            best = acc[c]
                            bi = c
                    taken[bi] = True
                    out_v[r, i, j] = best
                    out_i[r, i, j] = bi
            else:  # a larger k (a dense cache of many classes): one sort, not k passes
                order = np.argsort(-acc, kind="mergesort")
                for r in range(k):
                    bi = order[r]
                    taken[bi] = True
                    out_v[r, i, j] = acc[bi]
                    out_i[r, i, j] = bi
            if k == C:
                out_t[i, j] = -np.inf
                continue
            m = -np.inf
            for c in range(C):
                if not taken[c] and acc[c] > m:
                    m = acc[c]
            s = 0.0
            for c in range(C):
                if not taken[c]:
                    s += math.exp(acc[c] - m)
            out_t[i, j] = m + math.log(s)


def warm_nearest() -> None:
    """Compile :func:`nearest_topk` now (or load it from Numba's disk cache) for a cache's own
    dtypes (fp16 values and tail as uint16, uint8 ids) on a tiny input."""
    u16 = np.zeros((1, 1, 1), np.uint16)
    nearest_topk(u16, np.zeros((1, 1, 1), np.uint8), u16[0], True, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, False,
                 False, np.empty((1, 1, 1), np.uint16), np.empty((1, 1, 1), np.uint8), np.empty((1, 1), np.uint16),
                 np.empty((1, 1), np.bool_))


def warm() -> None:
    """Compile :func:`bilinear_topk` now (or load it from Numba's disk cache) on a tiny input."""
    one = np.zeros(1, np.int64)
    bilinear_topk(np.zeros((1, 1, 1), np.float32), np.zeros((1, 1, 1), np.int64), np.zeros((1, 1), np.float32), True,
                  -1e4, one, one, np.full(1, 0.5), one, one, np.zeros(1), 2, np.empty((1, 1, 1), np.float32),
                  np.empty((1, 1, 1), np.int64), np.empty((1, 1), np.float32))
