"""``dist``: DIST, matching the relations between probabilities rather than the probabilities
(Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022; the segmentation
loss of the authors' DIST_KD).

Take the softened probabilities p = softmax(z / T) of student and teacher at every used cell of
the batch: two matrices Y [P, C] (P cells of all images, C classes). With ρ(a, b) the Pearson
correlation (the cosine of the mean-centred vectors, ε = 1e-8 added to the norms' product as
in the paper's code):

* inter-class relation, per cell: L_inter = mean_i (1 − ρ(Y_s[i, :], Y_t[i, :]));
* intra-class relation, per class over the batch's cells: L_intra = mean_c (1 − ρ(Y_s[:, c], Y_t[:, c]));
* L = T² (β · L_inter + γ · L_intra).

The authors' segmentation settings are T = 1, β = γ = 1 and weight 1; kdcache keeps T = 1 and
β = γ = 1 for segmentation, and takes T = 4 for classification, each T chosen of {1, 2, 4} on val
(benchmarks/results/cached-vs-online-segmentation-cpu-run2.md,
cached-vs-online-classification-cpu.md). The weight (L = CE + w · DIST) is chosen on val for
each task (:attr:`DIST.task_defaults`): 2 for segmentation, the best of 0.25, 1 and 2 averaged
over both pairs of the full-budget study (a patient teacher, 160 epochs, from the schedule of
cutmixed crops, the one form trained at every weight: benchmarks/results/full-budget-segmentation-cpu.md;
with the earlier 24-epoch teacher and the whole-image cache, 0.25 had done best of 0.25 to 2,
kd-weight-pool-cpu.md), and 2 for classification (kd-weight-classification-cpu.md).
A classifier trained with ``--mix mixup`` (function matching, Beyer et al., CVPR 2022) takes
T = 1 and weight 1, DIST's own settings: by the rule fixed in benchmarks/full_budget.py (b954994) for
reading the library's defaults off the full-budget grids (the best val averaged over ``shapes`` and
``digits`` on the schedule of mixed-up crops), 89.48 val top-1 against 89.13 at T = 4 w = 2
(full-budget-shapes-cpu.md, full-budget-digits-cpu.md). ``--mix cutmix`` keeps T = 4 and weight 2
(not measured for classification).
``default_weight`` stays the authors' 1: what a method built directly, outside ``train-student``,
takes. Cells in the crop's padding are left out of both terms,
and so are those ``mask=teacher_correct``/``min_confidence`` leave out; ``class_weights=baseline``
makes both means weighted, each cell by its class's weight and each class by its own (the
teacher-aware options of :class:`~kdcache.methods.logit_base.LogitMethod`).

From the cache: the teacher's k stored classes get their exact probabilities and every class
outside the top k an equal share of the tail's mass (the rebuilt logits of
:func:`~kdcache.core.topk.dense_logits`), so each row of Y_t still sums to 1. The
per-cell (inter-class) term then compares the student with a teacher whose small
probabilities are flattened; the per-class (intra-class) term sees each non-top-k class at its
cell's equal share. With a dense cache (k = C) both are exact; at T = 1 the non-top-k
classes carry little mass, so a top-k cache loses little of it (benchmarks/results/cache-fidelity-semi.md,
"DIST from the cache", measures the gap).
"""

from __future__ import annotations

import torch

from kdcache.methods.base import METHODS
from kdcache.methods.logit_base import LogitMethod, student_and_dense_teacher

EPS = 1e-8


def pearson_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each row of ``a`` [R, n] with the same row of ``b``: [R]."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + EPS)


def dist_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0, beta: float = 1.0,
              gamma: float = 1.0, row_weights: torch.Tensor | None = None,
              class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """T² (β L_inter + γ L_intra) between probability matrices of logits ``student`` and
    ``teacher``, both [P, C] (one row per cell). ``row_weights`` [P] / ``class_weights`` [C]:
    weighted means of the per-cell and the per-class terms instead of plain ones (teacher-aware
    class weights: a cell weighs what its class does)."""
    T = temperature
    ys = torch.softmax(student / T, dim=1)
    yt = torch.softmax(teacher / T, dim=1)
    rows, cols = 1 - pearson_rows(ys, yt), 1 - pearson_rows(ys.t(), yt.t())
    inter = rows.mean() if row_weights is None else (rows * row_weights).sum() / row_weights.sum()
    intra = cols.mean() if class_weights is None else (cols * class_weights).sum() / class_weights.sum().clamp_min(1e-12)
    return T * T * (beta * inter + gamma * intra)


@METHODS.register("dist")
class DIST(LogitMethod):
    default_weight = 1.0
    bounds = {"beta": ">= 0", "gamma": ">= 0"}
    task_defaults = {"segmentation": {"weight": 2.0},  # chosen on val: see the module docstring
                     "classification": {"temperature": 4.0, "weight": 2.0},
                     "classification mixup": {"temperature": 1.0, "weight": 1.0}}  # function matching

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, **options):
        super().__init__(**options)
        if beta + gamma == 0:  # each >= 0: its bounds
            raise ValueError(f"beta and gamma must not both be 0, got beta={beta}, gamma={gamma}")
        self.beta, self.gamma = float(beta), float(gamma)

    def loss(self, out, batch) -> torch.Tensor:
        s, t = student_and_dense_teacher(out, batch)
        C = s.shape[1]
        used = ~self.ignored(batch).reshape(-1)  # [N·h·w]
        cells = self.cell_weights(batch)
        if cells is not None:
            used &= cells.reshape(-1) > 0  # a weight-0 cell is left out, as an ignored one
        if not used.any():
            return s.sum() * 0.0  # nothing to match: zero loss, zero gradient
        s = s.permute(0, 2, 3, 1).reshape(-1, C)[used]
        t = t.permute(0, 2, 3, 1).reshape(-1, C)[used]
        if cells is None:
            return self.weight * dist_loss(s, t, self.temperature, self.beta, self.gamma)
        return self.weight * dist_loss(s, t, self.temperature, self.beta, self.gamma, cells.reshape(-1)[used],
                                       self.class_weight_values().to(s.device))
