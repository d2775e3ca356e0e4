"""``fitnet``: hint learning (Romero et al., "FitNets", ICLR 2015).

A 1×1 convolution maps the student's feature to the teacher's channel count; the loss is the
MSE to the cached teacher feature (or 1 − cosine per position with ``loss=cosine``) over the
cells both saw, the student's map bilinearly resized to the teacher's. The adapter trains with
the student and is not part of the exported student (checkpoints keep it only to resume).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdcache.methods.base import METHODS, FeatureMethod, teacher_feature


@METHODS.register("fitnet")
class FitNet(FeatureMethod):
    default_weight = 1.0

    def __init__(self, weight: float | None = None, student_tap: str | None = None, teacher_tap: str | None = None,
                 loss: str = "mse"):
        super().__init__(weight, student_tap, teacher_tap)
        if loss not in ("mse", "cosine"):
            raise ValueError(f"fitnet loss must be mse or cosine, got {loss}")
        self.loss = loss
        self.adapter: nn.Module | None = None

    def setup(self, student_channels, schema) -> None:
        channels = self.check_features(schema)["channels"]
        self.adapter = nn.Conv2d(student_channels[self.student_tap], channels, 1)

    def forward(self, out, batch) -> torch.Tensor:
        t, ignore = teacher_feature(batch, self.teacher_tap, self.name)
        s = self.adapter(out.features[self.student_tap].float())
        if tuple(s.shape[-2:]) != tuple(t.shape[-2:]):
            s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
        valid = (~ignore).float()
        if self.loss == "mse":
            per = (s - t).pow(2).mean(1)
        else:
            per = 1.0 - F.cosine_similarity(s, t, dim=1)
        return self.weight * (per * valid).sum() / valid.sum().clamp_min(1.0)
