"""Cached teacher maps through the same geometric transform as the image and the label.

A training item gets one :class:`~kdcache.transforms.Geometry` (scale, crop window, flip) in
input-pixel units. A cached map of h x w for an image of H x W is taken through it by nearest
sampling at the centres of the output cells: output cell (i, j) of an (oh / s) x (ow / s) map
looks at the crop point ((i + 1/2)·oh/out_h, (j + 1/2)·ow/out_w) — mirrored when flipped —
which lands in the scaled image, then in the input image, then in one map cell. All the
top-k entries of a position (values, ids, tail) move together, so class ids are never
interpolated and stay consistent with their values; cells that fall in the crop's padding are
ignored. With scale 1, a crop aligned to the stride and a flip, this is an exact re-indexing
(exactly the teacher on the flipped image for a flip-averaged store).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from kdcache.transforms import Geometry


def out_map_size(crop: tuple[int, int], stride: tuple[float, float]) -> tuple[int, int]:
    """Size of the target maps for a crop: ceil(crop / stride)."""
    return max(1, math.ceil(crop[0] / stride[0] - 1e-6)), max(1, math.ceil(crop[1] / stride[1] - 1e-6))


def sample_grid(g: Geometry, map_hw: tuple[int, int], out_hw: tuple[int, int]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row and column indices into a map of ``map_hw`` (for an input of ``g.in_size``) for
    each output cell, and the [out_h, out_w] mask of cells outside the scaled image."""
    yi, xi, invalid = _grid(g, map_hw, out_hw)
    return torch.from_numpy(yi), torch.from_numpy(xi), torch.from_numpy(invalid)


def _grid(g: Geometry, map_hw: tuple[int, int], out_hw: tuple[int, int]
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # numpy in float64: a few dozen cells per axis, where each torch call would cost more than
    # the arithmetic (this runs per item in the loader)
    H, W = g.in_size
    sh, sw = g.scaled_size
    oh, ow = g.out_size
    mh, mw = map_hw
    out_h, out_w = out_hw
    yc = (np.arange(out_h, dtype=np.float64) + 0.5) * oh / out_h
    xc = (np.arange(out_w, dtype=np.float64) + 0.5) * ow / out_w
    if g.flip:
        xc = ow - xc
    ys = yc + g.top
    xs = xc + g.left
    valid_y = (ys >= 0) & (ys < sh)
    valid_x = (xs >= 0) & (xs < sw)
    yi = np.clip(np.floor(ys * H / sh * mh / H).astype(np.int64), 0, mh - 1)
    xi = np.clip(np.floor(xs * W / sw * mw / W).astype(np.int64), 0, mw - 1)
    invalid = ~(valid_y[:, None] & valid_x[None, :])
    return yi, xi, invalid


def warp(x: torch.Tensor, yi: np.ndarray, xi: np.ndarray) -> torch.Tensor:
    """``x`` [..., h, w] (on the CPU) sampled at rows ``yi`` and columns ``xi``:
    [..., len(yi), len(xi)], one numpy gather (several times faster than torch's on maps this
    small)."""
    return torch.from_numpy(x.numpy()[..., yi[:, None], xi[None, :]])


def warp_targets(item: dict, g: Geometry, strides: dict[str, tuple[float, float]]) -> dict:
    """Take every cached map of one sample (``logits/*``, ``features/<tap>``,
    ``attention/<tap>``; as tensors cropped to their extent) through ``g``.

    ``strides``: the store's nominal stride of each map group (``logits``, ``features/<tap>``,
    ``attention/<tap>``), so every sample of a batch gets maps of one size. Returns
    ``kd/values``, ``kd/indices``, ``kd/tail`` (if stored) and ``kd/ignore`` (bool, True in the
    crop's padding) at ceil(crop / stride), and ``kd/features/<tap>``, ``kd/attention/<tap>``
    (with their own ``…/ignore``) at ceil(crop / their stride). Maps ``item`` lacks (not read
    because no method needs them) are left out."""
    out: dict = {}
    values = item.get("logits/values")
    if values is not None:  # absent when no method reads the logits
        map_hw = tuple(values.shape[-2:])
        yi, xi, invalid = _grid(g, map_hw, out_map_size(g.out_size, strides["logits"]))
        out["kd/values"] = warp(values, yi, xi)
        out["kd/indices"] = warp(item["logits/indices"], yi, xi)
        if item.get("logits/tail") is not None:
            out["kd/tail"] = warp(item["logits/tail"], yi, xi)
        out["kd/ignore"] = torch.from_numpy(invalid)
    for key, a in item.items():
        if key.startswith(("features/", "attention/")):
            fy, fx, finv = _grid(g, tuple(a.shape[-2:]), out_map_size(g.out_size, strides[key]))
            out[f"kd/{key}"] = warp(a, fy, fx)
            out[f"kd/{key}/ignore"] = torch.from_numpy(finv)
    return out


def view_targets(item: dict, v: int) -> dict:
    """The teacher's outputs on stored view ``v`` of one sample (``views/logits/*``,
    ``views/features/<tap>``, ``views/attention/<tap>``) as the ``kd/…`` targets of an item
    transformed by that view's geometry: they were computed on exactly that crop, so nothing
    is resampled and no cell is ignored."""
    out: dict = {}
    for key, a in item.items():
        if not key.startswith("views/") or key == "views/params":
            continue
        name = key[len("views/"):]
        if name.startswith("logits/"):
            out[f"kd/{name[len('logits/'):]}"] = a[v]
        else:
            out[f"kd/{name}"] = a[v]
            out[f"kd/{name}/ignore"] = torch.zeros(a.shape[-2:], dtype=torch.bool)
    out["kd/ignore"] = torch.zeros(out["kd/values"].shape[-2:], dtype=torch.bool)
    return out

