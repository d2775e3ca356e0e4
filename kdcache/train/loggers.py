"""Monitoring a run: TensorBoard (``--tensorboard``) and Weights & Biases (``--wandb``).

The trainer calls one :class:`RunLogger` after it writes each epoch's record to
``metrics.jsonl``: :meth:`RunLogger.log_epoch` logs the record's numbers (the same values, step =
the record's 0-based ``epoch``) and :meth:`RunLogger.log_images` a few validation panels
(input | ground truth | prediction). Only rank 0 logs. TensorBoard writes to ``RUN/tensorboard/``,
W&B to ``RUN/wandb/`` (``WANDB_MODE=offline`` sends nothing).

Both packages are optional extras (``pip install "kdcache[tensorboard]"`` / ``"kdcache[wandb]"``),
imported only inside the functions that need them: a run without these options must not need
them installed, nor pay their import time. :func:`require_extras` tries the imports before the
run starts, so a missing package is one error line, not a crash after the first epoch.
"""

from __future__ import annotations

import importlib
import math
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kdcache.core.errors import KDCacheError, MissingExtraError
from kdcache.core.runs import RunDir
from kdcache.report.figures import colorize

TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
WANDB_ID = "kdcache-run-id"  # in RUN/wandb/: the W&B run id, so --resume continues the same W&B run
DEFAULT_PROJECT = "kdcache"
VAL_EXAMPLES = 4  # validation images shown per epoch: the first ones of the split, the same every epoch
IMAGE_TAG = "val_examples"

#: option -> (module its logger imports, pip extra)
EXTRAS = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


def _import(option: str):
    """The optional module behind ``--<option>``, or a one-line error naming the extra."""
    module, extra = EXTRAS[option]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(f'--{option} needs the {extra} package: pip install "kdcache[{extra}]"') from None


def require_extras(*, tensorboard: bool = False, wandb: bool = False) -> None:
    """Fail now (before any data is read) if an asked-for logger's package is not installed."""
    for option, wanted in (("tensorboard", tensorboard), ("wandb", wandb)):
        if wanted:
            _import(option)


def epoch_scalars(record: Mapping[str, Any], class_names: Sequence[str] = ()) -> dict[str, float]:
    """The numbers of an epoch record as scalar tags: every int/float under its own key (the
    ``epoch`` itself is the step), ``val_iou`` as ``val_iou/<class name>``, any other list of
    numbers as ``<key>/<position>`` (``train_samples_per_rank/0``, …). Flags (``best``), text
    and non-finite values (a class absent from the split has no IoU) are left out."""
    out: dict[str, float] = {}

    def put(tag: str, v: Any) -> None:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[tag] = float(v)

    for key, value in record.items():
        if key == "epoch":
            continue
        if isinstance(value, (list, tuple)):
            names = class_names if key == "val_iou" else ()
            for i, v in enumerate(value):
                put(f"{key}/{names[i] if i < len(names) else i}", v)
        else:
            put(key, value)
    return out


