"""Supervised training (cross-entropy): teachers, and the no-KD student baseline.

:class:`Trainer` owns the loop — data, optimiser, schedule, mixed precision, validation,
checkpoints, resume, the run folder. The loss is one method, :meth:`Trainer.compute_loss`, so
that distillation trainers subclass it and change only that.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from kdcache import __version__
from kdcache.core import distributed
from kdcache.core.checkpoint import (
    load_weights,
    non_finite_parameters,
    read_checkpoint,
    save_checkpoint,
)
from kdcache.core.errors import KDCacheError
from kdcache.core.options import (
    SEED_BOUNDS,
    WORKER_BOUNDS,
    check_declared,
    declared,
    opt,
    resumable,
)
from kdcache.core.progress import console, progress_bar
from kdcache.core.runs import CURVES, RunDir, device_name, resolve_device, write_json
from kdcache.data.base import IGNORE_INDEX, SegmentationDataset
from kdcache.data.class_base import is_classification
from kdcache.data.splits import train_val_sets
from kdcache.models import SegModel, build_model, count_parameters
from kdcache.models.backbone_weights import load_backbone, pretrained_backbone_file
from kdcache.models.loading import load_weights_into, open_weights
from kdcache.pipeline.loaders import default_workers, make_loader
from kdcache.pipeline.mixing import (
    MixOptions,
    mix_alpha_option,
    mix_option,
    mix_prob_option,
    mixed_cross_entropy,
)
from kdcache.pipeline.transforms import (
    Augment,
    Preprocess,
    SegPipeline,
    crop_area_option,
    crop_option,
    flip_option,
    scale_option,
    training_augment,
)
from kdcache.report.evaluation import evaluate_model
from kdcache.report.figures import save_training_curves
from kdcache.train.batches import TrainingBatches
from kdcache.train.loggers import (
    VAL_EXAMPLES,
    RunLogger,
    open_loggers,
    prediction_panel,
    require_extras,
)

#: steps between reads of the loss terms on a GPU (one host synchronisation each time)
LOSS_READ_EVERY = 25


def non_finite_loss(value: float, epoch: int, step: int) -> KDCacheError:
    return KDCacheError(f"loss became {value} at epoch {epoch + 1}, step {step + 1}; lower --lr, --weight-decay "
                        "or a KD weight (--kd-weight, a method's weight), or check the data for corrupt labels")


def check_finite_weights(model: torch.nn.Module, epoch: int) -> None:
    """Refuse to keep a model whose weights an epoch's steps made inf or NaN (the last step's update is
    checked by no loss): such a checkpoint would evaluate to a number without saying so."""
    bad = non_finite_parameters(model)
    if bad:
        raise KDCacheError(f"the weights became inf or NaN in epoch {epoch + 1} ({len(bad)} tensors, e.g. {bad[0]}); "
                           "lower --lr or --weight-decay")


class LossTerms:
    """An epoch's loss terms, kept on the device and read back every ``every`` steps in one transfer.

    A non-finite loss still names its step (the first one of the block that has it); on a GPU the
    run stops at most ``every`` steps later, before the epoch's checkpoint is written."""

    def __init__(self, epoch: int, every: int):
        self.epoch, self.every = epoch, every
        self.sums: dict[str, float] = {}
        self.read_steps = 0
        self.pending: list[tuple[int, list[str], torch.Tensor]] = []

    def add(self, step: int, names: list[str], values: torch.Tensor) -> None:
        self.pending.append((step, names, values))
        if len(self.pending) >= self.every:
            self.read()

    def read(self) -> None:
        if not self.pending:
            return
        rows = torch.stack([v for _, _, v in self.pending]).tolist()  # the one synchronisation
        for (step, names, _), row in zip(self.pending, rows):
            if not math.isfinite(row[0]):
                raise non_finite_loss(row[0], self.epoch, step)
            for name, value in zip(names, row):
                self.sums[name] = self.sums.get(name, 0.0) + value
        self.read_steps += len(rows)
        self.pending = []

    def mean_loss(self) -> float:
        """The mean loss over the steps read so far (``read_steps`` > 0)."""
        return self.sums["loss"] / self.read_steps


@dataclass

