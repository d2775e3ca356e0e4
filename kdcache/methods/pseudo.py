"""``pseudo``: teacher pseudo-labels (self-training on the teacher's confident hard labels).

Where the teacher's top-1 probability (T = 1, exact from the cache: softmax over the top-k
logits and the tail) is at least ``confidence_threshold``, its argmax is a hard label; elsewhere
(and in the crop's padding) the position is ignored. The loss is the cross-entropy of the
student at the cache's resolution against those labels.

One global threshold starves rare and hard classes, whose pixels the teacher is seldom sure of.
``class_balanced=p`` adds class-balanced thresholds as in CBST (Zou et al., "Unsupervised Domain
Adaptation for Semantic Segmentation via Class-Balanced Self-Training", ECCV 2018): before
training, the confidences of the pixels the teacher gives each class are collected over every
training image of the caches (labelled and unlabelled), and class c's threshold t_c is the
confidence above which its most confident fraction p of pixels lie. A pixel labelled c is kept
when its confidence is at least min(t_c, ``confidence_threshold``): frequent, confident classes
stay at the global threshold, and every class keeps at least its best p of pixels.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from kdcache.core.topk import BINS, add_to_histogram, teacher_confidence, thresholds_from_histogram
from kdcache.data.base import IGNORE_INDEX
from kdcache.methods.base import METHODS, KDMethod, MethodError, student_logits_at


def pseudo_labels(values, indices, tail, ignore, threshold, class_thresholds: torch.Tensor | None = None
                  ) -> torch.Tensor:
    conf, labels = teacher_confidence(values, indices, tail)
    thr = threshold if class_thresholds is None else class_thresholds.clamp(max=threshold)[labels]
    return labels.masked_fill((conf < thr) | ignore, IGNORE_INDEX)


def class_balanced_thresholds(maps, num_classes: int, keep: float) -> np.ndarray:
    """:func:`thresholds_from_histogram` over the positions of (values, indices, tail) maps."""
    hist = np.zeros((num_classes, BINS), dtype=np.int64)
    for values, indices, tail in maps:
        conf, labels = teacher_confidence(values[None], indices[None], None if tail is None else tail[None])
        add_to_histogram(hist, conf, labels)
    return thresholds_from_histogram(hist, keep)


@METHODS.register("pseudo")
class PseudoLabels(KDMethod):
    default_weight = 1.0
    bounds = {"confidence_threshold": "[0, 1)", "class_balanced": "(0, 1]"}  # at 1 no pixel is labelled

    def __init__(self, weight: float | None = None, confidence_threshold: float = 0.7,
                 class_balanced: float | None = None):
        super().__init__(weight)  # the thresholds' bounds: ``bounds`` (checked by build_method)
        self.threshold = float(confidence_threshold)
        self.class_balanced = class_balanced
        self.register_buffer("class_thresholds", torch.empty(0), persistent=True)

    def required(self, schema=None) -> list[str]:
        return ["logits"]

    def prepare(self, sources) -> None:
        """With ``class_balanced``: the per-class thresholds from every training image's cached
        maps (``sources``: (store, rows) pairs)."""
        if self.class_balanced is None:
            return
        if not sources:
            raise MethodError("pseudo:class_balanced sets its thresholds from the teacher cache; give --cache "
                              "(an online teacher alone has none)")
        maps, C = [], None
        for store, rows in sources:
            C = store.num_classes
            for r in rows:
                item = store.read(int(r), groups={"logits"})
                tail = item.get("logits/tail")
                maps.append((torch.from_numpy(np.asarray(item["logits/values"])),
                             torch.from_numpy(np.asarray(item["logits/indices"])),
                             None if tail is None else torch.from_numpy(np.asarray(tail))))
        self.class_thresholds = torch.as_tensor(class_balanced_thresholds(maps, C, self.class_balanced),
                                                dtype=torch.float32)

    def forward(self, out, batch) -> torch.Tensor:
        values = batch["kd/values"]
        thresholds = self.class_thresholds.to(values.device) if self.class_balanced is not None else None
        labels = pseudo_labels(values, batch["kd/indices"], batch.get("kd/tail"), batch["kd/ignore"],
                               self.threshold, thresholds)
        s = student_logits_at(out.logits, tuple(values.shape[-2:]))
        # a sum over the kept positions / their count: 0 (not NaN) when none is confident enough
        ce = F.cross_entropy(s, labels, ignore_index=IGNORE_INDEX, reduction="sum")
        return self.weight * ce / (labels != IGNORE_INDEX).sum().clamp_min(1)

    def extra_repr(self) -> str:
        return f"weight={self.weight}, confidence_threshold={self.threshold}, class_balanced={self.class_balanced}"
