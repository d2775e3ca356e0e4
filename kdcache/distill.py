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

from kdcache import distributed
from kdcache.data.base import SegmentationDataset
from kdcache.data.splits import limit
from kdcache.errors import KDCacheError
from kdcache.loaders import make_loader
from kdcache.methods import KDMethod, build_method
from kdcache.models import SegModel, build_model
from kdcache.online_teacher import OnlineTeacher
from kdcache.runs import RunDir
from kdcache.store import BAD, BadSampleError, CacheStore, CacheStream, to_tensors
from kdcache.store.location import worker_start_method
from kdcache.target_geometry import pool_targets, view_targets, warp_targets
from kdcache.training import TrainConfig, Trainer
from kdcache.transforms import Augment, Geometry, Preprocess, SegPipeline

#: the cached arrays of the logits group, as a read sample names them
LOGIT_KEYS = ("logits/values", "logits/indices", "logits/tail")

#: how train-student reads the cache: whole shards in a shuffled order, or sample by sample
CACHE_READS = ("stream", "random")


#: ``--online-teacher cache``: run the teacher (members, combination, TTA) the cache records
ONLINE_FROM_CACHE = "cache"


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
    #: "stream": whole shards in a shuffled order through a shuffle buffer; "random": per sample
    cache_read: str = "stream"
    shuffle_buffer: int = 256  # samples held by each streaming worker's shuffle buffer
    #: teacher caches of unlabelled images (same teacher and classes as ``cache``): KD terms only
    unlabeled_caches: list = field(default_factory=list)
    unlabeled_share: float = 0.5  # the share of each batch drawn from the unlabelled caches
    unlabeled_limit: int | None = None  # the first N samples of each unlabelled cache

    def validate(self) -> None:
        super().validate()
        if not self.methods:
            raise KDCacheError("give at least one --method (none for the CE-only baseline)")
        if self.cache is None and self.online_teacher is None:
            raise KDCacheError("--cache STORE is required (or --online-teacher M --teacher-weights CKPT)")
        if self.online_teacher == ONLINE_FROM_CACHE:
            if self.cache is None:
                raise KDCacheError(f"--online-teacher {ONLINE_FROM_CACHE} runs the teacher a cache records: give --cache")
        elif self.online_teacher and not self.teacher_weights:
            raise KDCacheError("--online-teacher needs --teacher-weights")
        if self.cache_read not in CACHE_READS:
            raise KDCacheError(f"--cache-read must be one of {', '.join(CACHE_READS)}, got {self.cache_read!r}")
        if self.shuffle_buffer < 1:
            raise KDCacheError(f"--shuffle-buffer must be 1 or more, got {self.shuffle_buffer}")
        if self.unlabeled_caches:
            if not 0 < self.unlabeled_share < 1:
                raise KDCacheError(f"--unlabeled-share must be between 0 and 1 (exclusive), got "
                                   f"{self.unlabeled_share}: each batch needs labelled and unlabelled images")
            if self.online_teacher:
                raise KDCacheError("--unlabeled-cache trains from cached targets; drop --online-teacher")
            if self.use_views:
                raise KDCacheError("--unlabeled-cache does not go with --use-views; drop one of them")
        if self.unlabeled_limit is not None and self.unlabeled_limit < 1:
            raise KDCacheError(f"--unlabeled-limit must be positive, got {self.unlabeled_limit}")