class TrainConfig:
    """Everything a training run depends on; written to ``config.json``. A field declared with
    :func:`~kdcache.core.options.opt` is also a command-line option of ``train-teacher`` and
    ``train-student`` (its help, names and reading declared here, once).

    The defaults are tuned for the built-in models on the built-in synthetic data set on a
    2-core CPU; for torchvision models on real data, pass your own (e.g. SGD, lr 0.01).
    """

    model: str = opt("demo_teacher", "Registry name (demo_teacher, demo_student, deeplabv3_resnet50, ...; see "
                                      "list-models) or package.module:callable.", panel="Inputs and outputs")
    dataset: str = opt("synthetic", "Data set: {datasets}.", panel="Data")
    data_root: str | None = opt(None, "Root folder of the data set (not for synthetic).", panel="Data")
    dataset_options: dict = opt(factory=dict, help="KEY=VALUE passed to the data set, e.g. size=200 (synthetic "
                                                   "split size).", names=("--dataset-option",), short="-o",
                                shape="key_values", panel="Data")
    model_options: dict = opt(factory=dict, help="KEY=VALUE passed to the model builder, e.g. encoder_name=resnet18 "
                                                 "(smp) or head=mmseg (SegFormer).", names=("--model-option",),
                              short="-m", shape="key_values", panel="Inputs and outputs")
    train_split: str = opt("train", "Split to train on.", panel="Data")
    val_split: str = opt("val", "Split to validate on (ignored with --folds).", panel="Data")
    folds: int | None = opt(None, "K-fold cross-validation over the training split.", bounds=">= 2", panel="Data")
    fold: int = opt(0, "Which fold (0-based) is held out for validation.", bounds=">= 0", panel="Data")
    limit: int | None = opt(None, "Use only the first N samples of each split (quick runs).", bounds=">= 1", panel="Data")
    epochs: int = opt(24, "Training epochs.", bounds=">= 1", resumable=True, panel="Training")
    batch_size: int = opt(8, "Images per step.", bounds=">= 1", panel="Training")
    optimizer: str = opt("adamw", "sgd (momentum {momentum:g}) or adamw.", panel="Training")
    lr: float = opt(2e-3, "Peak learning rate.", bounds="(0, 1000]", panel="Training")
    momentum: float = 0.9
    weight_decay: float = opt(1e-4, "Weight decay.", bounds="[0, 1000]", panel="Training")
    schedule: str = opt("poly", "poly (power {poly_power:g}), cosine or constant, per iteration.", panel="Training")
    poly_power: float = 0.9
    warmup_iters: int = opt(0, "Linear warm-up iterations.", bounds=">= 0", panel="Training")
    class_weights: bool = opt(False, "Median-frequency class weights from the training labels.", panel="Training")
    resize: tuple[int, int] | None = opt(None, "Resize every image/mask to HxW first (e.g. 256x256); a student "
                                               "takes its cache's.", shape="size", panel="Data")
    crop: tuple[int, int] | None = crop_option()
    scale: tuple[float, float] = scale_option()
    #: classification: the random-resized crop's share of the image area (lo, hi)
    crop_area: tuple[float, float] = crop_area_option()
    hflip: bool = flip_option()
    mix: str = mix_option()
    mix_alpha: float = mix_alpha_option()
    mix_prob: float = mix_prob_option()
    amp: bool = opt(True, "fp16 mixed precision (CUDA only).", panel="Hardware")
    device: str = opt("auto", "auto (CUDA if available), cpu, cuda, cuda:1 ...", resumable=True, panel="Hardware")
    workers: int | None = opt(None, "DataLoader worker processes (default: 0 on CPU, up to 8 on CUDA).",
                              bounds=WORKER_BOUNDS, resumable=True, panel="Hardware")
    seed: int = opt(0, "Seed for weights, shuffling and augmentation.", bounds=SEED_BOUNDS, panel="Training")
    split_seed: int = opt(0, "Seed of the K-fold assignment (keep it fixed across runs).", bounds=SEED_BOUNDS,
                          panel="Data")
    eval_every: int = opt(1, "Validate every N epochs.", bounds=">= 1", resumable=True, panel="Training")
    weights: str | None = opt(None, "Initial weights: a run folder or kdcache checkpoint, a state dict "
                                    "(.pt/.pth/.safetensors), a Hugging Face SegFormer folder or an mmseg SegFormer "
                                    "checkpoint.", resumable=True, panel="Inputs and outputs")
    backbone_weights: str | None = opt(None, "Load this file into the encoder only (torchvision ImageNet .pth, "
                                             "timm/smp encoder, MiT/SegFormer): prints what matched, was missing and "
                                             "left over.", panel="Inputs and outputs")
    pretrained: bool = opt(False, "torchvision models: their ImageNet backbone weights from the local torch hub "
                                  "cache (never downloaded).", panel="Inputs and outputs")
    tensorboard: bool = opt(False, "Log metrics.jsonl's numbers, per-class IoU and validation pictures to "
                                   "RUN/tensorboard/ (pip install \"kdcache[tensorboard]\").", resumable=True, panel="Logging")
    wandb: bool = opt(False, "Log the same to Weights & Biases, files in RUN/wandb/; WANDB_MODE=offline sends "
                             "nothing (pip install \"kdcache[wandb]\").", resumable=True, panel="Logging")
    wandb_project: str | None = opt(None, "W&B project of --wandb (default: {wandb_default}).", resumable=True, panel="Logging")
    out: str = opt("runs/teacher", "Run folder (default runs/<model>).", resumable=True, cli_default=None, panel="Inputs and outputs")

    def to_dict(self) -> dict:
        """The fields as config.json holds them (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """The config of a config.json (its other keys ignored; pairs back to tuples, as declared)."""
        shapes = {f.name: o.shape for f, o in declared(cls)}
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
        for k, v in kw.items():
            if shapes.get(k) in ("size", "pair") and v is not None:
                kw[k] = tuple(v)
        return cls(**kw)

    def validate(self) -> None:
        check_declared(self)  # every number finite and within its declared bounds
        if self.optimizer not in ("sgd", "adamw"):
            raise KDCacheError(f"--optimizer must be sgd or adamw, got {self.optimizer}")
        if self.schedule not in ("poly", "cosine", "constant"):
            raise KDCacheError(f"--schedule must be poly, cosine or constant, got {self.schedule}")
        lo, hi = self.scale  # each within its bounds (check_declared)
        if not lo <= hi:
            raise KDCacheError(f"--scale must be 'lo,hi' with 0 < lo <= hi, got {self.scale}")
        lo, hi = self.crop_area
        if not lo <= hi:
            raise KDCacheError(f"--crop-area must be 'lo,hi' with 0 < lo <= hi <= 1 (shares of the image), got "
                               f"{self.crop_area}")
        MixOptions.of(self)  # a known --mix
        if self.fold and not self.folds:
            raise KDCacheError(f"--fold {self.fold} needs --folds K (the number of folds)")
        for key in ("num_classes", "taps"):  # what kdcache passes the model builder itself
            if key in self.model_options:
                raise KDCacheError(f"--model-option {key}={self.model_options[key]}: kdcache gives the model its {key} "
                                   "(the data set's classes; the taps the KD methods read); drop it")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def median_frequency_weights(dataset: SegmentationDataset, preprocess: Preprocess,
                             show_progress: bool = True) -> torch.Tensor:
    """Median-frequency class weights (Eigen & Fergus 2015) from the training labels:
    w_c = median(f) / f_c with f_c = pixels of c / pixels of the images where c appears
    (classification: f_c = the share of images of class c). Classes that never appear get weight 1."""
    C = dataset.num_classes
    if is_classification(dataset):
        counts = dataset.class_counts().astype(np.float64)
        w = np.ones(C, dtype=np.float64)
        seen = counts > 0
        if seen.any():
            w[seen] = np.median(counts[seen]) / counts[seen]
        return torch.tensor(w, dtype=torch.float32)
    pixels = np.zeros(C, dtype=np.float64)
    present_total = np.zeros(C, dtype=np.float64)
    with progress_bar("class weights", total=len(dataset), enabled=show_progress) as bar:
        for i in range(len(dataset)):
            _, mask = dataset.load(i)
            y = preprocess.mask_to_tensor(mask).numpy()
            counts = np.bincount(y[y != IGNORE_INDEX].ravel(), minlength=C)[:C]
            pixels += counts
            present_total += (counts > 0) * (y != IGNORE_INDEX).sum()
            bar.advance()
    seen = pixels > 0
    w = np.ones(C, dtype=np.float64)
    if seen.any():
        freq = pixels[seen] / present_total[seen]
        w[seen] = np.median(freq) / freq
    return torch.tensor(w, dtype=torch.float32)


def lr_lambda(schedule: str, total_iters: int, power: float, warmup: int):
    def f(it: int) -> float:
        if warmup and it < warmup:
            return (it + 1) / warmup
        t = min(it, total_iters) / max(total_iters, 1)
        if schedule == "poly":
            return (1 - t) ** power
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * t))
        return 1.0

    return f


@dataclass
class TrainState:
    """What changes as a run trains, and what ``last.pt`` saves for ``--resume``."""

    model: SegModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    epoch: int = 0  # the next epoch to run
    best_miou: float = -1.0


@dataclass
class Prepared:
    """What :meth:`Trainer.prepare` sets up: the data, its batches, the model and its state."""

    train_ds: SegmentationDataset
    val_ds: SegmentationDataset
    batches: TrainingBatches
    val_pipe: Any
    model: SegModel
    state: TrainState


class Trainer:
    """Cross-entropy training of one model; see :class:`TrainConfig`.

    :meth:`fit` reads top to bottom as the steps of a run: data, model, optimizer and schedule
    (:meth:`prepare`), the run folder (new or resumed), then per epoch :meth:`train_one_epoch` and
    :meth:`validate_and_checkpoint`. Subclasses change the pipelines, the model and the loss
    (:meth:`compute_loss`), and may add parameters and state (the hooks at the end)."""

    kind = "supervised"
    command = "train-teacher"  # how errors name what the user ran

    def __init__(self, config: TrainConfig, *, resume: bool = False, overwrite: bool = False,
                 show_progress: bool = True, explicit: set[str] | None = None):
        """``explicit``: the option names the user gave; on ``resume`` only those are compared
        with (and may override) the run's stored configuration. None means all of them."""
        config.validate()
        self.show_progress = show_progress
        self.run = RunDir(config.out)
        if resume:
            config = self._merge_resume_config(config, explicit)
        else:  # a folder of anyone else's, or a run that needs --overwrite, refused before any work
            self.run.check_new(overwrite=overwrite)
        self.config = config
        require_extras(tensorboard=config.tensorboard, wandb=config.wandb)  # before any data is read
        self.monitor = RunLogger()  # TensorBoard / W&B, opened by fit() on rank 0
        self.resume = resume
        self.overwrite = overwrite
        self.device = resolve_device(config.device)
        # under torchrun: one process per device, DistributedDataParallel, rank 0 writes the run
        self.dist = distributed.init_from_env(self.device)
        self.device = distributed.local_device(self.device, self.dist)
        self.is_main = self.dist.is_main
        if not self.is_main:
            self.show_progress = False
        self.amp = bool(config.amp and self.device.type == "cuda")
        self.workers = default_workers(self.device) if config.workers is None else config.workers
        self.preprocess = Preprocess(resize=config.resize)
        self.class_weight: torch.Tensor | None = None
        self.ignore_index = IGNORE_INDEX  # the training set's (classification: -100)
        self.classification = False

    # -- the run, step by step ------------------------------------------------------------------
    def fit(self) -> dict:
        ready = self.prepare()
        state = ready.state
        self.run_config = self.describe_run(ready.model, ready.train_ds, ready.val_ds, ready.batches.augment)
        self.start_or_resume(state)
        self.monitor = self.open_monitor(state.epoch)

        train_model = self.parallel(ready.model)
        val_loader = self.validation_loader(ready.val_pipe)
        last: dict[str, Any] = {}
        try:
            for epoch in range(state.epoch, self.config.epochs):
                record = self.train_one_epoch(train_model, state, ready.batches, epoch)
                last = self.validate_and_checkpoint(state, val_loader, record)
        finally:
            ready.batches.close()  # the workers kept for the run, if any
            self.monitor.close()
        if self.is_main:
            self._save_curves()
        distributed.barrier()
        return {"run": str(self.run.path), "best_miou": state.best_miou, "last": last,
                "best_metric": "val top-1" if self.classification else "val mIoU"}

    def prepare(self) -> Prepared:
        """Everything :meth:`fit` sets up before it writes to the run folder: the seed, the data
        and its batches, the model (with its weights or backbone), class weights, optimizer and
        schedule. Benchmarks that time a run's epochs or steps start here too, so that they
        measure the set-up a run trains with."""
        c = self.config
        seed_everything(c.seed)
        train_ds, val_ds = self.build_datasets()
        self.classification = is_classification(train_ds)
        self.ignore_index = train_ds.ignore_index
        if self.workers > 0:  # e.g. the synthetic set rendered once, not by each epoch's workers
            train_ds.prepare_for_workers()
            val_ds.prepare_for_workers()
        batches, val_pipe = self.build_batches(train_ds, val_ds)
        self.labels = {"class_names": list(train_ds.class_names),
                       "palette": torch.from_numpy(np.asarray(train_ds.palette))}

        weights = open_weights(c.weights) if c.weights else None
        if weights is not None and weights.model_options and not c.model_options:
            # e.g. an mmseg SegFormer checkpoint needs the mmseg head: the run records it
            self.config = c = dataclasses.replace(c, model_options=weights.model_options)
        model = self.build_model(train_ds.num_classes).to(self.device)
        check_task(model, train_ds)
        if model.fixed_input_size is not None:  # e.g. a ViT: refused before any work, not at its first step
            model.check_input_size(batches.augment.crop, "training crops")
            model.check_input_size(tuple(val_pipe[0]["image"].shape[-2:]), "validation images")
        self.backbone_report = None
        if weights is not None and not self.resume:
            load_weights_into(model, weights)
        elif (c.backbone_weights or c.pretrained) and not self.resume:
            if c.backbone_weights and c.pretrained:
                raise KDCacheError("give --backbone-weights or --pretrained, not both")
            self.backbone_report = load_backbone(model, c.backbone_weights or pretrained_backbone_file(c.model))
            if self.is_main:
                console.print(self.backbone_report.summary(), highlight=False, soft_wrap=True)
        if c.class_weights:
            self.class_weight = median_frequency_weights(train_ds, self.preprocess, self.show_progress).to(self.device)
        state = self.build_state(model, batches.steps_per_epoch)
        return Prepared(train_ds, val_ds, batches, val_pipe, model, state)

    # -- set-up ---------------------------------------------------------------------------------
    def _merge_resume_config(self, config: TrainConfig, explicit: set[str] | None) -> TrainConfig:
        if self.run.check() is None or not self.run.exists() or not self.run.last.exists():
            raise KDCacheError(
                f"--resume: {self.run.path} holds no run with a last.pt checkpoint to resume; "
                "start it without --resume (or with --overwrite)"
            )
        stored = self.run.read_config()
        given = config.to_dict()
        changeable = resumable(type(config))  # what the options' declarations let a resume change
        keys = [k for k in given if k in stored and (explicit is None or k in explicit)]
        diffs = [
            f"{k}: run has {stored[k]!r}, now {given[k]!r}"
            for k in keys
            if k not in changeable and stored[k] != given[k]
        ]
        if diffs:
            raise KDCacheError(
                "--resume with options that differ from the run's config.json: " + "; ".join(diffs)
                + ". Resume with the run's own options (only "
                + ", ".join(f"--{k.replace('_', '-')}" for k in sorted(changeable - {"out"}))
                + " may change), or start a new run with another --out"
            )
        merged = {k: stored[k] for k in given if k in stored}
        for k in changeable:
            if explicit is None or k in explicit or k == "out":
                merged[k] = given[k]
        return type(config).from_dict(merged)

    def build_datasets(self) -> tuple[SegmentationDataset, SegmentationDataset]:
        c = self.config
        train, val, _ = train_val_sets(
            c.dataset, data_root=c.data_root, dataset_options=c.dataset_options,
            train_split=c.train_split, val_split=c.val_split, folds=c.folds, fold=c.fold,
            seed=c.split_seed, limit_n=c.limit,
        )
        if len(train) == 0 or len(val) == 0:
            raise KDCacheError(f"empty training ({len(train)}) or validation ({len(val)}) set")
        train.require_labels(f"{self.command} (its training set)")
        val.require_labels(f"{self.command} (its validation set)")
        return train, val

    def build_pipelines(self, train_ds: SegmentationDataset, val_ds: SegmentationDataset
                        ) -> tuple[SegPipeline, SegPipeline]:
        """Training items get one sampled scale/crop/flip each; validation items none. The
        crop defaults to the first training image's (preprocessed) size."""
        c = self.config
        crop = c.crop
        if crop is None:
            crop = tuple(self.preprocess.image_to_tensor(train_ds.load(0)[0]).shape[-2:])
        augment = training_augment(is_classification(train_ds), crop, c.scale, c.crop_area, c.hflip)
        return (SegPipeline(train_ds, self.preprocess, augment, seed=c.seed, mix=MixOptions.of(c)),
                SegPipeline(val_ds, self.preprocess))

    def build_batches(self, train_ds: SegmentationDataset, val_ds: SegmentationDataset
                      ) -> tuple[TrainingBatches, SegPipeline]:
        """The training batches (:class:`~kdcache.train.batches.TrainingBatches`: the epoch's samples,
        this rank's share, the loader) and the validation pipeline."""
        train_pipe, val_pipe = self.build_pipelines(train_ds, val_ds)
        c = self.config
        return (TrainingBatches(train_pipe, batch_size=c.batch_size, seed=c.seed, workers=self.workers,
                                dist=self.dist, pin_memory=self.device.type == "cuda"), val_pipe)

    def build_model(self, num_classes: int) -> SegModel:
        return build_model(self.config.model, num_classes, **self.config.model_options)

    def build_state(self, model: SegModel, steps_per_epoch: int) -> TrainState:
        """The optimizer over the model's and the hooks' parameters, the per-iteration schedule
        over the whole run, and the gradient scaler (active with CUDA AMP)."""
        c = self.config
        params = [p for p in model.parameters() if p.requires_grad] + self.extra_parameters()
        if c.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
        schedule = lr_lambda(c.schedule, steps_per_epoch * c.epochs, c.poly_power, c.warmup_iters)
        return TrainState(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule),
                          torch.amp.GradScaler("cuda", enabled=self.amp))

    def describe_run(self, model: SegModel, train_ds, val_ds, augment: Augment | None) -> dict:
        """The run's ``config.json``: the options plus what they resolved to."""
        return {
            **self.config.to_dict(),
            "kind": self.kind,
            "num_classes": train_ds.num_classes,
            "task": "classification" if self.classification else "segmentation",
            "class_names": list(train_ds.class_names),
            "preprocess": self.preprocess.to_dict(),
            "augment": augment.to_dict() if augment is not None else None,
            "amp_enabled": self.amp,
            "params": count_parameters(model),
            "train_samples": len(train_ds),
            "val_samples": len(val_ds),
            "device_name": device_name(self.device),
            "kdcache_version": __version__,
            "world_size": self.dist.world_size,
            **({"backbone_loaded": self.backbone_report.to_dict()} if self.backbone_report else {}),
        }

    def start_or_resume(self, state: TrainState) -> None:
        """A new run folder, or (``--resume``) every state of ``last.pt`` restored: weights,
        optimizer, schedule, scaler, the hooks' state and the RNG, and the metrics past it dropped."""
        if self.resume:
            if self.is_main:
                self.run.folder()  # kdcache's run (a run folder of an earlier kdcache gets its marker)
            ckpt = read_checkpoint(self.run.last)
            load_weights(state.model, self.run.last)
            state.optimizer.load_state_dict(ckpt["optimizer"])
            state.scheduler.load_state_dict(ckpt["scheduler"])
            if ckpt.get("scaler") and self.amp:  # empty when the run began without CUDA AMP
                state.scaler.load_state_dict(ckpt["scaler"])
            self.load_extra_state(ckpt)
            torch.set_rng_state(ckpt["rng_cpu"])
            state.epoch, state.best_miou = ckpt["epoch"] + 1, ckpt["best_miou"]
            self.run_config["resumed_from_epoch"] = ckpt["epoch"]
            if self.is_main:
                self.run.truncate_metrics(ckpt["epoch"])
                write_json(self.run.config_path, self.run_config)
                console.print(f"resuming {self.run.path} after epoch {ckpt['epoch'] + 1}/{self.config.epochs}")
        elif self.is_main:
            self.run.create(self.run_config, overwrite=self.overwrite)
        if not distributed.all_ok(True):  # every rank past set-up (rank 0's run folder exists)
            raise KDCacheError("a rank failed during set-up")

    def open_monitor(self, start_epoch: int) -> RunLogger:
        """TensorBoard / W&B as the options ask, on rank 0 only; if that fails, every rank stops."""
        c, monitor, error = self.config, RunLogger(), None
        if self.is_main:
            try:
                monitor = open_loggers(self.run.path, self.labels["class_names"], tensorboard=c.tensorboard,
                                       wandb=c.wandb, wandb_project=c.wandb_project, config=self.run_config,
                                       start_epoch=start_epoch)
            except KDCacheError as exc:
                error = exc
        if not distributed.all_ok(error is None):
            raise error or KDCacheError("a rank failed during set-up")
        return monitor

    @torch.no_grad()
    def example_panels(self, model: SegModel, val_pipe) -> dict[str, np.ndarray]:
        """input | ground truth | prediction of the first validation images (the same every epoch)."""
        was_training, panels = model.training, {}
        if self.classification:  # no label maps to draw
            return panels
        model.eval()
        palette = self.labels["palette"].numpy()
        for i in range(min(VAL_EXAMPLES, len(val_pipe))):
            item = val_pipe[i]
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                pred = model.predict(item["image"][None].to(self.device), size=tuple(item["label"].shape))[0]
            panels[item["id"]] = prediction_panel(self.preprocess.denormalize(item["image"]), item["label"].numpy(),
                                                  pred.cpu().numpy(), palette)
        model.train(was_training)
        return panels

    def parallel(self, model: SegModel) -> torch.nn.Module:
        """The module the training step calls: DistributedDataParallel under torchrun."""
        if self.dist.world_size == 1:
            return model
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def validation_loader(self, val_pipe: SegPipeline) -> torch.utils.data.DataLoader:
        """Each rank validates its slice; the confusion matrices are summed across ranks."""
        world = self.dist.world_size
        sampler = list(range(self.dist.rank, len(val_pipe), world)) if world > 1 else None
        return make_loader(val_pipe, self.config.batch_size, self.workers, pin_memory=self.device.type == "cuda",
                           sampler=sampler)

    # -- one epoch ------------------------------------------------------------------------------
    def train_one_epoch(self, train_model: torch.nn.Module, state: TrainState, batches: TrainingBatches,
                        epoch: int) -> dict[str, Any]:
        """One pass over this epoch's batches; returns the epoch's record (mean loss terms,
        learning rate, speed, and the samples seen, counted by id)."""
        c = self.config
        loader = batches.loader(epoch)
        steps_per_epoch = batches.steps_per_epoch
        state.model.train()
        terms = LossTerms(epoch, every=1 if self.device.type == "cpu" else LOSS_READ_EVERY)
        seen: set[int] = set()
        n_steps = 0
        t0 = time.perf_counter()
        with progress_bar(f"epoch {epoch + 1}/{c.epochs}", total=steps_per_epoch * c.batch_size,
                          enabled=self.show_progress) as bar:
            for batch in loader:
                seen.update(batch["index"].tolist())  # read on the host, before the batch goes to the device
                batch = {k: (v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                         for k, v in batch.items()}
                terms.add(n_steps, *self.train_step(train_model, state, batch, epoch, n_steps))
                n_steps += 1
                shown = {"loss": terms.mean_loss()} if terms.read_steps else {}  # a GPU reads the terms every few steps
                bar.advance(len(batch["id"]), **shown, lr=state.scheduler.get_last_lr()[0])
            terms.read()
        sums = terms.sums
        train_time = time.perf_counter() - t0
        own_loss = sums.get("loss", 0.0) / max(n_steps, 1)
        sums = distributed.mean_over_ranks(sums)
        gathered = distributed.gather_objects((sorted(seen), own_loss))
        per_rank = [s for s, _ in gathered]
        replicas = {}
        if self.dist.enabled:  # the student's and the KD adapters' parameters, and each rank's own loss
            params = [*state.model.parameters(), *self.extra_parameters()]
            replicas = {"train_replicas_equal": distributed.replicas_equal(params),
                        "train_loss_per_rank": [loss for _, loss in gathered]}
        return {
            "epoch": epoch,
            **{f"train_{k}": v / max(n_steps, 1) for k, v in sums.items()},
            "loss_terms": [f"train_{k}" for k in sums],  # which train_* keys are loss terms
            "lr": state.scheduler.get_last_lr()[0],
            "train_time_s": train_time,
            "train_images_per_s": n_steps * c.batch_size * self.dist.world_size / max(train_time, 1e-9),
            **batches.seen_counts(per_rank),
            **replicas,
        }

    def train_step(self, train_model: torch.nn.Module, state: TrainState, batch: dict, epoch: int,
                   step: int) -> tuple[list[str], torch.Tensor]:
        """Forward, loss, backward and optimizer step on one batch; the names of the loss and its
        terms, and their values as one tensor on the device (read back by :class:`LossTerms`, not here:
        a read is a host synchronisation that stops the host from queueing the next step)."""
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            loss, terms = self.compute_loss(train_model, batch)
        values = torch.stack([loss.detach().float(), *(t.detach().float() for t in terms.values())])
        if self.device.type == "cpu" and not math.isfinite(float(values[0])):  # free on the CPU: before the step
            raise non_finite_loss(float(values[0]), epoch, step)
        state.optimizer.zero_grad(set_to_none=True)
        state.scaler.scale(loss).backward()
        if self.dist.enabled:  # parameters outside the DDP module (KD adapters): average by hand
            distributed.average_gradients(self.extra_parameters())
        state.scaler.step(state.optimizer)
        state.scaler.update()
        state.scheduler.step()
        return ["loss", *terms], values

    def validate_and_checkpoint(self, state: TrainState, val_loader, record: dict[str, Any]) -> dict[str, Any]:
        """Validate (every ``--eval-every`` epochs and after the last), keep ``best.pt`` at the
        best val mIoU (classification: top-1 accuracy), log the epoch and write ``last.pt``;
        returns the completed record."""
        c, epoch = self.config, record["epoch"]
        check_finite_weights(state.model, epoch)  # before any checkpoint of them
        if (epoch + 1) % c.eval_every == 0 or epoch + 1 == c.epochs:
            distributed.broadcast_buffers(state.model)  # every rank validates the model rank 0 saves
            m = evaluate_model(state.model, val_loader, len(self.labels["class_names"]), self.device, amp=self.amp,
                               description="validate", show_progress=self.show_progress).metrics
            record.update({"val_miou": m["miou"], "val_macc": m["macc"], "val_aacc": m["aacc"], "val_iou": m["iou"]})
            if self.classification:
                record.update({"val_top1": m["top1"], "val_top5": m["top5"], "val_acc": m["acc"]})
            score = m["top1"] if self.classification else m["miou"]
            miou = score if not math.isnan(score) else -1.0
            if miou > state.best_miou:
                state.best_miou = miou
                record["best"] = True
                if self.is_main:
                    save_checkpoint(self.run.best, state.model, config=self.run_config, epoch=epoch,
                                    best_miou=miou, **self.labels)
            if self.is_main and self.classification:
                console.print(
                    f"epoch {epoch + 1}/{c.epochs}: loss {record['train_loss']:.4f}  val top-1 {100 * m['top1']:.2f}  "
                    f"top-5 {100 * m['top5']:.2f}  mAcc {100 * m['macc']:.2f}  "
                    f"({record['train_images_per_s']:.1f} img/s)"
                )
            elif self.is_main:
                console.print(
                    f"epoch {epoch + 1}/{c.epochs}: loss {record['train_loss']:.4f}  val mIoU {100 * m['miou']:.2f}  "
                    f"mAcc {100 * m['macc']:.2f}  aAcc {100 * m['aacc']:.2f}  ({record['train_images_per_s']:.1f} img/s)"
                )
        state.epoch = epoch + 1
        if self.is_main:
            self.run.log(record)
            self.monitor.log_epoch(record, epoch)
            if "val_miou" in record and (c.tensorboard or c.wandb):
                self.monitor.log_images(self.example_panels(state.model, val_loader.dataset), epoch)
            save_checkpoint(
                self.run.last, state.model, config=self.run_config, epoch=epoch, best_miou=state.best_miou,
                optimizer=state.optimizer.state_dict(), scheduler=state.scheduler.state_dict(),
                scaler=state.scaler.state_dict(), rng_cpu=torch.get_rng_state(), **self.labels,
                **self.extra_state(),
            )
        return record

    def _save_curves(self) -> None:
        records = self.run.read_metrics()
        if records:
            terms = dict.fromkeys(t for r in records for t in r.get("loss_terms", ()))
            save_training_curves(self.run.file(CURVES), records, list(terms),
                                 title=f"{self.config.model} ({self.kind}) — {self.run.path.name}")

    # -- the loss -------------------------------------------------------------------------------
    def compute_loss(self, model: SegModel, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Cross-entropy (ignore 255) on logits bilinearly upsampled to the label size.

        Returns the total loss and its named terms as detached 0-d tensors (the loop reads them
        back with one host synchronisation per step)."""
        out = model(batch["image"])
        loss = self.label_loss(out.logits, batch)
        return loss, {"ce": loss.detach()}

    def label_loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """The batch's L_seg: :meth:`segmentation_loss`, or with mixup (or a mixed classifier) the
        λ-weighted cross-entropy against both images' labels (:func:`~kdcache.pipeline.mixing.mixed_cross_entropy`)."""
        if "mix/lam" not in batch:
            return self.segmentation_loss(logits, batch["label"])
        labels, partner = batch["label"], batch["mix/label"]
        if tuple(logits.shape[-2:]) != tuple(labels.shape[-2:]):
            logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        return mixed_cross_entropy(logits, labels, partner, batch["mix/lam"], self.class_weight, self.ignore_index)

    def segmentation_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """L_seg: cross-entropy of the logits upsampled to the labels (class weights if asked);
        a classifier's [N, C, 1, 1] against its [N, 1, 1] classes is the plain cross-entropy."""
        if tuple(logits.shape[-2:]) != tuple(labels.shape[-2:]):
            logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        return F.cross_entropy(logits.float(), labels, weight=self.class_weight, ignore_index=self.ignore_index)

    # -- hooks for subclasses (distillation adds adapters and their state) -------------------
    def extra_parameters(self) -> list[torch.nn.Parameter]:
        return []

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, ckpt: dict) -> None:
        pass

def check_task(model: SegModel, dataset: SegmentationDataset) -> None:
    """A classifier for a classification data set, a segmentation network otherwise (a model
    of no known family takes the data set's task, which its outputs must then fit)."""
    want = "classification" if is_classification(dataset) else "segmentation"
    if model.task is None:  # a package.module:callable: its outputs are checked as the data set's task wants
        model.task = want
    if model.task != want:
        raise KDCacheError(f"model '{model.name}' is a {model.task} network and {dataset.name} is a {want} data set; "
                           f"pick a {want} model (kdcache list-models)")


def train(config: TrainConfig, *, resume: bool = False, overwrite: bool = False,
          show_progress: bool = True, explicit: set[str] | None = None) -> dict:
    """Run supervised training; returns ``{"run", "best_miou", "last"}``. Under torchrun the
    process group is destroyed at the end (left to the interpreter's exit, gloo's threads can abort
    a finished rank: 'terminate called without an active exception')."""
    try:
        return Trainer(config, resume=resume, overwrite=overwrite, show_progress=show_progress,
                       explicit=explicit).fit()
    finally:
        distributed.shutdown()
