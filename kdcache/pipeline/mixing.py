"""Cutmix and mixup of training crops, drawn per item so that a cache can replay them.

Function matching (Beyer et al., "Knowledge distillation: a good teacher is patient and
consistent", CVPR 2022) distils on aggressively mixed inputs that the teacher and the student both
see. A batch-level mix (torchvision's and timm's, which pair the images of one batch) depends on how
the batches fall, which a cache built before training cannot know. Here each training item is
mixed on its own: item ``i`` of epoch ``e`` of a run with seed ``s`` takes a partner ``j ≠ i``, the
partner's crop (a fresh draw of the run's own augmentation on image ``j``), a ratio λ ~ Beta(α, α)
and, for cutmix, a box — all from one random stream of ``(s, e, i)`` that is independent of the
item's own crop. A run's crops are therefore the same with and without ``--mix``, and a schedule
cache (``build-teacher-cache --schedule-epochs E --mix KIND``) runs the teacher on exactly the mixed
crops a student with the same options draws (:func:`mix_partner`, :func:`mix_images` on both
sides).

- cutmix (Yun et al., ICCV 2019): the box (area 1 − λ of the crop, centre uniform, clipped to
  the crop; λ then recomputed from the clipped box) takes the partner's pixels. A segmentation
  label takes the partner's labels inside the box; a class label is the pair weighted by λ.
- mixup (Zhang et al., ICLR 2018): λ·x_i + (1 − λ)·x_j. Labels of both images, weighted by λ
  (:func:`mixed_cross_entropy`); methods that read labels (boundaries, teacher-aware masks) see the
  first image's.

This is not the labelled/unlabelled mixing of a batch (``--unlabeled-cache``,
:mod:`kdcache.train.student_batches`): that chooses which images a batch holds; this blends two
images into one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kdcache.core.errors import KDCacheError
from kdcache.core.options import opt
from kdcache.pipeline.geometry import Geometry

#: the kinds of ``--mix``
MIX_KINDS = ("none", "cutmix", "mixup")
#: the random stream of an item's mix, apart from its crop's (seed, epoch, index)
_STREAM = 7_366_248


@dataclass(frozen=True)
class MixOptions:
    """``--mix KIND --mix-alpha A --mix-prob P``: each training item is mixed with probability P,
    with λ ~ Beta(A, A)."""

    kind: str = "none"
    alpha: float = 1.0
    prob: float = 1.0

    @property
    def enabled(self) -> bool:
        return self.kind != "none" and self.prob > 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> MixOptions:
        d = d or {}
        return cls(kind=str(d.get("kind", "none")), alpha=float(d.get("alpha", 1.0)), prob=float(d.get("prob", 1.0)))

    @classmethod
    def of(cls, config) -> MixOptions:
        """The mixing a training or build configuration asks for (its ``mix``, ``mix_alpha`` and
        ``mix_prob`` fields), checked: an unknown kind is one line naming the kinds."""
        kind = getattr(config, "mix", "none") or "none"
        if kind not in MIX_KINDS:
            raise KDCacheError(f"--mix must be one of {', '.join(MIX_KINDS)}, got {kind!r}")
        return cls(kind=kind, alpha=float(getattr(config, "mix_alpha", 1.0)), prob=float(getattr(config, "mix_prob", 1.0)))

    def describe(self) -> str:
        return f"{self.kind} (alpha {self.alpha:g}, p {self.prob:g})" if self.enabled else "none"


# -- the options: declared once, for train-teacher/train-student and a schedule's build

def mix_option():
    return opt("none", "Mix each training crop with another image's: none, cutmix (a box of the other crop) or "
                       "mixup (a blend); the teacher of a schedule cache built with the same --mix sees the same "
                       "mixed crop (function matching).", names=("--mix",), panel="Augmentation")


def mix_alpha_option():
    return opt(1.0, "--mix: the ratio lambda ~ Beta(alpha, alpha) (1: uniform).", bounds="> 0", panel="Augmentation")


def mix_prob_option():
    return opt(1.0, "--mix: the share of training items that are mixed.", bounds="[0, 1]", panel="Augmentation")


@dataclass(frozen=True)
class Mix:
    """One item's mix: its ``partner`` (an index of the same data set), the partner's crop
    ``geometry``, λ (the first image's share) and, for cutmix, the ``box`` (top, bottom, left,
    right) of the crop that takes the partner's pixels."""

    kind: str
    partner: int
    geometry: Geometry
    lam: float
    box: tuple[int, int, int, int] | None = None


def draw_partner(options: MixOptions, seed: int, epoch: int, index: int, n: int
                 ) -> tuple[np.random.Generator, int] | None:
    """Whether item ``index`` (of ``n``) of ``epoch`` in a run with ``seed`` is mixed, and with
    whom: (the stream that draws the rest of its mix, the partner), or None."""
    if not options.enabled or n < 2:
        return None
    rng = np.random.default_rng((seed, epoch, index, _STREAM))
    if rng.random() >= options.prob:
        return None
    partner = int(rng.integers(0, n - 1))
    return rng, partner + (partner >= index)


