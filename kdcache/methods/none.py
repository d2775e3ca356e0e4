"""``none``: the no-KD baseline (cross-entropy only; the trainer always adds L_seg)."""

from __future__ import annotations

import torch

from kdcache.methods.base import METHODS, KDMethod


@METHODS.register("none")
class NoKD(KDMethod):
    """No distillation term: training is the supervised baseline, read from the same cache
    pipeline so that it sees exactly the same data and geometry as the KD runs."""

    default_weight = 0.0

    def __init__(self):
        super().__init__(0.0)

    def forward(self, out, batch) -> torch.Tensor:
        return out.logits.new_zeros((), dtype=torch.float32)
