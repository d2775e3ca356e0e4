"""``kl``: pixel-wise KL divergence to the cached top-k teacher, through the fused kernel.

Hinton et al., "Distilling the knowledge in a neural network" (2015); for segmentation as in
Liu et al., "Structured knowledge distillation for semantic segmentation" (CVPR 2019) and CIRKD
(``losses/kd.py``): T² × the mean over pixels of KL(p_t ‖ p_s), on logits at the teacher map's
resolution. The teacher is the cache's top k plus its tail bin (the ``bin`` policy of docs/design.md's loss contract).
Default T = 1 for segmentation as in CIRKD (the SegFormer seed used T = 4: pass ``temperature=4``; on
the built-in demo pair T = 4 cost 3 mIoU points against T = 1, benchmarks/results/kd-methods-cpu.md,
and T was chosen 1 of {1, 2, 4} on val in benchmarks/results/cached-vs-online-segmentation-cpu-run2.md);
T = 4 for classification, chosen of {1, 2, 4} on val in
benchmarks/results/cached-vs-online-classification-cpu.md (top-1 78.35 at T = 4 against 71.90 at
T = 1, where the CE baseline's val is 71.72).
The weight (L = CE + w · KL) is chosen of {0.25, 0.5, 1, 2} on val for each task
(benchmarks/results/kd-weight-pool-cpu.md, kd-weight-classification-cpu.md): 0.5 for segmentation,
the best val gain over CE averaged over labelled-only students and students with an unlabelled pool,
though in neither setting does any weight reach the CE baseline's val mIoU (prefer ``dist`` there);
2 for classification (val top-1 80.05 against 78.35 at w = 1 and CE's 70.85; the largest weight
tried). ``default_weight`` stays the authors' 1: what a method built directly, outside
``train-student``, takes.
``mask=teacher_correct`` (and ``min_confidence``) leave out the cells where the teacher is wrong, and
``class_weights=baseline,baseline=RUN`` weighs each class by the teacher's IoU against a baseline
student's (:mod:`kdcache.methods.teacher_aware`).
"""

from __future__ import annotations

import torch

from kdcache.kernels import topk_kl
from kdcache.methods.base import METHODS, KDMethod, student_logits_at
from kdcache.methods.teacher_aware import BOUNDS as TEACHER_AWARE_BOUNDS
from kdcache.methods.teacher_aware import TeacherAware, weighted_mean


@METHODS.register("kl")
class PixelKL(KDMethod):
    task_defaults = {"segmentation": {"weight": 0.5},  # chosen on val: see the module docstring
                     "classification": {"temperature": 4.0, "weight": 2.0}}
    default_weight = 1.0
    bounds = {**TEACHER_AWARE_BOUNDS, "temperature": "> 0"}

    def __init__(self, weight: float | None = None, temperature: float = 1.0, tail: str = "bin",
                 mask: str = "none", min_confidence: float = 0.0,
                 class_weights: str = "none", baseline: str | None = None, teacher_iou: str = "train",
                 margin: float = 0.1, rectify: str = "none"):
        super().__init__(weight)
        self.aware = TeacherAware(mask, min_confidence, class_weights, baseline, teacher_iou, margin, rectify)
        if tail not in ("bin", "renormalize"):
            raise ValueError(f"tail must be bin or renormalize, got {tail}")
        self.temperature = float(temperature)
        self.tail = tail

    def required(self, schema=None) -> list[str]:
        return ["logits"]

    def forward(self, out, batch) -> torch.Tensor:
        batch = self.aware.targets(batch)
        values = batch["kd/values"]
        # the logits in their own dtype (fp16 under autocast): the kernel widens them as it loads them
        s = student_logits_at(out.logits, tuple(values.shape[-2:]), keep_dtype=True)
        ignore = self.aware.ignore(batch)
        cells = self.aware.cell_weights(batch)
        if cells is None:  # the weight folded into the kernel: no launch of its own
            return topk_kl(s, values, batch["kd/indices"], batch.get("kd/tail"), temperature=self.temperature,
                           ignore_mask=ignore, tail=self.tail, check_inputs=False, weight=self.weight)
        loss = topk_kl(s, values, batch["kd/indices"], batch.get("kd/tail"), temperature=self.temperature,
                       ignore_mask=ignore, tail=self.tail, check_inputs=False, reduction="none")
        return self.weight * weighted_mean(loss, cells * ~ignore)  # each cell's term times its class's weight

    def setup(self, student_channels, schema) -> None:
        super().setup(student_channels, schema)
        self.aware.setup(schema)

    def prepare(self, sources) -> None:
        self.aware.prepare(sources, self.name)

    def extra_repr(self) -> str:
        return f"weight={self.weight}, temperature={self.temperature}, tail={self.tail}, {self.aware.describe()}"
