"""The pyramid form: the teacher's logits on the whole image at other scales and mirrored, so that
a scaled or flipped crop takes the level nearest its own."""

from __future__ import annotations

import numpy as np
import torch

from kdcache.core.errors import KDCacheError
from kdcache.pipeline.geometry import Geometry
from kdcache.pipeline.transforms import apply_geometry
from kdcache.pipeline.warp import level_targets, warp_targets
from kdcache.store.forms.base import FORMS, BuildContext, CacheForm


def level_geometry(size: tuple[int, int], scale: float, flip: bool) -> Geometry:
    """A pyramid level: the whole image of ``size`` at ``scale``, mirrored if ``flip``."""
    g = Geometry(tuple(size), float(scale), 0, 0, tuple(size), bool(flip))
    return Geometry(tuple(size), float(scale), 0, 0, g.scaled_size, bool(flip))


@FORMS.register("pyramid")
class Pyramid(CacheForm):
    """``build-teacher-cache --store-scales S,… [--store-flips]``: the teacher's logits on the whole
    image at each other scale (and, with flips, mirrored at every scale, 1 included), stored as views
    with ``views.levels``. A training crop takes the level nearest its own scale and flip
    (:func:`~kdcache.pipeline.warp.level_targets`) through the base map's cell arithmetic."""

    targets_name = "levels"
    options = "--store-scales S,... or --store-flips"

    @classmethod
    def asked(cls, config) -> bool:
        return bool(config.store_scales or config.store_flips)

    @classmethod
    def holds(cls, schema) -> bool:
        return bool(schema.levels)

    @classmethod
    def check_options(cls, config) -> None:
        if not cls.asked(config):
            return
        given = "--store-scales" if config.store_scales else "--store-flips"
        for other, on in (("--views", config.views), ("--schedule-epochs", config.schedule_epochs),
                          ("--label-map", config.label_map)):
            if on:
                raise KDCacheError(f"{given} and {other} are two forms of stored targets; give one of them")
        if config.flip_average and config.store_flips:
            raise KDCacheError("--store-flips and --flip-average both make flips exact; give one of them")
        if 1 in config.store_scales:  # each is finite and > 0: its bounds (check_declared)
            raise KDCacheError("--store-scales takes the scales other than 1 (the base map), each > 0; got 1")
        if len(set(config.store_scales)) != len(config.store_scales):
            raise KDCacheError(f"--store-scales has a scale twice: {','.join(f'{s:g}' for s in config.store_scales)}")

    @classmethod
    def plan(cls, ctx: BuildContext) -> dict:
        config = ctx.config
        flags = "--store-scales" if config.store_scales else "--store-flips"
        if ctx.classification:
            raise KDCacheError(f"{flags} is for segmentation caches; a classifier's crops take --label-map or "
                               "--schedule-epochs")
        if len(set(ctx.sizes)) > 1:
            raise KDCacheError(f"the images have different sizes: {flags} needs images of one size (give the teacher "
                               "a fixed input size, or build without it)")
        size = ctx.sizes[0]
        levels = [{"scale": sc, "flip": f,
                   "map_size": ctx.teacher.probe(level_geometry(size, sc, f).scaled_size, ctx.device)[0]}
                  for sc, f in config.levels]
        scales = [1.0, *(lv["scale"] for lv in levels)]
        return {"count": len(levels), "scale": (min(scales), max(scales)), "crop": size, "seed": 0,
                "map_size": (max(lv["map_size"][0] for lv in levels), max(lv["map_size"][1] for lv in levels)),
                "feature_shapes": {}, "area": None, "levels": levels}

    def teacher_views(self, teacher, x, items, batch):
        """The teacher's logits on every level of the images ``x`` [B, 3, H, W] (one forward per
        level, the images resized on ``x``'s device as a training pipeline resizes them), each padded
        to the views' map size: [B·V, C, h, w] image by image, and the levels' packed geometries."""
        size = tuple(x.shape[-2:])
        vh, vw = self.schema.views["map_size"]
        per_level = []
        for lv in self.schema.levels:
            g = level_geometry(size, lv["scale"], lv["flip"])
            z = teacher(torch.stack([apply_geometry(im, g, kind="image") for im in x])).logits
            if tuple(z.shape[-2:]) != tuple(lv["map_size"]):
                raise KDCacheError(f"the teacher's map at scale {lv['scale']:g} is {z.shape[-2]}x{z.shape[-1]}, not "
                                   f"the {lv['map_size'][0]}x{lv['map_size'][1]} it gave when probed")
            per_level.append(torch.nn.functional.pad(z, (0, vw - z.shape[-1], 0, vh - z.shape[-2])))
        logits = torch.stack(per_level, dim=1).flatten(0, 1)
        params = np.array([[level_geometry(size, lv["scale"], lv["flip"]).pack() for lv in self.schema.levels]]
                          * len(x), dtype=np.float32)
        return logits, {}, params

    def for_training(self, use_views: bool) -> CacheForm:
        if use_views:
            raise KDCacheError("--use-views replays stored random views, and this cache's views are pyramid levels "
                               "(--store-scales/--store-flips), which every crop reads by itself: drop --use-views")
        return self

    def crop_targets(self, pipe, cached: dict, g: Geometry) -> dict:
        if "views/logits/values" in cached:
            return level_targets(cached, g, pipe.strides, self.schema.levels, pipe.resample,
                                 self.schema.num_classes)
        return warp_targets(cached, g, pipe.strides, pipe.resample, self.schema.num_classes)

    def describe(self) -> str:
        views = self.schema.views
        return f"{views['count']} per image, crop {views['crop']}, scale {views['scale']}"
