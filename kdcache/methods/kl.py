"""``kl``: pixel-wise KL divergence to the cached top-k teacher, through the fused kernel.

Hinton et al., "Distilling the knowledge in a neural network" (2015); for segmentation as in
Liu et al., "Structured knowledge distillation for semantic segmentation" (CVPR 2019) and CIRKD
(``losses/kd.py``): T² × the mean over pixels of KL(p_t ‖ p_s), on logits at the teacher map's
resolution. The teacher is the cache's top k plus its tail bin (the ``bin`` policy of docs/design.md's loss contract).
Default T = 1 as in CIRKD (the SegFormer seed used T = 4: pass ``temperature=4``; on the
built-in demo pair T = 4 cost 3 mIoU points against T = 1, benchmarks/results/kd-methods-cpu.md).
``mask=teacher_correct`` (and ``min_confidence``) leave out the cells where the teacher is wrong
(:mod:`kdcache.methods.teacher_aware`).
"""

from __future__ import annotations

import torch

from kdcache.kernels import topk_kl
from kdcache.methods.base import METHODS, KDMethod, student_logits_at
from kdcache.methods.teacher_aware import check_mask, teacher_aware_ignore


@METHODS.register("kl")
class PixelKL(KDMethod):
    default_weight = 1.0

    def __init__(self, weight: float | None = None, temperature: float = 1.0, tail: str = "bin",
                 mask: str = "none", min_confidence: float = 0.0):
        super().__init__(weight)
        check_mask(mask, min_confidence)
        self.mask, self.min_confidence = mask, float(min_confidence)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if tail not in ("bin", "renormalize"):
            raise ValueError(f"tail must be bin or renormalize, got {tail}")
        self.temperature = float(temperature)
        self.tail = tail

    def required(self, schema=None) -> list[str]:
        return ["logits"]

    def forward(self, out, batch) -> torch.Tensor:
        values = batch["kd/values"]
        s = student_logits_at(out.logits, tuple(values.shape[-2:]))
        loss = topk_kl(s, values, batch["kd/indices"], batch.get("kd/tail"), temperature=self.temperature,
                       ignore_mask=teacher_aware_ignore(batch, self.mask, self.min_confidence), tail=self.tail,
                       check_inputs=False)
        return self.weight * loss

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, temperature={self.temperature}, tail={self.tail}, mask={self.mask}, "
                f"min_confidence={self.min_confidence}")
