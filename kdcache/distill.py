"""``train-student``: student training from a teacher cache, L_total = L_seg + Σ_m w_m · L_m.

:class:`StudentTrainer` is the supervised :class:`~kdcache.training.Trainer` with three
changes: its training items carry the cached teacher targets taken through the same sampled
geometry as the image and label (:class:`KDPipeline`), the student taps the modules its
methods read, and the loss adds each method's weighted term. The teacher is never built in
cached mode. ``online_teacher`` runs a teacher every step instead and feeds the same loss code
(for parity checks and benchmarks only).

The KD terms compare the student's logits bilinearly resized to the cache's resolution (the
teacher head's stride) with the cached maps; the cross-entropy uses the full-resolution labels
as in supervised training. Resizing the student (not the cache) keeps the cached class ids
intact and makes the KD term cost what the teacher's resolution costs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from kdcache.data.base import IGNORE_INDEX, SegmentationDataset
from kdcache.errors import KDCacheError
from kdcache.methods import KDMethod, build_method
from kdcache.models import SegModel, build_model
from kdcache.store import CacheStore, to_tensors
from kdcache.store.reader import BadSampleError
from kdcache.target_geometry import out_map_size, sample_grid, warp_targets
from kdcache.targets import attention_map, topk_targets
from kdcache.training import TrainConfig, Trainer
from kdcache.transforms import Augment, Geometry, Preprocess, SegPipeline, apply_geometry


@dataclass
class StudentConfig(TrainConfig):
    model: str = "demo_student"
    out: str = "runs/student"
    cache: str | None = None
    #: each {"name": ..., "weight": ..., other options}; "none" is the CE-only baseline
    methods: list = field(default_factory=lambda: [{"name": "kl"}])
    use_views: bool = False
    check_content: bool = True
    online_teacher: str | None = None
    teacher_weights: str | None = None
    online_topk: int | None = None  # k of the online targets (default: the cache's, else C)
    skip_bad: bool = False  # train on without the targets of samples whose chunks cannot be read

    def validate(self) -> None:
        super().validate()
        if not self.methods:
            raise KDCacheError("give at least one --method (none for the CE-only baseline)")
        if self.cache is None and self.online_teacher is None:
            raise KDCacheError("--cache STORE is required (or --online-teacher M --teacher-weights CKPT)")
        if self.online_teacher and not self.teacher_weights:
            raise KDCacheError("--online-teacher needs --teacher-weights")


def placeholder_targets(meta: dict) -> dict:
    """Zero targets shaped like one sample's (1 x 1 maps; views at their size) for a sample whose
    chunks cannot be read: the geometry gives them the right size and every cell is ignored."""
    k = meta["k"]
    idx = getattr(torch, {"uint8": "uint8", "uint16": "int32", "uint32": "int64"}[meta["dtypes"]["indices"]])
    out = {"logits/values": torch.zeros(k, 1, 1, dtype=torch.float16), "logits/indices": torch.zeros(k, 1, 1, dtype=idx)}
    if meta["tail"]:
        out["logits/tail"] = torch.zeros(1, 1, dtype=torch.float16)
    for tap, f in meta.get("features", {}).items():
        out[f"features/{tap}"] = torch.zeros(f["channels"], 1, 1, dtype=torch.float16)
    for tap in meta.get("attention", {}):
        out[f"attention/{tap}"] = torch.zeros(1, 1, dtype=torch.float16)
    views = meta.get("views")
    if views:
        V, (vh, vw) = views["count"], views["map_size"]
        crop = views["crop"]
        out["views/params"] = torch.tensor([[1.0, 0.0, 0.0, crop[0], crop[1], 0.0]] * V)
        out["views/logits/values"] = torch.zeros(V, k, vh, vw, dtype=torch.float16)
        out["views/logits/indices"] = torch.zeros(V, k, vh, vw, dtype=idx)
        if meta["tail"]:
            out["views/logits/tail"] = torch.zeros(V, vh, vw, dtype=torch.float16)
        for tap, f in views.get("features", {}).items():
            out[f"views/features/{tap}"] = torch.zeros(V, f["channels"], *f["map_size"], dtype=torch.float16)
        for tap, a in views.get("attention", {}).items():
            out[f"views/attention/{tap}"] = torch.zeros(V, *a["map_size"], dtype=torch.float16)
    return out


def strides_of(meta: dict) -> dict[str, tuple[float, float]]:
    out = {"logits": tuple(meta["stride"])}
    for tap, f in meta.get("features", {}).items():
        out[f"features/{tap}"] = tuple(f["stride"])
    for tap, a in meta.get("attention", {}).items():
        out[f"attention/{tap}"] = tuple(a["stride"])
    return out


def check_teacher_unchanged(store: CacheStore) -> None:
    """Refuse a stale cache: the teacher checkpoint it was built from has changed since (its
    file is still where the build read it, with other bytes)."""
    from pathlib import Path

    from kdcache.checkpoint import file_sha256

    teacher = store.meta["teacher"]
    path = Path(teacher.get("weights") or "")
    if teacher.get("weights") and path.is_file():
        now = file_sha256(path)
        if now != teacher["weights_sha256"]:
            raise KDCacheError(
                f"teacher cache {store.path} is stale: it was built from {path} with SHA-256 "
                f"{teacher['weights_sha256'][:16]}…, but that file now has {now[:16]}… (the teacher was retrained "
                "or replaced). Rebuild the cache: build-teacher-cache --overwrite"
            )


class KDPipeline(SegPipeline):
    """Training items with their cached targets (see :func:`kdcache.target_geometry.warp_targets`).

    With ``use_views`` and a store holding views, each epoch draws one of the item's stored
    views (seeded by (seed, epoch, index)): the image and label get that view's geometry and the
    targets are the teacher's outputs on exactly that view."""

    def __init__(self, dataset: SegmentationDataset, preprocess: Preprocess, augment: Augment | None,
                 seed: int, store: CacheStore, rows: np.ndarray, use_views: bool = False, skip_bad: bool = False):
        super().__init__(dataset, preprocess, augment, seed)
        self.store = store
        self.rows = np.asarray(rows)
        self.strides = strides_of(store.meta)
        self.use_views = bool(use_views and store.meta.get("views"))
        self.skip_bad = skip_bad

    def __getitem__(self, index: int) -> dict:
        skipped = False
        try:
            cached = to_tensors(self.store.read(int(self.rows[index])))
        except BadSampleError:
            if not self.skip_bad:
                raise
            cached, skipped = placeholder_targets(self.store.meta), True
        item = self._view_item(index, cached) if self.use_views else self._item(index, cached)
        if skipped:  # no teacher targets for this sample: every KD cell ignored
            for key in list(item):
                if key.startswith("kd/") and key.endswith("ignore"):
                    item[key] = torch.ones_like(item[key])
        item["kd/skipped"] = torch.tensor(skipped)
        return item

    def _item(self, index: int, cached: dict) -> dict:
        item = SegPipeline.__getitem__(self, index)
        g = item.get("geometry")
        if g is None:
            size = tuple(item["image"].shape[-2:])
            g = Geometry(size, 1.0, 0, 0, size, False)
        item.update(warp_targets(cached, g, self.strides))
        item.pop("geometry", None)
        return item

    def _view_item(self, index: int, cached: dict) -> dict:
        image, mask = self.dataset.load(index)
        x = self.preprocess.image_to_tensor(image)
        y = self.preprocess.mask_to_tensor(mask)
        params = cached["views/params"]
        v = int(np.random.default_rng((self.seed, self.epoch, index, 7)).integers(len(params)))
        scale, top, left, oh, ow, flip = params[v].tolist()
        g = Geometry(tuple(x.shape[-2:]), float(scale), int(top), int(left), (int(oh), int(ow)), bool(flip))
        item = {"id": self.dataset.refs[index].id, "index": index,
                "image": apply_geometry(x, g, kind="image"),
                "label": apply_geometry(y, g, kind="label", fill=IGNORE_INDEX)}
        item["kd/values"] = cached["views/logits/values"][v]
        item["kd/indices"] = cached["views/logits/indices"][v]
        if "views/logits/tail" in cached:
            item["kd/tail"] = cached["views/logits/tail"][v]
        item["kd/ignore"] = torch.zeros(item["kd/values"].shape[-2:], dtype=torch.bool)
        for key, a in cached.items():
            if key.startswith(("views/features/", "views/attention/")):
                name = key[len("views/"):]
                item[f"kd/{name}"] = a[v]
                item[f"kd/{name}/ignore"] = torch.zeros(a.shape[-2:], dtype=torch.bool)
        return item


