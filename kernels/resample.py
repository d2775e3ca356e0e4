"""The loader's bilinear resampling of a top-k + tail cache (``--target-resample bilinear``): the
entry point :func:`kdcache.pipeline.warp.resample_logits` calls, which imports the compiled
kernel (:mod:`kdcache.kernels.numba_resample`) on first use, as the loss imports its backends:
Numba costs seconds to import, which a run that never resamples bilinearly should not pay."""

from __future__ import annotations

import numpy as np


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


def warm_resample() -> None:
    """Compile (or load from Numba's disk cache) the kernel in this process, so that DataLoader
    workers forked afterwards inherit it instead of each importing Numba again every epoch."""
    from kdcache.kernels.numba_resample import warm

    warm()
