"""Segmentation metrics: a confusion matrix with mIoU / mAcc / aAcc as in mmsegmentation.

The matrix is indexed ``[ground truth, prediction]``. Intersections and unions are summed over
the whole data set before dividing (mmsegmentation's ``IoUMetric``):

* ``IoU_c = I_c / U_c`` with ``I_c`` the correctly labelled pixels of class ``c`` and
  ``U_c = GT_c + Pred_c - I_c``; ``Acc_c = I_c / GT_c``; ``aAcc = sum(I) / sum(GT)``.
* ``mIoU`` and ``mAcc`` are means that skip NaN. A class neither in the ground truth nor
  predicted has IoU NaN (left out of mIoU); a class predicted but absent from the ground truth
  has IoU 0 (counted in mIoU) and Acc NaN (left out of mAcc).
* Pixels whose target equals ``ignore_index`` are dropped.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["ConfusionMatrix", "TopK", "per_image_iou", "predicted_class"]


def predicted_class(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """The class of the largest logit along ``dim`` (the first one on a tie, as ``argmax``).

    ``max(dim).indices`` rather than ``argmax(dim)``: on the CPU, torch's ``argmax`` over a class
    axis that is not the last (``[N, C, H, W]`` maps) is slower for the same indices, and every
    validation epoch, ``evaluate``, ``compare`` and a cache build's quality counts take one per
    image."""
    return logits.max(dim).indices


def _as_int_tensor(x: Any, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name} must be an integer tensor of class ids, got dtype {t.dtype}")
    return t


def _format_values(values: torch.Tensor, limit: int = 10) -> str:
    uniq = torch.unique(values).cpu().tolist()
    shown = ", ".join(str(v) for v in uniq[:limit])
    more = f", ... ({len(uniq)} distinct)" if len(uniq) > limit else ""
    return f"[{shown}{more}]"


class ConfusionMatrix:
    """Accumulates a ``[C, C]`` int64 confusion matrix (rows: ground truth, columns: prediction).

    The matrix lives on the device of the first tensors passed to :meth:`update` (CPU before).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self._matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    @property
    def matrix(self) -> torch.Tensor:
        """The accumulated ``[C, C]`` int64 matrix, ``matrix[gt, pred]`` = pixel count."""
        return self._matrix

    def reset(self) -> None:
        """Zero the matrix (it stays on its current device)."""
        self._matrix.zero_()

    def update(self, pred: Any, target: Any) -> None:
        """Add one batch: integer class-id tensors (or arrays) of equal shape, any device.

        Pixels whose target is ``ignore_index`` are dropped. Raises ``ValueError`` on a shape
        mismatch, on predictions outside ``[0, C)`` at non-ignored pixels, or on target values
        outside ``[0, C)`` other than ``ignore_index``; ``TypeError`` on non-integer input.
        """
        pred = _as_int_tensor(pred, "pred")
        target = _as_int_tensor(target, "target")
        if pred.shape != target.shape:
            raise ValueError(
                f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}"
            )
        if pred.device != target.device:
            pred = pred.to(target.device)
        c = self.num_classes
        target = target.reshape(-1).long()
        pred = pred.reshape(-1).long()

        keep = target != self.ignore_index
        target = target[keep]
        pred = pred[keep]
        bad_t = (target < 0) | (target >= c)
        if bool(bad_t.any()):
            raise ValueError(
                f"target has values outside [0, {c}) that are not ignore_index "
                f"({self.ignore_index}): {_format_values(target[bad_t])}"
            )
        bad_p = (pred < 0) | (pred >= c)
        if bool(bad_p.any()):
            raise ValueError(
                f"pred has values outside [0, {c}) at labelled pixels: "
                f"{_format_values(pred[bad_p])}"
            )

        counts = torch.bincount(target * c + pred, minlength=c * c).reshape(c, c)
        if self._matrix.device != counts.device:
            self._matrix = self._matrix.to(counts.device)
        self._matrix += counts

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another matrix with the same ``num_classes`` and ``ignore_index``; return self."""
        if not isinstance(other, ConfusionMatrix):
            raise TypeError(f"cannot merge {type(other).__name__} into ConfusionMatrix")
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(
                "cannot merge confusion matrices with different settings: "
                f"num_classes {self.num_classes} vs {other.num_classes}, "
                f"ignore_index {self.ignore_index} vs {other.ignore_index}"
            )
        self._matrix += other._matrix.to(self._matrix.device)
        return self

    def __iadd__(self, other: ConfusionMatrix) -> ConfusionMatrix:
        return self.merge(other)

    def all_reduce(self) -> None:
        """Sum the matrix across ranks if ``torch.distributed`` is initialised; else no-op."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self._matrix, op=dist.ReduceOp.SUM)

    def compute(self) -> dict[str, Any]:
        """Return the metrics as python floats (fractions in [0, 1]; NaN where undefined).

        Keys: ``miou``, ``macc``, ``aacc`` (floats); per-class lists ``iou``, ``acc``
        (floats) and ``intersection``, ``union``, ``gt_pixels``, ``pred_pixels`` (ints).
        """
        m = self._matrix.detach().cpu().numpy().astype(np.int64)
        inter = np.diag(m)
        gt = m.sum(axis=1)
        pr = m.sum(axis=0)
        union = gt + pr - inter
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
            acc = np.where(gt > 0, inter / np.maximum(gt, 1), np.nan)
        total = int(gt.sum())
        return {
            "miou": _nanmean(iou),
            "macc": _nanmean(acc),
            "aacc": float(inter.sum() / total) if total > 0 else math.nan,
            "iou": [float(v) for v in iou],
            "acc": [float(v) for v in acc],
            "intersection": [int(v) for v in inter],
            "union": [int(v) for v in union],
            "gt_pixels": [int(v) for v in gt],
            "pred_pixels": [int(v) for v in pr],
        }

    def __repr__(self) -> str:
        return (
            f"ConfusionMatrix(num_classes={self.num_classes}, ignore_index={self.ignore_index}, "
            f"pixels={int(self._matrix.sum())}, device={self._matrix.device})"
        )


