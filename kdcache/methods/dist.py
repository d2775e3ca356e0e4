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

The authors' segmentation settings (Cityscapes DeepLabV3-R101 → R18, 74.21 → 77.10 mIoU) are
T = 1, β = γ = 1 and weight 1; kdcache keeps T = 1 and β = γ = 1 (T = 1 is also what val chose of {1, 2, 4} in
benchmarks/results/cached-vs-online-segmentation-cpu-run2.md). For classification T = 4, chosen of {1, 2, 4} on val in
benchmarks/results/cached-vs-online-classification-cpu.md (top-1 74.90 at T = 4 against 71.60 at
T = 1, which is below the CE baseline's val, 71.72). The weight (L = CE + w · DIST) is chosen of
{0.25, 0.5, 1, 2} on val for each task (benchmarks/results/kd-weight-pool-cpu.md,
kd-weight-classification-cpu.md): 0.25 for segmentation, the best val gain over CE averaged over
labelled-only students (+0.75 mIoU over CE at 0.25, +0.40 at 1) and students with an unlabelled pool
(where no weight reached CE with the demo's teacher; 0.25 and 0.5 are within 0.03 of each other);
2 for classification (val top-1 78.15 against 74.90 at w = 1 and CE's 70.85; the largest weight
tried). ``default_weight`` stays the authors' 1: what a method built directly, outside
``train-student``, takes. Cells in the crop's padding are left out of both terms, and
so are those ``mask=teacher_correct``/``min_confidence`` leave out; ``class_weights=baseline`` makes
both means weighted, each cell by its class's weight and each class by its own
(:mod:`~kdcache.methods.teacher_aware`).

From the cache: the teacher's k stored classes get their exact probabilities and every class
outside the top k an equal share of the tail's mass (the rebuilt logits of
:func:`~kdcache.core.topk.dense_logits`), so each row of Y_t still sums to 1. The
per-cell (inter-class) term then compares the student with a teacher whose small
probabilities are flattened; the per-class (intra-class) term sees each non-top-k class at its
cell's equal share. With a dense cache (k = C) both are exact; at T = 1 the non-top-k
classes carry little mass, which is why the top-k cache serves DIST well (see the README).
"""

from __future__ import annotations

import torch

from kdcache.methods.base import METHODS, KDMethod
from kdcache.methods.cwd import student_and_dense_teacher
from kdcache.methods.teacher_aware import BOUNDS as TEACHER_AWARE_BOUNDS
from kdcache.methods.teacher_aware import TeacherAware

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
class DIST(KDMethod):
    default_weight = 1.0
    bounds = {**TEACHER_AWARE_BOUNDS, "temperature": "> 0", "beta": ">= 0", "gamma": ">= 0"}
    task_defaults = {"segmentation": {"weight": 0.25},  # chosen on val: see the module docstring
                     "classification": {"temperature": 4.0, "weight": 2.0}}

    def __init__(self, weight: float | None = None, temperature: float = 1.0, beta: float = 1.0,
                 gamma: float = 1.0, mask: str = "none", min_confidence: float = 0.0,
                 class_weights: str = "none", baseline: str | None = None, teacher_iou: str = "train",
                 margin: float = 0.1, rectify: str = "none"):
        super().__init__(weight)
        self.aware = TeacherAware(mask, min_confidence, class_weights, baseline, teacher_iou, margin, rectify)
        if beta + gamma == 0:  # each >= 0: its bounds
            raise ValueError(f"beta and gamma must not both be 0, got beta={beta}, gamma={gamma}")
        self.temperature, self.beta, self.gamma = float(temperature), float(beta), float(gamma)

    def required(self, schema=None) -> list[str]:
        return ["logits"]

    def forward(self, out, batch) -> torch.Tensor:
        batch = self.aware.targets(batch)
        s, t = student_and_dense_teacher(out, batch)
        C = s.shape[1]
        used = ~self.aware.ignore(batch).reshape(-1)  # [N·h·w]
        cells = self.aware.cell_weights(batch)
        if cells is not None:
            used &= cells.reshape(-1) > 0  # a weight-0 cell is left out, as an ignored one
        if not used.any():
            return s.sum() * 0.0  # nothing to match: zero loss, zero gradient
        s = s.permute(0, 2, 3, 1).reshape(-1, C)[used]
        t = t.permute(0, 2, 3, 1).reshape(-1, C)[used]
        if cells is None:
            return self.weight * dist_loss(s, t, self.temperature, self.beta, self.gamma)
        return self.weight * dist_loss(s, t, self.temperature, self.beta, self.gamma, cells.reshape(-1)[used],
                                       self.aware.weights.to(s.device))

    def setup(self, student_channels, schema) -> None:
        super().setup(student_channels, schema)
        self.aware.setup(schema)

    def prepare(self, sources) -> None:
        self.aware.prepare(sources, self.name)

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, temperature={self.temperature}, beta={self.beta}, gamma={self.gamma}, "
                f"{self.aware.describe()}")
