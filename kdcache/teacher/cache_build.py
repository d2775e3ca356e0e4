"""``build-teacher-cache``: one teacher pass over a data set split into a teacher cache.

The teacher runs in the main thread and hands its float32 outputs to the store's writer
(:mod:`kdcache.store.writer`), whose thread encodes and writes whole shards behind a bounded
queue, so the teacher never waits on compression or disk. Work is split by whole shards: under
``torchrun`` rank r owns shards r, r + world, …; rank 0 alone creates the store. A rerun of the
same command resumes: shards whose samples are all done are skipped, every other shard is
computed and written again. How the store is laid out is the store package's business; this
module only runs the teacher and says what it ran on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from kdcache.core import distributed
from kdcache.core.errors import KDCacheError
from kdcache.core.options import SEED_BOUNDS, TEMPERATURE_BOUNDS, WORKER_BOUNDS, check_declared, opt
from kdcache.core.progress import console, progress_bar
from kdcache.core.runs import resolve_device
from kdcache.data import build_dataset
from kdcache.data.class_base import is_classification
from kdcache.data.splits import limit
from kdcache.models.loading import open_weights
from kdcache.pipeline.loaders import default_workers, make_loader
from kdcache.pipeline.mixing import mix_alpha_option, mix_option, mix_prob_option
from kdcache.pipeline.signals import signal
from kdcache.pipeline.transforms import (
    AREA_BOUNDS,
    SCALE_BOUNDS,
    Preprocess,
    crop_area_option,
    crop_option,
    flip_option,
    label_tensor,
    scale_option,
)
from kdcache.store.forms import FORMS, MAX_VIEWS, BuildContext, CacheForm, form_of, requested_form
from kdcache.store.location import as_location
from kdcache.store.schema import CODECS, DEFAULT_CODEC, MAX_SHARD_SAMPLES, CacheSchema
from kdcache.store.writer import (
    ShardWriter,
    check_out,
    done_flags,
    encode_batch,
    open_for_writing,
    pending_shards,
    prepare_store,
)
from kdcache.teacher.ensemble import (
    DEFAULT_COMBINE,
    GRID_STRIDE_BOUNDS,
    EnsemblePlan,
    TeacherEnsemble,
    open_members,
    sample_quality,
)

#: logits kept per position unless --topk says (fewer classes: all of them, a dense cache)
DEFAULT_TOPK = 4


@dataclass
class CacheBuildConfig:
    """One teacher pass over a split into a store (its fields declared as build-teacher-cache's
    options, once: see :mod:`kdcache.core.options`)."""

    weights: str | list[str] = opt(factory=list, shape="repeat",
                                   help="Teacher weights: a run folder (uses best.pt), a kdcache checkpoint or a state "
                                        "dict (required). Repeat it for an ensemble: the members' outputs are "
                                        "combined per pixel (see --combine).", panel="Inputs and outputs")  # one teacher, or an ensemble's members
    out: str = opt("", "The store to write, e.g. caches/teacher-train.zarr, or an fsspec URL (required).",
                   cli_default=None, panel="Inputs and outputs")
    teacher: str | list[str] | None = opt(None, "Teacher architecture (default: the one named in the checkpoint); "
                                                "once for every member, or once per --weights.", shape="repeat", panel="Inputs and outputs")
    dataset: str | None = opt(None, "Data set: {datasets} (default: the teacher run's, with its --data-root and "
                                    "options; synthetic for a teacher file that names none).", panel="Data")
    data_root: str | None = opt(None, "Root folder of the data set (not for synthetic).", panel="Data")
    dataset_options: dict = opt(factory=dict, help="KEY=VALUE passed to the data set, e.g. size=200 (synthetic "
                                                   "split size).", names=("--dataset-option",), short="-o",
                                shape="key_values", panel="Data")
    split: str = opt("train", "Split to run the teacher over.", panel="Data")
    topk: int | None = opt(None, "Logits kept per position (default {default_topk}, or every class when there are "
                                 "fewer; k = number of classes: a dense cache).", bounds=">= 1", panel="What to store")
    features: tuple[str, ...] = opt((), "Teacher modules whose outputs to store, NAME[,NAME] (e.g. stage3).",
                                    shape="names", panel="What to store")
    attention: bool = opt(False, "Also store attention-transfer maps of the --features taps.", panel="What to store")
    attention_only: bool = opt(False, "Store the attention maps of the --features taps instead of the features.", panel="What to store")
    signals: tuple[str, ...] = opt((), "The teacher signals to store of the --features taps, KIND[,KIND]: features, "
                                       "attention or another registered kind (default: features; the same as "
                                       "--attention / --attention-only).", shape="names", panel="What to store")
    flip_average: bool = opt(False, "Store the mean of the teacher on the image and on its mirror (flips become "
                                    "exact); with --tta-scales, at every scale.", panel="Teacher")
    tta_scales: tuple[float, ...] = opt((1.0,), "Test-time augmentation: run the teacher at these input scales, e.g. "
                                                "0.5,0.75,1,1.25,1.5; each output is resized to the cache's grid and "
                                                "combined.", shape="numbers", bounds=SCALE_BOUNDS, panel="Teacher")
    combine: str = opt(DEFAULT_COMBINE, "How members, scales and flips are combined: prob (mean of probabilities at "
                                        "--combine-temperature) or logit (mean of logits).", panel="Teacher")
    combine_temperature: float = opt(1.0, "Temperature of --combine prob (the stored logits are T·log of the mean "
                                          "probability).", bounds=TEMPERATURE_BOUNDS, panel="Teacher")
    grid_stride: float | None = opt(None, "Stride of an ensemble's common grid in input pixels (default: the finest "
                                          "member's map).", bounds=GRID_STRIDE_BOUNDS, panel="Teacher")
    features_from: str | None = opt(None, "The ensemble member whose --features are stored: its name (run folder or "
                                          "file name) or position (default: the first).", panel="Teacher")
    form: str | None = opt(None, "The form of the store by name: plain, views, schedule, pyramid, label_map or a "
                                 "registered one (default: the one the options below ask for).", panel="What to store")
    label_map: bool = opt(False, "Classification: store the teacher's class map before global pooling (ReLabel); "
                                 "students pool it over each random crop.", panel="What to store")
    views: int = opt(0, "Also store N random scale/crop views per image with their parameters (FKD-style; "
                        "classification: random-resized crops, see --view-area).", bounds=f"[0, {MAX_VIEWS}]",
                   panel="What to store")
    view_scale: tuple[float, float] = opt((0.5, 2.0), "Scale range 'lo,hi' of the stored views.", shape="pair", bounds=SCALE_BOUNDS, panel="What to store")
    view_area: tuple[float, float] = opt((0.25, 1.0), "Classification views: the random-resized crops' share of the "
                                                      "image area 'lo,hi'.", shape="pair", bounds=AREA_BOUNDS, panel="What to store")
    view_crop: tuple[int, int] | None = opt(None, "Crop HxW of the stored views (default: the image size).",
                                            shape="size", panel="What to store")
    view_seed: int = opt(0, "Seed of the stored views.", bounds=SEED_BOUNDS, panel="What to store")
    schedule_epochs: int = opt(0, "Store the teacher on every crop train-student draws in each of N epochs (its "
                                  "--crop-size, --scale, --crop-area and --flip, given here as for the student): the "
                                  "student replays them, so its targets are the teacher's on its own pixels.", bounds=f"[0, {MAX_VIEWS}]",
                               panel="What to store")
    schedules: int = opt(1, "With --schedule-epochs: R independent schedules; a student with --seed s replays "
                            "schedule s.", bounds=f"[1, {MAX_VIEWS}]", panel="What to store")
    first_schedule: int = opt(0, "With --schedule-epochs: the first schedule stored, so the store holds schedules "
                                 "S..S+R-1 (the seeds a machine trains; each schedule is drawn the same whatever "
                                 "store holds it).", bounds=SEED_BOUNDS, panel="What to store")
    store_scales: tuple[float, ...] = opt((), "Segmentation: also store the teacher's logits on the whole image at "
                                             "these other scales, e.g. 0.75,1.25 (a pyramid); a training crop takes "
                                             "the level nearest its own scale.", shape="numbers", bounds=SCALE_BOUNDS, panel="What to store")
    store_flips: bool = opt(False, "Segmentation: also store the teacher's logits on the mirrored image (at every "
                                   "--store-scales scale too); a flipped crop takes them instead of the mirrored map.", panel="What to store")
    crop: tuple[int, int] | None = crop_option()
    scale: tuple[float, float] = scale_option()
    crop_area: tuple[float, float] = crop_area_option()
    hflip: bool = flip_option()
    mix: str = mix_option()
    mix_alpha: float = mix_alpha_option()
    mix_prob: float = mix_prob_option()
    batch_size: int = opt(8, "Images per teacher forward.", bounds=">= 1", panel="Hardware")
    device: str = opt("auto", "auto (CUDA if available), cpu, cuda, cuda:1 ...", panel="Hardware")
    workers: int | None = opt(None, "DataLoader worker processes (default: 0 on CPU, up to 8 on CUDA).",
                              bounds=WORKER_BOUNDS, panel="Hardware")
    limit: int | None = opt(None, "Use only the first N samples of each split (quick runs).", bounds=">= 1", panel="Data")
    samples_per_shard: int | None = opt(None, "Samples per shard, the unit of writing (default: shards of about "
                                              "{shard_mb} MB).", bounds=f"[1, {MAX_SHARD_SAMPLES}]", panel="What to store")
    codec: str = opt(DEFAULT_CODEC, "Chunk compression: {codecs} (blosc-lz4 decodes 2x faster than blosc-zstd and "
                                    "stores 25% more).", panel="What to store")
    amp: bool = opt(False, "Run the teacher under fp16 autocast (CUDA only).", panel="Hardware")
    queue_size: int = 8  # batches waiting for the writer

    @property
    def levels(self) -> list[tuple[float, bool]]:
        """The (scale, flip) of each stored pyramid level, in store order: the other scales, then
        (with --store-flips) the mirror at scale 1 and at each other scale."""
        scales = [float(s) for s in self.store_scales]
        return [(s, False) for s in scales] + ([(s, True) for s in [1.0, *scales]] if self.store_flips else [])

    @property
    def weight_files(self) -> list[str]:
        return [self.weights] if isinstance(self.weights, (str, Path)) else [str(w) for w in self.weights]

    @property
    def teachers(self) -> list[str]:
        if self.teacher is None:
            return []
        return [self.teacher] if isinstance(self.teacher, str) else list(self.teacher)

    @property
    def stored_signals(self) -> dict[str, tuple[str, ...]]:
        """kind -> the taps stored as that teacher signal (:mod:`kdcache.pipeline.signals`)."""
        taps = tuple(self.features)
        kinds = (self.signals or (("attention",) if self.attention_only
                                  else ("features", "attention") if self.attention else ("features",)))
        return {kind: taps for kind in kinds} if taps else {}

    @property
    def plan(self) -> EnsemblePlan:
        return EnsemblePlan(combine=self.combine, temperature=float(self.combine_temperature),
                            scales=tuple(float(s) for s in self.tta_scales), flip=self.flip_average,
                            grid_stride=self.grid_stride)

    def validate(self) -> None:
        check_declared(self)  # every number finite and within its declared bounds
        if not self.weight_files:
            raise KDCacheError("build-teacher-cache needs --weights (once per ensemble member)")
        if not self.out:
            raise KDCacheError("build-teacher-cache needs --out (the store to write)")
        self.plan.validate()
        lo, hi = self.view_scale  # each within its bounds (check_declared)
        if not lo <= hi:
            raise KDCacheError(f"--view-scale must be 'lo,hi' with 0 < lo <= hi, got {self.view_scale}")
        lo, hi = self.view_area
        if not lo <= hi:
            raise KDCacheError(f"--view-area must be 'lo,hi' with 0 < lo <= hi <= 1, got {self.view_area}")
        for _, form in FORMS.items():  # each form's own options
            form.check_options(self)
        requested_form(self)  # --form NAME: a known form, and no other form's options
        if (self.attention or self.attention_only) and not self.features:
            raise KDCacheError("--attention needs --features NAME[,NAME]: the taps whose attention maps to store")
        if self.signals and (self.attention or self.attention_only):
            raise KDCacheError("--signals names every signal to store; give it alone, without --attention or "
                               "--attention-only (e.g. --signals features,attention)")
        if self.signals and not self.features:
            raise KDCacheError("--signals needs --features NAME[,NAME]: the taps whose signals to store")
        for kind in self.signals:
            signal(kind)  # an unknown kind: one line naming the known ones
        if self.codec not in CODECS:
            raise KDCacheError(f"--codec must be one of {', '.join(CODECS)}, got {self.codec}")


class TeacherInputs(torch.utils.data.Dataset):
    """Item ``i`` of the data set as the teacher sees it: the preprocessed image, its label map
    (None for an unlabelled split; for the teacher's quality) and, with views, its ``V`` crops
    (each a :class:`Geometry` drawn from (view seed, i), so every process and every rerun draws
    the same ones) with their packed geometries."""

    def __init__(self, dataset, preprocess: Preprocess, form: CacheForm | None = None, labels: bool = False):
        self.dataset, self.preprocess, self.form = dataset, preprocess, form
        self.labels = labels and getattr(dataset, "labelled", True)
        self.classification = is_classification(dataset)

    def __len__(self) -> int:
        return len(self.dataset)

    def image(self, i: int) -> torch.Tensor:
        """Sample ``i``'s image preprocessed as the teacher sees it (a form's other images: a mixed
        schedule's partners)."""
        return self.preprocess.image_to_tensor(self.dataset.load(i)[0])

    def __getitem__(self, i: int) -> dict:
        image, mask = self.dataset.load(i)
        x = self.preprocess.image_to_tensor(image)
        # uint8 as the mask is (int64 would be 8x the memory of a loader's queue of large masks);
        # a class (1 x 1) stays int64: ids above 255
        label = None
        if self.labels:
            label = label_tensor(self.dataset, self.preprocess, mask)
            if not self.classification:
                label = label.to(torch.uint8)
        item = {"index": i, "image": x, "label": label}
        if self.form is not None:  # the form's views: their geometries (and crops)
            self.form.teacher_input(item, x, i)
        return item


def _sizes(dataset, preprocess: Preprocess) -> list[tuple[int, int]]:
    if preprocess.resize:
        return [tuple(preprocess.resize)] * len(dataset)
    return [tuple(dataset.image_size(i)) for i in range(len(dataset))]


class BuildInterrupted(KeyboardInterrupt):
    """Ctrl-C during a build, with what the store kept: ``done`` of ``total`` samples (a shard of
    ``per_shard`` samples is kept once all of it is written)."""

    def __init__(self, out: str, done: int, total: int, per_shard: int):
        super().__init__(out)
        self.out, self.done, self.total, self.per_shard = out, done, total, per_shard

    def kept(self) -> str:
        """What the store kept, as the command line says it."""
        if self.done == 0:
            return (f"no sample of {self.out} was finished (a shard of {self.per_shard} samples is kept once all of it "
                    "is written), so nothing is kept; rerun the same command to build it")
        return (f"{self.done} of {self.total} samples of {self.out} are finished and kept (whole shards of "
                f"{self.per_shard}); rerun the same command to resume")


def build_teacher_cache(config: CacheBuildConfig, *, overwrite: bool = False, show_progress: bool = True) -> dict:
    """Build (or resume) the store ``config.out``; returns a summary dict."""
    config.validate()
    d = distributed.init_from_env(resolve_device(config.device))
    device = distributed.local_device(resolve_device(config.device), d)
    try:
        return _build(config, d, device, overwrite=overwrite, show_progress=show_progress and d.is_main)
    finally:
        distributed.shutdown()


def with_teacher_data(config: CacheBuildConfig, *, show: bool = False) -> CacheBuildConfig:
    """``config`` with its data set filled in when ``--dataset`` was not given: the (first) teacher
    run's data set, with its data root and options where none were given, as a student defaults
    to its cache's; synthetic for a teacher file that records no data set."""
    if config.dataset is not None:
        return config
    run = open_weights(config.weight_files[0]).config
    name = run.get("dataset")
    if not name:
        return replace(config, dataset="synthetic")
    root = config.data_root or run.get("data_root")
    options = config.dataset_options or dict(run.get("dataset_options") or {})
    if show and name != "synthetic":
        console.print(f"data set: {name}{f' at {root}' if root else ''} (the teacher run's; --dataset to choose "
                      "another)")
    return replace(config, dataset=name, data_root=root, dataset_options=options)


def _build(config: CacheBuildConfig, d: distributed.Dist, device: torch.device, *, overwrite: bool,
           show_progress: bool) -> dict:
    out = as_location(config.out)
    if d.is_main:
        check_out(out)  # a folder of anyone else's is refused before the teacher runs
    config = with_teacher_data(config, show=show_progress)
    ds = limit(build_dataset(config.dataset, config.split, config.data_root, **config.dataset_options), config.limit)
    if len(ds) == 0:
        raise KDCacheError(f"split '{config.split}' of {config.dataset} is empty")
    files = config.weight_files
    if ds.num_classes == 0:  # a folder of images that lists no classes: the teacher's
        first = open_weights(files[0])
        names = first.config.get("class_names")
        if not names:
            raise KDCacheError(f"{config.dataset} lists no class names and the teacher {first.checkpoint} records "
                               "none; give -o class_names_file=FILE (one class name per line)")
        ds = ds.with_class_names(names)
    C = ds.num_classes
    classification = is_classification(ds)
    if config.label_map and not classification:
        raise KDCacheError(f"--label-map is for classification data sets; {config.dataset} is a segmentation data set")
    if config.topk is not None and config.topk > C:
        raise KDCacheError(f"--topk {config.topk} is more than the {C} classes of {config.dataset}; use --topk {C} for a dense cache")
    k = min(DEFAULT_TOPK, C) if config.topk is None else config.topk
    taps = tuple(config.features)
    members, fi = open_members(files, config.teachers, num_classes=C, class_names=ds.class_names, taps=taps,
                               features_from=config.features_from, device=device,
                               task="classification" if classification else "segmentation")
    preprocess = members[0].preprocess
    for m in members:
        if m.model.task is None:  # a package.module:callable: the data set's task
            m.model.task = "classification" if classification else "segmentation"
    teacher = TeacherEnsemble(members, config.plan, preprocess, features_index=fi,
                              amp=config.amp and device.type == "cuda", class_map=requested_form(config).class_map)

    # what the teacher gives, and so what the store will hold ------------------------------------
    sizes = _sizes(ds, preprocess)
    max_size = (max(s[0] for s in sizes), max(s[1] for s in sizes))
    map_size, feat_shapes = teacher.probe(max_size, device)
    form = requested_form(config)
    views = form.plan(BuildContext(config, teacher, sizes, classification, device,
                                   lambda: preprocess.image_to_tensor(ds.load(0)[0]).shape[-2:]))
    with progress_bar("fingerprint data", total=len(ds), enabled=show_progress, unit="sample") as bar:
        hashes = []
        for i in range(len(ds)):
            hashes.append(ds.content_hash(i))
            bar.advance(1)
    fm = teacher.features_member.describe()
    schema = CacheSchema.new(
        class_names=ds.class_names, k=k, input_size=max_size, map_size=map_size,
        feature_shapes=feat_shapes, signals=config.stored_signals, views=views,
        teacher={key: fm[key] for key in ("model", "weights", "weights_sha256", "model_options", "params")},
        ensemble=teacher.meta(), quality_rows=teacher.row_names(),
        dataset={"name": config.dataset, "split": config.split, "options": config.dataset_options,
                 "limit": config.limit, "root": config.data_root},
        ids=ds.ids, hashes=hashes, preprocess=preprocess.to_dict(), flip_average=config.flip_average,
        codec=config.codec, amp=config.amp and device.type == "cuda", samples_per_shard=config.samples_per_shard,
        classification={"targets": "label_map" if form.class_map else "logits"} if classification else None,
        form=form.name,
    )

    # create, or check the store to resume (rank 0 alone writes) ---------------------------------
    resumed, error = False, None
    if d.is_main:
        try:
            resumed = prepare_store(out, schema, ds.ids, hashes, overwrite=overwrite)
        except KDCacheError as exc:
            error = exc
    if not distributed.all_ok(error is None):
        if error is not None:
            raise error
        raise KDCacheError("rank 0 could not prepare the store (see its message)")
    group, schema = open_for_writing(out, schema)

    todo = pending_shards(group, schema, d.rank, d.world_size, out)
    summary = {"out": str(out), "num_samples": len(ds), "already_done": int(done_flags(group, out).sum()),
               "resumed": resumed, "shards_total": schema.num_shards, "shards_todo_this_rank": len(todo),
               "rank": d.rank, "world_size": d.world_size}
    if todo:
        t0 = time.perf_counter()
        try:
            writer = _run_teacher(teacher, ds, config, OpenStore(out, group, schema), todo, device=device,
                                  show_progress=show_progress)
        except KeyboardInterrupt:  # what the store kept: the samples of its finished shards
            raise BuildInterrupted(str(out), int(done_flags(group, out).sum()), len(ds),
                                   schema.samples_per_shard) from None
        summary.update({"samples_written": writer.samples_written, "bytes_written": writer.bytes_written,
                        "seconds": time.perf_counter() - t0})
    distributed.barrier()
    summary["done"] = int(done_flags(group, out).sum())
    return summary


@dataclass(frozen=True)
class OpenStore:
    """The store a build writes: where (``out``), its zarr ``group`` open for writing, its schema."""

    out: object
    group: object
    schema: CacheSchema


def _run_teacher(teacher: TeacherEnsemble, ds, config: CacheBuildConfig, store: OpenStore, todo: list[int], *,
                 device: torch.device, show_progress: bool) -> ShardWriter:
    """The teacher over the samples of the shards ``todo`` of ``store``, each batch encoded and
    handed to a :class:`ShardWriter` (returned once closed)."""
    out, group, schema = store.out, store.group, store.schema
    B = config.batch_size
    # batches never straddle shards: a resumed build runs the teacher on the same batches
    batches = [list(range(b, min(b + B, stop))) for j in todo for start, stop in [schema.shard_rows(j)]
               for b in range(start, stop, B)]
    form = form_of(schema)
    inputs = TeacherInputs(ds, teacher.base, form, labels=True)
    form.source = inputs
    workers = default_workers(device) if config.workers is None else config.workers
    loader = make_loader(inputs, None, workers, batch_sampler=batches, collate_fn=list, pin_memory=device.type == "cuda")
    writer = ShardWriter(group, schema, out, config.queue_size * B)
    ids = ds.ids
    try:
        with progress_bar("build teacher cache", total=sum(map(len, batches)), enabled=show_progress, unit="sample") as bar:
            for items in loader:
                for same in _same_size_groups(items):
                    rs = [it["index"] for it in same]
                    x = torch.stack([it["image"] for it in same]).to(device, non_blocking=True)
                    out = teacher(x, rows=True)
                    views = form.teacher_views(teacher, x, same, B)
                    samples = encode_batch(schema, out.logits, out.features, [ids[r] for r in rs],
                                           tuple(x.shape[-2:]), views)
                    quality = sample_quality(form.quality_rows(out.rows), [it["label"] for it in same], schema.num_classes,
                                             ds.ignore_index)
                    for r, sample, q in zip(rs, samples, quality):
                        writer.put(r, {**sample, **q})
                    bar.advance(len(rs), MB_written=round(writer.bytes_written / 1e6, 2))
    except BaseException:
        writer.abort()  # write what is complete; the unfinished shard stays not done
        raise
    writer.close()
    return writer


def _same_size_groups(items: list[dict]) -> list[list[dict]]:
    """Consecutive items with images of one size, batched together (others run apart)."""
    groups: list[list[dict]] = []
    for it in items:
        if groups and groups[-1][0]["image"].shape == it["image"].shape:
            groups[-1].append(it)
        else:
            groups.append([it])
    return groups
