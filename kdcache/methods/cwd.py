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

from kdcache.methods.base import METHODS
from kdcache.methods.logit_base import LogitMethod, student_and_dense_teacher


@METHODS.register("cwd")
class ChannelWise(LogitMethod):
    default_weight = 3.0
    default_temperature = 4.0

    def loss(self, out, batch) -> torch.Tensor:
        s, t = student_and_dense_teacher(out, batch)
        T = self.temperature
        ignore = self.ignored(batch)[:, None].expand_as(s)
        s = (s / T).masked_fill(ignore, float("-inf")).flatten(2)
        t = (t / T).masked_fill(ignore, float("-inf")).flatten(2)
        log_ps, log_pt = F.log_softmax(s, -1), F.log_softmax(t, -1)
        kl = torch.where(torch.isfinite(log_pt), log_pt.exp() * (log_pt - log_ps), torch.zeros_like(log_pt)).sum(-1)
        w = self.class_weight_values()
        if w is None:
            return self.weight * (T * T) * kl.mean()
        w = w.to(kl.device)[None].expand_as(kl)  # class c's weight on channel c's term
        return self.weight * (T * T) * (kl * w).sum() / w.sum().clamp_min(1e-12)
