"""Teachers too slow to run online, run once for the cache: ensembles and test-time augmentation.

A :class:`TeacherEnsemble` holds one or more members (checkpoints of any architectures and
strides, each with its own normalisation) and a test-time augmentation plan (scales, flips).
For a batch it runs every member on every scale (the image and its mirror in one forward),
resizes each output's logits bilinearly to one common grid (the finest member's map, or a
stride the user chose), as mmsegmentation's ``aug_test`` and DeepLab's multi-scale inference
resize each scale's output back to the image, and combines them per pixel:

* ``logit`` (the default, chosen on val): the mean of the logits (a normalised geometric mean
  of the probabilities).
* ``prob``: the mean of the probabilities at temperature T, stored as the logits
  z = T · log mean_j softmax(z_j / T) (computed in log space, so no probability underflows).
  Their softmax at T is the mean distribution exactly.

Either way the tail of a top-k cache is exact for the stored distribution at T = 1. Scales
cannot share a forward (their inputs differ in size); an image and its mirror do.

Every (member, scale, flip) output has the same weight. Features and attention maps come from
one member (``features_from``) at scale 1 (flip-averaged with flips): averaging features across
architectures means nothing. A plain teacher (one member, scale 1, no flip) is passed through
untouched: its cache holds its raw logits.

:func:`sample_quality` measures each member, each member without TTA and the combination against
the labels of a sample (the counts behind mIoU, the NLL) and their agreement with the
combination; the cache stores them, and ``inspect-cache`` reports them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from kdcache.core.errors import KDCacheError
from kdcache.core.metrics import predicted_class
from kdcache.core.options import TEMPERATURE_BOUNDS, check_number
from kdcache.models import SegModel, count_parameters
from kdcache.models.loading import Weights, open_weights
from kdcache.pipeline.transforms import SCALE_BOUNDS, Preprocess

#: combination rule -> what it is
COMBINE_RULES = {"prob": "mean of the probabilities at the temperature", "logit": "mean of the logits"}
#: chosen on the validation split, for an ensemble of three teachers and for multi-scale + flip
#: TTA, by NLL and mIoU against the mean of probabilities (benchmarks/results/teacher-ensembles-cpu.md)
DEFAULT_COMBINE = "logit"
#: quality row of the combined teacher
COMBINED = "combined"


#: an ensemble's common grid, in input pixels a cell: none finer than the input (1e-300 asked for a grid
#: past int64), none coarser than 1024 (1e300 stored every image as one cell)
GRID_STRIDE_BOUNDS = "[1, 1024]"


@dataclass(frozen=True)
class EnsemblePlan:
    """How the members' outputs are combined: the rule and its temperature, the TTA scales and
    flip, and the common grid's stride (None: the finest member's map)."""

    combine: str = DEFAULT_COMBINE
    temperature: float = 1.0
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    grid_stride: float | None = None

    def validate(self) -> None:
        if self.combine not in COMBINE_RULES:
            raise KDCacheError(f"--combine must be one of {', '.join(COMBINE_RULES)}, got {self.combine!r}")
        # the numbers are finite and positive: CacheBuildConfig's declared bounds (kdcache.core.options)
        check_number(self.temperature, "--combine-temperature", TEMPERATURE_BOUNDS)
        check_number(self.grid_stride, "--grid-stride", GRID_STRIDE_BOUNDS)
        for s in self.scales:
            check_number(s, "--tta-scales", SCALE_BOUNDS)
        if not self.scales:
            raise KDCacheError("--tta-scales needs at least one scale, e.g. 0.75,1,1.25")
        if len(set(self.scales)) != len(self.scales):
            raise KDCacheError(f"--tta-scales lists a scale twice: {','.join(f'{s:g}' for s in self.scales)}")

    @property
    def tta(self) -> bool:
        return self.flip or tuple(self.scales) != (1.0,)


@dataclass
class Member:
    """One teacher of an ensemble: its name, weights, model and normalisation."""

    name: str
    weights: Weights
    model: SegModel
    preprocess: Preprocess
    sha256: str = ""

    def describe(self) -> dict:
        return {"name": self.name, "model": self.model.name, "weights": str(self.weights.checkpoint),
                "weights_sha256": self.sha256, "model_options": self.weights.model_options,
                "params": count_parameters(self.model), "mean": list(self.preprocess.mean),
                "std": list(self.preprocess.std)}


def member_names(paths: Sequence[str | Path]) -> list[str]:
    """A short distinct name per weights path: the run folder's (or file's) name."""
    names: list[str] = []
    for p in paths:
        p = Path(p)
        base = p.parent.name if p.name in ("best.pt", "last.pt") and p.parent.name else (p.stem or p.name)
        name, n = base, 2
        while name in names:
            name, n = f"{base}-{n}", n + 1
        names.append(name)
    return names


def open_members(paths: Sequence[str], archs: Sequence[str | None], *, num_classes: int,
                 class_names: Sequence[str] | None, taps: Sequence[str], features_from: str | None,
                 device: torch.device, arch_option: str = "--teacher", task: str | None = None
                 ) -> tuple[list[Member], int]:
    """The members of ``paths`` (architectures ``archs``: one for all, or one per path), built
    on ``device``; returns them and the index of the member whose ``taps`` are tapped. Refuses
    members that disagree on the classes or on the input size they were trained at."""
    if len(archs) not in (0, 1, len(paths)):
        raise KDCacheError(f"give {arch_option} once (for every member) or once per --weights; got {len(archs)} "
                           f"for {len(paths)} weights")
    names = member_names(paths)
    if features_from is None:
        fi = 0
    elif features_from in names:
        fi = names.index(features_from)
    elif features_from.isdigit() and 1 <= int(features_from) <= len(names):
        fi = int(features_from) - 1
    else:
        raise KDCacheError(f"--features-from {features_from} names no member; the members are "
                           f"{', '.join(names)} (or 1..{len(names)})")
    opened = [open_weights(p) for p in paths]
    hashes = [w.sha256() for w in opened]
    for j, h in enumerate(hashes):
        if h in hashes[:j]:
            raise KDCacheError(f"--weights {paths[j]} is the same file as --weights {paths[hashes.index(h)]}; "
                               "give each member once")
    first = opened[0]
    for name, w in zip(names, opened if len(opened) > 1 else ()):  # one teacher: Weights.build checks it
        n = w.num_classes
        if n is not None and n != num_classes:
            raise KDCacheError(f"member {name} ({w.checkpoint}) predicts {n} classes and the data set has "
                               f"{num_classes}; every member must be trained on the same classes")
        theirs = w.config.get("class_names")
        mine = class_names or first.config.get("class_names")
        if theirs and mine and list(theirs) != list(mine):
            raise KDCacheError(f"member {name} ({w.checkpoint}) has other class names ({', '.join(theirs[:4])} …) "
                               f"than {', '.join(list(mine)[:4])} …; every member must use the same classes in "
                               "the same order")
        if w.preprocess.resize != first.preprocess.resize:
            raise KDCacheError(f"member {name} was trained at resize {w.preprocess.resize} and {names[0]} at "
                               f"{first.preprocess.resize}; ensemble members must see the same input size (each "
                               "member's own mean/std is applied)")
    members = []
    for j, (name, w) in enumerate(zip(names, opened)):
        arch = archs[j] if len(archs) == len(paths) else (archs[0] if archs else None)
        model = w.build(arch=arch, num_classes=num_classes, taps=tuple(taps) if j == fi else (), device=device,
                        arch_option=arch_option, task=task, class_names=class_names)
        members.append(Member(name, w, model, w.preprocess, hashes[j]))
    return members, fi


def from_record(members: Sequence[dict], ensemble: dict | None, preprocess: Preprocess, *, num_classes: int,
                taps: Sequence[str], device: torch.device) -> TeacherEnsemble:
    """The teacher a cache records (its ``members`` and ``ensemble`` entries), rebuilt from the
    members' weights files where the build read them, to run online."""
    paths = [m.get("weights") for m in members]
    missing = [p for p in paths if not p or not Path(p).exists()]
    if missing:
        raise KDCacheError(f"the cache's teacher weights {', '.join(map(str, missing))} are gone; the online teacher "
                           "needs every member's file where the cache build read it")
    e = ensemble or {}
    plan = EnsemblePlan(combine=e.get("combine") or DEFAULT_COMBINE, temperature=e.get("temperature") or 1.0,
                        scales=tuple(e.get("scales") or (1.0,)), flip=bool(e.get("flip")),
                        grid_stride=e.get("grid_stride"))
    names = [m.get("name") for m in members]
    chosen = e.get("features_from")
    fi = names.index(chosen) if chosen is not None and chosen in names else 0
    built, fi = open_members(paths, [m["model"] for m in members], num_classes=num_classes, class_names=None,
                             taps=taps, features_from=str(fi + 1), device=device)
    return TeacherEnsemble(built, plan, preprocess, features_index=fi)


