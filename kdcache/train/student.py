"""``train-student``: student training from a teacher cache, L_total = L_seg + Σ_m w_m · L_m.

:class:`StudentTrainer` is the supervised :class:`~kdcache.train.trainer.Trainer` with three
changes: its batches carry the cached teacher targets taken through the same sampled geometry
as the image and label (:func:`kdcache.train.student_batches.student_batches`, the one home of that
data), the student taps the modules its methods read, and the loss adds each method's weighted
term. The teacher is never built in cached mode. ``online_teacher`` runs a teacher every step
instead and feeds the same loss code (:mod:`kdcache.teacher.online`; for parity checks and
benchmarks only).

The KD terms compare the student's logits bilinearly resized to the cache's resolution (the
teacher head's stride) with the cached maps; the cross-entropy uses the full-resolution labels
as in supervised training. Resizing the student (not the cache) keeps the cached class ids
intact and makes the KD term cost what the teacher's resolution costs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from kdcache.core import distributed
from kdcache.core.errors import KDCacheError
from kdcache.core.options import opt
from kdcache.core.runs import RunDir
from kdcache.data import DATASETS
from kdcache.data.class_base import is_classification
from kdcache.methods import KDMethod, build_method, check_spec, reads, with_task_defaults
from kdcache.models import SegModel, build_model
from kdcache.pipeline.mixing import MixOptions
from kdcache.pipeline.transforms import Augment, Preprocess
from kdcache.store import CacheStore
from kdcache.store.forms import form_of
from kdcache.teacher.online import OnlineTeacher
from kdcache.train.student_batches import student_batches
from kdcache.train.trainer import TrainConfig, Trainer

#: how train-student reads the cache: whole shards in a shuffled order, or sample by sample
CACHE_READS = ("stream", "random")
TARGET_RESAMPLES = ("nearest", "bilinear")

#: ``--online-teacher cache``: run the teacher (members, combination, TTA) the cache records
ONLINE_FROM_CACHE = "cache"

#: the method a student trains with when none is given, per task: the one the benchmarks chose on
#: val. Segmentation: dist, the method whose defaults gain most over CE on val in both pairs of
#: the full-budget study (benchmarks/results/full-budget-segmentation-cpu.md); classification: kl, ahead
#: of dist on val at their chosen weights (kd-weight-classification-cpu.md)
DEFAULT_METHOD = {"segmentation": "dist", "classification": "kl"}
#: why, in a line: what ``--help`` says of the default (the numbers are in the files it names)
DEFAULT_METHOD_WHY = ("dist for segmentation, kl for classification: the benchmarks' best on val "
                      "(benchmarks/results/full-budget-segmentation-cpu.md, kd-weight-classification-cpu.md; "
                      "kdcache list-methods says which defaults are below CE)")


def default_methods(task: str) -> list[dict]:
    """The method specs of a student given no ``--method``: :data:`DEFAULT_METHOD` of ``task``."""
    return [{"name": DEFAULT_METHOD[task]}]


def task_of(cache: str | None = None, dataset: str | None = None) -> str:
    """'segmentation' or 'classification': the cache's task, else the data set's."""
    if cache is not None:
        return "classification" if CacheStore(cache).schema.classification else "segmentation"
    return "classification" if dataset and is_classification(DATASETS.get(dataset)) else "segmentation"


#: the share of each batch the unlabelled images take by default (--unlabeled-share)
UNLABELED_SHARE = 0.5


@dataclass
class StudentConfig(TrainConfig):
    """A student's run: the training options and the cache's (its options declared here once,
    as :class:`~kdcache.train.trainer.TrainConfig`'s)."""

    model: str = opt("demo_student", "Student architecture.", names=("--student", "--model"), panel="Inputs and outputs")
    dataset: str = opt("synthetic", "Data set (default: the cache's).", cli_default=None, panel="Data")
    train_split: str = "train"  # the cache's split (config_from_store): no option
    out: str = opt("runs/student", "Run folder (default runs/student-<methods>).", resumable=True, cli_default=None, panel="Inputs and outputs")
    cache: str | None = opt(None, "The teacher cache (from build-teacher-cache).", panel="Inputs and outputs")
    #: each {"name": ..., "weight": ..., other options}; "none" is the CE-only baseline
    methods: list = opt(factory=lambda: default_methods("segmentation"), names=("--method",), shape="methods",
                        help="KD method, repeatable: {methods}; options as NAME:key=value,... (e.g. "
                             "dist:weight=0.5,temperature=2). Default: {default_method}. `kdcache list-methods` gives each "
                             "one's defaults per task and where they stood below CE.", panel="Method")
    use_views: bool = opt(False, "Train on the cache's stored views (one drawn per item and epoch).", panel="Method")
    check_content: bool = opt(True, "Re-hash the data set's files against the cache's fingerprints.", panel="Data")
    online_teacher: str | None = opt(None, "Run this teacher architecture every step instead of reading the cache "
                                           "(parity checks only); 'cache': the teacher the --cache records, with its "
                                           "ensemble members and test-time augmentation.", panel="Method")
    teacher_weights: str | None = opt(None, "Weights of --online-teacher.", panel="Method")
    online_topk: int | None = None  # k of the online targets (default: the cache's, else C)
    skip_bad: bool = opt(False, "Train on without the targets of samples whose cached chunks cannot be read "
                                "(counted and reported).", panel="Data")
    #: "stream": whole shards in a shuffled order through a shuffle buffer; "random": per sample
    cache_read: str = opt("stream", "How training reads the cache: stream (whole shards in a shuffled order through "
                                    "a shuffle buffer: one read per shard and array) or random (sample by sample).", panel="Data")
    target_resample: str = opt("nearest", "How a crop takes the cached logits of a scaled or off-grid crop: nearest (each "
                                          "output cell the map cell its centre falls in) or bilinear (the rebuilt logits "
                                          "interpolated at the crop's exact points, then top-k + tail again).", panel="Method")
    shuffle_buffer: int = opt(256, "Samples in each streaming worker's shuffle buffer.", bounds=">= 1", panel="Data")
    #: teacher caches of unlabelled images (same teacher and classes as ``cache``): KD terms only
    unlabeled_caches: list = opt(factory=list, names=("--unlabeled-cache",), shape="repeat",
                                 help="A teacher cache of unlabelled images (same teacher as --cache), repeatable: the "
                                      "KD terms train on them, the cross-entropy on the labelled images only. An "
                                      "epoch is one pass over the labelled images.", panel="Inputs and outputs")
    unlabeled_share: float = opt(UNLABELED_SHARE, "Share of each batch drawn from the --unlabeled-cache images, in (0, 1).",
                                  bounds="(0, 1)", panel="Training")
    unlabeled_limit: int | None = opt(None, "Only the first N images of each --unlabeled-cache.", bounds=">= 1",
                                      panel="Data")

    def validate(self) -> None:
        super().validate()
        if not self.methods:
            raise KDCacheError("give at least one --method (none for the CE-only baseline)")
        for m in self.methods:  # names and options, every number finite and in bounds, before any folder
            check_spec(m)
        if self.cache is None and self.online_teacher is None:
            raise KDCacheError("--cache STORE is required (or --online-teacher M --teacher-weights CKPT)")
        if self.online_teacher == ONLINE_FROM_CACHE:
            if self.cache is None:
                raise KDCacheError(f"--online-teacher {ONLINE_FROM_CACHE} runs the teacher a cache records: give --cache")
        elif self.online_teacher and not self.teacher_weights:
            raise KDCacheError("--online-teacher needs --teacher-weights")
        if self.cache_read not in CACHE_READS:
            raise KDCacheError(f"--cache-read must be one of {', '.join(CACHE_READS)}, got {self.cache_read!r}")
        if self.target_resample not in TARGET_RESAMPLES:
            raise KDCacheError(f"--target-resample must be one of {', '.join(TARGET_RESAMPLES)}, got "
                               f"{self.target_resample!r}")
        if self.unlabeled_caches:  # --unlabeled-share is in (0, 1) (its bounds): each batch takes both kinds of image
            if self.online_teacher:
                raise KDCacheError("--unlabeled-cache trains from cached targets; drop --online-teacher")
            if self.batch_size < 2:  # each batch takes one labelled image at least, and one unlabelled
                raise KDCacheError(f"--unlabeled-cache needs --batch-size 2 or more (a batch holds labelled and "
                                   f"unlabelled images), got {self.batch_size}")
            if self.use_views:
                raise KDCacheError("--unlabeled-cache does not go with --use-views; drop one of them")
            if MixOptions.of(self).enabled:
                raise KDCacheError("--unlabeled-cache does not go with --mix (an unlabelled cache holds no mixed "
                                   "crops); drop one of them")
        else:  # the options of the unlabelled images, without any: they would be ignored
            given = [name for name, on in (("--unlabeled-limit", self.unlabeled_limit is not None),
                                           ("--unlabeled-share", self.unlabeled_share != UNLABELED_SHARE)) if on]
            if given:
                raise KDCacheError(f"{' and '.join(given)} set{'s' if len(given) == 1 else ''} how the unlabelled "
                                   "images are drawn; add --unlabeled-cache STORE (or drop "
                                   f"{'it' if len(given) == 1 else 'them'})")


class StudentTrainer(Trainer):
    kind = "distill"
    command = "train-student"

    def __init__(self, config: StudentConfig, **kw):
        # each method's defaults for the data set's task and the run's mixing (kl and dist: their weights, and
        # T = 4 for classification, T = 1 with mixup), written into a new run's specs, so that config.json
        # records them. A resumed run trains with its recorded specs (one from before a default changed keeps what it trained with); the
        # specs given with it count as its own when they are, or become them with the defaults filled in
        task = "classification" if is_classification(DATASETS.get(config.dataset)) else "segmentation"
        mix = MixOptions.of(config)
        resolved = with_task_defaults(config.methods, task, mix.kind if mix.enabled else None)
        run = RunDir(config.out)
        if not kw.get("resume") or (run.config_path.exists() and run.read_config().get("methods") == resolved):
            config = dataclasses.replace(config, methods=resolved)
        super().__init__(config, **kw)
        c = self.config
        self.methods: list[KDMethod] = [build_method(m["name"], **{k: v for k, v in m.items() if k != "name"})
                                        for m in c.methods]
        self.store = CacheStore(c.cache) if c.cache else None
        self.cache_sources: list = []  # (store, rows) of every cache trained from, for the methods' prepare()
        self.teacher: OnlineTeacher | None = None
        if self.store is not None:
            self.store.check_teacher_unchanged()
            pre = Preprocess.from_dict(self.store.schema.preprocess)
            if c.resize is not None and tuple(c.resize) != tuple(pre.resize or ()):
                raise KDCacheError(f"--resize {c.resize} differs from the cache's preprocessing (resize "
                                   f"{pre.resize}); drop --resize: students train on what the teacher saw")
            self.preprocess = pre

    # -- data: images with their cached targets (kdcache.train.student_batches) ----------------------------
    def build_batches(self, train_ds, val_ds):
        batches, val_pipe = super().build_batches(train_ds, val_ds)
        if self.store is None:  # a live teacher alone: the supervised batches
            return batches, val_pipe
        required = [r for m in self.methods for r in reads(m, self.store.schema)]
        batches, self.cache_sources = student_batches(self.config, self.store, train_ds, batches.pipeline,
                                                      self.preprocess, required, dist=self.dist,
                                                      workers=self.workers, pin_memory=self.device.type == "cuda")
        return batches, val_pipe

    def describe_run(self, model: SegModel, train_ds, val_ds, augment: Augment | None) -> dict:
        """The run's ``config.json``, plus ``cache_targets``: what the student's targets are
        (``logits`` through each crop, a pyramid's nearest ``levels``, stored ``views``, a replayed
        ``schedule``, a classifier's pooled
        ``label_map``)."""
        out = super().describe_run(model, train_ds, val_ds, augment)
        if self.store is not None:
            schema = self.store.schema
            # teacher-aware class weights: the evidence each method weighed its classes by
            evidence = {m.name: m.aware.evidence for m in getattr(self, "methods", [])
                        if getattr(getattr(m, "aware", None), "evidence", None)}
            if evidence:
                out["class_weights"] = evidence
            out["cache_targets"] = form_of(schema).for_training(self.config.use_views).targets_name
        return out

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
            teacher_taps = sorted({r.split("/", 1)[1] for m in self.methods for r in reads(m, None) if "/" in r})
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
            m.prepare(self.cache_sources)
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
        ce = self.label_loss(out.logits, batch)
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
    a torchrun launch destroyed at the end, as :func:`kdcache.train.trainer.train` does)."""
    try:
        return StudentTrainer(config, resume=resume, overwrite=overwrite, show_progress=show_progress,
                              explicit=explicit).fit()
    finally:
        distributed.shutdown()


def config_from_store(store_path: str, **overrides) -> StudentConfig:
    """A StudentConfig whose data set, split and options default to the cache's."""
    schema = CacheStore(store_path).schema
    ds = schema.dataset
    base = {"dataset": ds["name"], "data_root": ds.get("root"), "dataset_options": ds.get("options") or {},
            "train_split": ds["split"], "cache": store_path,
            # no method given: the task's default (the cache's task)
            "methods": default_methods("classification" if schema.classification else "segmentation")}
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
        given = {k: v for k, v in fields.items() if v is not None}
        return StudentConfig(**{"methods": default_methods(task_of(dataset=given.get("dataset"))), **given})
    raise KDCacheError("--cache STORE is required (build one with build-teacher-cache)")
