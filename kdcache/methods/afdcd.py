"""``afdcd``: augmentation-free dense contrastive distillation (Fan, Li, Liu, Song & Yao,
"Augmentation-free Dense Contrastive Knowledge Distillation for Efficient Semantic
Segmentation", NeurIPS 2023; the authors' ``OmniContrastiveFeatureLoss``, github.com/OSVAI/Af-DCD).

The student's feature Fˢ is projected to the teacher's C channels by a 1×1 convolution A and
resized (bilinearly) to the teacher's map; each cell of it is zeroed with probability ζ
(``mask_ratio``, a fresh mask every step, drawn on the CPU's generator) and a generator G
(3×3 conv, ReLU, 3×3 conv) rebuilds the map: F̂ = G(M ⊙ A(Fˢ)). Two terms compare F̂ with the
cached teacher feature Fᵗ over the cells V the teacher saw (the crop's padding is left out):

- masked feature mimicking: L_fd = 1 / (|V| C) · Σ_{v∈V} ‖F̂_v − Fᵗ_v‖²;
- omni-contrasting: both maps are max-pooled by ``pool`` (ignored cells left out of each max),
  cut into ``window`` × ``window`` windows (the map padded with ignored cells to whole windows)
  and each cell's C channels into M = ``groups`` groups of C / M channels. Each valid anchor
  F̂_{i,k} (cell i of a window, group k) is pulled to the teacher's Fᵗ_{i,k} and pushed from the
  teacher's other groups l ≠ k at every valid cell j of its window, the similarity being the
  negative L1 distance over τ (``tau``):

      L_oc = 1/|A| Σ_{(i,k)∈A} −log  e^{−‖F̂_{i,k} − Fᵗ_{i,k}‖₁/τ}
                / (e^{−‖F̂_{i,k} − Fᵗ_{i,k}‖₁/τ} + Σ_{j valid} Σ_{l≠k} e^{−‖F̂_{i,k} − Fᵗ_{j,l}‖₁/τ})

  (A: the valid (cell, group) anchors; the same group at another cell is neither positive nor
  negative, as in the authors' code).

The loss is weight · (L_oc + ``mimic`` · L_fd). The authors sum the contrast over the M groups and
average it over cells (λ_ctr = 0.005–0.01, M = 16), and sum the squared error over channels and
cells per image (λ_fd = 2e-6 on 2048 × 64 × 128 maps, 8e-6 on 2048 × 45 × 45): as the means here,
weight ≈ λ_ctr · M = 0.08–0.16 and weight · mimic ≈ 33. The defaults, weight 0.1 and mimic 30, are
that translation, not chosen on val. τ = 0.07 as theirs (an option of its own, not ``temperature``,
so ``--temperature`` meant for ``kl`` leaves it alone). Their windows are 4 × 4 cells of a map
max-pooled by 4 (Cityscapes' 64 × 128 stride-8 map: 16 × 32 cells), with 16 groups of 128 of
2048 channels. The built-in road scenes give stride-8 maps of 12 × 16 cells (96 × 128 images),
so the defaults do not pool (``pool=1``) and keep 4 × 4 windows (12 of them, 16 cells each); the
built-in teacher's ``stage3`` has 128 channels, and ``groups=8`` keeps 16 channels per group
(8 divides 64, 256 and 2048 too). The authors' recipe adds logit KD (``--method kl`` beside it).
A and G train with the student and are not part of the exported student (checkpoints keep them
only to resume); G works at the teacher's width, so it can cost more than a tiny student.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdcache.core.options import TEMPERATURE_BOUNDS
from kdcache.methods.base import METHODS, FeatureMethod, MethodError, teacher_feature


def max_pool_valid(x: torch.Tensor, valid: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [N, C, H, W] max-pooled by ``size`` (a partial window at the edge is pooled too), the
    cells ``valid`` [N, H, W] (bool) marks False left out of every max; a pooled cell is valid when
    any of its cells is (an invalid one holds 0)."""
    if size == 1:
        return x, valid
    pooled = F.max_pool2d(x.masked_fill(~valid[:, None], float("-inf")), size, ceil_mode=True)
    keep = F.max_pool2d(valid[:, None].float(), size, ceil_mode=True)[:, 0] > 0
    return pooled.masked_fill(~keep[:, None], 0.0), keep


