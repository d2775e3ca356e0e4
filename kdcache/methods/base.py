"""The shape every distillation method has."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdcache.errors import KDCacheError
from kdcache.models import ModelOutput


class MethodError(KDCacheError):
    """A method asked for something the cache or the student does not have."""


class KDMethod(nn.Module):
    """Base class. ``weight`` multiplies the method's loss in L_total = L_seg + Σ w_m · L_m."""

    name = "base"
    default_weight = 1.0

    def __init__(self, weight: float | None = None):
        super().__init__()
        self.weight = self.default_weight if weight is None else float(weight)

    def student_taps(self) -> list[str]:
        """Student modules whose outputs this method reads."""
        return []

    def required(self) -> list[str]:
        """Cached teacher arrays this method reads: ``logits``, ``features/<tap>``, ``attention/<tap>``."""
        return []

    def setup(self, student_channels: dict[str, int], store_meta: dict) -> None:
        """Called once with the student taps' channel counts and the store's attributes, before
        training (e.g. to build an adapter)."""

    def forward(self, out: ModelOutput, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"weight={self.weight}"


class FeatureMethod(KDMethod):
    """A method that compares one student module's output with one cached teacher tap."""

    def __init__(self, weight: float | None = None, student_tap: str | None = None,
                 teacher_tap: str | None = None):
        super().__init__(weight)
        if not student_tap or not teacher_tap:
            raise ValueError(f"{self.name} needs student_tap=<student module> and teacher_tap=<cached teacher tap>")
        self.student_tap, self.teacher_tap = student_tap, teacher_tap

    def student_taps(self) -> list[str]:
        return [self.student_tap]

    def required(self) -> list[str]:
        return [f"features/{self.teacher_tap}"]

    def check_features(self, store_meta: dict) -> dict:
        """The cache's description of the teacher tap's features; a clear error if it has none."""
        feats = store_meta.get("features", {})
        if self.teacher_tap not in feats:
            raise MethodError(f"method '{self.name}' needs the teacher's '{self.teacher_tap}' features in the "
                              f"cache; build it with --features {self.teacher_tap}")
        return feats[self.teacher_tap]


def student_logits_at(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Student logits brought to the cache's resolution (bilinear), fp32."""
    logits = logits.float()
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return logits


def pool_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Average-pool (or, if smaller, bilinearly resize) a [N, C, h, w] map to ``size``."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def teacher_feature(batch: dict, tap: str, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached teacher feature ``tap`` [N, c, h, w] and its ignore mask [N, h, w]."""
    key = f"kd/features/{tap}"
    if key not in batch:
        raise MethodError(f"method '{method}' needs the teacher's '{tap}' features in the cache; build it "
                          f"with --features {tap}")
    return batch[key].float(), batch[f"{key}/ignore"]
