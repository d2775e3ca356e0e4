"""The loader's resampling of a top-k + tail cache: the entry points
:func:`kdcache.pipeline.warp.warp_targets` (nearest, the default) and
:func:`kdcache.pipeline.warp.resample_logits` (``--target-resample bilinear``) call. Each imports
its compiled kernel (:mod:`kdcache.kernels.numba_resample`) on first use, as the loss imports its
backends: Numba costs seconds to import, which a run that reads no cached logits should not pay."""

from __future__ import annotations

import numpy as np


def _bits(a: np.ndarray) -> np.ndarray:
    """A float array as unsigned integers of its width (the kernel copies bits, whatever the float)."""
    a = np.ascontiguousarray(a)
    return a.view(f"u{a.dtype.itemsize}") if a.dtype.kind == "f" else a


def nearest_topk(values: np.ndarray, indices: np.ndarray, tail: np.ndarray | None, in_size: tuple[int, int],
                 scaled_size: tuple[int, int], out_size: tuple[int, int], top: float, left: float, flip: bool,
                 out_hw: tuple[int, int], mirror: bool = False
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """``values``/``indices`` [k, h, w] and ``tail`` [h, w] (or None) of one cached map of an input of
    ``in_size``, taken through a crop (scaled to ``scaled_size``, its ``out_size`` window at
    (``top``, ``left``), mirrored when ``flip``) to a grid of ``out_hw`` cells by the nearest cached
    cell (``mirror``: the map is of the mirrored image): values, ids and tail in their own dtypes,
    and the [out_h, out_w] mask of the cells outside the scaled image."""
    from kdcache.kernels.numba_resample import nearest_topk as kernel

    v, i = _bits(values), np.ascontiguousarray(indices)
    out_v = np.empty((v.shape[0], *out_hw), v.dtype)
    out_i = np.empty((i.shape[0], *out_hw), i.dtype)
    t = _bits(tail) if tail is not None else v[0]  # unread without a tail
    out_t = np.empty(out_hw, t.dtype)
    invalid = np.empty(out_hw, np.bool_)
    kernel(v, i, t, tail is not None, float(in_size[0]), float(in_size[1]), float(scaled_size[0]),
           float(scaled_size[1]), float(out_size[0]), float(out_size[1]), float(top), float(left), bool(flip),
           bool(mirror), out_v, out_i, out_t, invalid)
    return (out_v.view(values.dtype), out_i, None if tail is None else out_t.view(tail.dtype), invalid)


def bilinear_topk(values: np.ndarray, indices: np.ndarray, tail: np.ndarray | None,
                  rows: tuple[np.ndarray, np.ndarray, np.ndarray], cols: tuple[np.ndarray, np.ndarray, np.ndarray],
                  num_classes: int, absent: float) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``values``/``indices`` [k, h, w] and ``tail`` [h, w] (or None) of one cached map, sampled
    at the points whose rows lie between cached rows ``rows = (y0, y1, wy)`` (``wy`` the weight
    of ``y1``) and whose columns between ``cols = (x0, x1, wx)``: the new top k's values
    [k, ny, nx] (float32), ids (int64) and tail [ny, nx] (float32, None without a tail). The
    classes outside a cell's top k take an equal share of its tail, or ``absent`` without one."""
    from kdcache.kernels.numba_resample import bilinear_topk as kernel

    (y0, y1, wy), (x0, x1, wx) = rows, cols
    k, ny, nx = values.shape[0], len(y0), len(x0)
    out_v = np.empty((k, ny, nx), np.float32)
    out_i = np.empty((k, ny, nx), np.int64)
    out_t = np.empty((ny, nx), np.float32)
    t = np.zeros((1, 1), np.float32) if tail is None else np.ascontiguousarray(tail, dtype=np.float32)
    kernel(np.ascontiguousarray(values, dtype=np.float32), np.ascontiguousarray(indices, dtype=np.int64), t,
           tail is not None, float(absent), np.ascontiguousarray(y0, dtype=np.int64),
           np.ascontiguousarray(y1, dtype=np.int64), np.ascontiguousarray(wy, dtype=np.float64),
           np.ascontiguousarray(x0, dtype=np.int64), np.ascontiguousarray(x1, dtype=np.int64),
           np.ascontiguousarray(wx, dtype=np.float64), int(num_classes), out_v, out_i, out_t)
    return out_v, out_i, (None if tail is None else out_t)


def warm_resample(resample: str = "bilinear") -> None:
    """Compile (or load from Numba's disk cache) ``resample``'s kernel (``nearest`` or ``bilinear``)
    in this process, so that DataLoader workers forked afterwards inherit it instead of each
    importing Numba again every epoch."""
    from kdcache.kernels.numba_resample import warm, warm_nearest

    (warm if resample == "bilinear" else warm_nearest)()