def _nanmean(values: np.ndarray) -> float:
    valid = values[~np.isnan(values)]
    return float(valid.mean()) if valid.size else math.nan


def per_image_iou(pred: Any, target: Any, num_classes: int, ignore_index: int = 255) -> float:
    """mIoU of a single image under the same rules; NaN if it has no labelled pixel."""
    cm = ConfusionMatrix(num_classes, ignore_index)
    cm.update(pred, target)
    return cm.compute()["miou"]


class TopK:
    """Top-k accuracy of classifier logits ``[N, C]`` against class ids ``[N]`` (samples whose
    target is ``ignore_index`` are dropped): the share of samples whose class is among the k
    highest logits (ties broken by ``torch.topk``), for each k of ``ks`` (k above C counts all)."""

    def __init__(self, ks: tuple[int, ...] = (1, 5), ignore_index: int = -100) -> None:
        self.ks = tuple(ks)
        self.ignore_index = ignore_index
        self.hits = torch.zeros(len(self.ks), dtype=torch.int64)
        self.total = torch.zeros((), dtype=torch.int64)

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        target = target.reshape(-1)
        keep = target != self.ignore_index
        logits, target = logits[keep], target[keep]
        if not len(target):
            return
        top = logits.topk(min(max(self.ks), logits.shape[1]), dim=1).indices
        match = top == target[:, None]
        self.hits += torch.tensor([int(match[:, :k].any(1).sum()) for k in self.ks])
        self.total += len(target)

    def all_reduce(self) -> None:
        if dist.is_available() and dist.is_initialized():
            both = torch.cat([self.hits, self.total[None]])
            dist.all_reduce(both, op=dist.ReduceOp.SUM)
            self.hits, self.total = both[:-1], both[-1]

    def compute(self) -> dict[str, float]:
        """``{"top1": …, "top5": …}`` as fractions (NaN without samples)."""
        n = int(self.total)
        return {f"top{k}": (int(h) / n if n else math.nan) for k, h in zip(self.ks, self.hits)}
