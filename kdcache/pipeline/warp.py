"""Cached teacher maps through the same geometric transform as the image and the label.

A training item gets one :class:`~kdcache.pipeline.transforms.Geometry` (scale, crop window, flip) in
input-pixel units. A cached map of h x w for an image of H x W is taken through it by nearest
sampling at the centres of the output cells: output cell (i, j) of an (oh / s) x (ow / s) map
looks at the crop point ((i + 1/2)·oh/out_h, (j + 1/2)·ow/out_w) — mirrored when flipped —
which lands in the scaled image, then in the input image, then in one map cell. All the
top-k entries of a position (values, ids, tail) move together, so class ids are never
interpolated and stay consistent with their values; cells that fall in the crop's padding are
ignored. With scale 1, a crop aligned to the stride and a flip, this is an exact re-indexing
(exactly the teacher on the flipped image for a flip-averaged store).

``resample="bilinear"`` (``train-student --target-resample bilinear``) takes the logits of a
scaled or off-grid crop at its exact points instead: the top-k + tail of the four cells around
each point are rebuilt to logits (the classes outside a cell's top k at an equal share of its
tail), interpolated bilinearly (between cell centres, clamped at the map's border: what a
teacher's own bilinear upsampling of its logits does), and cut to top-k + tail again.
Features and attention maps stay nearest.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from kdcache.core.topk import ABSENT, tail_share
from kdcache.kernels import bilinear_topk, nearest_topk, warm_resample
from kdcache.pipeline.signals import signal_of
from kdcache.pipeline.transforms import Geometry


def out_map_size(crop: tuple[int, int], stride: tuple[float, float]) -> tuple[int, int]:
    """Size of the target maps for a crop: ceil(crop / stride)."""
    return max(1, math.ceil(crop[0] / stride[0] - 1e-6)), max(1, math.ceil(crop[1] / stride[1] - 1e-6))


def sample_grid(g: Geometry, map_hw: tuple[int, int], out_hw: tuple[int, int]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row and column indices into a map of ``map_hw`` (for an input of ``g.in_size``) for
    each output cell, and the [out_h, out_w] mask of cells outside the scaled image."""
    yi, xi, invalid = _grid(g, map_hw, out_hw)
    return torch.from_numpy(yi), torch.from_numpy(xi), torch.from_numpy(invalid)