def draw_mix(rng: np.random.Generator, options: MixOptions, partner: int, partner_size: tuple[int, int],
             crop: tuple[int, int], sample: Callable[[np.random.Generator, tuple[int, int]], Geometry]) -> Mix:
    """The rest of a mix from ``rng`` (after :func:`draw_partner`): the partner's crop (``sample``,
    the run's own augmentation draw, on an image of ``partner_size``), λ and cutmix's box in the
    ``crop`` (H, W)."""
    g = sample(rng, partner_size)  # onto the run's --crop-size, as every training crop
    lam = float(rng.beta(options.alpha, options.alpha))
    if options.kind == "mixup":
        return Mix("mixup", partner, g, lam)
    H, W = crop
    cut = float(np.sqrt(1.0 - lam))
    ch, cw = int(H * cut), int(W * cut)
    cy, cx = int(rng.integers(0, H)), int(rng.integers(0, W))
    top, bottom = int(np.clip(cy - ch // 2, 0, H)), int(np.clip(cy + ch // 2, 0, H))
    left, right = int(np.clip(cx - cw // 2, 0, W)), int(np.clip(cx + cw // 2, 0, W))
    lam = 1.0 - (bottom - top) * (right - left) / (H * W)
    return Mix("cutmix", partner, g, lam, (top, bottom, left, right))


def mix_images(a: torch.Tensor, b: torch.Tensor, mix: Mix) -> torch.Tensor:
    """The mixed crop of ``a`` and the partner's crop ``b`` ([C, H, W], one size): the one
    computation a student's pipeline and a schedule's build both run."""
    if mix.box is not None:
        top, bottom, left, right = mix.box
        out = a.clone()
        out[..., top:bottom, left:right] = b[..., top:bottom, left:right]
        return out
    return a * mix.lam + b * (1.0 - mix.lam)


def mix_partner(options: MixOptions, seed: int, epoch: int, index: int, n: int,
                load: Callable[[int], torch.Tensor], crop: tuple[int, int],
                sample: Callable[[np.random.Generator, tuple[int, int]], Geometry],
                cut: Callable[[torch.Tensor, Geometry], torch.Tensor]) -> tuple[Mix, torch.Tensor] | None:
    """Item ``index``'s mix and its partner's crop, or None: the partner image ``load(j)`` (as
    preprocessed), cut by ``cut(image, geometry)`` to the ``crop`` its own augmentation ``sample``
    draws."""
    drawn = draw_partner(options, seed, epoch, index, n)
    if drawn is None:
        return None
    rng, j = drawn
    image = load(j)
    mix = draw_mix(rng, options, j, tuple(image.shape[-2:]), crop, sample)
    return mix, cut(image, mix.geometry)


def mixed_padding(own: torch.Tensor, partner: torch.Tensor, mix: Mix, crop: tuple[int, int]) -> torch.Tensor:
    """The padding of a mixed crop on a map of its own size ([h, w] bool, from each image's own
    padding mask on that map): cutmix takes the partner's inside the box (the cells whose centres
    fall in it); a blend is padding only where both images are."""
    if mix.box is None:
        return own & partner
    h, w = own.shape[-2:]
    top, bottom, left, right = mix.box
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) * crop[0] / h
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) * crop[1] / w
    inside = ((ys >= top) & (ys < bottom))[:, None] & ((xs >= left) & (xs < right))[None, :]
    return torch.where(inside.to(own.device), partner, own)


def mixed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, partner_labels: torch.Tensor,
                        lam: torch.Tensor, weight: torch.Tensor | None = None, ignore_index: int = 255) -> torch.Tensor:
    """λ-weighted cross-entropy against two label maps ([N, H, W] each, ``lam`` [N]): the sum of
    λ·ce(labels) + (1 − λ)·ce(partner_labels) over the batch's pixels, over the sum of the same
    weights of the counted pixels (with class ``weight``, each pixel's class weight), so that with
    λ = 1 it is :func:`torch.nn.functional.cross_entropy`'s mean."""
    logits = logits.float()
    lam = lam.float().view(-1, *([1] * (labels.dim() - 1)))
    num, den = logits.new_zeros(()), logits.new_zeros(())
    for y, share in ((labels, lam), (partner_labels, 1.0 - lam)):
        ce = F.cross_entropy(logits, y, weight=weight, ignore_index=ignore_index, reduction="none")
        valid = y != ignore_index
        w = weight[y.clamp(0, logits.shape[1] - 1)] * valid if weight is not None else valid.float()
        num = num + (share * ce).sum()
        den = den + (share * w).sum()
    return num / den.clamp_min(1e-12)