@dataclass
class EnsembleOutput:
    """The combined logits on the grid [B, C, h, w] (float32), the features of the features
    member, and with ``rows`` the quality rows' logits on the grid (name -> [B, C, h, w])."""

    logits: torch.Tensor
    features: dict[str, torch.Tensor]
    rows: dict[str, torch.Tensor] = field(default_factory=dict)


class TeacherEnsemble:
    """``members`` combined as ``plan`` says; inputs come normalised with ``base`` (the cache's
    preprocessing) and are renormalised for each member whose mean/std differ."""

    def __init__(self, members: Sequence[Member], plan: EnsemblePlan, base: Preprocess, *, features_index: int = 0,
                 amp: bool = False, class_map: bool = False):
        """``class_map``: run classifiers for their class maps before global pooling (a
        label-map cache) instead of their logits."""
        plan.validate()
        self.members, self.plan, self.base = list(members), plan, base
        self.class_map = class_map
        self.features_index = features_index
        self.amp = amp
        self._native: dict[tuple[int, tuple[int, int]], tuple[int, int]] = {}

    # -- what it is ---------------------------------------------------------------------------
    @property
    def plain(self) -> bool:
        """One member, scale 1, no flip: the teacher's raw logits, untouched."""
        return len(self.members) == 1 and not self.plan.tta

    @property
    def features_member(self) -> Member:
        return self.members[self.features_index]

    def row_names(self) -> list[str]:
        """The quality rows: each member without TTA (where TTA is on and scale 1 is among its
        scales), each member (with its TTA; when there are several), and the combination."""
        rows = []
        if self.plan.tta and 1.0 in self.plan.scales:
            rows += [f"{m.name}, no TTA" for m in self.members]
        if len(self.members) > 1:
            rows += [m.name for m in self.members]
        return rows + [COMBINED]

    def meta(self) -> dict | None:
        """What a store records (None for a plain teacher, whose ``teacher`` entry says it all)."""
        if self.plain:
            return None
        p = self.plan
        return {"members": [m.describe() for m in self.members], "combine": p.combine,
                "temperature": p.temperature if p.combine == "prob" else None,
                "scales": list(p.scales), "flip": p.flip,
                "grid": f"stride {p.grid_stride:g}" if p.grid_stride else "the finest member's map",
                "grid_stride": p.grid_stride, "features_from": self.features_member.name}

    # -- running it -------------------------------------------------------------------------------
    def _renormalise(self, x: torch.Tensor, m: Member) -> torch.Tensor:
        pre, base = m.preprocess, self.base
        if tuple(pre.mean) == tuple(base.mean) and tuple(pre.std) == tuple(base.std):
            return x
        def col(v):
            return torch.tensor(v, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x * col(base.std) + col(base.mean) - col(pre.mean)) / col(pre.std)

    def _forward(self, m: Member, x: torch.Tensor):
        with torch.autocast(x.device.type, dtype=torch.float16, enabled=self.amp and x.device.type == "cuda"):
            return m.model.forward_class_map(x) if self.class_map else m.model(x)

    def _native_size(self, j: int, hw: tuple[int, int], device) -> tuple[int, int]:
        key = (j, hw)
        if key not in self._native:
            out = self._forward(self.members[j], torch.zeros(1, 3, *hw, device=device))
            self._native[key] = tuple(out.logits.shape[-2:])
        return self._native[key]

    def grid_size(self, hw: tuple[int, int], device, native: Sequence[tuple[int, int]] = ()) -> tuple[int, int]:
        """The common grid for an input of ``hw``: ceil(hw / stride) with a grid stride, else the
        largest member map (``native``: the members' scale-1 map sizes where known; otherwise
        each member is probed once per input size)."""
        s = self.plan.grid_stride
        if s:
            return (max(1, math.ceil(hw[0] / s)), max(1, math.ceil(hw[1] / s)))
        sizes = list(native) or [self._native_size(j, hw, device) for j in range(len(self.members))]
        return max(sizes, key=lambda s: (s[0] * s[1], s))

    @torch.inference_mode()
    def probe(self, size: tuple[int, int], device) -> tuple[tuple[int, int], dict]:
        """The grid size and the features member's feature shapes (c, h, w) for an input ``size``."""
        for m in self.members:
            m.model.eval()
        out = self(torch.zeros(1, 3, *size, device=device))
        return tuple(out.logits.shape[-2:]), {k: tuple(v.shape[1:]) for k, v in out.features.items()}

    def _run(self, m: Member, xm: torch.Tensor, scale: float, features: bool) -> tuple[list, dict]:
        """Member ``m`` on ``xm`` resized by ``scale`` (with its mirror in the same forward):
        its logits, mirrored back, at their native size; and, if asked, its features (the mean
        over the mirror pair)."""
        H, W = xm.shape[-2:]
        size = (max(1, round(H * scale)), max(1, round(W * scale)))
        xs = xm if size == (H, W) else F.interpolate(xm, size=size, mode="bilinear", align_corners=False)
        out = self._forward(m, torch.cat([xs, xs.flip(-1)]) if self.plan.flip else xs)
        logits = out.logits.float()
        pieces = list(logits.chunk(2)) if self.plan.flip else [logits]
        if self.plan.flip:
            pieces[1] = pieces[1].flip(-1)
        feats = {}
        if features:
            for tap, f in out.features.items():
                f = f.float()
                if self.plan.flip:
                    a, b = f.chunk(2)
                    f = (a + b.flip(-1)) / 2
                feats[tap] = f
        return pieces, feats

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, *, rows: bool = False) -> EnsembleOutput:
        """Combined logits (and features, and with ``rows`` the quality rows) for a batch ``x``
        [B, 3, H, W] normalised with the base preprocessing."""
        plan, T = self.plan, self.plan.temperature
        if self.plain:
            out = self._forward(self.members[0], x)
            logits = out.logits.float()
            return EnsembleOutput(logits, {k: v.float() for k, v in out.features.items()},
                                  {COMBINED: logits} if rows else {})
        H, W = x.shape[-2:]
        prob = plan.combine == "prob"
        inputs = [self._renormalise(x, m) for m in self.members]
        fi = self.features_index
        with_features = bool(self.members[fi].model.taps)
        # scale 1 first, every member: its maps set the grid (no probe), and the features come from it
        first: dict[int, list] = {}
        features: dict[str, torch.Tensor] = {}
        for j, m in enumerate(self.members):
            if 1.0 in plan.scales or (j == fi and with_features):
                pieces, feats = self._run(m, inputs[j], 1.0, j == fi and with_features)
                features.update(feats)
                if 1.0 in plan.scales:
                    first[j] = pieces
        native = [first[j][0].shape[-2:] for j in sorted(first)] if 1.0 in plan.scales else []
        grid = self.grid_size((H, W), x.device, [tuple(n) for n in native])
        total, count = None, 0
        row_out: dict[str, torch.Tensor] = {}
        member_rows: dict[str, torch.Tensor] = {}
        for j, m in enumerate(self.members):
            acc, n = None, 0
            outputs = [(1.0, p) for p in first.get(j, [])]
            for s in plan.scales:
                if s != 1.0:
                    outputs += [(s, p) for p in self._run(m, inputs[j], s, False)[0]]
            for i, (s, piece) in enumerate(outputs):
                if tuple(piece.shape[-2:]) != tuple(grid):
                    piece = F.interpolate(piece, size=grid, mode="bilinear", align_corners=False)
                if rows and plan.tta and s == 1.0 and i == 0:
                    row_out[f"{m.name}, no TTA"] = piece
                term = torch.log_softmax(piece / T, dim=1) if prob else piece
                acc = term if acc is None else (torch.logaddexp(acc, term) if prob else acc + term)
                n += 1
            if rows and len(self.members) > 1:
                member_rows[m.name] = T * (acc - math.log(n)) if prob else acc / n
            total = acc if total is None else (torch.logaddexp(total, acc) if prob else total + acc)
            count += n
        logits = T * (total - math.log(count)) if prob else total / count
        if rows:
            row_out.update(member_rows)
            row_out[COMBINED] = logits
            row_out = {name: row_out[name] for name in self.row_names()}
        return EnsembleOutput(logits, features, row_out)