def _grid(g: Geometry, map_hw: tuple[int, int], out_hw: tuple[int, int], mirror: bool = False
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    yi, valid_y, xi, valid_x = _axes(g, map_hw, out_hw, mirror=mirror)
    invalid = ~(valid_y[:, None] & valid_x[None, :])
    return yi, xi, invalid


def _axes(g: Geometry, map_hw: tuple[int, int], out_hw: tuple[int, int], exact: bool = False,
          mirror: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per output row and column: the map cell it samples (``exact``: the point in map-cell
    units, cell j covering [j, j + 1)) and whether it lies inside the scaled image. ``mirror``:
    the map is of the mirrored image (a stored flip level), so columns count from the right."""
    # numpy in float64: a few dozen cells per axis, where each torch call would cost more than
    # the arithmetic (this runs per item in the loader); in-place ufuncs in the order of
    # floor(((c + 1/2) · o / n + offset) · H / s · m / H), as few calls as that allows
    H, W = g.in_size
    sh, sw = g.scaled_size
    oh, ow = g.out_size
    mh, mw = map_hw
    out_h, out_w = out_hw

    def axis(n, o, flip, offset, s, size, m, mirror=False):
        c = np.arange(n, dtype=np.float64)
        c += 0.5
        c *= o
        c /= n
        if flip:
            np.subtract(o, c, out=c)
        c += offset
        valid = (c >= 0) & (c < s)
        c *= size
        c /= s
        c *= m
        c /= size
        if exact:
            return (m - c if mirror else c), valid
        np.floor(c, out=c)
        i = c.astype(np.int64)
        np.maximum(i, 0, out=i)
        np.minimum(i, m - 1, out=i)
        return (m - 1 - i if mirror else i), valid

    yi, valid_y = axis(out_h, oh, False, g.top, sh, H, mh)
    xi, valid_x = axis(out_w, ow, g.flip, g.left, sw, W, mw, mirror)
    return yi, valid_y, xi, valid_x


def cell_index(yi: np.ndarray, xi: np.ndarray, w: int) -> np.ndarray:
    """The flat positions ``yi × w + xi`` of a [len(yi), len(xi)] grid in a map of width ``w``."""
    return (yi[:, None] * w + xi[None, :]).ravel()


def _bilinear_axis(c: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For points ``c`` in map-cell units on an axis of ``m`` cells: the cells below and above
    each point's position between cell centres, and the weight of the one above (clamped at the
    border: a point outside the outer centres takes the outer cell)."""
    p = np.clip(c - 0.5, 0.0, m - 1)
    lo = np.minimum(np.floor(p).astype(np.int64), m - 1)
    hi = np.minimum(lo + 1, m - 1)
    return lo, hi, p - lo


def prepare_resample(resample: str) -> None:
    """Before a loader's workers start: compile (or load) ``resample``'s kernel (``nearest`` or
    ``bilinear``: :func:`kdcache.kernels.warm_resample`) in this process, which forked workers
    inherit."""
    warm_resample(resample)


def resample_logits(values: torch.Tensor, indices: torch.Tensor, tail: torch.Tensor | None, g: Geometry,
                    out_hw: tuple[int, int], num_classes: int, mirror: bool = False) -> dict:
    """One sample's cached logits (``values``/``indices`` [k, h, w], ``tail`` [h, w] or None)
    through ``g`` by bilinear interpolation of the rebuilt logits at the crop's exact points:
    ``kd/values``, ``kd/indices`` (the input's dtypes), ``kd/tail`` and ``kd/ignore`` at
    ``out_hw``. ``mirror``: the map is of the mirrored image. The per-cell work is one compiled
    call (:func:`kdcache.kernels.bilinear_topk`)."""
    map_hw = tuple(values.shape[-2:])
    cy, valid_y, cx, valid_x = _axes(g, map_hw, out_hw, exact=True, mirror=mirror)
    v, i, t = bilinear_topk(values.numpy(), indices.numpy(), None if tail is None else tail.numpy(),
                            _bilinear_axis(cy, map_hw[0]), _bilinear_axis(cx, map_hw[1]), num_classes, ABSENT)
    out = {"kd/values": torch.from_numpy(v).to(values.dtype), "kd/indices": torch.from_numpy(i).to(indices.dtype),
           "kd/ignore": torch.from_numpy(~(valid_y[:, None] & valid_x[None, :]))}
    if t is not None:
        out["kd/tail"] = torch.from_numpy(t).to(tail.dtype)
    return out


def warp_targets(item: dict, g: Geometry, strides: dict[str, tuple[float, float]], resample: str = "nearest",
                 num_classes: int | None = None, mirror: bool = False) -> dict:
    """Take every cached map of one sample (``logits/*``, ``features/<tap>``,
    ``attention/<tap>``; as tensors cropped to their extent) through ``g``.

    ``strides``: the store's nominal stride of each map group (``logits``, ``features/<tap>``,
    ``attention/<tap>``), so every sample of a batch gets maps of one size. Returns
    ``kd/values``, ``kd/indices``, ``kd/tail`` (if stored) and ``kd/ignore`` (bool, True in the
    crop's padding) at ceil(crop / stride), and ``kd/features/<tap>``, ``kd/attention/<tap>``
    (with their own ``…/ignore``) at ceil(crop / their stride). Maps ``item`` lacks (not read
    because no method needs them) are left out. ``resample``: ``nearest`` (the default) or
    ``bilinear`` for the logits (see the module docstring; needs ``num_classes``). ``mirror``:
    the logits map is the teacher's on the mirrored image (a stored flip level; see
    :func:`level_targets`)."""
    out: dict = {}
    values = item.get("logits/values")
    if values is not None and resample == "bilinear":
        out.update(resample_logits(values, item["logits/indices"], item.get("logits/tail"), g,
                                   out_map_size(g.out_size, strides["logits"]), num_classes, mirror))
    elif values is not None:  # absent when no method reads the logits
        # one compiled call: the cells of _grid and the three gathers (kdcache.kernels.nearest_topk)
        tail = item.get("logits/tail")
        v, i, t, invalid = nearest_topk(values.numpy(), item["logits/indices"].numpy(),
                                        None if tail is None else tail.numpy(), g.in_size, g.scaled_size, g.out_size,
                                        g.top, g.left, g.flip, out_map_size(g.out_size, strides["logits"]), mirror)
        out["kd/values"], out["kd/indices"] = torch.from_numpy(v), torch.from_numpy(i)
        if t is not None:
            out["kd/tail"] = torch.from_numpy(t)
        out["kd/ignore"] = torch.from_numpy(invalid)
    for key, a in item.items():
        sig = signal_of(key)  # features/<tap>, attention/<tap>, …: each at its own stride
        if sig is not None:
            fy, fx, finv = _grid(g, tuple(a.shape[-2:]), out_map_size(g.out_size, strides[key]))
            out[f"kd/{key}"] = sig.take(a, cell_index(fy, fx, a.shape[-1]), finv.shape)
            out[f"kd/{key}/ignore"] = torch.from_numpy(finv)
    return out


def choose_level(g: Geometry, levels: list[dict]) -> int:
    """Which map of a pyramid store a crop of ``g`` takes: 0 for the base map (scale 1, not
    mirrored), ``j`` for stored level ``j - 1`` (``levels``: the store's ``{"scale", "flip",
    "map_size"}``). Where mirrored levels are stored, only the maps of the crop's own flip
    compete; otherwise only the unmirrored ones (a flip then mirrors the indexing). Of those, the
    scale nearest the crop's in log scale (the width's stretch counted as a geometric mean);
    ties go to the earlier map, the base first."""
    flips = any(lv["flip"] for lv in levels)
    want = bool(g.flip) if flips else False
    s = math.log(g.scale * math.sqrt(g.stretch))
    candidates = [(0, 1.0, False)] + [(j + 1, float(lv["scale"]), bool(lv["flip"])) for j, lv in enumerate(levels)]
    return min((c for c in candidates if c[2] == want), key=lambda c: (abs(math.log(c[1]) - s), c[0]))[0]


def level_targets(item: dict, g: Geometry, strides: dict[str, tuple[float, float]], levels: list[dict],
                  resample: str = "nearest", num_classes: int | None = None) -> dict:
    """The targets of a crop ``g`` from a pyramid store (``build-teacher-cache --store-scales``,
    ``--store-flips``): ``item`` holds the base maps (``logits/*``, ``features/…``) and the
    stored levels' logits (``views/logits/*``, [V, …] padded to the largest level). The crop takes
    the logits of the level :func:`choose_level` picks — the teacher on the whole image at that
    scale (and mirrored, if a flip level) — through its own geometry, as :func:`warp_targets`
    takes the base map: the level covers the whole image at its own resolution, so the same cell
    arithmetic applies, with the columns counted from the right on a mirrored level. Features and
    attention come from the base maps."""
    j = choose_level(g, levels)
    rest = {key: a for key, a in item.items() if not key.startswith("views/")}
    if j > 0:
        lv = levels[j - 1]
        h, w = lv["map_size"]
        for key in ("logits/values", "logits/indices", "logits/tail"):
            if f"views/{key}" in item:
                rest[key] = item[f"views/{key}"][j - 1][..., :h, :w]
        return warp_targets(rest, g, strides, resample, num_classes, mirror=bool(lv["flip"]))
    return warp_targets(rest, g, strides, resample, num_classes)


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



def _cell_overlap(start: float, stop: float, size: int, cells: int) -> np.ndarray:
    """The length of [start, stop) inside each of ``cells`` equal cells covering [0, size)."""
    edges = np.arange(cells + 1, dtype=np.float64) * (size / cells)
    return np.clip(np.minimum(edges[1:], stop) - np.maximum(edges[:-1], start), 0.0, None)


def pool_targets(item: dict, g: Geometry, num_classes: int) -> dict:
    """ReLabel's region pooling of a cached class map (``logits/values``, ``/indices``,
    ``/tail`` of a classifier's map before global pooling, ``num_classes`` classes) over the crop
    of ``g``: one target per item, ``kd/values`` [k, 1, 1] (float32), ``kd/indices`` [k, 1, 1],
    ``kd/tail`` [1, 1] and ``kd/ignore`` [1, 1] (True only if the crop covers no cell).

    As ReLabel does (RoIAlign over the label map, then softmax), the cells' *logits* are averaged,
    each cell weighted by the area of the crop's box (:meth:`Geometry.box`) inside it: for a
    linear head after global average pooling, the box of the whole image gives back the
    classifier's logits exactly. ReLabel's map is zero outside each cell's top 5; here a cell's
    classes outside its top k take the logit its tail gives each of them in equal shares,
    τ − log(C − k) (the kernel's ``bin`` assumption; exact when k = C), which never exceeds its
    top k. The pooled logits' top k and the logsumexp of the rest (the tail) are the target.
    A flip does not change a pool."""
    values = item["logits/values"]
    k, h, w = values.shape
    top, left, bh, bw = g.box()
    H, W = g.in_size
    weights = np.outer(_cell_overlap(top, top + bh, H, h), _cell_overlap(left, left + bw, W, w)).ravel()
    total = weights.sum()
    ids = item["logits/indices"].numpy().reshape(k, h * w)
    tail = item.get("logits/tail")
    if total <= 0:  # the crop lies outside the image: nothing to learn from
        return {"kd/values": torch.zeros(k, 1, 1), "kd/indices": torch.from_numpy(ids[:, :1].reshape(k, 1, 1).copy()),
                **({"kd/tail": torch.zeros(1, 1)} if tail is not None else {}),
                "kd/ignore": torch.ones(1, 1, dtype=torch.bool)}
    used = weights > 0
    wu = weights[used] / total
    v = values.numpy().astype(np.float64).reshape(k, h * w)[:, used]
    # the logit of each class outside a cell's top k (0 terms when the cache is dense)
    u = (tail_share(tail.numpy().astype(np.float64).reshape(h * w)[used], num_classes, k)
         if tail is not None and num_classes > k else np.zeros(v.shape[1]))
    base = float((wu * u).sum())  # the pooled logit of a class in no cell's top k
    uniq, inv = np.unique(ids[:, used], return_inverse=True)
    pooled = base + np.bincount(inv.ravel(), weights=((v - u) * wu).ravel(), minlength=len(uniq))
    order = np.argsort(-pooled, kind="stable")
    top_k = order[:k]
    out = {"kd/values": torch.from_numpy(pooled[top_k].astype(np.float32).reshape(k, 1, 1)),
           "kd/indices": torch.from_numpy(uniq[top_k].astype(ids.dtype).reshape(k, 1, 1)),
           "kd/ignore": torch.zeros(1, 1, dtype=torch.bool)}
    if tail is not None:
        others = pooled[order[k:]]  # the union's other classes, then those of no cell's top k
        outside = num_classes - len(uniq)
        parts = list(others) + ([base + np.log(outside)] if outside > 0 else [])
        out["kd/tail"] = torch.tensor([[np.logaddexp.reduce(parts) if parts else -np.inf]], dtype=torch.float32)
    return out
