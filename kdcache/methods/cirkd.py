"""``cirkd``: cross-image relational distillation (Yang, Zhou, Xu, Huang, Yuan, Zhang & Li,
"Cross-Image Relational Knowledge Distillation for Semantic Segmentation", CVPR 2022; the authors'
``CriterionMiniBatchCrossImagePair`` and ``StudentSegContrast``, github.com/winycg/CIRKD).

Pixel embeddings are L2-normalised along the channels: t = Fᵗ / ‖Fᵗ‖ (the cached teacher feature) and
s = Fˢ / ‖Fˢ‖ (the student's feature, bilinearly resized to the teacher's grid). The cells V_i of image
i that the teacher saw (not the crop's padding, ``kd/features/<tap>/ignore``) take part; KL(p ‖ q) =
Σ_b p_b (log p_b − log q_b) and σ is the softmax over a row. Three terms, as the paper's:

- mini-batch pixel-to-pixel: for each ordered pair of images (i, j) of the batch the similarity
  matrices Sᵗ_ij[a, b] = ⟨t_{i,a}, t_{j,b}⟩ and Sˢ_ij[a, b] = ⟨s_{i,a}, s_{j,b}⟩ (a ∈ V_i, b ∈ V_j),

      L_batch = 1/|P| Σ_{(i,j)∈P} 1/|V_i| Σ_{a∈V_i} KL(σ(Sᵗ_ij[a, ·] / τ) ‖ σ(Sˢ_ij[a, ·] / τ)),

  P the pairs whose images both have cells (all B² of them without padding: the authors' 1/B²). The
  similarity does not depend on the channel count, so the student's own feature is used;
- memory pixel-to-pixel and pixel-to-region: the student's feature goes through a projection head
  g (1×1 conv, BatchNorm, ReLU, 1×1 conv, as the authors': C_s → C_t channels), ŝ = g(Fˢ) / ‖g(Fˢ)‖.
  Memories of teacher embeddings per class c (bounded queues, first in first out) hold pixel
  embeddings (``pixel_memory`` per class: each step, for every image and class, up to 16 of that
  class's cells drawn at random) and region embeddings (``region_memory`` per class: each step, for
  every image and class, r = normalise(mean of t over that class's cells)). Only labelled cells
  (not 255, not an unlabelled image's) write to a class's memory, at the teacher's grid the label of
  the pixel at each cell's centre; the batch is written before the terms are taken, as the
  authors'. A contrast set K is drawn from each memory (``pixel_contrast`` // C + 1 entries of each
  class, the authors' rule), and over the anchors A (every cell the teacher saw)

      L_mem = 1/|A| Σ_{a∈A} KL(σ(⟨t_a, K⟩ / τ) ‖ σ(⟨ŝ_a, K⟩ / τ)),

  L_pixel with the pixel memory, L_region with the region memory.

The loss is weight · (``batch_pixel`` · L_batch + ``memory_pixel`` · L_pixel + ``memory_region`` ·
L_region): the paper's λ = 1, 0.1, 0.1 and τ = 0.1 are the defaults (not chosen on val here); τ is
``tau``, so the command line's ``--temperature`` (a logit method's) leaves it alone. The authors'
full recipe adds logit KD at T = 1 (``--method kl`` beside it).

Where this differs from the authors' code: its memories start as random unit vectors and this one
contrasts only slots that have been written; it writes the pixel memory as a plain ring; its anchors
are every labelled pixel, here every cell the teacher saw (an unlabelled image's cells too: every
KD term sees every image; only the memories need labels); its memory KL has a second temperature,
1 in every script, left out. Its memory holds 20000 pixel and 2000 region embeddings per class for
Cityscapes' 2975 training images; the built-in road scenes have 400, so the defaults are an eighth
of those: 2500 and 250 (C × (2500 + 250) × C_t floats: 11 × 2750 × 128 for the built-in teacher's
``stage3``, 15 MB, kept in ``last.pt``). Its contrast sets, 4096 pixels and 1024 regions, take the
same eighth, 512 and 128 (at 11 classes 47 of a class's 2500 pixels and 12 of its 250 regions a
step, where the authors' draw 216 of 20000 and 54 of 2000 at 19). On the 2-core CPU machine, the
loss of a step of 8 images of 96 × 128 (12 × 16 cells, 128 teacher channels), forward and backward,
takes about 70 ms, 48 of them the batch term, against 230 ms at the authors' contrast sizes (the
built-in student's own step: 30 ms). The batch term compares every cell of a batch with every
other: B · hw × B · hw similarities, computed one image at a time.

The memories, the projection head and its BatchNorm statistics train and resume with the student
(checkpoints keep them; the exported student has none of them); the draws come from the CPU's
generator, which a run's seed and ``last.pt`` fix. Under torchrun each rank writes its own memories
from its own share of the batch (the authors gather every rank's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdcache.core.options import TEMPERATURE_BOUNDS
from kdcache.methods.base import METHODS, FeatureMethod, teacher_feature
from kdcache.methods.teacher_aware import cell_labels, has_label

#: cells of one class of one image written to the pixel memory per step (the authors' pixel_update_freq)
PIXELS_PER_UPDATE = 16


def row_kl(t_logits: torch.Tensor, s_logits: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
    """KL(σ(t) ‖ σ(s)) of each row of [..., n] logits, over the ``columns`` (bool, broadcast to them)
    kept; the others are filled with the dtype's lowest half, whose probability is exactly 0 (-inf
    would give NaN gradients)."""
    if columns is not None:
        low = torch.finfo(s_logits.dtype).min / 2
        t_logits, s_logits = t_logits.masked_fill(~columns, low), s_logits.masked_fill(~columns, low)
    log_pt, log_ps = F.log_softmax(t_logits, -1), F.log_softmax(s_logits, -1)
    return (log_pt.exp() * (log_pt - log_ps)).sum(-1)


def batch_pixel_loss(s: torch.Tensor, t: torch.Tensor, valid: torch.Tensor, tau: float) -> torch.Tensor:
    """L_batch (module docstring) of normalised embeddings ``s``, ``t`` [N, D, h, w] (D may differ)
    over the ``valid`` [N, h, w] cells; 0 (with a gradient) when no image has cells. One image i at a
    time: its cells against every cell of the batch, [|V_i|, N, hw]."""
    total = s.sum() * 0.0
    has = valid.flatten(1).any(1)  # images with cells: P is every pair of them
    if not bool(has.any()):
        return total
    s, t, keep = s[has], t[has], valid[has].flatten(1)  # keep: [n, hw]
    s_cells, t_cells = s.flatten(2).transpose(1, 2), t.flatten(2).transpose(1, 2)  # [n, hw, D]
    for i in range(s.shape[0]):
        s_i, t_i = s_cells[i][keep[i]], t_cells[i][keep[i]]  # [|V_i|, D]
        t_logits = torch.einsum("ad,nbd->anb", t_i, t_cells) / tau
        s_logits = torch.einsum("ad,nbd->anb", s_i, s_cells) / tau
        total = total + row_kl(t_logits, s_logits, keep).mean(0).sum()  # Σ_j 1/|V_i| Σ_a KL
    return total / s.shape[0] ** 2


@METHODS.register("cirkd")
class CIRKD(FeatureMethod):
    default_weight = 1.0  # the terms carry the paper's λ (batch_pixel, memory_pixel, memory_region)
    standing = {"segmentation": "with kl at its defaults beside it (the authors' recipe), below CE on val at a full "
                                "budget in both pairs (benchmarks/results/full-budget-segmentation-cpu.md)"}
    bounds = {"tau": TEMPERATURE_BOUNDS, "batch_pixel": ">= 0", "memory_pixel": ">= 0", "memory_region": ">= 0",
              "pixel_memory": ">= 1", "region_memory": ">= 1", "pixel_contrast": ">= 1", "region_contrast": ">= 1"}

    def __init__(self, weight: float | None = None, student_tap: str | None = None, teacher_tap: str | None = None,
                 tau: float = 0.1, batch_pixel: float = 1.0, memory_pixel: float = 0.1, memory_region: float = 0.1,
                 pixel_memory: int = 2500, region_memory: int = 250, pixel_contrast: int = 512,
                 region_contrast: int = 128):
        super().__init__(weight, student_tap, teacher_tap)
        whole = {"pixel_memory": pixel_memory, "region_memory": region_memory, "pixel_contrast": pixel_contrast,
                 "region_contrast": region_contrast}
        odd = {k: v for k, v in whole.items() if float(v) != int(v)}
        if odd:
            raise ValueError("cirkd pixel_memory, region_memory, pixel_contrast and region_contrast take whole "
                             "numbers, got " + ", ".join(f"{k}={v}" for k, v in odd.items()))
        self.tau = float(tau)
        self.batch_pixel, self.memory_pixel, self.memory_region = float(batch_pixel), float(memory_pixel), float(memory_region)
        self.pixel_memory, self.region_memory = int(pixel_memory), int(region_memory)
        self.pixel_contrast, self.region_contrast = int(pixel_contrast), int(region_contrast)
        self.projector: nn.Module | None = None
        self.num_classes = 0
        self.classification = False

    # -- set-up: the projection head and the memories (buffers: checkpointed, restored on --resume) ----------
    def setup(self, student_channels, schema) -> None:
        channels = self.check_features(schema)["channels"]
        self.num_classes = schema.num_classes
        self.classification = bool(schema.classification)
        self.projector = nn.Sequential(nn.Conv2d(student_channels[self.student_tap], channels, 1, bias=False),
                                       nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
                                       nn.Conv2d(channels, channels, 1, bias=False))
        C = self.num_classes
        self.register_buffer("pixel_queue", torch.zeros(C, self.pixel_memory, channels))
        self.register_buffer("pixel_ptr", torch.zeros(C, dtype=torch.long))
        self.register_buffer("pixel_filled", torch.zeros(C, dtype=torch.long))
        self.register_buffer("region_queue", torch.zeros(C, self.region_memory, channels))
        self.register_buffer("region_ptr", torch.zeros(C, dtype=torch.long))
        self.register_buffer("region_filled", torch.zeros(C, dtype=torch.long))

    # -- the memories ---------------------------------------------------------------------------------
    @staticmethod
    def _push(queue: torch.Tensor, ptr: torch.Tensor, filled: torch.Tensor, classes: torch.Tensor,
              rows: torch.Tensor) -> None:
        """Write ``rows`` [k, D] to the rings ``queue`` [C, M, D] of their ``classes`` [k], each class's
        rows in the order given, from its pointer on (first in, first out: of more than M rows of a
        class, the last M stay)."""
        C, M = queue.shape[:2]
        order = torch.sort(classes, stable=True).indices  # grouped by class, each in its given order
        classes, rows = classes[order], rows[order]
        counts = torch.bincount(classes, minlength=C)
        pos = torch.arange(len(classes), device=classes.device) - (counts.cumsum(0) - counts)[classes]
        keep = pos >= counts[classes] - M
        queue[classes[keep], (ptr[classes[keep]] + pos[keep]) % M] = rows[keep].to(queue.dtype)
        ptr.copy_((ptr + counts) % M)
        filled.copy_((filled + counts).clamp_max(M))

    @torch.no_grad()
    def update_memory(self, t: torch.Tensor, labels: torch.Tensor, labelled: torch.Tensor) -> None:
        """Write the batch's teacher embeddings ``t`` [N, D, h, w] (normalised) to the memories: for each
        image and each class among its ``labelled`` [N, h, w] cells (``labels`` [N, h, w]), image by
        image, its region embedding and up to :data:`PIXELS_PER_UPDATE` of its cells drawn at random."""
        N, D = t.shape[:2]
        C = self.num_classes
        where = labelled.flatten()
        cells = t.permute(0, 2, 3, 1).reshape(-1, D)[where]  # [m, D], image by image
        image = torch.arange(N, device=t.device).repeat_interleave(labelled[0].numel())[where]
        group = image * C + labels.flatten()[where]  # (image, class), ascending: image by image
        if self.memory_region:
            sums = torch.zeros(N * C, D, device=t.device, dtype=cells.dtype).index_add_(0, group, cells)
            counts = torch.bincount(group, minlength=N * C)
            present = torch.nonzero(counts).flatten()
            regions = F.normalize(sums[present] / counts[present, None], dim=1)
            self._push(self.region_queue, self.region_ptr, self.region_filled, present % C, regions)
        if self.memory_pixel:
            shuffled = torch.randperm(len(group)).to(t.device)  # a random order inside each (image, class)
            order = shuffled[torch.sort(group[shuffled], stable=True).indices]
            counts = torch.bincount(group, minlength=N * C)
            rank = torch.arange(len(order), device=t.device) - (counts.cumsum(0) - counts)[group[order]]
            pick = order[rank < PIXELS_PER_UPDATE]
            self._push(self.pixel_queue, self.pixel_ptr, self.pixel_filled, group[pick] % C, cells[pick])

    def contrast_set(self, queue: torch.Tensor, filled: torch.Tensor, total: int) -> torch.Tensor:
        """[K, D]: ``total`` // C + 1 entries of each class drawn at random from its written slots
        (all of them where it has fewer)."""
        per_class = total // queue.shape[0] + 1
        parts = [queue[c, torch.randperm(n)[:per_class].to(queue.device)]
                 for c, n in enumerate(filled.tolist()) if n]
        return torch.cat(parts) if parts else queue.new_zeros(0, queue.shape[2])

    def memory_loss(self, s: torch.Tensor, t: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
        """L_mem: the anchors ``s``, ``t`` [A, D] against the ``contrast`` set [K, D]; 0 when either is empty."""
        if contrast.shape[0] == 0 or s.shape[0] == 0:
            return s.sum() * 0.0
        return row_kl(t @ contrast.T / self.tau, s @ contrast.T / self.tau).mean()

    # -- the loss -------------------------------------------------------------------------------------
    def terms(self, out, batch) -> dict[str, torch.Tensor]:
        """The three terms, unweighted (``batch``, ``pixel``, ``region``); writes the batch to the memories."""
        t, ignore = teacher_feature(batch, self.teacher_tap, self.name)
        size = tuple(t.shape[-2:])
        with torch.autocast(t.device.type, enabled=False):
            t = F.normalize(t.float(), dim=1)
            valid = ~ignore
            feat = out.features[self.student_tap].float()
            out_terms = {}
            if self.batch_pixel:
                s = feat if tuple(feat.shape[-2:]) == size else F.interpolate(feat, size=size, mode="bilinear",
                                                                               align_corners=False)
                out_terms["batch"] = batch_pixel_loss(F.normalize(s, dim=1), t, valid, self.tau)
            if self.memory_pixel or self.memory_region:
                labels = cell_labels(batch["label"].to(t.device), size)
                self.update_memory(t, labels, valid & has_label(labels, self.num_classes, self.classification))
                p = self.projector(feat)
                if tuple(p.shape[-2:]) != size:
                    p = F.interpolate(p, size=size, mode="bilinear", align_corners=False)
                p = F.normalize(p, dim=1)
                s_a, t_a = p.permute(0, 2, 3, 1)[valid], t.permute(0, 2, 3, 1)[valid]  # [A, D]
                if self.memory_pixel:
                    out_terms["pixel"] = self.memory_loss(
                        s_a, t_a, self.contrast_set(self.pixel_queue, self.pixel_filled, self.pixel_contrast))
                if self.memory_region:
                    out_terms["region"] = self.memory_loss(
                        s_a, t_a, self.contrast_set(self.region_queue, self.region_filled, self.region_contrast))
        return out_terms

    def forward(self, out, batch) -> torch.Tensor:
        terms = self.terms(out, batch)
        lam = {"batch": self.batch_pixel, "pixel": self.memory_pixel, "region": self.memory_region}
        total = out.features[self.student_tap].sum() * 0.0
        for k, v in terms.items():
            total = total + lam[k] * v
        return self.weight * total

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, tau={self.tau}, batch_pixel={self.batch_pixel}, "
                f"memory_pixel={self.memory_pixel}, memory_region={self.memory_region}, "
                f"pixel_memory={self.pixel_memory}, region_memory={self.region_memory}, "
                f"pixel_contrast={self.pixel_contrast}, region_contrast={self.region_contrast}")
