"""``train-student``: student training from a teacher cache, L_total = L_seg + Σ_m w_m · L_m.

:class:`StudentTrainer` is the supervised :class:`~kdcache.training.Trainer` with three
changes: its training items carry the cached teacher targets taken through the same sampled
geometry as the image and label (:class:`KDPipeline`), the student taps the modules its
methods read, and the loss adds each method's weighted term. The teacher is never built in
cached mode. ``online_teacher`` runs a teacher every step instead and feeds the same loss code
(:mod:`kdcache.online_teacher`; for parity checks and benchmarks only).

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

from kdcache.data.base import SegmentationDataset
from kdcache.errors import KDCacheError
from kdcache.methods import KDMethod, build_method
from kdcache.models import SegModel, build_model
from kdcache.online_teacher import OnlineTeacher
from kdcache.runs import RunDir
from kdcache.store import BadSampleError, CacheStore, to_tensors
from kdcache.store.location import worker_start_method
from kdcache.target_geometry import view_targets, warp_targets
from kdcache.training import TrainConfig, Trainer
from kdcache.transforms import Augment, Geometry, Preprocess, SegPipeline


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


class KDPipeline(SegPipeline):
    """Training items with their cached targets (see :func:`kdcache.target_geometry.warp_targets`).

    With ``use_views`` and a store holding views, each epoch draws one of the item's stored
    views (seeded by (seed, epoch, index)): the image and label get that view's geometry and the
    targets are the teacher's outputs on exactly that view. With ``skip_bad``, a sample whose
    chunks cannot be read trains without targets (every KD cell ignored, ``kd/skipped`` set)."""

    def __init__(self, dataset: SegmentationDataset, preprocess: Preprocess, augment: Augment | None,
                 seed: int, store: CacheStore, rows: np.ndarray, use_views: bool = False, skip_bad: bool = False):
        super().__init__(dataset, preprocess, augment, seed)
        self.store = store
        self.rows = np.asarray(rows)
        self.use_views = bool(use_views and store.schema.views)
        self.skip_bad = skip_bad

    def __getitem__(self, index: int) -> dict:
        skipped = False
        try:
            cached = to_tensors(self.store.read(int(self.rows[index])))
        except BadSampleError:
            if not self.skip_bad:
                raise
            cached, skipped = self.store.schema.placeholder_targets(), True
        if self.use_views:
            params = cached["views/params"]
            v = int(np.random.default_rng((self.seed, self.epoch, index, 7)).integers(len(params)))
            item = self.transformed(index, lambda _i, size: Geometry.unpack(size, params[v]))
            item.update(view_targets(cached, v))
        else:
            item = self.transformed(index, self.geometry if self.augment is not None else None)
            g = item.get("geometry") or Geometry.identity(tuple(item["image"].shape[-2:]))
            item.update(warp_targets(cached, g, self.store.schema.strides))
        item.pop("geometry", None)
        if skipped:  # no teacher targets for this sample: every KD cell ignored
            for key in list(item):
                if key.startswith("kd/") and key.endswith("ignore"):
                    item[key] = torch.ones_like(item[key])
        item["kd/skipped"] = torch.tensor(skipped)
        return item


class StudentTrainer(Trainer):
    kind = "distill"

    def __init__(self, config: StudentConfig, **kw):
        super().__init__(config, **kw)
        c = self.config
        self.methods: list[KDMethod] = [build_method(m["name"], **{k: v for k, v in m.items() if k != "name"})
                                        for m in c.methods]
        self.store = CacheStore(c.cache) if c.cache else None
        self.teacher: OnlineTeacher | None = None
        if self.store is not None:
            self.store.check_teacher_unchanged()
            pre = Preprocess.from_dict(self.store.schema.preprocess)
            if c.resize is not None and tuple(c.resize) != tuple(pre.resize or ()):
                raise KDCacheError(f"--resize {c.resize} differs from the cache's preprocessing (resize "
                                   f"{pre.resize}); drop --resize: students train on what the teacher saw")
            self.preprocess = pre

    # -- data -----------------------------------------------------------------------------------
    def build_pipelines(self, train_ds, val_ds):
        train_pipe, val_pipe = super().build_pipelines(train_ds, val_ds)
        if self.store is None:
            return train_pipe, val_pipe
        rows = self.store.join(train_ds, check_content=self.config.check_content)
        return (KDPipeline(train_ds, self.preprocess, train_pipe.augment, self.config.seed, self.store, rows,
                           self.config.use_views, self.config.skip_bad), val_pipe)

    def sample_groups(self, pipeline) -> np.ndarray | None:
        """Under torchrun, ranks take whole store shards: each reads its own shard files."""
        if isinstance(pipeline, KDPipeline):
            return self.store.schema.shard_of(pipeline.rows)
        return None

    def loader_context(self) -> str | None:
        return worker_start_method(self.store.path) if self.store is not None else None

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
            c = self.config
            teacher_taps = sorted({r.split("/", 1)[1] for m in self.methods for r in m.required() if "/" in r})
            self.teacher = OnlineTeacher(c.teacher_weights, c.online_teacher, num_classes, teacher_taps, self.device,
                                         k=c.online_topk or (self.store.k if self.store is not None else None))
            schema = self.teacher.schema
        else:
            schema = self.store.schema
        for m in self.methods:
            m.setup(channels, schema)
            m.to(self.device)
        return model

    def extra_parameters(self) -> list[torch.nn.Parameter]:
        return [p for m in self.methods for p in m.parameters()]

    def extra_state(self) -> dict:
        return {"methods": [m.state_dict() for m in self.methods]}

    def load_extra_state(self, ckpt: dict) -> None:
        for m, sd in zip(self.methods, ckpt.get("methods", [])):
            m.load_state_dict(sd)

    # -- the loss -------------------------------------------------------------------------------------
    def compute_loss(self, model: SegModel, batch: dict):
        if self.teacher is not None:
            batch = {**batch, **self.teacher.targets(batch)}
        out = model(batch["image"])
        ce = self.segmentation_loss(out.logits, batch["label"])
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
    ds = CacheStore(store_path).schema.dataset
    base = {"dataset": ds["name"], "data_root": ds.get("root"), "dataset_options": ds.get("options") or {},
            "train_split": ds["split"], "cache": store_path}
    base.update({k: v for k, v in overrides.items() if v is not None})
    names = {f.name for f in dataclasses.fields(StudentConfig)}
    unknown = set(base) - names
    if unknown:
        raise KDCacheError(f"unknown student options: {sorted(unknown)}")
    return StudentConfig(**base)


def student_config(*, cache: str | None = None, resume: bool = False, **fields) -> StudentConfig:
    """The configuration of a ``train-student`` run: the data set, split and options default to
    the cache's; ``--resume`` needs only ``out`` (the cache comes from the run's config.json);
    without a cache, ``online_teacher`` runs a live teacher."""
    out = fields.get("out")
    if cache is None and resume and out and RunDir(out).exists():
        cache = RunDir(out).read_config().get("cache")
    if cache is not None:
        return config_from_store(cache, **fields)
    if fields.get("online_teacher") is not None:
        return StudentConfig(**{k: v for k, v in fields.items() if v is not None})
    raise KDCacheError("--cache STORE is required (build one with build-teacher-cache)")
