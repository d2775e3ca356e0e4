"""``cwd``: channel-wise distillation (Shu et al., "Channel-wise knowledge distillation for dense
prediction", ICCV 2021; TorchDistiller's ``CriterionCWD``).

For each class channel, a softmax over the spatial positions at temperature T; the loss is
T² × KL(teacher ‖ student) summed over positions, averaged over channels and images.

The teacher's full logit maps are rebuilt from the cache: the top-k classes get their stored raw
logits and every class outside the top k gets τ − log(C − k), the log of an equal share of
the tail's mass (exact in total, not per class; a dense cache, k = C, is exact). Cells in the
crop's padding are left out of the spatial softmax, and so are those ``mask=teacher_correct`` /
``min_confidence`` leave out; with ``class_weights=baseline`` each class channel's term is weighted
by its class's weight (:mod:`~kdcache.methods.teacher_aware`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdcache.core.topk import dense_logits
from kdcache.methods.base import METHODS, KDMethod, student_logits_at
from kdcache.methods.teacher_aware import BOUNDS as TEACHER_AWARE_BOUNDS
from kdcache.methods.teacher_aware import TeacherAware


def student_and_dense_teacher(out, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's logits at the cache's resolution and the teacher's rebuilt dense logits
    (:func:`kdcache.core.topk.dense_logits`), both [N, C, h, w] fp32."""
    values = batch["kd/values"]
    C = out.logits.shape[1]
    s = student_logits_at(out.logits, tuple(values.shape[-2:]))
    return s, dense_logits(values, batch["kd/indices"], batch.get("kd/tail"), C)


@METHODS.register("cwd")
class ChannelWise(KDMethod):
    default_weight = 3.0
    bounds = {**TEACHER_AWARE_BOUNDS, "temperature": "> 0"}

    def __init__(self, weight: float | None = None, temperature: float = 4.0, mask: str = "none", min_confidence: float = 0.0,
                 class_weights: str = "none", baseline: str | None = None, teacher_iou: str = "train",
                 margin: float = 0.1, rectify: str = "none"):
        super().__init__(weight)
        self.aware = TeacherAware(mask, min_confidence, class_weights, baseline, teacher_iou, margin, rectify)
        self.temperature = float(temperature)

    def required(self, schema=None) -> list[str]:
        return ["logits"]

    def forward(self, out, batch) -> torch.Tensor:
        batch = self.aware.targets(batch)
        s, t = student_and_dense_teacher(out, batch)
        T = self.temperature
        ignore = self.aware.ignore(batch)[:, None].expand_as(s)
        s = (s / T).masked_fill(ignore, float("-inf")).flatten(2)
        t = (t / T).masked_fill(ignore, float("-inf")).flatten(2)
        log_ps, log_pt = F.log_softmax(s, -1), F.log_softmax(t, -1)
        kl = torch.where(torch.isfinite(log_pt), log_pt.exp() * (log_pt - log_ps), torch.zeros_like(log_pt)).sum(-1)
        w = self.aware.weights
        if w is None:
            return self.weight * (T * T) * kl.mean()
        w = w.to(kl.device)[None].expand_as(kl)  # class c's weight on channel c's term
        return self.weight * (T * T) * (kl * w).sum() / w.sum().clamp_min(1e-12)

    def setup(self, student_channels, schema) -> None:
        super().setup(student_channels, schema)
        self.aware.setup(schema)

    def prepare(self, sources) -> None:
        self.aware.prepare(sources, self.name)