def sample_quality(rows: dict[str, torch.Tensor], labels: Sequence[torch.Tensor | None],
                   num_classes: int, ignore_index: int = 255) -> list[dict]:
    """Per sample of a batch: for each quality row, the counts behind IoU against the sample's
    ``labels`` (intersection, prediction and ground-truth pixels per class, [R, 3, C], at the
    labels' resolution: each row's logits upsampled bilinearly, as ``evaluate`` predicts), the
    summed negative log-likelihood of the labels, and the grid cells whose top class agrees
    with the combination's. A label map of None or all ``ignore_index`` counts nothing but
    agreement. (A classification label is a 1 x 1 map: a row's logits are one cell.)"""
    names = list(rows)
    C = num_classes
    combined = rows[COMBINED]
    top = {name: predicted_class(r) for name, r in rows.items()}
    out = []
    for b, y in enumerate(labels):
        counts = torch.zeros(len(names), 3, C, dtype=torch.int64)
        nll = torch.zeros(len(names), dtype=torch.float64)
        agree = torch.tensor([int((top[n][b] == top[COMBINED][b]).sum()) for n in names], dtype=torch.int64)
        if y is not None:
            y = y.to(combined.device).long()
            valid = y != ignore_index
            if bool(valid.any()):
                # ignored pixels go to a bin past the classes (C) and are cut off: no copies by mask
                target = torch.where(valid, y, C).flatten()
                counts[:, 2] = torch.bincount(target, minlength=C + 1)[:C].cpu()
                at = torch.where(valid, y, 0).clamp_(0, C - 1)[None]  # a class at every pixel, for gather
                for r, name in enumerate(names):
                    up = rows[name][b:b + 1]
                    if tuple(up.shape[-2:]) != tuple(y.shape[-2:]):
                        up = F.interpolate(up, size=tuple(y.shape[-2:]), mode="bilinear", align_corners=False)
                    up = up[0]
                    pred = torch.where(valid, predicted_class(up, 0), C).flatten()
                    counts[r, 0] = torch.bincount(torch.where(pred == target, target, C), minlength=C + 1)[:C].cpu()
                    counts[r, 1] = torch.bincount(pred, minlength=C + 1)[:C].cpu()
                    # -log softmax at the label: logsumexp over classes minus the label's logit
                    nll[r] = torch.where(valid, torch.logsumexp(up, 0) - up.gather(0, at)[0], 0).double().sum().cpu()
        out.append({"quality/counts": counts.numpy().astype("int32"), "quality/nll": nll.numpy(),
                    "quality/agree": agree.numpy().astype("int32"),
                    "quality/cells": int(top[COMBINED][b].numel())})
    return out