def to_windows(x: torch.Tensor, window: int) -> torch.Tensor:
    """[N, C, H, W] (H, W multiples of ``window``) -> [N · windows, window², C], cells row by row."""
    N, C, H, W = x.shape
    x = x.reshape(N, C, H // window, window, W // window, window).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(-1, window * window, C)


def omni_contrast(s: torch.Tensor, t: torch.Tensor, valid: torch.Tensor, groups: int, window: int,
                  tau: float) -> torch.Tensor:
    """The omni-contrasting loss (module docstring) of student map ``s`` and teacher map ``t``
    [N, C, H, W] over the ``valid`` [N, H, W] cells: the mean over valid anchors (cell, group), 0 when
    there are none."""
    N, C, H, W = t.shape
    ph, pw = -H % window, -W % window
    if ph or pw:  # whole windows: the map padded with ignored cells
        s, t = F.pad(s, (0, pw, 0, ph)), F.pad(t, (0, pw, 0, ph))
        valid = F.pad(valid, (0, pw, 0, ph), value=False)
    cells, d = window * window, C // groups
    # [B, cells · M, C / M]: sample index = cell · M + group
    s_w = to_windows(s, window).reshape(-1, cells * groups, d)
    t_w = to_windows(t, window).reshape(-1, cells * groups, d)
    v_w = to_windows(valid[:, None].float(), window)[..., 0].repeat_interleave(groups, 1) > 0
    logits = -torch.cdist(s_w, t_w, p=1) / tau
    group = torch.arange(cells * groups, device=s.device) % groups
    eye = torch.eye(cells * groups, dtype=torch.bool, device=s.device)
    candidate = (group[:, None] != group[None, :]) | eye  # the positive and the other groups' cells
    candidate = candidate[None] & v_w[:, None, :]
    logits = logits.masked_fill(~candidate, float("-inf"))
    per = torch.logsumexp(logits, -1) - torch.diagonal(logits, dim1=-2, dim2=-1)
    per = torch.where(v_w, per, torch.zeros_like(per))
    return per.sum() / v_w.sum().clamp_min(1)


@METHODS.register("afdcd")
class AfDCD(FeatureMethod):
    default_weight = 0.1  # ≈ the authors' λ_ctr · M (0.005–0.01 × 16); see the module docstring
    standing = {"segmentation": "with kl at its defaults beside it (the authors' recipe), below CE on val at a full "
                                "budget in both pairs (benchmarks/results/full-budget-segmentation-cpu.md)"}
    bounds = {"tau": TEMPERATURE_BOUNDS, "groups": ">= 2", "window": ">= 1", "pool": ">= 1",
              "mask_ratio": "[0, 1)", "mimic": ">= 0"}

    def __init__(self, weight: float | None = None, student_tap: str | None = None, teacher_tap: str | None = None,
                 tau: float = 0.07, groups: int = 8, window: int = 4, pool: int = 1,
                 mask_ratio: float = 0.75, mimic: float = 30.0):
        super().__init__(weight, student_tap, teacher_tap)
        whole = {"groups": groups, "window": window, "pool": pool}
        odd = {k: v for k, v in whole.items() if float(v) != int(v)}
        if odd:
            raise ValueError("afdcd groups, window and pool take whole numbers, got "
                             + ", ".join(f"{k}={v}" for k, v in odd.items()))
        self.tau, self.mask_ratio, self.mimic = float(tau), float(mask_ratio), float(mimic)
        self.groups, self.window, self.pool = int(groups), int(window), int(pool)
        self.align: nn.Module | None = None
        self.generator: nn.Module | None = None

    def setup(self, student_channels, schema) -> None:
        channels = self.check_features(schema)["channels"]
        if channels % self.groups:
            divisors = [g for g in range(2, channels + 1) if channels % g == 0][:6]
            raise MethodError(f"method 'afdcd': groups={self.groups} does not divide the teacher's "
                              f"'{self.teacher_tap}' features' {channels} channels; give groups= one of "
                              f"{', '.join(map(str, divisors))} …")
        self.align = nn.Conv2d(student_channels[self.student_tap], channels, 1)
        self.generator = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True),
                                       nn.Conv2d(channels, channels, 3, padding=1))

    def keep_mask(self, n: int, h: int, w: int) -> torch.Tensor:
        """[n, 1, h, w] float: 0 at the cells masked this step (each with probability ``mask_ratio``),
        drawn on the CPU's generator (a run's seed and ``last.pt`` fix it on any device)."""
        return (torch.rand(n, 1, h, w) >= self.mask_ratio).float()

    def generate(self, student: torch.Tensor, size) -> torch.Tensor:
        """F̂ = G(M ⊙ A(Fˢ)) on the teacher's grid ``size``."""
        a = self.align(student.float())
        if tuple(a.shape[-2:]) != tuple(size):
            a = F.interpolate(a, size=size, mode="bilinear", align_corners=False)
        if self.mask_ratio > 0:
            a = a * self.keep_mask(a.shape[0], *a.shape[-2:]).to(a.device)
        return self.generator(a).float()

    def forward(self, out, batch) -> torch.Tensor:
        t, ignore = teacher_feature(batch, self.teacher_tap, self.name)
        t = t.masked_fill(ignore[:, None], 0.0)  # whatever the padding holds stays out of every sum
        s = self.generate(out.features[self.student_tap], t.shape[-2:])
        valid = ~ignore
        v = valid.float()[:, None]
        mimic = ((s - t).pow(2) * v).sum() / (v.sum() * t.shape[1]).clamp_min(1.0)
        ps, keep = max_pool_valid(s, valid, self.pool)
        pt, _ = max_pool_valid(t, valid, self.pool)
        contrast = omni_contrast(ps, pt, keep, self.groups, self.window, self.tau)
        return self.weight * (contrast + self.mimic * mimic)

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, tau={self.tau}, groups={self.groups}, "
                f"window={self.window}, pool={self.pool}, mask_ratio={self.mask_ratio}, mimic={self.mimic}")