def prediction_panel(image: np.ndarray, label: np.ndarray, pred: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """One uint8 [H, 3W, 3] picture: the input | the ground truth | the prediction, the masks in
    the data set's palette (ignored pixels black)."""
    return np.concatenate([image, colorize(label, palette), colorize(pred, palette)], axis=1)


class RunLogger:
    """Where a run's epochs go besides ``metrics.jsonl``; this base class logs nothing."""

    def log_epoch(self, record: Mapping[str, Any], epoch: int) -> None:
        pass

    def log_images(self, images: Mapping[str, np.ndarray], epoch: int) -> None:
        """``images``: name (the sample id) -> uint8 [H, W, 3]."""

    def close(self) -> None:
        pass


class TensorBoardLogger(RunLogger):
    """Event files in ``RUN/tensorboard/``. A resumed run continues writing with
    ``purge_step`` = its first epoch: events a crash left past the last checkpoint (epochs
    the resumed run redoes) are hidden by TensorBoard, as ``metrics.jsonl`` drops their lines.
    A run started afresh (``--overwrite``) deletes the old event files first."""

    def __init__(self, run_path: Path, class_names: Sequence[str], start_epoch: int = 0):
        tb = _import("tensorboard")
        log_dir = Path(run_path) / TENSORBOARD_DIR
        folder = RunDir(run_path).folder()
        if start_epoch == 0:  # the event files this run wrote before (never anyone else's)
            folder.remove(under=TENSORBOARD_DIR)
        before = set(log_dir.glob("events.out.tfevents.*"))
        self.class_names = list(class_names)
        self.writer = tb.SummaryWriter(str(log_dir), purge_step=start_epoch or None)
        self.writer.flush()  # the event file on disk, to be recorded as the run's
        folder.record(f"{TENSORBOARD_DIR}/{p.name}" for p in sorted(set(log_dir.glob("events.out.tfevents.*")) - before))

    def log_epoch(self, record: Mapping[str, Any], epoch: int) -> None:
        for tag, value in epoch_scalars(record, self.class_names).items():
            self.writer.add_scalar(tag, value, epoch)
        self.writer.flush()

    def log_images(self, images: Mapping[str, np.ndarray], epoch: int) -> None:
        for name, image in images.items():
            self.writer.add_image(f"{IMAGE_TAG}/{name}", image, epoch, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger(RunLogger):
    """One W&B run per kdcache run, its files in ``RUN/wandb/``; the step is the epoch. The run
    id is kept in ``RUN/wandb/kdcache-run-id`` so ``--resume`` continues the same W&B run
    (``resume="allow"``). ``mode`` is left to W&B, so ``WANDB_MODE=offline`` (or ``disabled``)
    applies: offline, nothing is sent and ``wandb sync RUN/wandb/offline-run-*`` uploads later."""

    def __init__(self, run_path: Path, class_names: Sequence[str], *, project: str | None, config: dict,
                 resume: bool = False):
        self.wandb = _import("wandb")
        id_file = RunDir(run_path).file(f"{WANDB_DIR}/{WANDB_ID}")
        run_id = id_file.read_text().strip() if resume and id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        self.class_names = list(class_names)
        try:
            self.run = self.wandb.init(project=project or DEFAULT_PROJECT, dir=str(run_path), name=Path(run_path).name,
                                       id=run_id, resume="allow", config=config)
        except Exception as exc:  # e.g. online without an API key: say what to do, in one line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise KDCacheError(f"--wandb: W&B could not start a run ({first}); log in with `wandb login`, "
                               "or set WANDB_MODE=offline") from None

    def log_epoch(self, record: Mapping[str, Any], epoch: int) -> None:
        self.run.log(epoch_scalars(record, self.class_names), step=epoch)

    def log_images(self, images: Mapping[str, np.ndarray], epoch: int) -> None:
        if images:
            self.run.log({IMAGE_TAG: [self.wandb.Image(image, caption=name) for name, image in images.items()]},
                         step=epoch)

    def close(self) -> None:
        self.run.finish()


class Loggers(RunLogger):
    """Several loggers as one."""

    def __init__(self, loggers: list[RunLogger]):
        self.loggers = loggers

    def log_epoch(self, record: Mapping[str, Any], epoch: int) -> None:
        for lg in self.loggers:
            lg.log_epoch(record, epoch)

    def log_images(self, images: Mapping[str, np.ndarray], epoch: int) -> None:
        for lg in self.loggers:
            lg.log_images(images, epoch)

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()


def open_loggers(run_path: Path, class_names: Sequence[str], *, tensorboard: bool = False, wandb: bool = False,
                 wandb_project: str | None = None, config: dict | None = None, start_epoch: int = 0) -> RunLogger:
    """The loggers a run's options ask for (a :class:`RunLogger` that logs nothing if none);
    ``start_epoch`` > 0 for a resumed run."""
    loggers: list[RunLogger] = []
    if tensorboard:
        loggers.append(TensorBoardLogger(run_path, class_names, start_epoch))
    if wandb:
        loggers.append(WandbLogger(run_path, class_names, project=wandb_project, config=config or {},
                                   resume=start_epoch > 0))
    return Loggers(loggers)
