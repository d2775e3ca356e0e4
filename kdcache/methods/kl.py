"""``kl``: pixel-wise KL divergence to the cached top-k teacher, through the fused kernel.

Hinton et al., "Distilling the knowledge in a neural network" (2015); for segmentation as in
Liu et al., "Structured knowledge distillation for semantic segmentation" (CVPR 2019) and CIRKD
(``losses/kd.py``): T² × the mean over pixels of KL(p_t ‖ p_s), on logits at the teacher map's
resolution. The teacher is the cache's top k plus its tail bin (the ``bin`` policy of docs/design.md's
loss contract; ``tail=renormalize`` renormalises the top k instead).

Defaults: T = 1 for segmentation, as in CIRKD, and T = 4 for classification, each chosen of
{1, 2, 4} on val (benchmarks/results/cached-vs-online-segmentation-cpu-run2.md,
cached-vs-online-classification-cpu.md); a larger T for segmentation is ``temperature=4``. The
weight (L = CE + w · KL) is chosen of {0.25, 0.5, 1, 2} on val for each task: 0.5 for
segmentation and 2 for classification (:attr:`PixelKL.task_defaults`; the runs are in
benchmarks/results/kd-weight-pool-cpu.md and kd-weight-classification-cpu.md, which also compare
``kl`` with ``dist``). ``default_weight`` stays the authors' 1: what a method built directly,
outside ``train-student``, takes.

A classifier trained with ``--mix mixup`` takes T = 1 and weight 1 instead: function matching
(Beyer et al., CVPR 2022: the teacher and the student see the same mixed images).
By the rule fixed in benchmarks/full_budget.py (b954994) for reading the library's defaults
off the full-budget grids (the setting of the best val averaged over ``shapes`` and ``digits``, on
the form trained at every setting, the schedule of mixed-up crops), T = 1 w = 1 averaged 89.08
val top-1 against 88.83 at T = 4 w = 4 and 88.40 at T = 4 w = 2. Without mixing, T = 1 w = 1 is
worse on both (shapes 73.20 against 76.80 from the schedule; full-budget-shapes-cpu.md and
full-budget-digits-cpu.md), so plain students keep T = 4 and weight 2. ``--mix cutmix`` keeps them
too (not measured for classification).

The teacher-aware options (``mask=teacher_correct``, ``min_confidence``, ``rectify=swap``,
``class_weights=baseline,baseline=RUN``) come from :class:`~kdcache.methods.logit_base.LogitMethod`;
with class weights the kernel returns each cell's term and the cells are weighed here.
"""

from __future__ import annotations

import torch

from kdcache.kernels import topk_kl
from kdcache.methods.base import METHODS, student_logits_at
from kdcache.methods.logit_base import LogitMethod
from kdcache.methods.teacher_aware import weighted_mean


@METHODS.register("kl")
class PixelKL(LogitMethod):
    task_defaults = {"segmentation": {"weight": 0.5},  # chosen on val: see the module docstring
                     "classification": {"temperature": 4.0, "weight": 2.0},
                     "classification mixup": {"temperature": 1.0, "weight": 1.0}}  # function matching
    default_weight = 1.0
    standing = {"segmentation": "below CE on val at these defaults at a full budget, in both pairs "
                                "(benchmarks/results/full-budget-segmentation-cpu.md): prefer dist"}

    def __init__(self, tail: str = "bin", **options):
        super().__init__(**options)
        if tail not in ("bin", "renormalize"):
            raise ValueError(f"tail must be bin or renormalize, got {tail}")
        self.tail = tail

    def loss(self, out, batch) -> torch.Tensor:
        values = batch["kd/values"]
        # the logits in their own dtype (fp16 under autocast): the kernel widens them as it loads them
        s = student_logits_at(out.logits, tuple(values.shape[-2:]), keep_dtype=True)
        ignore = self.ignored(batch)
        cells = self.cell_weights(batch)
        if cells is None:  # the weight folded into the kernel: no launch of its own
            return topk_kl(s, values, batch["kd/indices"], batch.get("kd/tail"), temperature=self.temperature,
                           ignore_mask=ignore, tail=self.tail, check_inputs=False, weight=self.weight)
        loss = topk_kl(s, values, batch["kd/indices"], batch.get("kd/tail"), temperature=self.temperature,
                       ignore_mask=ignore, tail=self.tail, check_inputs=False, reduction="none")
        return self.weight * weighted_mean(loss, cells * ~ignore)  # each cell's term times its class's weight