class KDPipeline(SegPipeline):
    """Training items with their cached targets (see :func:`kdcache.target_geometry.warp_targets`).

    Only the map ``groups`` the KD methods read are read and warped (none for the CE-only
    ``none``). Items come by random access (``pipeline[i]`` reads sample i's chunks) or, for
    training, from :meth:`stream` (whole shards in a shuffled order, one read per shard and
    array). With ``use_views`` and a store holding views, each epoch draws one of the item's
    stored views (seeded by (seed, epoch, index)): the image and label get that view's geometry
    and the targets are the teacher's outputs on exactly that view. With ``skip_bad``, a sample
    whose chunks cannot be read trains without targets (every KD cell ignored, ``kd/skipped``
    set). ``strides``: the nominal stride of each map group, which sets the size of an item's
    target maps (ceil(crop / stride)); by default the store's own. An unlabelled cache takes the
    labelled cache's, so that every item of a mixed batch has targets of one size whatever the
    sizes of the images each cache was built from (each map is still sampled through its own
    sample's extent)."""

    def __init__(self, dataset: SegmentationDataset, preprocess: Preprocess, augment: Augment | None,
                 seed: int, store: CacheStore, rows: np.ndarray, use_views: bool = False, skip_bad: bool = False,
                 required: list[str] | None = None, strides: dict[str, tuple[float, float]] | None = None):
        super().__init__(dataset, preprocess, augment, seed)
        self.store = store
        self.strides = dict(strides) if strides is not None else store.schema.strides
        self.rows = np.asarray(rows)
        self.use_views = bool(use_views and store.schema.views)
        self.skip_bad = skip_bad
        if required is None:  # every map group the store holds
            required = ["logits", *(f"features/{t}" for t in store.schema.features),
                        *(f"attention/{t}" for t in store.schema.attention)]
        self.groups = store.schema.groups_for(required, self.use_views)

    def __getitem__(self, index: int) -> dict:
        """Random access: sample ``index``'s chunks read on their own."""
        cached: dict = {}
        if self.groups:
            try:
                cached = to_tensors(self.store.read(int(self.rows[index]), groups=self.groups))
            except BadSampleError:
                if not self.skip_bad:
                    raise
                cached = {**self.store.schema.placeholder_targets(self.groups), BAD: True}
        return self.item(index, cached)

    def stream(self, positions: list[int] | None = None, *, batch_size: int | None = None, workers: int = 0,
               buffer_size: int = 256) -> CacheStream:
        """This epoch's items streamed shard by shard (:class:`~kdcache.store.CacheStream`):
        ``positions`` (default all) in a shuffled shard order through a shuffle buffer, split
        between ``workers`` DataLoader workers, each yielding whole batches of ``batch_size``."""
        placeholder = (lambda: self.store.schema.placeholder_targets(self.groups)) if self.skip_bad else None
        stream = CacheStream(self.store, self.rows, transform=self.item, groups=self.groups, seed=self.seed,
                             positions=positions, batch_size=batch_size, num_workers=workers,
                             buffer_size=buffer_size, placeholder=placeholder)
        stream.set_epoch(self.epoch)
        return stream

    def item(self, index: int, cached: dict) -> dict:
        """The training item of sample ``index`` from its cached targets (tensors, as read;
        a placeholder marked ``bad`` for a sample whose chunks could not be read)."""
        skipped = bool(cached.pop(BAD, False))
        if self.use_views:
            params = cached["views/params"]
            v = int(np.random.default_rng((self.seed, self.epoch, index, 7)).integers(len(params)))
            item = self.transformed(index, lambda _i, size: Geometry.unpack(size, params[v]))
            item.update(view_targets(cached, v))
        else:
            item = self.transformed(index, self.geometry if self.augment is not None else None)
            if cached:
                g = item.get("geometry") or Geometry.identity(tuple(item["image"].shape[-2:]))
                if self.store.schema.label_map:  # a classifier's class map, pooled over the crop
                    logits = {key: cached.pop(key) for key in LOGIT_KEYS if key in cached}
                    if logits:
                        item.update(pool_targets(logits, g, self.store.schema.num_classes))
                item.update(warp_targets(cached, g, self.strides))
        item.pop("geometry", None)
        if skipped:  # no teacher targets for this sample: every KD cell ignored
            for key in list(item):
                if key.startswith("kd/") and key.endswith("ignore"):
                    item[key] = torch.ones_like(item[key])
        item["kd/skipped"] = torch.tensor(skipped)
        return item


class MixedPipeline(torch.utils.data.Dataset):
    """The labelled :class:`KDPipeline` and those of the unlabelled caches under one index:
    labelled samples are 0 … L − 1, then each unlabelled pool's in turn (an item's ``index`` is
    this combined one). Unlabelled items have labels of 255 everywhere, so the cross-entropy
    counts only the labelled pixels of a batch, and they carry their own cache's targets."""

    def __init__(self, labelled: KDPipeline, pools: list[KDPipeline]):
        self.parts = [labelled, *pools]
        self.offsets = np.cumsum([0, *(len(p) for p in self.parts)])
        self.augment = labelled.augment

    @property
    def num_labelled(self) -> int:
        return len(self.parts[0])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def set_epoch(self, epoch: int) -> None:
        for p in self.parts:
            p.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict:
        part = int(np.searchsorted(self.offsets, index, side="right")) - 1
        item = self.parts[part][int(index - self.offsets[part])]
        item["index"] = int(index)
        return item


def batch_split(batch_size: int, share: float) -> tuple[int, int]:
    """(labelled, unlabelled) samples per batch for an unlabelled ``share``: at least one of each."""
    n_u = min(batch_size - 1, max(1, round(share * batch_size)))
    return batch_size - n_u, n_u


