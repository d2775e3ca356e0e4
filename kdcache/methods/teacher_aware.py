"""Teacher-aware distillation: leave out the cells where the teacher is known to be wrong.

A logit method (``kl``, ``dist``, ``cwd``) takes ``mask=teacher_correct``: on a labelled cell, the
KD term is kept only where the teacher's top-1 class equals the label, so the student is not
pulled towards the teacher's mistakes (the seeds' SegFormer experiment lost its gains on the
class where the teacher was weaker than the student). It follows the "data selection" half of
"Improve Knowledge Distillation via Label Revision and Data Selection" (IEEE TCDS; arXiv
2404.03693), which lets the teacher supervise only the samples selected for it, to limit the harm
of its wrong predictions; here the selection is per cell and the rule is the teacher being right.
The other half, rectifying a wrong teacher distribution with the label, is not done here (it
changes what the teacher says; the mask only stops listening). A cell without a label (the label's ignore value 255, or an
unlabelled image) keeps the KD term, unless ``min_confidence`` > 0: then it is dropped where the
teacher's top-1 probability (at T = 1, from the top-k and its tail) is below that threshold.

The labels are taken at the KD targets' grid by the pixel at each cell's centre (the crop's label
map is at the input resolution, the targets at the teacher map's stride).
"""

from __future__ import annotations

import torch

#: the label value of a pixel without a label (``SegPipeline``'s ignore value)
IGNORE_LABEL = 255
MASKS = ("none", "teacher_correct")


def check_mask(mask: str, min_confidence: float) -> None:
    """One line (``ValueError``, which ``build_method`` turns into the method's error) for a bad option."""
    if mask not in MASKS:
        raise ValueError(f"mask must be one of {', '.join(MASKS)}, got {mask!r}")
    if not 0.0 <= min_confidence < 1.0:
        raise ValueError(f"min_confidence must be in [0, 1), got {min_confidence}")


def cell_labels(label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``label`` [N, H, W] at a grid of ``size`` (h, w): the label of the pixel at each cell's
    centre, floor((i + 1/2) · H / h), as [N, h, w] int64."""
    H, W = label.shape[-2:]
    h, w = size
    rows = ((torch.arange(h, device=label.device, dtype=torch.float64) + 0.5) * H / h).floor().long().clamp_(0, H - 1)
    cols = ((torch.arange(w, device=label.device, dtype=torch.float64) + 0.5) * W / w).floor().long().clamp_(0, W - 1)
    return label[:, rows][:, :, cols].long()


def teacher_top1(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-1 class [N, h, w] and its probability at T = 1 (from the stored top k
    and the tail's log-sum-exp of the rest) in the ``kd/…`` targets of ``batch``."""
    values = batch["kd/values"].float()
    best, pos = values.max(1, keepdim=True)
    cls = torch.gather(batch["kd/indices"].long(), 1, pos)[:, 0]
    parts = [values]
    tail = batch.get("kd/tail")
    if tail is not None:
        parts.append(tail.float()[:, None])
    log_z = torch.logsumexp(torch.cat(parts, 1), 1)
    return cls, (best[:, 0] - log_z).exp()


def teacher_aware_ignore(batch: dict, mask: str, min_confidence: float) -> torch.Tensor:
    """``kd/ignore`` [N, h, w] with the cells ``mask`` and ``min_confidence`` leave out also set."""
    ignore = batch["kd/ignore"]
    if mask == "none" and min_confidence <= 0:
        return ignore
    cls, prob = teacher_top1(batch)
    labels = cell_labels(batch["label"].to(cls.device), tuple(cls.shape[-2:]))
    labelled = labels != IGNORE_LABEL
    drop = torch.zeros_like(ignore)
    if mask == "teacher_correct":
        drop |= labelled & (cls != labels)
    if min_confidence > 0:
        drop |= ~labelled & (prob < min_confidence)
    return ignore | drop
