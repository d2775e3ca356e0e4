"""Images with their cached teacher targets, as a student's training batches: the one home of the
student trainer's data.

- :class:`KDPipeline`: a training item is an image, its label and the cached maps its KD methods
  read, all through one sampled geometry (or one of the sample's stored views); random access,
  or streamed shard by shard (:class:`~kdcache.store.CacheStream`).
- :class:`MixedPipeline` and :func:`mixed_batches`: labelled items and those of unlabelled caches
  under one index, and the epoch's batches that mix them.
- :class:`CachedBatches` and :class:`MixedBatches`: the :class:`~kdcache.train.batches.TrainingBatches`
  a student trains from (streamed or random access; torchrun ranks take whole store shards;
  DataLoader workers of an object store are spawned), built by :func:`student_batches`.

The torch Datasets that know the store's layout — :class:`~kdcache.store.CacheStream` (which
rows lie in which shard, one read per shard) and :class:`~kdcache.store.CachedTargets` — stay in
``store/``, which alone knows the format; this module turns what they read into training items.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch

from kdcache.core.distributed import Dist
from kdcache.core.errors import KDCacheError
from kdcache.data.base import SegmentationDataset
from kdcache.data.splits import limit
from kdcache.pipeline.loaders import make_loader
from kdcache.pipeline.mixing import MixOptions
from kdcache.pipeline.transforms import Augment, Preprocess, SegPipeline
from kdcache.pipeline.warp import (
    prepare_resample,
)
from kdcache.store import BAD, BadSampleError, CacheStore, CacheStream, to_tensors
from kdcache.store.forms import form_of
from kdcache.store.location import worker_start_method
from kdcache.train.batches import TrainingBatches


class KDPipeline(SegPipeline):
    """Training items with their cached targets (see :func:`kdcache.pipeline.warp.warp_targets`).

    Only the map ``groups`` the KD methods read are read and warped (none for the CE-only
    ``none``). Items come by random access (``pipeline[i]`` reads sample i's chunks) or, for
    training, from :meth:`stream` (whole shards in a shuffled order, one read per shard and
    array). With ``use_views`` and a store holding views, each epoch draws one of the item's
    stored views (seeded by (seed, epoch, index)): the image and label get that view's geometry
    and the targets are the teacher's outputs on exactly that view. With ``skip_bad``, a sample
    whose chunks cannot be read trains without targets (every KD cell ignored, ``kd/skipped``
    set; the key is there only with ``skip_bad``). ``strides``: the nominal stride of each map
    group, which sets the size of an item's target maps (ceil(crop / stride)); by default the
    store's own. An unlabelled cache takes the labelled cache's, so that every item of a mixed
    batch has targets of one size whatever the sizes of the images each cache was built from (each
    map is still sampled through its own sample's extent). ``resample``: how a crop takes the
    cached logits, ``nearest`` cell or ``bilinear`` (see :mod:`kdcache.pipeline.warp`)."""

    def __init__(self, dataset: SegmentationDataset, preprocess: Preprocess, augment: Augment | None,
                 seed: int, store: CacheStore, rows: np.ndarray, use_views: bool = False, skip_bad: bool = False,
                 required: list[str] | None = None, strides: dict[str, tuple[float, float]] | None = None,
                 resample: str = "nearest", mix: MixOptions | None = None):
        super().__init__(dataset, preprocess, augment, seed, mix)
        self.resample = resample
        self.store = store
        self.strides = dict(strides) if strides is not None else store.schema.strides
        self.rows = np.asarray(rows)
        # how a crop takes its targets: the store's form (a schedule is always replayed; stored views
        # only with use_views)
        self.form = form_of(store.schema).for_training(use_views)
        self.use_views = self.form.reads_views
        self.skip_bad = skip_bad
        if required is None:  # every map group the store holds
            required = ["logits", *store.schema.signal_groups()]
        self.groups = store.schema.groups_for(required, self.use_views)
        if "logits" in self.groups:  # crops warp the base logits: the compiled resampling, loaded before workers fork
            prepare_resample(resample)
        # mixing partners are the cache's samples, by store row (as its build paired them)
        self._partners = store.dataset() if self.mix.enabled else None

    def mix_partners(self, index: int):
        return self._partners, int(self.rows[index])

    @property
    def view(self) -> int | None:
        """Of a schedule cache, the view this epoch replays (schedule ``seed``); else None."""
        return self.form.view(self.seed, self.epoch)

    def __getitem__(self, index: int) -> dict:
        """Random access: sample ``index``'s chunks read on their own."""
        cached: dict = {}
        if self.groups:
            try:
                cached = to_tensors(self.store.read(int(self.rows[index]), groups=self.groups, view=self.view))
            except BadSampleError:
                if not self.skip_bad:
                    raise
                cached = {**self.store.schema.placeholder_targets(self.groups), BAD: True}
        return self.item(index, cached)

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """A batch by random access (the DataLoader asks for a batch's indices at once): its
        samples' chunks read together, each array once for the batch
        (:meth:`~kdcache.store.CacheStore.read_rows`), instead of once per sample; the same items as
        ``[self[i] for i in indices]``. A batch with a sample that cannot be read is read sample by
        sample, so the error (or, with ``skip_bad``, the placeholder) is that sample's alone."""
        if not self.groups:
            return [self.item(i, {}) for i in indices]
        try:
            read = self.store.read_rows([int(self.rows[i]) for i in indices], groups=self.groups, view=self.view)
        except BadSampleError:
            return [self[i] for i in indices]
        return [self.item(i, to_tensors(cached)) for i, cached in zip(indices, read)]

    def stream(self, positions: list[int] | None = None, *, batch_size: int | None = None, workers: int = 0,
               buffer_size: int = 256) -> CacheStream:
        """This epoch's items streamed shard by shard (:class:`~kdcache.store.CacheStream`):
        ``positions`` (default all) in a shuffled shard order through a shuffle buffer, split
        between ``workers`` DataLoader workers, each yielding whole batches of ``batch_size``."""
        # a partial, not a lambda: spawned workers (an object store's) receive the stream pickled
        placeholder = partial(self.store.schema.placeholder_targets, self.groups) if self.skip_bad else None
        stream = CacheStream(self.store, self.rows, transform=self.item, groups=self.groups, seed=self.seed,
                             positions=positions, batch_size=batch_size, num_workers=workers,
                             buffer_size=buffer_size, placeholder=placeholder, view=self.view)
        stream.set_epoch(self.epoch)
        return stream

    def item(self, index: int, cached: dict) -> dict:
        """The training item of sample ``index`` from its cached targets (tensors, as read;
        a placeholder marked ``bad`` for a sample whose chunks could not be read)."""
        skipped = bool(cached.pop(BAD, False))
        item = self.form.item(self, index, cached)
        item.pop("geometry", None)
        item.pop("mix", None)  # the mix is in the image, label and (a mixed schedule's) targets
        if skipped:  # no teacher targets for this sample: every KD cell ignored
            for key in list(item):
                if key.startswith("kd/") and key.endswith("ignore"):
                    item[key] = torch.ones_like(item[key])
        if self.skip_bad:  # only then can a sample come without targets (the loss reports the share)
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

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """A batch: each part's samples read together (:meth:`KDPipeline.__getitems__`), in the
        batch's order."""
        by_part: dict[int, list[int]] = {}  # part -> the batch positions of its samples
        for j, part in enumerate((np.searchsorted(self.offsets, indices, side="right") - 1).tolist()):
            by_part.setdefault(part, []).append(j)
        out: list = [None] * len(indices)
        for part, at in by_part.items():
            items = self.parts[part].__getitems__([int(indices[j] - self.offsets[part]) for j in at])
            for j, item in zip(at, items):
                item["index"] = int(indices[j])
                out[j] = item
        return out


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


class CachedBatches(TrainingBatches):
    """A :class:`KDPipeline`'s batches. ``stream``: whole shards in a shuffled order (under
    torchrun each rank takes whole shards; each DataLoader worker a contiguous part of this rank's
    sequence, yielding whole batches, so the steps are a multiple of the workers), else random
    access as supervised training does."""

    def __init__(self, pipeline: KDPipeline, *, stream: bool, shuffle_buffer: int = 256, **kw):
        super().__init__(pipeline, **kw)
        self.stream = stream
        self.shuffle_buffer = shuffle_buffer

    def groups(self) -> np.ndarray:
        """Ranks take whole store shards: each reads its own shard files."""
        return self.pipeline.store.schema.shard_of(self.pipeline.rows)

    def context(self) -> str | None:
        return worker_start_method(self.pipeline.store.path)

    @property
    def steps_per_epoch(self) -> int:
        steps = super().steps_per_epoch
        if not self.stream:
            return steps
        parts = self.stream_workers(steps)
        return steps // parts * parts

    def stream_workers(self, steps: int) -> int:
        """Streaming DataLoader workers (at least one part; no more workers than batches)."""
        return max(1, min(self.workers, steps))

    def loader(self, epoch: int) -> torch.utils.data.DataLoader:
        if not self.stream:
            return super().loader(epoch)
        self.pipeline.set_epoch(epoch)
        parts = self.stream_workers(self.steps_per_epoch)
        share = self.rank_share(epoch)
        if not self.persistent():
            stream = self.pipeline.stream(share, batch_size=self.batch_size, workers=parts,
                                          buffer_size=self.shuffle_buffer)
            return make_loader(stream, self.batch_size, parts if self.workers > 0 else 0,
                               pin_memory=self.pin_memory, context=self.context())
        # the run's one stream, its workers kept: this epoch's share and view set where they read them
        loader = self.kept_loader(
            lambda _: make_loader(self.pipeline.stream(share, batch_size=self.batch_size, workers=parts,
                                                       buffer_size=self.shuffle_buffer),
                                  self.batch_size, parts, pin_memory=self.pin_memory, context=self.context(),
                                  persistent=True), [])
        stream = loader.dataset
        stream.set_epoch(epoch)
        stream.positions, stream.view = share, self.pipeline.view
        return loader


class MixedBatches(TrainingBatches):
    """A :class:`MixedPipeline`'s batches (see :func:`mixed_batches`): an epoch is one pass over
    the labelled samples; under torchrun the ranks take alternate batches, as many each."""

    def __init__(self, pipeline: MixedPipeline, *, share: float, **kw):
        super().__init__(pipeline, **kw)
        self.share = share

    def context(self) -> str | None:
        return worker_start_method(self.pipeline.parts[0].store.path)

    @property
    def steps_per_epoch(self) -> int:
        n_l, _ = batch_split(self.batch_size, self.share)
        labelled = self.pipeline.num_labelled
        steps = labelled // n_l // self.dist.world_size
        if steps == 0:
            raise KDCacheError(f"--batch-size {self.batch_size} with --unlabeled-share {self.share} takes {n_l} "
                               f"labelled samples a batch, more than the {labelled} there are (per process)")
        return steps

    def loader(self, epoch: int) -> torch.utils.data.DataLoader:
        self.pipeline.set_epoch(epoch)
        labelled = self.pipeline.num_labelled
        batches = mixed_batches(labelled, len(self.pipeline) - labelled, self.batch_size, self.share, self.seed,
                                epoch)
        mine = batches[self.dist.rank::self.dist.world_size][:self.steps_per_epoch]
        if self.persistent():
            return self.kept_loader(
                lambda order: make_loader(self.pipeline, None, self.workers, batch_sampler=order,
                                          pin_memory=self.pin_memory, context=self.context(), persistent=True), mine)
        return make_loader(self.pipeline, None, self.workers, batch_sampler=mine, pin_memory=self.pin_memory,
                           context=self.context())

    def seen_counts(self, per_rank: list[list[int]]) -> dict:
        """The labelled (combined index < L) and the unlabelled samples counted apart."""
        L = self.pipeline.num_labelled
        lab = [[i for i in s if i < L] for s in per_rank]
        unl = [[i for i in s if i >= L] for s in per_rank]
        return {**super().seen_counts(lab), "train_unlabeled_seen": sum(map(len, unl)),
                "train_unlabeled_distinct": len(set().union(*map(set, unl)))}


def pool_pipeline(store: CacheStore, labelled: CacheStore, required: list[str], *, preprocess: Preprocess,
                  augment: Augment | None, seed: int, check_content: bool, skip_bad: bool,
                  unlabeled_limit: int | None, resample: str = "nearest") -> KDPipeline:
    """The training items of an unlabelled cache (its own data set, as the store records it),
    refused in one line when it was built by another teacher or for other classes than the
    labelled cache, or lacks the maps the methods read (``required``)."""
    mine, theirs = labelled.schema, store.schema
    if form_of(theirs).for_training(False).reads_views:  # a schedule: replayed whatever the options
        raise KDCacheError(f"--unlabeled-cache {store.path} holds a schedule (--schedule-epochs), which an "
                           "unlabelled cache cannot replay (its images are drawn across epochs); build it without "
                           "--schedule-epochs")
    checks = (("classes", list(mine.class_names), list(theirs.class_names)),
              ("teacher weights (sha256)", mine.teacher.get("weights_sha256"), theirs.teacher.get("weights_sha256")),
              ("ensemble members or combination", mine.identity()["ensemble"], theirs.identity()["ensemble"]),
              ("top-k", mine.k, theirs.k), ("preprocessing", mine.preprocess, theirs.preprocess))
    for what, a, b in checks:
        if a != b:
            raise KDCacheError(f"--unlabeled-cache {store.path} differs from --cache {labelled.path} in its {what}; "
                               "build both caches with the same teacher (and preprocessing)")
    missing = sorted(set(mine.groups_for(required)) - set(theirs.groups_for(required)))
    if missing:
        raise KDCacheError(f"--unlabeled-cache {store.path} lacks {', '.join(missing)}, which the methods read; "
                           "rebuild it with the same --features/--attention as --cache")
    ds = limit(store.dataset(), unlabeled_limit)
    rows = store.join(ds, check_content=check_content)
    # its targets on the labelled cache's grid: one batch, one target size (its images' sizes,
    # hence its store's nominal stride, may differ)
    return KDPipeline(ds, preprocess, augment, seed, store, rows, use_views=False, skip_bad=skip_bad,
                      required=required, strides=mine.strides, resample=resample)


def check_mixing(store: CacheStore, form, online: bool) -> None:
    """Refuse, in one line, a ``--mix`` run whose cache cannot give the teacher's targets on its
    mixed crops: only a schedule built with the same ``--mix`` holds them (or a live teacher
    computes them)."""
    if not online and not getattr(form, "mixing", MixOptions()).enabled:
        raise KDCacheError(f"--mix needs the teacher on each mixed crop, which {store.path} does not hold; build a "
                           "schedule with --schedule-epochs N and the same --mix options (or train with "
                           "--online-teacher cache)")


def student_batches(config, store: CacheStore, train_ds: SegmentationDataset, train_pipe: SegPipeline,
                    preprocess: Preprocess, required: list[str], *, dist: Dist, workers: int,
                    pin_memory: bool) -> tuple[TrainingBatches, list[tuple[CacheStore, np.ndarray]]]:
    """A student's training batches from ``store`` (and ``config.unlabeled_caches``), and the
    (store, rows) of every cache it trains from (what KD methods may look at before training).
    ``config``: the student's configuration (its use_views, skip_bad, check_content, cache_read,
    shuffle_buffer, unlabeled_* fields, seed, batch_size); ``required``: the map groups the
    methods read; ``train_pipe``: the supervised pipeline whose augmentation the items take."""
    c = config
    form = form_of(store.schema)
    form.check_student(store, c, train_pipe.augment)
    rows = store.join(train_ds, check_content=c.check_content)
    mix = train_pipe.mix
    if mix.enabled and required:  # (a CE-only run reads no targets: any cache serves it)
        check_mixing(store, form.for_training(c.use_views), bool(c.online_teacher))
    labelled = KDPipeline(train_ds, preprocess, train_pipe.augment, c.seed, store, rows, use_views=c.use_views,
                          skip_bad=c.skip_bad, required=required, resample=c.target_resample, mix=mix)
    # each pool's augmentation drawn from its own stream (not the labelled sample j's)
    pools = [pool_pipeline(CacheStore(path), store, required, preprocess=preprocess, augment=train_pipe.augment,
                           seed=c.seed + 7919 * (p + 1), check_content=c.check_content, skip_bad=c.skip_bad,
                           unlabeled_limit=c.unlabeled_limit, resample=c.target_resample)
             for p, path in enumerate(c.unlabeled_caches)]
    sources = [(pipe.store, pipe.rows) for pipe in (labelled, *pools)]
    common = dict(batch_size=c.batch_size, seed=c.seed, workers=workers, dist=dist, pin_memory=pin_memory)
    if pools:
        return MixedBatches(MixedPipeline(labelled, pools), share=c.unlabeled_share, **common), sources
    return CachedBatches(labelled, stream=c.cache_read == "stream", shuffle_buffer=c.shuffle_buffer,
                         **common), sources