def mixed_batches(num_labelled: int, num_unlabelled: int, batch_size: int, share: float, seed: int,
                  epoch: int) -> list[list[int]]:
    """This epoch's batches of combined indices (see :class:`MixedPipeline`): every labelled
    sample once, in a shuffled order, ``batch_size − round(share · batch_size)`` of them per
    batch, the rest of each batch unlabelled. The unlabelled samples run through one shuffled
    pass of the pool after another, continuing across epochs (epoch e starts where e − 1
    stopped), so every unlabelled image is used before any is used again; the order depends on
    (seed, epoch) and (seed, pass) alone, so a resumed run draws the same batches."""
    n_l, n_u = batch_split(batch_size, share)
    steps = num_labelled // n_l
    lab = np.random.default_rng((seed, epoch, 11)).permutation(num_labelled)
    first = epoch * steps * n_u  # unlabelled draws made before this epoch
    draws = np.arange(first, first + steps * n_u)
    passes = draws // num_unlabelled
    pool = np.empty(len(draws), dtype=np.int64)
    for p in np.unique(passes):
        perm = np.random.default_rng((seed, int(p), 13)).permutation(num_unlabelled)
        sel = passes == p
        pool[sel] = perm[draws[sel] % num_unlabelled]
    return [[*lab[b * n_l:(b + 1) * n_l].tolist(), *(num_labelled + pool[b * n_u:(b + 1) * n_u]).tolist()]
            for b in range(steps)]