class StudentTrainer(Trainer):
    kind = "distill"

    def __init__(self, config: StudentConfig, **kw):
        super().__init__(config, **kw)
        c = self.config
        self.methods: list[KDMethod] = [build_method(m["name"], **{k: v for k, v in m.items() if k != "name"})
                                        for m in c.methods]
        self.store = CacheStore(c.cache) if c.cache else None
        self.teacher = None
        if self.store is not None:
            check_teacher_unchanged(self.store)
            pre = Preprocess.from_dict(self.store.meta["preprocess"])
            if c.resize is not None and tuple(c.resize) != tuple(pre.resize or ()):
                raise KDCacheError(f"--resize {c.resize} differs from the cache's preprocessing (resize "
                                   f"{pre.resize}); students train on what the teacher saw")
            self.preprocess = pre

    # -- data -----------------------------------------------------------------------------------
    def build_pipelines(self, train_ds, val_ds):
        train_pipe, val_pipe = super().build_pipelines(train_ds, val_ds)
        if self.store is None:
            return train_pipe, val_pipe
        if self.store.num_classes != train_ds.num_classes:
            raise KDCacheError(f"the cache holds {self.store.num_classes} classes but {train_ds.name} has "
                               f"{train_ds.num_classes}")
        rows = self.store.join(train_ds, check_content=self.config.check_content)
        return (KDPipeline(train_ds, self.preprocess, train_pipe.augment, self.config.seed, self.store, rows,
                           self.config.use_views, self.config.skip_bad), val_pipe)

    # -- model ----------------------------------------------------------------------------------
    def build_model(self, num_classes: int) -> SegModel:
        taps = sorted({t for m in self.methods for t in m.student_taps()})
        model = build_model(self.config.model, num_classes, taps=taps, **self.config.model_options)
        channels = {}
        if taps:
            was = model.training
            model.eval()
            with torch.no_grad():
                out = model(torch.zeros(1, 3, 64, 64))
            model.train(was)
            channels = {t: f.shape[1] for t, f in out.features.items()}
        if self.config.online_teacher:
            meta = self._build_online_teacher(num_classes)
        else:
            meta = self.store.meta
        for m in self.methods:
            m.setup(channels, meta)
            m.to(self.device)
        return model

    def sample_groups(self, pipeline) -> np.ndarray | None:
        """Under torchrun, ranks take whole store shards: each reads its own shard files."""
        if isinstance(pipeline, KDPipeline):
            return pipeline.rows // self.store.samples_per_shard
        return None

    def loader_context(self) -> str | None:
        """Object stores (s3://, gs://, …) go through async fsspec file systems that are not
        fork-safe: their workers are spawned. memory:// lives in this process, so it is forked."""
        path = self.store.path if self.store is not None else ""
        if "://" in path and not path.startswith("memory://"):
            return "spawn"
        return None

    def extra_parameters(self) -> list[torch.nn.Parameter]:
        return [p for m in self.methods for p in m.parameters()]

    def extra_state(self) -> dict:
        return {"methods": [m.state_dict() for m in self.methods]}

    def load_extra_state(self, ckpt: dict) -> None:
        for m, sd in zip(self.methods, ckpt.get("methods", [])):
            m.load_state_dict(sd)

    # -- online teacher (parity checks only) ---------------------------------------------------------
    def _online_taps(self) -> list[str]:
        return sorted({r.split("/", 1)[1] for m in self.methods for r in m.required() if "/" in r})

    def _build_online_teacher(self, num_classes: int) -> dict:
        """Build the teacher (online mode only) and describe its outputs as a store would."""
        from kdcache.cache_build import load_teacher

        taps = self._online_taps()
        teacher, _, _ = load_teacher(self.config.teacher_weights, self.config.online_teacher, num_classes, taps)
        teacher.eval().to(self.device)
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.teacher = teacher
        with torch.no_grad():
            out = teacher(torch.zeros(1, 3, 64, 64, device=self.device))
        feats = {t: {"channels": f.shape[1], "map_size": list(f.shape[-2:])} for t, f in out.features.items()}
        return {"features": feats, "attention": dict(feats), "num_classes": num_classes}

    @torch.no_grad()
    def _online_targets(self, batch: dict) -> dict:
        x = batch["image"]
        out = self.teacher(x)
        C = out.logits.shape[1]
        k = self.config.online_topk or (self.store.k if self.store is not None else C)
        values, indices, tail = topk_targets(out.logits.float(), k)
        size = tuple(values.shape[-2:])
        targets = {"kd/values": values.half().float(), "kd/indices": indices,
                   "kd/ignore": torch.zeros(x.shape[0], *size, dtype=torch.bool, device=x.device)}
        if tail is not None:
            targets["kd/tail"] = tail.half().float()
        for tap, f in out.features.items():
            targets[f"kd/features/{tap}"] = f.half().float()
            targets[f"kd/attention/{tap}"] = attention_map(f).half().float()
            targets[f"kd/features/{tap}/ignore"] = torch.zeros(x.shape[0], *f.shape[-2:], dtype=torch.bool,
                                                               device=x.device)
            targets[f"kd/attention/{tap}/ignore"] = targets[f"kd/features/{tap}/ignore"]
        # the crop's padding, as the cache path marks it
        geoms = batch.get("geometry")
        if isinstance(geoms, list):
            stride = (x.shape[-2] / size[0], x.shape[-1] / size[1])
            masks = []
            for g in geoms:
                in_hw = g.in_size
                map_hw = (max(1, round(in_hw[0] / stride[0])), max(1, round(in_hw[1] / stride[1])))
                masks.append(sample_grid(g, map_hw, out_map_size(g.out_size, stride))[2])
            if all(tuple(m.shape) == size for m in masks):
                targets["kd/ignore"] = torch.stack(masks).to(x.device)
        return targets

    # -- the loss -------------------------------------------------------------------------------------
    def compute_loss(self, model: SegModel, batch: dict):
        if self.teacher is not None:
            online = self._online_targets(batch)
            cached_ignore = batch.get("kd/ignore")  # the crop's padding, from the cache pipeline
            if cached_ignore is not None and cached_ignore.shape == online["kd/ignore"].shape:
                online["kd/ignore"] = cached_ignore
            batch = {**batch, **online}
        out = model(batch["image"])
        logits = F.interpolate(out.logits, size=batch["label"].shape[-2:], mode="bilinear", align_corners=False)
        ce = F.cross_entropy(logits.float(), batch["label"], weight=self.class_weight, ignore_index=IGNORE_INDEX)
        total = ce
        terms = {"ce": ce.detach()}
        if self.config.skip_bad and "kd/skipped" in batch:  # the share of samples trained without targets
            terms["kd_skipped"] = batch["kd/skipped"].float().mean()
        for m in self.methods:
            if m.weight == 0.0 and m.name == "none":
                continue
            term = m(out, batch)
            total = total + term
            terms[m.name] = term.detach()
        return total, terms


def train_student(config: StudentConfig, *, resume: bool = False, overwrite: bool = False,
                  show_progress: bool = True, explicit: set[str] | None = None) -> dict:
    return StudentTrainer(config, resume=resume, overwrite=overwrite, show_progress=show_progress,
                          explicit=explicit).fit()


def config_from_store(store_path: str, **overrides) -> StudentConfig:
    """A StudentConfig whose data set, split and options default to the cache's."""
    meta = CacheStore(store_path).meta
    ds = meta["dataset"]
    base = {"dataset": ds["name"], "data_root": ds.get("root"), "dataset_options": ds.get("options") or {},
            "train_split": ds["split"], "cache": store_path}
    base.update({k: v for k, v in overrides.items() if v is not None})
    names = {f.name for f in dataclasses.fields(StudentConfig)}
    unknown = set(base) - names
    if unknown:
        raise KDCacheError(f"unknown student options: {sorted(unknown)}")
    return StudentConfig(**base)
