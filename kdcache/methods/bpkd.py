"""``bpkd``: Boundary Privileged Knowledge Distillation (Liu et al., "BPKD: Boundary Privileged
Knowledge Distillation for Semantic Segmentation", WACV 2024; arXiv 2306.08075): the teacher's
knowledge of the class edges and of the class bodies distilled apart, each its own way.

With Z the student's or the teacher's logits [C, h, w] at the cache's resolution, per image:

* **edge mask** M [C, h, w]: each class c's edge band E_c = dilation(Y_c) − erosion(Y_c) of its mask
  Y_c in the label map, both with a ``width`` × ``width`` square (the pixels within width // 2 of a
  boundary between c and another class, on either side), taken to the cache's grid by average pooling
  (the paper's AvgPool2D: M_c,i is the share of cell i's pixels in c's band). A pixel without a class
  (the label 255, the crop's padding) counts as neither c nor another class, so the image's border,
  its padding and unlabelled areas make no edge, and no edge lies on such a pixel: E_c(p) = 1 where p
  has a class and the square around p holds a pixel of c and a pixel of another class (with every
  pixel labelled, exactly dilation − erosion);
* **edge loss**, a pixel-wise KL on the edge logits Z_E = Z ⊙ M (both sides masked before the
  softmax over the classes): φ_i = T² KL(softmax(Z^t_E,i / T) ‖ softmax(Z^s_E,i / T)) per cell i, and
  L_E = Σ_c (1 / n_c) Σ_i M_c,i φ_i, n_c the number of cells where M_c,i > 0 (a class with no edge
  adds nothing), averaged over the images;
* **body loss**, channel-wise distillation (``cwd``'s form) of the body logits Z_B = Z ⊙ (1 − M): for
  each class channel a softmax over the image's cells, L_B = T² / C Σ_c KL(softmax(Z^t_B,c / T) ‖
  softmax(Z^s_B,c / T)), averaged over the images;
* L = w (λ_B L_B + λ_E L_E), w the method's ``weight``, λ_B ``body_weight``, λ_E ``edge_weight``.

The edges come from the labels (``boundary=labels``: ``label``, the crop's label map at the input's
resolution) or from the teacher (``boundary=teacher``: its top-1 class per cell of the cached
targets, the crop's padding without a class, taken to the label map's resolution by nearest
resampling, so ``width`` counts input pixels either way); unlabelled images give edges only with
the teacher's. From a cache the teacher's logits are its top k and, for every other class, an equal
share of the tail's mass, τ − log(C − k) (exact for a dense cache); a live teacher
(``--online-teacher``) fills the same targets.

The defaults, T = 4, λ_B = 20, λ_E = 50 and a band 7 pixels wide, are the paper's settings as a
reimplementation reads them (its ``alpha`` = 2 on the edge term is taken here as 1: the paper's
α_c per-class factor; multiply ``edge_weight`` to match), since the authors released no training
code; none was chosen on val here. The loss is reconstructed from the paper's description
(Figure 2: pre-mask filtering, softmax over the classes, KL, summed over the classes, repeated per
class, post-mask filtering, divided by the mask's cells), checked here against an independent
computation of the formula above.

Teacher-aware options come from :class:`~kdcache.methods.logit_base.LogitMethod`: the cells
``mask``/``min_confidence`` leave out (and the crop's padding) take no part in either term (no edge
there, out of the body's softmax); ``rectify=swap`` corrects the teacher's logits and, with
``boundary=teacher``, its edges; ``class_weights=baseline`` weighs each cell's φ_i by its class's
weight (weighted n_c) and each body channel by its class's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdcache.methods.base import METHODS, MethodError
from kdcache.methods.logit_base import LogitMethod, student_and_dense_teacher
from kdcache.methods.teacher_aware import teacher_top1

BOUNDARIES = ("labels", "teacher")


@torch.no_grad()
def class_edges(labels: torch.Tensor, num_classes: int, width: int, size: tuple[int, int]) -> torch.Tensor:
    """The edge mask M [N, C, *size] (float32, in [0, 1]) of a label map ``labels`` [N, H, W]: each
    class's band of ``width`` (odd) pixels around its boundaries with the other classes, averaged
    over each cell of a ``size`` grid. A label outside 0..C-1 (255, -1) is no class."""
    labels = labels.long()
    valid = (labels >= 0) & (labels < num_classes)
    onehot = F.one_hot(torch.where(valid, labels, 0), num_classes).permute(0, 3, 1, 2).float()
    onehot *= valid[:, None]
    other = valid[:, None].float() - onehot  # labelled with another class
    r = width // 2
    near_c = F.max_pool2d(onehot, width, stride=1, padding=r)  # the padding is -inf: the border adds nothing
    near_other = F.max_pool2d(other, width, stride=1, padding=r)
    band = near_c * near_other * valid[:, None]
    return F.adaptive_avg_pool2d(band, size)


@METHODS.register("bpkd")
class BPKD(LogitMethod):
    default_weight = 1.0
    standing = {"segmentation": "below CE on val at the paper's settings at a full budget, in both pairs "
                                "(benchmarks/results/full-budget-segmentation-cpu.md)"}
    default_temperature = 4.0
    bounds = {"width": ">= 3", "edge_weight": ">= 0", "body_weight": ">= 0"}

    def __init__(self, width: int = 7, boundary: str = "labels", edge_weight: float = 50.0,
                 body_weight: float = 20.0, **options):
        super().__init__(**options)
        if boundary not in BOUNDARIES:
            raise ValueError(f"boundary must be one of {', '.join(BOUNDARIES)}, got {boundary!r}")
        if width != int(width) or int(width) % 2 == 0:  # >= 3: its bounds
            raise ValueError(f"width must be an odd number of pixels (3, 5, 7, ...), got {width:g}")
        if edge_weight + body_weight == 0:  # each >= 0: its bounds
            raise ValueError("edge_weight and body_weight must not both be 0")
        self.width, self.boundary = int(width), boundary
        self.edge_weight, self.body_weight = float(edge_weight), float(body_weight)

    def setup(self, student_channels, schema) -> None:
        super().setup(student_channels, schema)
        if schema.classification:
            raise MethodError("method 'bpkd' distils class edges and bodies of segmentation maps; a classification "
                              "cache has one cell per image: use kl or dist")

    def edge_mask(self, batch: dict, num_classes: int, size: tuple[int, int]) -> torch.Tensor:
        """M [N, C, *size]: the edges of the labels, or of the teacher's top-1 map (``boundary``)."""
        labels = batch["label"]
        if self.boundary == "teacher":
            top1 = teacher_top1(batch)[0].masked_fill(batch["kd/ignore"].to(labels.device), -1)
            labels = F.interpolate(top1[:, None].float(), size=tuple(labels.shape[-2:]), mode="nearest")[:, 0]
        return class_edges(labels, num_classes, self.width, size)

    def loss(self, out, batch) -> torch.Tensor:
        s, t = student_and_dense_teacher(out, batch)
        C, T = s.shape[1], self.temperature
        ignore = self.ignored(batch)
        cells = self.cell_weights(batch)
        used = (~ignore).float() if cells is None else cells * ~ignore  # each cell's weight; 0: left out
        edge = self.edge_mask(batch, C, tuple(s.shape[-2:])).to(s.device) * (used > 0)[:, None]

        # edge: the pixel-wise KL of the masked logits, each class's band averaged over its cells
        log_ps, log_pt = F.log_softmax(s * edge / T, 1), F.log_softmax(t * edge / T, 1)
        phi = (T * T) * (log_pt.exp() * (log_pt - log_ps)).sum(1)  # [N, h, w]
        counted = ((edge > 0) * used[:, None]).sum((2, 3))  # n_c per image [N, C]
        per_class = (edge * (phi * used)[:, None]).sum((2, 3)) / counted.clamp_min(1e-12)
        edge_loss = per_class.sum(1).mean()

        # body: channel-wise KL over the used cells of the logits outside the edges
        body = 1.0 - edge
        drop = ignore[:, None].expand_as(s)
        log_ps = F.log_softmax((s * body / T).masked_fill(drop, float("-inf")).flatten(2), -1)
        log_pt = F.log_softmax((t * body / T).masked_fill(drop, float("-inf")).flatten(2), -1)
        kl = torch.where(torch.isfinite(log_pt), log_pt.exp() * (log_pt - log_ps), torch.zeros_like(log_pt)).sum(-1)
        w = self.class_weight_values()
        if w is None:
            body_loss = (T * T) * kl.mean()
        else:
            w = w.to(kl.device)[None].expand_as(kl)  # class c's weight on channel c's term
            body_loss = (T * T) * (kl * w).sum() / w.sum().clamp_min(1e-12)
        return self.weight * (self.body_weight * body_loss + self.edge_weight * edge_loss)