class StudentTrainer(Trainer):
    kind = "distill"
    command = "train-student"

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
        self._num_labelled = len(train_ds)
        rows = self.store.join(train_ds, check_content=self.config.check_content)
        required = [r for m in self.methods for r in m.required()]
        labelled = KDPipeline(train_ds, self.preprocess, train_pipe.augment, self.config.seed, self.store, rows,
                              self.config.use_views, self.config.skip_bad, required)
        pools = [self.unlabelled_pipeline(path, p, train_pipe.augment, required)
                 for p, path in enumerate(self.config.unlabeled_caches)]
        self.cache_sources = [(pipe.store, pipe.rows) for pipe in (labelled, *pools)]
        return (MixedPipeline(labelled, pools) if pools else labelled), val_pipe

    def unlabelled_pipeline(self, path: str, p: int, augment: Augment | None, required: list[str]) -> KDPipeline:
        """The training items of unlabelled cache ``path`` (its own data set, as the cache records
        it), refused in one line when it was built by another teacher or for other classes."""
        store = CacheStore(path)
        mine, theirs = self.store.schema, store.schema
        checks = (("classes", list(mine.class_names), list(theirs.class_names)),
                  ("teacher weights (sha256)", mine.teacher.get("weights_sha256"), theirs.teacher.get("weights_sha256")),
                  ("ensemble members or combination", mine.identity()["ensemble"], theirs.identity()["ensemble"]),
                  ("top-k", mine.k, theirs.k), ("preprocessing", mine.preprocess, theirs.preprocess))
        for what, a, b in checks:
            if a != b:
                raise KDCacheError(f"--unlabeled-cache {path} differs from --cache {self.store.path} in its {what}; "
                                   "build both caches with the same teacher (and preprocessing)")
        missing = sorted(set(mine.groups_for(required)) - set(theirs.groups_for(required)))
        if missing:
            raise KDCacheError(f"--unlabeled-cache {path} lacks {', '.join(missing)}, which the methods read; rebuild it "
                               "with the same --features/--attention as --cache")
        ds = limit(store.dataset(), self.config.unlabeled_limit)
        rows = store.join(ds, check_content=self.config.check_content)
        # each pool's augmentation drawn from its own stream (not the labelled sample j's); its
        # targets on the labelled cache's grid: one batch, one target size (its images' sizes,
        # hence its store's nominal stride, may differ)
        return KDPipeline(ds, self.preprocess, augment, self.config.seed + 7919 * (p + 1), store, rows,
                          False, self.config.skip_bad, required, strides=self.store.schema.strides)

    def describe_run(self, model: SegModel, train_ds, val_ds, augment: Augment | None) -> dict:
        """The run's ``config.json``, plus ``cache_targets``: what the student's targets are
        (``logits`` through each crop, stored ``views``, a classifier's pooled ``label_map``)."""
        out = super().describe_run(model, train_ds, val_ds, augment)
        if self.store is not None:
            schema = self.store.schema
            out["cache_targets"] = ("views" if self.config.use_views and schema.views
                                    else "label_map" if schema.label_map else "logits")
        return out

    def seen_counts(self, per_rank: list[list[int]]) -> dict:
        """With unlabelled caches, the labelled (combined index < L) and unlabelled samples apart."""
        if not self.config.unlabeled_caches:
            return super().seen_counts(per_rank)
        L = self._num_labelled
        lab = [[i for i in s if i < L] for s in per_rank]
        unl = [[i for i in s if i >= L] for s in per_rank]
        return {**super().seen_counts(lab), "train_unlabeled_seen": sum(map(len, unl)),
                "train_unlabeled_distinct": len(set().union(*map(set, unl)))}

    def sample_groups(self, pipeline) -> np.ndarray | None:
        """Under torchrun, ranks take whole store shards: each reads its own shard files."""
        if isinstance(pipeline, KDPipeline):
            return self.store.schema.shard_of(pipeline.rows)
        return None

    @property
    def streams(self) -> bool:
        return self.store is not None and self.config.cache_read == "stream" and not self.config.unlabeled_caches

    def mixed_batches(self, train_pipe: MixedPipeline, epoch: int) -> list[list[int]]:
        """This rank's batches of labelled and unlabelled samples (every rank the same count)."""
        c, world = self.config, self.dist.world_size
        batches = mixed_batches(train_pipe.num_labelled, len(train_pipe) - train_pipe.num_labelled, c.batch_size,
                                c.unlabeled_share, c.seed, epoch)
        steps = len(batches) // world
        return batches[self.dist.rank::world][:steps]

    def steps_per_epoch(self, num_samples: int) -> int:
        """Streaming, each DataLoader worker yields whole batches of its part of the shards:
        the steps are a multiple of the workers. With unlabelled caches, an epoch is one pass
        over the labelled samples (see :func:`mixed_batches`)."""
        if self.config.unlabeled_caches:
            c = self.config
            n_l, _ = batch_split(c.batch_size, c.unlabeled_share)
            steps = self._num_labelled // n_l // self.dist.world_size
            if steps == 0:
                raise KDCacheError(f"--batch-size {c.batch_size} with --unlabeled-share {c.unlabeled_share} takes "
                                   f"{n_l} labelled samples a batch, more than the {self._num_labelled} there are "
                                   "(per process)")
            return steps
        steps = super().steps_per_epoch(num_samples)
        if not self.streams:
            return steps
        workers = self.stream_workers(steps)
        return steps // workers * workers

    def stream_workers(self, steps: int) -> int:
        """Streaming DataLoader workers (at least one part; no more workers than batches)."""
        return max(1, min(self.workers, steps))

    def training_loader(self, train_pipe, epoch: int, steps_per_epoch: int) -> torch.utils.data.DataLoader:
        """Streaming: this rank's samples, shard by shard, each worker its own contiguous part."""
        if isinstance(train_pipe, MixedPipeline):
            return make_loader(train_pipe, None, self.workers, batch_sampler=self.mixed_batches(train_pipe, epoch),
                               pin_memory=self.device.type == "cuda", context=self.loader_context())
        if not self.streams:
            return super().training_loader(train_pipe, epoch, steps_per_epoch)
        c = self.config
        parts = self.stream_workers(steps_per_epoch)
        stream = train_pipe.stream(self.rank_share(train_pipe, epoch, steps_per_epoch), batch_size=c.batch_size,
                                   workers=parts, buffer_size=c.shuffle_buffer)
        return make_loader(stream, c.batch_size, parts if self.workers > 0 else 0,
                           pin_memory=self.device.type == "cuda", context=self.loader_context())

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
                out = model(torch.zeros(1, 3, *model.probe_size((64, 64))))
            model.train(was)
            channels = {t: f.shape[1] for t, f in out.features.items()}
        if self.config.online_teacher:
            c = self.config
            teacher_taps = sorted({r.split("/", 1)[1] for m in self.methods for r in m.required() if "/" in r})
            if c.online_teacher == ONLINE_FROM_CACHE:
                self.teacher = OnlineTeacher.from_cache(self.store.schema, teacher_taps, self.device)
            else:
                self.teacher = OnlineTeacher(c.teacher_weights, c.online_teacher, num_classes, teacher_taps,
                                             self.device, k=c.online_topk or (self.store.k if self.store else None))
            schema = self.teacher.schema
        else:
            schema = self.store.schema
        for m in self.methods:
            m.setup(channels, schema)
            m.prepare(getattr(self, "cache_sources", []))
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
    """Run distillation training; returns ``{"run", "best_miou", "last"}`` (the process group of
    a torchrun launch destroyed at the end, as :func:`kdcache.training.train` does)."""
    try:
        return StudentTrainer(config, resume=resume, overwrite=overwrite, show_progress=show_progress,
                              explicit=explicit).fit()
    finally:
        distributed.shutdown()


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
