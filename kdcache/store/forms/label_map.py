"""The label-map form of a classification cache (ReLabel, Yun et al., CVPR 2021)."""

from __future__ import annotations

import torch

from kdcache.core.errors import KDCacheError
from kdcache.pipeline.geometry import Geometry
from kdcache.pipeline.warp import pool_targets, warp_targets
from kdcache.store.forms.base import FORMS, CacheForm

#: the cached arrays of the logits group, as a read sample names them
LOGIT_KEYS = ("logits/values", "logits/indices", "logits/tail")


@FORMS.register("label_map")
class LabelMap(CacheForm):
    """``build-teacher-cache --label-map``: the classifier's class map before global pooling, stored
    as the logits arrays; each random crop pools the cells under its box in logit space
    (:func:`~kdcache.pipeline.warp.pool_targets`)."""

    targets_name = "label_map"
    options = "--label-map"
    class_map = True

    @classmethod
    def asked(cls, config) -> bool:
        return bool(config.label_map)

    @classmethod
    def holds(cls, schema) -> bool:
        return schema.label_map

    @classmethod
    def check_options(cls, config) -> None:
        if config.label_map and config.views:
            raise KDCacheError("--label-map and --views are two forms of a classification cache; give one of them")

    def quality_rows(self, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # a class map's quality: the classifier's (pooled) prediction
        return {name: r.mean((2, 3), keepdim=True) for name, r in rows.items()}

    def crop_targets(self, pipe, cached: dict, g: Geometry) -> dict:
        logits = {key: cached.pop(key) for key in LOGIT_KEYS if key in cached}
        out = pool_targets(logits, g, self.schema.num_classes) if logits else {}
        return {**out, **warp_targets(cached, g, pipe.strides, pipe.resample, self.schema.num_classes)}
