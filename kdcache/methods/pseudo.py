"""``pseudo``: teacher pseudo-labels (self-training; as the SafeTrip seed generates them).

Where the teacher's top-1 probability (T = 1, exact from the cache: softmax over the top-k
logits and the tail) is at least ``confidence_threshold``, its argmax is a hard label; elsewhere
(and in the crop's padding) the position is ignored. The loss is the cross-entropy of the
student at the cache's resolution against those labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdcache.data.base import IGNORE_INDEX
from kdcache.methods.base import METHODS, KDMethod, student_logits_at


def pseudo_labels(values, indices, tail, ignore, threshold: float) -> torch.Tensor:
    v = values.float()
    lse = torch.logsumexp(v, dim=1)
    if tail is not None:
        lse = torch.logaddexp(lse, tail.float())
    conf = (v[:, 0] - lse).exp()
    labels = indices[:, 0].long()
    return labels.masked_fill((conf < threshold) | ignore, IGNORE_INDEX)


@METHODS.register("pseudo")
class PseudoLabels(KDMethod):
    default_weight = 1.0

    def __init__(self, weight: float | None = None, confidence_threshold: float = 0.7):
        super().__init__(weight)
        if not 0.0 <= confidence_threshold <= 1.0:
            raise ValueError(f"confidence_threshold must be in [0, 1], got {confidence_threshold}")
        self.threshold = float(confidence_threshold)

    def required(self) -> list[str]:
        return ["logits"]

    def forward(self, out, batch) -> torch.Tensor:
        values = batch["kd/values"]
        labels = pseudo_labels(values, batch["kd/indices"], batch.get("kd/tail"), batch["kd/ignore"], self.threshold)
        s = student_logits_at(out.logits, tuple(values.shape[-2:]))
        # a sum over the kept positions / their count: 0 (not NaN) when none is confident enough
        ce = F.cross_entropy(s, labels, ignore_index=IGNORE_INDEX, reduction="sum")
        return self.weight * ce / (labels != IGNORE_INDEX).sum().clamp_min(1)
