"""``at``: attention transfer (Zagoruyko & Komodakis, "Paying more attention to attention", ICLR 2017).

Q = Σ_c F_c² per position, flattened per sample and L2-normalised; the loss is
mean((Q_s − Q_t)²) (RepDistiller's form), the larger map average-pooled to the smaller. The
teacher side comes from the cache: its attention maps (``--attention``) or its features
(``--features``). Cells in the crop's padding are zeroed on both sides before normalising, so
a crop is compared on what both networks saw.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdcache.methods.base import METHODS, FeatureMethod, MethodError, pool_to, valid_mask


@METHODS.register("at")
class AttentionTransfer(FeatureMethod):
    default_weight = 100.0  # RepDistiller uses 1000 (the segmentation guide's method table lists both)

    def __init__(self, weight: float | None = None, student_tap: str | None = None, teacher_tap: str | None = None):
        super().__init__(weight, student_tap, teacher_tap)
        self.source = None

    def _source(self, schema) -> str:
        """The cache's attention maps of the tap (one channel: cheap to read), or else its features."""
        if self.teacher_tap in schema.attention:
            return "attention"
        if self.teacher_tap in schema.features:
            return "features"
        raise MethodError(f"method 'at' needs the teacher's '{self.teacher_tap}' attention maps or features "
                          f"in the cache; build it with --features {self.teacher_tap} --attention")

    def setup(self, student_channels, schema) -> None:
        self.source = self._source(schema)

    def required(self, schema=None) -> list[str]:
        source = self._source(schema) if schema is not None else self.source or "attention"
        return [f"{source}/{self.teacher_tap}"]

    def forward(self, out, batch) -> torch.Tensor:
        key = f"kd/{self.source}/{self.teacher_tap}"
        t, ignore = batch[key].float(), batch[f"{key}/ignore"]
        q_t = t if self.source == "attention" else t.pow(2).sum(1)
        q_s = out.features[self.student_tap].float().pow(2).sum(1)
        size = min(q_t.shape[-2:], q_s.shape[-2:], key=lambda s: s[0] * s[1])
        q_t = pool_to(q_t[:, None], size)[:, 0] * valid_mask(ignore, size)
        q_s = pool_to(q_s[:, None], size)[:, 0] * valid_mask(ignore, size)
        q_t = F.normalize(q_t.flatten(1), dim=1)
        q_s = F.normalize(q_s.flatten(1), dim=1)
        return self.weight * (q_s - q_t).pow(2).mean()
