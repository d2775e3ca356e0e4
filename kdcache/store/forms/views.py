"""The views form: random crops of each image with the teacher's outputs on each (FKD, Shen & Xing,
ECCV 2022)."""

from __future__ import annotations

import numpy as np
import torch

from kdcache.core.errors import KDCacheError
from kdcache.pipeline.geometry import Geometry
from kdcache.pipeline.transforms import Augment, apply_geometry, sample_geometry
from kdcache.pipeline.warp import view_targets
from kdcache.store.forms.base import FORMS, BuildContext, CacheForm


@FORMS.register("views")
class Views(CacheForm):
    """``build-teacher-cache --views N``: N crops per image (random scale and window, or
    random-resized crops for a classifier), drawn from (``--view-seed``, image), each stored with its
    packed geometry and the teacher's logits and signals on exactly that crop. A student with
    ``--use-views`` replays one of them per epoch (drawn by seed, epoch and image): its image, label
    and targets are that view's, so nothing is resampled. Without ``--use-views`` the base maps serve
    as a plain store's."""

    targets_name = "views"
    options = "--views N"

    @classmethod
    def asked(cls, config) -> bool:
        return bool(config.views)

    @classmethod
    def holds(cls, schema) -> bool:
        return bool(schema.views) and not schema.schedule and not schema.levels

    @classmethod
    def plan(cls, ctx: BuildContext) -> dict:
        config = ctx.config
        crop = config.view_crop
        if crop is None:
            if len(set(ctx.sizes)) > 1:
                raise KDCacheError("the images have different sizes: give --view-crop HxW for the stored views")
            crop = ctx.sizes[0]
        view_map, view_feats = ctx.teacher.probe(tuple(crop), ctx.device)
        return {"count": config.views, "scale": config.view_scale, "crop": crop, "seed": config.view_seed,
                "map_size": view_map, "feature_shapes": view_feats,
                "area": config.view_area if ctx.classification else None}

    @property
    def augment(self) -> Augment:
        """How the views were drawn: random-resized crops (classification) or scale and window."""
        views = self.schema.views
        if views.get("area"):
            return Augment(crop=tuple(views["crop"]), hflip=True, resized_crop=tuple(views["area"]))
        return Augment(scale=tuple(views["scale"]), crop=tuple(views["crop"]), hflip=True)

    def teacher_input(self, item: dict, image: torch.Tensor, index: int) -> None:
        views, aug = self.schema.views, self.augment
        rng = np.random.default_rng((int(views["seed"]), index))
        gs = [sample_geometry(rng, tuple(image.shape[-2:]), aug) for _ in range(int(views["count"]))]
        item["views"] = torch.stack([apply_geometry(image, g, kind="image") for g in gs])
        item["view_params"] = np.array([g.pack() for g in gs], dtype=np.float32)

    def teacher_views(self, teacher, x, items, batch):
        v = torch.cat([it["views"] for it in items]).to(x.device, non_blocking=True)
        out = teacher(v)
        return out.logits, out.features, np.stack([it["view_params"] for it in items])

    def for_training(self, use_views: bool) -> CacheForm:
        return self if use_views else FORMS.get("plain")(self.schema)

    @property
    def reads_views(self) -> bool:
        return True

    def stored_view(self, pipe, index: int, count: int) -> int:
        """The stored view sample ``index`` replays this epoch: drawn by (seed, epoch, index)."""
        return int(np.random.default_rng((pipe.seed, pipe.epoch, index, 7)).integers(count))

    def item(self, pipe, index: int, cached: dict) -> dict:
        params = cached["views/params"]
        v = self.stored_view(pipe, index, len(params))
        item = pipe.transformed(index, lambda _i, size: Geometry.unpack(size, params[v]))
        item.update(view_targets(cached, v))
        return item

    def describe(self) -> str:
        views = self.schema.views
        crops = f"random-resized, area {views['area']}" if views.get("area") else f"scale {views['scale']}"
        return f"{views['count']} per image, crop {views['crop']}, {crops}"
