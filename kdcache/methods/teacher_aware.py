"""Teacher-aware distillation: leave out, correct or weigh down where the teacher is known to be wrong.

A logit method (``kl``, ``dist``, ``cwd``: a :class:`~kdcache.methods.logit_base.LogitMethod`)
takes ``mask=teacher_correct``: on a labelled cell, the KD term is kept only where the teacher's
top-1 class equals the label, so the student is not pulled towards the teacher's mistakes
(benchmarks/results/weak-teacher-cpu.md compares plain and teacher-aware KD from a teacher that is
wrong on one class). It follows the "data selection" half of "Improve Knowledge Distillation via
Label Revision and Data Selection" (IEEE TCDS; arXiv 2404.03693), which lets the teacher supervise
only the samples selected for it, to limit the harm of its wrong predictions; here the selection is
per cell and the rule is the teacher being right. A cell without a label (the label's ignore value
255, or an unlabelled image) keeps the KD term, unless ``min_confidence`` > 0: then it is dropped
where the teacher's top-1 probability (at T = 1, from the top-k and its tail) is below that
threshold.

``rectify=swap`` corrects the teacher instead of leaving it out: on a labelled cell where its top-1
is not the label, the teacher's logits of its top-1 class and of the label swap places, so the label
becomes the top-1 with the teacher's confidence and the rest of its distribution (its dark
knowledge) is kept. This is Knowledge Adjustment (Wen et al., "Preparing Lessons: Improve Knowledge
Distillation with Better Supervision", Neurocomputing 2021; arXiv 1911.07471), the "probability
shift" of a wrong sample. It is exact on a top-k + tail cache: where the label is among the k, two
ids swap slots; where it is in the tail, the top slot's id becomes the label and the old top-1 class
takes the label's place in the tail with the label's logit, so the tail's classes hold the same
logits as before and its log-sum-exp is unchanged. Only the ids change.

The labels are taken at the KD targets' grid by the pixel at each cell's centre (the crop's label
map is at the input resolution, the targets at the teacher map's stride).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from kdcache.methods.base import MethodError

#: the label value of a pixel without a label: ``SegPipeline``'s ignore value, and a classification
#: data set's (where 255 is a class like any other)
IGNORE_LABEL = 255
NO_CLASS_LABEL = -100
MASKS = ("none", "teacher_correct")
RECTIFY = ("none", "swap")


#: the bounds of the teacher-aware options (``LogitMethod``'s: kl, dist, cwd)
BOUNDS = {"min_confidence": "[0, 1)", "margin": "> 0"}


def check_mask(mask: str, rectify: str = "none") -> None:
    """One line (``ValueError``, which ``build_method`` turns into the method's error) for a bad option
    (the numbers' bounds, :data:`BOUNDS`, are checked by ``build_method`` first)."""
    if mask not in MASKS:
        raise ValueError(f"mask must be one of {', '.join(MASKS)}, got {mask!r}")
    if rectify not in RECTIFY:
        raise ValueError(f"rectify must be one of {', '.join(RECTIFY)}, got {rectify!r}")
    if rectify != "none" and mask != "none":
        raise ValueError(f"mask={mask} leaves out the cells rectify={rectify} corrects; give one of the two")


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


def has_label(labels: torch.Tensor, num_classes: int | None, classification: bool) -> torch.Tensor:
    """Which cells of ``labels`` hold a class: in 0..C-1 (C where known) and not the data's no-label
    value (255 for segmentation, -100 for classification, whose class 255 is a class)."""
    no_label = NO_CLASS_LABEL if classification else IGNORE_LABEL
    held = (labels >= 0) & (labels != no_label)
    return held if num_classes is None else held & (labels < num_classes)


def teacher_aware_ignore(batch: dict, mask: str, min_confidence: float, num_classes: int | None = None,
                         classification: bool = False) -> torch.Tensor:
    """``kd/ignore`` [N, h, w] with the cells ``mask`` and ``min_confidence`` leave out also set."""
    ignore = batch["kd/ignore"]
    if mask == "none" and min_confidence <= 0:
        return ignore
    cls, prob = teacher_top1(batch)
    labels = cell_labels(batch["label"].to(cls.device), tuple(cls.shape[-2:]))
    labelled = has_label(labels, num_classes, classification)
    drop = torch.zeros_like(ignore)
    if mask == "teacher_correct":
        drop |= labelled & (cls != labels)
    if min_confidence > 0:
        drop |= ~labelled & (prob < min_confidence)
    return ignore | drop


def rectified_indices(batch: dict, num_classes: int | None = None, classification: bool = False) -> torch.Tensor:
    """``kd/indices`` with Knowledge Adjustment applied (``rectify=swap``): on every labelled cell
    whose teacher top-1 is not its label, the top-1 class and the label swap logits. Where the label
    is among the top k, their ids swap slots; where it is in the tail, the top slot's id becomes the
    label (the old top-1 class joins the tail with the label's logit: the tail's log-sum-exp stays
    the same). The values and the tail are unchanged; the ids keep their dtype."""
    ids = batch["kd/indices"]
    held = ids.long()
    pos = batch["kd/values"].float().max(1, keepdim=True)[1]  # the top slot, as teacher_top1 takes it
    cls = torch.gather(held, 1, pos)[:, 0]
    labels = cell_labels(batch["label"].to(cls.device), tuple(cls.shape[-2:]))
    wrong = (has_label(labels, num_classes, classification) & (cls != labels))[:, None]  # [N, 1, h, w]
    # No early return when nothing is wrong: ``wrong.any()`` would sync the host with the device
    # every step, and the two selects below leave every id as it is where no cell is wrong.
    top = torch.zeros_like(held, dtype=torch.bool).scatter_(1, pos, True)
    out = torch.where(wrong & (held == labels[:, None]), cls[:, None], held)  # the label's slot: the old top-1
    out = torch.where(wrong & top, labels[:, None], out)  # the top slot: the label
    return out.to(ids.dtype)


# -- per-class KD weights from evidence: the teacher's per-class IoU against a baseline student's ---

CLASS_WEIGHTS = ("none", "baseline")
TEACHER_IOU = ("train", "val")


def class_weights_rule(teacher_iou, baseline_iou, margin: float) -> np.ndarray:
    """w_c = clip(1 + (IoU_t,c − IoU_s,c) / margin, 0, 1): full weight where the teacher is at least
    as good as the baseline student on class c, none where it is ``margin`` (IoU, 0–1) or more
    worse, linear between; a class either side has no score for (NaN) keeps weight 1. A graded form
    of dropping the classes on which distillation makes the student worse (Zhu et al., "Teach Less,
    Learn More: On the Undistillable Classes in Knowledge Distillation", NeurIPS 2022)."""
    t = np.asarray(teacher_iou, dtype=np.float64)
    s = np.asarray(baseline_iou, dtype=np.float64)
    w = np.clip(1.0 + (t - s) / margin, 0.0, 1.0)
    return np.where(np.isfinite(w), w, 1.0)


def run_class_iou(run: str | Path, what: str) -> tuple[dict, list[float]]:
    """A run folder's config and the per-class val IoU of its best epoch (``val_iou`` of the last
    record marked best in ``metrics.jsonl``)."""
    path = Path(run)
    if not (path / "config.json").exists():
        raise MethodError(f"{what} {run} is not a run folder (no config.json); give the run folder of a finished "
                          "training run")
    config = json.loads((path / "config.json").read_text())
    best = None
    if (path / "metrics.jsonl").exists():
        for line in (path / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if rec.get("best") and rec.get("val_iou") is not None:
                best = rec
    if best is None:
        raise MethodError(f"{what} {run} has no validation record with per-class IoU in metrics.jsonl; give a run "
                          "that finished at least one validated epoch")
    return config, [float("nan") if v is None else float(v) for v in best["val_iou"]]


def cache_class_iou(store, rows) -> np.ndarray:
    """The teacher's per-class IoU over ``rows`` of ``store``'s training images, from its quality
    arrays (the stored combination's row; NaN for a class absent from labels and predictions)."""
    counts = np.asarray(store.array("quality/counts")[:])[np.asarray(rows)].sum(0).astype(np.float64)[-1]
    inter, pred, label = counts
    union = pred + label - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, np.nan)


class TeacherAware:
    """The teacher-aware options of a logit method: which cells it leaves out (``mask``,
    ``min_confidence``), whether it corrects the teacher's wrong cells (``rectify``), and the per-class
    weights (``class_weights=baseline`` with ``baseline=RUN``, ``teacher_iou`` ``train`` or ``val``,
    ``margin``). A bad option raises ``ValueError`` (one line)."""

    def __init__(self, mask: str = "none", min_confidence: float = 0.0, class_weights: str = "none",
                 baseline: str | None = None, teacher_iou: str = "train", margin: float = 0.1,
                 rectify: str = "none"):
        check_mask(mask, rectify)
        self.rectify = rectify
        if class_weights not in CLASS_WEIGHTS:
            raise ValueError(f"class_weights must be one of {', '.join(CLASS_WEIGHTS)}, got {class_weights!r}")
        if teacher_iou not in TEACHER_IOU:
            raise ValueError(f"teacher_iou must be one of {', '.join(TEACHER_IOU)}, got {teacher_iou!r}")
        if class_weights == "baseline" and not baseline:
            raise ValueError("class_weights=baseline needs baseline=RUN (a CE student run on the same data)")
        self.mask, self.min_confidence = mask, float(min_confidence)
        self.class_weights, self.baseline = class_weights, baseline
        self.teacher_iou, self.margin = teacher_iou, float(margin)
        self.weights: torch.Tensor | None = None  # [C] once prepared
        self.evidence: dict = {}
        self.num_classes: int | None = None  # the data's, once set up
        self.classification = False

    def setup(self, schema) -> None:
        """The classes and the task of the data (what a cell without a label holds)."""
        self.num_classes = int(schema.num_classes)
        self.classification = bool(schema.classification)

    def prepare(self, sources: list, method: str) -> None:
        """The per-class weights from the baseline run and the teacher's IoU (``sources``: the
        (store, rows) pairs of the training caches, the labelled one first)."""
        if self.class_weights == "none":
            return
        if not sources:
            raise MethodError(f"{method}:class_weights=baseline reads the teacher from its cache; give --cache")
        store, rows = sources[0]
        schema = store.schema
        config, student = run_class_iou(self.baseline, f"{method}: baseline")
        if config.get("dataset") != schema.dataset.get("name") or list(config.get("class_names") or []) != list(
                schema.class_names):
            raise MethodError(f"{method}: baseline {self.baseline} was trained on {config.get('dataset')} with classes "
                              f"{', '.join(config.get('class_names') or [])}, but the cache holds "
                              f"{schema.dataset.get('name')} with {', '.join(schema.class_names)}; give a baseline "
                              "run of the same data set and class list")
        if self.teacher_iou == "train":
            if not schema.quality_rows:
                raise MethodError(f"{method}:class_weights=baseline with teacher_iou=train reads the teacher's "
                                  f"per-class IoU from the cache's quality arrays, which {store.path} lacks (built "
                                  "before kdcache recorded them); rebuild it with build-teacher-cache --overwrite, "
                                  "or give teacher_iou=val")
            teacher = cache_class_iou(store, rows)
        else:
            recorded = (schema.meta.get("teacher") or {}).get("weights") or ""
            run = Path(recorded).parent if Path(recorded).is_file() else Path(recorded)
            if not (run / "metrics.jsonl").exists():
                raise MethodError(f"{method}: teacher_iou=val reads the teacher run's val IoU, but the cache's teacher "
                                  f"{recorded} is not in a run folder with metrics.jsonl; give teacher_iou=train")
            teacher = np.asarray(run_class_iou(run, f"{method}: the teacher run")[1])
        w = class_weights_rule(teacher, student, self.margin)
        self.weights = torch.as_tensor(w, dtype=torch.float32)
        self.evidence = {"teacher_iou": [float(x) for x in teacher], "baseline_iou": student,
                         "weights": [float(x) for x in w]}

    def targets(self, batch: dict) -> dict:
        """``batch`` with the teacher's ids rectified (``rectify=swap``), or as it is."""
        if self.rectify == "none":
            return batch
        return {**batch, "kd/indices": rectified_indices(batch, self.num_classes, self.classification)}

    def ignore(self, batch: dict) -> torch.Tensor:
        return teacher_aware_ignore(batch, self.mask, self.min_confidence, self.num_classes, self.classification)

    def cell_weights(self, batch: dict) -> torch.Tensor | None:
        """Each KD cell's weight [N, h, w]: its class's (the label where it has one, else the
        teacher's top-1); None without class weights."""
        if self.weights is None:
            return None
        cls, _ = teacher_top1(batch)
        labels = cell_labels(batch["label"].to(cls.device), tuple(cls.shape[-2:]))
        cls = torch.where(has_label(labels, len(self.weights), self.classification), labels, cls)
        return self.weights.to(cls.device)[cls]

    def describe(self) -> str:
        return (f"mask={self.mask}, min_confidence={self.min_confidence}, rectify={self.rectify}, "
                f"class_weights={self.class_weights}"
                + (f", baseline={self.baseline}, teacher_iou={self.teacher_iou}, margin={self.margin}"
                   if self.class_weights != "none" else ""))


def weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ w·x / Σ w (a weight-0 cell counts as ignored); 0 with a zero gradient when every weight is 0."""
    total = weights.sum()
    return (values * weights).sum() / total.clamp_min(1e-12) if bool(total > 0) else values.sum() * 0.0
