"""``sp``: similarity-preserving distillation (Tung & Mori, ICCV 2019).

G = F Fᵀ over the batch (F: each sample's feature map flattened), rows L2-normalised; the
loss is ‖G_s − G_t‖²_F / b². Teacher features come from the cache (``--features``); cells in
the crop's padding are zeroed on both sides.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdcache.methods.base import METHODS, FeatureMethod, teacher_feature, valid_mask


def similarity(f: torch.Tensor) -> torch.Tensor:
    flat = f.flatten(1)
    return F.normalize(flat @ flat.t(), dim=1)


@METHODS.register("sp")
class SimilarityPreserving(FeatureMethod):
    default_weight = 100.0  # RepDistiller uses 3000 (the segmentation guide's method table lists both)

    def setup(self, student_channels, schema) -> None:
        self.check_features(schema)

    def forward(self, out, batch) -> torch.Tensor:
        t, ignore = teacher_feature(batch, self.teacher_tap, self.name)
        s = out.features[self.student_tap].float()
        t = t * valid_mask(ignore, t.shape[-2:])[:, None]
        s = s * valid_mask(ignore, s.shape[-2:])[:, None]
        b = s.shape[0]
        return self.weight * (similarity(s) - similarity(t)).pow(2).sum() / (b * b)
